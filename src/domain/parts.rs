//! Structured messages: a message as typed parts (text, tool calls, tool
//! results, attachments, reasoning), each with an optional opaque provider
//! signature, and the token usage of the model call that produced it.
//!
//! Every value here is built by parsing, with the field path a client sees
//! (`messages[3].parts[1].tool_call.id`); parts are kept byte for byte as
//! given, since providers refuse a tool loop whose signatures or arguments
//! were altered.

use std::collections::HashSet;

use super::{FieldViolation, Limits, Role, Violations};

/// The id a provider gave a tool call (`call_…`, `toolu_…`): 1-256 visible
/// ASCII characters. A tool result names it to answer the call.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ToolCallId(String);

impl ToolCallId {
    pub fn parse(field: &str, value: String, limits: &Limits) -> Result<Self, FieldViolation> {
        if value.is_empty()
            || value.len() > limits.max_tool_call_id_bytes
            || !value.bytes().all(|b| (0x21..=0x7e).contains(&b))
        {
            return Err(FieldViolation::new(
                field,
                format!(
                    "a tool call id must be 1-{} visible ASCII characters (0x21-0x7E)",
                    limits.max_tool_call_id_bytes
                ),
            ));
        }
        Ok(Self(value))
    }

    /// An id read back from storage, where it was stored parsed.
    pub fn from_stored(value: String) -> Self {
        Self(value)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ToolCallId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A short name: a message's author or model, a tool's name, a file name. At
/// most `max_name_chars` characters, without control characters.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Name(String);

impl Name {
    /// Accepts the empty string (no name).
    pub fn parse(field: &str, value: String, limits: &Limits) -> Result<Self, FieldViolation> {
        if value.chars().count() > limits.max_name_chars {
            return Err(FieldViolation::new(
                field,
                format!(
                    "{field} is longer than {} characters",
                    limits.max_name_chars
                ),
            ));
        }
        if value.chars().any(char::is_control) {
            return Err(FieldViolation::new(
                field,
                format!("{field} must not contain control characters"),
            ));
        }
        Ok(Self(value))
    }

    /// Like [`Name::parse`], but the empty string is refused.
    pub fn parse_required(
        field: &str,
        value: String,
        limits: &Limits,
    ) -> Result<Self, FieldViolation> {
        if value.is_empty() {
            return Err(FieldViolation::new(field, format!("{field} is required")));
        }
        Self::parse(field, value, limits)
    }

    pub fn from_stored(value: String) -> Self {
        Self(value)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// A tool (function) call made by the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub id: ToolCallId,
    pub name: Name,
    /// As the model emitted it, usually JSON; kept verbatim even when not.
    pub arguments: String,
}

/// The answer to a tool call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolResult {
    pub tool_call_id: ToolCallId,
    pub content: String,
    pub is_error: bool,
    pub attachments: Vec<Blob>,
}

/// Where an attachment's content is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobSource {
    Uri(String),
    Data(Vec<u8>),
}

/// An attachment: an image, a file, audio.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    /// `type/subtype`, parameters allowed.
    pub mime_type: String,
    pub source: BlobSource,
    /// An optional file name.
    pub name: Name,
}

impl Blob {
    /// Checks a blob's fields, reporting each violation under `field`
    /// (`….blob.mime_type`, `….blob.uri`, …).
    pub fn parse(
        v: &mut Violations,
        field: &str,
        mime_type: String,
        uri: String,
        data: Vec<u8>,
        name: String,
        limits: &Limits,
    ) -> Option<Self> {
        let mime_type = v.check(parse_mime_type(&format!("{field}.mime_type"), mime_type));
        let source = match (uri.is_empty(), data.is_empty()) {
            (false, true) => v
                .check(parse_uri(&format!("{field}.uri"), uri, limits))
                .map(BlobSource::Uri),
            (true, false) if data.len() > limits.max_inline_data_bytes => {
                v.push(FieldViolation::new(
                    format!("{field}.data"),
                    format!(
                        "inline data is {} bytes; the limit is {} bytes: send larger content by uri",
                        data.len(),
                        limits.max_inline_data_bytes
                    ),
                ));
                None
            }
            (true, false) => Some(BlobSource::Data(data)),
            (true, true) => {
                v.push(FieldViolation::new(
                    field,
                    "a blob needs its content: set uri or data",
                ));
                None
            }
            (false, false) => {
                v.push(FieldViolation::new(
                    field,
                    "set exactly one of uri and data, not both",
                ));
                None
            }
        };
        let name = v.check(Name::parse(&format!("{field}.name"), name, limits));
        Some(Self {
            mime_type: mime_type?,
            source: source?,
            name: name?,
        })
    }

