//! The one mapping from errors to `Status`: every code and message a client
//! sees is decided here. Two things fail a call: a request that breaks the
//! contract ([`BadRequest`], a domain value) and a refusal or failure of the
//! service ([`ServiceError`]). Both convert with `?`.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, PreconditionViolation, StatusExt};

use crate::{
    domain::{BadRequest, FieldViolation, ToolCallId},
    service::ServiceError,
};

impl From<BadRequest> for Status {
    fn from(bad: BadRequest) -> Self {
        invalid_argument(bad.violations())
    }
}

impl From<ServiceError> for Status {
    fn from(error: ServiceError) -> Self {
        match error {
            ServiceError::ConversationNotFound => {
                // The same words whether the conversation is missing or foreign.
                Status::not_found("conversation not found")
            }
            ServiceError::RequestIdReused => Status::failed_precondition(
                "request_id was already used on this conversation with a different payload; \
                 use a new request_id for a new message",
            ),
            ServiceError::SequenceMismatch { expected, current } => Status::aborted(format!(
                "expected_last_sequence is {expected} but the conversation's last sequence is \
                 {current}; nothing was written: re-read the conversation and retry"
            )),
            ServiceError::ForkBeyondEnd { requested, length } => {
                invalid_argument(&[FieldViolation::new(
                    "up_to_sequence",
                    format!(
                        "up_to_sequence is {requested} but the conversation has {length} \
                         messages; use 0 to copy them all"
                    ),
                )])
            }
            ServiceError::TruncateBeyondEnd { requested, length } => {
                invalid_argument(&[FieldViolation::new(
                    "after_sequence",
                    format!(
                        "after_sequence is {requested} but the conversation has {length} \
                         messages; nothing was removed"
                    ),
                )])
            }
            ServiceError::UnansweredToolResult(id) => tool_exchange_refused(
                "TOOL_CALL_NOT_FOUND",
                &id,
                format!(
                    "tool_result answers tool call {id}, but no earlier message of this \
                     conversation (or of this batch) makes that call; nothing was written"
                ),
            ),
            ServiceError::ToolCallIdTaken(id) => tool_exchange_refused(
                "TOOL_CALL_ID_IN_USE",
                &id,
                format!(
                    "tool call id {id} is already used in this conversation; tool call ids \
                     are unique per conversation; nothing was written"
                ),
            ),
            ServiceError::WatchTruncated { position } => Status::aborted(format!(
                "the conversation was truncated below sequence {position}, which this stream \
                 had reached; re-read the conversation and watch again from its end"
            )),
            ServiceError::ShuttingDown => Status::unavailable(
                "the server is shutting down; reconnect and resume from the last sequence received",
            ),
            ServiceError::Unavailable(source) => {
                tracing::warn!(error = %source, "storage unavailable");
                Status::unavailable("storage is temporarily unavailable; retry with backoff")
            }
            ServiceError::Internal(source) => {
                tracing::error!(error = %source, "internal error");
                Status::internal("internal error")
            }
        }
    }
}

/// FAILED_PRECONDITION with a `google.rpc.PreconditionFailure` naming the
/// tool call id, so a client can tell which exchange does not hold together.
fn tool_exchange_refused(kind: &str, id: &ToolCallId, message: String) -> Status {
    let details = ErrorDetails::with_precondition_failure(vec![PreconditionViolation::new(
        kind,
        id.as_str(),
        message.clone(),
    )]);
    Status::with_error_details(Code::FailedPrecondition, message, details)
}

fn invalid_argument(violations: &[FieldViolation]) -> Status {
    let message = match violations {
        [] => "invalid request".to_owned(),
        [only] => only.to_string(),
        [first, rest @ ..] => format!("{first} (and {} more)", rest.len()),
    };
    let details = ErrorDetails::with_bad_request(
        violations
            .iter()
            .map(|v| tonic_types::FieldViolation::new(v.field.clone(), v.description.clone()))
            .collect::<Vec<_>>(),
    );
    Status::with_error_details(Code::InvalidArgument, message, details)
}
