//! Identity and ownership over every RPC of the service: no identity, no
//! call; someone else's conversation is indistinguishable from none.

use convo::grpc::proto::{self, FILE_DESCRIPTOR_SET};
use prost::Message as _;
use prost_types::{FieldMask, FileDescriptorSet};
use tonic::{Code, Status, metadata::AsciiMetadataValue};

use crate::helpers::{Client, TestApp, append, create, expect_code};

/// Every RPC of convo.v1.ConversationService, read from the descriptor the
/// server was built from: a new RPC joins these tests (and fails them until
/// [`call`] knows it).
fn rpc_names() -> Vec<String> {
    let set = FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).expect("descriptor set");
    set.file
        .iter()
        .flat_map(|file| &file.service)
        .filter(|service| service.name() == "ConversationService")
        .flat_map(|service| service.method.iter().map(|m| m.name().to_owned()))
        .collect()
}

/// Calls `rpc` with a well-formed request aimed at `conversation_id`.
/// Returns the response as text, to look for what must not be in it.
async fn call(client: &mut Client, rpc: &str, conversation_id: &str) -> Result<String, Status> {
    let id = conversation_id.to_owned();
    match rpc {
        "CreateConversation" => client
            .create_conversation(proto::CreateConversationRequest::default())
            .await
            .map(|response| format!("{:?}", response.into_inner())),
        "GetConversation" => client
            .get_conversation(proto::GetConversationRequest {
                conversation_id: id,
            })
            .await
            .map(|response| format!("{:?}", response.into_inner())),
        "ListConversations" => client
            .list_conversations(proto::ListConversationsRequest::default())
            .await
            .map(|response| format!("{:?}", response.into_inner())),
        "UpdateConversation" => client
            .update_conversation(proto::UpdateConversationRequest {
                conversation_id: id,
                title: "taken over".into(),
                metadata: Default::default(),
                update_mask: Some(FieldMask {
                    paths: vec!["title".into()],
                }),
            })
            .await
            .map(|response| format!("{:?}", response.into_inner())),
        "DeleteConversation" => client
            .delete_conversation(proto::DeleteConversationRequest {
                conversation_id: id,
            })
            .await
            .map(|response| format!("{:?}", response.into_inner())),
        "AppendMessage" => client
            .append_message(proto::AppendMessageRequest {
                conversation_id: id,
                role: proto::Role::User as i32,
                content: "intrusion".into(),
                ..Default::default()
            })
            .await
            .map(|response| format!("{:?}", response.into_inner())),
        "AppendMessages" => client
            .append_messages(proto::AppendMessagesRequest {
                conversation_id: id,
                messages: vec![crate::helpers::user_message("intrusion")],
                ..Default::default()
            })
            .await
            .map(|response| format!("{:?}", response.into_inner())),
        "ListMessages" => client
            .list_messages(proto::ListMessagesRequest {
                conversation_id: id,
                ..Default::default()
            })
            .await
            .map(|response| format!("{:?}", response.into_inner())),
        "ResumeConversation" => client
            .resume_conversation(proto::ResumeConversationRequest {
                conversation_id: id,
                max_messages: 0,
            })
            .await
            .map(|response| format!("{:?}", response.into_inner())),
        "WatchConversation" => {
            // The call itself fails for a bad identity or a foreign
            // conversation: nothing is streamed first.
            let mut stream = client
                .watch_conversation(proto::WatchConversationRequest {
                    conversation_id: id,
                    after_sequence: 0,
                })
                .await?
                .into_inner();
            let first =
                tokio::time::timeout(std::time::Duration::from_secs(5), stream.message()).await;
            Ok(format!("{first:?}"))
        }
        "ForkConversation" => client
            .fork_conversation(proto::ForkConversationRequest {
                conversation_id: id,
                ..Default::default()
            })
            .await
            .map(|response| format!("{:?}", response.into_inner())),
        "SearchMessages" => client
            .search_messages(proto::SearchMessagesRequest {
                query: "private".into(),
                conversation_id: id,
                ..Default::default()
            })
            .await
            .map(|response| format!("{:?}", response.into_inner())),
        "DeleteUserData" => client
            .delete_user_data(proto::DeleteUserDataRequest {})
            .await
            .map(|response| format!("{:?}", response.into_inner())),
        "TruncateConversation" => client
            .truncate_conversation(proto::TruncateConversationRequest {
                conversation_id: id,
                ..Default::default()
            })
            .await
            .map(|response| format!("{:?}", response.into_inner())),
        other => panic!("the identity tests do not know the RPC {other}: add it to `call`"),
    }
}

/// RPCs that address one conversation and must refuse someone else's.
/// (SearchMessages only filters by one: a foreign id finds nothing, exactly as
/// a missing one does.)
fn targets_a_conversation(rpc: &str) -> bool {
    !matches!(
        rpc,
        "CreateConversation" | "ListConversations" | "SearchMessages" | "DeleteUserData"
    )
}

#[tokio::test]
async fn the_descriptor_lists_every_rpc_of_the_contract() {
    let names = rpc_names();
    for rpc in [
        "CreateConversation",
        "GetConversation",
        "ListConversations",
        "UpdateConversation",
        "DeleteConversation",
        "AppendMessage",
        "AppendMessages",
        "ListMessages",
        "ResumeConversation",
        "WatchConversation",
        "ForkConversation",
        "SearchMessages",
        "DeleteUserData",
        "TruncateConversation",
    ] {
        assert!(
            names.iter().any(|n| n == rpc),
            "{rpc} missing from {names:?}"
        );
    }
}

