use std::time::Duration;

use diesel::{ConnectionError, QueryResult};
use diesel_async::{
    AsyncConnectionCore, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection,
    methods::LoadQuery,
    pooled_connection::{PoolError, PoolableConnection},
    return_futures::LoadFuture,
};
use futures_util::FutureExt;

use super::{
    StoreError,
    tls::{DatabaseTarget, Opened},
};

pub(super) type Pool = bb8::Pool<Sessions>;

/// How the pool talks to PostgreSQL.
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    /// Connections per server replica; the pool is the only pooler (see scale-out.md).
    pub max_size: u32,
    /// How long a request waits for a connection before it fails with UNAVAILABLE.
    pub acquire_timeout: Duration,
    /// PostgreSQL's `statement_timeout` on every pooled connection.
    pub statement_timeout: Duration,
    /// PostgreSQL's `lock_timeout`: how long a statement waits for a row lock
    /// (an append waits for its conversation's) before giving up.
    pub lock_timeout: Duration,
    /// The `statement_timeout` of one search: what bounds the cost of
    /// ranking a query that matches most of a user's messages.
    pub search_timeout: Duration,
}

/// How long opening one connection may take (TCP, TLS, authentication,
/// session setup) before the attempt is abandoned. Without a bound, an
/// attempt to a server that accepts and never answers would hold its pool
/// slot for ever.
pub(super) fn connect_timeout(settings: &PoolSettings) -> Duration {
    settings.acquire_timeout.max(Duration::from_secs(1))
}

/// Opens one connection within `timeout`, for as long as it is kept: when
/// it is dropped, its driver ends the session in the background.
pub(super) async fn connect(
    target: &DatabaseTarget,
    timeout: Duration,
) -> Result<AsyncPgConnection, ConnectionError> {
    Ok(open(target, timeout).await?.conn)
}

/// [`connect`], with the notifications the session receives.
pub(super) async fn open(
    target: &DatabaseTarget,
    timeout: Duration,
) -> Result<Opened, ConnectionError> {
    match tokio::time::timeout(timeout, target.connect()).await {
        Ok(connected) => connected,
        Err(_) => Err(ConnectionError::BadConnection(format!(
            "no connection within {timeout:?}"
        ))),
    }
}

/// Timeouts and ended sessions are recognised by PostgreSQL's English
/// messages (see StoreError). A session answering in another language is
/// switched to English, which only a superuser may do; otherwise the setting
/// belongs on the role, which is said once per process. Asked first, so that
/// a role already set (as on the private cluster) leaves no failed `SET` in
/// PostgreSQL's log for every session.
async fn ensure_english_messages(conn: &mut AsyncPgConnection) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    #[derive(diesel::QueryableByName)]
    struct Setting {
        #[diesel(sql_type = diesel::sql_types::Text)]
        lc_messages: String,
    }
    let Ok(setting) = diesel::sql_query("SHOW lc_messages")
        .one_row::<Setting>(conn)
        .await
    else {
        return;
    };
    let value = setting.lc_messages;
    let english = value.is_empty()
        || value == "C"
        || value == "POSIX"
        || value.starts_with("C.")
        || value.starts_with("en");
    if english || conn.batch_execute("SET lc_messages = 'C'").await.is_ok() {
        return;
    }
    WARNED.call_once(|| {
        tracing::warn!(
            lc_messages = %value,
            "the database answers in another language, so lock and statement timeouts \
             would be reported as internal errors: run ALTER ROLE <convo's role> SET \
             lc_messages = 'C' as a superuser"
        );
    });
}

/// `database_url` with TCP keepalive probes after 30 s of silence (a peer
/// that vanished is noticed in about a minute, not PostgreSQL's default of two
/// hours) and, when given, an `application_name`, unless the URL sets them.
pub(super) fn session_url(database_url: &str, application_name: Option<&str>) -> String {
    let Ok(mut url) = url::Url::parse(database_url) else {
        return database_url.to_owned();
    };
    let present: Vec<String> = url.query_pairs().map(|(k, _)| k.into_owned()).collect();
    let has = |key: &str| present.iter().any(|k| k == key);
    {
        let mut query = url.query_pairs_mut();
        if !has("keepalives_idle") {
            query.append_pair("keepalives_idle", "30");
        }
        if let Some(name) = application_name
            && !has("application_name")
        {
            query.append_pair("application_name", name);
        }
    }
    url.to_string()
}

