use std::collections::{BTreeMap, HashSet};

use convo::grpc::proto::{
    self, CreateConversationRequest, ListConversationsRequest, UpdateConversationRequest,
};
use prost_types::FieldMask;
use tonic::Code;

use crate::helpers::{TestApp, append, assert_stored, create, expect_code, expect_invalid, micros};

fn metadata(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test]
async fn create_returns_an_empty_conversation_owned_by_the_caller() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let created = alice
        .create_conversation(CreateConversationRequest {
            title: "Trip to Lisbon".into(),
            metadata: metadata(&[("channel", "web"), ("locale", "pt-PT")]),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.user_id, "alice");
    assert_eq!(created.title, "Trip to Lisbon");
    assert_eq!(
        created.metadata,
        metadata(&[("channel", "web"), ("locale", "pt-PT")])
    );
    assert_eq!(created.message_count, 0);
    assert_eq!(created.create_time, created.update_time);
    assert!(created.create_time.is_some());
    assert_eq!(created.forked_from_conversation_id, "");
    assert_eq!(created.forked_at_sequence, 0);
    let id = uuid::Uuid::parse_str(&created.id).unwrap();
    assert_eq!(id.get_version_num(), 7, "ids are UUIDv7");
    assert_eq!(
        created.id,
        id.hyphenated().to_string(),
        "canonical lower-case text"
    );

    assert_stored(&mut alice, &created).await;
}

#[tokio::test]
async fn create_with_a_repeated_request_id_returns_the_first_conversation() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let request = CreateConversationRequest {
        title: "first".into(),
        request_id: "create-1".into(),
        ..Default::default()
    };
    let first = alice
        .create_conversation(request.clone())
        .await
        .unwrap()
        .into_inner();
    let retry = alice
        .create_conversation(CreateConversationRequest {
            title: "second".into(),
            ..request.clone()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retry, first);
    assert_eq!(
        app.db
            .count("SELECT count(*) AS n FROM conversations")
            .await,
        1
    );

    // The key is the caller's own: another user's identical key creates anew.
    let bobs = app
        .client("bob")
        .create_conversation(request)
        .await
        .unwrap()
        .into_inner();
    assert_ne!(bobs.id, first.id);
    assert_eq!(bobs.user_id, "bob");
}

#[tokio::test]
async fn create_enforces_title_metadata_and_request_id_limits() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let ok = |title: String, metadata: BTreeMap<String, String>| CreateConversationRequest {
        title,
        metadata,
        request_id: String::new(),
    };
    // At the limits: accepted.
    alice
        .create_conversation(ok("界".repeat(256), BTreeMap::new()))
        .await
        .unwrap();
    let sixteen = (0..16)
        .map(|i| (format!("{i:0>64}"), "v".repeat(512)))
        .collect();
    alice
        .create_conversation(ok(String::new(), sixteen))
        .await
        .unwrap();

    // Past them: INVALID_ARGUMENT naming the field, nothing stored.
    expect_invalid(
        alice
            .create_conversation(ok("界".repeat(257), BTreeMap::new()))
            .await,
        "title",
    );
    expect_invalid(
        alice
            .create_conversation(ok("a\0b".into(), BTreeMap::new()))
            .await,
        "title",
    );
    let seventeen = (0..17).map(|i| (i.to_string(), String::new())).collect();
    expect_invalid(
        alice
            .create_conversation(ok(String::new(), seventeen))
            .await,
        "metadata",
    );
    expect_invalid(
        alice
            .create_conversation(ok(String::new(), metadata(&[("", "v")])))
            .await,
        "metadata",
    );
    expect_invalid(
        alice
            .create_conversation(ok(String::new(), metadata(&[(&"k".repeat(65), "v")])))
            .await,
        "metadata",
    );
    expect_invalid(
        alice
            .create_conversation(ok(String::new(), metadata(&[("k", &"v".repeat(513))])))
            .await,
        "metadata",
    );
    for bad in ["has space".to_string(), "k".repeat(129), "é".into()] {
        expect_invalid(
            alice
                .create_conversation(CreateConversationRequest {
                    request_id: bad,
                    ..Default::default()
                })
                .await,
            "request_id",
        );
    }
    assert_eq!(
        app.db
            .count("SELECT count(*) AS n FROM conversations")
            .await,
        2
    );
}