#[tokio::test]
async fn every_rpc_without_a_valid_identity_is_unauthenticated() {
    let app = TestApp::spawn().await;
    let owned = create(&mut app.client("alice"), "private").await;
    let non_ascii = AsciiMetadataValue::try_from(&b"caf\xc3\xa9"[..]).ok();
    let mut identities: Vec<(&str, Option<AsciiMetadataValue>)> = vec![
        ("missing", None),
        ("empty", Some(AsciiMetadataValue::from_static(""))),
        (
            "with a space",
            Some(AsciiMetadataValue::from_static("al ice")),
        ),
        (
            "with a tab",
            Some(AsciiMetadataValue::from_static("al\tice")),
        ),
        ("129 bytes", Some("x".repeat(129).parse().unwrap())),
    ];
    if non_ascii.is_some() {
        identities.push(("non-ASCII", non_ascii));
    }
    for rpc in rpc_names() {
        for (what, header) in &identities {
            let mut client = app.client_with_header(header.clone());
            let status = call(&mut client, &rpc, &owned.id)
                .await
                .expect_err("must be refused");
            assert_eq!(
                status.code(),
                Code::Unauthenticated,
                "{rpc} with {what} x-user-id: {status:?}"
            );
            assert!(
                status.message().contains("x-user-id"),
                "{rpc}: {}",
                status.message()
            );
        }
    }
    // Nothing was created or changed by any refused call.
    assert_eq!(
        app.db
            .count("SELECT count(*) AS n FROM conversations")
            .await,
        1
    );
    assert_eq!(app.db.count("SELECT count(*) AS n FROM messages").await, 0);
}

#[tokio::test]
async fn another_users_conversation_is_indistinguishable_from_a_missing_one() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let owned = create(&mut alice, "alice's secret").await;
    append(&mut alice, &owned.id, "private words").await;
    let before = alice
        .resume_conversation(proto::ResumeConversationRequest {
            conversation_id: owned.id.clone(),
            max_messages: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let missing = uuid::Uuid::now_v7().to_string();
    let mut bob = app.client("bob");
    for rpc in rpc_names()
        .into_iter()
        .filter(|rpc| targets_a_conversation(rpc))
    {
        let foreign = call(&mut bob, &rpc, &owned.id)
            .await
            .expect_err("bob must not reach alice's conversation");
        let absent = call(&mut bob, &rpc, &missing)
            .await
            .expect_err("a missing conversation");
        assert_eq!(foreign.code(), Code::NotFound, "{rpc}: {foreign:?}");
        assert_eq!(foreign.code(), absent.code(), "{rpc}");
        assert_eq!(foreign.message(), absent.message(), "{rpc}");
        assert!(!foreign.message().contains(&owned.id));
    }
    // Bob's listing shows nothing of alice's; alice's data is untouched.
    let bobs = bob
        .list_conversations(proto::ListConversationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(bobs.conversations.is_empty());
    // Bob erasing his data erases none of alice's.
    call(&mut bob, "DeleteUserData", "")
        .await
        .expect("bob erases his own data");
    let after = alice
        .resume_conversation(proto::ResumeConversationRequest {
            conversation_id: owned.id.clone(),
            max_messages: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after, before);
}

#[tokio::test]
async fn user_ids_are_exact_and_case_sensitive() {
    let app = TestApp::spawn().await;
    let owned = create(&mut app.client("Alice"), "case").await;
    expect_code(
        app.client("alice")
            .get_conversation(proto::GetConversationRequest {
                conversation_id: owned.id.clone(),
            })
            .await,
        Code::NotFound,
    );
    let longest = "u".repeat(128);
    let created = create(&mut app.client(&longest), "long id").await;
    assert_eq!(created.user_id, longest);
    assert_eq!(
        create(&mut app.client("!~#$%&'*+-.^_`|"), "symbols")
            .await
            .user_id,
        "!~#$%&'*+-.^_`|"
    );
}

/// Every RPC × {owner, another user}: the owner is served; anything another
/// user gets back (a body, an error message, its details or metadata) holds
/// no byte of the owner's data. (No identity and malformed identities are
/// covered above.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tenancy_matrix_holds_for_every_rpc() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let owned = alice
        .create_conversation(proto::CreateConversationRequest {
            title: "alice's secret title".into(),
            metadata: [("label".to_string(), "secret metadata value".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    append(&mut alice, &owned.id, "private words").await;
    let secrets = [
        owned.id.as_str(),
        "alice's secret title",
        "secret metadata value",
        "private words",
        "alice",
    ];

    let mut bob = app.client("bob");
    for rpc in rpc_names() {
        let seen = match call(&mut bob, &rpc, &owned.id).await {
            Ok(body) => body,
            Err(status) => format!(
                "{} {:?} {:?}",
                status.message(),
                status.details(),
                status.metadata()
            ),
        };
        for secret in secrets {
            assert!(
                !seen.contains(secret),
                "{rpc} showed bob {secret:?}: {seen}"
            );
        }
    }

    // The owner is served by every RPC; the destructive ones go last, on a
    // conversation of their own.
    let destructive = ["DeleteConversation", "DeleteUserData"];
    for rpc in rpc_names()
        .into_iter()
        .filter(|rpc| !destructive.contains(&rpc.as_str()))
    {
        let served = call(&mut alice, &rpc, &owned.id).await;
        assert!(served.is_ok(), "{rpc} refused the owner: {served:?}");
    }
    let doomed = create(&mut alice, "doomed").await;
    for rpc in destructive {
        let served = call(&mut alice, rpc, &doomed.id).await;
        assert!(served.is_ok(), "{rpc} refused the owner: {served:?}");
    }
}
