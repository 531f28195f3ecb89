use std::time::Duration;

use diesel::{
    connection::BoxableConnection,
    migration::{Migration, MigrationMetadata, MigrationName, MigrationSource},
    pg::Pg,
};
use diesel_async::{
    AsyncPgConnection, RunQueryDsl, async_connection_wrapper::AsyncConnectionWrapper,
};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

use super::{
    pool::OneRow,
    tls::{Opened, Unreached},
};

/// The schema, compiled into the binary so `convo serve` and `convo migrate`
/// need nothing but a database URL. Diesel's harness keeps the books
/// (`__diesel_schema_migrations`, one transaction per migration); the SQL is
/// sent by [`ByStatement`].
const EMBEDDED: EmbeddedMigrations = embed_migrations!("migrations");

/// Every migration's directory name, up SQL and down SQL (from `build.rs`).
pub(super) const SCRIPTS: &[(&str, &str, Option<&str>)] =
    include!(concat!(env!("OUT_DIR"), "/migration_scripts.rs"));

/// The embedded migrations, each sending its script one statement at a time
/// (`store/script.rs` says why: a Citus cluster refuses several DDL
/// statements in one message).
struct Migrations;

impl MigrationSource<Pg> for Migrations {
    fn migrations(&self) -> diesel::migration::Result<Vec<Box<dyn Migration<Pg>>>> {
        MigrationSource::<Pg>::migrations(&EMBEDDED)?
            .into_iter()
            .map(|inner| {
                let name = inner.name().to_string();
                let (_, up, down) = SCRIPTS
                    .iter()
                    .find(|(script, _, _)| *script == name)
                    .ok_or_else(|| format!("migration {name} has no script"))?;
                Ok(Box::new(ByStatement {
                    inner,
                    up,
                    down: *down,
                }) as Box<dyn Migration<Pg>>)
            })
            .collect()
    }
}

struct ByStatement {
    inner: Box<dyn Migration<Pg>>,
    up: &'static str,
    down: Option<&'static str>,
}

impl ByStatement {
    fn execute(
        &self,
        conn: &mut dyn BoxableConnection<Pg>,
        script: &str,
    ) -> diesel::migration::Result<()> {
        for statement in super::script::statements(script) {
            conn.batch_execute(statement)
                .map_err(|e| format!("{}: {e}", self.inner.name()))?;
        }
        Ok(())
    }
}

impl Migration<Pg> for ByStatement {
    fn run(&self, conn: &mut dyn BoxableConnection<Pg>) -> diesel::migration::Result<()> {
        self.execute(conn, self.up)
    }

    fn revert(&self, conn: &mut dyn BoxableConnection<Pg>) -> diesel::migration::Result<()> {
        match self.down {
            Some(down) => self.execute(conn, down),
            None => Err(diesel_migrations::MigrationError::NoMigrationRevertFile.into()),
        }
    }

    fn metadata(&self) -> &dyn MigrationMetadata {
        self.inner.metadata()
    }

