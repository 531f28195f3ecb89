//! Requests in, domain commands out: the one place where wire values are
//! checked against the contract. Every violation of a request is collected, so
//! a client learns all that is wrong with it at once.

use super::{page_token::PageTokenCodec, proto};
use crate::domain::{
    AppendMessages, BadRequest, Blob, Body, Content, ConversationChanges, ConversationId,
    FieldViolation, ForkConversation, Limits, ListConversations, ListMessages, MessageOrder,
    Metadata, Name, NewConversation, NewMessage, PageSize, Part, PartKind, Parts, RequestId,
    ResumeConversation, Role, SearchMessages, SearchQuery, Sequence, Title, ToolCall, ToolCallId,
    ToolResult, TruncateConversation, Usage, UserId, Violations, WatchConversation,
    parse_projected_text, parse_signature,
};

/// What parsing needs besides the request: the limits in force and the key
/// that page tokens are sealed with.
#[derive(Debug, Clone)]
pub(super) struct Parser {
    pub limits: Limits,
    pub tokens: PageTokenCodec,
}

type Parsed<T> = Result<T, BadRequest>;

pub(super) fn conversation_id(value: &str) -> Parsed<ConversationId> {
    Ok(ConversationId::parse("conversation_id", value)?)
}

impl Parser {
    pub fn create_conversation(
        &self,
        request: proto::CreateConversationRequest,
    ) -> Parsed<NewConversation> {
        let mut v = Violations::new();
        let title = v.check(Title::parse("title", request.title, &self.limits));
        let metadata = v.check(Metadata::parse("metadata", request.metadata, &self.limits));
        let request_id = v.check(RequestId::parse_optional("request_id", &request.request_id));
        v.finish(|| {
            Some(NewConversation {
                title: title?,
                metadata: metadata?,
                request_id: request_id?,
            })
        })
    }

    pub fn list_conversations(
        &self,
        owner: &UserId,
        request: &proto::ListConversationsRequest,
    ) -> Parsed<ListConversations> {
        let mut v = Violations::new();
        let size = v.check(PageSize::parse(
            "page_size",
            request.page_size,
            &self.limits,
        ));
        let cursor = v.check(match request.page_token.as_str() {
            "" => Ok(None),
            token => self
                .tokens
                .decode_conversations("page_token", owner, token)
                .map(Some),
        });
        v.finish(|| {
            Some(ListConversations {
                size: size?,
                cursor: cursor?,
            })
        })
    }

    pub fn update_conversation(
        &self,
        request: proto::UpdateConversationRequest,
    ) -> Parsed<(ConversationId, ConversationChanges)> {
        let mut v = Violations::new();
        let id = v.check(ConversationId::parse(
            "conversation_id",
            &request.conversation_id,
        ));
        let (mut wants_title, mut wants_metadata) = (false, false);
        match &request.update_mask {
            None => v.push(FieldViolation::new(
                "update_mask",
                "update_mask is required: name the fields to change, `title` and/or `metadata`",
            )),
            Some(mask) if mask.paths.is_empty() => v.push(FieldViolation::new(
                "update_mask",
                "update_mask names no field: use `title` and/or `metadata`",
            )),
            Some(mask) => {
                for path in &mask.paths {
                    match path.as_str() {
                        "title" => wants_title = true,
                        "metadata" => wants_metadata = true,
                        other => v.push(FieldViolation::new(
                            "update_mask",
                            format!("unknown field {other:?} in update_mask: only `title` and `metadata` can be updated"),
                        )),
                    }
                }
            }
        }
        let title = if wants_title {
            v.check(Title::parse("title", request.title, &self.limits))
                .map(Some)
        } else {
            Some(None)
        };
        let metadata = if wants_metadata {
            v.check(Metadata::parse("metadata", request.metadata, &self.limits))
                .map(Some)
        } else {
            Some(None)
        };
        v.finish(|| {
            Some((
                id?,
                ConversationChanges {
                    title: title?,
                    metadata: metadata?,
                },
            ))
        })
    }

