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