    fn name(&self) -> &dyn MigrationName {
        self.inner.name()
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `name` as an SQL identifier, quoted.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `text` as an SQL string literal, quoted.
pub(super) fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// One connection as the URL asks (TLS included; see `store/tls.rs`).
async fn connect(database_url: &str) -> Result<Opened, BoxError> {
    Ok(super::tls::DatabaseTarget::parse(database_url)?
        .connect()
        .await?)
}

/// Runs `work` on a connection of its own, then ends the session, whatever
/// `work` returned, before this returns: a command such as `convo migrate`
/// may exit right after, and PostgreSQL's log keeps no broken pipe of it.
pub(super) async fn with_connection<T>(
    database_url: &str,
    work: impl AsyncFnOnce(&mut AsyncPgConnection) -> Result<T, BoxError>,
) -> Result<T, BoxError> {
    let mut opened = connect(database_url).await?;
    let result = work(&mut opened.conn).await;
    opened.close().await;
    result
}

/// [`with_connection`] for diesel's synchronous migration harness, on a
/// blocking thread (which also keeps it usable from a current-thread
/// runtime).
async fn with_blocking_connection<T: Send + 'static>(
    database_url: &str,
    work: impl FnOnce(&mut AsyncConnectionWrapper<AsyncPgConnection>) -> Result<T, BoxError>
    + Send
    + 'static,
) -> Result<T, BoxError> {
    let Opened { conn, ended, .. } = connect(database_url).await?;
    let result =
        tokio::task::spawn_blocking(move || work(&mut AsyncConnectionWrapper::from(conn))).await;
    ended.wait().await;
    result?
}

/// The advisory lock key migrations hold (any fixed number unique to convo).
const MIGRATION_LOCK: i64 = 0x636f_6e76_6f01;

/// Applies every pending migration and returns the versions applied.
///
/// Diesel's migration harness is synchronous, so it runs on a blocking thread
/// (which also keeps it usable from a current-thread runtime).
pub async fn run_pending_migrations(database_url: &str) -> Result<Vec<String>, BoxError> {
    let applied = apply_pending(database_url).await?;
    // On a distributed cluster, a table a migration added is distributed
    // before any call can write it on the coordinator alone.
    with_connection(database_url, async |conn| {
        if super::distribute::topology(conn).await? == super::Topology::Distributed {
            let added = super::distribute::distribute_tables(conn, None).await?;
            for table in added.distributed.iter().chain(&added.reference) {
                tracing::info!(%table, "distributed a table a migration added");
            }
        }
        Ok(())
    })
    .await?;
    Ok(applied)
}

/// Applies every pending migration, as diesel's harness does, and returns
/// the versions applied.
async fn apply_pending(database_url: &str) -> Result<Vec<String>, BoxError> {
    with_blocking_connection(database_url, |conn| {
        // Replicas started together migrate one at a time: the others wait
        // here, then find nothing pending. Released with the session.
        diesel::connection::SimpleConnection::batch_execute(
            conn,
            &format!("SELECT pg_advisory_lock({MIGRATION_LOCK})"),
        )?;
        let applied = conn.run_pending_migrations(Migrations)?;
        Ok(applied.iter().map(ToString::to_string).collect())
    })
    .await
}

/// `convo distribute`: applies pending migrations, then distributes convo's
/// tables over the Citus cluster whose coordinator `database_url` names.
/// Refuses plain PostgreSQL before changing anything.
pub async fn distribute(
    database_url: &str,
    shard_count: Option<u32>,
) -> Result<super::Distribution, BoxError> {
    with_connection(database_url, async |conn| {
        if super::distribute::topology(conn).await? == super::Topology::Plain {
            return Err(
                "the database has no citus extension: `convo distribute` is for a Citus \
                 coordinator (plain PostgreSQL needs no distribution step)"
                    .into(),
            );
        }
        apply_pending(database_url).await?;
        super::distribute::distribute_tables(conn, shard_count).await
    })
    .await
}

/// Gives `role` (created if missing, with LOGIN and nothing else) what the
/// server needs and no more: connect to the database and read and write
/// convo's tables. Run after migrations, so tables they added are covered.
pub async fn grant_app_role(database_url: &str, role: &str) -> Result<(), BoxError> {
    let url = url::Url::parse(database_url)?;
    let database = percent_decode(url.path().trim_start_matches('/'))?;
    let (role_q, database_q) = (quote_ident(role), quote_ident(&database));
    let role_literal = quote_literal(role);
    with_connection(database_url, async |conn| {
        Ok(diesel_async::SimpleAsyncConnection::batch_execute(
            conn,
            &format!(
                "DO $$ BEGIN \
                 IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {role_literal}) THEN \
                     CREATE ROLE {role_q} LOGIN; \
                 END IF; \
             END $$; \
             GRANT CONNECT ON DATABASE {database_q} TO {role_q}; \
             GRANT USAGE ON SCHEMA public TO {role_q}; \
             GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role_q}; \
             ALTER ROLE {role_q} SET lc_messages = 'C'"
            ),
        )
        .await?)
    })
    .await
}

/// Reverts the most recently applied migration and returns its version.
pub async fn revert_last_migration(database_url: &str) -> Result<String, BoxError> {
    with_blocking_connection(database_url, |conn| {
        let reverted = conn.revert_last_migration(Migrations)?;
        Ok(reverted.to_string())
    })
    .await
}

/// Waits up to `wait` for the server at `database_url` to answer, when it
/// does not yet for a reason that may pass (see `tls::Unreached`): convo
/// started beside a PostgreSQL that is still starting is not an error. Any
/// other answer, a refusal included, ends the wait: what comes next reports
/// it. Fails with the last reason once `wait` has passed.
pub async fn wait_for_database(database_url: &str, wait: Duration) -> Result<(), BoxError> {
    /// One attempt's limit: a server that accepts and never answers. (The
    /// last attempt may end this much after `wait`.)
    const ATTEMPT: Duration = Duration::from_secs(5);
    if wait.is_zero() {
        return Ok(());
    }
    // The server's own database, which the next step connects to anyway: the
    // one named may not exist yet, and asking for it would leave a FATAL line
    // in PostgreSQL's log before it is created.
    let mut maintenance = url::Url::parse(database_url)?;
    maintenance.set_path("/postgres");
    let target = super::tls::DatabaseTarget::parse(maintenance.as_str())?;
    let started = tokio::time::Instant::now();
    let mut waiting = false;
    let reached = super::retry::until(
        started + wait,
        Duration::from_millis(100),
        Duration::from_secs(1),
        || async {
            match tokio::time::timeout(ATTEMPT, target.reach()).await {
                Ok(reached) => reached,
                Err(_) => Err(Unreached {
                    reason: format!("no answer within {ATTEMPT:?}"),
                    may_pass: true,
                }),
            }
        },
        |unreached| unreached.may_pass,
        |unreached| {
            if !std::mem::replace(&mut waiting, true) {
                let reason = &unreached.reason;
                tracing::warn!(error = %reason, "the database does not answer yet; waiting up to {wait:?}");
            }
        },
    )
    .await;
    match reached {
        Err(unreached) if unreached.may_pass => Err(format!(
            "{} (still after waiting {wait:?} for the database: see --wait-for-database)",
            unreached.reason
        )
        .into()),
        // Answered, or refused: what comes next says why.
        _ => {
            if waiting {
                tracing::info!(waited = ?started.elapsed(), "the database answers");
            }
            Ok(())
        }
    }
}

/// Creates the database named in `database_url` if the server does not have it,
/// connecting to the server's `postgres` database to do so. Returns true when
/// it created the database.
pub async fn create_database_if_missing(database_url: &str) -> Result<bool, BoxError> {
    let mut url = url::Url::parse(database_url)?;
    let name = url.path().trim_start_matches('/').to_owned();
    if name.is_empty() {
        return Err("the database URL names no database (postgres://HOST/NAME)".into());
    }
    let name = percent_decode(&name)?;
    url.set_path("/postgres");
    with_connection(url.as_str(), async |admin| {
        let exists: i64 =
            diesel::sql_query("SELECT count(*) AS n FROM pg_database WHERE datname = $1")
                .bind::<diesel::sql_types::Text, _>(&name)
                .one_row::<Count>(admin)
                .await?
                .n;
        if exists > 0 {
            return Ok(false);
        }
        match diesel::sql_query(format!("CREATE DATABASE {}", quote_ident(&name)))
            .execute(admin)
            .await
        {
            Ok(_) => Ok(true),
            // Another replica created it between the check and now.
            Err(diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::UniqueViolation,
                _,
            )) => Ok(false),
            Err(error) if error.to_string().contains("already exists") => Ok(false),
            Err(error) => Err(error.into()),
        }
    })
    .await
}

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

