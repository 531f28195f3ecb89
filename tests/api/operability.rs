//! What an operator and an integrator expect: metrics, request ids and call
//! logs, retention, compression.

use std::time::Duration;

use convo::grpc::proto::{self, conversation_service_client::ConversationServiceClient};
use diesel_async::SimpleAsyncConnection;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    time::{Instant, sleep},
};
use tonic::{Request, codec::CompressionEncoding, transport::Channel};

use crate::{
    fault_harness::Proxy,
    helpers::{
        TestApp, UserHeader, append, append_many, assert_metric_at_least, channel_to, create,
        metric, spawn_appends, start_convo, stop_and_read_json_log, stop_and_read_log, watch,
        written_sequences,
    },
};

/// `convo serve` as a separate process with JSON logs, on the test's
/// database, and a channel to it once it serves.
async fn json_logging_server(database_url: &str) -> (tokio::process::Child, Channel) {
    let (server, addr) = start_convo(|command| {
        command.args(["--log-format", "json", "--database-url", database_url]);
    })
    .await;
    (server, channel_to(addr).await)
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to /metrics");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_calls_by_code_and_follow_pool_and_watchers() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics_addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let app =
        TestApp::spawn_alone_with(|settings| settings.metrics_addr = Some(metrics_addr)).await;
    let mut alice = app.client("alice");
    let created = create(&mut alice, "measured").await;
    let mut watch = watch(&mut alice, &created.id, 0).await;
    append(&mut alice, &created.id, "one").await;
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_stream::StreamExt::next(&mut watch),
    )
    .await;
    let _ = alice
        .get_conversation(proto::GetConversationRequest {
            conversation_id: uuid::Uuid::now_v7().to_string(),
        })
        .await;
    let _ = app
        .client_with_header(None)
        .list_conversations(proto::ListConversationsRequest::default())
        .await;
    sleep(Duration::from_millis(300)).await;

    let first = scrape(metrics_addr).await;
    let created_ok = r#"convo_rpc_requests_total{rpc="CreateConversation",code="Ok"}"#;
    assert_metric_at_least(&first, created_ok, 1.0);
    assert_metric_at_least(
        &first,
        r#"convo_rpc_requests_total{rpc="GetConversation",code="NotFound"}"#,
        1.0,
    );
    assert_metric_at_least(
        &first,
        r#"convo_rpc_requests_total{rpc="ListConversations",code="Unauthenticated"}"#,
        1.0,
    );
    assert!(
        first.contains(r#"convo_rpc_duration_seconds_bucket{rpc="AppendMessage""#),
        "{first}"
    );
    assert_metric_at_least(&first, "convo_pool_connections ", 1.0);
    assert_metric_at_least(&first, "convo_watch_streams ", 1.0);
    assert_metric_at_least(&first, "convo_notifications_received_total ", 1.0);

    // Counters move.
    let before = metric(&first, created_ok).unwrap();
    create(&mut alice, "another").await;
    let second = scrape(metrics_addr).await;
    // At least: the recorder is the process's, and other tests may create
    // conversations at the same moment.
    assert!(metric(&second, created_ok).unwrap() >= before + 1.0);
    drop(watch);

    // Three appends to a conversation whose row is held: two take their
    // turns (and wait in PostgreSQL), the third waits in the server, counted.
    let burst = create(&mut alice, "burst").await;
    let mut holder = app.db.hold_row("alice", &burst.id).await;
    let appends = spawn_appends(&app, "alice", &burst.id, 3);
    let waits = "convo_append_turn_waits_total ";
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&scrape(metrics_addr).await, waits).unwrap_or(0.0) < 1.0 {
        assert!(Instant::now() < deadline, "no append waited for its turn");
        sleep(Duration::from_millis(50)).await;
    }
    holder.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(written_sequences(appends).await, vec![1, 2, 3]);
}

#[tokio::test]
async fn request_ids_are_echoed_or_generated() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let mut request = Request::new(proto::CreateConversationRequest::default());
    request
        .metadata_mut()
        .insert("x-request-id", "orchestrator-turn-42".parse().unwrap());
    let response = alice.create_conversation(request).await.unwrap();
    assert_eq!(
        response.metadata().get("x-request-id").unwrap(),
        "orchestrator-turn-42"
    );

    let generated = alice
        .create_conversation(proto::CreateConversationRequest::default())
        .await
        .unwrap();
    let id = generated
        .metadata()
        .get("x-request-id")
        .expect("a generated request id")
        .to_str()
        .unwrap();
    assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");

    // Failed calls carry it too.
    let mut request = Request::new(proto::GetConversationRequest {
        conversation_id: "bad".into(),
    });
    request
        .metadata_mut()
        .insert("x-request-id", "r-err".parse().unwrap());
    let status = alice.get_conversation(request).await.unwrap_err();
    assert_eq!(status.metadata().get("x-request-id").unwrap(), "r-err");
}

