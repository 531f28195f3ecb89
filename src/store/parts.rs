//! How a message's parts are stored: one `bytea` column holding them encoded
//! as protobuf. This is a storage format of the store's own (it shares its
//! field numbers with convo.v1's `Part`, but not its code): compact, exact for
//! bytes (signatures, inline data) and for text that is not valid JSON, and
//! decoded in one pass when read. Chosen over JSONB, which would need base64
//! for bytes and cannot hold U+0000, and over a parts table, which costs a
//! row per part on every append and a join on every read; see
//! `docs/adr/0008-structured-messages.md`.

use prost::Message as _;

use crate::domain::{
    Blob, BlobSource, Name, Part, PartKind, Parts, ToolCall, ToolCallId, ToolResult,
};

#[derive(Clone, PartialEq, prost::Message)]
struct StoredParts {
    #[prost(message, repeated, tag = "1")]
    parts: Vec<StoredPart>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StoredPart {
    #[prost(oneof = "StoredKind", tags = "1, 2, 3, 4, 5")]
    kind: Option<StoredKind>,
    #[prost(bytes = "vec", tag = "6")]
    signature: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum StoredKind {
    #[prost(string, tag = "1")]
    Text(String),
    #[prost(message, tag = "2")]
    ToolCall(StoredToolCall),
    #[prost(message, tag = "3")]
    ToolResult(StoredToolResult),
    #[prost(message, tag = "4")]
    Blob(StoredBlob),
    #[prost(string, tag = "5")]
    Reasoning(String),
}

#[derive(Clone, PartialEq, prost::Message)]
struct StoredToolCall {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(string, tag = "2")]
    name: String,
    #[prost(string, tag = "3")]
    arguments: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StoredToolResult {
    #[prost(string, tag = "1")]
    tool_call_id: String,
    #[prost(string, tag = "2")]
    content: String,
    #[prost(bool, tag = "3")]
    is_error: bool,
    #[prost(message, repeated, tag = "4")]
    attachments: Vec<StoredBlob>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StoredBlob {
    #[prost(string, tag = "1")]
    mime_type: String,
    #[prost(string, tag = "2")]
    uri: String,
    #[prost(bytes = "vec", tag = "3")]
    data: Vec<u8>,
    #[prost(string, tag = "4")]
    name: String,
}

/// The column value for a message's parts.
pub(super) fn encode(parts: &Parts) -> Vec<u8> {
    StoredParts {
        parts: parts.as_slice().iter().map(stored_part).collect(),
    }
    .encode_to_vec()
}

/// The parts of a stored message; an error names what could not be read.
pub(super) fn decode(bytes: &[u8]) -> Result<Vec<Part>, String> {
    let stored = StoredParts::decode(bytes).map_err(|e| format!("undecodable parts: {e}"))?;
    stored.parts.into_iter().map(part).collect()
}

fn stored_part(part: &Part) -> StoredPart {
    let kind = match &part.kind {
        PartKind::Text(text) => StoredKind::Text(text.clone()),
        PartKind::ToolCall(call) => StoredKind::ToolCall(StoredToolCall {
            id: call.id.as_str().to_owned(),
            name: call.name.as_str().to_owned(),
            arguments: call.arguments.clone(),
        }),
        PartKind::ToolResult(result) => StoredKind::ToolResult(StoredToolResult {
            tool_call_id: result.tool_call_id.as_str().to_owned(),
            content: result.content.clone(),
            is_error: result.is_error,
            attachments: result.attachments.iter().map(stored_blob).collect(),
        }),
        PartKind::Blob(blob) => StoredKind::Blob(stored_blob(blob)),
        PartKind::Reasoning(text) => StoredKind::Reasoning(text.clone()),
    };
    StoredPart {
        kind: Some(kind),
        signature: part.signature.clone(),
    }
}

fn stored_blob(blob: &Blob) -> StoredBlob {
    let (uri, data) = match &blob.source {
        BlobSource::Uri(uri) => (uri.clone(), Vec::new()),
        BlobSource::Data(data) => (String::new(), data.clone()),
    };
    StoredBlob {
        mime_type: blob.mime_type.clone(),
        uri,
        data,
        name: blob.name.as_str().to_owned(),
    }
}

fn part(stored: StoredPart) -> Result<Part, String> {
    let kind = match stored.kind.ok_or("a stored part has no kind")? {
        StoredKind::Text(text) => PartKind::Text(text),
        StoredKind::ToolCall(call) => PartKind::ToolCall(ToolCall {
            id: ToolCallId::from_stored(call.id),
            name: Name::from_stored(call.name),
            arguments: call.arguments,
        }),
        StoredKind::ToolResult(result) => PartKind::ToolResult(ToolResult {
            tool_call_id: ToolCallId::from_stored(result.tool_call_id),
            content: result.content,
            is_error: result.is_error,
            attachments: result.attachments.into_iter().map(blob).collect(),
        }),
        StoredKind::Blob(stored) => PartKind::Blob(blob(stored)),
        StoredKind::Reasoning(text) => PartKind::Reasoning(text),
    };
    Ok(Part {
        kind,
        signature: stored.signature,
    })
}

fn blob(stored: StoredBlob) -> Blob {
    // Exactly one of the two was set when the blob was parsed.
    let source = if stored.uri.is_empty() {
        BlobSource::Data(stored.data)
    } else {
        BlobSource::Uri(stored.uri)
    };
    Blob {
        mime_type: stored.mime_type,
        source,
        name: Name::from_stored(stored.name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_part_round_trips_byte_for_byte() {
        let call = ToolCall {
            id: ToolCallId::from_stored("call_1".into()),
            name: Name::from_stored("search".into()),
            arguments: "{\"q\": \"not json".into(),
        };
        let parts = Parts::from_stored(vec![
            Part {
                kind: PartKind::Reasoning("thinking… 🤔".into()),
                signature: (0..=255).collect(),
            },
            Part {
                kind: PartKind::ToolCall(call),
                signature: Vec::new(),
            },
            Part {
                kind: PartKind::ToolResult(ToolResult {
                    tool_call_id: ToolCallId::from_stored("call_0".into()),
                    content: "שלום\n".into(),
                    is_error: true,
                    attachments: vec![Blob {
                        mime_type: "image/png".into(),
                        source: BlobSource::Data(vec![0, 0, 1]),
                        name: Name::from_stored("a.png".into()),
                    }],
                }),
                signature: vec![0],
            },
            Part {
                kind: PartKind::Blob(Blob {
                    mime_type: "application/pdf".into(),
                    source: BlobSource::Uri("gs://bucket/doc.pdf".into()),
                    name: Name::default(),
                }),
                signature: Vec::new(),
            },
            Part {
                kind: PartKind::Text(String::new()),
                signature: Vec::new(),
            },
        ]);
        let decoded = decode(&encode(&parts)).unwrap();
        assert_eq!(decoded, parts.as_slice());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode(&[0xff, 0xff, 0xff]).is_err());
        // A part whose kind is missing.
        assert!(decode(&[0x0a, 0x00]).is_err());
    }
}
