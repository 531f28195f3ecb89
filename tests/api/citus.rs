//! convo on Citus: distribution, single-shard statements, a lost worker.
//!
//! These run against a Citus coordinator given as `CONVO_TEST_CITUS_URL`
//! (README, "Scaling out"; `scripts/citus-cluster.sh` starts one); without
//! it they say they were skipped, and why. With it, the whole API suite runs
//! on the coordinator, each test on a distributed database of its own, and
//! every server session turns a statement that spans shards into an error
//! (`TestDb::server_url`): every call of every test is checked to be a
//! single-shard query.

use std::time::{Duration, Instant};

use convo::grpc::{DATABASE_HEALTH_NAME, SERVICE_NAME};
use diesel::QueryableByName;
use diesel_async::{RunQueryDsl, SimpleAsyncConnection};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::helpers::{TestApp, TestDb, append, create, health, on_citus};

fn skipped(test: &str) -> bool {
    if on_citus() {
        return false;
    }
    // Written to stderr directly, not through `eprintln!`, which the test
    // harness captures: `cargo test` shows the skip and its reason.
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "citus::{test}: skipped: CONVO_TEST_CITUS_URL names no Citus coordinator \
         (scripts/citus-cluster.sh starts one; README, \"Scaling out\")"
    );
    true
}

#[tokio::test]
async fn distribution_is_refused_on_plain_postgresql_and_idempotent_on_citus() {
    let db = TestDb::create().await;
    let outcome = convo::store::distribute(&db.url, None).await;
    if on_citus() {
        // The test database is distributed already (the template was).
        let again = outcome.expect("distribute twice");
        assert!(
            again.distributed.is_empty() && again.reference.is_empty(),
            "{again:?}"
        );
        let distributed = db
            .count(
                "SELECT count(*) AS n FROM pg_dist_partition \
                 WHERE logicalrelid::text IN \
                   ('users', 'conversations', 'messages', 'append_requests', 'tool_calls') \
                   AND partmethod = 'h' \
                   AND colocationid = (SELECT colocationid FROM pg_dist_partition \
                                        WHERE logicalrelid = 'users'::regclass)",
            )
            .await;
        assert_eq!(distributed, 5, "every owned table is co-located with users");
    } else {
        let error = outcome
            .expect_err("plain PostgreSQL is refused")
            .to_string();
        assert!(error.contains("no citus extension"), "{error}");
        // Nothing was changed: the migrations are as they were.
        assert_eq!(
            db.count("SELECT count(*) AS n FROM pg_extension WHERE extname = 'citus'")
                .await,
            0
        );
    }
}

#[derive(QueryableByName)]
struct PlanLine {
    #[diesel(sql_type = diesel::sql_types::Text, column_name = "QUERY PLAN")]
    line: String,
}

#[derive(QueryableByName)]
struct ParameterTypes {
    #[diesel(sql_type = diesel::sql_types::Array<diesel::sql_types::Text>)]
    types: Vec<String>,
}

/// A value of `type_name` for EXPLAIN: Citus plans with the values bound,
/// and prunes shards by the user id (every text parameter is 'alice').
fn sample(type_name: &str) -> String {
    if type_name.ends_with("[]") {
        return format!("'{{}}'::{type_name}");
    }
    match type_name {
        "text" => "'alice'".to_owned(),
        "uuid" => "'01934c4e-0000-7000-8000-000000000001'::uuid".to_owned(),
        "timestamp with time zone" => "now()".to_owned(),
        "jsonb" => "'{}'::jsonb".to_owned(),
        other => format!("NULL::{other}"),
    }
    .replace("NULL::bigint", "1::bigint")
    .replace("NULL::integer", "1")
    .replace("NULL::smallint", "1::smallint")
    .replace("NULL::real", "1::real")
}

