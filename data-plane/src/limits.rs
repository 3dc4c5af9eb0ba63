//! Per-client-key limits: the key's requests per minute (a rate limiter,
//! checked before the body is even read). The key's allowed models are
//! checked by [`crate::route`] once the model is known.
//!
//! A key's rpm holds for the whole fleet: the limiter admits the key's rpm
//! × this proxy's share of it ([`crate::fleet`] applies the shares the
//! control plane assigns), and every request asked — admitted or refused —
//! counts as demand for the key ([`crate::snapshot::KeyRpm::demand`]),
//! reported in each batch's `key_demand` so the control plane can weight
//! the shares by it.

use std::convert::Infallible;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::{Either, Ready, ready};
use http::{Request, Response};
use tokio::time::Instant;
use tower::{Layer, Service};

use crate::body::ProxyBody;
use crate::error::{ApiError, retry_after_secs};
use crate::target::Authenticated;

/// `Retry-After` while this proxy's share of the key is 0.
const ZERO_SHARE_RETRY: Duration = Duration::from_secs(1);

/// Layer of [`Limits`].
#[derive(Clone, Default)]
pub(crate) struct LimitsLayer;

impl<S> Layer<S> for LimitsLayer {
    type Service = Limits<S>;
    fn layer(&self, inner: S) -> Limits<S> {
        Limits { inner }
    }
}

/// Enforces the client key's rpm (429 with `Retry-After`).
#[derive(Clone)]
pub(crate) struct Limits<S> {
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
            .and_then(|k| {
                // Demand for the fleet's share assignment: asked, admitted
                // or not.
                k.demand.record(0.0);
                k.limiter.try_acquire(1.0, Instant::now()).err()
            })
            // A share of 0 (a proxy that just joined, until the control
            // plane made room for it: seconds, at most about a minute) is
            // no reason to wait a day, and a retry may reach another proxy.
            .map(|wait| {
                if wait == Duration::MAX {
                    ZERO_SHARE_RETRY
                } else {
                    wait
                }
            });
        let wire = crate::error::Wire::for_path(req.uri().path());
        match limited {
            Some(wait) => Either::Left(ready(Ok(ApiError::key_rate_limited(retry_after_secs(
                wait,
            ))
            .into_response_for(wire)))),
            None => Either::Right(self.inner.call(req)),
        }
    }
}