/// The text log read from a pipe, as a log collector or a file gets it: plain
/// text without terminal colour codes, and every line written before the
/// server exits, the last calls' too (a thread of its own writes them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_text_log_is_plain_and_complete_when_stderr_is_not_a_terminal() {
    let app = TestApp::spawn().await;
    let (mut server, addr) = start_convo(|command| {
        command
            .args(["--database-url", &app.db.url])
            .env_remove("NO_COLOR");
    })
    .await;
    let mut client =
        ConversationServiceClient::with_interceptor(channel_to(addr).await, UserHeader::new("bob"));
    for _ in 0..20 {
        client
            .create_conversation(proto::CreateConversationRequest::default())
            .await
            .unwrap();
    }
    let log = stop_and_read_log(&mut server).await;
    assert!(!log.contains('\x1b'), "colour codes in a piped log:\n{log}");
    let calls = log
        .lines()
        .filter(|line| line.contains(r#"rpc="CreateConversation""#) && line.contains(" call "))
        .count();
    assert_eq!(calls, 20, "one line per call, all written:\n{log}");
    assert!(log.contains("server stopped"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_call_logs_one_json_line_without_content() {
    let app = TestApp::spawn().await;
    let (mut server, channel) = json_logging_server(&app.db.url).await;
    let mut client = ConversationServiceClient::with_interceptor(channel, UserHeader::new("alice"));
    let created = client
        .create_conversation(proto::CreateConversationRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut request = Request::new(proto::AppendMessageRequest {
        conversation_id: created.id.clone(),
        role: proto::Role::User as i32,
        content: "SECRET-CONTENT".into(),
        metadata: [("k".to_string(), "SECRET-METADATA".to_string())].into(),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("x-request-id", "trace-me".parse().unwrap());
    client.append_message(request).await.unwrap();

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut log = String::new();
    server
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .await
        .unwrap();
    assert!(server.wait().await.unwrap().success());
    assert!(
        !log.contains("SECRET"),
        "content or metadata values reached the log:\n{log}"
    );
    let calls: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["message"] == "call")
        .collect();
    assert_eq!(calls.len(), 2, "one line per call:\n{log}");
    let append_line = calls
        .iter()
        .find(|line| line["span"]["rpc"] == "AppendMessage")
        .unwrap_or_else(|| panic!("no AppendMessage line:\n{log}"));
    assert_eq!(append_line["span"]["request_id"], "trace-me");
    assert_eq!(append_line["span"]["user_id"], "alice");
    assert_eq!(append_line["span"]["conversation_id"], created.id.as_str());
    assert_eq!(append_line["code"], "Ok");
    assert!(
        append_line["duration_ms"].as_f64().is_some(),
        "{append_line}"
    );
    // In whole microseconds: no float noise for a person to read past.
    let written = append_line["duration_ms"].to_string();
    let decimals = written.split_once('.').map_or(0, |(_, d)| d.len());
    assert!(decimals <= 3, "{written}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_idle_conversations_in_batches_from_several_replicas() {
    let policy = convo::retention::RetentionPolicy {
        idle_for: Duration::from_secs(3600),
        interval: Duration::from_millis(100),
        batch: 3,
    };
    let app = TestApp::spawn_with(|settings| settings.retention = Some(policy)).await;
    let mut alice = app.client("alice");
    let fresh = create(&mut alice, "fresh").await;
    append(&mut alice, &fresh.id, "still talking").await;
    let mut idle = Vec::new();
    for i in 0..10 {
        let conversation = create(&mut alice, &format!("idle {i}")).await;
        append_many(&mut alice, &conversation.id, 3).await;
        idle.push(conversation.id);
    }
    let _second_sweeper = app
        .spawn_replica_with(|settings| settings.retention = Some(policy))
        .await;
    // Ten conversations fall idle two hours ago.
    app.db
        .run_sql(
            "UPDATE conversations SET create_time = now() - interval '3 hours', \
             update_time = now() - interval '2 hours' WHERE title LIKE 'idle %'",
        )
        .await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while app
        .db
        .count("SELECT count(*) AS n FROM conversations")
        .await
        > 1
    {
        assert!(
            Instant::now() < deadline,
            "the idle conversations were not swept"
        );
        sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        app.db.count("SELECT count(*) AS n FROM messages").await,
        1,
        "their messages went too"
    );
    let kept = alice
        .get_conversation(proto::GetConversationRequest {
            conversation_id: fresh.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kept.message_count, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_are_compressed_for_clients_that_accept_it() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let created = create(&mut alice, "long resume").await;
    append_many(&mut alice, &created.id, 1000).await;

    // Count the bytes the server sends, through a proxy in front of it.
    let proxy = Proxy::start(app.addr()).await;
    let mut sizes = Vec::new();
    for encoding in [
        None,
        Some(CompressionEncoding::Gzip),
        Some(CompressionEncoding::Zstd),
    ] {
        let channel = Channel::from_shared(format!("http://{}", proxy.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client =
            ConversationServiceClient::with_interceptor(channel, UserHeader::new("alice"))
                .max_decoding_message_size(usize::MAX);
        if let Some(encoding) = encoding {
            client = client.accept_compressed(encoding).send_compressed(encoding);
        }
        let before = proxy.bytes_to_client();
        let resumed = client
            .resume_conversation(proto::ResumeConversationRequest {
                conversation_id: created.id.clone(),
                max_messages: 1000,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resumed.messages.len(), 1000);
        sleep(Duration::from_millis(100)).await;
        sizes.push((encoding, proxy.bytes_to_client() - before));
    }
    println!("bytes on the wire for a 1,000-message resume: {sizes:?}");
    let plain = sizes[0].1;
    for (encoding, bytes) in &sizes[1..] {
        assert!(
            *bytes * 3 < plain,
            "{encoding:?}: {bytes} bytes, uncompressed {plain}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_its_client_abandons_is_logged_and_counted_as_cancelled() {
    use diesel_async::SimpleAsyncConnection;
    let app = TestApp::spawn().await;
    let (mut server, channel) = json_logging_server(&app.db.url).await;
    let mut client = ConversationServiceClient::with_interceptor(channel, UserHeader::new("alice"));
    let created = client
        .create_conversation(proto::CreateConversationRequest::default())
        .await
        .unwrap()
        .into_inner();
    // The append waits for a row lock another session holds; its client
    // gives up after 300 ms.
    let mut holder = app.db.hold_row("alice", &created.id).await;
    let mut request = Request::new(proto::AppendMessageRequest {
        conversation_id: created.id.clone(),
        role: proto::Role::User as i32,
        content: "waiting".into(),
        ..Default::default()
    });
    request.set_timeout(Duration::from_millis(300));
    let status = client.append_message(request).await.unwrap_err();
    assert!(
        matches!(
            status.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{status:?}"
    );
    sleep(Duration::from_millis(300)).await;
    holder.batch_execute("ROLLBACK").await.unwrap();

    let log = stop_and_read_json_log(&mut server).await;
    let cancelled: Vec<&serde_json::Value> = log
        .iter()
        .filter(|line| line["code"] == "Cancelled")
        .collect();
    assert_eq!(
        cancelled.len(),
        1,
        "one line for the abandoned call: {log:?}"
    );
    let line = &cancelled[0];
    assert_eq!(line["span"]["rpc"], "AppendMessage", "{line}");
    assert_eq!(line["span"]["conversation_id"], created.id.as_str());
    let duration = line["duration_ms"].as_f64().unwrap_or_default();
    assert!((250.0..5000.0).contains(&duration), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_is_logged_with_the_status_it_ended_with() {
    let app = TestApp::spawn().await;
    let (mut server, channel) = json_logging_server(&app.db.url).await;
    let mut client = ConversationServiceClient::with_interceptor(channel, UserHeader::new("alice"));
    let created = client
        .create_conversation(proto::CreateConversationRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut stream = client
        .watch_conversation(proto::WatchConversationRequest {
            conversation_id: created.id.clone(),
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    client
        .delete_conversation(proto::DeleteConversationRequest {
            conversation_id: created.id.clone(),
        })
        .await
        .unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("the stream ends")
        .expect_err("with a status");
    assert_eq!(end.code(), tonic::Code::NotFound);

    let log = stop_and_read_json_log(&mut server).await;
    let watch: Vec<&serde_json::Value> = log
        .iter()
        .filter(|line| line["span"]["rpc"] == "WatchConversation" && line["code"].is_string())
        .collect();
    assert_eq!(watch.len(), 1, "one line for the watch: {log:?}");
    assert_eq!(watch[0]["code"], "NotFound", "{}", watch[0]);
}
