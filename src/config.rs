//! Configuration: the command line, and the settings it resolves into.
//!
//! Every flag has an environment fallback, so the same binary is configured by
//! flags on a laptop and by env in a container. [`ServeArgs::settings`] reads
//! the files the flags name and returns the [`Settings`] a server is built
//! from (tests build `Settings` directly).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    domain::Limits,
    retention::RetentionPolicy,
    service::WatchLimits,
    store::{FeedSettings, PoolSettings},
    telemetry::LogFormat,
};

/// Everything the server needs, resolved from flags and environment.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub database_url: String,
    pub pool: PoolSettings,
    pub health_interval: Duration,
    /// How watch streams learn of changes made by other replicas.
    pub feed: FeedSettings,
    pub limits: Limits,
    /// Seals page tokens; `None` uses the keys every replica shares through
    /// the database.
    pub page_token_secret: Option<Vec<u8>>,
    /// After the shutdown signal, how long in-flight calls may take.
    pub drain_timeout: Duration,
    /// Most convo.v1 calls in progress at once.
    pub max_in_flight: usize,
    /// Most watch streams open at once, per user and in all.
    pub watch_limits: WatchLimits,
    /// Largest request accepted, in bytes.
    pub max_request_bytes: usize,
    /// Largest page or resume answer, in bytes.
    pub max_response_bytes: usize,
    /// Most bytes of answers one connection may leave unread.
    pub max_unread_bytes: usize,
    /// Where to serve Prometheus metrics; `None` serves none.
    pub metrics_addr: Option<SocketAddr>,
    /// Delete conversations idle for longer than this; `None` keeps everything.
    pub retention: Option<RetentionPolicy>,
    /// Serve over TLS (and require client certificates, with a client CA).
    pub tls: Option<TlsSettings>,
    /// A plaintext listener that serves only gRPC health, for probes that
    /// cannot present a client certificate.
    pub health_listen: Option<SocketAddr>,
    /// Verify JWT bearer tokens; `None` trusts `x-user-id`.
    pub jwt: Option<JwtSettings>,
}

/// PEM-encoded TLS material.
#[derive(Clone)]
pub struct TlsSettings {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// When set, only clients with a certificate signed by this CA may call.
    pub client_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("mutual", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

/// How bearer tokens are verified in `--auth jwt` mode: what to trust, and
/// what to check.
#[derive(Debug, Clone)]
pub struct JwtSettings {
    /// HS256 shared secret.
    pub secret: Option<Vec<u8>>,
    /// A PEM public key: RSA (RS256/384/512) or EC (ES256/384).
    pub public_key_pem: Option<Vec<u8>>,
    /// A JWKS document (`{"keys": […]}`); the token's `kid` picks the key.
    pub jwks_json: Option<Vec<u8>>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// The claim that holds the user id.
    pub user_claim: String,
    /// Clock skew allowed for `exp` and `nbf`.
    pub leeway: Duration,
}

/// A setting that names a file convo cannot use.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid TLS configuration: {0}")]
    Tls(String),
    #[error("invalid JWT configuration: {0}")]
    Auth(String),
}

/// convo: a conversation store for AI systems, over gRPC and PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "convo", version, about)]
pub struct Cli {
    /// Log format: readable text, or one JSON object per line.
    #[arg(long, env = "CONVO_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

/// How callers prove who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuthMode {
    Header,
    Jwt,
}

#[derive(Debug, Subcommand)]
// Parsed once at start-up; boxing the larger variant would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Apply pending migrations, then serve convo.v1 over gRPC until SIGINT/SIGTERM.
    Serve(ServeArgs),
    /// Apply pending migrations (or revert the last one) and exit.
    Migrate(MigrateArgs),
    /// On a Citus coordinator: apply pending migrations, then distribute convo's
    /// tables by user_id (co-located), and exit. Running it again changes nothing;
    /// on plain PostgreSQL it refuses.
    Distribute(DistributeArgs),
}

/// Where the database is: a URL, or else a private cluster in a data directory.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL URL, e.g. postgres://user:pass@host:5432/convo. The database is
    /// created if missing. Without it, convo runs a private PostgreSQL in --data-dir.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,

    /// Data directory of the private PostgreSQL used when no --database-url is
    /// given [default: convo-data; as root, when the `postgres` user cannot reach
    /// it, /var/lib/convo/convo-data-<hash> with a link at ./convo-data].
    #[arg(long, env = "CONVO_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// How long to keep trying the database at --database-url when it does not
    /// answer yet (not listening, starting up, its host name not resolving yet)
    /// before giving up; 0 gives up at once.
    #[arg(long, env = "CONVO_WAIT_FOR_DATABASE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub wait_for_database: Duration,
}

