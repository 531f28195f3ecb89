//! Health, reflection, outages and the server binary.

use std::{process::Stdio, time::Duration};

use convo::grpc::proto;
use tokio::time::{Instant, sleep};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::helpers::{
    TestApp, convo_binary, create, expect_code, expect_unavailable_within, wait_for_health,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_errors_follow_the_database_away_and_back() {
    let app =
        TestApp::spawn_with(|settings| settings.pool.acquire_timeout = Duration::from_millis(500))
            .await;
    let mut alice = app.client("alice");
    let created = create(&mut alice, "survivor").await;
    wait_for_health(app.channel(), ServingStatus::Serving).await;

    app.db.take_offline().await;
    wait_for_health(app.channel(), ServingStatus::NotServing).await;
    let get = proto::GetConversationRequest {
        conversation_id: created.id.clone(),
    };
    for _ in 0..3 {
        expect_unavailable_within(Duration::from_secs(5), alice.get_conversation(get.clone()))
            .await;
    }
    // Identity is checked before any database work, outage or not.
    expect_code(
        app.client_with_header(None)
            .get_conversation(get.clone())
            .await,
        Code::Unauthenticated,
    );
    // Bad input is still reported as bad input.
    expect_code(
        alice
            .get_conversation(proto::GetConversationRequest {
                conversation_id: "x".into(),
            })
            .await,
        Code::InvalidArgument,
    );

    app.db.bring_online().await;
    wait_for_health(app.channel(), ServingStatus::Serving).await;
    let back = alice
        .get_conversation(get)
        .await
        .expect("served again without a restart")
        .into_inner();
    assert_eq!(back.id, created.id);
}

#[tokio::test]
async fn reflection_lists_the_service_in_v1_and_v1alpha() {
    use tokio_stream::StreamExt;
    use tonic_reflection::pb::{v1, v1alpha};
    let app = TestApp::spawn().await;

    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut replies = v1::server_reflection_client::ServerReflectionClient::new(app.channel())
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection v1")
        .into_inner();
    let reply = replies.next().await.expect("a reply").expect("an OK reply");
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        reply.message_response
    else {
        panic!("unexpected reply {reply:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"convo.v1.ConversationService".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
    // Each reflection service lists both, as grpcurl's `list` shows.
    for reflection in [
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(names.contains(&reflection.to_string()), "{names:?}");
    }

    // The service is described, and so are the error details a refusal
    // carries, so a client working from reflection alone (grpcurl) can
    // decode them.
    for symbol in [
        "convo.v1.ConversationService",
        "google.rpc.BadRequest",
        "google.rpc.PreconditionFailure",
    ] {
        let request = v1alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                    symbol.into(),
                ),
            ),
        };
        let mut replies =
            v1alpha::server_reflection_client::ServerReflectionClient::new(app.channel())
                .server_reflection_info(tokio_stream::iter([request]))
                .await
                .expect("reflection v1alpha")
                .into_inner();
        let reply = replies.next().await.expect("a reply").expect("an OK reply");
        assert!(
            matches!(
                reply.message_response,
                Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(ref files))
                    if !files.file_descriptor_proto.is_empty()
            ),
            "{symbol}: {reply:?}"
        );
    }
}

