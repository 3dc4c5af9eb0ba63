//! Client authentication: `Authorization: Bearer <key>` is hashed (SHA-256)
//! and looked up in the current snapshot. The snapshot and the key travel on
//! to the inner layers in an [`Authenticated`] request extension
//! ([`crate::target`]), so the whole
//! request sees one consistent configuration.

use std::convert::Infallible;
use std::task::{Context, Poll};

use futures::future::{Either, Ready, ready};
use http::{Request, Response, header};
use sha2::{Digest, Sha256};
use tower::{Layer, Service};

use crate::body::ProxyBody;
use crate::error::ApiError;
use crate::snapshot::SnapshotStore;
use crate::target::Authenticated;

/// Extracts the bearer token.
pub(crate) fn bearer(headers: &http::HeaderMap) -> Option<&[u8]> {
    let v = headers.get(header::AUTHORIZATION)?.as_bytes();
    let (scheme, rest) = v.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Layer of [`Auth`].
#[derive(Clone)]
pub(crate) struct AuthLayer {
    store: SnapshotStore,
}

impl AuthLayer {
    /// Authenticates against `store`'s current snapshot.
    pub(crate) fn new(store: SnapshotStore) -> Self {
        AuthLayer { store }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            store: self.store.clone(),
        }
    }
}

/// Rejects requests without a known client key (401).
#[derive(Clone)]
pub(crate) struct Auth<S> {
    inner: S,
    store: SnapshotStore,
}

impl<S, B> Service<Request<B>> for Auth<S>
where
    S: Service<Request<B>, Response = Response<ProxyBody>, Error = Infallible>,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Either<Ready<Result<Response<ProxyBody>, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let Some(snapshot) = self.store.load() else {
            return Either::Left(ready(Ok(ApiError::not_ready().into_response())));
        };
        let key = bearer(req.headers()).and_then(|t| {
            let digest: [u8; 32] = Sha256::digest(t).into();
            snapshot.key(&digest).cloned()
        });
        let Some(key) = key else {
            return Either::Left(ready(Ok(ApiError::unauthorized().into_response())));
        };
        req.extensions_mut().insert(Authenticated { snapshot, key });
        Either::Right(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn bearer_parsing() {
        let mut h = http::HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc "),
        );
        assert_eq!(bearer(&h), Some(&b"abc"[..]));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer xyz"),
        );
        assert_eq!(bearer(&h), Some(&b"xyz"[..]));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bear"));
        assert_eq!(bearer(&h), None);
    }
}