/// Where the private PostgreSQL keeps its data unless told otherwise.
pub const DEFAULT_DATA_DIR: &str = "convo-data";

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to serve gRPC on.
    #[arg(long, env = "CONVO_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Do not create the database or apply migrations; only check that the schema
    /// is current. For a server role that may read and write but not migrate.
    #[arg(long, env = "CONVO_SKIP_MIGRATIONS")]
    pub skip_migrations: bool,

    /// Most connections this replica opens to PostgreSQL.
    #[arg(long, env = "CONVO_POOL_SIZE", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub pool_size: u32,

    /// How long a call waits for a pooled connection before failing with UNAVAILABLE.
    #[arg(long, env = "CONVO_ACQUIRE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub acquire_timeout: Duration,

    /// PostgreSQL statement_timeout for every query.
    #[arg(long, env = "CONVO_STATEMENT_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub statement_timeout: Duration,

    /// PostgreSQL lock_timeout: how long a call waits for a locked row (an append for
    /// its conversation, and first for its turn behind earlier appends to it) before
    /// failing with UNAVAILABLE; 0 waits without bound, as in PostgreSQL.
    #[arg(long, env = "CONVO_LOCK_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub lock_timeout: Duration,

    /// How long one SearchMessages call may rank matches in PostgreSQL before it
    /// fails with RESOURCE_EXHAUSTED (a query matching most of a user's messages);
    /// 0 removes the bound.
    #[arg(long, env = "CONVO_SEARCH_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub search_timeout: Duration,

    /// On SIGTERM/SIGINT, how long in-flight calls may take to finish before the
    /// server stops anyway.
    #[arg(long, env = "CONVO_DRAIN_TIMEOUT", default_value = "15s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// Most convo.v1 calls in progress at once; more are refused at once with
    /// RESOURCE_EXHAUSTED instead of queueing. Open watch streams do not count.
    #[arg(long, env = "CONVO_MAX_IN_FLIGHT", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_in_flight: u32,

    /// Most WatchConversation streams one user may have open on this server;
    /// more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "CONVO_MAX_WATCH_STREAMS_PER_USER", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_watch_streams_per_user: u32,

    /// Most WatchConversation streams this server serves at once.
    #[arg(long, env = "CONVO_MAX_WATCH_STREAMS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_watch_streams: u32,

    /// Largest request accepted, in bytes; a larger one is refused with
    /// RESOURCE_EXHAUSTED. Split bigger batches.
    #[arg(long, env = "CONVO_MAX_REQUEST_BYTES", default_value_t = 4 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1_200_000..=256 * 1024 * 1024))]
    pub max_request_bytes: u64,

    /// Largest answer sent, in bytes: list and search pages end early (with a
    /// next_page_token) and resume returns the newest messages that fit.
    /// The default is gRPC's default client receive limit.
    #[arg(long, env = "CONVO_MAX_RESPONSE_BYTES", default_value_t = 4 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(2 * 1024 * 1024..=256 * 1024 * 1024))]
    pub max_response_bytes: u64,

    /// Most bytes of answers one connection may hold unread: past it, a call
    /// on that connection ends with RESOURCE_EXHAUSTED instead of adding its
    /// answer to what the client is not reading. At least the answer limit.
    #[arg(long, env = "CONVO_MAX_UNREAD_BYTES", default_value_t = 64 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(2 * 1024 * 1024..=4096 * 1024 * 1024))]
    pub max_unread_bytes: u64,

    /// Serve over TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "CONVO_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The TLS private key (PEM) of --tls-cert.
    #[arg(long, env = "CONVO_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Require client certificates signed by this CA (PEM): mutual TLS, so only
    /// the trusted orchestrator can call and assert x-user-id.
    #[arg(long, env = "CONVO_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Also serve gRPC health alone, in plaintext, on this address (for probes
    /// that cannot present a client certificate).
    #[arg(long, env = "CONVO_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,

    /// How callers prove who they are: `header` trusts x-user-id (put convo behind an
    /// authenticating orchestrator); `jwt` verifies `authorization: Bearer <JWT>`.
    #[arg(long, env = "CONVO_AUTH", value_enum, default_value_t = AuthMode::Header)]
    pub auth: AuthMode,

    /// jwt: file holding the HS256 shared secret (at least 32 bytes).
    #[arg(long, env = "CONVO_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,

    /// jwt: PEM public key (RSA for RS256, EC for ES256).
    #[arg(long, env = "CONVO_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,

    /// jwt: JWKS file; the token's `kid` picks the key.
    #[arg(long, env = "CONVO_JWT_JWKS")]
    pub jwt_jwks: Option<PathBuf>,

    /// jwt: the required issuer (`iss`).
    #[arg(long, env = "CONVO_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// jwt: the required audience (`aud`).
    #[arg(long, env = "CONVO_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// jwt: the claim that holds the user id.
    #[arg(long, env = "CONVO_JWT_USER_CLAIM", default_value = "sub")]
    pub jwt_user_claim: String,

    /// jwt: clock skew allowed for exp and nbf.
    #[arg(long, env = "CONVO_JWT_LEEWAY", default_value = "30s", value_parser = humantime::parse_duration)]
    pub jwt_leeway: Duration,

    /// Serve Prometheus metrics at http://ADDR/metrics (off unless given).
    #[arg(long, env = "CONVO_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// Delete conversations idle (not updated) for longer than this, e.g. 90d.
    /// Off unless given.
    #[arg(long, env = "CONVO_RETENTION", value_parser = retention_period)]
    pub retention: Option<Duration>,

    /// Pause between retention sweeps.
    #[arg(long, env = "CONVO_RETENTION_INTERVAL", default_value = "1m", value_parser = positive_interval)]
    pub retention_interval: Duration,

    /// Conversations deleted per retention transaction.
    #[arg(long, env = "CONVO_RETENTION_BATCH", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub retention_batch: u32,

    /// How often gRPC health re-checks the database.
    #[arg(long, env = "CONVO_HEALTH_INTERVAL", default_value = "2s", value_parser = positive_interval)]
    pub health_interval: Duration,

    /// Watch: longest wait before this replica tells the others of its writes
    /// (one NOTIFY transaction per interval carries all of them).
    #[arg(long, env = "CONVO_CHANGE_PUBLISH_INTERVAL", default_value = "10ms", value_parser = positive_interval)]
    pub change_publish_interval: Duration,

    /// Watch: how often watched conversations are re-read in case a
    /// notification was lost (a replica crashed between a write and its
    /// announcement); the longest such a loss can delay a message.
    #[arg(long, env = "CONVO_WATCH_CATCH_UP_INTERVAL", default_value = "1s", value_parser = positive_interval)]
    pub watch_catch_up_interval: Duration,

    /// Secret that seals page tokens (replicas behind one load balancer must
    /// share it). Without it, convo uses keys generated in the database at
    /// migration, which every replica shares with no configuration.
    #[arg(long, env = "CONVO_PAGE_TOKEN_SECRET")]
    pub page_token_secret: Option<String>,

    /// Longest message content, in bytes (at most the contract's 1 MiB).
    #[arg(long, env = "CONVO_MAX_CONTENT_BYTES", default_value_t = Limits::CONTRACT.max_content_bytes as u64,
          value_parser = clap::value_parser!(u64).range(1..=Limits::CONTRACT.max_content_bytes as u64))]
    pub max_content_bytes: u64,

    /// Most messages per AppendMessages call (at most 100).
    #[arg(long, env = "CONVO_MAX_BATCH_MESSAGES", default_value_t = Limits::CONTRACT.max_batch_messages as u64,
          value_parser = clap::value_parser!(u64).range(1..=Limits::CONTRACT.max_batch_messages as u64))]
    pub max_batch_messages: u64,

    /// Largest page (and ResumeConversation max_messages) served (at most 1000).
    #[arg(long, env = "CONVO_MAX_PAGE_SIZE", default_value_t = Limits::CONTRACT.max_page_size as u64,
          value_parser = clap::value_parser!(u64).range(1..=Limits::CONTRACT.max_page_size as u64))]
    pub max_page_size: u64,
}

