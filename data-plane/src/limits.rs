//! Per-client-key limits: the key's requests per minute (a rate limiter,
//! checked before the body is even read) and the key's allowed models
//! ([`check_model`], called by the route layer once the model is known).

use std::convert::Infallible;
use std::task::{Context, Poll};

use futures::future::{Either, Ready, ready};
use http::{Request, Response};
use tokio::time::Instant;
use tower::{Layer, Service};

use crate::auth::Authenticated;
use crate::body::ProxyBody;
use crate::error::ApiError;
use crate::snapshot::ClientKey;

/// Seconds for `Retry-After`: rounded up, at least 1.
pub fn retry_after_secs(d: std::time::Duration) -> u64 {
    let s = d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0));
    s.clamp(1, 86_400)
}

/// 403 unless the key may use `model`.
pub fn check_model(key: &ClientKey, model: &str) -> Result<(), ApiError> {
    if key.allows(model) {
        Ok(())
    } else {
        Err(ApiError::model_not_allowed(model))
    }
}

/// Layer of [`Limits`].
#[derive(Clone, Default)]
pub struct LimitsLayer;

impl<S> Layer<S> for LimitsLayer {
    type Service = Limits<S>;
    fn layer(&self, inner: S) -> Limits<S> {
        Limits { inner }
    }
}

/// Enforces the client key's rpm (429 with `Retry-After`).
#[derive(Clone)]
pub struct Limits<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for Limits<S>
where
    S: Service<Request<B>, Response = Response<ProxyBody>, Error = Infallible>,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Either<Ready<Result<Response<ProxyBody>, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let limited = req
            .extensions()
            .get::<Authenticated>()
            .and_then(|a| a.key.rpm.as_ref())
            .and_then(|b| b.try_acquire(1.0, Instant::now()).err());
        match limited {
            Some(wait) => Either::Left(ready(Ok(ApiError::key_rate_limited(retry_after_secs(
                wait,
            ))
            .into_response()))),
            None => Either::Right(self.inner.call(req)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
        assert_eq!(retry_after_secs(Duration::MAX), 86_400);
    }
}
