//! Start-up as a value: [`Application::build`] connects and binds, returns the
//! bound address, and [`Application::run_until`] serves until told to stop.

use std::{future::Future, net::SocketAddr, time::Duration};

use tokio::net::TcpListener;
use tokio_stream::{StreamExt, wrappers::TcpListenerStream};
use tonic::{
    codec::CompressionEncoding,
    transport::{Certificate, Identity, Server, ServerTlsConfig},
};
use tonic_health::ServingStatus;

use crate::{
    config::DatabaseArgs,
    domain::{Limits, PageTokenCodec},
    grpc::{
        self, ConversationApi, SERVICE_NAME,
        proto::conversation_service_server::ConversationServiceServer,
    },
    local_postgres::{LocalPostgres, LocalPostgresError, LocalPostgresOptions},
    retention::RetentionPolicy,
    service::Conversations,
    store::{self, ChangeFeed, PoolSettings, Store, StoreError},
};

/// Why convo could not start. Printed as one line by the binary.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("invalid database URL: {0}")]
    DatabaseUrl(String),
    #[error("could not prepare the database: {0}")]
    Migrations(String),
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
    #[error("could not build the reflection service: {0}")]
    Reflection(String),
    #[error("could not serve metrics: {0}")]
    Metrics(String),
    #[error("invalid TLS configuration: {0}")]
    Tls(String),
    #[error("invalid JWT configuration: {0}")]
    Auth(String),
}

/// Everything the server needs, resolved from flags and environment.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub database_url: String,
    pub pool: PoolSettings,
    pub health_interval: Duration,
    pub limits: Limits,
    pub page_token_secret: Vec<u8>,
    /// After the shutdown signal, how long in-flight calls may take.
    pub drain_timeout: Duration,
    /// Most convo.v1 calls in progress at once.
    pub max_in_flight: usize,
    /// Largest request accepted, in bytes.
    pub max_request_bytes: usize,
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
    pub jwt: Option<grpc::JwtSettings>,
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

/// The database convo talks to, and the private cluster behind it if convo
/// started one (stop it after the server has stopped).
#[derive(Debug)]
pub struct Database {
    pub url: String,
    pub local: Option<LocalPostgres>,
}

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
            return Ok(Self {
                url: url.clone(),
                local: None,
            });
        }
        let local = LocalPostgres::start(&LocalPostgresOptions {
            data_dir: args.data_dir.clone(),
            fsync: true,
            port: None,
        })
        .await?;
        let url = local.url("convo");
        tracing::info!(
            data_dir = %local.data_dir().display(),
            database = %url,
            "no DATABASE_URL given: using a private PostgreSQL"
        );
        Ok(Self {
            url,
            local: Some(local),
        })
    }

    /// Stops the private cluster, if convo started one.
    pub async fn close(self) {
        if let Some(local) = self.local {
            local.stop().await;
            tracing::info!("private PostgreSQL stopped");
        }
    }
}