/// The repository: a pool of connections to convo's database. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    /// Where the pool connects, for cancel requests and the health probe.
    target: DatabaseTarget,
    pub(super) search_timeout: Duration,
    /// Set by statements that run on a Citus worker, where the session's own
    /// setting does not reach.
    pub(super) lock_timeout: Duration,
    /// Turns for watch streams' reads (see [`Store::list_messages_for_watch`]).
    pub(super) watch_reads: std::sync::Arc<tokio::sync::Semaphore>,
    /// Whether `convo distribute` made this a distributed cluster, once known.
    pub(super) distributed: std::sync::Arc<std::sync::OnceLock<bool>>,
    /// Appends to one conversation take turns here, not in the pool.
    pub(super) append_turns: std::sync::Arc<super::turns::AppendTurns>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("state", &self.pool.state())
            .finish()
    }
}

impl Store {
    /// Where the pool connects: the change feed's own sessions go there too.
    pub(super) fn target(&self) -> &DatabaseTarget {
        &self.target
    }

    /// The sessions this store and its change feed opened, for a shutdown to
    /// wait for their goodbyes once every clone of the store is dropped.
    pub fn open_sessions(&self) -> super::OpenSessions {
        self.target.open_sessions()
    }

    /// Builds the pool without connecting; the first query (or [`Store::ping`])
    /// opens the first connection.
    pub fn new(database_url: &str, settings: PoolSettings) -> Result<Self, StoreError> {
        let target = DatabaseTarget::parse(&session_url(database_url, None))
            .map_err(StoreError::InvalidUrl)?;
        let statement_timeout_ms = settings.statement_timeout.as_millis();
        let connect_timeout = connect_timeout(&settings);
        let lock_timeout_ms = settings.lock_timeout.as_millis();
        let sessions = Sessions {
            target: target.clone(),
            connect_timeout,
            // Every statement convo prepares finds rows by key, so its best
            // plan does not depend on the values bound: one generic plan per
            // session, never re-planned at each call (PostgreSQL otherwise may
            // keep planning the append and resume anew, about 0.3 ms each,
            // when a custom plan looks cheaper on paper). Except on a Citus
            // coordinator: it cannot plan the append's data-modifying CTEs
            // for unknown parameters ("could not create distributed plan"),
            // so there each call is planned with its values.
            setup: format!(
                "SET statement_timeout = {statement_timeout_ms}; \
                 SET lock_timeout = {lock_timeout_ms}; SET TIME ZONE 'UTC'; \
                 SELECT set_config('plan_cache_mode', \
                     CASE WHEN EXISTS (SELECT FROM pg_extension WHERE extname = 'citus') \
                          THEN 'force_custom_plan' ELSE 'force_generic_plan' END, false); \
                 SELECT set_config('citus.propagate_set_commands', 'local', false) \
                   FROM pg_extension WHERE extname = 'citus'"
            ),
        };
        let pool = bb8::Pool::builder()
            .max_size(settings.max_size)
            .min_idle(None)
            .connection_timeout(settings.acquire_timeout)
            // Sessions::connect retries on its own, more often (see there).
            .retry_connection(false)
            .build_unchecked(sessions);
        Ok(Self {
            pool,
            target,
            search_timeout: settings.search_timeout,
            lock_timeout: settings.lock_timeout,
            watch_reads: std::sync::Arc::new(tokio::sync::Semaphore::new(watch_read_turns(
                settings.max_size,
            ))),
            distributed: std::sync::Arc::default(),
            append_turns: std::sync::Arc::default(),
        })
    }

