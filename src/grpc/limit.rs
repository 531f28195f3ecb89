//! A bound on convo.v1 calls in progress. Past it a call is refused at once
//! with RESOURCE_EXHAUSTED, so a flood meets a fast, retryable answer instead
//! of an ever longer queue and ever more memory.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use futures_util::future::{BoxFuture, FutureExt};
use tokio::sync::Semaphore;
use tonic::{Status, server::NamedService};
use tower::{Layer, Service};

/// Wraps a service so that at most `limit` of its calls run at once.
#[derive(Debug, Clone)]
pub struct InFlightLimitLayer {
    permits: Arc<Semaphore>,
    limit: usize,
}

impl InFlightLimitLayer {
    pub fn new(limit: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(limit)),
            limit,
        }
    }
}

impl<S> Layer<S> for InFlightLimitLayer {
    type Service = InFlightLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InFlightLimit {
            inner,
            permits: self.permits.clone(),
            limit: self.limit,
        }
    }
}

#[derive(Debug, Clone)]
pub struct InFlightLimit<S> {
    inner: S,
    permits: Arc<Semaphore>,
    limit: usize,
}

impl<S: NamedService> NamedService for InFlightLimit<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for InFlightLimit<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            let status = Status::resource_exhausted(format!(
                "the server is at its limit of {} calls in progress; retry with backoff",
                self.limit
            ));
            return std::future::ready(Ok(status.into_http())).boxed();
        };
        // The permit is held until the handler has produced its response (for
        // a stream: until the stream has started).
        let call = self.inner.call(request);
        async move {
            let response = call.await;
            drop(permit);
            response
        }
        .boxed()
    }
}