    fn size_bytes(&self) -> usize {
        self.mime_type.len()
            + self.name.as_str().len()
            + match &self.source {
                BlobSource::Uri(uri) => uri.len(),
                BlobSource::Data(data) => data.len(),
            }
    }
}

/// `type/subtype` with RFC 6838 name characters, optionally followed by
/// `;` parameters.
fn parse_mime_type(field: &str, value: String) -> Result<String, FieldViolation> {
    fn is_name(s: &str) -> bool {
        let mut bytes = s.bytes();
        matches!(bytes.next(), Some(b) if b.is_ascii_alphanumeric())
            && s.len() <= 127
            && bytes.all(|b| b.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(&b))
    }
    let essence = value.split(';').next().unwrap_or_default().trim_end();
    let shaped = match essence.split_once('/') {
        Some((kind, subtype)) => is_name(kind) && is_name(subtype),
        None => false,
    };
    let parameters_ok = value.bytes().all(|b| (0x20..=0x7e).contains(&b));
    if !shaped || !parameters_ok {
        return Err(FieldViolation::new(
            field,
            "mime_type must be `type/subtype`, such as image/png or application/pdf",
        ));
    }
    Ok(value)
}

fn parse_uri(field: &str, value: String, limits: &Limits) -> Result<String, FieldViolation> {
    if value.chars().count() > limits.max_uri_chars {
        return Err(FieldViolation::new(
            field,
            format!("uri is longer than {} characters", limits.max_uri_chars),
        ));
    }
    if value.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(FieldViolation::new(
            field,
            "uri must not contain spaces or control characters",
        ));
    }
    Ok(value)
}

/// What one part holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartKind {
    Text(String),
    ToolCall(ToolCall),
    ToolResult(ToolResult),
    Blob(Blob),
    Reasoning(String),
}

/// One typed piece of a message, with the provider's opaque state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub kind: PartKind,
    /// Returned verbatim; empty when the provider gave none.
    pub signature: Vec<u8>,
}

impl Part {
    /// Every string and byte the part holds: what counts towards a
    /// message's size.
    pub fn size_bytes(&self) -> usize {
        self.signature.len()
            + match &self.kind {
                PartKind::Text(text) | PartKind::Reasoning(text) => text.len(),
                PartKind::ToolCall(call) => {
                    call.id.as_str().len() + call.name.as_str().len() + call.arguments.len()
                }
                PartKind::ToolResult(result) => {
                    result.tool_call_id.as_str().len()
                        + result.content.len()
                        + result
                            .attachments
                            .iter()
                            .map(Blob::size_bytes)
                            .sum::<usize>()
                }
                PartKind::Blob(blob) => blob.size_bytes(),
            }
    }
}

/// Checks text that becomes part of the message's text projection, which is
/// stored as PostgreSQL text and so cannot hold U+0000.
pub fn parse_projected_text(field: &str, value: String) -> Result<String, FieldViolation> {
    match value.find('\0') {
        Some(at) => Err(FieldViolation::new(
            field,
            format!("text contains U+0000 at byte {at}, which cannot be stored"),
        )),
        None => Ok(value),
    }
}

/// Checks a part's signature size.
pub fn parse_signature(
    field: &str,
    value: Vec<u8>,
    limits: &Limits,
) -> Result<Vec<u8>, FieldViolation> {
    if value.len() > limits.max_signature_bytes {
        return Err(FieldViolation::new(
            field,
            format!(
                "signature is {} bytes; the limit is {} bytes",
                value.len(),
                limits.max_signature_bytes
            ),
        ));
    }
    Ok(value)
}

/// A message's parts, checked as a whole: 1 to `max_parts`, each allowed in
/// the message's role, tool call ids distinct, and the total size within
/// the message limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parts(Vec<Part>);

