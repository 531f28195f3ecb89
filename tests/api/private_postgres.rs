//! The private PostgreSQL of `convo serve` (no DATABASE_URL): reachable only
//! by convo's own account (and root and postgres), started again when it dies
//! under a running convo, never taken from a running convo by a second one,
//! gone when convo dies, recovered after a hard kill, and usable as root
//! from a checkout under a private home directory. Tests that need root (to
//! act as another OS user) say so and skip otherwise.

use std::{
    net::SocketAddr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use convo::{
    grpc::proto,
    local_postgres::{self, Access, LocalPostgres, LocalPostgresOptions, postmaster_pid},
};
use nix::unistd::{Uid, User};
use tokio::time::sleep;

use crate::helpers::{channel_to, start_convo, stop_and_read_log};

fn scratch_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{name}-{}", uuid::Uuid::now_v7().simple()))
}

/// The `nobody` account, when this test runs as root and can act as it.
fn another_account() -> Option<User> {
    if !Uid::effective().is_root() {
        eprintln!("skipped: needs root, to try the connection as another OS user");
        return None;
    }
    User::from_name("nobody").ok().flatten()
}

/// What `psql` says when `user` tries to connect to the cluster at `url`.
fn connect_as(user: &User, url: &str) -> std::process::Output {
    // psql is beside the server binaries, or on PATH (Debian's wrapper).
    let bin = local_postgres::find_binaries().expect("PostgreSQL's binaries");
    let path = format!("{}:/usr/local/bin:/usr/bin:/bin", bin.display());
    std::process::Command::new("psql")
        .args([url, "-c", "SELECT 1"])
        .uid(user.uid.as_raw())
        .gid(user.gid.as_raw())
        .env_clear()
        .env("PATH", path)
        .stdin(Stdio::null())
        .output()
        .expect("run psql")
}

#[tokio::test]
async fn another_local_account_cannot_connect_to_the_private_cluster() {
    let Some(nobody) = another_account() else {
        return;
    };
    let data_dir = scratch_dir("convo-private");
    let cluster = LocalPostgres::start(&LocalPostgresOptions {
        data_dir: data_dir.clone(),
        fsync: false,
        access: Access::Private,
        relocate_if_unreachable: false,
    })
    .await
    .expect("start a private cluster");
    let url = cluster.url("postgres");
    assert!(
        !url.contains("127.0.0.1"),
        "a private cluster has no TCP address: {url}"
    );
    // convo itself (root here) connects; the other account is refused at the
    // socket, whatever role it names.
    let mut conn =
        <diesel_async::AsyncPgConnection as diesel_async::AsyncConnection>::establish(&url)
            .await
            .expect("convo connects through its socket");
    diesel_async::SimpleAsyncConnection::batch_execute(&mut conn, "SELECT 1")
        .await
        .unwrap();
    drop(conn);
    let refused = connect_as(&nobody, &url);
    assert!(!refused.status.success(), "nobody connected to {url}");
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("Permission denied"), "{why}");
    cluster.stop().await;
    let _ = std::fs::remove_dir_all(&data_dir);
}

/// `convo serve` in `cwd`, with `--data-dir` unless `None`, once it serves.
async fn serve(cwd: &Path, data_dir: Option<&Path>) -> (tokio::process::Child, SocketAddr) {
    start_convo(|command| {
        command.current_dir(cwd);
        if let Some(dir) = data_dir {
            command.arg("--data-dir").arg(dir);
        }
    })
    .await
}

async fn create_conversation(addr: SocketAddr) -> proto::Conversation {
    let channel = channel_to(addr).await;
    let mut client = proto::conversation_service_client::ConversationServiceClient::new(channel);
    client
        .create_conversation(as_alice(proto::CreateConversationRequest::default()))
        .await
        .expect("create a conversation")
        .into_inner()
}

fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// Waits up to 20 s for process `pid` to be gone; `why` fails the test if not.
async fn assert_exits_soon(pid: i32, why: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while alive(pid) {
        assert!(Instant::now() < deadline, "{why}");
        sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postmaster_dies_with_convo_and_a_leftover_one_is_stopped_at_the_next_start() {
    let data_dir = scratch_dir("convo-orphan");
    let cwd = std::env::temp_dir();
    let (mut server, addr) = serve(&cwd, Some(&data_dir)).await;
    create_conversation(addr).await;
    let postmaster = postmaster_pid(&data_dir).expect("the cluster runs");
    assert!(alive(postmaster));

    // A hard kill leaves convo no chance to stop PostgreSQL itself.
    server.start_kill().unwrap();
    server.wait().await.unwrap();
    assert_exits_soon(
        postmaster,
        "the postmaster outlived the convo that started it",
    )
    .await;

    // A postmaster left running on the directory (here started by hand, as a
    // convo without the kernel's help would leave it) is stopped at the
    // next start, which then serves the same data.
    let bin = local_postgres::find_binaries().expect("PostgreSQL's binaries");
    let mut leftover = std::process::Command::new(bin.join("postgres"));
    leftover
        .arg("-D")
        .arg(std::fs::canonicalize(&data_dir).unwrap())
        .args(["-c", "listen_addresses=", "-c"])
        .arg(format!("unix_socket_directories={}", data_dir.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if Uid::effective().is_root() {
        let postgres = User::from_name("postgres").unwrap().unwrap();
        leftover
            .uid(postgres.uid.as_raw())
            .gid(postgres.gid.as_raw());
    }
    let mut leftover = leftover.spawn().expect("start a leftover postmaster");
    let deadline = Instant::now() + Duration::from_secs(20);
    while postmaster_pid(&data_dir) != Some(leftover.id() as i32) {
        assert!(Instant::now() < deadline, "the leftover did not start");
        sleep(Duration::from_millis(50)).await;
    }
    let (mut server, addr) = serve(&cwd, Some(&data_dir)).await;
    assert!(
        leftover.try_wait().unwrap().is_some(),
        "the leftover postmaster was stopped"
    );
    create_conversation(addr).await;
    stop_and_read_log(&mut server).await;
    let _ = std::fs::remove_dir_all(&data_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_convo_on_the_same_data_directory_is_refused_and_the_first_keeps_serving() {
    let data_dir = scratch_dir("convo-shared");
    let (mut first, addr) = serve(&std::env::temp_dir(), Some(&data_dir)).await;
    let postmaster = postmaster_pid(&data_dir).expect("the cluster runs");

    let second = crate::helpers::convo_binary()
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data_dir)
        .output();
    let second = tokio::time::timeout(Duration::from_secs(60), second)
        .await
        .expect("the second convo serve is refused, not left serving")
        .expect("run a second convo serve");
    assert!(!second.status.success());
    let said = String::from_utf8_lossy(&second.stderr);
    assert!(
        said.contains("is in use by another convo")
            && said.contains(&format!("(process {})", first.id().unwrap())),
        "{said}"
    );

    // The first one's PostgreSQL was left alone.
    assert_eq!(postmaster_pid(&data_dir), Some(postmaster));
    create_conversation(addr).await;
    let log = stop_and_read_log(&mut first).await;
    assert!(!log.contains("exited on its own"), "{log}");
    let _ = std::fs::remove_dir_all(&data_dir);
}

/// Every session convo opens ends as libpq ends one, its prepared
/// statements closed and a goodbye sent: the private cluster's log, the one
/// convo quotes when the cluster dies, holds no broken pipe or reset from
/// `convo migrate`, the pool, the change listener or the shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_private_cluster_logs_no_session_convo_left_without_a_goodbye() {
    let data_dir = scratch_dir("convo-goodbye");
    let migrated = crate::helpers::convo_binary()
        .arg("migrate")
        .arg("--data-dir")
        .arg(&data_dir)
        .env_remove("DATABASE_URL")
        .output();
    let migrated = tokio::time::timeout(Duration::from_secs(120), migrated)
        .await
        .expect("convo migrate finishes")
        .expect("run convo migrate");
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );

    let (mut server, addr) = serve(&std::env::temp_dir(), Some(&data_dir)).await;
    let direct = format!(
        "postgres://postgres@localhost/convo?host={}",
        data_dir.display()
    );
    let log = use_then_stop(&mut server, addr, &direct).await;
    assert!(log.contains("private PostgreSQL stopped"), "{log}");
    assert_no_session_left_without_a_goodbye(&data_dir, &log);
    let _ = std::fs::remove_dir_all(&data_dir);
}

/// The same with a database convo does not own (DATABASE_URL, over TCP):
/// convo exits right after its shutdown, and the pool's sessions, the
/// listener's and the publisher's have all said goodbye by then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_convo_does_not_own_logs_no_session_left_without_a_goodbye() {
    let data_dir = scratch_dir("convo-goodbye-external");
    let cluster = LocalPostgres::start(&LocalPostgresOptions {
        data_dir: data_dir.clone(),
        fsync: false,
        access: Access::Loopback { port: None },
        relocate_if_unreachable: false,
    })
    .await
    .expect("start a cluster convo does not own");
    let url = cluster.url("convo");
    let (mut server, addr) = start_convo(|command| {
        command.env("DATABASE_URL", &url);
    })
    .await;
    let log = use_then_stop(&mut server, addr, &url).await;
    assert!(log.contains("server stopped"), "{log}");
    // Smart: the test's own session may still be closing.
    cluster.shut_down().await;
    assert_no_session_left_without_a_goodbye(&data_dir, &log);
    let _ = std::fs::remove_dir_all(&data_dir);
}

/// Appends to and resumes a conversation through convo at `addr`, then
/// stops it while notifications keep arriving from another session (at
/// `database_url`, a URL of convo's database that may open sessions as
/// `postgres`); returns convo's log.
async fn use_then_stop(
    server: &mut tokio::process::Child,
    addr: SocketAddr,
    database_url: &str,
) -> String {
    let channel = channel_to(addr).await;
    let mut client = proto::conversation_service_client::ConversationServiceClient::new(channel);
    let conversation = create_conversation(addr).await;
    // Prepared statements on pooled sessions, for the shutdown to close.
    for n in 0..4 {
        client
            .append_message(as_alice(proto::AppendMessageRequest {
                conversation_id: conversation.id.clone(),
                role: proto::Role::User as i32,
                content: format!("message {n}"),
                ..Default::default()
            }))
            .await
            .expect("append");
    }
    client
        .resume_conversation(as_alice(proto::ResumeConversationRequest {
            conversation_id: conversation.id.clone(),
            max_messages: 10,
        }))
        .await
        .expect("resume");
    // Notifications arriving right up to the listener's last moment, as from
    // a busy replica: a listener that hung up without reading them left
    // PostgreSQL a reset or a broken pipe.
    let mut direct =
        <diesel_async::AsyncPgConnection as diesel_async::AsyncConnection>::establish(database_url)
            .await
            .expect("connect to convo's database");
    // The listener connects in the background once convo serves.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !notify_while_convo_listens(&mut direct).await {
        assert!(
            Instant::now() < deadline,
            "convo's change listener did not connect"
        );
        sleep(Duration::from_millis(20)).await;
    }
    // One burst per publish interval, as another replica's publisher sends
    // at most: back to back, they outran a listener starved of CPU, whose
    // goodbye then waited behind an ever longer backlog.
    let notifier = tokio::spawn(async move {
        while notify_while_convo_listens(&mut direct).await {
            sleep(Duration::from_millis(10)).await;
        }
    });
    let log = stop_and_read_log(server).await;
    notifier.await.expect("the notifier ends");
    log
}

/// The cluster's log at `data_dir` shows no session that ended without a
/// goodbye, and no session ended by the server. `convo_log` is convo's own,
/// shown beside the cluster's when it does.
fn assert_no_session_left_without_a_goodbye(data_dir: &Path, convo_log: &str) {
    let cluster_log =
        std::fs::read_to_string(data_dir.join("convo-postgres.log")).expect("the cluster's log");
    for noise in [
        "could not receive data from client",
        "could not send data to client",
        "connection to client lost",
        "unexpected EOF",
        "FATAL",
    ] {
        assert!(
            !cluster_log.contains(noise),
            "{noise}:\n{cluster_log}\nconvo's log:\n{convo_log}"
        );
    }
}

/// Sends a burst of notifications on convo's channel; answers whether
/// convo's listener session was still there (false once it is gone or the
/// cluster refuses).
async fn notify_while_convo_listens(conn: &mut diesel_async::AsyncPgConnection) -> bool {
    use diesel_async::RunQueryDsl;
    #[derive(diesel::QueryableByName)]
    struct Listening {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        listening: bool,
    }
    // Payloads differ (PostgreSQL folds equal ones sent in one transaction)
    // and are long, so that the listener is mostly busy reading them.
    diesel::sql_query(
        "SELECT bool_and(EXISTS (SELECT FROM pg_stat_activity \
                                  WHERE application_name = 'convo-listener')) AS listening \
           FROM generate_series(1, 50) AS n, \
                LATERAL pg_notify('convo_changes', n || repeat(' from another replica', 350))",
    )
    .get_result::<Listening>(conn)
    .await
    .is_ok_and(|now| now.listening)
}

/// The answer of `call`, repeated while it fails with UNAVAILABLE, for up
/// to 30 s.
async fn until_available<T, F, Fut>(mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match call().await {
            Ok(answer) => return answer.into_inner(),
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                assert!(Instant::now() < deadline, "still unavailable: {status:?}");
                sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// `message` as a request from alice.
fn as_alice<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("x-user-id", "alice".parse().unwrap());
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_postgres_that_dies_is_started_again_with_everything_it_committed() {
    let data_dir = scratch_dir("convo-restart");
    let (mut server, addr) = serve(&std::env::temp_dir(), Some(&data_dir)).await;
    let channel = channel_to(addr).await;
    let mut client =
        proto::conversation_service_client::ConversationServiceClient::new(channel.clone());
    let conversation = create_conversation(addr).await;
    let append = |content: &str| {
        as_alice(proto::AppendMessageRequest {
            conversation_id: conversation.id.clone(),
            role: proto::Role::User as i32,
            content: content.to_owned(),
            request_id: content.to_owned(),
            ..Default::default()
        })
    };
    client.append_message(append("before")).await.unwrap();

    // As the OOM killer would: no shutdown, no checkpoint.
    let postmaster = postmaster_pid(&data_dir).expect("the cluster runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(postmaster),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let restarted = loop {
        match postmaster_pid(&data_dir) {
            Some(pid) if pid != postmaster && alive(pid) => break pid,
            _ => {
                assert!(
                    Instant::now() < deadline,
                    "PostgreSQL was not started again"
                );
                sleep(Duration::from_millis(50)).await;
            }
        }
    };

    // Calls fail as in any outage (a pooled session of the dead cluster is
    // found dead when used) and succeed on retry, as a client retries
    // UNAVAILABLE: the acknowledged message is there and appends go on
    // after it.
    let resumed = until_available(|| {
        let mut client = client.clone();
        let request = as_alice(proto::ResumeConversationRequest {
            conversation_id: conversation.id.clone(),
            max_messages: 10,
        });
        async move { client.resume_conversation(request).await }
    })
    .await;
    let contents: Vec<_> = resumed
        .messages
        .iter()
        .map(|m| m.content.as_str())
        .collect();
    assert_eq!(contents, ["before"]);
    let after = until_available(|| {
        let mut client = client.clone();
        let request = append("after");
        async move { client.append_message(request).await }
    })
    .await;
    assert_eq!(after.sequence, 2);
    crate::helpers::wait_for_health(
        channel,
        tonic_health::pb::health_check_response::ServingStatus::Serving,
    )
    .await;

    assert_eq!(postmaster_pid(&data_dir), Some(restarted));
    let log = stop_and_read_log(&mut server).await;
    assert!(
        log.contains("the private PostgreSQL exited on its own"),
        "{log}"
    );
    // The new postmaster stops with convo, as the first one would have.
    assert_exits_soon(restarted, "the restarted postmaster outlived convo").await;
    let _ = std::fs::remove_dir_all(&data_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quick_start_works_as_root_from_a_private_home_directory() {
    if !Uid::effective().is_root() {
        eprintln!("skipped: the private-home case exists only for root");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    // A home directory of mode 0700, and a checkout inside it.
    let home = scratch_dir("convo-home");
    let checkout = home.join("convo");
    std::fs::create_dir_all(&checkout).unwrap();
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();

    // No flag: the README's command.
    let (mut server, addr) = serve(&checkout, None).await;
    let created = create_conversation(addr).await;
    assert_eq!(created.user_id, "alice");
    let link = checkout.join("convo-data");
    let data_dir = std::fs::read_link(&link).expect("./convo-data links to the data");
    assert!(
        data_dir.starts_with("/var/lib/convo"),
        "{}",
        data_dir.display()
    );
    assert!(data_dir.join("PG_VERSION").exists());

    // The server's own connections use a role that is not a superuser.
    let admin = format!(
        "postgres://postgres@{}/convo",
        percent_encoding::utf8_percent_encode(
            &data_dir.to_string_lossy(),
            percent_encoding::NON_ALPHANUMERIC
        )
    );
    let mut conn =
        <diesel_async::AsyncPgConnection as diesel_async::AsyncConnection>::establish(&admin)
            .await
            .expect("root reaches the socket");
    #[derive(diesel::QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Text)]
        usename: String,
        #[diesel(sql_type = diesel::sql_types::Bool)]
        superuser: bool,
    }
    let sessions: Vec<Row> = diesel_async::RunQueryDsl::load(
        diesel::sql_query(
            "SELECT a.usename::text AS usename, r.rolsuper AS superuser \
             FROM pg_stat_activity a JOIN pg_roles r ON r.oid = a.usesysid \
             WHERE a.datname = 'convo' AND a.pid <> pg_backend_pid()",
        ),
        &mut conn,
    )
    .await
    .unwrap();
    assert!(!sessions.is_empty());
    for session in &sessions {
        assert_eq!(session.usename, "convo_app");
        assert!(!session.superuser);
    }
    drop(conn);

    stop_and_read_log(&mut server).await;
    // A second start finds the data through the link.
    let (mut server, addr) = serve(&checkout, None).await;
    create_conversation(addr).await;
    stop_and_read_log(&mut server).await;
    // PostgreSQL, run as `postgres`, was not started in the private home.
    let cluster_log =
        std::fs::read_to_string(data_dir.join("convo-postgres.log")).expect("the cluster's log");
    assert!(
        !cluster_log.contains("could not change directory"),
        "{cluster_log}"
    );
    let _ = std::fs::remove_dir_all(&data_dir);
    let _ = std::fs::remove_dir_all(&home);
}
