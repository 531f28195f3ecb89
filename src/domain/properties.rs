//! Property tests: every parser, fed arbitrary input, either returns a value
//! that satisfies its rules or a violation that names the field, and never
//! panics.

use proptest::prelude::*;

use super::*;

const LIMITS: Limits = Limits::CONTRACT;

fn visible_ascii(s: &str) -> bool {
    s.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn user_ids_are_exactly_the_short_visible_ascii_strings(s in ".{0,140}|[!-~]{1,130}") {
        let valid = (1..=128).contains(&s.len()) && visible_ascii(&s);
        match UserId::parse(&s) {
            Ok(user) => { prop_assert!(valid); prop_assert_eq!(user.as_str(), s.as_str()); }
            Err(_) => prop_assert!(!valid),
        }
    }

    #[test]
    fn request_ids_are_optional_short_visible_ascii(s in ".{0,140}|[!-~]{1,130}") {
        match RequestId::parse_optional("request_id", &s) {
            Ok(None) => prop_assert!(s.is_empty()),
            Ok(Some(id)) => { prop_assert!(s.len() <= 128 && visible_ascii(&s)); prop_assert_eq!(id.as_str(), s.as_str()); }
            Err(v) => { prop_assert_eq!(v.field, "request_id"); prop_assert!(!s.is_empty()); }
        }
    }

    #[test]
    fn conversation_ids_parse_only_canonical_uuids(s in ".{0,40}|[0-9a-fA-F-]{36}") {
        if let Ok(id) = ConversationId::parse("conversation_id", &s) {
            prop_assert_eq!(id.to_string(), s.to_lowercase());
        }
    }

    #[test]
    fn every_uuid_round_trips_in_either_case(bytes in any::<[u8; 16]>(), upper in any::<bool>()) {
        let id = ConversationId::from_uuid(uuid::Uuid::from_bytes(bytes));
        let text = if upper { id.to_string().to_uppercase() } else { id.to_string() };
        prop_assert_eq!(ConversationId::parse("conversation_id", &text).unwrap(), id);
    }

    #[test]
    fn titles_are_short_and_nul_free(s in "\\PC{0,300}|.{0,300}") {
        let valid = s.chars().count() <= 256 && !s.contains('\0');
        match Title::parse("title", s.clone(), &LIMITS) {
            Ok(title) => { prop_assert!(valid); prop_assert_eq!(title.as_str(), s.as_str()); }
            Err(v) => { prop_assert!(!valid); prop_assert_eq!(v.field, "title"); }
        }
    }

    #[test]
    fn content_is_kept_byte_for_byte_or_refused(s in "\\PC{0,64}|.{0,64}", small_limit in 1usize..40) {
        let limits = Limits { max_content_bytes: small_limit, ..LIMITS };
        let valid = !s.is_empty() && s.len() <= small_limit && !s.contains('\0');
        match Content::parse("messages[3].content", s.clone(), &limits) {
            Ok(content) => { prop_assert!(valid); prop_assert_eq!(content.as_str(), s.as_str()); }
            Err(v) => { prop_assert!(!valid); prop_assert_eq!(v.field, "messages[3].content"); }
        }
    }

    #[test]
    fn metadata_within_the_limits_is_kept_whole(
        pairs in proptest::collection::btree_map("\\PC{0,70}", "\\PC{0,20}|.{0,3}", 0..20)
    ) {
        let valid = pairs.len() <= 16
            && pairs.iter().all(|(k, v)| {
                (1..=64).contains(&k.chars().count())
                    && v.chars().count() <= 512
                    && !k.contains('\0')
                    && !v.contains('\0')
            });
        match Metadata::parse("metadata", pairs.clone(), &LIMITS) {
            Ok(metadata) => {
                prop_assert!(valid);
                prop_assert_eq!(metadata.into_pairs(), pairs);
            }
            Err(v) => { prop_assert!(!valid); prop_assert_eq!(v.field, "metadata"); }
        }
    }

    #[test]
    fn page_sizes_default_clamp_or_refuse(n in any::<i32>()) {
        match PageSize::parse("page_size", n, &LIMITS) {
            Ok(size) => {
                prop_assert!(n >= 0);
                prop_assert!((1..=1000).contains(&size.get()));
                if n == 0 { prop_assert_eq!(size.get(), 50); }
                if (1..=1000).contains(&n) { prop_assert_eq!(size.get() as i32, n); }
            }
            Err(v) => { prop_assert!(n < 0); prop_assert_eq!(v.field, "page_size"); }
        }
    }

    #[test]
    fn search_queries_are_any_nonblank_text_up_to_the_limit(s in "\\PC{0,40}|.{0,40}|[ \\t]{0,5}") {
        let valid = !s.trim().is_empty() && s.chars().count() <= 1024 && !s.contains('\0');
        prop_assert_eq!(SearchQuery::parse("query", s).is_ok(), valid);
    }

    #[test]
    fn roles_are_the_five_known_numbers(n in any::<i32>()) {
        prop_assert_eq!(Role::parse("role", n).is_ok(), (1..=5).contains(&n));
    }
}