impl Parts {
    /// `field` names the list (`messages[2].parts`); violations name the
    /// offending part (`messages[2].parts[1].tool_call`).
    pub fn parse(
        v: &mut Violations,
        field: &str,
        role: Option<Role>,
        parts: Vec<Part>,
        limits: &Limits,
    ) -> Option<Self> {
        let before = v.len();
        if parts.len() > limits.max_parts {
            v.push(FieldViolation::new(
                field,
                format!(
                    "a message has at most {} parts; this one has {}",
                    limits.max_parts,
                    parts.len()
                ),
            ));
        }
        let size: usize = parts.iter().map(Part::size_bytes).sum();
        if size > limits.max_content_bytes {
            v.push(FieldViolation::new(
                field,
                format!(
                    "the parts hold {size} bytes; a message holds at most {} bytes",
                    limits.max_content_bytes
                ),
            ));
        }
        let mut call_ids = HashSet::new();
        for (i, part) in parts.iter().enumerate() {
            let (kind, allowed) = match &part.kind {
                PartKind::ToolCall(_) => ("tool_call", role == Some(Role::Assistant)),
                PartKind::Reasoning(_) => ("reasoning", role == Some(Role::Assistant)),
                PartKind::ToolResult(_) => ("tool_result", role == Some(Role::Tool)),
                PartKind::Text(_) | PartKind::Blob(_) => ("", true),
            };
            if !allowed && role.is_some() {
                let needed = if kind == "tool_result" {
                    "ROLE_TOOL"
                } else {
                    "ROLE_ASSISTANT"
                };
                v.push(FieldViolation::new(
                    format!("{field}[{i}].{kind}"),
                    format!("{kind} parts belong in {needed} messages"),
                ));
            }
            if let PartKind::ToolCall(call) = &part.kind
                && !call_ids.insert(call.id.as_str())
            {
                v.push(FieldViolation::new(
                    format!("{field}[{i}].tool_call.id"),
                    format!("tool call id {} appears twice in this message", call.id),
                ));
            }
        }
        (v.len() == before).then_some(Self(parts))
    }

    /// Parts read back from storage, where they were stored parsed.
    pub fn from_stored(parts: Vec<Part>) -> Self {
        Self(parts)
    }

    pub fn as_slice(&self) -> &[Part] {
        &self.0
    }

    pub fn into_vec(self) -> Vec<Part> {
        self.0
    }

    /// The message's text projection: its text parts and tool-result
    /// contents, joined by "\n". What `content` shows and search indexes.
    pub fn text_projection(&self) -> String {
        let texts: Vec<&str> = self
            .0
            .iter()
            .filter_map(|part| match &part.kind {
                PartKind::Text(text) => Some(text.as_str()),
                PartKind::ToolResult(result) => Some(result.content.as_str()),
                _ => None,
            })
            .collect();
        texts.join("\n")
    }

    /// The tool calls the parts make.
    pub fn tool_calls(&self) -> impl Iterator<Item = &ToolCall> {
        self.0.iter().filter_map(|part| match &part.kind {
            PartKind::ToolCall(call) => Some(call),
            _ => None,
        })
    }

    /// The ids of the tool calls the parts answer.
    pub fn answered_calls(&self) -> impl Iterator<Item = &ToolCallId> {
        self.0.iter().filter_map(|part| match &part.kind {
            PartKind::ToolResult(result) => Some(&result.tool_call_id),
            _ => None,
        })
    }
}

/// Token usage of a model call; every count is 0 or more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cached_input_tokens: i64,
    pub reasoning_tokens: i64,
}

impl Usage {
    /// The sum of two usages, count by count.
    pub fn plus(&self, other: &Usage) -> Usage {
        Usage {
            input_tokens: self.input_tokens.saturating_add(other.input_tokens),
            output_tokens: self.output_tokens.saturating_add(other.output_tokens),
            cached_input_tokens: self
                .cached_input_tokens
                .saturating_add(other.cached_input_tokens),
            reasoning_tokens: self.reasoning_tokens.saturating_add(other.reasoning_tokens),
        }
    }

