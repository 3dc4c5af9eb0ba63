//! TLS for the proxy's HTTP listener: a rustls `ServerConfig` whose
//! certificate follows its files (cert-manager rotation; see
//! [`claw_tls::reload`]), ready for the accept loop:
//!
//! ```ignore
//! let acceptor = tokio_rustls::TlsAcceptor::from(tls::server_config(&cert, &key)?);
//! // per accepted TcpStream, inside the connection's task:
//! let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await??;
//! // then serve `TokioIo::new(stream)` exactly like the plain TcpStream
//! ```

use std::path::Path;
use std::sync::Arc;

use claw_tls::{ALPN_HTTP11, CertPaths};

/// The time a client gets to finish its TLS handshake.
pub use claw_tls::server::HANDSHAKE_TIMEOUT;

/// The listener's TLS config from PEM files: `cert` (chain, leaf first) and
/// `key` (PKCS#8, RSA or EC). ALPN `http/1.1`. The pair is re-read every
/// [`claw_tls::reload::RELOAD_INTERVAL`] by a watcher thread and swapped in
/// when both files are valid and match; until then (and on any broken
/// rotation) the previous pair keeps being served. Errors name the file.
pub fn server_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let paths = CertPaths {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
    };
    Ok(claw_tls::reloading_server_config(paths, &[ALPN_HTTP11])?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use claw_tls::test_pki::TestPki;
    use claw_tls::tokio_rustls::{TlsAcceptor, TlsConnector};
    use http_body_util::{BodyExt as _, Empty, Full};
    use hyper_util::rt::TokioIo;

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = TestPki::new().write_server(dir.path());
        let missing = dir.path().join("missing.key");
        let msg = server_config(&paths.cert, &missing)
            .expect_err("missing key")
            .to_string();
        assert!(
            msg.contains("TLS key file") && msg.contains("missing.key"),
            "{msg}"
        );
        std::fs::write(&paths.key, "garbage").expect("write");
        let msg = server_config(&paths.cert, &paths.key)
            .expect_err("garbage key")
            .to_string();
        assert!(msg.contains("server.key"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[tokio::test]
    async fn serves_http1_over_tls_to_a_client_trusting_the_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = TestPki::new();
        let paths = pki.write_server(dir.path());
        let ca = pki.write_ca(dir.path());
        let config = server_config(&paths.cert, &paths.key).expect("config");
        assert_eq!(config.alpn_protocols, vec![b"http/1.1".to_vec()]);

        // The wiring the accept loop needs: accept, handshake, serve the TlsStream.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let acceptor = TlsAcceptor::from(config);
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                .await
                .expect("in time")
                .expect("handshake");
            let service = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                    bytes::Bytes::from_static(b"ok"),
                )))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });

        let mut client_config = claw_tls::client::client_config(&ca).expect("client");
        client_config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let tls = TlsConnector::from(Arc::new(client_config))
            .connect(name, tcp)
            .await
            .expect("handshake");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .expect("http handshake");
        tokio::spawn(conn);
        let response = send
            .send_request(
                hyper::Request::get("/healthz")
                    .header("host", "localhost")
                    .body(Empty::<bytes::Bytes>::new())
                    .expect("request"),
            )
            .await
            .expect("response");
        assert_eq!(response.status(), 200);
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(&body[..], b"ok");
    }
}
