//! Bearer-token authentication and role checks for gRPC services.
//!
//! [`AdminAccessLayer`] wraps the whole gRPC router: for every request to an
//! admin service (every `claw.v1` service but the proxies' discovery and
//! report services, plus reflection and any unknown path) it resolves the
//! bearer token to a [`Principal`] (`Unauthenticated` if none), checks the
//! full method path with [`access::authorize`] (`PermissionDenied` naming the
//! role), and puts the principal in the request's extensions. A tonic
//! interceptor cannot do this: it never sees the method path. [`AdminAuth`]
//! stays on each admin service as a second line (it accepts the principal
//! the layer resolved). The proxy-facing services get a [`TokenAuth`] built
//! from the proxy token, which no admin token passes; the proxy token
//! resolves to no principal, so it opens no admin service. Tokens are
//! compared in constant time over their SHA-256 digests (fixed length, so not
//! even the length leaks).
//!
//! gRPC health (`grpc.health.v1.Health`) is deliberately unauthenticated:
//! Kubernetes and load-balancer probes cannot send headers, and it reveals
//! nothing but serving status.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::access::{self, Access, Principal};
use crate::config::Token;

/// The principal for an `authorization` header, or the status to answer.
fn principal(access: &Access, header: Option<&str>) -> Result<Principal, Status> {
    match access.resolve_header(header) {
        Ok(Some(principal)) => Ok(principal),
        Ok(None) => Err(Status::unauthenticated("missing or invalid admin token")),
        Err(e) => {
            tracing::error!(error = %e, "cannot look up an admin token");
            Err(Status::unavailable("cannot check the token; try again"))
        }
    }
}

/// Checks every admin request's token and role by full method path (see
/// the module docs). Wraps the router, so it also guards services added
/// later.
#[derive(Clone, Debug)]
pub(crate) struct AdminAccessLayer {
    access: Arc<Access>,
}

impl AdminAccessLayer {
    /// Resolves tokens with `access`.
    pub(crate) fn new(access: Arc<Access>) -> Self {
        AdminAccessLayer { access }
    }
}

impl<S> tower::Layer<S> for AdminAccessLayer {
    type Service = AdminAccessService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AdminAccessService {
            inner,
            access: self.access.clone(),
        }
    }
}

/// The service made by [`AdminAccessLayer`].
#[derive(Clone, Debug)]
pub(crate) struct AdminAccessService<S> {
    inner: S,
    access: Arc<Access>,
}

impl<S> AdminAccessService<S> {
    /// `Ok` with the principal inserted, or the status to answer.
    fn check<B>(&self, request: &mut http::Request<B>) -> Result<(), Status> {
        let path = request.uri().path();
        if !access::methods::needs_admin(path) {
            return Ok(());
        }
        let header = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let principal = principal(&self.access, header)?;
        access::authorize(&principal, path)?;
        request.extensions_mut().insert(principal);
        Ok(())
    }
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for AdminAccessService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        match self.check(&mut request) {
            Ok(()) => Box::pin(self.inner.call(request)),
            Err(status) => Box::pin(std::future::ready(Ok(status.into_http()))),
        }
    }
}

/// The admin services' authentication: resolves the bearer token to a
/// [`crate::access::Principal`] (bootstrap or named token) and puts it in
/// the request's extensions; anything else is `Unauthenticated`.
#[derive(Clone, Debug)]
pub(crate) struct AdminAuth {
    access: Arc<Access>,
}

impl AdminAuth {
    /// Admits holders of an admin token known to `access`.
    pub(crate) fn new(access: Arc<Access>) -> Self {
        AdminAuth { access }
    }
}

impl Interceptor for AdminAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        // Resolved (and its role checked) by the layer already.
        if request.extensions().get::<Principal>().is_some() {
            return Ok(request);
        }
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let principal = principal(&self.access, header)?;
        request.extensions_mut().insert(principal);
        Ok(request)
    }
}

/// An interceptor that admits requests carrying
/// `authorization: Bearer <token>` for one token.
#[derive(Clone)]
pub(crate) struct TokenAuth {
    expected: Arc<[u8; 32]>,
    rejection: &'static str,
}

impl std::fmt::Debug for TokenAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenAuth")
            .field("rejection", &self.rejection)
            .finish_non_exhaustive()
    }
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

impl TokenAuth {
    /// Admits holders of the admin token (tests; the admin services use
    /// [`AdminAuth`]).
    #[cfg(test)]
    pub(crate) fn admin(token: &Token) -> Self {
        TokenAuth {
            expected: Arc::new(digest(token.as_bytes())),
            rejection: "missing or invalid admin token",
        }
    }

    /// Admits holders of the proxy token.
    pub(crate) fn proxy(token: &Token) -> Self {
        TokenAuth {
            expected: Arc::new(digest(token.as_bytes())),
            rejection: "missing or invalid proxy token",
        }
    }

    /// Whether request metadata carries the expected bearer token.
    pub(crate) fn admits(&self, metadata: &tonic::metadata::MetadataMap) -> bool {
        let Some(value) = metadata.get("authorization").and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let Some((scheme, token)) = value.trim().split_once(' ') else {
            return false;
        };
        if !scheme.eq_ignore_ascii_case("bearer") {
            return false;
        }
        digest(token.trim().as_bytes())
            .ct_eq(self.expected.as_ref())
            .into()
    }
}

impl Interceptor for TokenAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if self.admits(request.metadata()) {
            Ok(request)
        } else {
            Err(Status::unauthenticated(self.rejection))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(s: &str) -> Token {
        Token::new("T", Some(s.into())).expect("valid")
    }

    fn request(auth: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(a) = auth {
            r.metadata_mut()
                .insert("authorization", a.parse().expect("ascii"));
        }
        r
    }

    #[test]
    fn only_the_right_bearer_token_passes() {
        let mut admin = TokenAuth::admin(&token("admin-token-0123456789"));
        assert!(
            admin
                .call(request(Some("Bearer admin-token-0123456789")))
                .is_ok()
        );
        assert!(
            admin
                .call(request(Some("bearer admin-token-0123456789")))
                .is_ok()
        );
        for bad in [
            None,
            Some("Bearer proxy-token-0123456789"),
            Some("admin-token-0123456789"),
            Some("Basic admin-token-0123456789"),
            Some("Bearer admin-token-012345678"),
            Some("Bearer "),
        ] {
            let err = admin.call(request(bad)).expect_err("rejected");
            assert_eq!(err.code(), tonic::Code::Unauthenticated);
            assert_eq!(err.message(), "missing or invalid admin token");
        }
        let mut proxy = TokenAuth::proxy(&token("proxy-token-0123456789"));
        assert!(
            proxy
                .call(request(Some("Bearer proxy-token-0123456789")))
                .is_ok()
        );
        assert!(
            proxy
                .call(request(Some("Bearer admin-token-0123456789")))
                .is_err()
        );
    }
}
