//! Domain values out, protobuf messages in the contract's shape.

use chrono::{DateTime, Utc};

use super::proto;
use crate::domain::{Conversation, Erased, Message, Metadata, SearchHit};

fn timestamp(time: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: time.timestamp(),
        nanos: time.timestamp_subsec_nanos() as i32,
    }
}

fn metadata(metadata: Metadata) -> std::collections::HashMap<String, String> {
    metadata.into_pairs().into_iter().collect()
}

impl From<Conversation> for proto::Conversation {
    fn from(c: Conversation) -> Self {
        let (forked_from_conversation_id, forked_at_sequence) = match c.forked_from {
            Some((source, sequence)) => (source.to_string(), sequence),
            None => (String::new(), 0),
        };
        Self {
            id: c.id.to_string(),
            user_id: c.user_id.as_str().to_owned(),
            title: c.title,
            metadata: metadata(c.metadata),
            create_time: Some(timestamp(c.create_time)),
            update_time: Some(timestamp(c.update_time)),
            message_count: c.message_count,
            forked_from_conversation_id,
            forked_at_sequence,
        }
    }
}

impl From<Message> for proto::Message {
    fn from(m: Message) -> Self {
        Self {
            id: m.id.to_string(),
            conversation_id: m.conversation_id.to_string(),
            sequence: m.sequence,
            role: m.role.number(),
            content: m.content,
            metadata: metadata(m.metadata),
            create_time: Some(timestamp(m.create_time)),
        }
    }
}

pub(super) fn messages(messages: Vec<Message>) -> Vec<proto::Message> {
    messages.into_iter().map(Into::into).collect()
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
