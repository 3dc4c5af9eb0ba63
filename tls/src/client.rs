//! The client side: trusting a private CA.

use std::path::Path;

use rustls::ClientConfig;

use crate::pem::{self, TlsError};

/// A client config that trusts exactly the CA certificates in the PEM file
/// at `ca` (not the public roots: a private service's certificate is then
/// trusted only through its own CA). No ALPN is set.
pub fn client_config(ca: &Path) -> Result<ClientConfig, TlsError> {
    let roots = pem::root_store(ca)?;
    Ok(ClientConfig::builder_with_provider(crate::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
