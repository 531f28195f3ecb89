//! The wire format of page tokens: a cursor, sealed for the caller it was
//! issued to. Clients see an opaque string; any edit, and any use by another
//! user, is detected and refused as `INVALID_ARGUMENT`, never served as a
//! different page.
//!
//! Layout (URL-safe base64, no padding): version, listing kind, the cursor's
//! fields, then a 16-byte HMAC-SHA256 over all of that and the caller's id.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::DateTime;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::domain::{
    ConversationCursor, ConversationId, FieldViolation, MessageCursor, MessageOrder, SearchCursor,
    UserId,
};

const TOKEN_VERSION: u8 = 1;
const KIND_CONVERSATIONS: u8 = 1;
const KIND_MESSAGES: u8 = 2;
const KIND_SEARCH: u8 = 3;
/// Bytes of the search's fingerprint kept in its tokens.
const SEARCH_FINGERPRINT_LEN: usize = 8;
const MAC_LEN: usize = 16;

/// Encodes cursors as opaque page tokens that are bound to the user they were
/// issued to. A keyed MAC makes any edit, and any replay by another user,
/// detectable: such a token is an `INVALID_ARGUMENT`, never a different page.
#[derive(Clone)]
pub struct PageTokenCodec {
    /// The first key seals; every key opens (older ones, during a rotation).
    keys: Vec<[u8; 32]>,
}

impl std::fmt::Debug for PageTokenCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PageTokenCodec(..)")
    }
}

impl PageTokenCodec {
    /// Every replica behind one load balancer must use the same secret, or a
    /// token issued by one is refused by another.
    pub fn new(secret: &[u8]) -> Self {
        Self::rotating(secret, &[])
    }

    /// Seals with `current`, and also opens tokens sealed with any of
    /// `previous`, so that replicas can move to a new key without refusing
    /// the tokens clients hold.
    pub fn rotating(current: &[u8], previous: &[Vec<u8>]) -> Self {
        let keys = std::iter::once(current)
            .chain(previous.iter().map(Vec::as_slice))
            .map(|secret| Sha256::digest(secret).into())
            .collect();
        Self { keys }
    }

    pub fn encode_conversations(&self, user: &UserId, cursor: &ConversationCursor) -> String {
        let mut payload = Vec::with_capacity(24);
        payload.extend_from_slice(&cursor.update_time.timestamp_micros().to_be_bytes());
        payload.extend_from_slice(cursor.id.as_uuid().as_bytes());
        self.seal(user, KIND_CONVERSATIONS, &payload)
    }

    pub fn decode_conversations(
        &self,
        field: &str,
        user: &UserId,
        token: &str,
    ) -> Result<ConversationCursor, FieldViolation> {
        let payload = self.open(field, user, KIND_CONVERSATIONS, token)?;
        let (micros, id) = payload.split_at_checked(8).ok_or_else(|| invalid(field))?;
        let micros = i64::from_be_bytes(micros.try_into().map_err(|_| invalid(field))?);
        let update_time = DateTime::from_timestamp_micros(micros)
            .filter(|time| (1970..=9999).contains(&chrono::Datelike::year(time)))
            .ok_or_else(|| invalid(field))?;
        let id = Uuid::from_slice(id).map_err(|_| invalid(field))?;
        Ok(ConversationCursor {
            update_time,
            id: ConversationId::from_uuid(id),
        })
    }

    pub fn encode_messages(&self, user: &UserId, cursor: &MessageCursor) -> String {
        let mut payload = Vec::with_capacity(25);
        payload.extend_from_slice(cursor.conversation_id.as_uuid().as_bytes());
        payload.push(u8::from(cursor.order == MessageOrder::NewestFirst));
        payload.extend_from_slice(&cursor.sequence.to_be_bytes());
        self.seal(user, KIND_MESSAGES, &payload)
    }

