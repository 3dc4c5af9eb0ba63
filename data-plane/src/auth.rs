//! Client authentication: `Authorization: Bearer <key>` or `x-api-key:
//! <key>` (what the Anthropic SDK sends) is hashed (SHA-256) and looked up
//! in the current snapshot. A rejection is in the shape of the endpoint the
//! client called ([`Wire::for_path`]), so its SDK classifies it. The snapshot and the key travel on
//! to the inner layers in an [`Authenticated`] request extension
//! ([`crate::target`]), so the whole
//! request sees one consistent configuration.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready as ready_poll};

use futures::future::{Either, Ready, ready};
use http::{Request, Response, header};
use sha2::{Digest, Sha256};
use tower::{Layer, Service};

use crate::body::ProxyBody;
use crate::error::{ApiError, Wire};
use crate::key_limits::KeyPermit;
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

/// The client's key: the bearer token, else `x-api-key`.
pub(crate) fn client_key(headers: &http::HeaderMap) -> Option<&[u8]> {
    bearer(headers).or_else(|| {
        let token = headers.get("x-api-key")?.as_bytes().trim_ascii();
        (!token.is_empty()).then_some(token)
    })
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

pin_project_lite::pin_project! {
    /// The inner future; its response body takes the key's in-flight permit
    /// (released when the body ends or the client goes away).
    pub(crate) struct Permitted<F> {
        #[pin]
        inner: F,
        permit: Option<KeyPermit>,
    }
}

impl<F> Future for Permitted<F>
where
    F: Future<Output = Result<Response<ProxyBody>, Infallible>>,
{
    type Output = Result<Response<ProxyBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let res = ready_poll!(this.inner.poll(cx));
        Poll::Ready(res.map(|r| match this.permit.take() {
            Some(p) => r.map(|b| b.guarded(p)),
            None => r,
        }))
    }
}

/// Rejects requests without a known client key (401), and those beyond
/// the key's `max_parallel` on this proxy (429).
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
    type Future = Either<Ready<Result<Response<ProxyBody>, Infallible>>, Permitted<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let wire = Wire::for_path(req.uri().path());
        let Some(snapshot) = self.store.load() else {
            return Either::Left(ready(Ok(ApiError::not_ready().into_response_for(wire))));
        };
        let key = client_key(req.headers()).and_then(|t| {
            let digest: [u8; 32] = Sha256::digest(t).into();
            snapshot.key(&digest).cloned()
        });
        let Some(key) = key else {
            return Either::Left(ready(Ok(ApiError::unauthorized().into_response_for(wire))));
        };
        let permit = match &key.parallel {
            None => None,
            Some(limiter) => match limiter.try_acquire() {
                Some(p) => Some(p),
                None => {
                    crate::metrics::key_parallel_rejected();
                    tracing::debug!(key = %key.name, max_parallel = limiter.max(), "key at its max-parallel");
                    let e = ApiError::key_parallel_limited(&key.name, limiter.max());
                    return Either::Left(ready(Ok(e.into_response_for(wire))));
                }
            },
        };
        req.extensions_mut().insert(Authenticated { snapshot, key });
        Either::Right(Permitted {
            inner: self.inner.call(req),
            permit,
        })
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

    #[test]
    fn x_api_key_is_a_client_key_and_bearer_wins() {
        let mut h = http::HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static(" sk-1 "));
        assert_eq!(client_key(&h), Some(&b"sk-1"[..]));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer b"));
        assert_eq!(client_key(&h), Some(&b"b"[..]));
        h.remove(header::AUTHORIZATION);
        h.insert("x-api-key", HeaderValue::from_static(""));
        assert_eq!(client_key(&h), None);
    }
}
