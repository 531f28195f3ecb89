//! Requests in, domain commands out: the one place where wire values are
//! checked against the contract. Every violation of a request is collected, so
//! a client learns all that is wrong with it at once.

use super::{page_token::PageTokenCodec, proto};
use crate::domain::{
    AppendMessages, BadRequest, Content, ConversationChanges, ConversationId, FieldViolation,
    ForkConversation, Limits, ListConversations, ListMessages, MessageOrder, Metadata,
    NewConversation, NewMessage, PageSize, RequestId, ResumeConversation, Role, SearchMessages,
    SearchQuery, Sequence, Title, UserId, Violations, WatchConversation,
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
        let message = self.new_message(&mut v, "", request.role, request.content, request.metadata);
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
            .map(|(i, m)| {
                self.new_message(
                    &mut v,
                    &format!("messages[{i}]."),
                    m.role,
                    m.content,
                    m.metadata,
                )
            })
            .collect();
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

    fn new_message(
        &self,
        v: &mut Violations,
        prefix: &str,
        role: i32,
        content: String,
        metadata: std::collections::HashMap<String, String>,
    ) -> Option<NewMessage> {
        let role = v.check(Role::parse(&format!("{prefix}role"), role));
        let content = v.check(Content::parse(
            &format!("{prefix}content"),
            content,
            &self.limits,
        ));
        let metadata = v.check(Metadata::parse(
            &format!("{prefix}metadata"),
            metadata,
            &self.limits,
        ));
        Some(NewMessage {
            role: role?,
            content: content?,
            metadata: metadata?,
        })
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
            messages in proptest::collection::vec((0i32..6, "\\PC{0,8}"), 0..120),
        ) {
            let request = proto::AppendMessagesRequest {
                conversation_id: ConversationId::generate().to_string(),
                messages: messages
                    .iter()
                    .map(|(role, content)| proto::NewMessage { role: *role, content: content.clone(), metadata: Default::default() })
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
                    let bad = messages.iter().take(100).position(|(role, content)| !(1..=4).contains(role) || content.is_empty() || content.contains('\0'));
                    if let Some(i) = bad {
                        let prefix = format!("messages[{i}].");
                        prop_assert!(violations.iter().any(|v| v.field.starts_with(&prefix)));
                    }
                }
            }
        }
    }
}
