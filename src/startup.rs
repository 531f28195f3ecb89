//! Start-up as a value: [`Database::resolve`] finds (or starts) the database,
//! [`Application::build`] connects and binds and returns the bound address,
//! and [`Application::run_until`] wires store, service and the gRPC server
//! together and serves until told to stop.

use std::{future::Future, net::SocketAddr};

use tokio::net::TcpListener;

use crate::{
    config::{ConfigError, DEFAULT_DATA_DIR, DatabaseArgs, Settings},
    grpc::{self, ConversationApi, PageTokenCodec, ServeError, ServerOptions},
    local_postgres::{Access, LocalPostgres, LocalPostgresError, LocalPostgresOptions},
    service::Conversations,
    store::{self, ChangeFeed, Store, StoreError},
};

/// Why convo could not start. Printed as one line by the binary.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("invalid database URL: {0}")]
    DatabaseUrl(String),
    #[error("could not prepare the database: {0}")]
    Migrations(String),
    #[error("could not distribute the tables: {0}")]
    Distribute(String),
    #[error("the database is unreachable: {0}")]
    Database(#[source] StoreError),
    #[error("could not listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("could not start the private PostgreSQL: {0}")]
    LocalPostgres(#[from] LocalPostgresError),
    #[error("could not serve metrics: {0}")]
    Metrics(String),
    #[error("invalid JWT configuration: {0}")]
    Auth(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// The database convo talks to, and the private cluster behind it if convo
/// started one (stop it after the server has stopped).
#[derive(Debug)]
pub struct Database {
    /// For migrations: the database's owner (the superuser of a private
    /// cluster, or whoever DATABASE_URL names).
    pub url: String,
    /// For the server's connections: on a private cluster, a role that may
    /// only read and write convo's tables; otherwise the same as `url`.
    pub app_url: String,
    pub local: Option<LocalPostgres>,
}

/// The role the server's connections use on its private cluster.
const APP_ROLE: &str = "convo_app";

impl Database {
    /// Uses `--database-url` when given, else starts the private cluster in
    /// `--data-dir`. Logs which database is in use (without its password).
    pub async fn resolve(args: &DatabaseArgs) -> Result<Self, StartupError> {
        if let Some(url) = &args.database_url {
            let parsed =
                url::Url::parse(url).map_err(|e| StartupError::DatabaseUrl(e.to_string()))?;
            if !matches!(parsed.scheme(), "postgres" | "postgresql") {
                return Err(StartupError::DatabaseUrl(format!(
                    "expected a postgres:// URL, got {}://",
                    parsed.scheme()
                )));
            }
            tracing::info!(database = %redact(&parsed), "using the database at DATABASE_URL");
            store::wait_for_database(url, args.wait_for_database)
                .await
                .map_err(|e| StartupError::Migrations(e.to_string()))?;
            return Ok(Self {
                url: url.clone(),
                app_url: url.clone(),
                local: None,
            });
        }
        let local = LocalPostgres::start(&LocalPostgresOptions {
            data_dir: args
                .data_dir
                .clone()
                .unwrap_or_else(|| DEFAULT_DATA_DIR.into()),
            fsync: true,
            access: Access::Private,
            // Only the default moves; a directory the operator named is used
            // as named (or refused with the reason).
            relocate_if_unreachable: args.data_dir.is_none(),
        })
        .await?;
        tracing::info!(
            data_dir = %local.data_dir().display(),
            reachable_through = %local.endpoint(),
            "no DATABASE_URL given: using a private PostgreSQL that only this machine's root \
             and postgres accounts (or convo's own account) can reach"
        );
        Ok(Self {
            url: local.url("convo"),
            app_url: local.url_as(APP_ROLE, "convo"),
            local: Some(local),
        })
    }

    /// Makes the database ready to serve: creates and migrates it (unless
    /// `migrate` is false, when it only checks that no migration is pending),
    /// and on a private cluster gives the server's role its grants.
    pub async fn prepare(&self, migrate: bool) -> Result<(), StartupError> {
        if migrate {
            prepare_database(&self.url).await?;
        } else {
            store::ensure_schema_current(&self.url)
                .await
                .map_err(|e| StartupError::Migrations(e.to_string()))?;
        }
        if self.local.is_some() {
            store::grant_app_role(&self.url, APP_ROLE)
                .await
                .map_err(|e| StartupError::Migrations(e.to_string()))?;
        }
        Ok(())
    }

    /// Runs `serving` to its end. Meanwhile a private cluster that exits on
    /// its own is started again (see [`LocalPostgres::keep_running`]): it is
    /// polled here, in the caller's task, because the kernel's order to stop
    /// PostgreSQL when convo dies follows the thread that started it, and
    /// `convo serve` runs this on its main thread.
    pub async fn supervise<T>(&mut self, serving: impl Future<Output = T>) -> T {
        let Some(local) = self.local.as_mut() else {
            return serving.await;
        };
        tokio::select! {
            served = serving => served,
            never = local.keep_running() => match never {},
        }
    }

    /// Stops the private cluster, if convo started one.
    pub async fn close(self) {
        if let Some(local) = self.local {
            local.shut_down().await;
            tracing::info!("private PostgreSQL stopped");
        }
    }
}

/// A database URL as it may be logged: a password, in the userinfo or as a
/// `password` parameter, is replaced by `***`.
fn redact(url: &url::Url) -> String {
    let mut shown = url.clone();
    if shown.password().is_some() {
        let _ = shown.set_password(Some("***"));
    }
    if shown.query_pairs().any(|(key, _)| key == "password") {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(key, value)| {
                let value = if key == "password" {
                    "***".to_owned()
                } else {
                    value.into_owned()
                };
                (key.into_owned(), value)
            })
            .collect();
        shown.query_pairs_mut().clear().extend_pairs(pairs);
    }
    shown.to_string()
}

/// Creates the database if it is missing and applies pending migrations.
pub async fn prepare_database(database_url: &str) -> Result<(), StartupError> {
    if store::create_database_if_missing(database_url)
        .await
        .map_err(|e| StartupError::Migrations(e.to_string()))?
    {
        tracing::info!("created the database");
    }
    let applied = store::run_pending_migrations(database_url)
        .await
        .map_err(|e| StartupError::Migrations(e.to_string()))?;
    for version in &applied {
        tracing::info!(%version, "applied migration");
    }
    Ok(())
}

/// A server that is connected and bound, but not yet serving.
pub struct Application {
    authenticator: grpc::Authenticator,
    listener: TcpListener,
    local_addr: SocketAddr,
    store: Store,
    changes: ChangeFeed,
    tokens: PageTokenCodec,
    settings: Settings,
}

impl Application {
    /// Checks that the database answers and binds the listen address (port 0
    /// picks a free port: see [`Application::local_addr`]).
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        let authenticator = match &settings.jwt {
            None => grpc::Authenticator::TrustedHeader,
            Some(jwt) => grpc::Authenticator::Jwt(std::sync::Arc::new(
                grpc::JwtVerifier::new(jwt).map_err(StartupError::Auth)?,
            )),
        };
        if let Some(addr) = settings.metrics_addr {
            crate::telemetry::serve_metrics(addr).map_err(StartupError::Metrics)?;
            tracing::info!(%addr, "serving Prometheus metrics at /metrics");
        }
        let store = Store::new(&settings.database_url, settings.pool)
            .map_err(|e| StartupError::DatabaseUrl(e.to_string()))?;
        store.ping().await.map_err(StartupError::Database)?;
        let listen = |source| StartupError::Listen {
            addr: settings.listen,
            source,
        };
        let listener = TcpListener::bind(settings.listen).await.map_err(listen)?;
        let local_addr = listener.local_addr().map_err(listen)?;
        let tokens = match &settings.page_token_secret {
            Some(secret) => PageTokenCodec::new(secret),
            None => {
                let keys = store
                    .page_token_keys()
                    .await
                    .map_err(StartupError::Database)?;
                let (current, previous) = keys.split_first().ok_or_else(|| {
                    StartupError::Migrations(
                        "the database holds no page token key (page_token_keys is empty)".into(),
                    )
                })?;
                PageTokenCodec::rotating(current, previous)
            }
        };
        let changes = ChangeFeed::start(store.clone(), settings.feed);
        Ok(Self {
            tokens,
            authenticator,
            listener,
            local_addr,
            store,
            changes,
            settings,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The live-change feed this server's watch streams use. Test support:
    /// the API tests observe its watchers.
    #[doc(hidden)]
    pub fn changes(&self) -> &ChangeFeed {
        &self.changes
    }

    /// Serves convo.v1, health and reflection until `shutdown` completes, then
    /// stops accepting, lets in-flight calls finish and closes the pool's
    /// sessions and the change feed's.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<(), StartupError> {
        let settings = &self.settings;
        let changes = self.changes;
        let sweeper = settings.retention.map(|policy| {
            tracing::info!(idle_for = ?policy.idle_for, "retention policy on");
            tokio::spawn(crate::retention::sweep(
                self.store.clone(),
                changes.clone(),
                policy,
            ))
        });
        let api = ConversationApi::new(
            Conversations::new(
                self.store.clone(),
                changes.clone(),
                settings.max_response_bytes,
                settings.watch_limits,
            ),
            settings.limits,
            self.tokens,
            settings.max_in_flight,
        );
        let options = ServerOptions {
            authenticator: self.authenticator,
            max_request_bytes: settings.max_request_bytes,
            max_unread_bytes: settings.max_unread_bytes,
            tls: settings.tls.as_ref(),
            health_listen: settings.health_listen,
            drain_timeout: settings.drain_timeout,
            health_of: self.store.clone(),
            health_interval: settings.health_interval,
        };
        let served = grpc::serve(self.listener, api, options, async {
            shutdown.await;
            // Watch streams never end by themselves: end them so that
            // in-flight calls can drain.
            changes.close();
        })
        .await;
        if let Some(sweeper) = sweeper {
            sweeper.abort();
        }
        let sessions = self.store.open_sessions();
        changes.shut_down().await;
        drop(changes);
        drop(self.store);
        // The pool's sessions and the change feed's close in the background
        // once dropped; a process that exited now would cut their goodbyes
        // short, and PostgreSQL would log each one as a reset.
        sessions.ended().await;
        tracing::info!("server stopped");
        Ok(served?)
    }
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => tracing::info!("SIGINT received: shutting down"),
        _ = terminate => tracing::info!("SIGTERM received: shutting down"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_the_log() {
        for (url, shown) in [
            (
                "postgres://app:s3cret@db:5432/convo",
                "postgres://app:***@db:5432/convo",
            ),
            (
                "postgres://app@db/convo?sslmode=require&password=s3cret",
                "postgres://app@db/convo?sslmode=require&password=***",
            ),
            ("postgres://db/convo", "postgres://db/convo"),
        ] {
            let redacted = redact(&url::Url::parse(url).unwrap());
            assert_eq!(redacted, shown);
            assert!(!redacted.contains("s3cret"));
        }
    }
}
