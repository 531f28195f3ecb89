use super::{FieldViolation, Limits};

/// A conversation title: at most `max_title_chars` characters, possibly empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Title(String);

impl Title {
    pub fn parse(field: &str, value: String, limits: &Limits) -> Result<Self, FieldViolation> {
        let chars = value.chars().count();
        if chars > limits.max_title_chars {
            return Err(FieldViolation::new(
                field,
                format!(
                    "title is {chars} characters long; the limit is {}",
                    limits.max_title_chars
                ),
            ));
        }
        if value.contains('\0') {
            return Err(FieldViolation::new(field, "title must not contain U+0000"));
        }
        Ok(Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A message's text: 1 byte to `max_content_bytes` of UTF-8 without U+0000
/// (PostgreSQL text cannot hold it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Content(String);

impl Content {
    pub fn parse(field: &str, value: String, limits: &Limits) -> Result<Self, FieldViolation> {
        if value.is_empty() {
            return Err(FieldViolation::new(field, "content must not be empty"));
        }
        if value.len() > limits.max_content_bytes {
            return Err(FieldViolation::new(
                field,
                format!(
                    "content is {} bytes; the limit is {} bytes",
                    value.len(),
                    limits.max_content_bytes
                ),
            ));
        }
        if let Some(at) = value.find('\0') {
            return Err(FieldViolation::new(
                field,
                format!("content contains U+0000 at byte {at}, which cannot be stored"),
            ));
        }
        Ok(Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits::CONTRACT;

    #[test]
    fn title_counts_characters_not_bytes() {
        assert!(Title::parse("title", "".into(), &LIMITS).is_ok());
        assert!(Title::parse("title", "é".repeat(256), &LIMITS).is_ok());
        assert!(Title::parse("title", "界".repeat(257), &LIMITS).is_err());
        assert!(Title::parse("title", "a\0b".into(), &LIMITS).is_err());
    }

    #[test]
    fn content_is_one_byte_to_one_mebibyte() {
        assert!(Content::parse("content", "".into(), &LIMITS).is_err());
        assert!(Content::parse("content", "x".into(), &LIMITS).is_ok());
        assert!(Content::parse("content", "x".repeat(1 << 20), &LIMITS).is_ok());
        let err = Content::parse("content", "x".repeat((1 << 20) + 1), &LIMITS).unwrap_err();
        assert!(err.description.contains("1048576"));
    }

    #[test]
    fn content_rejects_nul_and_says_where() {
        let err = Content::parse("content", "ab\0c".into(), &LIMITS).unwrap_err();
        assert!(err.description.contains("byte 2"), "{}", err.description);
    }

    #[test]
    fn content_keeps_multibyte_text_exactly() {
        let text = "héllo 👋 世界 שלום".to_string();
        assert_eq!(
            Content::parse("content", text.clone(), &LIMITS)
                .unwrap()
                .as_str(),
            text
        );
    }
}