#[tokio::test]
async fn configuration_errors_exit_non_zero_with_one_clear_line() {
    for (args, expected) in [
        (
            vec!["serve", "--database-url", "not a url"],
            "invalid database URL",
        ),
        (
            vec!["serve", "--database-url", "mysql://localhost/convo"],
            "expected a postgres:// URL",
        ),
        (
            vec![
                "serve",
                "--wait-for-database",
                "0",
                "--database-url",
                "postgres://postgres@127.0.0.1:1/convo",
            ],
            "could not prepare the database",
        ),
    ] {
        let output = convo_binary()
            .args(&args)
            .output()
            .await
            .expect("run convo");
        assert!(!output.status.success(), "{args:?} succeeded");
        let stderr = String::from_utf8_lossy(&output.stderr);
        let lines: Vec<_> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: {stderr}");
        assert!(
            lines[0].starts_with("convo: ") && lines[0].contains(expected),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    // Given a wait, it says what it waits for, then ends as clearly.
    let output = convo_binary()
        .args([
            "serve",
            "--wait-for-database",
            "300ms",
            "--database-url",
            "postgres://postgres@127.0.0.1:1/convo",
        ])
        .output()
        .await
        .expect("run convo");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("the database does not answer yet")
            && stderr.lines().last().is_some_and(
                |last| last.starts_with("convo: ") && last.contains("--wait-for-database")
            ),
        "{stderr}"
    );
    let output = convo_binary()
        .args(["serve", "--listen", "nowhere"])
        .output()
        .await
        .expect("run convo");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--listen"));
}

#[tokio::test]
async fn migrate_creates_and_migrates_a_missing_database_then_reverts() {
    let app = TestApp::spawn().await;
    let name = format!("{}_fresh", app.db.name);
    let url = app.db.url.replace(&app.db.name, &name);
    let run = |args: Vec<String>| {
        let mut command = convo_binary();
        command.args(args);
        command
    };
    let output = run(vec!["migrate".into(), "--database-url".into(), url.clone()])
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Applying again is a no-op.
    let again = run(vec!["migrate".into(), "--database-url".into(), url.clone()])
        .output()
        .await
        .unwrap();
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let revert = run(vec![
        "migrate".into(),
        "--revert".into(),
        "--database-url".into(),
        url,
    ])
    .output()
    .await
    .unwrap();
    assert!(
        revert.status.success(),
        "{}",
        String::from_utf8_lossy(&revert.stderr)
    );
    app.db
        .admin(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .await;
}

/// The README's quick start: `convo serve` with no DATABASE_URL runs a private
/// PostgreSQL, serves, and on SIGTERM stops both and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_on_its_private_postgres_and_stops_cleanly_on_sigterm() {
    let data_dir = std::env::temp_dir().join(format!(
        "convo-serve-test-{}",
        uuid::Uuid::now_v7().simple()
    ));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = convo_binary()
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(&data_dir)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("start convo serve");

    let channel = {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let endpoint =
                tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}")).unwrap();
            if let Ok(channel) = endpoint.connect().await {
                break channel;
            }
            assert!(Instant::now() < deadline, "convo serve did not start");
            assert!(
                server.try_wait().unwrap().is_none(),
                "convo serve exited early"
            );
            sleep(Duration::from_millis(100)).await;
        }
    };
    let mut client = proto::conversation_service_client::ConversationServiceClient::new(channel);
    let mut request = tonic::Request::new(proto::CreateConversationRequest {
        title: "embedded".into(),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("x-user-id", "alice".parse().unwrap());
    let created = client
        .create_conversation(request)
        .await
        .expect("create on the embedded default")
        .into_inner();
    assert_eq!(created.title, "embedded");
    assert!(
        data_dir.join("PG_VERSION").exists(),
        "the data directory holds the cluster"
    );

    let pid = nix::unistd::Pid::from_raw(server.id().expect("running") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(60), server.wait())
        .await
        .expect("convo stops after SIGTERM")
        .unwrap();
    let mut log = String::new();
    if let Some(mut stderr) = server.stderr.take() {
        use tokio::io::AsyncReadExt;
        let _ = stderr.read_to_string(&mut log).await;
    }
    assert!(status.success(), "exit status {status}: {log}");
    assert!(
        log.contains("private PostgreSQL"),
        "logs which database is in use: {log}"
    );
    assert!(
        !data_dir.join("postmaster.pid").exists(),
        "PostgreSQL was stopped: {log}"
    );
    let _ = std::fs::remove_dir_all(&data_dir);
}

#[tokio::test]
async fn intervals_and_retention_are_checked_at_start_up() {
    for (flag, value, expected) in [
        ("--health-interval", "0s", "--health-interval"),
        ("--retention-interval", "0s", "--retention-interval"),
        ("--retention", "10000000years", "--retention"),
        ("--retention", "1s", "--retention"),
    ] {
        let output = convo_binary()
            .args([
                "serve",
                flag,
                value,
                "--database-url",
                "postgres://127.0.0.1:1/x",
            ])
            .output()
            .await
            .expect("run convo");
        assert!(!output.status.success(), "{flag} {value} was accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{flag} {value}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_started_together_migrate_one_at_a_time() {
    let app = TestApp::spawn().await;
    let name = format!("{}_together", app.db.name);
    let url = app.db.url.replace(&app.db.name, &name);
    app.db.admin(&format!("CREATE DATABASE {name}")).await;
    let migrations: Vec<_> = (0..3)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { convo::store::run_pending_migrations(&url).await })
        })
        .collect();
    let mut applied = Vec::new();
    for migration in migrations {
        let versions = migration
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("a replica's migration failed: {e}"));
        applied.extend(versions);
    }
    let distinct: std::collections::HashSet<_> = applied.iter().collect();
    assert!(!applied.is_empty());
    assert_eq!(
        distinct.len(),
        applied.len(),
        "each migration applied once: {applied:?}"
    );
    app.db
        .admin(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .await;
}
