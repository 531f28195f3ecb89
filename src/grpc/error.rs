//! The one mapping from errors to `Status`: every code and message a client
//! sees is decided here. Two things fail a call: a request that breaks the
//! contract ([`BadRequest`], a domain value) and a refusal or failure of the
//! service ([`ServiceError`]). Both convert with `?`.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, PreconditionViolation, StatusExt};

use crate::{
    domain::{BadRequest, FieldViolation, ToolCallId},
    service::{ServiceError, WatchCap},
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
                 {current}; nothing was changed: re-read the conversation and retry"
            )),
            ServiceError::ForkBeyondEnd { requested, length } => {
                invalid_argument(&[FieldViolation::new(
                    "up_to_sequence",
                    format!(
                        "up_to_sequence is {requested} but the conversation has {}; \
                         use 0 to copy them all",
                        messages(length)
                    ),
                )])
            }
            ServiceError::TruncateBeyondEnd { requested, length } => {
                invalid_argument(&[FieldViolation::new(
                    "after_sequence",
                    format!(
                        "after_sequence is {requested} but the conversation has {}; \
                         nothing was removed",
                        messages(length)
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
            ServiceError::TooManyWatches(WatchCap::PerUser(limit)) => {
                Status::resource_exhausted(format!(
                    "this user already has {limit} watch streams open, the most allowed; \
                     close one (or watch fewer conversations) and retry"
                ))
            }
            ServiceError::TooManyWatches(WatchCap::Server(limit)) => {
                Status::resource_exhausted(format!(
                    "this server already serves {limit} watch streams, the most it allows; \
                     retry with backoff, or through another replica"
                ))
            }
            ServiceError::SearchMatchesEverything => invalid_argument(&[FieldViolation::new(
                "query",
                "the query only excludes words (-word), so it would match nearly every \
                 message; add at least one word to look for",
            )]),
            ServiceError::SearchOverBudget(budget) => Status::resource_exhausted(format!(
                "the search matched too many messages to rank within {}; add words to \
                 the query or set conversation_id to narrow it",
                humantime::format_duration(budget)
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

/// What replaces a refusal tonic made before any handler ran, when the
/// contract says otherwise; `None` leaves it alone. convo itself never
/// answers OUT_OF_RANGE, and its own INTERNAL only ever says "internal
/// error", so neither can be confused with one of these.
pub(super) fn transport_refusal(refused: Status) -> Option<Status> {
    match refused.code() {
        // A request over --max-request-bytes: tonic says OUT_OF_RANGE; gRPC's
        // status table says RESOURCE_EXHAUSTED. Its message gives both sizes.
        Code::OutOfRange => Some(Status::resource_exhausted(format!(
            "the request is larger than this server accepts ({}): split the batch, \
             or send large content by uri",
            refused.message().trim_start_matches("Error, ")
        ))),
        // A body that is not a valid message (invalid UTF-8 in a string):
        // tonic says INTERNAL; it is the client's mistake.
        Code::Internal if refused.message().starts_with(UNDECODABLE) => {
            Some(invalid_argument(&[undecodable_field(refused.message())]))
        }
        _ => None,
    }
}

/// How tonic (prost) begins the message of a request it cannot decode, e.g.
/// "failed to decode Protobuf message: GetConversationRequest.conversation_id:
/// invalid string value: data is not UTF-8 encoded".
const UNDECODABLE: &str = "failed to decode Protobuf message";

/// The field prost names in its decode error, and what it says of it.
fn undecodable_field(message: &str) -> FieldViolation {
    let detail = message
        .strip_prefix(UNDECODABLE)
        .unwrap_or(message)
        .trim_start_matches(": ");
    let (path, why) = detail.split_once(": ").unwrap_or(("", detail));
    let field = path.split_once('.').map_or("request", |(_, field)| field);
    let field = if field.is_empty() { "request" } else { field };
    // The hint fits the cause: a string that is not UTF-8, or a body that is
    // not this RPC's request message at all (a wrong type or a torn frame).
    let hint = if why.contains("UTF-8") {
        "strings must be valid UTF-8"
    } else {
        "send this RPC's request message, encoded as protobuf"
    };
    FieldViolation::new(field, format!("{field} cannot be decoded ({why}): {hint}"))
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

/// "1 message", "4 messages": a count as a person would write it.
fn messages(count: i64) -> String {
    if count == 1 {
        "1 message".to_owned()
    } else {
        format!("{count} messages")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tonics_refusals_become_the_contracts() {
        let big = transport_refusal(Status::out_of_range(
            "Error, decoded message length too large: found 3145800 bytes, the limit is: 2097152 bytes",
        ))
        .unwrap();
        assert_eq!(big.code(), Code::ResourceExhausted);
        assert!(
            big.message().contains("found 3145800 bytes"),
            "{}",
            big.message()
        );
        let garbled = transport_refusal(Status::internal(
            "failed to decode Protobuf message: GetConversationRequest.conversation_id: \
             invalid string value: data is not UTF-8 encoded",
        ))
        .unwrap();
        assert_eq!(garbled.code(), Code::InvalidArgument);
        let details = garbled.get_details_bad_request().unwrap();
        assert_eq!(details.field_violations[0].field, "conversation_id");
        assert!(
            garbled.message().contains("valid UTF-8"),
            "{}",
            garbled.message()
        );
        let torn = transport_refusal(Status::internal(
            "failed to decode Protobuf message: invalid varint",
        ))
        .unwrap();
        assert_eq!(torn.code(), Code::InvalidArgument);
        assert_eq!(
            torn.message(),
            "request: request cannot be decoded (invalid varint): send this RPC's request \
             message, encoded as protobuf"
        );
        assert!(transport_refusal(Status::internal("internal error")).is_none());
        assert!(transport_refusal(Status::not_found("conversation not found")).is_none());
    }

    #[test]
    fn a_count_of_messages_reads_as_written() {
        let one = Status::from(ServiceError::TruncateBeyondEnd {
            requested: 7,
            length: 1,
        });
        assert_eq!(
            one.message(),
            "after_sequence: after_sequence is 7 but the conversation has 1 message; \
             nothing was removed"
        );
        let four = Status::from(ServiceError::ForkBeyondEnd {
            requested: 9,
            length: 4,
        });
        assert!(
            four.message()
                .contains("the conversation has 4 messages; use 0"),
            "{}",
            four.message()
        );
    }
}