impl ServeArgs {
    /// The server's settings, reading the TLS and JWT files the flags name.
    /// The database URL is resolved separately (it may be a private cluster).
    pub fn settings(&self, database_url: String) -> Result<Settings, ConfigError> {
        Ok(Settings {
            listen: self.listen,
            database_url,
            pool: self.pool(),
            health_interval: self.health_interval,
            feed: FeedSettings {
                publish_interval: self.change_publish_interval,
                catch_up_interval: self.watch_catch_up_interval,
                ..FeedSettings::default()
            },
            limits: self.limits(),
            page_token_secret: self.page_token_secret.clone().map(String::into_bytes),
            drain_timeout: self.drain_timeout,
            max_in_flight: self.max_in_flight as usize,
            watch_limits: WatchLimits {
                per_user: self.max_watch_streams_per_user as usize,
                per_server: self.max_watch_streams as usize,
            },
            max_request_bytes: self.max_request_bytes as usize,
            max_response_bytes: self.max_response_bytes as usize,
            // An answer always fits an empty account; the bound is for the
            // ones after it.
            max_unread_bytes: self.max_unread_bytes.max(self.max_response_bytes) as usize,
            metrics_addr: self.metrics_addr,
            retention: self.retention(),
            tls: self.tls()?,
            health_listen: self.health_listen,
            jwt: self.jwt()?,
        })
    }