    /// Decodes a ListMessages token, which only continues the listing it came
    /// from: the same conversation in the same order.
    pub fn decode_messages(
        &self,
        field: &str,
        user: &UserId,
        token: &str,
        conversation_id: ConversationId,
        order: MessageOrder,
    ) -> Result<MessageCursor, FieldViolation> {
        let payload = self.open(field, user, KIND_MESSAGES, token)?;
        if payload.len() != 25 {
            return Err(invalid(field));
        }
        let id = Uuid::from_slice(&payload[..16]).map_err(|_| invalid(field))?;
        let cursor = MessageCursor {
            conversation_id: ConversationId::from_uuid(id),
            order: if payload[16] == 1 {
                MessageOrder::NewestFirst
            } else {
                MessageOrder::OldestFirst
            },
            sequence: i64::from_be_bytes(payload[17..25].try_into().map_err(|_| invalid(field))?),
        };
        if cursor.sequence < 1 {
            return Err(invalid(field));
        }
        if cursor.conversation_id != conversation_id || cursor.order != order {
            return Err(FieldViolation::new(
                field,
                "page_token continues a different listing: use it with the same conversation_id and newest_first it was issued for",
            ));
        }
        Ok(cursor)
    }

    /// Encodes a SearchMessages cursor, bound to the search it continues: the
    /// same query text and the same conversation filter.
    pub fn encode_search(
        &self,
        user: &UserId,
        cursor: &SearchCursor,
        query: &str,
        conversation: Option<ConversationId>,
    ) -> String {
        let mut payload = Vec::with_capacity(SEARCH_FINGERPRINT_LEN + 28);
        payload.extend_from_slice(&search_fingerprint(query, conversation));
        payload.extend_from_slice(&cursor.rank.to_bits().to_be_bytes());
        payload.extend_from_slice(cursor.conversation_id.as_uuid().as_bytes());
        payload.extend_from_slice(&cursor.sequence.to_be_bytes());
        self.seal(user, KIND_SEARCH, &payload)
    }

    pub fn decode_search(
        &self,
        field: &str,
        user: &UserId,
        token: &str,
        query: &str,
        conversation: Option<ConversationId>,
    ) -> Result<SearchCursor, FieldViolation> {
        let payload = self.open(field, user, KIND_SEARCH, token)?;
        if payload.len() != SEARCH_FINGERPRINT_LEN + 28 {
            return Err(invalid(field));
        }
        let (fingerprint, rest) = payload.split_at(SEARCH_FINGERPRINT_LEN);
        if fingerprint != search_fingerprint(query, conversation) {
            return Err(FieldViolation::new(
                field,
                "page_token continues a different search: use it with the same query and conversation_id it was issued for",
            ));
        }
        let rank = f32::from_bits(u32::from_be_bytes(
            rest[..4].try_into().map_err(|_| invalid(field))?,
        ));
        let id = Uuid::from_slice(&rest[4..20]).map_err(|_| invalid(field))?;
        let sequence = i64::from_be_bytes(rest[20..28].try_into().map_err(|_| invalid(field))?);
        // Only what a page can end on: a rank in [0, 1), a real sequence.
        if !(0.0..1.0).contains(&rank) || sequence < 1 {
            return Err(invalid(field));
        }
        Ok(SearchCursor {
            rank,
            conversation_id: ConversationId::from_uuid(id),
            sequence,
        })
    }

    /// The `next_page_token` of a response: empty on the last page.
    pub fn next_conversations(&self, user: &UserId, next: Option<&ConversationCursor>) -> String {
        next.map_or_else(String::new, |cursor| {
            self.encode_conversations(user, cursor)
        })
    }

    pub fn next_messages(&self, user: &UserId, next: Option<&MessageCursor>) -> String {
        next.map_or_else(String::new, |cursor| self.encode_messages(user, cursor))
    }