fn percent_decode(text: &str) -> Result<String, BoxError> {
    Ok(percent_encoding::percent_decode_str(text)
        .decode_utf8()?
        .into_owned())
}

/// Checks, without changing anything, that every embedded migration has been
/// applied: for a server whose role may read and write but not migrate.
pub async fn ensure_schema_current(database_url: &str) -> Result<(), BoxError> {
    #[derive(diesel::QueryableByName)]
    struct Applied {
        #[diesel(sql_type = diesel::sql_types::Text)]
        version: String,
    }
    let applied: Vec<Applied> = with_connection(database_url, async |conn| {
        diesel::sql_query("SELECT version FROM __diesel_schema_migrations")
            .load(conn)
            .await
            .map_err(|e| {
                format!("cannot read the applied migrations ({e}): run `convo migrate` first")
                    .into()
            })
    })
    .await?;
    let applied: std::collections::HashSet<String> =
        applied.into_iter().map(|a| a.version).collect();
    let missing: Vec<String> = MigrationSource::<Pg>::migrations(&EMBEDDED)?
        .iter()
        .map(|m| m.name().version().to_string())
        .filter(|version| !applied.contains(version))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the database schema lacks migrations {}: run `convo migrate` with a privileged role",
            missing.join(", ")
        )
        .into())
    }
}