#[tokio::test]
async fn every_hot_statement_is_planned_on_one_shard() {
    if skipped("every_hot_statement_is_planned_on_one_shard") {
        return;
    }
    let db = TestDb::create().await;
    let mut conn = db.connect().await;
    // Outside a transaction block: Citus delegates a function call only there.
    conn.batch_execute("SET plan_cache_mode = force_custom_plan")
        .await
        .unwrap();
    let mut spread = Vec::new();
    for (index, (name, sql, _)) in convo::store::hot_statements(true).into_iter().enumerate() {
        conn.batch_execute(&format!("PREPARE hot_{index} AS {sql}"))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}\n{sql}"));
        let types: ParameterTypes = diesel::sql_query(format!(
            "SELECT parameter_types::text[] AS types FROM pg_prepared_statements \
             WHERE name = 'hot_{index}'"
        ))
        .get_result(&mut conn)
        .await
        .unwrap();
        let values: Vec<String> = types.types.iter().map(|t| sample(t)).collect();
        let plan: Vec<PlanLine> = diesel::sql_query(format!(
            "EXPLAIN EXECUTE hot_{index}({})",
            values.join(", ")
        ))
        .load(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let text: Vec<String> = plan.into_iter().map(|l| l.line).collect();
        let text = text.join("\n");
        let counts: Vec<&str> = text
            .lines()
            .filter_map(|line| line.trim().strip_prefix("Task Count: "))
            .collect();
        // One task, and no subplan: a subplan's results are sent to other
        // nodes, so a lost worker would fail calls of users it does not hold.
        if counts != ["1"] || text.contains("Distributed Subplan") {
            spread.push(format!("{name}:\n{text}"));
        }
    }
    assert!(
        spread.is_empty(),
        "not one task on one shard:\n{}",
        spread.join("\n\n")
    );
}

#[derive(QueryableByName)]
struct Port {
    #[diesel(sql_type = diesel::sql_types::Integer)]
    port: i32,
}

