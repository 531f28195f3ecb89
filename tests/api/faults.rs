//! Database faults, overload and shutdown: the damage is done for real, to a
//! PostgreSQL of the test's own behind a proxy the test controls.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use convo::{
    config::Settings,
    grpc::proto::{self, AppendMessageRequest, Role},
    startup::{self, Application},
    store,
};
use diesel::QueryableByName;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use tokio::{
    sync::oneshot,
    task::JoinHandle,
    time::{Instant, sleep, timeout},
};
use tonic::{Code, Request, transport::Channel};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::{
    fault_harness::{DedicatedCluster, Proxy},
    helpers::{
        Client, TestApp, UserHeader, append, assert_stored, create, expect_code,
        expect_unavailable_within, health, spawn_appends, test_settings, wait_for_health,
        written_sequences,
    },
};

/// A convo server whose only way to its database is a proxy the test controls.
struct FaultyWorld {
    cluster: DedicatedCluster,
    proxy: Proxy,
    channel: Channel,
    shutdown: Option<oneshot::Sender<()>>,
    server: JoinHandle<Result<(), startup::StartupError>>,
}

impl FaultyWorld {
    async fn start(adjust: impl FnOnce(&mut Settings)) -> Self {
        crate::helpers::init_test_logs();
        let cluster = DedicatedCluster::start().await;
        startup::prepare_database(&cluster.url("convo"))
            .await
            .expect("migrate");
        let proxy = Proxy::start(cluster.addr()).await;
        let mut settings = test_settings(&proxy.url("convo"));
        settings.pool.acquire_timeout = Duration::from_millis(500);
        adjust(&mut settings);
        let app = Application::build(settings)
            .await
            .expect("build the server");
        let addr = app.local_addr();
        let (shutdown, stop) = oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until(async {
            let _ = stop.await;
        }));
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        Self {
            cluster,
            proxy,
            channel,
            shutdown: Some(shutdown),
            server,
        }
    }

    fn client(&self, user: &str) -> Client {
        proto::conversation_service_client::ConversationServiceClient::with_interceptor(
            self.channel.clone().into(),
            UserHeader::new(user),
        )
    }

    /// A direct connection to PostgreSQL, past the proxy, to see the truth.
    async fn direct(&self) -> AsyncPgConnection {
        AsyncPgConnection::establish(&self.cluster.url("convo"))
            .await
            .expect("direct connection")
    }

    async fn stop(mut self) -> Result<(), startup::StartupError> {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        let result = timeout(Duration::from_secs(30), &mut self.server)
            .await
            .expect("the server stops")
            .expect("the server task");
        drop(self.proxy);
        self.cluster.remove().await;
        result
    }
}

fn append_request(conversation_id: &str, content: &str, request_id: &str) -> AppendMessageRequest {
    AppendMessageRequest {
        conversation_id: conversation_id.to_owned(),
        role: Role::User as i32,
        content: content.to_owned(),
        request_id: request_id.to_owned(),
        ..Default::default()
    }
}

fn with_deadline<T>(message: T, deadline: Duration) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(deadline);
    request
}

/// Eventually succeeds: repeats `create` until the server answers.
async fn create_eventually(client: &mut Client, title: &str) -> proto::Conversation {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client
            .create_conversation(proto::CreateConversationRequest {
                title: title.into(),
                ..Default::default()
            })
            .await
        {
            Ok(created) => return created.into_inner(),
            Err(status) => assert!(Instant::now() < deadline, "never recovered: {status:?}"),
        }
        sleep(Duration::from_millis(50)).await;
    }
}

#[derive(QueryableByName, Debug)]
struct StoredMessage {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    sequence: i64,
    #[diesel(sql_type = diesel::sql_types::Text)]
    content: String,
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    id: uuid::Uuid,
}

