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
    R: http_body::Body<Data = bytes::Bytes, Error = tonic::Status> + Send + Unpin + 'static,
{
    type Response = http::Response<tonic::body::Body>;
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
            // Dropped before it is finished, the record says the client went
            // away (cancelled, or past its deadline).
            let mut outcome = CallOutcome {
                rpc,
                started,
                span,
                finished: false,
            };
            let response = call.await?;
            // A request tonic refused before any handler saw it is answered
            // as the contract says (see `grpc/error.rs`).
            let mut response =
                match header_status(&response).and_then(super::error::transport_refusal) {
                    Some(status) => status.into_http(),
                    None => response.map(tonic::body::Body::new),
                };
            if let Ok(value) = HeaderValue::from_str(&request_id) {
                response.headers_mut().insert(REQUEST_ID_HEADER, value);
            }
            match header_code(&response) {
                // A refusal travels in the headers ("trailers-only").
                Some(code) => {
                    outcome.finish(code);
                    Ok(response)
                }
                // Otherwise the status comes in the trailers, after the
                // message (or, for a watch, after the whole stream).
                None => Ok(response.map(|body| {
                    tonic::body::Body::new(ObservedBody {
                        inner: body,
                        outcome,
                    })
                })),
            }
        }
        .boxed()
    }
}

/// How one call ended, logged and counted exactly once: when its status is
/// known, or, if the client goes away first, as `Cancelled` with how long
/// it had run (so a server stuck on its database leaves a trace).
struct CallOutcome {
    rpc: &'static str,
    started: Instant,
    span: Span,
    finished: bool,
}

impl CallOutcome {
    fn finish(&mut self, code: Code) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let duration = self.started.elapsed();
        let code_name = code_name(code);
        record(self.rpc, code_name, duration.as_secs_f64());
        // Whole microseconds, so the log reads 8.647, not 8.647248999999999.
        let duration_ms = duration.as_micros() as f64 / 1000.0;
        // A client that closes its watch is how a watch normally ends.
        let routine_cancel = code == Code::Cancelled && self.rpc == "WatchConversation";
        self.span.in_scope(|| match code {
            Code::Internal | Code::Unknown | Code::DataLoss => {
                tracing::error!(code = %code_name, duration_ms, "call failed")
            }
            Code::Cancelled if !routine_cancel => tracing::warn!(
                code = %code_name,
                duration_ms,
                "call cancelled by the client before it was answered"
            ),
            Code::Unavailable | Code::ResourceExhausted | Code::DeadlineExceeded => {
                tracing::warn!(code = %code_name, duration_ms, "call failed")
            }
            _ => tracing::info!(code = %code_name, duration_ms, "call"),
        });
    }
}

impl Drop for CallOutcome {
    fn drop(&mut self) {
        self.finish(Code::Cancelled);
    }
}

/// A response body that reports the call's final status when its trailers
/// pass (or `Cancelled` when it is dropped before them).
struct ObservedBody<R> {
    inner: R,
    outcome: CallOutcome,
}

impl<R> http_body::Body for ObservedBody<R>
where
    R: http_body::Body<Data = bytes::Bytes, Error = tonic::Status> + Unpin,
{
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    let code = grpc_status(trailers).unwrap_or(Code::Ok);
                    self.outcome.finish(code);
                }
            }
            Poll::Ready(Some(Err(status))) => self.outcome.finish(status.code()),
            Poll::Ready(None) => self.outcome.finish(Code::Ok),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
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
fn header_code<R>(response: &http::Response<R>) -> Option<Code> {
    grpc_status(response.headers())
}

/// The status a trailers-only response carries in its headers.
fn header_status<R>(response: &http::Response<R>) -> Option<tonic::Status> {
    let code = header_code(response)?;
    let message = response
        .headers()
        .get("grpc-message")
        .map(|m| {
            percent_encoding::percent_decode(m.as_bytes())
                .decode_utf8_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    Some(tonic::Status::new(code, message))
}

fn grpc_status(headers: &http::HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(Code::from_i32)
}

/// A status code's name as logged and labelled (tonic's `Debug` spelling,
/// `NotFound`), without formatting one at every call.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "Ok",
        Code::Cancelled => "Cancelled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

fn record(rpc: &'static str, code: &'static str, seconds: f64) {
    metrics::counter!("convo_rpc_requests_total", "rpc" => rpc, "code" => code).increment(1);
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

    /// The names logged and labelled are the ones `Debug` gave before, so
    /// dashboards and alerts keep matching.
    #[test]
    fn code_names_are_tonics_debug_names() {
        for number in 0..=16 {
            let code = Code::from_i32(number);
            assert_eq!(code_name(code), format!("{code:?}"));
        }
    }
}