/// The port of the worker holding `user`'s shard.
async fn worker_of(db: &TestDb, user: &str) -> i32 {
    let mut conn = db.connect().await;
    let port: Port = diesel::sql_query(format!(
        "SELECT nodeport AS port FROM citus_shards \
         WHERE shardid = get_shard_id_for_distribution_column('users', '{user}') \
           AND table_name = 'users'::regclass"
    ))
    .get_result(&mut conn)
    .await
    .unwrap();
    port.port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_worker_fails_only_its_users_quickly_and_recovery_needs_no_restart() {
    if skipped("a_lost_worker_fails_only_its_users_quickly_and_recovery_needs_no_restart") {
        return;
    }
    let app = TestApp::spawn().await;
    // Two users whose rows live on different workers.
    let lost_user = "alice".to_owned();
    let lost_port = worker_of(&app.db, &lost_user).await;
    let mut other_user = None;
    for n in 0..100 {
        let candidate = format!("user{n}");
        if worker_of(&app.db, &candidate).await != lost_port {
            other_user = Some(candidate);
            break;
        }
    }
    let other_user = other_user.expect("a user on the other worker");
    let mut lost = app.client(&lost_user);
    let mut other = app.client(&other_user);
    let lost_chat = create(&mut lost, "on the worker that goes").await;
    let other_chat = create(&mut other, "on the worker that stays").await;
    append(&mut lost, &lost_chat.id, "before").await;

    // The worker stops answering for this test's database: new connections
    // are refused and the coordinator's open ones are cut.
    let worker = app.db.worker_admin_url(lost_port);
    let name = app.db.name.clone();
    crate::helpers::execute_on(
        &worker,
        &format!(
            "ALTER DATABASE {name} ALLOW_CONNECTIONS false; \
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
        ),
    )
    .await;

    let started = Instant::now();
    let refused = lost
        .get_conversation(convo::grpc::proto::GetConversationRequest {
            conversation_id: lost_chat.id.clone(),
        })
        .await
        .expect_err("the user's worker is gone");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        !refused.message().contains("127.0.0.1"),
        "no node address leaks: {refused:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused in {:?}",
        started.elapsed()
    );
    append(&mut other, &other_chat.id, "still served").await;

    // Health: the service stays SERVING (other users are served), the
    // database entry says part of it is missing.
    let deadline = Instant::now() + Duration::from_secs(10);
    while health(app.channel(), DATABASE_HEALTH_NAME).await != ServingStatus::NotServing {
        assert!(
            Instant::now() < deadline,
            "health never noticed the lost worker"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        health(app.channel(), SERVICE_NAME).await,
        ServingStatus::Serving
    );

    // The worker comes back: served again, no restart.
    crate::helpers::execute_on(
        &worker,
        &format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true"),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match lost
            .append_message(convo::grpc::proto::AppendMessageRequest {
                conversation_id: lost_chat.id.clone(),
                role: convo::grpc::proto::Role::User as i32,
                content: "after".to_owned(),
                ..Default::default()
            })
            .await
        {
            Ok(_) => break,
            Err(status) if status.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => panic!("not served after the worker came back: {status:?}"),
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while health(app.channel(), DATABASE_HEALTH_NAME).await != ServingStatus::Serving {
        assert!(
            Instant::now() < deadline,
            "health never saw the worker return"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_waiting_for_a_row_on_a_worker_give_up_at_the_lock_timeout() {
    use convo::grpc::proto;
    if skipped("writes_waiting_for_a_row_on_a_worker_give_up_at_the_lock_timeout") {
        return;
    }
    let app =
        TestApp::spawn_with(|settings| settings.pool.lock_timeout = Duration::from_millis(300))
            .await;
    let mut alice = app.client("alice");
    let chat = create(&mut alice, "locked").await;
    append(&mut alice, &chat.id, "one").await;
    // The row lock is taken on the worker holding alice's shard.
    let mut holder = app.db.hold_row("alice", &chat.id).await;

    let id = chat.id.clone();
    let outcomes = [
        (
            "update",
            timed(alice.update_conversation(proto::UpdateConversationRequest {
                conversation_id: id.clone(),
                title: "renamed".to_owned(),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["title".to_owned()],
                }),
                ..Default::default()
            }))
            .await,
        ),
        (
            "truncate",
            timed(
                alice.truncate_conversation(proto::TruncateConversationRequest {
                    conversation_id: id.clone(),
                    after_sequence: 0,
                    ..Default::default()
                }),
            )
            .await,
        ),
        (
            "fork",
            timed(alice.fork_conversation(proto::ForkConversationRequest {
                conversation_id: id.clone(),
                ..Default::default()
            }))
            .await,
        ),
        (
            "delete",
            timed(alice.delete_conversation(proto::DeleteConversationRequest {
                conversation_id: id.clone(),
            }))
            .await,
        ),
    ];
    for (call, (outcome, took)) in outcomes {
        let status = outcome.expect_err(call);
        assert_eq!(status.code(), Code::Unavailable, "{call}: {status:?}");
        assert!(took < Duration::from_secs(3), "{call} waited {took:?}");
    }
    holder.batch_execute("ROLLBACK").await.unwrap();
    append(&mut alice, &chat.id, "served again").await;
}

#[tokio::test]
async fn migrations_revert_and_apply_again_on_the_test_database() {
    // On Citus the database is distributed: every migration must still run
    // (migrations/README.md), and a table one adds is distributed at once.
    let db = TestDb::create().await;
    for _ in 0..3 {
        convo::store::revert_last_migration(&db.url)
            .await
            .unwrap_or_else(|e| panic!("revert: {e}"));
    }
    let applied = convo::store::run_pending_migrations(&db.url)
        .await
        .unwrap_or_else(|e| panic!("apply again: {e}"));
    assert_eq!(applied.len(), 3, "{applied:?}");
    if on_citus() {
        let placed = db
            .count(
                "SELECT count(*) AS n FROM pg_dist_partition \
                 WHERE (logicalrelid = 'tool_calls'::regclass AND partmethod = 'h') \
                    OR (logicalrelid = 'page_token_keys'::regclass AND partmethod = 'n')",
            )
            .await;
        assert_eq!(
            placed, 2,
            "the tables the migrations made again are distributed"
        );
    }
    // The schema serves: a server starts on it, stores and reads back.
    let app = TestApp::spawn_in(std::sync::Arc::new(db)).await;
    let mut alice = app.client("alice");
    let chat = create(&mut alice, "after the round trip").await;
    assert_eq!(append(&mut alice, &chat.id, "stored").await.sequence, 1);
}

/// A call's outcome (its response dropped) and how long it took.
async fn timed<T>(
    call: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> (Result<(), tonic::Status>, Duration) {
    let started = Instant::now();
    let outcome = call.await.map(|_| ());
    (outcome, started.elapsed())
}
