//! Domain values out, protobuf messages in the contract's shape.

use chrono::{DateTime, Utc};

use super::proto;
use crate::domain::{
    Blob, BlobSource, Conversation, ConversationId, Erased, Message, Part, PartKind, SearchHit,
    Usage,
};

fn timestamp(time: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: time.timestamp(),
        nanos: time.timestamp_subsec_nanos() as i32,
    }
}

impl From<Conversation> for proto::Conversation {
    fn from(c: Conversation) -> Self {
        let (forked_from_conversation_id, forked_at_sequence) = match c.forked_from {
            Some((source, sequence)) => (source.to_text(), sequence),
            None => (String::new(), 0),
        };
        Self {
            id: c.id.to_text(),
            user_id: c.user_id.into_string(),
            title: c.title,
            metadata: c.metadata.into_pairs(),
            create_time: Some(timestamp(c.create_time)),
            update_time: Some(timestamp(c.update_time)),
            message_count: c.message_count,
            forked_from_conversation_id,
            forked_at_sequence,
            usage: Some(c.usage.into()),
        }
    }
}

impl From<Usage> for proto::Usage {
    fn from(u: Usage) -> Self {
        Self {
            input_tokens: u.input_tokens,
            output_tokens: u.output_tokens,
            cached_input_tokens: u.cached_input_tokens,
            reasoning_tokens: u.reasoning_tokens,
        }
    }
}

impl From<Blob> for proto::Blob {
    fn from(blob: Blob) -> Self {
        let (uri, data) = match blob.source {
            BlobSource::Uri(uri) => (uri, Vec::new()),
            BlobSource::Data(data) => (String::new(), data),
        };
        Self {
            mime_type: blob.mime_type,
            uri,
            data,
            name: blob.name.into_string(),
        }
    }
}

impl From<Part> for proto::Part {
    fn from(part: Part) -> Self {
        use proto::part::Kind;
        let kind = match part.kind {
            PartKind::Text(text) => Kind::Text(text),
            PartKind::ToolCall(call) => Kind::ToolCall(proto::ToolCall {
                id: call.id.as_str().to_owned(),
                name: call.name.into_string(),
                arguments: call.arguments,
            }),
            PartKind::ToolResult(result) => Kind::ToolResult(proto::ToolResult {
                tool_call_id: result.tool_call_id.as_str().to_owned(),
                content: result.content,
                is_error: result.is_error,
                attachments: result.attachments.into_iter().map(Into::into).collect(),
            }),
            PartKind::Blob(blob) => Kind::Blob(blob.into()),
            PartKind::Reasoning(text) => Kind::Reasoning(proto::Reasoning { text }),
        };
        Self {
            kind: Some(kind),
            signature: part.signature,
        }
    }
}

impl From<Message> for proto::Message {
    fn from(m: Message) -> Self {
        let conversation_id = m.conversation_id.to_text();
        message(m, conversation_id)
    }
}

/// `m` with its conversation's id already written out.
fn message(m: Message, conversation_id: String) -> proto::Message {
    proto::Message {
        id: m.id.to_text(),
        conversation_id,
        sequence: m.sequence,
        role: m.role.number(),
        content: m.content,
        metadata: m.metadata.into_pairs(),
        create_time: Some(timestamp(m.create_time)),
        parts: m.parts.into_iter().map(Into::into).collect(),
        name: m.name.into_string(),
        model: m.model.into_string(),
        usage: m.usage.map(Into::into),
    }
}

/// The messages of one response, which share a conversation: its id is
/// written out once and copied, not formatted again for every message.
pub(super) fn messages(messages: Vec<Message>) -> Vec<proto::Message> {
    let mut written: Option<(ConversationId, String)> = None;
    messages
        .into_iter()
        .map(|m| {
            let conversation_id = match &written {
                Some((id, text)) if *id == m.conversation_id => text.clone(),
                _ => {
                    let text = m.conversation_id.to_text();
                    written = Some((m.conversation_id, text.clone()));
                    text
                }
            };
            message(m, conversation_id)
        })
        .collect()
}

impl From<SearchHit> for proto::SearchHit {
    fn from(hit: SearchHit) -> Self {
        Self {
            message: Some(hit.message.into()),
            conversation_title: hit.conversation_title,
            snippet: hit.snippet,
            rank: f64::from(hit.rank),
        }
    }
}

impl From<Erased> for proto::DeleteUserDataResponse {
    fn from(erased: Erased) -> Self {
        Self {
            conversations_deleted: erased.conversations,
            messages_deleted: erased.messages,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The id written once is reused only for messages of the same conversation.
    #[test]
    fn each_message_keeps_its_own_conversation_id() {
        let (a, b) = (ConversationId::generate(), ConversationId::generate());
        let stored = [(a, 1), (a, 2), (b, 1), (a, 3)].map(|(id, n)| Message::example(id, n));
        let converted = messages(stored.into());
        let ids: Vec<&str> = converted
            .iter()
            .map(|m| m.conversation_id.as_str())
            .collect();
        let (a, b) = (a.to_text(), b.to_text());
        assert_eq!(ids, [&a, &a, &b, &a]);
    }
}
