//! Test harness: a real convo server on port 0 per test, talking to its own
//! database cloned from a migrated template, dropped when the test ends.
//!
//! The database server is `TEST_DATABASE_URL` or `DATABASE_URL` when set;
//! otherwise a private PostgreSQL (the same code as `convo serve`'s embedded
//! default) started once per test process in a throwaway directory and
//! stopped, with its files removed, when the process exits.

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use convo::{
    config::Settings,
    domain::Limits,
    grpc::proto::{self, conversation_service_client::ConversationServiceClient},
    local_postgres::{Access, LocalPostgres, LocalPostgresOptions},
    service::WatchLimits,
    startup::{Application, StartupError},
    store::{self, ChangeFeed, FeedSettings, PoolSettings},
};
use diesel::{QueryableByName, sql_types::BigInt};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use tokio::sync::{OnceCell, oneshot};
use tonic::{
    Code, Request, Status,
    metadata::{AsciiMetadataValue, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// The database server the tests use, and the migrated template to clone.
struct TestCluster {
    /// A URL to the server's `postgres` database, for CREATE/DROP DATABASE.
    admin_url: String,
    template: String,
    /// Under Citus (`CONVO_TEST_CITUS_URL`), the workers' `postgres` URLs:
    /// each test database is cloned on every node (see [`start_citus`]).
    workers: Vec<String>,
}

/// The Citus coordinator the tests run against, when one is given.
pub fn citus_url() -> Option<String> {
    std::env::var("CONVO_TEST_CITUS_URL")
        .ok()
        .filter(|url| !url.is_empty())
}

/// True when the suite runs against a Citus coordinator.
pub fn on_citus() -> bool {
    citus_url().is_some()
}

static CLUSTER: OnceCell<TestCluster> = OnceCell::const_new();
/// The private cluster's process id and directory, for the exit hook.
static PRIVATE: OnceLock<(i32, std::path::PathBuf)> = OnceLock::new();

async fn cluster() -> &'static TestCluster {
    CLUSTER.get_or_init(start_cluster).await
}

fn with_database(url: &str, database: &str) -> String {
    let mut url = url::Url::parse(url).expect("TEST_DATABASE_URL/DATABASE_URL is not a URL");
    url.set_path(&format!("/{database}"));
    url.to_string()
}

/// Server logs, for a failing test: `CONVO_TEST_LOG=debug cargo test …`.
pub fn init_test_logs() {
    if let Ok(level) = std::env::var("CONVO_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(level)
            .with_test_writer()
            .try_init();
    }
}

async fn start_cluster() -> TestCluster {
    init_test_logs();
    if let Some(url) = citus_url() {
        return start_citus(&url).await;
    }
    let server_url =
        match std::env::var("TEST_DATABASE_URL").or_else(|_| std::env::var("DATABASE_URL")) {
            Ok(url) if !url.is_empty() => url,
            _ => {
                let base = if std::path::Path::new("/dev/shm").is_dir() {
                    std::path::PathBuf::from("/dev/shm")
                } else {
                    std::env::temp_dir()
                };
                let data_dir = base.join(format!("convo-test-{}", std::process::id()));
                let _ = std::fs::remove_dir_all(&data_dir);
                let local = LocalPostgres::start(&LocalPostgresOptions {
                    data_dir: data_dir.clone(),
                    fsync: false,
                    access: Access::Loopback { port: None },
                    relocate_if_unreachable: false,
                })
                .await
                .unwrap_or_else(|e| panic!("cannot start a private PostgreSQL for the tests: {e}"));
                let url = local.url("postgres");
                let pid = local.pid().expect("the private PostgreSQL is running") as i32;
                PRIVATE
                    .set((pid, data_dir))
                    .expect("the cluster starts once");
                // The cluster lives as long as the test process; the exit hook stops it.
                std::mem::forget(local);
                // SAFETY: registers a plain `extern "C" fn` with the C runtime.
                unsafe { nix::libc::atexit(stop_private_cluster) };
                url
            }
        };
    let admin_url = with_database(&server_url, "postgres");
    // One template per schema version: a new migration gets a new template.
    let template = format!("convo_template_{}", migrations_fingerprint());
    let mut admin = AsyncPgConnection::establish(&admin_url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test PostgreSQL at {admin_url}: {e}"));
    // Several test processes may share a server: build the template under a lock.
    admin
        .batch_execute("SELECT pg_advisory_lock(7243001)")
        .await
        .expect("lock");
    let exists = diesel::sql_query("SELECT count(*) AS n FROM pg_database WHERE datname = $1")
        .bind::<diesel::sql_types::Text, _>(&template)
        .get_result::<Count>(&mut admin)
        .await
        .expect("query pg_database")
        .n
        > 0;
    if !exists {
        for sql in [
            format!("DROP DATABASE IF EXISTS {template}_building"),
            format!("CREATE DATABASE {template}_building"),
        ] {
            admin
                .batch_execute(&sql)
                .await
                .expect("create the template database");
        }
        store::run_pending_migrations(&with_database(&server_url, &format!("{template}_building")))
            .await
            .expect("migrate the template database");
        for sql in [
            format!("ALTER DATABASE {template}_building RENAME TO {template}"),
            format!("ALTER DATABASE {template} WITH IS_TEMPLATE true"),
        ] {
            admin
                .batch_execute(&sql)
                .await
                .expect("publish the template database");
        }
    }
    admin
        .batch_execute("SELECT pg_advisory_unlock(7243001)")
        .await
        .expect("unlock");
    TestCluster {
        admin_url,
        template,
        workers: Vec::new(),
    }
}

/// Runs SQL on the database at `url`, or panics naming both.
pub async fn execute_on(url: &str, sql: &str) {
    let mut conn = AsyncPgConnection::establish(url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    conn.batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{url}: {sql}: {e}"));
}

#[derive(QueryableByName)]
struct Node {
    #[diesel(sql_type = diesel::sql_types::Text)]
    nodename: String,
    #[diesel(sql_type = diesel::sql_types::Integer)]
    nodeport: i32,
}

/// The template under Citus: a database of the same name on the coordinator
/// and on every worker, with the nodes added, migrated and distributed (8
/// shards, so a test's users spread over both workers). A clone made on every
/// node under one name is a cluster of its own: Citus reaches the workers'
/// databases by the coordinator's database name.
async fn start_citus(coordinator_url: &str) -> TestCluster {
    let admin_url = with_database(coordinator_url, "postgres");
    let mut conn = AsyncPgConnection::establish(coordinator_url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to CONVO_TEST_CITUS_URL: {e}"));
    let nodes: Vec<Node> = diesel::sql_query(
        "SELECT nodename::text AS nodename, nodeport FROM pg_dist_node \
         WHERE groupid <> 0 AND isactive ORDER BY nodeport",
    )
    .load(&mut conn)
    .await
    .unwrap_or_else(|e| panic!("CONVO_TEST_CITUS_URL is not a Citus coordinator: {e}"));
    assert!(!nodes.is_empty(), "the Citus coordinator has no workers");
    let coordinator = url::Url::parse(coordinator_url).expect("CONVO_TEST_CITUS_URL is a URL");
    let workers: Vec<String> = nodes
        .iter()
        .map(|node| {
            let mut url = coordinator.clone();
            url.set_host(Some(&node.nodename)).expect("worker host");
            url.set_port(Some(node.nodeport as u16))
                .expect("worker port");
            url.set_path("/postgres");
            url.to_string()
        })
        .collect();
    let everywhere: Vec<&String> = std::iter::once(&admin_url).chain(&workers).collect();
    // Distribution adds the append's function: its changes need a new template.
    let template = format!(
        "convo_citus_template_{}",
        fingerprint(&["migrations", "src/store/sql", "src/store/distribute.rs"])
    );
    let mut admin = AsyncPgConnection::establish(&admin_url)
        .await
        .expect("admin");
    admin
        .batch_execute("SELECT pg_advisory_lock(7243002)")
        .await
        .expect("lock");
    let ready = count_on(
        &admin_url,
        &format!(
            "SELECT count(*) AS n FROM pg_database WHERE datname = '{template}' AND datistemplate"
        ),
    )
    .await
        > 0;
    if !ready {
        for node in &everywhere {
            execute_on(
                node,
                &format!("DROP DATABASE IF EXISTS {template} WITH (FORCE)"),
            )
            .await;
            execute_on(node, &format!("CREATE DATABASE {template}")).await;
            execute_on(&with_database(node, &template), "CREATE EXTENSION citus").await;
        }
        let host = coordinator.host_str().expect("coordinator host");
        let port = coordinator.port().unwrap_or(5432);
        let mut add = format!("SELECT citus_set_coordinator_host('{host}', {port});");
        for node in &nodes {
            add += &format!(
                "SELECT citus_add_node('{}', {});",
                node.nodename, node.nodeport
            );
        }
        let template_url = with_database(coordinator_url, &template);
        execute_on(&template_url, &add).await;
        store::distribute(&template_url, Some(8))
            .await
            .expect("migrate and distribute the template database");
        for node in everywhere.iter().rev() {
            close_template(node, &template).await;
        }
    }
    admin
        .batch_execute("SELECT pg_advisory_unlock(7243002)")
        .await
        .expect("unlock");
    TestCluster {
        admin_url,
        template,
        workers,
    }
}

/// Makes `template` on this node a template no session holds open: Citus
/// keeps a maintenance daemon connected to every database it is used in,
/// and a database being accessed cannot be cloned.
async fn close_template(node_admin_url: &str, template: &str) {
    execute_on(
        node_admin_url,
        &format!(
            "ALTER DATABASE {template} WITH ALLOW_CONNECTIONS false IS_TEMPLATE true; \
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{template}'"
        ),
    )
    .await;
}

/// A short hash of the migration files, so a changed schema gets a new template.
fn migrations_fingerprint() -> String {
    fingerprint(&["migrations"])
}

/// A short hash of these files and folders (relative to the crate).
fn fingerprint(paths: &[&str]) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<_> = paths
        .iter()
        .flat_map(|path| {
            let path = root.join(path);
            if path.is_dir() {
                walk(&path)
            } else {
                vec![path]
            }
        })
        .collect();
    files.sort();
    let mut hash: u64 = 0xcbf29ce484222325;
    for path in files {
        for byte in path
            .to_string_lossy()
            .bytes()
            .chain(std::fs::read(&path).unwrap_or_default())
        {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x100000001b3);
        }
    }
    format!("{hash:016x}")
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(walk(&path));
        } else {
            found.push(path);
        }
    }
    found
}

