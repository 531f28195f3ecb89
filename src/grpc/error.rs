//! The one mapping from errors to `Status`: every code and message a client
//! sees is decided here. Two things fail a call: a request that breaks the
//! contract ([`BadRequest`], a domain value) and a refusal or failure of the
//! service ([`ServiceError`]). Both convert with `?`.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{
    domain::{BadRequest, FieldViolation},
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
