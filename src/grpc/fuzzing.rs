//! The entry point of the fuzz target (`fuzz/`): bytes in, decoded as one of
//! the request messages and run through the validation every handler runs.
//! Whatever the bytes, it returns; it never panics.

use prost::Message;

use super::page_token::PageTokenCodec;
use super::{parse::Parser, proto};
use crate::domain::{Limits, UserId};

/// The request messages, in the order the first byte selects them.
pub const REQUEST_KINDS: usize = 14;

/// Decodes `bytes` as request kind `kind % REQUEST_KINDS` and validates it.
/// Returns whether it decoded and validated.
pub fn validate_encoded_request(kind: u8, bytes: &[u8]) -> bool {
    let parser = Parser {
        limits: Limits::CONTRACT,
        tokens: PageTokenCodec::new(b"fuzz"),
    };
    let Ok(owner) = UserId::parse("fuzzer") else {
        return false;
    };
    macro_rules! check {
        ($message:ty, |$request:ident| $validate:expr) => {
            match <$message>::decode(bytes) {
                Ok($request) => $validate,
                Err(_) => false,
            }
        };
    }
    match usize::from(kind) % REQUEST_KINDS {
        0 => check!(proto::CreateConversationRequest, |r| parser
            .create_conversation(r)
            .is_ok()),
        1 => check!(proto::GetConversationRequest, |r| {
            super::parse::conversation_id(&r.conversation_id).is_ok()
        }),
        2 => check!(proto::ListConversationsRequest, |r| parser
            .list_conversations(&owner, &r)
            .is_ok()),
        3 => check!(proto::UpdateConversationRequest, |r| parser
            .update_conversation(r)
            .is_ok()),
        4 => check!(proto::DeleteConversationRequest, |r| {
            super::parse::conversation_id(&r.conversation_id).is_ok()
        }),
        5 => check!(proto::AppendMessageRequest, |r| parser
            .append_message(r)
            .is_ok()),
        6 => check!(proto::AppendMessagesRequest, |r| parser
            .append_messages(r)
            .is_ok()),
        7 => check!(proto::ListMessagesRequest, |r| parser
            .list_messages(&owner, &r)
            .is_ok()),
        8 => check!(proto::ResumeConversationRequest, |r| parser
            .resume_conversation(&r)
            .is_ok()),
        9 => check!(proto::WatchConversationRequest, |r| parser
            .watch_conversation(&r)
            .is_ok()),
        10 => check!(proto::ForkConversationRequest, |r| parser
            .fork_conversation(r)
            .is_ok()),
        11 => check!(proto::SearchMessagesRequest, |r| parser
            .search_messages(&owner, r)
            .is_ok()),
        12 => check!(proto::DeleteUserDataRequest, |_r| true),
        _ => check!(proto::TruncateConversationRequest, |r| parser
            .truncate_conversation(&r)
            .is_ok()),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// A short fuzzing run on every `cargo test`; `fuzz/` runs the same
        /// entry point under libFuzzer for as long as one likes.
        #[test]
        fn arbitrary_bytes_never_panic_validation(kind in any::<u8>(), bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = validate_encoded_request(kind, &bytes);
        }
    }

    /// The seeds of the structured-message and truncation requests are
    /// well formed (other seeds hold deliberate mistakes).
    #[test]
    fn the_parts_and_truncate_seeds_validate() {
        let corpus = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/requests");
        for seed in [
            "06-AppendMessagesRequest-parts",
            "13-TruncateConversationRequest",
        ] {
            let bytes = std::fs::read(format!("{corpus}/{seed}")).expect("read the seed");
            let (kind, message) = bytes.split_first().expect("a seed is not empty");
            assert!(validate_encoded_request(*kind, message), "{seed}");
        }
    }

    #[test]
    fn well_formed_requests_validate() {
        let id = crate::domain::ConversationId::generate().to_string();
        let append = proto::AppendMessageRequest {
            conversation_id: id.clone(),
            role: proto::Role::User as i32,
            content: "hello".into(),
            ..Default::default()
        };
        assert!(validate_encoded_request(5, &append.encode_to_vec()));
        let search = proto::SearchMessagesRequest {
            query: "hello".into(),
            ..Default::default()
        };
        assert!(validate_encoded_request(11, &search.encode_to_vec()));
        assert!(validate_encoded_request(0, &[]));
        assert!(
            !validate_encoded_request(1, &[]),
            "an empty conversation id is invalid"
        );
    }
}
