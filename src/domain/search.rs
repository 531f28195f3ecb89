use super::{FieldViolation, Message};

/// What a person typed into a search box: 1-1024 characters, not blank. It is
/// handed to PostgreSQL as plain words (`websearch_to_tsquery`), so no text
/// can be a syntax error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchQuery(String);

impl SearchQuery {
    pub const MAX_CHARS: usize = 1024;

    pub fn parse(field: &str, value: String) -> Result<Self, FieldViolation> {
        if value.trim().is_empty() {
            return Err(FieldViolation::new(
                field,
                "query must contain at least one word",
            ));
        }
        if value.chars().count() > Self::MAX_CHARS {
            return Err(FieldViolation::new(
                field,
                format!("query is longer than {} characters", Self::MAX_CHARS),
            ));
        }
        if value.contains('\0') {
            return Err(FieldViolation::new(field, "query must not contain U+0000"));
        }
        Ok(Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl SearchHit {
    /// An upper bound of the hit's protobuf encoding, in bytes.
    pub fn wire_size_bound(&self) -> usize {
        self.message.wire_size_bound() + self.conversation_title.len() + self.snippet.len() + 64
    }
}

/// A message that matched a search.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchHit {
    pub message: Message,
    pub conversation_title: String,
    /// An excerpt with each match wrapped in `<mark>` … `</mark>`.
    pub snippet: String,
    /// Relevance in [0, 1); hits are ordered by it, descending.
    pub rank: f32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blank_long_and_nul_queries_are_rejected() {
        for bad in [
            String::new(),
            "   \t\n".into(),
            "x".repeat(1025),
            "a\0b".into(),
        ] {
            assert!(SearchQuery::parse("query", bad).is_err());
        }
    }

    #[test]
    fn punctuation_and_operators_are_plain_text() {
        for ok in [
            "hello",
            "\"exact phrase\" -not",
            "!!!",
            "a & b | !c",
            "(unbalanced",
            "界".repeat(1024).as_str(),
        ] {
            assert_eq!(
                SearchQuery::parse("query", ok.to_string())
                    .unwrap()
                    .as_str(),
                ok
            );
        }
    }
}
