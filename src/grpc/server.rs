//! The gRPC server: convo.v1 behind its layers, health and reflection, over
//! plaintext or TLS, with an optional plaintext listener for health probes,
//! and a graceful drain bounded in time.

use std::{future::Future, net::SocketAddr, time::Duration};

use tokio::net::TcpListener;
use tokio_stream::{StreamExt, wrappers::TcpListenerStream};
use tonic::{
    codec::CompressionEncoding,
    transport::{Certificate, Identity, Server, ServerTlsConfig},
};
use tonic_health::ServingStatus;

use super::{
    Authenticator, ConversationApi, InFlightLimitLayer, ObserveLayer, SERVICE_NAME,
    health::watch_database_health, proto,
    proto::conversation_service_server::ConversationServiceServer,
};
use crate::{config::TlsSettings, store::Store};

/// Why the server could not be assembled or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("could not listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("could not build the reflection service: {0}")]
    Reflection(String),
    #[error("invalid TLS configuration: {0}")]
    Tls(String),
}

/// How the server is put together.
pub struct ServerOptions<'a> {
    pub authenticator: Authenticator,
    /// Largest request accepted, in bytes.
    pub max_request_bytes: usize,
    /// Most convo.v1 calls in progress at once.
    pub max_in_flight: usize,
    pub tls: Option<&'a TlsSettings>,
    /// Serve health alone, in plaintext, on this address too.
    pub health_listen: Option<SocketAddr>,
    /// After shutdown begins, how long in-flight calls may take.
    pub drain_timeout: Duration,
    /// The database whose answers gRPC health reports, and how often it is asked.
    pub health_of: Store,
    pub health_interval: Duration,
}

/// Serves convo.v1, health and reflection on `listener` until `shutdown`
/// completes, then stops accepting and lets in-flight calls finish, for at
/// most the drain timeout.
pub async fn serve(
    listener: TcpListener,
    api: ConversationApi,
    options: ServerOptions<'_>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let (reporter, health_service) = tonic_health::server::health_reporter();
    // The caller checked that the database answers; the watcher takes over.
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    reporter
        .set_service_status(SERVICE_NAME, ServingStatus::Serving)
        .await;
    let health_watch = tokio::spawn(watch_database_health(
        options.health_of,
        reporter,
        options.health_interval,
    ));
    let local_addr = listener.local_addr().map_err(|source| ServeError::Listen {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })?;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;

    // Every call logged and counted (refused ones too), then identity (no
    // identity, no work), then the in-flight bound.
    let server = ConversationServiceServer::new(api)
        .max_decoding_message_size(options.max_request_bytes)
        .accept_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Zstd)
        .send_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Zstd);
    let limited = tower::Layer::layer(&InFlightLimitLayer::new(options.max_in_flight), server);
    let conversations = tower::Layer::layer(
        &ObserveLayer,
        tonic::service::interceptor::InterceptedService::new(limited, options.authenticator),
    );

    let incoming = TcpListenerStream::new(listener).map(|stream| {
        stream.inspect(|s| {
            // Small unary replies should not wait for Nagle's algorithm.
            let _ = s.set_nodelay(true);
        })
    });
    let mut builder = Server::builder();
    if let Some(tls) = options.tls {
        let mut config =
            ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem));
        if let Some(ca) = &tls.client_ca_pem {
            config = config.client_ca_root(Certificate::from_pem(ca));
        }
        builder = builder
            .tls_config(config)
            .map_err(|e| ServeError::Tls(e.to_string()))?;
    }
    // Probes that cannot present a client certificate get health alone, in
    // plaintext, on their own address.
    let (stopping, stop_probes) = tokio::sync::watch::channel(false);
    let probes = match options.health_listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Listen { addr, source })?;
            tracing::info!(%addr, "serving gRPC health for probes, in plaintext");
            let mut stop_probes = stop_probes;
            Some(tokio::spawn(
                Server::builder()
                    .add_service(health_service.clone())
                    .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                        let _ = stop_probes.wait_for(|stop| *stop).await;
                    }),
            ))
        }
        None => None,
    };
    tracing::info!(
        addr = %local_addr,
        tls = options.tls.is_some(),
        mutual_tls = options.tls.is_some_and(|t| t.client_ca_pem.is_some()),
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
            let _ = stopping.send(true);
            let _ = draining.send(());
        });
    tokio::pin!(serve);
    let drain_timeout = options.drain_timeout;
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
    served.map_err(|e| ServeError::Listen {
        addr: local_addr,
        source: std::io::Error::other(e),
    })
}