    pub fn append_message(&self, request: proto::AppendMessageRequest) -> Parsed<AppendMessages> {
        let mut v = Violations::new();
        let conversation_id = v.check(ConversationId::parse(
            "conversation_id",
            &request.conversation_id,
        ));
        let message = self.new_message(
            &mut v,
            "",
            proto::NewMessage {
                role: request.role,
                content: request.content,
                metadata: request.metadata,
                parts: request.parts,
                name: request.name,
                model: request.model,
                usage: request.usage,
            },
        );
        let request_id = v.check(RequestId::parse_optional("request_id", &request.request_id));
        let expected = v.check(expected_last_sequence(request.expected_last_sequence));
        v.finish(|| {
            Some(AppendMessages {
                conversation_id: conversation_id?,
                messages: vec![message?],
                request_id: request_id?,
                expected_last_sequence: expected?,
            })
        })
    }

    pub fn append_messages(&self, request: proto::AppendMessagesRequest) -> Parsed<AppendMessages> {
        let mut v = Violations::new();
        let conversation_id = v.check(ConversationId::parse(
            "conversation_id",
            &request.conversation_id,
        ));
        let count = request.messages.len();
        if count == 0 || count > self.limits.max_batch_messages {
            v.push(FieldViolation::new(
                "messages",
                format!(
                    "append 1-{} messages per call; this request has {count}",
                    self.limits.max_batch_messages
                ),
            ));
        }
        let messages: Vec<Option<NewMessage>> = request
            .messages
            .into_iter()
            .take(self.limits.max_batch_messages)
            .enumerate()
            .map(|(i, m)| self.new_message(&mut v, &format!("messages[{i}]."), m))
            .collect();
        distinct_tool_call_ids(&mut v, &messages);
        let request_id = v.check(RequestId::parse_optional("request_id", &request.request_id));
        let expected = v.check(expected_last_sequence(request.expected_last_sequence));
        v.finish(|| {
            Some(AppendMessages {
                conversation_id: conversation_id?,
                messages: messages.into_iter().collect::<Option<_>>()?,
                request_id: request_id?,
                expected_last_sequence: expected?,
            })
        })
    }

    /// One message of an append; `prefix` is how its fields are named
    /// (`messages[2].`, or nothing for AppendMessage).
    fn new_message(
        &self,
        v: &mut Violations,
        prefix: &str,
        message: proto::NewMessage,
    ) -> Option<NewMessage> {
        let limits = &self.limits;
        let role = v.check(Role::parse(&format!("{prefix}role"), message.role));
        let body = match (message.content.is_empty(), message.parts.is_empty()) {
            (false, false) => {
                v.push(FieldViolation::new(
                    format!("{prefix}parts"),
                    "set content or parts, not both",
                ));
                None
            }
            (_, true) => v
                .check(Content::parse(
                    &format!("{prefix}content"),
                    message.content,
                    limits,
                ))
                .map(Body::Content),
            (true, false) => {
                let field = format!("{prefix}parts");
                let count = message.parts.len();
                if count > limits.max_parts {
                    // Reported with the real count; only the parts within the
                    // limit are read further.
                    v.push(FieldViolation::new(
                        &field,
                        format!(
                            "a message has at most {} parts; this one has {count}",
                            limits.max_parts
                        ),
                    ));
                }
                let parts: Vec<Option<Part>> = message
                    .parts
                    .into_iter()
                    .take(limits.max_parts)
                    .enumerate()
                    .map(|(i, part)| self.part(v, &format!("{field}[{i}]"), part))
                    .collect();
                let parts = parts.into_iter().collect::<Option<Vec<_>>>();
                match parts {
                    Some(parts) if count <= limits.max_parts => {
                        Parts::parse(v, &field, role, parts, limits).map(Body::Parts)
                    }
                    _ => None,
                }
            }
        };
        let metadata = v.check(Metadata::parse(
            &format!("{prefix}metadata"),
            message.metadata,
            limits,
        ));
        let name = v.check(Name::parse(&format!("{prefix}name"), message.name, limits));
        let model = v.check(Name::parse(
            &format!("{prefix}model"),
            message.model,
            limits,
        ));
        let usage = match message.usage {
            None => Some(None),
            Some(u) => Usage::parse(
                v,
                &format!("{prefix}usage"),
                u.input_tokens,
                u.output_tokens,
                u.cached_input_tokens,
                u.reasoning_tokens,
            )
            .map(Some),
        };
        Some(NewMessage {
            role: role?,
            body: body?,
            metadata: metadata?,
            name: name?,
            model: model?,
            usage: usage?,
        })
    }

