//! No answer is larger than the response limit (4 MiB by default, gRPC's
//! default client receive limit): a client with default settings can resume
//! and page through anything.

use std::collections::BTreeMap;

use convo::grpc::proto::{self, conversation_service_client::ConversationServiceClient};
use tonic::{service::interceptor::InterceptedService, transport::Channel};

use crate::helpers::{TestApp, UserHeader, create};

type DefaultClient = ConversationServiceClient<InterceptedService<Channel, UserHeader>>;

/// A client as a user gets it: tonic's default receive limit of 4 MiB.
fn default_client(app: &TestApp, user: &str) -> DefaultClient {
    ConversationServiceClient::with_interceptor(app.channel(), UserHeader::new(user))
}

/// 60 tool results of 100 KB each, the agent reading web pages.
async fn big_conversation(app: &TestApp) -> String {
    let mut alice = app.client("alice");
    let created = create(&mut alice, "reading").await;
    for batch in 0..6 {
        let messages = (0..10)
            .map(|i| proto::NewMessage {
                role: proto::Role::User as i32,
                content: format!("page {} zanzibar {}", batch * 10 + i, "w".repeat(100_000)),
                ..Default::default()
            })
            .collect();
        alice
            .append_messages(proto::AppendMessagesRequest {
                conversation_id: created.id.clone(),
                messages,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    created.id
}

#[tokio::test]
async fn a_default_client_resumes_a_conversation_larger_than_its_limit() {
    let app = TestApp::spawn().await;
    let id = big_conversation(&app).await;
    let resumed = default_client(&app, "alice")
        .resume_conversation(proto::ResumeConversationRequest {
            conversation_id: id,
            max_messages: 0,
        })
        .await
        .expect("the answer fits the default receive limit")
        .into_inner();
    let n = resumed.messages.len();
    assert!((30..50).contains(&n), "{n} of the newest messages fit");
    assert!(resumed.has_more);
    let sequences: Vec<i64> = resumed.messages.iter().map(|m| m.sequence).collect();
    assert_eq!(
        sequences,
        ((61 - n as i64)..=60).collect::<Vec<_>>(),
        "the newest, in order"
    );
}

#[tokio::test]
async fn a_default_client_pages_through_every_message_and_hit() {
    let app = TestApp::spawn().await;
    let id = big_conversation(&app).await;
    let mut client = default_client(&app, "alice");
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = client
            .list_messages(proto::ListMessagesRequest {
                conversation_id: id.clone(),
                page_size: 1000,
                page_token: token,
                ..Default::default()
            })
            .await
            .expect("every page fits")
            .into_inner();
        pages += 1;
        seen.extend(page.messages.iter().map(|m| m.sequence));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(seen, (1..=60).collect::<Vec<_>>());
    assert!(pages >= 2, "the page of 1,000 ended early");

    let mut hits = 0;
    let mut token = String::new();
    loop {
        let page = client
            .search_messages(proto::SearchMessagesRequest {
                query: "zanzibar".into(),
                page_size: 1000,
                page_token: token,
                ..Default::default()
            })
            .await
            .expect("every search page fits")
            .into_inner();
        hits += page.hits.len();
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(hits, 60);
}

#[tokio::test]
async fn a_default_client_pages_through_conversations_with_large_metadata() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let metadata: BTreeMap<String, String> = (0..16)
        .map(|i| (format!("key{i}"), "v".repeat(512)))
        .collect();
    for i in 0..500 {
        alice
            .create_conversation(proto::CreateConversationRequest {
                title: format!("c{i}"),
                metadata: metadata.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let mut client = default_client(&app, "alice");
    let (mut listed, mut pages, mut token) = (0, 0, String::new());
    loop {
        let page = client
            .list_conversations(proto::ListConversationsRequest {
                page_size: 1000,
                page_token: token,
            })
            .await
            .expect("every page fits")
            .into_inner();
        listed += page.conversations.len();
        pages += 1;
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(listed, 500);
    assert!(pages >= 2, "the page ended early");
}

/// A GetConversationRequest as bytes on the wire: field 1 may hold anything.
#[derive(Clone, PartialEq, prost::Message)]
struct RawGet {
    #[prost(bytes = "vec", tag = "1")]
    conversation_id: Vec<u8>,
}

#[tokio::test]
async fn a_request_that_cannot_be_decoded_is_invalid_argument() {
    let app = TestApp::spawn().await;
    let mut grpc = tonic::client::Grpc::new(app.channel());
    grpc.ready().await.unwrap();
    let mut request = tonic::Request::new(RawGet {
        conversation_id: vec![b'a', 0xff, 0xfe],
    });
    request
        .metadata_mut()
        .insert("x-user-id", "alice".parse().unwrap());
    let status = grpc
        .unary::<_, proto::Conversation, _>(
            request,
            http::uri::PathAndQuery::from_static("/convo.v1.ConversationService/GetConversation"),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .expect_err("invalid UTF-8 in a string field");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("UTF-8"), "{}", status.message());
}