async fn stored_messages(
    conn: &mut AsyncPgConnection,
    conversation_id: &str,
) -> Vec<StoredMessage> {
    diesel::sql_query("SELECT sequence, content, id FROM messages WHERE conversation_id = $1::uuid ORDER BY sequence")
        .bind::<diesel::sql_types::Text, _>(conversation_id)
        .load(conn)
        .await
        .expect("read the messages")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_fails_fast_with_unavailable_and_recovery_needs_no_restart() {
    let world = FaultyWorld::start(|_| {}).await;
    let mut alice = world.client("alice");
    let created = create(&mut alice, "outage").await;
    wait_for_health(world.channel.clone(), ServingStatus::Serving).await;

    world.proxy.cut();
    wait_for_health(world.channel.clone(), ServingStatus::NotServing).await;
    for _ in 0..5 {
        // Within the pool's acquire timeout (500 ms) and well inside the deadline.
        expect_unavailable_within(
            Duration::from_secs(2),
            alice.get_conversation(with_deadline(
                proto::GetConversationRequest {
                    conversation_id: created.id.clone(),
                },
                Duration::from_secs(10),
            )),
        )
        .await;
    }
    // A client deadline shorter than the acquire timeout is honoured too.
    let started = Instant::now();
    let status = alice
        .get_conversation(with_deadline(
            proto::GetConversationRequest {
                conversation_id: created.id.clone(),
            },
            Duration::from_millis(100),
        ))
        .await
        .expect_err("no database");
    assert!(
        matches!(
            status.code(),
            Code::DeadlineExceeded | Code::Cancelled | Code::Unavailable
        ),
        "{status:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(450),
        "took {:?}",
        started.elapsed()
    );

    world.proxy.restore();
    let restored = Instant::now();
    create_eventually(&mut alice, "back").await;
    assert!(
        restored.elapsed() < Duration::from_secs(2),
        "recovered in {:?}",
        restored.elapsed()
    );
    wait_for_health(world.channel.clone(), ServingStatus::Serving).await;
    world.stop().await.expect("the server ran without error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_waiting_for_a_session_gets_one_soon_after_the_database_returns() {
    // The default acquire timeout: a call may wait 5 s for a session.
    let world = FaultyWorld::start(|settings| {
        settings.pool.acquire_timeout = Duration::from_secs(5);
        settings.pool.max_size = 2;
    })
    .await;
    let mut alice = world.client("alice");
    let created = create(&mut alice, "waits").await;

    world.proxy.cut();
    let cut = Instant::now();
    let restore_after = Duration::from_secs(3);
    let proxy = &world.proxy;
    let call = async {
        loop {
            let started = Instant::now();
            let answer = alice
                .get_conversation(with_deadline(
                    proto::GetConversationRequest {
                        conversation_id: created.id.clone(),
                    },
                    Duration::from_secs(10),
                ))
                .await;
            match answer {
                Ok(_) => return Instant::now(),
                // A pooled session the cut killed fails at once; the next
                // call waits for a new one.
                Err(status)
                    if status.code() == Code::Unavailable
                        && started.elapsed() < Duration::from_secs(1) =>
                {
                    assert!(cut.elapsed() < restore_after, "{status:?}");
                }
                Err(status) => panic!(
                    "a call that waited {:?} for a session failed: {status:?}",
                    started.elapsed()
                ),
            }
        }
    };
    let restore = async {
        sleep(restore_after).await;
        proxy.restore();
        Instant::now()
    };
    let (answered, restored) = tokio::join!(call, restore);
    // Before, the pool's next attempt came 2.5 s after its previous one, so
    // the call waited out its 5 s and failed with the database back.
    assert!(
        answered.saturating_duration_since(restored) < Duration::from_secs(1),
        "answered {:?} after the database returned",
        answered.saturating_duration_since(restored)
    );
    world.stop().await.expect("the server ran without error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_waits_for_a_database_that_is_not_up_yet() {
    let cluster = DedicatedCluster::start().await;
    let proxy = Proxy::start(cluster.addr()).await;
    let url = proxy.url("postgres");
    proxy.cut();

    // Nothing answers: it gives up after its wait, and says which setting
    // that is.
    let error = store::wait_for_database(&url, Duration::from_millis(600))
        .await
        .expect_err("nothing answers");
    assert!(error.to_string().contains("--wait-for-database"), "{error}");

    // The database comes up while it waits.
    let started = Instant::now();
    let (waited, ()) = tokio::join!(
        store::wait_for_database(&url, Duration::from_secs(30)),
        async {
            sleep(Duration::from_secs(1)).await;
            proxy.restore();
        }
    );
    waited.expect("the database came up");
    assert!(started.elapsed() >= Duration::from_secs(1));

    // A refusal that waiting cannot change ends the wait at once; what
    // comes next reports it.
    let started = Instant::now();
    store::wait_for_database(
        &format!("postgres://nobody@{}/postgres", proxy.addr),
        Duration::from_secs(30),
    )
    .await
    .expect("a refusal is not waited on");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    drop(proxy);
    cluster.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarts_are_survived_and_dead_connections_are_not_reused() {
    let mut world = FaultyWorld::start(|settings| settings.pool.max_size = 4).await;
    let mut alice = world.client("alice");
    let created = create(&mut alice, "restarts").await;
    // Open every pooled connection, so that all of them die in the restart.
    let warm: Vec<_> = (0..8)
        .map(|_| {
            let mut client = world.client("alice");
            let id = created.id.clone();
            tokio::spawn(async move {
                client
                    .get_conversation(proto::GetConversationRequest {
                        conversation_id: id,
                    })
                    .await
                    .unwrap();
            })
        })
        .collect();
    for task in warm {
        task.await.unwrap();
    }

    for crash in [false, true] {
        if crash {
            world.cluster.crash_and_restart().await;
        } else {
            world.cluster.restart().await;
        }
        let restarted = Instant::now();
        create_eventually(&mut alice, "after restart").await;
        assert!(
            restarted.elapsed() < Duration::from_secs(2),
            "recovered in {:?}",
            restarted.elapsed()
        );
        // Once one call works, every following call works: no connection
        // killed by the restart is handed out again.
        for i in 0..20 {
            alice
                .append_message(append_request(
                    &created.id,
                    &format!("after restart {crash} {i}"),
                    "",
                ))
                .await
                .unwrap_or_else(|status| panic!("call {i} after the restart failed: {status:?}"));
        }
    }
    world.stop().await.expect("the server ran without error");
}

/// A server with a pool of one session and a patient lock timeout, and a
/// transaction of the test's own holding the row lock of one of alice's
/// conversations (rolled back when the holder is dropped or told to).
async fn one_session_and_a_locked_row() -> (TestApp, proto::Conversation, AsyncPgConnection) {
    let app = TestApp::spawn_with(|settings| {
        settings.pool.max_size = 1;
        settings.pool.lock_timeout = Duration::from_secs(30);
    })
    .await;
    let locked = create(&mut app.client("alice"), "locked").await;
    let holder = app.db.hold_row("alice", &locked.id).await;
    (app, locked, holder)
}

/// A call abandoned by its client (deadline passed) while its statement
/// waits in PostgreSQL: the statement is cancelled there, and the session is
/// not lent to the next caller, who would otherwise queue behind it. With a
/// pool of one session, the next call is served at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_call_does_not_delay_the_next_one() {
    let (app, locked, mut holder) = one_session_and_a_locked_row().await;
    let mut alice = app.client("alice");
    let free = create(&mut alice, "free").await;
    let waiting_for_the_lock = "SELECT count(*) AS n FROM pg_stat_activity \
         WHERE datname = current_database() AND wait_event_type = 'Lock' \
           AND pid <> pg_backend_pid()";

    let status = alice
        .append_message(with_deadline(
            append_request(&locked.id, "abandoned", "k1"),
            Duration::from_millis(300),
        ))
        .await
        .expect_err("the deadline passes while the row is locked");
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );

    // The next call gets the pool's one session without waiting 30 s.
    let started = Instant::now();
    alice
        .get_conversation(with_deadline(
            proto::GetConversationRequest {
                conversation_id: free.id.clone(),
            },
            Duration::from_secs(3),
        ))
        .await
        .expect("served while the abandoned append's row is still locked");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    // And PostgreSQL is no longer running the abandoned statement.
    let deadline = Instant::now() + Duration::from_secs(5);
    while app.db.count(waiting_for_the_lock).await > 0 {
        assert!(
            Instant::now() < deadline,
            "the abandoned append still waits for the lock in PostgreSQL"
        );
        sleep(Duration::from_millis(50)).await;
    }
    holder.batch_execute("ROLLBACK").await.unwrap();
    // Nothing was written by the abandoned call: the retry is its first write.
    let stored = alice
        .append_message(append_request(&locked.id, "abandoned", "k1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.sequence, 1);
}

/// Health asks the database on a session of its own: a pool whose every
/// session is busy (here the only one waits for a row lock) is load, not an
/// outage, and health stays SERVING.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_pool_does_not_make_health_fail() {
    let (app, locked, mut holder) = one_session_and_a_locked_row().await;
    let mut waiting = app.client("alice");
    let id = locked.id.clone();
    let append = tokio::spawn(async move {
        waiting
            .append_message(append_request(&id, "waits", "k1"))
            .await
    });
    // Several health intervals (100 ms) and longer than the pool's acquire
    // timeout (2 s), with the pool's one session taken all along.
    sleep(Duration::from_millis(2500)).await;
    assert!(!append.is_finished(), "the append should still wait");
    for service in ["", "convo.v1.ConversationService"] {
        assert_eq!(health(app.channel(), service).await, ServingStatus::Serving);
    }
    holder.batch_execute("ROLLBACK").await.unwrap();
    let stored = append.await.unwrap().expect("the append goes through");
    assert_eq!(stored.into_inner().sequence, 1);
}

/// Many appends to one conversation at once (here held up by its row lock)
/// take two of the pool's sessions, not all of them: the rest wait in the
/// server holding none, and other calls are served meanwhile. Once the row
/// is free, every one of them is written, in sequences 1..n with no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_queued_on_one_conversation_leave_the_pool_to_other_calls() {
    // One server: turns are each replica's own (two replicas would let in
    // two each).
    let app = TestApp::spawn_alone_with(|settings| {
        settings.pool.max_size = 4;
        settings.pool.lock_timeout = Duration::from_secs(30);
    })
    .await;
    let mut alice = app.client("alice");
    let hot = create(&mut alice, "hot").await;
    let other = create(&mut alice, "other").await;
    let mut holder = app.db.hold_row("alice", &hot.id).await;

    let appends = spawn_appends(&app, "alice", &hot.id, 8);
    app.db
        .until_waiting_for_a_lock(2, "the appends never reached the row lock")
        .await;
    // Longer than it took the first two to get there: no more follow.
    sleep(Duration::from_millis(300)).await;
    assert_eq!(app.db.sessions_waiting_for_a_lock().await, 2);

    // Well within the pool's acquire timeout (2 s), though eight appends wait.
    for _ in 0..3 {
        let started = Instant::now();
        alice
            .resume_conversation(with_deadline(
                proto::ResumeConversationRequest {
                    conversation_id: other.id.clone(),
                    max_messages: 10,
                },
                Duration::from_secs(2),
            ))
            .await
            .expect("another conversation is served while the hot one queues");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "took {:?}",
            started.elapsed()
        );
    }

    holder.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(
        written_sequences(appends).await,
        (1..=8).collect::<Vec<i64>>()
    );
}

/// A server whose calls wait 300 ms for a locked row, and alice's
/// conversation on it, whose row a transaction of the test's holds.
async fn locked_conversation() -> (TestApp, Client, proto::Conversation, AsyncPgConnection) {
    let app =
        TestApp::spawn_with(|settings| settings.pool.lock_timeout = Duration::from_millis(300))
            .await;
    let mut alice = app.client("alice");
    let created = create(&mut alice, "locked").await;
    let holder = app.db.hold_row("alice", &created.id).await;
    (app, alice, created, holder)
}

/// An append waiting in the server for its turn waits no longer than one
/// waiting in PostgreSQL for the row: both give up at the lock timeout, with
/// the same retryable answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_queued_behind_a_held_row_give_up_at_the_lock_timeout() {
    let (app, mut alice, created, mut holder) = locked_conversation().await;
    let started = Instant::now();
    let appends = spawn_appends(&app, "alice", &created.id, 4);
    for append in appends {
        expect_unavailable_within(Duration::from_secs(2), async { append.await.unwrap() }).await;
    }
    // Two lock timeouts at the most: a turn's wait, then the row's.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    holder.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(append(&mut alice, &created.id, "free").await.sequence, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_lock_held_elsewhere_cannot_wedge_a_call() {
    let (_app, mut alice, created, mut holder) = locked_conversation().await;

    expect_unavailable_within(
        Duration::from_secs(2),
        alice.append_message(append_request(&created.id, "blocked", "k1")),
    )
    .await;

    // With a longer lock_timeout, the client's own deadline still ends the call.
    holder.batch_execute("ROLLBACK").await.unwrap();
    drop(holder);
    let patient =
        TestApp::spawn_with(|settings| settings.pool.lock_timeout = Duration::from_secs(30)).await;
    let mut alice = patient.client("alice");
    let created = create(&mut alice, "locked").await;
    let mut holder = patient.db.hold_row("alice", &created.id).await;
    let started = Instant::now();
    let status = alice
        .append_message(with_deadline(
            append_request(&created.id, "late", "k2"),
            Duration::from_millis(300),
        ))
        .await
        .expect_err("the deadline passes");
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    holder.batch_execute("ROLLBACK").await.unwrap();

    // Nothing half-done is left behind, and the retry succeeds exactly once.
    let stored = alice
        .append_message(append_request(&created.id, "late", "k2"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.sequence, 1);
    for _ in 0..10 {
        alice
            .get_conversation(proto::GetConversationRequest {
                conversation_id: created.id.clone(),
            })
            .await
            .unwrap();
    }
    assert_eq!(
        patient.db.count("SELECT count(*) AS n FROM messages").await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_reply_was_lost_is_recovered_by_the_retry() {
    let world = FaultyWorld::start(|_| {}).await;
    let mut alice = world.client("alice");
    let created = create(&mut alice, "ambiguous").await;
    let request = append_request(&created.id, "did this land?", "turn-1");

    world.proxy.lose_next_reply_about(&created.id);
    let status = alice
        .append_message(request.clone())
        .await
        .expect_err("the reply is lost");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    // The commit did happen: the client cannot know, but PostgreSQL does.
    let mut direct = world.direct().await;
    let stored = stored_messages(&mut direct, &created.id).await;
    assert_eq!(stored.len(), 1, "the commit reached the database");

    // The retry with the same request_id returns that very message.
    let retried = alice
        .append_message(request)
        .await
        .expect("the retry succeeds")
        .into_inner();
    assert_eq!(retried.sequence, 1);
    assert_eq!(retried.id, stored[0].id.to_string());
    assert_eq!(
        stored_messages(&mut direct, &created.id).await.len(),
        1,
        "no duplicate"
    );
    drop(direct);
    world.stop().await.expect("the server ran without error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_loses_no_acknowledged_message_and_duplicates_none() {
    const WORKERS: usize = 8;
    const EACH: usize = 40;
    let mut world = FaultyWorld::start(|_| {}).await;
    let created = create(&mut world.client("alice"), "chaos").await;
    let retries = Arc::new(AtomicUsize::new(0));
    let failures_seen = Arc::new(std::sync::Mutex::new(HashMap::<String, usize>::new()));

    let workers: Vec<JoinHandle<Vec<(String, proto::Message)>>> = (0..WORKERS)
        .map(|worker| {
            let mut client = world.client("alice");
            let id = created.id.clone();
            let retries = retries.clone();
            let failures_seen = failures_seen.clone();
            tokio::spawn(async move {
                let mut acknowledged = Vec::new();
                for i in 0..EACH {
                    let content = format!("worker {worker} message {i}");
                    let request_id = format!("w{worker}-m{i}");
                    let deadline = Instant::now() + Duration::from_secs(45);
                    loop {
                        let request = with_deadline(
                            append_request(&id, &content, &request_id),
                            Duration::from_secs(3),
                        );
                        match client.append_message(request).await {
                            Ok(reply) => {
                                acknowledged.push((content.clone(), reply.into_inner()));
                                // Paced, so the appends span every kind of damage.
                                sleep(Duration::from_millis(100)).await;
                                break;
                            }
                            Err(status) => {
                                assert!(
                                    matches!(
                                        status.code(),
                                        Code::Unavailable
                                            | Code::DeadlineExceeded
                                            | Code::Cancelled
                                            | Code::Unknown
                                    ),
                                    "not a retryable failure: {status:?}"
                                );
                                assert!(
                                    Instant::now() < deadline,
                                    "could not append for 45 s: {status:?}"
                                );
                                retries.fetch_add(1, Ordering::Relaxed);
                                *failures_seen
                                    .lock()
                                    .unwrap()
                                    .entry(format!("{:?}", status.code()))
                                    .or_default() += 1;
                                sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                }
                acknowledged
            })
        })
        .collect();

    // Damage while the workers append: cuts, resets and restarts, bounded.
    let mut damage = Vec::new();
    let chaos_started = Instant::now();
    let mut round = 0;
    while workers.iter().any(|w| !w.is_finished())
        && chaos_started.elapsed() < Duration::from_secs(20)
    {
        sleep(Duration::from_millis(250)).await;
        match round % 4 {
            0 => {
                world.proxy.cut();
                sleep(Duration::from_millis(400)).await;
                world.proxy.restore();
                damage.push("cut");
            }
            1 => {
                world.cluster.restart().await;
                damage.push("restart");
            }
            2 => {
                world.proxy.reset();
                damage.push("reset");
            }
            _ => {
                world.cluster.crash_and_restart().await;
                damage.push("crash");
            }
        }
        round += 1;
    }
    let mut acknowledged = Vec::new();
    for worker in workers {
        acknowledged.extend(worker.await.expect("a worker"));
    }

    let mut direct = world.direct().await;
    let stored = stored_messages(&mut direct, &created.id).await;
    let present: HashMap<&str, &StoredMessage> =
        stored.iter().map(|m| (m.content.as_str(), m)).collect();
    let duplicates = stored.len() - present.len();
    let gaps = stored
        .iter()
        .enumerate()
        .filter(|(i, m)| m.sequence != *i as i64 + 1)
        .count();
    let missing: Vec<_> = acknowledged
        .iter()
        .filter(|(content, _)| !present.contains_key(content.as_str()))
        .collect();
    let mismatched: Vec<_> = acknowledged
        .iter()
        .filter(|(content, reply)| {
            present
                .get(content.as_str())
                .is_some_and(|m| m.sequence != reply.sequence || m.id.to_string() != reply.id)
        })
        .collect();
    println!(
        "chaos report: acknowledged={} present={} duplicates={} gaps={} missing={} mismatched={} \
         retries={} failures={:?} damage={:?} in {:?}",
        acknowledged.len(),
        stored.len(),
        duplicates,
        gaps,
        missing.len(),
        mismatched.len(),
        AtomicUsize::load(&retries, Ordering::Relaxed),
        failures_seen.lock().unwrap(),
        damage,
        chaos_started.elapsed(),
    );
    assert_eq!(acknowledged.len(), WORKERS * EACH);
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
    assert!(
        mismatched.is_empty(),
        "acknowledged with another id or sequence: {mismatched:?}"
    );
    assert_eq!(duplicates, 0);
    assert_eq!(gaps, 0);
    assert_eq!(
        stored.len(),
        WORKERS * EACH,
        "only acknowledged messages are stored"
    );
    assert!(
        damage.len() >= 4,
        "the run saw every kind of damage: {damage:?}"
    );
    let unique: HashSet<_> = acknowledged.iter().map(|(_, m)| m.sequence).collect();
    assert_eq!(unique.len(), WORKERS * EACH);
    drop(direct);
    world.stop().await.expect("the server ran without error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_database_is_bounded_by_the_clients_deadline() {
    // Opening a connection takes several round trips: give the pool time.
    let world =
        FaultyWorld::start(|settings| settings.pool.acquire_timeout = Duration::from_secs(8)).await;
    let mut alice = world.client("alice");
    let created = create(&mut alice, "slow").await;
    let get = || proto::GetConversationRequest {
        conversation_id: created.id.clone(),
    };

    world.proxy.delay(Duration::from_millis(400));
    let started = Instant::now();
    let status = alice
        .get_conversation(with_deadline(get(), Duration::from_millis(150)))
        .await
        .expect_err("slower than the deadline");
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(350),
        "took {:?}",
        started.elapsed()
    );
    // A patient caller is served, slowly.
    let fetched = alice
        .get_conversation(with_deadline(get(), Duration::from_secs(10)))
        .await
        .expect("slow but served");
    assert_eq!(fetched.into_inner().id, created.id);

    world.proxy.delay(Duration::ZERO);
    for _ in 0..10 {
        alice
            .get_conversation(with_deadline(get(), Duration::from_secs(2)))
            .await
            .expect("fast again");
    }
    world.stop().await.expect("the server ran without error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_is_refused_fast_instead_of_queued() {
    let app = TestApp::spawn_alone_with(|settings| settings.max_in_flight = 4).await;
    let mut alice = app.client("alice");
    let created = create(&mut alice, "hot").await;
    // Appends to a locked conversation wait: four of them fill the server.
    let mut holder = app.db.hold_row("alice", &created.id).await;
    let flood: Vec<_> = (0..40)
        .map(|i| {
            let mut client = app.client("alice");
            let id = created.id.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let result = client
                    .append_message(append_request(&id, &format!("flood {i}"), &format!("f{i}")))
                    .await;
                (result.map(|r| r.into_inner().sequence), started.elapsed())
            })
        })
        .collect();
    sleep(Duration::from_millis(500)).await;
    // While the server is full, other calls are refused at once too…
    let status = expect_code(
        alice
            .get_conversation(proto::GetConversationRequest {
                conversation_id: created.id.clone(),
            })
            .await,
        Code::ResourceExhausted,
    );
    assert!(status.message().contains("retry"), "{}", status.message());
    // …and health, which is not a convo.v1 call, still answers.
    wait_for_health(app.channel(), ServingStatus::Serving).await;

    holder.batch_execute("ROLLBACK").await.unwrap();
    let (mut admitted, mut refused) = (Vec::new(), 0);
    for call in flood {
        let (result, elapsed) = call.await.unwrap();
        match result {
            Ok(sequence) => admitted.push(sequence),
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(
                    elapsed < Duration::from_millis(400),
                    "refused only after {elapsed:?}"
                );
                refused += 1;
            }
        }
    }
    admitted.sort_unstable();
    assert_eq!(admitted.len(), 4, "exactly the limit was admitted");
    assert_eq!(admitted, [1, 2, 3, 4]);
    assert_eq!(refused, 36);
    // Once the flood is over, calls are served again.
    alice
        .get_conversation(proto::GetConversationRequest {
            conversation_id: created.id.clone(),
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn an_oversized_request_gets_a_clear_status_and_the_connection_lives_on() {
    let app = TestApp::spawn_with(|settings| settings.max_request_bytes = 2 * 1024 * 1024).await;
    let mut alice = app.client("alice");
    let created = create(&mut alice, "big").await;
    let status = alice
        .append_messages(proto::AppendMessagesRequest {
            conversation_id: created.id.clone(),
            messages: (0..3)
                .map(|_| crate::helpers::user_message(&"x".repeat(1 << 20)))
                .collect(),
            ..Default::default()
        })
        .await
        .expect_err("3 MiB is over the 2 MiB limit");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("limit"), "{}", status.message());
    // The same channel keeps working, and a 1 MiB message still fits.
    let stored = alice
        .append_message(append_request(&created.id, &"y".repeat(1 << 20), ""))
        .await
        .unwrap();
    assert_eq!(stored.into_inner().sequence, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_in_flight_calls_finish_and_loses_no_acknowledged_message() {
    let app = TestApp::spawn_alone_with(|_| {}).await;
    let mut alice = app.client("alice");
    let created = create(&mut alice, "draining").await;
    // One call is certainly in flight: it waits for a row lock.
    let mut holder = app.db.hold_row("alice", &created.id).await;
    let mut blocked_client = app.client("alice");
    let blocked_id = created.id.clone();
    let blocked = tokio::spawn(async move {
        blocked_client
            .append_message(append_request(
                &blocked_id,
                "in flight at shutdown",
                "in-flight",
            ))
            .await
    });
    // And more keep coming until the server stops taking them.
    let acknowledged = Arc::new(std::sync::Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..4)
        .map(|worker| {
            let mut client = app.client("alice");
            let other = created.id.clone();
            let acknowledged = acknowledged.clone();
            tokio::spawn(async move {
                let mine = create(&mut client, &format!("worker {worker}")).await;
                let _ = other;
                for i in 0.. {
                    match client
                        .append_message(append_request(
                            &mine.id,
                            &format!("{worker}/{i}"),
                            &format!("{worker}-{i}"),
                        ))
                        .await
                    {
                        Ok(reply) => acknowledged
                            .lock()
                            .unwrap()
                            .push(reply.into_inner().content),
                        Err(_) => return,
                    }
                }
            })
        })
        .collect();
    sleep(Duration::from_millis(300)).await;

    let stopping = tokio::spawn({
        let release_after = Duration::from_millis(300);
        async move {
            sleep(release_after).await;
            holder.batch_execute("ROLLBACK").await.unwrap();
        }
    });
    let started = Instant::now();
    app.shut_down_and_wait().await.expect("a clean stop");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "the server waited for the call in flight"
    );
    stopping.await.unwrap();
    let in_flight = blocked
        .await
        .unwrap()
        .expect("the call in flight at shutdown completed");
    assert_eq!(in_flight.into_inner().content, "in flight at shutdown");
    for worker in workers {
        worker.await.unwrap();
    }

    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(
        acknowledged.len() > 10,
        "the workers were busy: {}",
        acknowledged.len()
    );
    let stored = app.db.count("SELECT count(*) AS n FROM messages").await;
    assert_eq!(
        stored as usize,
        acknowledged.len() + 1,
        "every acknowledged message, and only those, is stored"
    );
    for content in &acknowledged {
        let sql = format!("SELECT count(*) AS n FROM messages WHERE content = '{content}'");
        assert_eq!(app.db.count(&sql).await, 1, "{content}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_timeout_bounds_how_long_shutdown_waits() {
    let app =
        TestApp::spawn_alone_with(|settings| settings.drain_timeout = Duration::from_millis(500))
            .await;
    let mut alice = app.client("alice");
    let created = create(&mut alice, "stuck").await;
    let mut holder = app.db.hold_row("alice", &created.id).await;
    let stuck = tokio::spawn(async move {
        alice
            .append_message(append_request(&created.id, "stuck", "s1"))
            .await
    });
    sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    app.shut_down_and_wait().await.expect("a clean stop");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "stopped after {took:?}"
    );
    assert!(
        stuck.await.unwrap().is_err(),
        "the abandoned call was not acknowledged"
    );
    holder.batch_execute("ROLLBACK").await.unwrap();
    // Its transaction never committed.
    assert_eq!(app.db.count("SELECT count(*) AS n FROM messages").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_attempt_that_hangs_does_not_hold_its_pool_slot() {
    // Two connections at most, each call waits 500 ms for one.
    let world = FaultyWorld::start(|s| s.pool.max_size = 2).await;
    let mut alice = world.client("alice");
    let created = create(&mut alice, "hung").await;
    let get = proto::GetConversationRequest {
        conversation_id: created.id.clone(),
    };
    // The database accepts connections and never answers: every attempt the
    // pool makes now hangs.
    world.proxy.stall();
    for _ in 0..3 {
        expect_code(alice.get_conversation(get.clone()).await, Code::Unavailable);
    }
    // Back to normal. The hung attempts must give their slots up (each is
    // abandoned after its connect timeout) so that new connections are made.
    world.proxy.restore();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match alice.get_conversation(get.clone()).await {
            Ok(_) => break,
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                assert!(
                    Instant::now() < deadline,
                    "the pool never recovered: its slots stayed with hung connection attempts"
                );
                sleep(Duration::from_millis(100)).await;
            }
        }
    }
    world.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_that_never_send_their_body_do_not_block_other_callers() {
    let app = TestApp::spawn_with(|settings| settings.max_in_flight = 16).await;
    let mut alice = app.client("alice");
    let created = create(&mut alice, "still served").await;

    // Three connections open as many streams as the server lets them and
    // send only their headers, never a body: far more than 16.
    let mut held = Vec::new();
    for _ in 0..3 {
        let tcp = tokio::net::TcpStream::connect(app.addr()).await.unwrap();
        let (client, connection) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(connection);
        for _ in 0..300 {
            let Ok(Ok(mut ready)) =
                timeout(Duration::from_millis(200), client.clone().ready()).await
            else {
                break;
            };
            let request = http::Request::post(format!(
                "http://{}/convo.v1.ConversationService/GetConversation",
                app.addr()
            ))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("x-user-id", "mallory")
            .body(())
            .unwrap();
            let Ok((response, stream)) = ready.send_request(request, false) else {
                break;
            };
            held.push((response, stream));
        }
    }
    assert!(
        held.len() > 100,
        "opened {} header-only streams",
        held.len()
    );
    sleep(Duration::from_millis(200)).await;

    // A caller that sends whole requests is served: those streams hold no
    // permit, since a call takes one only once its request is decoded.
    for _ in 0..20 {
        alice
            .get_conversation(proto::GetConversationRequest {
                conversation_id: created.id.clone(),
            })
            .await
            .expect("served beside header-only streams");
    }
    drop(held);
}

/// A client that asks for large answers and never reads them holds at most
/// --max-unread-bytes of them on its connection: past it, its calls end with
/// RESOURCE_EXHAUSTED instead of adding to what it does not read, and other
/// connections are served as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_does_not_read_holds_a_bounded_amount_of_answers() {
    use prost::Message as _;

    let app = TestApp::spawn_with(|settings| settings.max_unread_bytes = 8 * 1024 * 1024).await;
    let mut alice = app.client("alice");
    let big = create(&mut alice, "big").await;
    // 60 messages of 100 KB: a page of 1,000 is cut at the 4 MiB answer limit.
    app.db
        .run_sql(&format!(
            "INSERT INTO messages (user_id, conversation_id, sequence, id, role, content, \
                                   create_time, bytes_through) \
             SELECT 'alice', '{id}', s, gen_random_uuid(), 1, repeat('x', 100000), now(), 100000 * s \
               FROM generate_series(1, 60) AS s; \
             UPDATE conversations SET message_count = 60, total_bytes = 6000000 \
              WHERE user_id = 'alice' AND id = '{id}'",
            id = big.id
        ))
        .await;
    let page = proto::ListMessagesRequest {
        conversation_id: big.id.clone(),
        page_size: 1000,
        ..Default::default()
    };
    let mut framed = vec![0u8];
    framed.extend((page.encoded_len() as u32).to_be_bytes());
    framed.extend(page.encode_to_vec());

    // A connection whose windows stay at 1 KiB: it never reads past them.
    let tcp = tokio::net::TcpStream::connect(app.addr()).await.unwrap();
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(1024)
        .initial_connection_window_size(1024)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut bodies = Vec::new();
    for _ in 0..6 {
        let request = http::Request::post(format!(
            "http://{}/convo.v1.ConversationService/ListMessages",
            app.addr()
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-user-id", "alice")
        .body(())
        .unwrap();
        let mut ready = client.clone().ready().await.unwrap();
        let (response, mut stream) = ready.send_request(request, false).unwrap();
        stream
            .send_data(bytes::Bytes::from(framed.clone()), true)
            .unwrap();
        bodies.push(response.await.unwrap().into_body());
    }
    let (mut answered, mut refused) = (0, 0);
    // Every stream stays open until the end: dropping one would reset it and
    // free its share for an answer charged later.
    for body in bodies.iter_mut() {
        match timeout(Duration::from_secs(5), body.data()).await {
            // The start of an answer; the rest waits for a read that never comes.
            Ok(Some(Ok(_))) => answered += 1,
            Ok(None) => {
                let trailers = body.trailers().await.unwrap().expect("trailers");
                // Read as a gRPC client reads them (grpc-message is percent-encoded).
                let status = tonic::Status::from_header_map(&trailers).expect("a status");
                assert_eq!(status.code(), Code::ResourceExhausted, "{trailers:?}");
                assert!(status.message().contains("has not read"), "{status:?}");
                refused += 1;
            }
            other => panic!("neither an answer nor a refusal: {other:?}"),
        }
    }
    // 8 MiB holds two answers of about 4 MiB.
    assert_eq!((answered, refused), (2, 4));
    drop(bodies);

    // Another connection is served the same page.
    let served = alice.list_messages(page).await.expect("served elsewhere");
    assert!(!served.into_inner().next_page_token.is_empty());
}

/// A write is acknowledged only once committed. In autocommit PostgreSQL
/// sends a statement's rows before it commits; an answer built from the
/// first row, as diesel-async's `get_result` gives it, told the caller of a
/// write that could still fail, or be lost to a crash (the chaos test above
/// caught one such append). Here a deferred constraint trigger refuses
/// marked rows at commit, after their rows were sent: each call must fail,
/// and nothing be stored. (Not on Citus: triggers on distributed tables are
/// not allowed there by default.)
#[tokio::test]
async fn writes_refused_at_commit_are_never_acknowledged() {
    if crate::helpers::on_citus() {
        return;
    }
    let app = TestApp::spawn().await;
    app.db
        .run_sql(
            "CREATE FUNCTION refuse_message() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN \
               IF NEW.content = 'refused at commit' THEN RAISE EXCEPTION 'refused'; END IF; \
               RETURN NULL; \
             END $$; \
             CREATE FUNCTION refuse_title() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN \
               IF NEW.title = 'refused at commit' THEN RAISE EXCEPTION 'refused'; END IF; \
               RETURN NULL; \
             END $$; \
             CREATE CONSTRAINT TRIGGER refuse_at_commit AFTER INSERT ON messages \
               DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_message(); \
             CREATE CONSTRAINT TRIGGER refuse_at_commit AFTER UPDATE ON conversations \
               DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_title();",
        )
        .await;
    let mut alice = app.client("alice");
    let chat = create(&mut alice, "before").await;

    let appended = alice
        .append_message(append_request(&chat.id, "refused at commit", ""))
        .await;
    assert!(appended.is_err(), "acknowledged: {appended:?}");
    let updated = alice
        .update_conversation(proto::UpdateConversationRequest {
            conversation_id: chat.id.clone(),
            title: "refused at commit".into(),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["title".into()],
            }),
            ..Default::default()
        })
        .await;
    assert!(updated.is_err(), "acknowledged: {updated:?}");

    // As created: title "before", no message.
    assert_stored(&mut alice, &chat).await;
    // Writes the trigger lets through are acknowledged as before.
    let kept = append(&mut alice, &chat.id, "kept").await;
    assert_eq!(kept.sequence, 1);
}