    /// Runs `operation` on a pooled connection. A failure that left the
    /// connection closed (the server went away, or ended the session) is an
    /// outage, reported as [`StoreError::Unavailable`], not a query error.
    ///
    /// When the caller gives up before `operation` ends (the client cancelled
    /// or its deadline passed, and the call was dropped), the session may still
    /// be running a statement: it is not lent to the next caller, who would
    /// wait behind it, but closed, and PostgreSQL is asked to cancel the
    /// statement (see [`Lent`]).
    pub(super) async fn with_conn<T>(
        &self,
        operation: impl AsyncFnOnce(&mut AsyncPgConnection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut lent = Lent {
            session: self.pool.get().await?,
            target: &self.target,
            returned: false,
        };
        let outcome = operation(&mut lent.session.conn).await;
        lent.returned = true;
        match outcome {
            Err(StoreError::Database(error)) if lent.session.conn.is_broken() => {
                Err(StoreError::Unavailable(error.to_string()))
            }
            other => other,
        }
    }

    /// Whether `convo distribute` made this database a distributed Citus
    /// cluster (it installs the append's function): then appends call that
    /// function and writes set their lock timeout for the workers. Asked once
    /// per replica; a cluster distributed while replicas run needs them
    /// restarted.
    pub(super) async fn distributed(
        &self,
        conn: &mut AsyncPgConnection,
    ) -> Result<bool, StoreError> {
        if let Some(known) = self.distributed.get() {
            return Ok(*known);
        }
        #[derive(diesel::QueryableByName)]
        struct Found {
            #[diesel(sql_type = diesel::sql_types::Bool)]
            distributed: bool,
        }
        let found: Found = diesel::sql_query(
            "SELECT EXISTS (SELECT FROM pg_proc WHERE proname = 'convo_append_v1') AS distributed",
        )
        .one_row(conn)
        .await?;
        Ok(*self.distributed.get_or_init(|| found.distributed))
    }

    /// In a write's transaction on a distributed cluster: the replica's
    /// `lock_timeout` for this transaction, which Citus passes on to the
    /// workers where the rows are locked (`citus.propagate_set_commands =
    /// 'local'`, set when the session opens); the session's own setting stays
    /// on the coordinator. On plain PostgreSQL the session's setting holds,
    /// and nothing is sent.
    pub(super) async fn bound_lock_waits(
        &self,
        conn: &mut AsyncPgConnection,
    ) -> Result<(), StoreError> {
        if self.distributed(conn).await? {
            conn.batch_execute(&self.lock_timeout_here()).await?;
        }
        Ok(())
    }

    fn lock_timeout_here(&self) -> String {
        format!("SET LOCAL lock_timeout = {}", self.lock_timeout.as_millis())
    }

    /// A single-statement write: on a distributed cluster inside a
    /// transaction that carries the lock timeout to the worker
    /// ([`Store::bound_lock_waits`]); on plain PostgreSQL alone, one round
    /// trip.
    pub(super) async fn write_once<T>(
        &self,
        conn: &mut AsyncPgConnection,
        write: impl AsyncFnOnce(&mut AsyncPgConnection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        if self.distributed(conn).await? {
            in_transaction(conn, &self.lock_timeout_here(), write).await
        } else {
            write(conn).await
        }
    }

    /// Runs `operation` in a transaction of its own in which a Citus cluster
    /// may spread it over every shard. The store's statements that span
    /// owners (the retention sweep, the watch catch-up) are multi-shard by
    /// design; a deployment, or the test suite, that turns multi-shard
    /// statements into errors (`citus.multi_task_query_log_level`) lifts
    /// that here and nowhere else. On plain PostgreSQL the setting is an
    /// unused placeholder.
    pub(super) async fn across_owners<T>(
        &self,
        operation: impl AsyncFnOnce(&mut AsyncPgConnection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.with_conn(async |conn| {
            in_transaction(
                conn,
                "SET LOCAL citus.multi_task_query_log_level = 'off'",
                operation,
            )
            .await
        })
        .await
    }

    /// Publishes the pool's state as metrics: connections open and idle,
    /// checkouts that had to wait or timed out, connections thrown away.
    pub fn record_pool_metrics(&self) {
        let state = self.pool.state();
        let stats = state.statistics;
        metrics::gauge!("convo_pool_connections").set(f64::from(state.connections));
        metrics::gauge!("convo_pool_idle_connections").set(f64::from(state.idle_connections));
        metrics::gauge!("convo_pool_in_use_connections").set(f64::from(
            state.connections.saturating_sub(state.idle_connections),
        ));
        metrics::counter!("convo_pool_checkouts_total").absolute(stats.get_started);
        metrics::counter!("convo_pool_checkouts_waited_total").absolute(stats.get_waited);
        metrics::counter!("convo_pool_acquire_timeouts_total").absolute(stats.get_timed_out);
        metrics::counter!("convo_pool_connections_closed_broken_total")
            .absolute(stats.connections_closed_broken + stats.connections_closed_invalid);
    }

    /// The keys that seal page tokens, newest first (see the
    /// `page_token_keys` migration): every replica reads the same ones.
    pub async fn page_token_keys(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        use diesel_async::RunQueryDsl;
        #[derive(diesel::QueryableByName)]
        struct Key {
            #[diesel(sql_type = diesel::sql_types::Bytea)]
            secret: Vec<u8>,
        }
        self.with_conn(async |conn| {
            let keys: Vec<Key> =
                diesel::sql_query("SELECT secret FROM page_token_keys ORDER BY id DESC")
                    .load(conn)
                    .await?;
            Ok(keys.into_iter().map(|k| k.secret).collect())
        })
        .await
    }

    /// A health probe with a session of its own (see [`HealthProbe`]).
    pub fn health_probe(&self, timeout: Duration) -> HealthProbe {
        HealthProbe {
            target: self.target.clone(),
            timeout,
            session: None,
            citus: None,
        }
    }

    /// Succeeds when the database answers a query.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.with_conn(async |conn| Ok(conn.batch_execute("SELECT 1").await?))
            .await
    }
}

/// `operation` in a transaction that begins with `setup`. BEGIN and COMMIT
/// (or ROLLBACK) by hand: diesel-async's `transaction` wants a `Send`
/// future, which a generic async closure cannot promise. A session dropped
/// mid-way is closed, not lent again (`Lent`).
async fn in_transaction<T>(
    conn: &mut AsyncPgConnection,
    setup: &str,
    operation: impl AsyncFnOnce(&mut AsyncPgConnection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    conn.batch_execute(&format!("BEGIN; {setup}")).await?;
    let outcome = operation(conn).await;
    let end = if outcome.is_ok() {
        "COMMIT"
    } else {
        "ROLLBACK"
    };
    conn.batch_execute(end).await?;
    outcome
}

/// How many watch reads may hold pooled sessions at once: a quarter of the
/// pool, at least one.
fn watch_read_turns(pool_size: u32) -> usize {
    (pool_size as usize / 4).max(1)
}

/// Asks the database whether it answers, on a session of its own: a pool
/// that calls have checked out entirely, or a burst of watchers waiting for
/// one, must not make a healthy database look down. The session is opened
/// when needed and closed after any failure.
pub struct HealthProbe {
    target: DatabaseTarget,
    timeout: Duration,
    session: Option<AsyncPgConnection>,
    /// Whether the database is a Citus coordinator, once known.
    citus: Option<bool>,
}

/// What the health probe saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseHealth {
    /// The database, and every Citus worker if there are any, answer.
    Whole,
    /// The coordinator answers but these workers (`host:port`) do not: the
    /// users whose shards they hold get UNAVAILABLE, the others are served.
    Degraded { unreachable: Vec<String> },
}

/// The active Citus workers a new connection cannot reach. A coordinator's
/// `SELECT 1` succeeds while a worker is down; this asks each worker.
const UNREACHABLE_WORKERS: &str = "\
    SELECT nodename || ':' || nodeport AS node FROM pg_dist_node \
    WHERE isactive AND noderole = 'primary' AND groupid <> 0 \
      AND NOT citus_check_connection_to_node(nodename, nodeport) \
    ORDER BY nodename, nodeport";

#[derive(diesel::QueryableByName)]
struct Node {
    #[diesel(sql_type = diesel::sql_types::Text)]
    node: String,
}

#[derive(diesel::QueryableByName)]
struct HasCitus {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    citus: bool,
}

impl HealthProbe {
    /// How the database answers within the timeout: whole, or (on Citus)
    /// with workers missing; an error when it does not answer at all.
    pub async fn check(&mut self) -> Result<DatabaseHealth, StoreError> {
        match tokio::time::timeout(self.timeout, self.ask()).await {
            Ok(Ok(health)) => Ok(health),
            Ok(Err(error)) => {
                self.session = None;
                self.citus = None;
                Err(error)
            }
            Err(_) => {
                self.session = None;
                self.citus = None;
                Err(StoreError::Unavailable(format!(
                    "no answer within {:?}",
                    self.timeout
                )))
            }
        }
    }

    async fn ask(&mut self) -> Result<DatabaseHealth, StoreError> {
        use diesel_async::RunQueryDsl;
        let session = match &mut self.session {
            Some(session) => session,
            None => {
                let opened = connect(&self.target, self.timeout)
                    .await
                    .map_err(|e| StoreError::Unavailable(e.to_string()))?;
                self.session.insert(opened)
            }
        };
        let unavailable = |e: diesel::result::Error| StoreError::Unavailable(e.to_string());
        let citus = match self.citus {
            Some(citus) => citus,
            None => {
                let found: HasCitus = diesel::sql_query(
                    "SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'citus') AS citus",
                )
                .one_row(session)
                .await
                .map_err(unavailable)?;
                if found.citus {
                    // A worker whose host does not answer must be reported
                    // lost within the probe's own timeout, not fail the
                    // whole probe after Citus's 30 s default.
                    let ms = (self.timeout.as_millis() / 2).max(100);
                    session
                        .batch_execute(&format!("SET citus.node_connection_timeout = {ms}"))
                        .await
                        .map_err(unavailable)?;
                }
                *self.citus.insert(found.citus)
            }
        };
        if !citus {
            session
                .batch_execute("SELECT 1")
                .await
                .map_err(unavailable)?;
            return Ok(DatabaseHealth::Whole);
        }
        let unreachable: Vec<Node> = diesel::sql_query(UNREACHABLE_WORKERS)
            .load(session)
            .await
            .map_err(unavailable)?;
        Ok(if unreachable.is_empty() {
            DatabaseHealth::Whole
        } else {
            DatabaseHealth::Degraded {
                unreachable: unreachable.into_iter().map(|n| n.node).collect(),
            }
        })
    }
}

/// Opens the pool's sessions and decides which may be lent again.
pub(super) struct Sessions {
    target: DatabaseTarget,
    connect_timeout: Duration,
    /// Run on every new session (see [`Store::new`]).
    setup: String,
}

/// One pooled session, and whether a caller gave it up mid-operation.
pub(super) struct Session {
    conn: AsyncPgConnection,
    abandoned: bool,
}

/// How long after a failed attempt to open a session the next one starts:
/// at first, and at most. bb8's own retries wait up to half the acquire
/// timeout between attempts (2.5 s by default), so a call that began during
/// an outage waited out its whole acquire timeout and failed although
/// PostgreSQL had been back for seconds. Retried at most this far apart, the
/// pool has a session again within a quarter second of PostgreSQL's return.
const RETRY_FIRST: Duration = Duration::from_millis(25);
const RETRY_MOST: Duration = Duration::from_millis(250);

impl Sessions {
    /// One attempt: connect within `timeout`, then set the session up.
    async fn open_session(&self, timeout: Duration) -> Result<Session, PoolError> {
        let mut conn = connect(&self.target, timeout)
            .await
            .map_err(PoolError::ConnectionError)?;
        conn.batch_execute(&self.setup).await.map_err(|e| {
            PoolError::ConnectionError(ConnectionError::CouldntSetupConfiguration(e))
        })?;
        ensure_english_messages(&mut conn).await;
        Ok(Session {
            conn,
            abandoned: false,
        })
    }
}

impl bb8::ManageConnection for Sessions {
    type Connection = Session;
    type Error = PoolError;

    /// Attempts until one succeeds or the connect timeout has passed.
    async fn connect(&self) -> Result<Session, PoolError> {
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        super::retry::until(
            deadline,
            RETRY_FIRST,
            RETRY_MOST,
            // The last attempt, at the deadline, still gets a moment.
            || {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                self.open_session(left.max(RETRY_MOST))
            },
            |_| true,
            |_| {},
        )
        .await
    }

    /// Lends no session that is known to be closed, without the round trip
    /// per checkout that a verifying `SELECT 1` would cost.
    async fn is_valid(&self, session: &mut Session) -> Result<(), PoolError> {
        if session.conn.is_broken() {
            return Err(PoolError::QueryError(
                diesel::result::Error::BrokenTransactionManager,
            ));
        }
        Ok(())
    }

    fn has_broken(&self, session: &mut Session) -> bool {
        session.abandoned || session.conn.is_broken()
    }
}

/// A session lent to one operation. Dropped before the operation returned,
/// it is marked abandoned, so the pool closes it instead of lending it again,
/// and a cancel request for whatever it was running goes to PostgreSQL.
/// Closing alone would not do: a backend busy with a statement notices that
/// its client is gone only when it next writes to it.
struct Lent<'a> {
    session: bb8::PooledConnection<'a, Sessions>,
    target: &'a DatabaseTarget,
    returned: bool,
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        if self.returned {
            return;
        }
        self.session.abandoned = true;
        metrics::counter!("convo_abandoned_sessions_total").increment(1);
        // The session is closed right after this, so the request cannot
        // reach a statement of another caller.
        let token = self.session.conn.cancel_token();
        let target = self.target.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(error) = target.cancel(&token).await {
                    tracing::debug!(%error, "could not cancel an abandoned statement");
                }
            });
        }
    }
}