    /// One part; `field` names it (`messages[2].parts[1]`).
    fn part(&self, v: &mut Violations, field: &str, part: proto::Part) -> Option<Part> {
        use proto::part::Kind;
        let limits = &self.limits;
        let signature = v.check(parse_signature(
            &format!("{field}.signature"),
            part.signature,
            limits,
        ));
        let kind = match part.kind {
            None => {
                v.push(FieldViolation::new(
                    field,
                    "a part holds one of text, tool_call, tool_result, blob or reasoning",
                ));
                None
            }
            Some(Kind::Text(text)) => v
                .check(parse_projected_text(&format!("{field}.text"), text))
                .map(PartKind::Text),
            Some(Kind::ToolCall(call)) => {
                let at = format!("{field}.tool_call");
                let id = v.check(ToolCallId::parse(&format!("{at}.id"), call.id, limits));
                let name = v.check(Name::parse_required(
                    &format!("{at}.name"),
                    call.name,
                    limits,
                ));
                Some(PartKind::ToolCall(ToolCall {
                    id: id?,
                    name: name?,
                    arguments: call.arguments,
                }))
            }
            Some(Kind::ToolResult(result)) => {
                let at = format!("{field}.tool_result");
                let tool_call_id = v.check(ToolCallId::parse(
                    &format!("{at}.tool_call_id"),
                    result.tool_call_id,
                    limits,
                ));
                let content = v.check(parse_projected_text(
                    &format!("{at}.content"),
                    result.content,
                ));
                let attachments: Vec<Option<Blob>> = result
                    .attachments
                    .into_iter()
                    .enumerate()
                    .map(|(i, blob)| self.blob(v, &format!("{at}.attachments[{i}]"), blob))
                    .collect();
                Some(PartKind::ToolResult(ToolResult {
                    tool_call_id: tool_call_id?,
                    content: content?,
                    is_error: result.is_error,
                    attachments: attachments.into_iter().collect::<Option<_>>()?,
                }))
            }
            Some(Kind::Blob(blob)) => self
                .blob(v, &format!("{field}.blob"), blob)
                .map(PartKind::Blob),
            Some(Kind::Reasoning(reasoning)) => Some(PartKind::Reasoning(reasoning.text)),
        };
        Some(Part {
            kind: kind?,
            signature: signature?,
        })
    }

    fn blob(&self, v: &mut Violations, field: &str, blob: proto::Blob) -> Option<Blob> {
        Blob::parse(
            v,
            field,
            blob.mime_type,
            blob.uri,
            blob.data,
            blob.name,
            &self.limits,
        )
    }

    pub fn list_messages(
        &self,
        owner: &UserId,
        request: &proto::ListMessagesRequest,
    ) -> Parsed<ListMessages> {
        let mut v = Violations::new();
        let conversation_id = v.check(ConversationId::parse(
            "conversation_id",
            &request.conversation_id,
        ));
        let size = v.check(PageSize::parse(
            "page_size",
            request.page_size,
            &self.limits,
        ));
        let after_sequence = v.check(Sequence::parse(
            "after_sequence",
            request.after_sequence,
            "lists from the first message",
        ));
        let order = if request.newest_first {
            MessageOrder::NewestFirst
        } else {
            MessageOrder::OldestFirst
        };
        let cursor = match (request.page_token.as_str(), conversation_id) {
            ("", _) => Some(None),
            (token, Some(id)) => v
                .check(
                    self.tokens
                        .decode_messages("page_token", owner, token, id, order),
                )
                .map(Some),
            // Without a valid conversation id the token cannot be checked; that
            // id's own violation is already reported.
            (_, None) => None,
        };
        v.finish(|| {
            Some(ListMessages {
                conversation_id: conversation_id?,
                size: size?,
                after_sequence: after_sequence?,
                order,
                cursor: cursor?,
            })
        })
    }