#[tokio::test]
async fn every_violation_of_a_request_is_reported_at_once() {
    let app = TestApp::spawn().await;
    let status = expect_invalid(
        app.client("alice")
            .create_conversation(CreateConversationRequest {
                title: "x".repeat(300),
                metadata: metadata(&[("", "")]),
                request_id: "bad key".into(),
            })
            .await,
        "title",
    );
    use tonic_types::StatusExt;
    let fields: Vec<_> = status
        .get_details_bad_request()
        .unwrap()
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    assert_eq!(fields, ["title", "metadata", "request_id"]);
    assert!(status.message().contains("title"), "{}", status.message());
}

#[tokio::test]
async fn get_rejects_malformed_ids_and_reports_missing_ones() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    for bad in [
        "",
        "42",
        "not-a-uuid",
        "0190b5e48f1e7cc49a4b3f2a1c9d8e7f",
        "{0190b5e4-8f1e-7cc4-9a4b-3f2a1c9d8e7f}",
    ] {
        expect_invalid(
            alice
                .get_conversation(proto::GetConversationRequest {
                    conversation_id: bad.into(),
                })
                .await,
            "conversation_id",
        );
    }
    let missing = expect_code(
        alice
            .get_conversation(proto::GetConversationRequest {
                conversation_id: uuid::Uuid::now_v7().to_string(),
            })
            .await,
        Code::NotFound,
    );
    assert_eq!(missing.message(), "conversation not found");
}

