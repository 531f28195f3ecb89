use convo::grpc::proto::{self, DeleteUserDataRequest};
use tonic::Code;

use crate::helpers::{TestApp, append, append_many, create, expect_code};

#[tokio::test]
async fn erasure_deletes_everything_of_the_caller_and_counts_it() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let mut bob = app.client("bob");
    let first = create(&mut alice, "first").await;
    let second = create(&mut alice, "second").await;
    create(&mut alice, "empty").await;
    append_many(&mut alice, &first.id, 7).await;
    alice
        .append_message(proto::AppendMessageRequest {
            conversation_id: second.id.clone(),
            role: proto::Role::User as i32,
            content: "keyed".into(),
            request_id: "k1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let bobs = create(&mut bob, "bob's").await;
    append(&mut bob, &bobs.id, "bob's words").await;

    let erased = alice
        .delete_user_data(DeleteUserDataRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(erased.conversations_deleted, 3);
    assert_eq!(erased.messages_deleted, 8);

    for table in ["users", "conversations", "messages", "append_requests"] {
        let left = format!("SELECT count(*) AS n FROM {table} WHERE user_id = 'alice'");
        assert_eq!(
            app.db.count(&left).await,
            0,
            "{table} still holds alice's rows"
        );
    }
    expect_code(
        alice
            .get_conversation(proto::GetConversationRequest {
                conversation_id: first.id.clone(),
            })
            .await,
        Code::NotFound,
    );
    assert!(
        alice
            .list_conversations(proto::ListConversationsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .conversations
            .is_empty()
    );

    let again = alice
        .delete_user_data(DeleteUserDataRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (again.conversations_deleted, again.messages_deleted),
        (0, 0)
    );

    // Bob is untouched.
    let resumed = bob
        .resume_conversation(proto::ResumeConversationRequest {
            conversation_id: bobs.id.clone(),
            max_messages: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resumed.messages.len(), 1);
    assert_eq!(app.db.count("SELECT count(*) AS n FROM users").await, 1);

    // Alice can start over; a reused request_id is a new key now.
    let fresh = create(&mut alice, "fresh start").await;
    assert_eq!(fresh.message_count, 0);
}

#[tokio::test]
async fn erasure_of_a_caller_with_no_data_returns_zeros() {
    let app = TestApp::spawn().await;
    let erased = app
        .client("nobody")
        .delete_user_data(DeleteUserDataRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (erased.conversations_deleted, erased.messages_deleted),
        (0, 0)
    );
    expect_code(
        app.client_with_header(None)
            .delete_user_data(DeleteUserDataRequest {})
            .await,
        Code::Unauthenticated,
    );
}

/// The codes a racing call may end with: done, or the data it named is gone.
/// Never INTERNAL (a deadlock or a foreign-key race surfacing).
#[track_caller]
fn settled<T>(result: Result<tonic::Response<T>, tonic::Status>, what: &str) {
    if let Err(status) = result {
        assert!(
            matches!(status.code(), tonic::Code::NotFound),
            "{what}: {status:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_races_creates_forks_and_appends_without_internal_errors() {
    let app = TestApp::spawn().await;
    for round in 0..15 {
        let mut racer = app.client("racer");
        let source = create(&mut racer, "source").await;
        for i in 0..3 {
            append(&mut racer, &source.id, &format!("m{i}")).await;
        }
        let erase = {
            let mut client = app.client("racer");
            tokio::spawn(async move {
                client
                    .delete_user_data(proto::DeleteUserDataRequest {})
                    .await
            })
        };
        let creates: Vec<_> = (0..3)
            .map(|i| {
                let mut client = app.client("racer");
                tokio::spawn(async move {
                    client
                        .create_conversation(proto::CreateConversationRequest {
                            title: format!("new {i}"),
                            ..Default::default()
                        })
                        .await
                })
            })
            .collect();
        let fork = {
            let mut client = app.client("racer");
            let id = source.id.clone();
            tokio::spawn(async move {
                client
                    .fork_conversation(proto::ForkConversationRequest {
                        conversation_id: id,
                        ..Default::default()
                    })
                    .await
            })
        };
        let appended = {
            let mut client = app.client("racer");
            let id = source.id.clone();
            tokio::spawn(async move {
                client
                    .append_message(proto::AppendMessageRequest {
                        conversation_id: id,
                        role: proto::Role::User as i32,
                        content: "late".into(),
                        ..Default::default()
                    })
                    .await
            })
        };
        settled(erase.await.unwrap(), &format!("round {round}: erasure"));
        for create in creates {
            settled(create.await.unwrap(), &format!("round {round}: create"));
        }
        settled(fork.await.unwrap(), &format!("round {round}: fork"));
        settled(appended.await.unwrap(), &format!("round {round}: append"));
        // Whatever was created after the erasure stays; erase it for the next round.
        racer
            .delete_user_data(proto::DeleteUserDataRequest {})
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_beside_the_retention_sweep_does_not_deadlock() {
    let policy = convo::retention::RetentionPolicy {
        idle_for: std::time::Duration::from_secs(3600),
        interval: std::time::Duration::from_millis(20),
        batch: 2,
    };
    let app = TestApp::spawn_with(|settings| settings.retention = Some(policy)).await;
    let _second_sweeper = app
        .spawn_replica_with(|settings| settings.retention = Some(policy))
        .await;
    for round in 0..8 {
        let mut user = app.client("sweepme");
        for i in 0..8 {
            let conversation = create(&mut user, &format!("idle {i}")).await;
            crate::helpers::append_many(&mut user, &conversation.id, 5).await;
        }
        // All of them idle at once: the sweepers and the erasure go for the
        // same rows.
        app.db
            .run_sql(
                "UPDATE conversations SET create_time = now() - interval '3 hours', \
                 update_time = now() - interval '2 hours' WHERE user_id = 'sweepme'",
            )
            .await;
        settled(
            user.delete_user_data(proto::DeleteUserDataRequest {}).await,
            &format!("round {round}: erasure"),
        );
        assert_eq!(
            app.db
                .count("SELECT count(*) AS n FROM conversations WHERE user_id = 'sweepme'")
                .await,
            0
        );
    }
}
