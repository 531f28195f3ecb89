use std::collections::BTreeMap;

use convo::grpc::proto::{self, ForkConversationRequest, Role};
use tonic::Code;

use crate::helpers::{
    Client, TestApp, all_messages, append, create, expect_code, expect_invalid, micros,
};

async fn source_with_five_messages(client: &mut Client) -> proto::Conversation {
    let source = client
        .create_conversation(proto::CreateConversationRequest {
            title: "source".into(),
            metadata: BTreeMap::from([("project".to_string(), "apollo".to_string())]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for (i, role) in [
        Role::System,
        Role::User,
        Role::Assistant,
        Role::Tool,
        Role::User,
    ]
    .into_iter()
    .enumerate()
    {
        client
            .append_message(proto::AppendMessageRequest {
                conversation_id: source.id.clone(),
                role: role as i32,
                content: format!("message {}", i + 1),
                metadata: BTreeMap::from([("n".to_string(), (i + 1).to_string())]),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    source
}

#[tokio::test]
async fn fork_of_everything_copies_every_message_with_new_ids() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let source = source_with_five_messages(&mut alice).await;
    let original = all_messages(&mut alice, &source.id).await;

    let fork = alice
        .fork_conversation(ForkConversationRequest {
            conversation_id: source.id.clone(),
            up_to_sequence: 0,
            title: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(fork.id, source.id);
    assert_eq!(fork.user_id, "alice");
    assert_eq!(fork.title, "source", "the title defaults to the source's");
    assert_eq!(fork.metadata, source.metadata);
    assert_eq!(fork.message_count, 5);
    assert_eq!(fork.forked_from_conversation_id, source.id);
    assert_eq!(fork.forked_at_sequence, 5);
    assert_eq!(fork.create_time, fork.update_time);

    let copied = all_messages(&mut alice, &fork.id).await;
    assert_eq!(copied.len(), 5);
    for (copy, original) in copied.iter().zip(&original) {
        assert_ne!(copy.id, original.id, "copies get new ids");
        assert_eq!(
            uuid::Uuid::parse_str(&copy.id).unwrap().get_version_num(),
            7
        );
        assert_eq!(copy.conversation_id, fork.id);
        assert_eq!(
            (
                copy.sequence,
                copy.role,
                &copy.content,
                &copy.metadata,
                &copy.create_time
            ),
            (
                original.sequence,
                original.role,
                &original.content,
                &original.metadata,
                &original.create_time
            )
        );
    }
    // The source is untouched.
    assert_eq!(all_messages(&mut alice, &source.id).await, original);
    let source_now = alice
        .get_conversation(proto::GetConversationRequest {
            conversation_id: source.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(source_now, source_with_count(&source, 5, &source_now));
}

fn source_with_count(
    source: &proto::Conversation,
    count: i64,
    now: &proto::Conversation,
) -> proto::Conversation {
    proto::Conversation {
        message_count: count,
        update_time: now.update_time,
        ..source.clone()
    }
}

#[tokio::test]
async fn fork_of_a_prefix_continues_on_its_own() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let source = source_with_five_messages(&mut alice).await;
    let fork = alice
        .fork_conversation(ForkConversationRequest {
            conversation_id: source.id.clone(),
            up_to_sequence: 3,
            title: "what if".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fork.title, "what if");
    assert_eq!(fork.message_count, 3);
    assert_eq!(fork.forked_at_sequence, 3);
    let copied = all_messages(&mut alice, &fork.id).await;
    assert_eq!(
        copied
            .iter()
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>(),
        ["message 1", "message 2", "message 3"]
    );

    // The fork grows from 4; the source does not see it.
    let next = append(&mut alice, &fork.id, "a different turn").await;
    assert_eq!(next.sequence, 4);
    assert!(micros(&next.create_time) >= micros(&copied[2].create_time));
    assert_eq!(all_messages(&mut alice, &source.id).await.len(), 5);

    // Deleting the source leaves the fork whole, still naming its origin.
    alice
        .delete_conversation(proto::DeleteConversationRequest {
            conversation_id: source.id.clone(),
        })
        .await
        .unwrap();
    let survivor = alice
        .get_conversation(proto::GetConversationRequest {
            conversation_id: fork.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(survivor.forked_from_conversation_id, source.id);
    assert_eq!(all_messages(&mut alice, &fork.id).await.len(), 4);
}

#[tokio::test]
async fn fork_refuses_bad_bounds_foreign_sources_and_bad_titles() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let source = source_with_five_messages(&mut alice).await;
    let fork = |up_to_sequence: i64, title: &str| ForkConversationRequest {
        conversation_id: source.id.clone(),
        up_to_sequence,
        title: title.into(),
    };
    let status = expect_invalid(alice.fork_conversation(fork(6, "")).await, "up_to_sequence");
    assert!(
        status.message().contains("5 messages"),
        "{}",
        status.message()
    );
    expect_invalid(
        alice.fork_conversation(fork(-1, "")).await,
        "up_to_sequence",
    );
    expect_invalid(
        alice.fork_conversation(fork(0, &"t".repeat(257))).await,
        "title",
    );
    expect_code(
        app.client("bob").fork_conversation(fork(0, "")).await,
        Code::NotFound,
    );
    // Nothing was created by any refused fork.
    assert_eq!(
        app.db
            .count("SELECT count(*) AS n FROM conversations")
            .await,
        1
    );

    // A fork of an empty conversation, and the exact length, are fine.
    let empty = create(&mut alice, "empty").await;
    let empty_fork = alice
        .fork_conversation(ForkConversationRequest {
            conversation_id: empty.id,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(empty_fork.message_count, 0);
    assert_eq!(
        alice
            .fork_conversation(fork(5, ""))
            .await
            .unwrap()
            .into_inner()
            .message_count,
        5
    );
}

#[tokio::test]
async fn a_long_conversation_is_forked_in_one_statement() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let source = create(&mut alice, "long").await;
    crate::helpers::append_many(&mut alice, &source.id, 2500).await;
    let fork = alice
        .fork_conversation(ForkConversationRequest {
            conversation_id: source.id.clone(),
            up_to_sequence: 2400,
            title: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fork.message_count, 2400);
    let copied = format!(
        "SELECT count(*) AS n FROM messages WHERE conversation_id = '{}' AND sequence BETWEEN 1 AND 2400",
        fork.id
    );
    assert_eq!(app.db.count(&copied).await, 2400);
    let distinct_ids = format!(
        "SELECT count(DISTINCT id) AS n FROM messages WHERE conversation_id = '{}'",
        fork.id
    );
    assert_eq!(app.db.count(&distinct_ids).await, 2400);
}

#[tokio::test]
async fn a_fork_in_progress_does_not_hold_back_appends_to_its_source() {
    use diesel_async::SimpleAsyncConnection;
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let source = create(&mut alice, "busy").await;
    append(&mut alice, &source.id, "first").await;
    // Another session holds the lock a fork takes on its source, as a long
    // copy would.
    let mut fork = app.db.connect().await;
    fork.batch_execute(&format!(
        "BEGIN; SELECT 1 FROM conversations WHERE user_id = 'alice' AND id = '{}' FOR KEY SHARE",
        source.id
    ))
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let appended = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        append(&mut alice, &source.id, "during the fork"),
    )
    .await
    .expect("the append waited for the fork");
    assert_eq!(appended.sequence, 2);
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    fork.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test]
async fn a_long_fork_gives_every_copy_a_distinct_uuidv7() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let source = create(&mut alice, "long").await;
    crate::helpers::append_many(&mut alice, &source.id, 1000).await;
    let fork = alice
        .fork_conversation(ForkConversationRequest {
            conversation_id: source.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let copies = all_messages(&mut alice, &fork.id).await;
    assert_eq!(copies.len(), 1000);
    let ids: std::collections::HashSet<_> = copies.iter().map(|m| m.id.clone()).collect();
    assert_eq!(ids.len(), 1000, "distinct ids");
    for copy in &copies {
        let id = uuid::Uuid::parse_str(&copy.id).unwrap();
        assert_eq!(id.get_version_num(), 7, "{id}");
        assert_eq!(id.get_variant(), uuid::Variant::RFC4122, "{id}");
        assert_eq!(copy.id, id.hyphenated().to_string(), "canonical text");
    }
}