    pub fn resume_conversation(
        &self,
        request: &proto::ResumeConversationRequest,
    ) -> Parsed<ResumeConversation> {
        let mut v = Violations::new();
        let id = v.check(ConversationId::parse(
            "conversation_id",
            &request.conversation_id,
        ));
        let max = v.check(PageSize::parse(
            "max_messages",
            request.max_messages,
            &self.limits,
        ));
        v.finish(|| {
            Some(ResumeConversation {
                conversation_id: id?,
                max_messages: max?,
            })
        })
    }
}

impl Parser {
    pub fn watch_conversation(
        &self,
        request: &proto::WatchConversationRequest,
    ) -> Parsed<WatchConversation> {
        let mut v = Violations::new();
        let id = v.check(ConversationId::parse(
            "conversation_id",
            &request.conversation_id,
        ));
        let after_sequence = v.check(Sequence::parse(
            "after_sequence",
            request.after_sequence,
            "streams from the first message",
        ));
        v.finish(|| {
            Some(WatchConversation {
                conversation_id: id?,
                after_sequence: after_sequence?,
            })
        })
    }

    pub fn fork_conversation(
        &self,
        request: proto::ForkConversationRequest,
    ) -> Parsed<ForkConversation> {
        let mut v = Violations::new();
        let source = v.check(ConversationId::parse(
            "conversation_id",
            &request.conversation_id,
        ));
        let up_to_sequence = v
            .check(Sequence::parse(
                "up_to_sequence",
                request.up_to_sequence,
                "copies every message",
            ))
            .map(|n| (!n.is_start()).then_some(n));
        let title = match request.title.as_str() {
            "" => Some(None),
            _ => v
                .check(Title::parse("title", request.title, &self.limits))
                .map(Some),
        };
        v.finish(|| {
            Some(ForkConversation {
                source: source?,
                up_to_sequence: up_to_sequence?,
                title: title?,
            })
        })
    }

    pub fn truncate_conversation(
        &self,
        request: &proto::TruncateConversationRequest,
    ) -> Parsed<TruncateConversation> {
        let mut v = Violations::new();
        let id = v.check(ConversationId::parse(
            "conversation_id",
            &request.conversation_id,
        ));
        let after = v.check(Sequence::parse(
            "after_sequence",
            request.after_sequence,
            "removes every message",
        ));
        let expected = v.check(expected_last_sequence(request.expected_last_sequence));
        v.finish(|| {
            Some(TruncateConversation {
                conversation_id: id?,
                after_sequence: after?,
                expected_last_sequence: expected?,
            })
        })
    }

    pub fn search_messages(
        &self,
        owner: &UserId,
        request: proto::SearchMessagesRequest,
    ) -> Parsed<SearchMessages> {
        let mut v = Violations::new();
        let query = v.check(SearchQuery::parse("query", request.query));
        let conversation_id = match request.conversation_id.as_str() {
            "" => Some(None),
            id => v
                .check(ConversationId::parse("conversation_id", id))
                .map(Some),
        };
        let size = v.check(PageSize::parse(
            "page_size",
            request.page_size,
            &self.limits,
        ));
        let cursor = match (request.page_token.as_str(), &query, conversation_id) {
            ("", _, _) => Some(None),
            (token, Some(query), Some(conversation)) => v
                .check(self.tokens.decode_search(
                    "page_token",
                    owner,
                    token,
                    query.as_str(),
                    conversation,
                ))
                .map(Some),
            // The token cannot be checked against a query or conversation
            // that is itself invalid; that violation is already reported.
            _ => None,
        };
        v.finish(|| {
            Some(SearchMessages {
                query: query?,
                conversation_id: conversation_id?,
                size: size?,
                cursor: cursor?,
            })
        })
    }
}

