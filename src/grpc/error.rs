use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{domain::FieldViolation, service::ServiceError, store::StoreError};

/// Everything a handler can fail with. Converted to a `Status` in exactly one
/// place, so every code and message a client sees is decided here.
#[derive(Debug)]
pub(super) enum ApiError {
    /// The request is malformed; each violation names its field.
    InvalidArgument(Vec<FieldViolation>),
    Service(ServiceError),
}

impl From<Vec<FieldViolation>> for ApiError {
    fn from(violations: Vec<FieldViolation>) -> Self {
        Self::InvalidArgument(violations)
    }
}

impl From<FieldViolation> for ApiError {
    fn from(violation: FieldViolation) -> Self {
        Self::InvalidArgument(vec![violation])
    }
}

impl From<ServiceError> for ApiError {
    fn from(error: ServiceError) -> Self {
        Self::Service(error)
    }
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Self {
        match error {
            ApiError::InvalidArgument(violations) => invalid_argument(&violations),
            ApiError::Service(error) => match error {
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
                ServiceError::ShuttingDown => Status::unavailable(
                    "the server is shutting down; reconnect and resume from the last sequence received",
                ),
                ServiceError::Unavailable(source) => {
                    let kind = match source {
                        StoreError::TimedOut(_) => "timeout",
                        _ => "unavailable",
                    };
                    metrics::counter!("convo_db_errors_total", "kind" => kind).increment(1);
                    tracing::warn!(error = %source, "storage unavailable");
                    Status::unavailable("storage is temporarily unavailable; retry with backoff")
                }
                ServiceError::Internal(source) => {
                    metrics::counter!("convo_db_errors_total", "kind" => "internal").increment(1);
                    tracing::error!(error = %source, "internal error");
                    Status::internal("internal error")
                }
            },
        }
    }
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
