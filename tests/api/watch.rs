//! WatchConversation: backlog then live messages, across replicas, through a
//! lost listener connection, and to the end of the conversation.

use std::time::Duration;

use convo::grpc::proto::{self, AppendMessagesRequest, WatchConversationRequest};
use tokio_stream::StreamExt;
use tonic::{Code, Status, Streaming};

use crate::helpers::{
    TestApp, append, append_many, create, expect_code, expect_invalid, user_message, watch,
};

const PATIENCE: Duration = Duration::from_secs(20);

/// The next item of the stream, failing the test if none comes in time.
async fn next(stream: &mut Streaming<proto::Message>) -> Result<proto::Message, Status> {
    tokio::time::timeout(PATIENCE, stream.next())
        .await
        .expect("the stream went quiet")
        .expect("the stream ended without a status")
}

/// Reads until `last` and checks that the sequences run `first..=last`.
async fn expect_sequences(
    stream: &mut Streaming<proto::Message>,
    first: i64,
    last: i64,
) -> Vec<proto::Message> {
    let mut received = Vec::new();
    for expected in first..=last {
        let message = next(stream).await.expect("a message");
        assert_eq!(message.sequence, expected, "gap or duplicate in the stream");
        received.push(message);
    }
    received
}

/// Ends the private listener session of every replica on this database.
async fn kill_listeners(app: &TestApp) {
    app.db
        .admin(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = '{}' AND application_name = 'convo-listener'",
            app.db.name
        ))
        .await;
}