fn redact(url: &url::Url) -> String {
    let mut shown = url.clone();
    if shown.password().is_some() {
        let _ = shown.set_password(Some("***"));
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
        let store = Store::new(&settings.database_url, settings.pool);
        store.ping().await.map_err(StartupError::Database)?;
        let listener =
            TcpListener::bind(settings.listen)
                .await
                .map_err(|source| StartupError::Listen {
                    addr: settings.listen,
                    source,
                })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| StartupError::Listen {
                addr: settings.listen,
                source,
            })?;
        let changes = ChangeFeed::start(&settings.database_url);
        Ok(Self {
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

    /// The live-change feed this server's watch streams use.
    pub fn changes(&self) -> &ChangeFeed {
        &self.changes
    }

    /// Serves convo.v1, health and reflection until `shutdown` completes, then
    /// stops accepting, lets in-flight calls finish and closes the pool.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<(), StartupError> {
        let (reporter, health_service) = tonic_health::server::health_reporter();
        // The database answered in build(); the watcher takes over from here.
        reporter
            .set_service_status("", ServingStatus::Serving)
            .await;
        reporter
            .set_service_status(SERVICE_NAME, ServingStatus::Serving)
            .await;
        let health_watch = tokio::spawn(grpc::watch_database_health(
            self.store.clone(),
            reporter,
            self.settings.health_interval,
        ));
        let sweeper = self.settings.retention.map(|policy| {
            tracing::info!(idle_for = ?policy.idle_for, "retention policy on");
            tokio::spawn(crate::retention::sweep(self.store.clone(), policy))
        });

        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(grpc::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| StartupError::Reflection(e.to_string()))?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(grpc::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .map_err(|e| StartupError::Reflection(e.to_string()))?;

        let changes = self.changes;
        let api = ConversationApi::new(
            Conversations::new(self.store.clone(), changes.clone()),
            self.settings.limits,
            PageTokenCodec::new(&self.settings.page_token_secret),
        );
        // Every call logged and counted (refused ones too), then identity
        // (no identity, no work), then the in-flight bound.
        let server = ConversationServiceServer::new(api)
            .max_decoding_message_size(self.settings.max_request_bytes)
            .accept_compressed(CompressionEncoding::Gzip)
            .accept_compressed(CompressionEncoding::Zstd)
            .send_compressed(CompressionEncoding::Gzip)
            .send_compressed(CompressionEncoding::Zstd);
        let limited = tower::Layer::layer(
            &grpc::InFlightLimitLayer::new(self.settings.max_in_flight),
            server,
        );
        let conversations = tower::Layer::layer(
            &grpc::ObserveLayer,
            tonic::service::interceptor::InterceptedService::new(limited, self.authenticator),
        );

        let incoming = TcpListenerStream::new(self.listener).map(|stream| {
            stream.inspect(|s| {
                // Small unary replies should not wait for Nagle's algorithm.
                let _ = s.set_nodelay(true);
            })
        });
        let mut builder = Server::builder();
        if let Some(tls) = &self.settings.tls {
            let mut config =
                ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem));
            if let Some(ca) = &tls.client_ca_pem {
                config = config.client_ca_root(Certificate::from_pem(ca));
            }
            builder = builder
                .tls_config(config)
                .map_err(|e| StartupError::Tls(e.to_string()))?;
        }
        // Probes that cannot present a client certificate get health alone,
        // in plaintext, on their own address.
        let (stopping, stop_probes) = tokio::sync::watch::channel(false);
        let probes = match self.settings.health_listen {
            Some(addr) => {
                let listener = TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartupError::Listen { addr, source })?;
                tracing::info!(%addr, "serving gRPC health for probes, in plaintext");
                let mut stop_probes = stop_probes;
                Some(tokio::spawn(
                    Server::builder()
                        .add_service(health_service.clone())
                        .serve_with_incoming_shutdown(
                            TcpListenerStream::new(listener),
                            async move {
                                let _ = stop_probes.wait_for(|stop| *stop).await;
                            },
                        ),
                ))
            }
            None => None,
        };
        tracing::info!(
            addr = %self.local_addr,
            tls = self.settings.tls.is_some(),
            mutual_tls = self.settings.tls.as_ref().is_some_and(|t| t.client_ca_pem.is_some()),
            "serving convo.v1"
        );
        let (draining, drain_started) = tokio::sync::oneshot::channel::<()>();
        let serve = builder
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(conversations)
            .serve_with_incoming_shutdown(incoming, async {
                shutdown.await;
                // Watch streams never end by themselves: end them so that
                // in-flight calls can drain.
                changes.close();
                let _ = stopping.send(true);
                let _ = draining.send(());
            });
        tokio::pin!(serve);
        let drain_timeout = self.settings.drain_timeout;
        let served = tokio::select! {
            served = &mut serve => served,
            () = async {
                if drain_started.await.is_ok() {
                    tokio::time::sleep(drain_timeout).await;
                } else {
                    std::future::pending::<()>().await;
                }
            } => {
                tracing::warn!(?drain_timeout, "calls still in progress after the drain timeout; stopping anyway");
                Ok(())
            }
        };
        health_watch.abort();
        if let Some(probes) = probes {
            let _ = stopping.send(true);
            let _ = probes.await;
        }
        if let Some(sweeper) = sweeper {
            sweeper.abort();
        }
        drop(self.store);
        tracing::info!("server stopped");
        served.map_err(|e| StartupError::Listen {
            addr: self.local_addr,
            source: std::io::Error::other(e),
        })
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
