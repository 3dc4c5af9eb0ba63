//! `claw-tls`: TLS for Claw Gateway's listeners and internal links, on
//! rustls with the ring provider (no OpenSSL).
//!
//! - [`pem`]: reading PEM certificate chains, private keys and CA bundles,
//!   with errors ([`TlsError`]) that name the file.
//! - [`reload`]: [`CertResolver`], a rustls certificate resolver that
//!   re-reads its certificate and key when the files change (cert-manager
//!   rotation) and keeps the previous pair when the new one is unusable.
//! - [`server`]: the `ServerConfig` of a listener, and [`server::incoming`],
//!   TCP accept with the handshakes off the accept path (for tonic's
//!   `serve_with_incoming`).
//! - [`client`]: a `ClientConfig` trusting one CA bundle.
//! - [`listener`]: binding a server's TCP listener with an accept queue as
//!   deep as the kernel allows.
//! - `test_pki` (feature `test-pki`): a throwaway CA and a `localhost`
//!   server certificate, generated with rcgen, for tests.
//!
//! The crate reads files and spawns one watcher thread per resolver; it
//! binds sockets only when asked to ([`listener::bind`]).

pub mod client;
pub mod listener;
pub mod pem;
pub mod reload;
pub mod server;

pub use pem::TlsError;
pub use reload::{CertPaths, CertResolver};
/// Re-exported so users build acceptors on the same versions.
pub use rustls;
pub use server::{ALPN_H2, ALPN_HTTP11, reloading_server_config, server_config};
/// Re-exported so users build acceptors on the same versions.
pub use tokio_rustls;

/// The crypto provider every config of this crate uses. Explicit (not the
/// process default), so a dependency enabling another provider cannot make
/// config building ambiguous.
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

#[cfg(any(test, feature = "test-pki"))]
pub mod test_pki;
