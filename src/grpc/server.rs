//! The gRPC server: convo.v1 behind its layers, health and reflection, over
//! plaintext or TLS, with an optional plaintext listener for health probes,
//! and a graceful drain bounded in time.

use std::{future::Future, net::SocketAddr, time::Duration};

use futures_util::future::Either;
use tokio::net::TcpListener;
use tokio_stream::{StreamExt, wrappers::TcpListenerStream};
use tonic::{codec::CompressionEncoding, transport::Server};
use tonic_health::ServingStatus;

use super::{
    Authenticator, ConversationApi, ObserveLayer, SERVICE_NAME,
    health::{self, watch_database_health},
    proto,
    proto::conversation_service_server::ConversationServiceServer,
    unread::UnreadLimitLayer,
};
use crate::{config::TlsSettings, store::Store};

/// Streams one client connection may have open at once. A client that opens
/// streams and never finishes them only fills its own connection.
const MAX_CONCURRENT_STREAMS: u32 = 256;
/// An HTTP/2 PING after this long without frames, and the connection is
/// closed if its answer takes longer than the timeout: a peer that vanished
/// (or stopped reading) does not keep its streams and buffers for ever.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams the server may reset for a client's protocol errors before it
/// ends the connection with GOAWAY (h2's defence against reset floods, which
/// tonic leaves off unless set).
const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// The HTTP/2 limits every listener applies.
fn http2_limits(builder: Server) -> Server {
    builder
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .http2_max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
}

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
    /// Most bytes of answers one connection may leave unread.
    pub max_unread_bytes: usize,
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
    reporter
        .set_service_status(health::DATABASE_HEALTH_NAME, ServingStatus::Serving)
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
    // Both reflection services describe everything served, both of them
    // included: each listed only itself, so `grpcurl list` (which asks
    // v1alpha) named no v1 and could not describe it. The google.rpc error
    // details are described too, so that a client working from reflection
    // (grpcurl) decodes the BadRequest of a refusal instead of printing its
    // bytes.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;

    // Every call logged and counted (refused ones too), its answer held to
    // the connection's bound on unread bytes (unread.rs), then identity (no
    // identity, no work); the in-flight bound is taken by each handler, once
    // the request has been decoded.
    let server = ConversationServiceServer::new(api)
        .max_decoding_message_size(options.max_request_bytes)
        .accept_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Zstd)
        .send_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Zstd);
    let conversations = tower::Layer::layer(
        &ObserveLayer,
        tower::Layer::layer(
            &UnreadLimitLayer::new(options.max_unread_bytes),
            tonic::service::interceptor::InterceptedService::new(server, options.authenticator),
        ),
    );

    // TLS is ours rather than tonic's, so that a failed handshake (a client
    // certificate from another CA, an X.509 v1 certificate) is logged at warn
    // with its reason.
    let acceptor = options.tls.map(tls::acceptor).transpose()?;
    let mut builder = http2_limits(Server::builder());
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
                http2_limits(Server::builder())
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
    let router = builder
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(conversations);
    let stop_serving = async {
        shutdown.await;
        let _ = stopping.send(true);
        let _ = draining.send(());
    };
    let mut handshakes = None;
    let serve = match acceptor {
        Some(acceptor) => {
            let (incoming, accepting) = tls::incoming(listener, acceptor);
            handshakes = Some(accepting);
            Either::Left(router.serve_with_incoming_shutdown(incoming, stop_serving))
        }
        None => {
            let incoming = TcpListenerStream::new(listener).map(|stream| {
                stream.inspect(|s| {
                    // Small unary replies should not wait for Nagle's algorithm.
                    let _ = s.set_nodelay(true);
                })
            });
            Either::Right(router.serve_with_incoming_shutdown(incoming, stop_serving))
        }
    };
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
    if let Some(handshakes) = handshakes {
        handshakes.abort();
    }
    if let Some(probes) = probes {
        let _ = stopping.send(true);
        let _ = probes.await;
    }
    served.map_err(|e| ServeError::Listen {
        addr: local_addr,
        source: std::io::Error::other(e),
    })
}