    pub fn next_search(
        &self,
        user: &UserId,
        next: Option<&SearchCursor>,
        query: &str,
        conversation: Option<ConversationId>,
    ) -> String {
        next.map_or_else(String::new, |cursor| {
            self.encode_search(user, cursor, query, conversation)
        })
    }

    fn mac(key: &[u8; 32], user: &UserId, body: &[u8]) -> [u8; MAC_LEN] {
        // new_from_slice accepts keys of any length for HMAC; 32 bytes always fits.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(&(user.as_str().len() as u32).to_be_bytes());
        mac.update(user.as_str().as_bytes());
        mac.update(body);
        let full = mac.finalize().into_bytes();
        let mut short = [0u8; MAC_LEN];
        short.copy_from_slice(&full[..MAC_LEN]);
        short
    }

    fn seal(&self, user: &UserId, kind: u8, payload: &[u8]) -> String {
        let mut body = Vec::with_capacity(2 + payload.len() + MAC_LEN);
        body.push(TOKEN_VERSION);
        body.push(kind);
        body.extend_from_slice(payload);
        let mac = Self::mac(&self.keys[0], user, &body);
        body.extend_from_slice(&mac);
        URL_SAFE_NO_PAD.encode(body)
    }

    fn open(
        &self,
        field: &str,
        user: &UserId,
        kind: u8,
        token: &str,
    ) -> Result<Vec<u8>, FieldViolation> {
        let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid(field))?;
        if bytes.len() < 2 + MAC_LEN {
            return Err(invalid(field));
        }
        let (body, mac) = bytes.split_at(bytes.len() - MAC_LEN);
        let sealed_by_a_key = self.keys.iter().any(|key| {
            let expected = Self::mac(key, user, body);
            // Constant-time comparison: a token must not be forgeable byte by byte.
            expected
                .iter()
                .zip(mac)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
        });
        if !sealed_by_a_key || body[0] != TOKEN_VERSION || body[1] != kind {
            return Err(invalid(field));
        }
        Ok(body[2..].to_vec())
    }
}

fn search_fingerprint(
    query: &str,
    conversation: Option<ConversationId>,
) -> [u8; SEARCH_FINGERPRINT_LEN] {
    let mut hash = Sha256::new();
    hash.update((query.len() as u64).to_be_bytes());
    hash.update(query.as_bytes());
    if let Some(id) = conversation {
        hash.update(id.as_uuid().as_bytes());
    }
    let digest = hash.finalize();
    let mut fingerprint = [0u8; SEARCH_FINGERPRINT_LEN];
    fingerprint.copy_from_slice(&digest[..SEARCH_FINGERPRINT_LEN]);
    fingerprint
}