#[tokio::test]
async fn update_replaces_only_the_fields_in_the_mask_and_bumps_update_time() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let created = alice
        .create_conversation(CreateConversationRequest {
            title: "old".into(),
            metadata: metadata(&[("a", "1"), ("b", "2")]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let update = |title: &str, pairs: &[(&str, &str)], paths: &[&str]| UpdateConversationRequest {
        conversation_id: created.id.clone(),
        title: title.into(),
        metadata: metadata(pairs),
        update_mask: Some(FieldMask {
            paths: paths.iter().map(|p| p.to_string()).collect(),
        }),
    };

    let titled = alice
        .update_conversation(update("new", &[("ignored", "x")], &["title"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(titled.title, "new");
    assert_eq!(
        titled.metadata, created.metadata,
        "metadata not in the mask stays"
    );
    assert!(micros(&titled.update_time) > micros(&created.update_time));
    assert_eq!(titled.create_time, created.create_time);

    let relabelled = alice
        .update_conversation(update("ignored", &[("c", "3")], &["metadata"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(relabelled.title, "new");
    assert_eq!(
        relabelled.metadata,
        metadata(&[("c", "3")]),
        "metadata is replaced whole"
    );
    assert!(micros(&relabelled.update_time) > micros(&titled.update_time));

    let both = alice
        .update_conversation(update("", &[], &["title", "metadata"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(both.title, "");
    assert!(both.metadata.is_empty());

    assert_stored(&mut alice, &both).await;
}

#[tokio::test]
async fn update_requires_a_mask_of_known_paths_and_valid_values() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let created = create(&mut alice, "t").await;
    let base = UpdateConversationRequest {
        conversation_id: created.id.clone(),
        ..Default::default()
    };
    expect_invalid(alice.update_conversation(base.clone()).await, "update_mask");
    for paths in [
        vec![],
        vec!["message_count".to_string()],
        vec!["title".into(), "user_id".into()],
        vec!["*".into()],
    ] {
        expect_invalid(
            alice
                .update_conversation(UpdateConversationRequest {
                    update_mask: Some(FieldMask { paths }),
                    ..base.clone()
                })
                .await,
            "update_mask",
        );
    }
    expect_invalid(
        alice
            .update_conversation(UpdateConversationRequest {
                title: "x".repeat(257),
                update_mask: Some(FieldMask {
                    paths: vec!["title".into()],
                }),
                ..base.clone()
            })
            .await,
        "title",
    );
    assert_stored(&mut alice, &created).await;
}

#[tokio::test]
async fn delete_removes_the_conversation_and_its_messages() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let doomed = create(&mut alice, "doomed").await;
    let kept = create(&mut alice, "kept").await;
    for i in 0..3 {
        append(&mut alice, &doomed.id, &format!("d{i}")).await;
        append(&mut alice, &kept.id, &format!("k{i}")).await;
    }
    alice
        .delete_conversation(proto::DeleteConversationRequest {
            conversation_id: doomed.id.clone(),
        })
        .await
        .unwrap();
    expect_code(
        alice
            .get_conversation(proto::GetConversationRequest {
                conversation_id: doomed.id.clone(),
            })
            .await,
        Code::NotFound,
    );
    expect_code(
        alice
            .delete_conversation(proto::DeleteConversationRequest {
                conversation_id: doomed.id.clone(),
            })
            .await,
        Code::NotFound,
    );
    // The cascade happened in the database: no orphaned rows remain.
    let doomed_messages = format!(
        "SELECT count(*) AS n FROM messages WHERE conversation_id = '{}'",
        doomed.id
    );
    assert_eq!(app.db.count(&doomed_messages).await, 0);
    assert_eq!(app.db.count("SELECT count(*) AS n FROM messages").await, 3);
}

#[tokio::test]
async fn list_orders_by_update_time_and_moves_a_conversation_up_on_append() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let a = create(&mut alice, "a").await;
    let b = create(&mut alice, "b").await;
    let c = create(&mut alice, "c").await;
    let titles = |page: proto::ListConversationsResponse| {
        page.conversations
            .into_iter()
            .map(|c| c.title)
            .collect::<Vec<_>>()
    };
    let list = ListConversationsRequest::default();
    assert_eq!(
        titles(
            alice
                .list_conversations(list.clone())
                .await
                .unwrap()
                .into_inner()
        ),
        ["c", "b", "a"]
    );

    append(&mut alice, &a.id, "bump").await;
    assert_eq!(
        titles(
            alice
                .list_conversations(list.clone())
                .await
                .unwrap()
                .into_inner()
        ),
        ["a", "c", "b"]
    );

    alice
        .update_conversation(UpdateConversationRequest {
            conversation_id: b.id.clone(),
            title: "b2".into(),
            update_mask: Some(FieldMask {
                paths: vec!["title".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let page = alice
        .list_conversations(list.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.next_page_token, "");
    assert_eq!(titles(page), ["b2", "a", "c"]);
    let _ = c;

    // Other users' conversations never appear.
    assert!(
        app.client("bob")
            .list_conversations(list)
            .await
            .unwrap()
            .into_inner()
            .conversations
            .is_empty()
    );
}

#[tokio::test]
async fn list_pagination_sees_every_conversation_exactly_once() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let mut expected = Vec::new();
    for i in 0..23 {
        expected.push(create(&mut alice, &format!("c{i}")).await.id);
    }
    // Identical update times must still page correctly (ties broken by id).
    app.db
        .run_sql(
            "UPDATE conversations SET (create_time, update_time) = \
             (SELECT create_time, create_time FROM conversations \
               WHERE user_id = 'alice' AND title = 'c3') \
             WHERE user_id = 'alice' AND title IN ('c4', 'c5', 'c6')",
        )
        .await;
    let full = alice
        .list_conversations(ListConversationsRequest {
            page_size: 1000,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let order: Vec<_> = full.conversations.iter().map(|c| c.id.clone()).collect();
    assert_eq!(order.len(), 23);
    assert_eq!(
        order.iter().collect::<HashSet<_>>(),
        expected.iter().collect::<HashSet<_>>()
    );

    for page_size in [1, 2, 3, 7, 22, 23, 24] {
        let mut seen = Vec::new();
        let mut token = String::new();
        let mut pages = 0;
        loop {
            let page = alice
                .list_conversations(ListConversationsRequest {
                    page_size,
                    page_token: token,
                })
                .await
                .unwrap()
                .into_inner();
            pages += 1;
            assert!(page.conversations.len() <= page_size as usize);
            seen.extend(page.conversations.into_iter().map(|c| c.id));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
            assert!(pages <= 23, "pagination does not end");
        }
        assert_eq!(seen, order, "page size {page_size}");
        assert_eq!(
            pages,
            23_usize.div_ceil(page_size as usize).max(1),
            "page size {page_size}"
        );
    }
}

#[tokio::test]
async fn list_page_size_defaults_and_clamps_and_tokens_are_bound_to_their_user() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    for i in 0..55 {
        create(&mut alice, &format!("c{i}")).await;
    }
    let first = alice
        .list_conversations(ListConversationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.conversations.len(), 50, "page_size 0 means 50");
    assert!(!first.next_page_token.is_empty());
    let all = alice
        .list_conversations(ListConversationsRequest {
            page_size: 5000,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.conversations.len(), 55);
    assert_eq!(all.next_page_token, "");

    expect_invalid(
        alice
            .list_conversations(ListConversationsRequest {
                page_size: -1,
                page_token: String::new(),
            })
            .await,
        "page_size",
    );
    // A token edited by hand, garbage, or replayed by another user.
    let mut edited = first.next_page_token.clone().into_bytes();
    let last = edited.len() - 1;
    edited[last] = if edited[last] == b'A' { b'B' } else { b'A' };
    for token in [
        String::from_utf8(edited).unwrap(),
        "garbage".into(),
        "!!!".into(),
    ] {
        expect_invalid(
            alice
                .list_conversations(ListConversationsRequest {
                    page_size: 0,
                    page_token: token,
                })
                .await,
            "page_token",
        );
    }
    create(&mut app.client("bob"), "bob's").await;
    expect_invalid(
        app.client("bob")
            .list_conversations(ListConversationsRequest {
                page_size: 0,
                page_token: first.next_page_token.clone(),
            })
            .await,
        "page_token",
    );
    let second = alice
        .list_conversations(ListConversationsRequest {
            page_size: 0,
            page_token: first.next_page_token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.conversations.len(), 5);
}

#[tokio::test]
async fn replicas_share_page_tokens_without_a_configured_secret() {
    let a = TestApp::spawn_with(|s| s.page_token_secret = None).await;
    let b = a.spawn_replica_with(|s| s.page_token_secret = None).await;
    let mut alice = a.client("alice");
    for i in 0..3 {
        create(&mut alice, &format!("c{i}")).await;
    }
    let first = alice
        .list_conversations(ListConversationsRequest {
            page_size: 2,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!first.next_page_token.is_empty());
    // The next page, from the other replica.
    let second = b
        .client("alice")
        .list_conversations(ListConversationsRequest {
            page_size: 2,
            page_token: first.next_page_token.clone(),
        })
        .await
        .expect("a token issued by one replica is honoured by another")
        .into_inner();
    assert_eq!(second.conversations.len(), 1);
    // A token sealed with the secret that used to be built in (it is public)
    // is refused.
    let forged = convo::grpc::PageTokenCodec::new(b"convo-default-page-token-secret")
        .next_conversations(
            &convo::domain::UserId::parse("alice").unwrap(),
            Some(&convo::domain::ConversationCursor {
                update_time: chrono::Utc::now(),
                id: convo::domain::ConversationId::generate(),
            }),
        );
    expect_invalid(
        b.client("alice")
            .list_conversations(ListConversationsRequest {
                page_size: 2,
                page_token: forged,
            })
            .await,
        "page_token",
    );
}