/// TLS for the gRPC listener: rustls, with handshakes that fail reported.
mod tls {
    use std::{
        net::SocketAddr,
        sync::{Arc, Mutex},
        time::{Duration, Instant},
    };

    use rustls::{
        RootCertStore, ServerConfig,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
        server::WebPkiClientVerifier,
    };
    use tokio::{
        net::{TcpListener, TcpStream},
        sync::mpsc,
        task::JoinHandle,
    };
    use tokio_rustls::{TlsAcceptor, server::TlsStream};
    use tokio_stream::wrappers::ReceiverStream;

    use super::ServeError;
    use crate::config::TlsSettings;

    /// A client that has not finished its handshake by then is dropped.
    const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

    pub(super) fn acceptor(tls: &TlsSettings) -> Result<TlsAcceptor, ServeError> {
        let invalid =
            |what: &str, e: &dyn std::fmt::Display| ServeError::Tls(format!("{what}: {e}"));
        let certs = CertificateDer::pem_slice_iter(&tls.cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid("the certificate (PEM)", &e))?;
        if certs.is_empty() {
            return Err(ServeError::Tls(
                "the certificate file holds no certificate".into(),
            ));
        }
        let key = PrivateKeyDer::from_pem_slice(&tls.key_pem)
            .map_err(|e| invalid("the private key (PEM)", &e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid("TLS versions", &e))?;
        let builder = match &tls.client_ca_pem {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(ca) {
                    let cert = cert.map_err(|e| invalid("the client CA (PEM)", &e))?;
                    roots.add(cert).map_err(|e| invalid("the client CA", &e))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| invalid("the client CA", &e))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| invalid("the certificate and key", &e))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }

    type Accepted = Result<TlsStream<TcpStream>, std::io::Error>;

    /// Accepts connections and completes their handshakes concurrently; the
    /// stream yields the ones that succeed. The task runs until aborted.
    pub(super) fn incoming(
        listener: TcpListener,
        acceptor: TlsAcceptor,
    ) -> (ReceiverStream<Accepted>, JoinHandle<()>) {
        let (sender, receiver) = mpsc::channel::<Accepted>(64);
        let failures = Arc::new(FailureLog::default());
        let accepting = tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        if sender.send(Err(error)).await.is_err() {
                            return;
                        }
                        continue;
                    }
                };
                // Small unary replies should not wait for Nagle's algorithm.
                let _ = tcp.set_nodelay(true);
                let (acceptor, sender, failures) =
                    (acceptor.clone(), sender.clone(), failures.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = sender.send(Ok(stream)).await;
                        }
                        // A connection closed before it said anything is a TCP
                        // probe (a load balancer's), not a failing client.
                        Ok(Err(error)) if error.kind() == std::io::ErrorKind::UnexpectedEof => {
                            tracing::debug!(%peer, "connection closed before a TLS handshake");
                        }
                        Ok(Err(error)) => failures.report(peer, &error.to_string()),
                        Err(_) => failures.report(peer, "no handshake within 10 s"),
                    }
                });
            }
        });
        (ReceiverStream::new(receiver), accepting)
    }

    /// Failed handshakes, logged at warn at most once a second, with how
    /// many were not logged since.
    #[derive(Default)]
    struct FailureLog {
        state: Mutex<(Option<Instant>, u64)>,
    }

    impl FailureLog {
        fn report(&self, peer: SocketAddr, reason: &str) {
            metrics::counter!("convo_tls_handshake_failures_total").increment(1);
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let (last, suppressed) = &mut *state;
            if last.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
                *suppressed += 1;
                return;
            }
            tracing::warn!(
                %peer,
                reason,
                not_logged_since = *suppressed,
                "TLS handshake failed"
            );
            *last = Some(Instant::now());
            *suppressed = 0;
        }
    }
}
