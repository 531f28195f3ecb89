use std::fmt;

use uuid::Uuid;

use super::{FieldViolation, Limits};

/// True for 1..=128 bytes of visible ASCII (0x21-0x7E): the shape of user ids
/// and idempotency keys, which travel in headers and logs unescaped.
fn is_visible_ascii_key(value: &str) -> bool {
    (1..=Limits::MAX_KEY_BYTES).contains(&value.len())
        && value.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

/// The caller, as asserted by the `x-user-id` request metadata.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UserId(String);

impl UserId {
    /// Accepts 1-128 bytes of visible ASCII; anything else is no identity at all.
    pub fn parse(value: &str) -> Result<Self, &'static str> {
        if value.is_empty() {
            return Err("x-user-id is empty");
        }
        if !is_visible_ascii_key(value) {
            return Err("x-user-id must be 1-128 bytes of visible ASCII (0x21-0x7E)");
        }
        Ok(Self(value.to_owned()))
    }

    /// Rebuilds a user id read back from storage, where the `users` table's
    /// CHECK holds it to the shape `parse` accepts.
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

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Uuid);

        impl $name {
            /// A new time-ordered (v7) id.
            pub fn generate() -> Self {
                Self(Uuid::now_v7())
            }

            /// Parses the canonical hyphenated form, in either case.
            pub fn parse(field: &str, value: &str) -> Result<Self, FieldViolation> {
                if value.is_empty() {
                    return Err(FieldViolation::new(field, concat!("a ", $what, " id is required")));
                }
                // Only the 36-character hyphenated form: braces, URNs and the
                // simple form would let two spellings name one row.
                if value.len() != 36 {
                    return Err(FieldViolation::new(
                        field,
                        concat!("not a ", $what, " id: expected a UUID such as 0190b5e4-8f1e-7cc4-9a4b-3f2a1c9d8e7f"),
                    ));
                }
                Uuid::try_parse(value).map(Self).map_err(|_| {
                    FieldViolation::new(
                        field,
                        concat!("not a ", $what, " id: expected a UUID such as 0190b5e4-8f1e-7cc4-9a4b-3f2a1c9d8e7f"),
                    )
                })
            }

            pub fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }

            pub fn as_uuid(&self) -> &Uuid {
                &self.0
            }

            /// The canonical text in a string of exactly its length, for the
            /// wire: `to_string` goes through the formatter and grows its
            /// string as it writes (every row of every page pays it).
            pub fn to_text(&self) -> String {
                self.0.hyphenated().encode_lower(&mut Uuid::encode_buffer()).to_owned()
            }
        }

        impl fmt::Display for $name {
            /// Canonical lower-case hyphenated text.
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0.hyphenated(), f)
            }
        }
    };
}

uuid_id!(
    /// A conversation's server-generated id.
    ConversationId,
    "conversation"
);
uuid_id!(
    /// A message's server-generated id.
    MessageId,
    "message"
);

/// A client's idempotency key: 1-128 bytes of visible ASCII. An empty string in
/// a request means "no key" and never becomes a `RequestId`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestId(String);

impl RequestId {
    /// `None` for the empty string (proto3's "not set").
    pub fn parse_optional(field: &str, value: &str) -> Result<Option<Self>, FieldViolation> {
        if value.is_empty() {
            return Ok(None);
        }
        if !is_visible_ascii_key(value) {
            return Err(FieldViolation::new(
                field,
                "request_id must be at most 128 characters of visible ASCII (0x21-0x7E)",
            ));
        }
        Ok(Some(Self(value.to_owned())))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_id_accepts_visible_ascii_up_to_128_bytes() {
        assert!(UserId::parse("a").is_ok());
        assert!(UserId::parse("user:42@example.com").is_ok());
        assert!(UserId::parse(&"x".repeat(128)).is_ok());
        assert!(UserId::parse("!~").is_ok());
    }

    #[test]
    fn user_id_rejects_empty_long_spaces_and_non_ascii() {
        assert!(UserId::parse("").is_err());
        assert!(UserId::parse(&"x".repeat(129)).is_err());
        assert!(UserId::parse("a b").is_err());
        assert!(UserId::parse("tab\there").is_err());
        assert!(UserId::parse("é").is_err());
        assert!(UserId::parse("\u{7f}").is_err());
    }

    #[test]
    fn conversation_id_round_trips_in_lower_case() {
        let id = ConversationId::generate();
        let text = id.to_string();
        assert_eq!(text, text.to_lowercase());
        assert_eq!(ConversationId::parse("f", &text).unwrap(), id);
        assert_eq!(
            ConversationId::parse("f", &text.to_uppercase()).unwrap(),
            id
        );
    }

    #[test]
    fn wire_text_is_the_display_text() {
        let id = MessageId::from_uuid(Uuid::from_u128(0x0190_b5e4_8f1e_7cc4_9a4b_3f2a_1c9d_8e7f));
        assert_eq!(id.to_text(), "0190b5e4-8f1e-7cc4-9a4b-3f2a1c9d8e7f");
        let id = ConversationId::generate();
        assert_eq!(id.to_text(), id.to_string());
        assert_eq!(id.to_text().capacity(), 36);
    }

    #[test]
    fn conversation_id_rejects_other_spellings_and_garbage() {
        let id = ConversationId::generate();
        let simple = id.as_uuid().simple().to_string();
        let braced = id.as_uuid().braced().to_string();
        for bad in [
            "",
            "nope",
            &simple,
            &braced,
            "0190b5e4-8f1e-7cc4-9a4b-3f2a1c9d8e7g",
        ] {
            let err = ConversationId::parse("conversation_id", bad).unwrap_err();
            assert_eq!(err.field, "conversation_id");
        }
    }

    #[test]
    fn generated_ids_are_version_7_and_ordered() {
        let a = ConversationId::generate();
        let b = ConversationId::generate();
        assert_eq!(a.as_uuid().get_version_num(), 7);
        assert!(a < b);
    }

    #[test]
    fn request_id_is_optional_and_bounded() {
        assert_eq!(RequestId::parse_optional("request_id", "").unwrap(), None);
        assert!(
            RequestId::parse_optional("request_id", "retry-1")
                .unwrap()
                .is_some()
        );
        assert!(
            RequestId::parse_optional("request_id", &"k".repeat(128))
                .unwrap()
                .is_some()
        );
        assert!(RequestId::parse_optional("request_id", &"k".repeat(129)).is_err());
        assert!(RequestId::parse_optional("request_id", "has space").is_err());
    }
}
