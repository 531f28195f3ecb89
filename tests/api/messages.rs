use std::collections::BTreeMap;

use convo::grpc::proto::{
    self, AppendMessageRequest, AppendMessagesRequest, ListMessagesRequest,
    ResumeConversationRequest, Role,
};
use tonic::Code;

use crate::helpers::{
    Client, TestApp, all_messages, append, append_many, create, expect_code, expect_invalid,
    micros, user_message,
};

fn request(conversation_id: &str, content: &str) -> AppendMessageRequest {
    AppendMessageRequest {
        conversation_id: conversation_id.to_owned(),
        role: Role::User as i32,
        content: content.to_owned(),
        ..Default::default()
    }
}

async fn conversation(client: &mut Client, id: &str) -> proto::Conversation {
    client
        .get_conversation(proto::GetConversationRequest {
            conversation_id: id.to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn append_assigns_gapless_sequences_and_bumps_the_conversation() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let created = create(&mut alice, "chat").await;
    let first = alice
        .append_message(AppendMessageRequest {
            metadata: BTreeMap::from([("model".to_string(), "none".to_string())]),
            ..request(&created.id, "hello")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.sequence, 1);
    assert_eq!(first.conversation_id, created.id);
    assert_eq!(first.role, Role::User as i32);
    assert_eq!(first.content, "hello");
    assert_eq!(first.metadata["model"], "none");
    assert_eq!(
        uuid::Uuid::parse_str(&first.id).unwrap().get_version_num(),
        7
    );

    let batch = alice
        .append_messages(AppendMessagesRequest {
            conversation_id: created.id.clone(),
            messages: vec![
                proto::NewMessage {
                    role: Role::Assistant as i32,
                    content: "hi".into(),
                    metadata: BTreeMap::new(),
                    ..Default::default()
                },
                proto::NewMessage {
                    role: Role::Tool as i32,
                    content: "{\"ok\":true}".into(),
                    metadata: BTreeMap::new(),
                    ..Default::default()
                },
                proto::NewMessage {
                    role: Role::System as i32,
                    content: "be brief".into(),
                    metadata: BTreeMap::new(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .messages;
    assert_eq!(
        batch.iter().map(|m| m.sequence).collect::<Vec<_>>(),
        [2, 3, 4]
    );
    assert_eq!(batch.iter().map(|m| m.role).collect::<Vec<_>>(), [2, 4, 3]);

    let after = conversation(&mut alice, &created.id).await;
    assert_eq!(after.message_count, 4);
    assert_eq!(micros(&after.update_time), micros(&batch[2].create_time));
    assert!(micros(&after.update_time) > micros(&created.update_time));

    let stored = all_messages(&mut alice, &created.id).await;
    assert_eq!(stored[0], first);
    assert_eq!(&stored[1..], &batch[..]);
    for pair in stored.windows(2) {
        assert_eq!(pair[1].sequence, pair[0].sequence + 1);
        assert!(micros(&pair[1].create_time) >= micros(&pair[0].create_time));
    }
}

#[tokio::test]
async fn create_time_never_decreases_even_when_update_time_is_ahead_of_the_clock() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let created = create(&mut alice, "skewed").await;
    append(&mut alice, &created.id, "before").await;
    // Another replica with a clock one hour ahead touched the conversation.
    app.db
        .run_sql(&format!(
            "UPDATE conversations SET update_time = now() + interval '1 hour' \
             WHERE user_id = 'alice' AND id = '{}'",
            created.id
        ))
        .await;
    let ahead = micros(&conversation(&mut alice, &created.id).await.update_time);
    let next = append(&mut alice, &created.id, "after").await;
    assert!(
        micros(&next.create_time) >= ahead,
        "create_time went back in time"
    );
}

#[tokio::test]
async fn a_batch_is_all_or_nothing() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let created = create(&mut alice, "atomic").await;
    append(&mut alice, &created.id, "one").await;

    // One invalid message rejects the whole batch before the database.
    let status = expect_invalid(
        alice
            .append_messages(AppendMessagesRequest {
                conversation_id: created.id.clone(),
                messages: vec![
                    user_message("fine"),
                    user_message(""),
                    user_message("also fine"),
                ],
                ..Default::default()
            })
            .await,
        "messages[1].content",
    );
    assert!(
        status.message().contains("messages[1].content"),
        "{}",
        status.message()
    );

    // A failure inside the database rolls back the rows already inserted.
    app.db
        .run_sql("ALTER TABLE messages ADD CONSTRAINT test_no_boom CHECK (content <> 'boom')")
        .await;
    let status = expect_code(
        alice
            .append_messages(AppendMessagesRequest {
                conversation_id: created.id.clone(),
                messages: vec![user_message("fine"), user_message("boom")],
                ..Default::default()
            })
            .await,
        Code::Internal,
    );
    assert_eq!(
        status.message(),
        "internal error",
        "no SQL reaches the client"
    );
    assert!(!status.message().contains("constraint"));
    assert_eq!(all_messages(&mut alice, &created.id).await.len(), 1);
    assert_eq!(conversation(&mut alice, &created.id).await.message_count, 1);
}

#[tokio::test]
async fn a_batch_holds_one_to_one_hundred_messages() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let created = create(&mut alice, "sizes").await;
    let batch = |n: usize| AppendMessagesRequest {
        conversation_id: created.id.clone(),
        messages: (0..n).map(|i| user_message(&format!("m{i}"))).collect(),
        ..Default::default()
    };
    expect_invalid(alice.append_messages(batch(0)).await, "messages");
    expect_invalid(alice.append_messages(batch(101)).await, "messages");
    let hundred = alice
        .append_messages(batch(100))
        .await
        .unwrap()
        .into_inner()
        .messages;
    assert_eq!(hundred.len(), 100);
    assert_eq!(hundred.last().unwrap().sequence, 100);
}

#[tokio::test]
async fn a_retried_append_returns_the_original_and_writes_nothing() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let created = create(&mut alice, "retries").await;
    let single = AppendMessageRequest {
        request_id: "turn-1-user".into(),
        ..request(&created.id, "question")
    };
    let original = alice
        .append_message(single.clone())
        .await
        .unwrap()
        .into_inner();
    append(&mut alice, &created.id, "something else").await;
    let retry = alice
        .append_message(single.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retry, original, "same id, sequence and time");

    let batch = AppendMessagesRequest {
        conversation_id: created.id.clone(),
        messages: vec![user_message("a"), user_message("b")],
        request_id: "batch-1".into(),
        expected_last_sequence: None,
    };
    let first = alice
        .append_messages(batch.clone())
        .await
        .unwrap()
        .into_inner();
    let again = alice
        .append_messages(batch.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, first);
    assert_eq!(conversation(&mut alice, &created.id).await.message_count, 4);
    assert_eq!(all_messages(&mut alice, &created.id).await.len(), 4);

    // The same key with another payload is refused, and writes nothing.
    let status = expect_code(
        alice
            .append_message(AppendMessageRequest {
                content: "different".into(),
                ..single.clone()
            })
            .await,
        Code::FailedPrecondition,
    );
    assert!(status.message().contains("request_id"));
    expect_code(
        alice
            .append_message(AppendMessageRequest {
                role: Role::Assistant as i32,
                ..single.clone()
            })
            .await,
        Code::FailedPrecondition,
    );
    expect_code(
        alice
            .append_message(AppendMessageRequest {
                metadata: BTreeMap::from([("k".to_string(), "v".to_string())]),
                ..single.clone()
            })
            .await,
        Code::FailedPrecondition,
    );
    expect_code(
        alice
            .append_messages(AppendMessagesRequest {
                messages: vec![user_message("a")],
                ..batch.clone()
            })
            .await,
        Code::FailedPrecondition,
    );
    assert_eq!(conversation(&mut alice, &created.id).await.message_count, 4);

    // Keys are per conversation: the same key elsewhere is a new append.
    let other = create(&mut alice, "other").await;
    let elsewhere = alice
        .append_message(AppendMessageRequest {
            conversation_id: other.id.clone(),
            ..single
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(elsewhere.sequence, 1);
    assert_ne!(elsewhere.id, original.id);
}

#[tokio::test]
async fn expected_last_sequence_guards_the_append() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let created = create(&mut alice, "guarded").await;
    let guarded = |expected: i64, content: &str| AppendMessageRequest {
        expected_last_sequence: Some(expected),
        ..request(&created.id, content)
    };
    assert_eq!(
        alice
            .append_message(guarded(0, "first"))
            .await
            .unwrap()
            .into_inner()
            .sequence,
        1
    );
    assert_eq!(
        alice
            .append_message(guarded(1, "second"))
            .await
            .unwrap()
            .into_inner()
            .sequence,
        2
    );
    let status = expect_code(
        alice.append_message(guarded(1, "stale")).await,
        Code::Aborted,
    );
    assert!(status.message().contains('2'), "{}", status.message());
    expect_code(
        alice.append_message(guarded(5, "ahead")).await,
        Code::Aborted,
    );
    expect_code(
        alice
            .append_messages(AppendMessagesRequest {
                conversation_id: created.id.clone(),
                messages: vec![user_message("x")],
                request_id: String::new(),
                expected_last_sequence: Some(0),
            })
            .await,
        Code::Aborted,
    );
    expect_invalid(
        alice.append_message(guarded(-1, "negative")).await,
        "expected_last_sequence",
    );
    assert_eq!(conversation(&mut alice, &created.id).await.message_count, 2);

    // A replay is recognised before the precondition: the retry of a call that
    // succeeded sees its success, although the expectation is now stale.
    let keyed = AppendMessageRequest {
        request_id: "k".into(),
        ..guarded(2, "third")
    };
    let original = alice
        .append_message(keyed.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        alice.append_message(keyed).await.unwrap().into_inner(),
        original
    );
}

#[tokio::test]
async fn append_validates_role_and_content() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let created = create(&mut alice, "validation").await;
    for role in [Role::Unspecified as i32, 6, -1] {
        expect_invalid(
            alice
                .append_message(AppendMessageRequest {
                    role,
                    ..request(&created.id, "x")
                })
                .await,
            "role",
        );
    }
    expect_invalid(
        alice.append_message(request(&created.id, "")).await,
        "content",
    );
    let status = expect_invalid(
        alice
            .append_message(request(&created.id, "nul \0 byte"))
            .await,
        "content",
    );
    assert!(status.message().contains("U+0000"), "{}", status.message());
    expect_invalid(
        alice
            .append_message(request(&created.id, &"x".repeat((1 << 20) + 1)))
            .await,
        "content",
    );
    let largest = alice
        .append_message(request(&created.id, &"x".repeat(1 << 20)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(largest.content.len(), 1 << 20);
    expect_invalid(
        alice.append_message(request("nope", "x")).await,
        "conversation_id",
    );
    expect_invalid(
        alice
            .append_message(AppendMessageRequest {
                request_id: "a b".into(),
                ..request(&created.id, "x")
            })
            .await,
        "request_id",
    );
    expect_code(
        alice
            .append_message(request(&uuid::Uuid::now_v7().to_string(), "x"))
            .await,
        Code::NotFound,
    );
    assert_eq!(conversation(&mut alice, &created.id).await.message_count, 1);
}

#[tokio::test]
async fn unicode_content_and_metadata_round_trip_exactly() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let created = create(&mut alice, "Ünïcödé 🌍").await;
    let large: String = "日本語のテキスト 🎉 مرحبا بالعالم שלום עולם "
        .chars()
        .cycle()
        .take(100 * 1024 / 2)
        .collect();
    assert!(large.len() >= 100 * 1024);
    let texts = [
        "emoji 👩‍👩‍👧‍👦🏳️‍🌈 and combining e\u{301}".to_string(),
        "中文，日本語，한국어".to_string(),
        "مرحبا بالعالم — שלום עולם".to_string(),
        "\u{202e}right-to-left override\u{202c} and zero\u{200b}width".to_string(),
        large,
    ];
    let metadata = BTreeMap::from([("ключ".to_string(), "値 🔑".to_string())]);
    for text in &texts {
        alice
            .append_message(AppendMessageRequest {
                metadata: metadata.clone(),
                ..request(&created.id, text)
            })
            .await
            .unwrap();
    }
    let listed = all_messages(&mut alice, &created.id).await;
    let resumed = alice
        .resume_conversation(ResumeConversationRequest {
            conversation_id: created.id.clone(),
            max_messages: 0,
        })
        .await
        .unwrap()
        .into_inner();
    for stored in [&listed, &resumed.messages] {
        let contents: Vec<_> = stored.iter().map(|m| m.content.clone()).collect();
        assert_eq!(contents, texts);
        assert!(stored.iter().all(|m| m.metadata == metadata));
    }
    assert_eq!(resumed.conversation.unwrap().title, "Ünïcödé 🌍");
}

#[tokio::test]
async fn list_messages_pages_forwards_and_backwards_without_gaps_or_repeats() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let created = create(&mut alice, "long").await;
    append_many(&mut alice, &created.id, 37).await;
    for newest_first in [false, true] {
        for after_sequence in [0, 5] {
            let mut expected: Vec<i64> = (after_sequence + 1..=37).collect();
            if newest_first {
                expected.reverse();
            }
            for page_size in [1, 4, 10, 32, 33, 50] {
                let mut seen = Vec::new();
                let mut token = String::new();
                loop {
                    let page = alice
                        .list_messages(ListMessagesRequest {
                            conversation_id: created.id.clone(),
                            page_size,
                            page_token: token,
                            after_sequence,
                            newest_first,
                        })
                        .await
                        .unwrap()
                        .into_inner();
                    assert!(page.messages.len() <= page_size as usize);
                    seen.extend(page.messages.iter().map(|m| m.sequence));
                    if page.next_page_token.is_empty() {
                        break;
                    }
                    token = page.next_page_token;
                    assert!(seen.len() <= 37);
                }
                assert_eq!(
                    seen, expected,
                    "newest_first={newest_first} after={after_sequence} size={page_size}"
                );
            }
        }
    }
    // Content follows sequence.
    let first = alice
        .list_messages(ListMessagesRequest {
            conversation_id: created.id.clone(),
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.messages[0].content, "m1");
    assert_eq!(first.messages[1].content, "m2");
}

#[tokio::test]
async fn list_messages_checks_its_arguments_and_tokens() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let created = create(&mut alice, "args").await;
    let empty = alice
        .list_messages(ListMessagesRequest {
            conversation_id: created.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(empty.messages.is_empty());
    assert_eq!(empty.next_page_token, "");

    append_many(&mut alice, &created.id, 1001).await;
    let list = |page_size: i32, page_token: String, newest_first: bool| ListMessagesRequest {
        conversation_id: created.id.clone(),
        page_size,
        page_token,
        after_sequence: 0,
        newest_first,
    };
    let default_page = alice
        .list_messages(list(0, String::new(), false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(default_page.messages.len(), 50);
    let clamped = alice
        .list_messages(list(5000, String::new(), false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(clamped.messages.len(), 1000);
    let rest = alice
        .list_messages(list(5000, clamped.next_page_token, false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        rest.messages.iter().map(|m| m.sequence).collect::<Vec<_>>(),
        [1001]
    );
    assert_eq!(rest.next_page_token, "");

    expect_invalid(
        alice.list_messages(list(-1, String::new(), false)).await,
        "page_size",
    );
    expect_invalid(
        alice
            .list_messages(ListMessagesRequest {
                after_sequence: -1,
                ..list(0, String::new(), false)
            })
            .await,
        "after_sequence",
    );
    // A token continues only its own listing, for its own user.
    let token = default_page.next_page_token;
    expect_invalid(
        alice.list_messages(list(0, token.clone(), true)).await,
        "page_token",
    );
    let other = create(&mut alice, "other").await;
    expect_invalid(
        alice
            .list_messages(ListMessagesRequest {
                conversation_id: other.id.clone(),
                ..list(0, token.clone(), false)
            })
            .await,
        "page_token",
    );
    expect_invalid(
        alice
            .list_messages(list(0, format!("{token}x"), false))
            .await,
        "page_token",
    );
    expect_invalid(
        app.client("bob")
            .list_messages(list(0, token.clone(), false))
            .await,
        "page_token",
    );
    let second = alice
        .list_messages(list(0, token, false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.messages[0].sequence, 51);

    expect_code(
        alice
            .list_messages(ListMessagesRequest {
                conversation_id: uuid::Uuid::now_v7().to_string(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
    );
}

#[tokio::test]
async fn resume_returns_the_latest_messages_oldest_first() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let created = create(&mut alice, "resume").await;
    let resume = |max_messages: i32| ResumeConversationRequest {
        conversation_id: created.id.clone(),
        max_messages,
    };

    let empty = alice
        .resume_conversation(resume(0))
        .await
        .unwrap()
        .into_inner();
    assert!(empty.messages.is_empty());
    assert!(!empty.has_more);
    assert_eq!(empty.conversation.unwrap().id, created.id);

    append_many(&mut alice, &created.id, 60).await;
    let default = alice
        .resume_conversation(resume(0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        default
            .messages
            .iter()
            .map(|m| m.sequence)
            .collect::<Vec<_>>(),
        (11..=60).collect::<Vec<_>>()
    );
    assert!(default.has_more);
    assert_eq!(default.conversation.as_ref().unwrap().message_count, 60);

    let ten = alice
        .resume_conversation(resume(10))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ten.messages.first().unwrap().sequence, 51);
    assert_eq!(ten.messages.last().unwrap().content, "m60");
    assert!(ten.has_more);

    let exact = alice
        .resume_conversation(resume(60))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(exact.messages.len(), 60);
    assert!(!exact.has_more, "no older message exists");
    let more_than_all = alice
        .resume_conversation(resume(61))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(more_than_all.messages.len(), 60);
    assert!(!more_than_all.has_more);

    append_many(&mut alice, &created.id, 1001).await;
    let clamped = alice
        .resume_conversation(resume(i32::MAX))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(clamped.messages.len(), 1000);
    assert_eq!(clamped.messages.last().unwrap().sequence, 1061);
    assert!(clamped.has_more);

    expect_invalid(alice.resume_conversation(resume(-1)).await, "max_messages");
    expect_invalid(
        alice
            .resume_conversation(ResumeConversationRequest {
                conversation_id: "x".into(),
                max_messages: 0,
            })
            .await,
        "conversation_id",
    );
    expect_code(
        alice
            .resume_conversation(ResumeConversationRequest {
                conversation_id: uuid::Uuid::now_v7().to_string(),
                max_messages: 0,
            })
            .await,
        Code::NotFound,
    );
}

/// Resume reads the conversation and its messages by position from one
/// statement; every field must come back as GetConversation and
/// ListMessages give it. Distinct numbers in every usage field and a fork
/// (so its source fields are set) catch two columns read in each other's place.
#[tokio::test]
async fn resume_returns_every_field_as_get_and_list_do() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let source = alice
        .create_conversation(proto::CreateConversationRequest {
            title: "source".to_owned(),
            metadata: BTreeMap::from([("team".to_owned(), "search".to_owned())]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for (n, content) in ["first", "second", "third"].into_iter().enumerate() {
        let n = n as i64;
        alice
            .append_message(AppendMessageRequest {
                metadata: BTreeMap::from([("n".to_owned(), n.to_string())]),
                name: format!("agent-{n}"),
                model: format!("model-{n}"),
                usage: Some(proto::Usage {
                    input_tokens: 100 + n,
                    output_tokens: 20 + n,
                    cached_input_tokens: 3 + n,
                    reasoning_tokens: 1 + n,
                }),
                ..request(&source.id, content)
            })
            .await
            .unwrap();
    }
    let fork = alice
        .fork_conversation(proto::ForkConversationRequest {
            conversation_id: source.id.clone(),
            up_to_sequence: 2,
            title: "fork".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    for id in [&source.id, &fork.id] {
        let resumed = alice
            .resume_conversation(ResumeConversationRequest {
                conversation_id: id.clone(),
                max_messages: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            resumed.conversation,
            Some(conversation(&mut alice, id).await)
        );
        assert_eq!(resumed.messages, all_messages(&mut alice, id).await);
    }
    let forked = conversation(&mut alice, &fork.id).await;
    assert_eq!(forked.forked_from_conversation_id, source.id);
    assert_eq!(forked.forked_at_sequence, 2);
    assert_eq!(
        forked.metadata,
        BTreeMap::from([("team".to_owned(), "search".to_owned())])
    );
    let usage = forked.usage.unwrap();
    assert_eq!(
        (
            usage.input_tokens,
            usage.output_tokens,
            usage.cached_input_tokens,
            usage.reasoning_tokens
        ),
        (201, 41, 7, 3)
    );
}