    pub fn parse(
        v: &mut Violations,
        field: &str,
        input_tokens: i64,
        output_tokens: i64,
        cached_input_tokens: i64,
        reasoning_tokens: i64,
    ) -> Option<Self> {
        let before = v.len();
        for (name, count) in [
            ("input_tokens", input_tokens),
            ("output_tokens", output_tokens),
            ("cached_input_tokens", cached_input_tokens),
            ("reasoning_tokens", reasoning_tokens),
        ] {
            if count < 0 {
                v.push(FieldViolation::new(
                    format!("{field}.{name}"),
                    format!("{name} must not be negative"),
                ));
            }
        }
        (v.len() == before).then_some(Self {
            input_tokens,
            output_tokens,
            cached_input_tokens,
            reasoning_tokens,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits::CONTRACT;

    fn call(id: &str) -> Part {
        Part {
            kind: PartKind::ToolCall(ToolCall {
                id: ToolCallId::parse("id", id.into(), &LIMITS).unwrap(),
                name: Name::parse_required("name", "get_weather".into(), &LIMITS).unwrap(),
                arguments: "{\"city\": \"Lisbon\"".into(),
            }),
            signature: vec![0, 255, 7],
        }
    }

    fn text(t: &str) -> Part {
        Part {
            kind: PartKind::Text(t.into()),
            signature: Vec::new(),
        }
    }

    #[test]
    fn tool_call_ids_are_short_visible_ascii() {
        assert!(ToolCallId::parse("id", "call_abc123".into(), &LIMITS).is_ok());
        assert!(ToolCallId::parse("id", "x".repeat(256), &LIMITS).is_ok());
        for bad in ["", "has space", "tab\t", "é", &"x".repeat(257)] {
            assert!(
                ToolCallId::parse("id", bad.into(), &LIMITS).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn mime_types_are_type_slash_subtype() {
        for ok in [
            "image/png",
            "application/vnd.api+json",
            "text/plain; charset=utf-8",
        ] {
            assert!(parse_mime_type("m", ok.into()).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "png",
            "image/",
            "/png",
            "image png",
            "image/p ng",
            "ima\0ge/png",
        ] {
            assert!(parse_mime_type("m", bad.into()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_blob_has_exactly_one_source_within_its_limits() {
        let mut v = Violations::new();
        let parsed = |v: &mut Violations, uri: &str, data: Vec<u8>| {
            Blob::parse(
                v,
                "b",
                "image/png".into(),
                uri.into(),
                data,
                String::new(),
                &LIMITS,
            )
        };
        assert!(parsed(&mut v, "https://x/y.png", vec![]).is_some());
        assert!(parsed(&mut v, "", vec![1; 256 * 1024]).is_some());
        assert_eq!(v.len(), 0);
        assert!(parsed(&mut v, "", vec![]).is_none());
        assert!(parsed(&mut v, "https://x", vec![1]).is_none());
        assert!(parsed(&mut v, "", vec![1; 256 * 1024 + 1]).is_none());
        assert!(parsed(&mut v, &"u".repeat(2049), vec![]).is_none());
        assert_eq!(v.len(), 4);
    }

    #[test]
    fn parts_must_suit_the_role() {
        let mut v = Violations::new();
        assert!(
            Parts::parse(
                &mut v,
                "parts",
                Some(Role::Assistant),
                vec![call("a")],
                &LIMITS
            )
            .is_some()
        );
        assert!(
            Parts::parse(
                &mut v,
                "parts",
                Some(Role::User),
                vec![text("hi"), call("a")],
                &LIMITS
            )
            .is_none()
        );
        let refused = v.finish(|| Some(())).unwrap_err();
        assert_eq!(refused.violations()[0].field, "parts[1].tool_call");
    }

    #[test]
    fn a_message_cannot_repeat_a_tool_call_id_or_exceed_its_limits() {
        let mut v = Violations::new();
        assert!(
            Parts::parse(
                &mut v,
                "parts",
                Some(Role::Assistant),
                vec![call("a"), call("a")],
                &LIMITS
            )
            .is_none()
        );
        assert!(
            Parts::parse(
                &mut v,
                "parts",
                Some(Role::User),
                vec![text("x"); 65],
                &LIMITS
            )
            .is_none()
        );
        assert!(
            Parts::parse(
                &mut v,
                "parts",
                Some(Role::User),
                vec![text(&"x".repeat(1 << 20)), text("y")],
                &LIMITS
            )
            .is_none()
        );
        let refused = v.finish(|| Some(())).unwrap_err();
        let fields: Vec<_> = refused
            .violations()
            .iter()
            .map(|v| v.field.as_str())
            .collect();
        assert_eq!(fields, ["parts[1].tool_call.id", "parts", "parts"]);
    }

    #[test]
    fn the_text_projection_joins_text_and_tool_results() {
        let result = Part {
            kind: PartKind::ToolResult(ToolResult {
                tool_call_id: ToolCallId::parse("id", "a".into(), &LIMITS).unwrap(),
                content: "18°C".into(),
                is_error: false,
                attachments: Vec::new(),
            }),
            signature: Vec::new(),
        };
        let parts = Parts::from_stored(vec![text("before"), call("a"), result, text("after")]);
        assert_eq!(parts.text_projection(), "before\n18°C\nafter");
        assert_eq!(Parts::from_stored(vec![call("b")]).text_projection(), "");
    }

    #[test]
    fn usage_counts_are_not_negative() {
        let mut v = Violations::new();
        assert!(Usage::parse(&mut v, "usage", 1, 2, 0, 0).is_some());
        assert!(Usage::parse(&mut v, "usage", 1, -2, 0, -1).is_none());
        let refused = v.finish(|| Some(())).unwrap_err();
        let fields: Vec<_> = refused
            .violations()
            .iter()
            .map(|v| v.field.as_str())
            .collect();
        assert_eq!(fields, ["usage.output_tokens", "usage.reasoning_tokens"]);
    }
}