extern "C" fn stop_private_cluster() {
    use nix::{
        sys::{
            signal::{Signal, kill},
            wait::waitpid,
        },
        unistd::Pid,
    };
    if let Some((pid, data_dir)) = PRIVATE.get() {
        let pid = Pid::from_raw(*pid);
        // Immediate shutdown: the data is thrown away anyway.
        let _ = kill(pid, Signal::SIGQUIT);
        let _ = waitpid(pid, None);
        let _ = std::fs::remove_dir_all(data_dir);
    }
}

/// One row, one number: what the count helpers read.
#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// A single number from SQL run on the database at `url`.
async fn count_on(url: &str, sql: &str) -> i64 {
    let mut conn = AsyncPgConnection::establish(url)
        .await
        .expect("connect to the test PostgreSQL");
    diesel::sql_query(sql)
        .get_result::<Count>(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .n
}

/// A database of one test's own, cloned from the template; dropped on drop.
pub struct TestDb {
    pub name: String,
    pub url: String,
    admin_url: String,
    /// Under Citus, the workers' `postgres` URLs: the database is on each.
    workers: Vec<String>,
    /// Roles a test created, dropped after the database.
    roles: std::sync::Mutex<Vec<String>>,
}

impl TestDb {
    pub async fn create() -> Self {
        let cluster = cluster().await;
        let name = format!("convo_test_{}", uuid::Uuid::now_v7().simple());
        for node in std::iter::once(&cluster.admin_url).chain(&cluster.workers) {
            clone_template(node, &cluster.template, &name).await;
        }
        let url = with_database(&cluster.admin_url, &name);
        Self {
            url,
            name,
            admin_url: cluster.admin_url.clone(),
            workers: cluster.workers.clone(),
            roles: std::sync::Mutex::default(),
        }
    }

    /// The URL a test server connects with. Under Citus its sessions turn
    /// any statement that spans several shards into an error, so the whole
    /// suite checks that every call is a single-shard query; the store's
    /// deliberate exceptions (retention, the watch catch-up) lift it locally.
    pub fn server_url(&self) -> String {
        if self.workers.is_empty() {
            return self.url.clone();
        }
        let mut url = url::Url::parse(&self.url).expect("test database URL");
        url.query_pairs_mut()
            .append_pair("options", "-ccitus.multi_task_query_log_level=error");
        url.to_string()
    }

    /// Under Citus, the `postgres` URL of the worker listening on `port`.
    pub fn worker_admin_url(&self, port: i32) -> String {
        self.workers
            .iter()
            .find(|url| url::Url::parse(url).ok().and_then(|u| u.port()) == Some(port as u16))
            .unwrap_or_else(|| panic!("no worker on port {port}"))
            .clone()
    }

    /// A direct connection to this test's database, for checks behind the API.
    pub async fn connect(&self) -> AsyncPgConnection {
        AsyncPgConnection::establish(&self.url)
            .await
            .expect("connect to the test database")
    }

    /// A transaction of the test's own holding the row lock of `user`'s
    /// conversation `id` (rolled back when the connection is dropped or told
    /// to): appends to it wait.
    pub async fn hold_row(&self, user: &str, id: &str) -> AsyncPgConnection {
        let mut holder = self.connect().await;
        holder
            .batch_execute(&format!(
                "BEGIN; SELECT 1 FROM conversations WHERE user_id = '{user}' AND id = '{id}' FOR UPDATE"
            ))
            .await
            .expect("lock the conversation's row");
        holder
    }

    /// Runs SQL as the superuser on the server's `postgres` database.
    pub async fn admin(&self, sql: &str) {
        let mut admin = AsyncPgConnection::establish(&self.admin_url)
            .await
            .expect("admin connection");
        admin
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// Drops `role` when this database is dropped.
    pub fn drop_role_on_drop(&self, role: &str) {
        self.roles.lock().unwrap().push(role.to_owned());
    }

    /// Makes the database refuse connections and ends those it has: to the
    /// server, the database has gone away.
    pub async fn take_offline(&self) {
        self.admin(&format!(
            "ALTER DATABASE {0} ALLOW_CONNECTIONS false; \
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{0}'",
            self.name
        ))
        .await;
    }

    pub async fn bring_online(&self) {
        self.admin(&format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS true",
            self.name
        ))
        .await;
    }

    /// Runs SQL on this test's database, to arrange what the API cannot.
    pub async fn run_sql(&self, sql: &str) {
        let mut conn = self.connect().await;
        conn.batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// A single number from SQL run on the server's `postgres` database.
    pub async fn count_admin(&self, sql: &str) -> i64 {
        count_on(&self.admin_url, sql).await
    }

    /// A single number from SQL run on this test's database.
    pub async fn count(&self, sql: &str) -> i64 {
        count_on(&self.url, sql).await
    }

    /// How many sessions of this test's database wait for a lock. On Citus
    /// a write waits on the worker holding the row, so every node's
    /// sessions are counted.
    pub async fn sessions_waiting_for_a_lock(&self) -> i64 {
        let activity = if on_citus() {
            "citus_stat_activity"
        } else {
            "pg_stat_activity"
        };
        self.count(&format!(
            "SELECT count(*) AS n FROM {activity} \
              WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ))
        .await
    }

    /// Returns once at least `sessions` wait for a lock; fails with `never`
    /// after 10 s.
    pub async fn until_waiting_for_a_lock(&self, sessions: i64, never: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.sessions_waiting_for_a_lock().await < sessions {
            assert!(tokio::time::Instant::now() < deadline, "{never}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// `CREATE DATABASE name TEMPLATE template` on one node. Clones of one
/// template can briefly contend, and under Citus a maintenance daemon may
/// have reached the template: retry, ending such sessions.
async fn clone_template(node_admin_url: &str, template: &str, name: &str) {
    let mut admin = AsyncPgConnection::establish(node_admin_url)
        .await
        .expect("admin connection");
    let statement = format!("CREATE DATABASE {name} TEMPLATE {template} STRATEGY FILE_COPY");
    let mut attempt = 0;
    loop {
        match admin.batch_execute(&statement).await {
            Ok(()) => return,
            Err(e) if attempt < 50 && e.to_string().contains("being accessed by other users") => {
                attempt += 1;
                let _ = admin
                    .batch_execute(&format!(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                         WHERE datname = '{template}' AND backend_type <> 'client backend'"
                    ))
                    .await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("cannot clone the template database: {e}"),
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        let roles = std::mem::take(&mut *self.roles.lock().unwrap_or_else(|p| p.into_inner()));
        let workers = self.workers.clone();
        // Drop cannot await; a short-lived runtime on its own thread can.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async {
                // Every node, even after one failed: a database left on a
                // worker is as much a leak as one left on the coordinator.
                let mut failures = Vec::new();
                let drop_database = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                for node in workers.iter().chain([&admin_url]) {
                    if let Err(e) = until_done(node, &drop_database).await {
                        failures.push(e);
                    }
                }
                for role in roles {
                    if let Err(e) =
                        until_done(&admin_url, &format!("DROP ROLE IF EXISTS {role}")).await
                    {
                        failures.push(e);
                    }
                }
                if failures.is_empty() {
                    Ok(())
                } else {
                    Err(failures.join("; "))
                }
            })
        })
        .join()
        .unwrap_or_else(|_| Err("the dropping thread panicked".to_owned()));
        if let Err(reason) = dropped {
            eprintln!(
                "warning: could not drop test database {}: {reason}",
                self.name
            );
        }
    }
}

/// Runs `sql` on the server at `url`, trying again for a while: on a Citus
/// worker, a DROP DATABASE WITH (FORCE) was refused now and then ("being
/// accessed by other users"), the database's Citus maintenance daemon not
/// yet gone.
async fn until_done(url: &str, sql: &str) -> Result<(), String> {
    let mut last = String::new();
    for _ in 0..20 {
        match AsyncPgConnection::establish(url).await {
            Ok(mut conn) => match conn.batch_execute(sql).await {
                Ok(()) => return Ok(()),
                Err(e) => last = e.to_string(),
            },
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(format!("{sql}: {last}"))
}

/// Settings for a test server; adjust with [`TestApp::spawn_with`].
pub fn test_settings(database_url: &str) -> Settings {
    Settings {
        listen: "127.0.0.1:0".parse().expect("loopback address"),
        database_url: database_url.to_owned(),
        pool: PoolSettings {
            max_size: 8,
            acquire_timeout: Duration::from_secs(2),
            statement_timeout: Duration::from_secs(30),
            lock_timeout: Duration::from_secs(10),
            search_timeout: Duration::from_secs(3),
        },
        health_interval: Duration::from_millis(100),
        feed: FeedSettings::default(),
        limits: Limits::CONTRACT,
        page_token_secret: Some(b"test-secret".to_vec()),
        drain_timeout: Duration::from_secs(10),
        max_in_flight: 256,
        watch_limits: WatchLimits {
            per_user: 100,
            per_server: 10_000,
        },
        max_request_bytes: 4 * 1024 * 1024,
        max_response_bytes: 4 * 1024 * 1024,
        max_unread_bytes: 64 * 1024 * 1024,
        metrics_addr: None,
        retention: None,
        tls: None,
        health_listen: None,
        jwt: None,
    }
}

/// A running convo server with its own database.
pub struct TestApp {
    pub db: Arc<TestDb>,
    addr: std::net::SocketAddr,
    /// The server's live-change feed, to observe its watchers.
    pub changes: ChangeFeed,
    channel: Channel,
    /// The channels convo.v1 clients send their calls over, in turn: this
    /// server's, and under `CONVO_TEST_REPLICAS=2` a second replica's.
    calls: Alternating,
    /// The second replica of `CONVO_TEST_REPLICAS=2`, kept running.
    twin: Option<Box<TestApp>>,
    shutdown: std::sync::Mutex<Option<oneshot::Sender<()>>>,
    server: tokio::sync::Mutex<Option<tokio::task::JoinHandle<Result<(), StartupError>>>>,
}

/// True when every test's clients alternate between two replicas.
pub fn two_replicas() -> bool {
    std::env::var("CONVO_TEST_REPLICAS").is_ok_and(|n| n.trim() == "2")
}

/// Sends each call to the next of its channels in turn: one server, or two
/// replicas on one database (`CONVO_TEST_REPLICAS=2`), so that every test
/// also checks that no call depends on which replica served the one before.
#[derive(Clone)]
pub struct Alternating {
    channels: Vec<Channel>,
    next: Arc<std::sync::atomic::AtomicUsize>,
    /// The channel the current call goes to, picked in `poll_ready`.
    picked: usize,
}

impl Alternating {
    fn new(channels: Vec<Channel>) -> Self {
        Self {
            channels,
            next: Arc::default(),
            picked: 0,
        }
    }
}

/// One channel: every call to the one server behind it.
impl From<Channel> for Alternating {
    fn from(channel: Channel) -> Self {
        Self::new(vec![channel])
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for Alternating {
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future = <Channel as tower::Service<http::Request<tonic::body::Body>>>::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.picked =
            self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.channels.len();
        tower::Service::poll_ready(&mut self.channels[self.picked], cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        tower::Service::call(&mut self.channels[self.picked], request)
    }
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    pub async fn spawn_with(adjust: impl FnOnce(&mut Settings)) -> Self {
        Self::spawn_on(Arc::new(TestDb::create().await), adjust).await
    }

    /// One server even under `CONVO_TEST_REPLICAS=2`: for what each server
    /// decides alone (its limits, its shutdown, its metrics listener).
    pub async fn spawn_alone_with(adjust: impl FnOnce(&mut Settings)) -> Self {
        let db = Arc::new(TestDb::create().await);
        let mut settings = test_settings(&db.server_url());
        adjust(&mut settings);
        Self::spawn_single(db, settings).await
    }

    /// Another server on the same database: a second replica.
    pub async fn spawn_replica(&self) -> Self {
        Self::spawn_on(self.db.clone(), |_| {}).await
    }

    /// A second replica with its own settings.
    pub async fn spawn_replica_with(&self, adjust: impl FnOnce(&mut Settings)) -> Self {
        Self::spawn_on(self.db.clone(), adjust).await
    }

    /// A server on this test database, connecting with another URL (another role).
    /// A server on a test database made beforehand.
    pub async fn spawn_in(db: Arc<TestDb>) -> Self {
        Self::spawn_on(db, |_| {}).await
    }

    pub async fn spawn_with_url(db: Arc<TestDb>, url: &str) -> Self {
        let url = url.to_owned();
        Self::spawn_on(db, move |settings| settings.database_url = url).await
    }

    async fn spawn_on(db: Arc<TestDb>, adjust: impl FnOnce(&mut Settings)) -> Self {
        let mut settings = test_settings(&db.server_url());
        adjust(&mut settings);
        let mut app = Self::spawn_single(db.clone(), settings.clone()).await;
        if two_replicas() {
            let twin = Box::pin(Self::spawn_single(db, settings)).await;
            app.calls = Alternating::new(vec![app.channel.clone(), twin.channel.clone()]);
            app.twin = Some(Box::new(twin));
        }
        app
    }

    /// A server with these settings, alone (no twin of its own).
    async fn spawn_single(db: Arc<TestDb>, settings: Settings) -> Self {
        let app = Application::build(settings)
            .await
            .expect("build the server");
        let addr = app.local_addr();
        let changes = app.changes().clone();
        let (shutdown, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until(async {
            let _ = stopped.await;
        }));
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("server URI")
            .connect()
            .await
            .expect("connect to the test server");
        Self {
            db,
            addr,
            changes,
            calls: Alternating::new(vec![channel.clone()]),
            channel,
            twin: None,
            shutdown: std::sync::Mutex::new(Some(shutdown)),
            server: tokio::sync::Mutex::new(Some(server)),
        }
    }

    /// A client that calls as `user`.
    pub fn client(&self, user: &str) -> Client {
        self.client_with_header(Some(user.parse().expect("test user ids are ASCII")))
    }

    /// A client that sends `x-user-id` exactly as given, or not at all.
    pub fn client_with_header(&self, user: Option<AsciiMetadataValue>) -> Client {
        ConversationServiceClient::with_interceptor(self.calls.clone(), UserHeader(user))
            .max_decoding_message_size(usize::MAX)
    }

    /// Asks the server (and its twin) to shut down gracefully, as SIGTERM would.
    pub fn shutdown(&self) {
        if let Some(twin) = &self.twin {
            twin.shutdown();
        }
        if let Some(shutdown) = self.shutdown.lock().ok().and_then(|mut s| s.take()) {
            let _ = shutdown.send(());
        }
    }

    /// Shuts the server down gracefully and waits until it has stopped.
    pub async fn shut_down_and_wait(&self) -> Result<(), StartupError> {
        self.shutdown();
        let server = self
            .server
            .lock()
            .await
            .take()
            .expect("the server is running");
        server.await.expect("the server task")
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Adds `x-user-id` to every call.
#[derive(Clone)]
pub struct UserHeader(Option<MetadataValue<tonic::metadata::Ascii>>);

impl UserHeader {
    pub fn new(user: &str) -> Self {
        Self(Some(user.parse().expect("test user ids are ASCII")))
    }
}

impl Interceptor for UserHeader {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(user) = &self.0 {
            request.metadata_mut().insert("x-user-id", user.clone());
        }
        Ok(request)
    }
}

pub type Client = ConversationServiceClient<InterceptedService<Alternating, UserHeader>>;

/// Asserts the status code and returns the status for further checks.
#[track_caller]
pub fn expect_code<T: std::fmt::Debug>(
    result: Result<tonic::Response<T>, Status>,
    code: Code,
) -> Status {
    match result {
        Ok(response) => panic!("expected {code:?}, got OK: {:?}", response.into_inner()),
        Err(status) => {
            assert_eq!(status.code(), code, "unexpected status: {status:?}");
            status
        }
    }
}

/// Asserts INVALID_ARGUMENT whose BadRequest details name `field`.
#[track_caller]
pub fn expect_invalid<T: std::fmt::Debug>(
    result: Result<tonic::Response<T>, Status>,
    field: &str,
) -> Status {
    use tonic_types::StatusExt;
    let status = expect_code(result, Code::InvalidArgument);
    let details = status.get_details_bad_request().unwrap_or_else(|| {
        panic!("INVALID_ARGUMENT without google.rpc.BadRequest details: {status:?}")
    });
    assert!(
        details.field_violations.iter().any(|v| v.field == field),
        "no violation names {field:?}: {:?}",
        details.field_violations
    );
    status
}

pub async fn create(client: &mut Client, title: &str) -> proto::Conversation {
    client
        .create_conversation(proto::CreateConversationRequest {
            title: title.to_owned(),
            ..Default::default()
        })
        .await
        .expect("create a conversation")
        .into_inner()
}

pub fn user_message(content: &str) -> proto::NewMessage {
    proto::NewMessage {
        role: proto::Role::User as i32,
        content: content.to_owned(),
        ..Default::default()
    }
}

pub async fn append(client: &mut Client, conversation_id: &str, content: &str) -> proto::Message {
    client
        .append_message(proto::AppendMessageRequest {
            conversation_id: conversation_id.to_owned(),
            role: proto::Role::User as i32,
            content: content.to_owned(),
            ..Default::default()
        })
        .await
        .expect("append a message")
        .into_inner()
}

/// Appends `n` messages `"m1".."mN"` in batches of up to 100.
/// `n` AppendMessage calls to one of `user`'s conversations sent at once,
/// each on a client and a task of its own, with request ids `k0`, `k1`, …:
/// their answers, in the order sent.
pub fn spawn_appends(
    app: &TestApp,
    user: &str,
    conversation_id: &str,
    n: usize,
) -> Vec<tokio::task::JoinHandle<Result<tonic::Response<proto::Message>, Status>>> {
    (0..n)
        .map(|i| {
            let mut client = app.client(user);
            let request = proto::AppendMessageRequest {
                conversation_id: conversation_id.to_owned(),
                role: proto::Role::User as i32,
                content: format!("append {i}"),
                request_id: format!("k{i}"),
                ..Default::default()
            };
            tokio::spawn(async move { client.append_message(request).await })
        })
        .collect()
}

/// Awaits appends started by [`spawn_appends`], every one of which must be
/// written, and returns their sequences in ascending order.
pub async fn written_sequences(
    appends: Vec<tokio::task::JoinHandle<Result<tonic::Response<proto::Message>, Status>>>,
) -> Vec<i64> {
    let mut sequences = Vec::with_capacity(appends.len());
    for append in appends {
        let stored = append
            .await
            .expect("the append's task")
            .expect("every queued append is written");
        sequences.push(stored.into_inner().sequence);
    }
    sequences.sort_unstable();
    sequences
}

pub async fn append_many(client: &mut Client, conversation_id: &str, n: usize) {
    let mut next = 1;
    while next <= n {
        let upto = (next + 99).min(n);
        client
            .append_messages(proto::AppendMessagesRequest {
                conversation_id: conversation_id.to_owned(),
                messages: (next..=upto)
                    .map(|i| user_message(&format!("m{i}")))
                    .collect(),
                ..Default::default()
            })
            .await
            .expect("append a batch");
        next = upto + 1;
    }
}

/// A protobuf timestamp as microseconds since the epoch, for comparisons.
#[track_caller]
pub fn micros(time: &Option<prost_types::Timestamp>) -> i64 {
    let time = time.as_ref().expect("timestamp is set");
    time.seconds * 1_000_000 + i64::from(time.nanos / 1_000)
}

/// The health of `service` ("" for the server as a whole).
pub async fn health(channel: Channel, service: &str) -> ServingStatus {
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .expect("health check")
        .into_inner()
        .status;
    ServingStatus::try_from(status).expect("a known serving status")
}

/// Waits until both the server and convo.v1 report `wanted`.
pub async fn wait_for_health(channel: Channel, wanted: ServingStatus) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let overall = health(channel.clone(), "").await;
        let service = health(channel.clone(), "convo.v1.ConversationService").await;
        if overall == wanted && service == wanted {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "health stayed {overall:?}/{service:?}, wanted {wanted:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every message of a conversation (up to 1,000), oldest first.
pub async fn all_messages(client: &mut Client, id: &str) -> Vec<proto::Message> {
    client
        .list_messages(proto::ListMessagesRequest {
            conversation_id: id.to_owned(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("list the messages")
        .into_inner()
        .messages
}

/// Reads a conversation back and asserts it equals `expected`: what a write
/// returned is what a later read returns.
pub async fn assert_stored(client: &mut Client, expected: &proto::Conversation) {
    let fetched = client
        .get_conversation(proto::GetConversationRequest {
            conversation_id: expected.id.clone(),
        })
        .await
        .expect("get the conversation")
        .into_inner();
    assert_eq!(&fetched, expected);
}

/// Opens a watch stream of the messages after `after_sequence`.
pub async fn watch(
    client: &mut Client,
    id: &str,
    after_sequence: i64,
) -> tonic::Streaming<proto::Message> {
    client
        .watch_conversation(proto::WatchConversationRequest {
            conversation_id: id.to_owned(),
            after_sequence,
        })
        .await
        .expect("start watching")
        .into_inner()
}

/// The fixed message of every storage outage: no SQL, driver text or
/// database name reaches a client.
pub const STORAGE_UNAVAILABLE: &str = "storage is temporarily unavailable; retry with backoff";

/// Runs `call` and asserts it fails UNAVAILABLE, with the fixed outage
/// message, in less than `within`: an outage fails fast, not after a hang.
pub async fn expect_unavailable_within<T: std::fmt::Debug>(
    within: Duration,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, Status>>,
) -> Status {
    let started = tokio::time::Instant::now();
    let status = expect_code(call.await, Code::Unavailable);
    assert!(
        started.elapsed() < within,
        "took {:?}, expected under {within:?}",
        started.elapsed()
    );
    assert_eq!(status.message(), STORAGE_UNAVAILABLE);
    status
}

/// The value of the first Prometheus series whose line starts with `series`.
pub fn metric(scraped: &str, series: &str) -> Option<f64> {
    scraped
        .lines()
        .find(|line| line.starts_with(series))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Asserts that a scraped series is present with a value of at least `min`.
#[track_caller]
pub fn assert_metric_at_least(scraped: &str, series: &str, min: f64) {
    assert!(
        metric(scraped, series).unwrap_or(0.0) >= min,
        "{series} below {min}: {scraped}"
    );
}

/// The convo binary, with no DATABASE_URL from the environment.
pub fn convo_binary() -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_convo"));
    command
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    command
}

/// Starts `convo serve --listen 127.0.0.1:<a free port>` (more arguments,
/// environment or working directory from `configure`), with its log at info
/// on a piped stderr, and waits until the port accepts connections. A server
/// that exits first fails the test with its log.
pub async fn start_convo(
    configure: impl FnOnce(&mut tokio::process::Command),
) -> (tokio::process::Child, std::net::SocketAddr) {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port");
    let mut command = convo_binary();
    command
        .args(["serve", "--listen", &addr.to_string()])
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped());
    configure(&mut command);
    let mut server = command.spawn().expect("start convo serve");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if let Ok(Some(status)) = server.try_wait() {
            let log = read_log(&mut server).await;
            panic!("convo serve exited with {status}: {log}");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "convo serve did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (server, addr)
}

/// A plaintext channel to a server started by [`start_convo`].
pub async fn channel_to(addr: std::net::SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("server URI")
        .connect()
        .await
        .expect("connect to convo serve")
}

async fn read_log(server: &mut tokio::process::Child) -> String {
    use tokio::io::AsyncReadExt;
    let mut log = String::new();
    if let Some(mut stderr) = server.stderr.take() {
        let _ = stderr.read_to_string(&mut log).await;
    }
    log
}

/// Stops a server started by [`start_convo`] with SIGTERM, as an operator
/// would, and returns its log once it has exited.
pub async fn stop_and_read_log(server: &mut tokio::process::Child) -> String {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.id().expect("running") as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("signal the server");
    let log = read_log(server).await;
    server.wait().await.expect("the server exits");
    log
}

/// [`stop_and_read_log`] for a server started with `--log-format json`: its
/// log lines, parsed.
pub async fn stop_and_read_json_log(server: &mut tokio::process::Child) -> Vec<serde_json::Value> {
    stop_and_read_log(server)
        .await
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .collect()
}