/// Reads a statement's one row after the statement has ended
/// (ReadyForQuery). diesel-async's `get_result` and `first` return at the
/// first row, before the statement's end — in autocommit, before its commit
/// — so a write acknowledged from it could still be lost to a crash (seen
/// once: the chaos test found an acknowledged append missing after
/// PostgreSQL was killed). clippy.toml refuses those two methods, so every
/// single-row read, write or not, goes through [`OneRow::one_row`].
pub(super) trait OneRow<Conn>: RunQueryDsl<Conn> {
    /// The statement's first row, or `NotFound`, once the statement ended.
    fn one_row<'query, 'conn, U>(
        self,
        conn: &'conn mut Conn,
    ) -> OneRowFuture<'conn, 'query, Self, Conn, U>
    where
        U: Send,
        Conn: AsyncConnectionCore,
        Self: LoadQuery<'query, Conn, U> + 'query,
    {
        self.load(conn).map(first_of)
    }
}

impl<Query: RunQueryDsl<Conn>, Conn> OneRow<Conn> for Query {}

/// What [`OneRow::one_row`] returns: a named type, so that the caller's
/// future stays `Send` when the query's is.
#[allow(type_alias_bounds)] // the bound names the query's own future
pub(super) type OneRowFuture<'conn, 'query, Query: LoadQuery<'query, Conn, U>, Conn, U> =
    futures_util::future::Map<
        LoadFuture<'conn, 'query, Query, Conn, U>,
        fn(QueryResult<Vec<U>>) -> QueryResult<U>,
    >;

fn first_of<U>(rows: QueryResult<Vec<U>>) -> QueryResult<U> {
    rows?
        .into_iter()
        .next()
        .ok_or(diesel::result::Error::NotFound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_get_keepalives_and_a_name_without_losing_the_host() {
        assert_eq!(
            session_url("postgres://app@db:5432/convo", Some("convo-listener")),
            "postgres://app@db:5432/convo?keepalives_idle=30&application_name=convo-listener"
        );
        // A Unix socket directory as the host stays percent-encoded.
        assert_eq!(
            session_url("postgres://convo_app@%2Fvar%2Flib%2Fconvo:5432/convo", None),
            "postgres://convo_app@%2Fvar%2Flib%2Fconvo:5432/convo?keepalives_idle=30"
        );
        // What the operator set wins.
        assert_eq!(
            session_url("postgres://db/convo?keepalives_idle=5", None),
            "postgres://db/convo?keepalives_idle=5"
        );
    }
}