    fn pool(&self) -> PoolSettings {
        PoolSettings {
            max_size: self.pool_size,
            acquire_timeout: self.acquire_timeout,
            statement_timeout: self.statement_timeout,
            lock_timeout: self.lock_timeout,
            search_timeout: self.search_timeout,
        }
    }

    /// The JWT settings, reading the key files, in `--auth jwt` mode.
    fn jwt(&self) -> Result<Option<JwtSettings>, ConfigError> {
        if self.auth == AuthMode::Header {
            return Ok(None);
        }
        let read = |path: &PathBuf| read_file(path).map_err(ConfigError::Auth);
        Ok(Some(JwtSettings {
            secret: self
                .jwt_secret_file
                .as_ref()
                .map(|path| read(path).map(|s| s.trim_ascii().to_vec()))
                .transpose()?,
            public_key_pem: self.jwt_public_key.as_ref().map(read).transpose()?,
            jwks_json: self.jwt_jwks.as_ref().map(read).transpose()?,
            issuer: self.jwt_issuer.clone(),
            audience: self.jwt_audience.clone(),
            user_claim: self.jwt_user_claim.clone(),
            leeway: self.jwt_leeway,
        }))
    }

    /// Reads the TLS files named by the flags.
    fn tls(&self) -> Result<Option<TlsSettings>, ConfigError> {
        let read = |path: &PathBuf| read_file(path).map_err(ConfigError::Tls);
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        Ok(Some(TlsSettings {
            cert_pem: read(cert)?,
            key_pem: read(key)?,
            client_ca_pem: self.tls_client_ca.as_ref().map(read).transpose()?,
        }))
    }

    fn retention(&self) -> Option<RetentionPolicy> {
        self.retention.map(|idle_for| RetentionPolicy {
            idle_for,
            interval: self.retention_interval,
            batch: self.retention_batch,
        })
    }

    /// The contract's limits, lowered where the operator asked.
    fn limits(&self) -> Limits {
        let max_page_size = self.max_page_size as u32;
        Limits {
            max_content_bytes: self.max_content_bytes as usize,
            max_batch_messages: self.max_batch_messages as usize,
            max_page_size,
            default_page_size: Limits::CONTRACT.default_page_size.min(max_page_size),
            ..Limits::CONTRACT
        }
    }
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Revert the most recently applied migration instead of applying.
    #[arg(long)]
    pub revert: bool,
}

#[derive(Debug, Args)]
pub struct DistributeArgs {
    /// PostgreSQL URL of the Citus coordinator's database.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,

    /// Shards per table [default: Citus's citus.shard_count, 32]. Fixed once
    /// the tables are distributed.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64000))]
    pub shard_count: Option<u32>,
}

/// An interval between periodic checks: at least 10 ms (0 would spin, and
/// tokio refuses a zero period) and at most a day.
fn positive_interval(value: &str) -> Result<Duration, String> {
    let interval = humantime::parse_duration(value).map_err(|e| e.to_string())?;
    if interval < Duration::from_millis(10) || interval > Duration::from_secs(86_400) {
        return Err(format!("{value} is not an interval between 10ms and 1day"));
    }
    Ok(interval)
}

/// How long a conversation may stay idle: at least a minute, at most 100
/// years (a longer one could not be subtracted from today's date, and would
/// silently keep everything).
fn retention_period(value: &str) -> Result<Duration, String> {
    let period = humantime::parse_duration(value).map_err(|e| e.to_string())?;
    if period < Duration::from_secs(60) || period > Duration::from_secs(100 * 365 * 86_400) {
        return Err(format!(
            "{value} is not a retention period between 1m and 100years"
        ));
    }
    Ok(period)
}

fn read_file(path: &PathBuf) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}
