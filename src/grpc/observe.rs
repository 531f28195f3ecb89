//! One log line and one set of metrics per convo.v1 call, and the request id
//! that ties a client's call to the server's log.
//!
//! The caller may send `x-request-id` (1-128 visible ASCII); otherwise one is
//! generated. It is returned in the response metadata and logged with `rpc`,
//! `user_id`, `conversation_id` (recorded by the handler into the call's span),
//! `code` and `duration_ms`. Message content and metadata values are never
//! logged.

use std::{
    task::{Context, Poll},
    time::Instant,
};

use futures_util::future::{BoxFuture, FutureExt};
use http::HeaderValue;
use tonic::{Code, server::NamedService};
use tower::{Layer, Service};
use tracing::{Instrument, Span, field::Empty};

use crate::domain::{RequestId, UserId};

/// The request metadata that carries the caller's request id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

#[derive(Debug, Clone, Copy)]
pub struct ObserveLayer;

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Observe { inner }
    }
}

#[derive(Debug, Clone)]
pub struct Observe<S> {
    inner: S,
}

impl<S: NamedService> NamedService for Observe<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B, R> Service<http::Request<B>> for Observe<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>> + Send + 'static,
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
        let started = Instant::now();
        let rpc = rpc_name(request.uri().path());
        // A caller's id has the shape of an idempotency key; anything else is
        // replaced, so the log never carries arbitrary header bytes.
        let request_id = request
            .headers()
            .get(REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                RequestId::parse_optional(REQUEST_ID_HEADER, v)
                    .ok()
                    .flatten()
            })
            .map_or_else(
                || uuid::Uuid::now_v7().to_string(),
                |id| id.as_str().to_owned(),
            );
        // `user_id` is recorded by the authenticator once it has resolved the
        // caller (from the header or a token); a refused caller stays empty.
        let span = tracing::info_span!(
            "call",
            rpc,
            request_id = %request_id,
            user_id = Empty,
            conversation_id = Empty,
        );
        // Entered while the inner services are called, so the authenticator
        // (an interceptor, which runs here, before the handler's future) can
        // record into it.
        let call = span
            .in_scope(|| self.inner.call(request))
            .instrument(span.clone());
        async move {
            // Until the handler answers, a dropped future means the client
            // went away (cancelled, or its deadline passed): say so.
            let mut pending = Unanswered {
                rpc,
                started,
                span: span.clone(),
            };
            let response = call.await;
            pending.answered();
            let mut response = response?;
            let code = response_code(&response);
            let duration = started.elapsed();
            if let Ok(value) = HeaderValue::from_str(&request_id) {
                response.headers_mut().insert(REQUEST_ID_HEADER, value);
            }
            let code_name = format!("{code:?}");
            record(rpc, &code_name, duration.as_secs_f64());
            let duration_ms = duration.as_secs_f64() * 1000.0;
            span.in_scope(|| match code {
                Code::Internal | Code::Unknown | Code::DataLoss => {
                    tracing::error!(code = %code_name, duration_ms, "call failed")
                }
                Code::Unavailable | Code::ResourceExhausted | Code::DeadlineExceeded => {
                    tracing::warn!(code = %code_name, duration_ms, "call failed")
                }
                _ => tracing::info!(code = %code_name, duration_ms, "call"),
            });
            Ok(response)
        }
        .boxed()
    }
}

/// A call whose handler has not answered yet. Dropped unanswered, the call
/// was abandoned by its client: it is logged and counted as `Cancelled`, with
/// how long it had run, so a server stuck on its database leaves a trace.
struct Unanswered {
    rpc: &'static str,
    started: Instant,
    span: Span,
}

impl Unanswered {
    fn answered(&mut self) {
        self.rpc = "";
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if self.rpc.is_empty() {
            return;
        }
        let duration = self.started.elapsed();
        record(self.rpc, "Cancelled", duration.as_secs_f64());
        let duration_ms = duration.as_secs_f64() * 1000.0;
        self.span.in_scope(|| {
            tracing::warn!(
                code = "Cancelled",
                duration_ms,
                "call cancelled by the client before it was answered"
            )
        });
    }
}

/// Records the conversation a call is about into its log line.
pub fn record_conversation(id: impl std::fmt::Display) {
    Span::current().record("conversation_id", tracing::field::display(id));
}

/// Records the resolved caller into the call's log line.
pub fn record_user(user: &UserId) {
    Span::current().record("user_id", user.as_str());
}

/// The RPC names of convo.v1.ConversationService, read once from the
/// descriptor the server was built from.
static RPC_NAMES: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(|| {
    use prost::Message as _;
    prost_types::FileDescriptorSet::decode(super::proto::FILE_DESCRIPTOR_SET)
        .map(|set| {
            set.file
                .iter()
                .flat_map(|file| &file.service)
                .flat_map(|service| service.method.iter().map(|m| m.name().to_owned()))
                .collect()
        })
        .unwrap_or_default()
});

/// `/convo.v1.ConversationService/AppendMessage` → `AppendMessage`. Only the
/// service's own names come back, so metric labels stay a bounded set
/// whatever path a client sends.
fn rpc_name(path: &str) -> &'static str {
    let method = path.rsplit('/').next().unwrap_or_default();
    RPC_NAMES
        .iter()
        .find(|rpc| *rpc == method)
        .map_or("unknown", String::as_str)
}

/// A handler's error travels as `grpc-status` in the response headers
/// ("trailers-only"); a success sends its status later, in the trailers.
fn response_code<R>(response: &http::Response<R>) -> Code {
    response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(Code::Ok, Code::from_i32)
}

fn record(rpc: &'static str, code: &str, seconds: f64) {
    metrics::counter!("convo_rpc_requests_total", "rpc" => rpc, "code" => code.to_owned())
        .increment(1);
    metrics::histogram!("convo_rpc_duration_seconds", "rpc" => rpc).record(seconds);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_names_are_a_fixed_set() {
        assert_eq!(
            rpc_name("/convo.v1.ConversationService/AppendMessage"),
            "AppendMessage"
        );
        assert_eq!(rpc_name("/convo.v1.ConversationService/Nope"), "unknown");
        assert_eq!(rpc_name(""), "unknown");
    }
}
