//! The server side: a listener's `ServerConfig`, and a TLS accept stream.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use crate::pem::TlsError;
use crate::reload::{CertPaths, CertResolver, RELOAD_INTERVAL};

/// ALPN id of HTTP/2 (gRPC).
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN id of HTTP/1.1.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// How long a client gets to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A server config answering with `resolver`'s certificate and offering
/// `alpn` (in preference order). TLS 1.2 and 1.3, ring, no client
/// certificates.
pub fn server_config(
    resolver: Arc<CertResolver>,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(crate::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// Loads `paths` (failing with the file named), starts the reload watcher
/// ([`RELOAD_INTERVAL`]) and returns the listener's config: the one call a
/// listener needs.
pub fn reloading_server_config(
    paths: CertPaths,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let resolver = CertResolver::load(paths)?;
    resolver.watch(RELOAD_INTERVAL)?;
    server_config(resolver, alpn)
}

/// Accepts TCP connections on `listener` (with `TCP_NODELAY`) and yields
/// them once their TLS handshake is done. Handshakes run in their own tasks,
/// bounded by [`HANDSHAKE_TIMEOUT`], so a slow or silent client never delays
/// the others; failed handshakes (plain HTTP, an untrusted certificate on
/// the client's side) are logged at debug and dropped. Accepting stops, and
/// the listener closes, when the returned stream is dropped.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
) -> ReceiverStream<io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = mpsc::channel(16);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tx.closed() => return,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_pki::TestPki;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_stream::StreamExt as _;

    #[tokio::test]
    async fn a_client_trusting_the_ca_completes_a_handshake_with_alpn() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = TestPki::new();
        let paths = pki.write_server(dir.path());
        let ca = pki.write_ca(dir.path());
        let config = reloading_server_config(paths, &[ALPN_H2]).expect("config");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut conns = incoming(listener, config);

        // A plain-text client is dropped without disturbing the others.
        let mut plain = TcpStream::connect(addr).await.expect("connect");
        plain
            .write_all(b"GET / HTTP/1.1\r\n\r\n")
            .await
            .expect("write");

        let mut client_config = crate::client::client_config(&ca).expect("client config");
        client_config.alpn_protocols = vec![ALPN_H2.to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let client = tokio::spawn(async move {
            let mut tls = connector.connect(name, tcp).await.expect("handshake");
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(ALPN_H2));
            tls.write_all(b"ping").await.expect("write");
            tls.flush().await.expect("flush");
            tls
        });
        let mut server_side = conns.next().await.expect("a connection").expect("tls");
        let mut buf = [0u8; 4];
        server_side.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"ping");
        client.await.expect("client");

        let mut leftover = Vec::new();
        let _ = plain.read_to_end(&mut leftover).await;
        assert!(
            !leftover.starts_with(b"HTTP/"),
            "plain HTTP got an HTTP answer"
        );
    }
}