fn invalid(field: &str) -> FieldViolation {
    FieldViolation::new(
        field,
        "page_token is not valid here: pass the next_page_token of the previous response unchanged, from the same caller",
    )
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;

    fn user(name: &str) -> UserId {
        UserId::parse(name).unwrap()
    }

    #[test]
    fn conversation_cursor_round_trips_for_its_user_only() {
        let codec = PageTokenCodec::new(b"secret");
        let cursor = ConversationCursor {
            update_time: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
            id: ConversationId::generate(),
        };
        let token = codec.encode_conversations(&user("alice"), &cursor);
        assert_eq!(
            codec
                .decode_conversations("page_token", &user("alice"), &token)
                .unwrap(),
            cursor
        );
        assert!(
            codec
                .decode_conversations("page_token", &user("bob"), &token)
                .is_err()
        );
        assert!(
            PageTokenCodec::new(b"other")
                .decode_conversations("page_token", &user("alice"), &token)
                .is_err()
        );
    }

    #[test]
    fn any_edited_byte_is_detected() {
        let codec = PageTokenCodec::new(b"secret");
        let cursor = MessageCursor {
            conversation_id: ConversationId::generate(),
            order: MessageOrder::OldestFirst,
            sequence: 42,
        };
        let alice = user("alice");
        let token = codec.encode_messages(&alice, &cursor);
        let mut bytes = URL_SAFE_NO_PAD.decode(&token).unwrap();
        for i in 0..bytes.len() {
            bytes[i] ^= 1;
            let edited = URL_SAFE_NO_PAD.encode(&bytes);
            assert!(
                codec
                    .decode_messages(
                        "page_token",
                        &alice,
                        &edited,
                        cursor.conversation_id,
                        MessageOrder::OldestFirst
                    )
                    .is_err(),
                "edit at byte {i} went unnoticed"
            );
            bytes[i] ^= 1;
        }
        assert_eq!(
            codec
                .decode_messages(
                    "page_token",
                    &alice,
                    &token,
                    cursor.conversation_id,
                    MessageOrder::OldestFirst
                )
                .unwrap(),
            cursor
        );
    }

    #[test]
    fn message_token_only_continues_its_own_listing() {
        let codec = PageTokenCodec::new(b"secret");
        let alice = user("alice");
        let cursor = MessageCursor {
            conversation_id: ConversationId::generate(),
            order: MessageOrder::NewestFirst,
            sequence: 7,
        };
        let token = codec.encode_messages(&alice, &cursor);
        assert!(
            codec
                .decode_messages(
                    "page_token",
                    &alice,
                    &token,
                    cursor.conversation_id,
                    MessageOrder::OldestFirst
                )
                .is_err()
        );
        assert!(
            codec
                .decode_messages(
                    "page_token",
                    &alice,
                    &token,
                    ConversationId::generate(),
                    MessageOrder::NewestFirst
                )
                .is_err()
        );
        let conversations_token = codec.encode_conversations(
            &alice,
            &ConversationCursor {
                update_time: Utc::now(),
                id: ConversationId::generate(),
            },
        );
        assert!(
            codec
                .decode_messages(
                    "page_token",
                    &alice,
                    &conversations_token,
                    cursor.conversation_id,
                    MessageOrder::NewestFirst
                )
                .is_err()
        );
    }

    #[test]
    fn search_token_only_continues_its_own_search() {
        let codec = PageTokenCodec::new(b"secret");
        let alice = user("alice");
        let conversation = Some(ConversationId::generate());
        let cursor = SearchCursor {
            rank: 0.123_456_7,
            conversation_id: ConversationId::generate(),
            sequence: 9,
        };
        let token = codec.encode_search(&alice, &cursor, "lisbon trip", conversation);
        assert_eq!(
            codec
                .decode_search("page_token", &alice, &token, "lisbon trip", conversation)
                .unwrap(),
            cursor
        );
        assert!(
            codec
                .decode_search("page_token", &alice, &token, "lisbon", conversation)
                .is_err()
        );
        assert!(
            codec
                .decode_search("page_token", &alice, &token, "lisbon trip", None)
                .is_err()
        );
        assert!(
            codec
                .decode_search(
                    "page_token",
                    &user("bob"),
                    &token,
                    "lisbon trip",
                    conversation
                )
                .is_err()
        );
    }

    #[test]
    fn a_rotation_opens_tokens_of_the_previous_key_and_seals_with_the_new() {
        let alice = user("alice");
        let cursor = MessageCursor {
            conversation_id: ConversationId::generate(),
            order: MessageOrder::OldestFirst,
            sequence: 3,
        };
        let old = PageTokenCodec::new(b"old key");
        let rotated = PageTokenCodec::rotating(b"new key", &[b"old key".to_vec()]);
        let issued_before = old.encode_messages(&alice, &cursor);
        let opened = rotated.decode_messages(
            "page_token",
            &alice,
            &issued_before,
            cursor.conversation_id,
            cursor.order,
        );
        assert_eq!(opened.unwrap(), cursor);
        let issued_after = rotated.encode_messages(&alice, &cursor);
        assert_eq!(
            issued_after,
            PageTokenCodec::new(b"new key").encode_messages(&alice, &cursor)
        );
        assert!(
            old.decode_messages(
                "page_token",
                &alice,
                &issued_after,
                cursor.conversation_id,
                cursor.order
            )
            .is_err()
        );
    }

    #[test]
    fn a_sealed_cursor_must_still_make_sense() {
        let codec = PageTokenCodec::new(b"secret");
        let alice = user("alice");
        let conversation = ConversationId::generate();
        for rank in [f32::NAN, f32::INFINITY, -0.5, 1.0] {
            let cursor = SearchCursor {
                rank,
                conversation_id: conversation,
                sequence: 1,
            };
            let token = codec.encode_search(&alice, &cursor, "q", None);
            assert!(
                codec
                    .decode_search("page_token", &alice, &token, "q", None)
                    .is_err(),
                "{rank}"
            );
        }
        let cursor = MessageCursor {
            conversation_id: conversation,
            order: MessageOrder::OldestFirst,
            sequence: 0,
        };
        let token = codec.encode_messages(&alice, &cursor);
        assert!(
            codec
                .decode_messages("page_token", &alice, &token, conversation, cursor.order)
                .is_err()
        );
        let far = ConversationCursor {
            update_time: DateTime::from_timestamp_micros(i64::MAX / 2).unwrap(),
            id: conversation,
        };
        let token = codec.encode_conversations(&alice, &far);
        assert!(
            codec
                .decode_conversations("page_token", &alice, &token)
                .is_err()
        );
    }

    #[test]
    fn garbage_is_rejected_without_panicking() {
        let codec = PageTokenCodec::new(b"secret");
        for junk in ["", "!", "AAAA", "not base64 at all", &"A".repeat(10_000)] {
            assert!(
                codec
                    .decode_conversations("page_token", &user("a"), junk)
                    .is_err()
            );
        }
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        proptest! {
                #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_token_text_is_refused_or_decoded_never_a_panic(token in ".{0,200}|[A-Za-z0-9_-]{0,120}") {
            let codec = PageTokenCodec::new(b"secret");
            let user = UserId::parse("alice").unwrap();
            let id = ConversationId::generate();
            let _ = codec.decode_conversations("page_token", &user, &token);
            let _ = codec.decode_messages("page_token", &user, &token, id, MessageOrder::OldestFirst);
            let _ = codec.decode_search("page_token", &user, &token, "q", None);
        }

        #[test]
        fn tokens_round_trip_for_their_user_and_no_other(
            // Cursors a page can end on: 1970..9999, sequence 1 or more.
            micros in 0i64..253_402_300_799_999_999,
            bytes in any::<[u8; 16]>(),
            owner in "[!-~]{1,128}",
            other in "[!-~]{1,128}",
            sequence in 1i64..=i64::MAX,
            newest_first in any::<bool>(),
        ) {
            let codec = PageTokenCodec::new(b"secret");
            let owner = UserId::parse(&owner).unwrap();
            let other = UserId::parse(&other).unwrap();
            let id = ConversationId::from_uuid(uuid::Uuid::from_bytes(bytes));
            let Some(update_time) = DateTime::from_timestamp_micros(micros) else { return Ok(()) };
            let cursor = ConversationCursor { update_time, id };
            let token = codec.encode_conversations(&owner, &cursor);
            prop_assert_eq!(codec.decode_conversations("page_token", &owner, &token).unwrap(), cursor);
            let order = if newest_first { MessageOrder::NewestFirst } else { MessageOrder::OldestFirst };
            let messages = MessageCursor { conversation_id: id, order, sequence };
            let token = codec.encode_messages(&owner, &messages);
            prop_assert_eq!(codec.decode_messages("page_token", &owner, &token, id, order).unwrap(), messages);
            if other != owner {
                prop_assert!(codec.decode_messages("page_token", &other, &token, id, order).is_err());
            }
        }

            }
    }
}