async fn listener_count(app: &TestApp) -> i64 {
    app.db
        .count_admin(&format!(
            "SELECT count(*) AS n FROM pg_stat_activity \
             WHERE datname = '{}' AND application_name = 'convo-listener'",
            app.db.name
        ))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_the_backlog_then_each_new_message() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let created = create(&mut alice, "watched").await;
    append_many(&mut alice, &created.id, 3).await;

    let mut stream = watch(&mut alice, &created.id, 1).await;
    let backlog = expect_sequences(&mut stream, 2, 3).await;
    assert_eq!(backlog[0].content, "m2");

    let live = append(&mut alice, &created.id, "live one").await;
    assert_eq!(next(&mut stream).await.unwrap(), live);
    alice
        .append_messages(AppendMessagesRequest {
            conversation_id: created.id.clone(),
            messages: vec![user_message("a"), user_message("b")],
            ..Default::default()
        })
        .await
        .unwrap();
    expect_sequences(&mut stream, 5, 6).await;

    // after_sequence beyond the end waits for what comes next.
    let mut ahead = watch(&mut alice, &created.id, 6).await;
    append(&mut alice, &created.id, "seventh").await;
    assert_eq!(next(&mut ahead).await.unwrap().sequence, 7);
    assert_eq!(next(&mut stream).await.unwrap().sequence, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_on_one_replica_sees_appends_through_another_even_across_a_listener_reconnect() {
    const WRITERS: i64 = 8;
    const EACH: i64 = 125;
    let replica_a = TestApp::spawn().await;
    let replica_b = replica_a.spawn_replica().await;
    let created = create(&mut replica_a.client("alice"), "shared").await;
    let mut stream = watch(&mut replica_b.client("alice"), &created.id, 0).await;

    let writers: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let mut client = replica_a.client("alice");
            let id = created.id.clone();
            tokio::spawn(async move {
                for i in 0..EACH {
                    append(&mut client, &id, &format!("writer {writer} message {i}")).await;
                }
            })
        })
        .collect();

    let total = WRITERS * EACH;
    let mut received = expect_sequences(&mut stream, 1, total / 4).await;
    // Cut the listening sessions mid-stream; messages appended meanwhile must
    // still arrive once the listener is back.
    kill_listeners(&replica_a).await;
    received.extend(expect_sequences(&mut stream, total / 4 + 1, total).await);
    for writer in writers {
        writer.await.unwrap();
    }
    assert_eq!(received.len() as i64, total);
    // Each writer's messages arrive in the order it appended them.
    for writer in 0..WRITERS {
        let mine: Vec<_> = received
            .iter()
            .filter_map(|m| m.content.strip_prefix(&format!("writer {writer} message ")))
            .map(|i| i.parse::<i64>().unwrap())
            .collect();
        assert_eq!(mine, (0..EACH).collect::<Vec<_>>());
    }
    // Both replicas listen again.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while listener_count(&replica_a).await < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the listeners did not reconnect"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And live delivery after the reconnect works, with nothing in between.
    append(
        &mut replica_a.client("alice"),
        &created.id,
        "after the reconnect",
    )
    .await;
    assert_eq!(next(&mut stream).await.unwrap().sequence, total + 1);
    drop(replica_b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_made_while_the_listener_is_down_are_backfilled() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let created = create(&mut alice, "gap").await;
    let mut stream = watch(&mut alice, &created.id, 0).await;
    append(&mut alice, &created.id, "one").await;
    expect_sequences(&mut stream, 1, 1).await;

    // New sessions are refused (open ones keep working), so the listener,
    // once killed, stays down while messages are appended.
    app.db
        .admin(&format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS false",
            app.db.name
        ))
        .await;
    kill_listeners(&app).await;
    for i in 2..=20 {
        append(
            &mut alice,
            &created.id,
            &format!("while the listener is down {i}"),
        )
        .await;
    }
    assert_eq!(listener_count(&app).await, 0);
    app.db.bring_online().await;
    expect_sequences(&mut stream, 2, 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_ends_with_not_found_when_the_conversation_is_deleted() {
    let app = TestApp::spawn().await;
    let other_replica = app.spawn_replica().await;
    let mut alice = app.client("alice");
    let created = create(&mut alice, "short-lived").await;
    append(&mut alice, &created.id, "hello").await;
    let mut stream = watch(&mut other_replica.client("alice"), &created.id, 0).await;
    expect_sequences(&mut stream, 1, 1).await;
    alice
        .delete_conversation(proto::DeleteConversationRequest {
            conversation_id: created.id.clone(),
        })
        .await
        .unwrap();
    let end = next(&mut stream).await.expect_err("the stream ends");
    assert_eq!(end.code(), Code::NotFound, "{end:?}");
    assert!(
        tokio::time::timeout(PATIENCE, stream.next())
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_ends_with_not_found_when_the_users_data_is_erased() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let created = create(&mut alice, "erased").await;
    let mut stream = watch(&mut alice, &created.id, 0).await;
    alice
        .delete_user_data(proto::DeleteUserDataRequest {})
        .await
        .unwrap();
    assert_eq!(
        next(&mut stream).await.expect_err("the stream ends").code(),
        Code::NotFound
    );
}

#[tokio::test]
async fn watch_checks_identity_ownership_and_arguments_before_streaming() {
    let app = TestApp::spawn().await;
    let created = create(&mut app.client("alice"), "mine").await;
    let request = |id: &str, after_sequence: i64| WatchConversationRequest {
        conversation_id: id.into(),
        after_sequence,
    };
    expect_code(
        app.client("bob")
            .watch_conversation(request(&created.id, 0))
            .await,
        Code::NotFound,
    );
    expect_code(
        app.client("alice")
            .watch_conversation(request(&uuid::Uuid::now_v7().to_string(), 0))
            .await,
        Code::NotFound,
    );
    expect_invalid(
        app.client("alice")
            .watch_conversation(request(&created.id, -1))
            .await,
        "after_sequence",
    );
    expect_invalid(
        app.client("alice")
            .watch_conversation(request("nope", 0))
            .await,
        "conversation_id",
    );
    expect_code(
        app.client_with_header(None)
            .watch_conversation(request(&created.id, 0))
            .await,
        Code::Unauthenticated,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_watcher_does_not_hold_back_appends_and_catches_up_in_order() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let created = create(&mut alice, "firehose").await;
    let mut slow = watch(&mut alice, &created.id, 0).await;
    let mut fast = watch(&mut alice, &created.id, 0).await;
    // 2,000 messages while `slow` reads nothing: far more than any buffer.
    append_many(&mut alice, &created.id, 2000).await;
    expect_sequences(&mut fast, 1, 2000).await;
    let caught_up = expect_sequences(&mut slow, 1, 2000).await;
    assert_eq!(caught_up.last().unwrap().content, "m2000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutting_the_server_down_ends_open_streams_with_unavailable() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let created = create(&mut alice, "goodbye").await;
    let mut stream = watch(&mut alice, &created.id, 0).await;
    append(&mut alice, &created.id, "before").await;
    expect_sequences(&mut stream, 1, 1).await;
    app.shutdown();
    let end = next(&mut stream).await.expect_err("the stream ends");
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_frees_its_watch() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let first = create(&mut alice, "one").await;
    let second = create(&mut alice, "two").await;
    let mut a = watch(&mut alice, &first.id, 0).await;
    let b = watch(&mut alice, &first.id, 0).await;
    let c = watch(&mut alice, &second.id, 0).await;
    assert_eq!(app.changes.watched_conversations(), 2);
    drop(c);
    wait_for_watched(&app, 1).await;
    drop(b);
    // One watcher of `first` remains, and it still works.
    append(&mut alice, &first.id, "still here").await;
    expect_sequences(&mut a, 1, 1).await;
    assert_eq!(app.changes.watched_conversations(), 1);
    drop(a);
    wait_for_watched(&app, 0).await;
}

async fn wait_for_watched(app: &TestApp, wanted: usize) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while app.changes.watched_conversations() != wanted {
        assert!(
            tokio::time::Instant::now() < deadline,
            "watchers were not freed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A watched conversation whose next append commits without being
/// announced: a writer process (replica A) that tells the others of its
/// writes at most once a minute, so after its first announcement the next
/// one waits in its memory. Returns A, the unannounced message and
/// `watcher_replica`'s stream, which has received the first message.
async fn an_append_waiting_to_be_announced(
    watcher_replica: &TestApp,
) -> (
    tokio::process::Child,
    proto::Message,
    Streaming<proto::Message>,
) {
    use crate::helpers::{Client, UserHeader, channel_to, start_convo};
    use convo::grpc::proto::conversation_service_client::ConversationServiceClient;

    let (replica_a, addr) = start_convo(|command| {
        command.args([
            "--database-url",
            &watcher_replica.db.url,
            "--change-publish-interval",
            "60s",
        ]);
    })
    .await;
    let mut a: Client = ConversationServiceClient::with_interceptor(
        channel_to(addr).await.into(),
        UserHeader::new("alice"),
    );
    let created = create(&mut a, "announced late").await;
    let mut stream = watch(&mut watcher_replica.client("alice"), &created.id, 0).await;
    append(&mut a, &created.id, "announced").await;
    expect_sequences(&mut stream, 1, 1).await;
    let unannounced = append(&mut a, &created.id, "committed, not announced").await;
    (replica_a, unannounced, stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_dies_between_a_commit_and_its_announcement_loses_no_message() {
    // Replica B serves the watcher and re-reads what it watches every 200 ms.
    let replica_b = TestApp::spawn_with(|settings| {
        settings.feed.catch_up_interval = Duration::from_millis(200);
    })
    .await;
    let (mut replica_a, acknowledged, mut stream) =
        an_append_waiting_to_be_announced(&replica_b).await;
    replica_a.start_kill().expect("kill replica A");
    replica_a.wait().await.expect("replica A is gone");

    // A is dead and its announcement with it: B's catch-up finds the message.
    let message = next(&mut stream).await.expect("the message arrives");
    assert_eq!(message.sequence, 2);
    assert_eq!(message.id, acknowledged.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_flooded_past_its_backlog_drops_announcements_but_no_message() {
    // Replica B holds four notifications for its listener, and its catch-up
    // read is too rare to matter here: only the listener can deliver.
    let replica_b = TestApp::spawn_with(|settings| {
        settings.feed.catch_up_interval = Duration::from_secs(600);
        settings.feed.backlog = 4;
    })
    .await;
    let (mut replica_a, unannounced, mut stream) =
        an_append_waiting_to_be_announced(&replica_b).await;

    // A burst of 1,000 notifications of no interest, far past the backlog:
    // the listener drops what it cannot hold, and every watcher re-reads.
    crate::helpers::execute_on(
        &replica_b.db.url,
        "SELECT pg_notify('convo_changes', 'flood:' || g) FROM generate_series(1, 1000) g",
    )
    .await;
    let message = next(&mut stream).await.expect("the message arrives");
    assert_eq!(message.sequence, 2);
    assert_eq!(message.id, unannounced.id);
    replica_a.start_kill().expect("stop replica A");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_are_capped_per_user_and_per_server() {
    use convo::service::WatchLimits;

    let app = TestApp::spawn_alone_with(|settings| {
        settings.watch_limits = WatchLimits {
            per_user: 2,
            per_server: 3,
        };
    })
    .await;
    let mut alice = app.client("alice");
    let mut bob = app.client("bob");
    let hers = create(&mut alice, "hers").await;
    let his = create(&mut bob, "his").await;
    let request = |id: &str| WatchConversationRequest {
        conversation_id: id.to_owned(),
        after_sequence: 0,
    };

    let first = watch(&mut alice, &hers.id, 0).await;
    let _second = watch(&mut alice, &hers.id, 0).await;
    let status = alice
        .watch_conversation(request(&hers.id))
        .await
        .expect_err("a third stream for alice");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status
            .message()
            .contains("this user already has 2 watch streams"),
        "{status:?}"
    );

    // The cap is per user: bob may watch, up to the server's cap.
    let _his = watch(&mut bob, &his.id, 0).await;
    let status = bob
        .watch_conversation(request(&his.id))
        .await
        .expect_err("a fourth stream on the server");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("this server already serves 3"),
        "{status:?}"
    );

    // A stream that ends gives its slot back.
    drop(first);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match alice.watch_conversation(request(&hers.id)).await {
            Ok(_) => break,
            Err(status) if status.code() == Code::ResourceExhausted => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the slot never came back"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    }
}
