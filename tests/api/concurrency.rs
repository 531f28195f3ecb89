use std::collections::HashSet;

use convo::grpc::proto::{self, AppendMessageRequest, Role};
use diesel_async::SimpleAsyncConnection;

use crate::helpers::{TestApp, all_messages, create, micros};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appenders_never_share_or_skip_a_sequence() {
    const APPENDERS: usize = 64;
    const EACH: usize = 4;
    let app = TestApp::spawn().await;
    let created = create(&mut app.client("alice"), "busy").await;
    let tasks: Vec<_> = (0..APPENDERS)
        .map(|worker| {
            let mut client = app.client("alice");
            let id = created.id.clone();
            tokio::spawn(async move {
                let mut sequences = Vec::new();
                for i in 0..EACH {
                    let message = client
                        .append_message(AppendMessageRequest {
                            conversation_id: id.clone(),
                            role: Role::User as i32,
                            content: format!("worker {worker} message {i}"),
                            request_id: format!("w{worker}-{i}"),
                            ..Default::default()
                        })
                        .await
                        .expect("append under contention")
                        .into_inner();
                    sequences.push(message.sequence);
                }
                sequences
            })
        })
        .collect();
    let mut acknowledged = Vec::new();
    for task in tasks {
        let sequences = task.await.unwrap();
        // One appender's own messages come out in the order it sent them.
        assert!(sequences.windows(2).all(|w| w[0] < w[1]));
        acknowledged.extend(sequences);
    }
    let total = (APPENDERS * EACH) as i64;
    acknowledged.sort_unstable();
    assert_eq!(
        acknowledged,
        (1..=total).collect::<Vec<_>>(),
        "every sequence exactly once"
    );

    let stored = all_messages(&mut app.client("alice"), &created.id).await;
    assert_eq!(
        stored.iter().map(|m| m.sequence).collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>()
    );
    assert_eq!(
        stored
            .iter()
            .map(|m| m.id.as_str())
            .collect::<HashSet<_>>()
            .len(),
        stored.len()
    );
    assert!(
        stored
            .windows(2)
            .all(|w| micros(&w[0].create_time) <= micros(&w[1].create_time))
    );
    let conversation = app
        .client("alice")
        .get_conversation(proto::GetConversationRequest {
            conversation_id: created.id,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(conversation.message_count, total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retries_of_one_request_write_it_once() {
    let app = TestApp::spawn().await;
    let created = create(&mut app.client("alice"), "retry storm").await;
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let mut client = app.client("alice");
            let id = created.id.clone();
            tokio::spawn(async move {
                client
                    .append_message(AppendMessageRequest {
                        conversation_id: id,
                        role: Role::Assistant as i32,
                        content: "the one answer".into(),
                        request_id: "turn-7-assistant".into(),
                        ..Default::default()
                    })
                    .await
                    .expect("every retry succeeds")
                    .into_inner()
            })
        })
        .collect();
    let mut replies = Vec::new();
    for task in tasks {
        replies.push(task.await.unwrap());
    }
    assert!(
        replies.iter().all(|m| *m == replies[0]),
        "all retries see the same message"
    );
    assert_eq!(replies[0].sequence, 1);
    assert_eq!(app.db.count("SELECT count(*) AS n FROM messages").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_with_one_request_id_create_once() {
    let app = TestApp::spawn().await;
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let mut client = app.client("alice");
            tokio::spawn(async move {
                client
                    .create_conversation(proto::CreateConversationRequest {
                        title: "once".into(),
                        request_id: "create-once".into(),
                        ..Default::default()
                    })
                    .await
                    .expect("every retry succeeds")
                    .into_inner()
                    .id
            })
        })
        .collect();
    let mut ids = HashSet::new();
    for task in tasks {
        ids.insert(task.await.unwrap());
    }
    assert_eq!(ids.len(), 1);
    assert_eq!(
        app.db
            .count("SELECT count(*) AS n FROM conversations")
            .await,
        1
    );
}

/// A retry that reaches the database while the first create is still
/// committing waits for it on the request_id's key, and then returns the
/// conversation the first made: it committed after the retry's statement
/// began, so the retry reads it in a statement of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_retried_while_the_first_commits_returns_the_first() {
    let app = TestApp::spawn().await;
    let first_id = "0190f5a8-0000-7000-8000-000000000001";
    let mut first = app.db.connect().await;
    first
        .batch_execute(&format!(
            "BEGIN; \
             INSERT INTO users (user_id) VALUES ('alice'); \
             INSERT INTO conversations (user_id, id, title, request_id, create_time, update_time) \
             VALUES ('alice', '{first_id}', 'first', 'create-race', now(), now())"
        ))
        .await
        .expect("the first create, not yet committed");

    let mut alice = app.client("alice");
    let retry = tokio::spawn(async move {
        alice
            .create_conversation(proto::CreateConversationRequest {
                title: "retry".into(),
                request_id: "create-race".into(),
                ..Default::default()
            })
            .await
    });
    app.db
        .until_waiting_for_a_lock(1, "the retry never waited for the first create")
        .await;
    first
        .batch_execute("COMMIT")
        .await
        .expect("commit the first");

    let created = retry
        .await
        .unwrap()
        .expect("the retry succeeds")
        .into_inner();
    assert_eq!(created.id, first_id);
    assert_eq!(created.title, "first");
    assert_eq!(
        app.db
            .count("SELECT count(*) AS n FROM conversations")
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_expecting_one_last_sequence_let_exactly_one_through() {
    const RACERS: usize = 16;
    let app = TestApp::spawn().await;
    let created = create(&mut app.client("alice"), "one wins").await;
    for round in 0..4i64 {
        let tasks: Vec<_> = (0..RACERS)
            .map(|racer| {
                let mut client = app.client("alice");
                let id = created.id.clone();
                tokio::spawn(async move {
                    client
                        .append_message(AppendMessageRequest {
                            conversation_id: id,
                            role: Role::User as i32,
                            content: format!("round {round} racer {racer}"),
                            expected_last_sequence: Some(round),
                            ..Default::default()
                        })
                        .await
                })
            })
            .collect();
        let mut won = 0;
        for task in tasks {
            match task.await.unwrap() {
                Ok(message) => {
                    won += 1;
                    assert_eq!(message.into_inner().sequence, round + 1);
                }
                Err(status) => {
                    assert_eq!(status.code(), tonic::Code::Aborted, "{status:?}");
                    // The refusal names where the conversation really is,
                    // never the position the caller expected.
                    assert!(
                        status
                            .message()
                            .contains(&format!("last sequence is {}", round + 1)),
                        "{status:?}"
                    );
                }
            }
        }
        assert_eq!(won, 1, "round {round}: exactly one append expected {round}");
    }
    assert_eq!(app.db.count("SELECT count(*) AS n FROM messages").await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_uses_of_one_tool_call_id_let_exactly_one_through() {
    use proto::{Part, part::Kind};
    const RACERS: usize = 12;
    let app = TestApp::spawn().await;
    let created = create(&mut app.client("alice"), "one call id").await;
    let tasks: Vec<_> = (0..RACERS)
        .map(|racer| {
            let mut client = app.client("alice");
            let id = created.id.clone();
            tokio::spawn(async move {
                client
                    .append_message(AppendMessageRequest {
                        conversation_id: id,
                        role: Role::Assistant as i32,
                        parts: vec![Part {
                            kind: Some(Kind::ToolCall(proto::ToolCall {
                                id: "call_shared".into(),
                                name: "lookup".into(),
                                arguments: format!("{{\"racer\":{racer}}}"),
                            })),
                            signature: Vec::new(),
                        }],
                        ..Default::default()
                    })
                    .await
            })
        })
        .collect();
    let mut won = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => won += 1,
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
                assert!(status.message().contains("call_shared"), "{status:?}");
            }
        }
    }
    assert_eq!(won, 1);
    assert_eq!(
        app.db.count("SELECT count(*) AS n FROM tool_calls").await,
        1
    );
    assert_eq!(app.db.count("SELECT count(*) AS n FROM messages").await, 1);
}