/// Tool call ids are unique per conversation, so a batch may not repeat one
/// across its messages either (within one message, [`Parts::parse`] checks).
fn distinct_tool_call_ids(v: &mut Violations, messages: &[Option<NewMessage>]) {
    let mut seen = std::collections::HashSet::new();
    for (i, message) in messages.iter().enumerate() {
        let Some(parts) = message.as_ref().and_then(NewMessage::parts) else {
            continue;
        };
        for (j, part) in parts.as_slice().iter().enumerate() {
            if let PartKind::ToolCall(call) = &part.kind
                && !seen.insert(call.id.as_str().to_owned())
            {
                v.push(FieldViolation::new(
                    format!("messages[{i}].parts[{j}].tool_call.id"),
                    format!(
                        "tool call id {} appears earlier in this batch; ids are unique per conversation",
                        call.id
                    ),
                ));
            }
        }
    }
}

fn expected_last_sequence(value: Option<i64>) -> Result<Option<Sequence>, FieldViolation> {
    value
        .map(|n| {
            Sequence::parse(
                "expected_last_sequence",
                n,
                "means the conversation is empty",
            )
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use prost_types::FieldMask;

    use super::*;

    fn parser() -> Parser {
        Parser {
            limits: Limits::CONTRACT,
            tokens: PageTokenCodec::new(b"secret"),
        }
    }

    proptest! {
        #[test]
        fn field_masks_name_only_title_and_metadata(
            paths in proptest::collection::vec("title|metadata|\\PC{0,12}", 0..4),
            has_mask in any::<bool>(),
        ) {
            let request = proto::UpdateConversationRequest {
                conversation_id: ConversationId::generate().to_string(),
                title: "t".into(),
                metadata: Default::default(),
                update_mask: has_mask.then(|| FieldMask { paths: paths.clone() }),
            };
            let valid = has_mask
                && !paths.is_empty()
                && paths.iter().all(|p| p == "title" || p == "metadata");
            match parser().update_conversation(request) {
                Ok((_, changes)) => {
                    prop_assert!(valid);
                    prop_assert_eq!(changes.title.is_some(), paths.iter().any(|p| p == "title"));
                    prop_assert_eq!(changes.metadata.is_some(), paths.iter().any(|p| p == "metadata"));
                }
                Err(bad) => {
                    prop_assert!(!valid);
                    prop_assert!(bad.violations().iter().all(|v| v.field == "update_mask"));
                }
            }
        }

        #[test]
        fn batches_report_each_bad_message_by_its_index(
            messages in proptest::collection::vec((0i32..7, "\\PC{0,8}"), 0..120),
        ) {
            let request = proto::AppendMessagesRequest {
                conversation_id: ConversationId::generate().to_string(),
                messages: messages
                    .iter()
                    .map(|(role, content)| proto::NewMessage { role: *role, content: content.clone(), ..Default::default() })
                    .collect(),
                request_id: String::new(),
                expected_last_sequence: None,
            };
            match parser().append_messages(request) {
                Ok(append) => {
                    prop_assert!((1..=100).contains(&messages.len()));
                    prop_assert_eq!(append.messages.len(), messages.len());
                }
                Err(bad) => {
                    let violations = bad.violations();
                    for v in violations {
                        prop_assert!(v.field == "messages" || v.field.starts_with("messages["), "{}", v.field);
                    }
                    let bad = messages.iter().take(100).position(|(role, content)| !(1..=5).contains(role) || content.is_empty() || content.contains('\0'));
                    if let Some(i) = bad {
                        let prefix = format!("messages[{i}].");
                        prop_assert!(violations.iter().any(|v| v.field.starts_with(&prefix)));
                    }
                }
            }
        }
    }
}
