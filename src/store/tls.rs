//! TLS to PostgreSQL, chosen by the database URL as libpq does:
//! `sslmode=disable|prefer|require|verify-ca|verify-full` and, for the
//! verifying modes, `sslrootcert=<PEM file>` (the system's CA bundle when
//! absent). `prefer` is the default, as in libpq: TLS when the server offers
//! it. `require` encrypts without checking the certificate; `verify-ca`
//! checks it against the roots; `verify-full` also checks that it names the
//! host. Connections over a Unix socket never use TLS.
//!
//! tokio-postgres knows only disable/prefer/require, so both parameters are
//! taken out of the URL here and the rest of it goes to tokio-postgres; the
//! TLS itself is rustls (the same as the gRPC server's).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use diesel::{ConnectionError, ConnectionResult};
use diesel_async::AsyncPgConnection;
use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject},
};
use tokio::{io::BufReader, sync::mpsc, task::JoinHandle};
use tokio_postgres::{
    AsyncMessage, NoTls, Socket,
    tls::{MakeTlsConnect, TlsConnect, TlsStream},
};
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_util::task::TaskTracker;

/// How much TLS a URL asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// A database URL resolved into what tokio-postgres is given and the TLS
/// that goes with it. Cheap to clone.
#[derive(Clone)]
pub(super) struct DatabaseTarget {
    /// The URL without `sslmode` and `sslrootcert`.
    url: String,
    mode: SslMode,
    tls: Option<BufferedTls>,
    sessions: OpenSessions,
    /// How many notifications a session holds for its reader.
    backlog: usize,
}

/// How many notifications a session holds for a reader that has fallen
/// behind before it drops them (and says so, see [`Notice::Missed`]): a
/// payload is at most 8,000 bytes, so a few MB at worst.
pub(super) const NOTIFICATION_BACKLOG: usize = 1024;

impl std::fmt::Debug for DatabaseTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseTarget")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// Where the system keeps its CA bundle (Debian, Ubuntu, Alpine; Fedora).
const SYSTEM_ROOTS: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
];

impl DatabaseTarget {
    pub fn parse(database_url: &str) -> Result<Self, String> {
        let Ok(mut url) = url::Url::parse(database_url) else {
            // Not a URL (a key=value string): tokio-postgres reads it as is.
            return Ok(Self {
                url: database_url.to_owned(),
                mode: SslMode::Disable,
                tls: None,
                sessions: OpenSessions::default(),
                backlog: NOTIFICATION_BACKLOG,
            });
        };
        let mut mode = SslMode::Prefer;
        let mut root_file = None;
        let mut rest = Vec::new();
        for (key, value) in url.query_pairs() {
            match key.as_ref() {
                "sslmode" => {
                    mode = match value.as_ref() {
                        "disable" => SslMode::Disable,
                        "allow" | "prefer" => SslMode::Prefer,
                        "require" => SslMode::Require,
                        "verify-ca" => SslMode::VerifyCa,
                        "verify-full" => SslMode::VerifyFull,
                        other => {
                            return Err(format!(
                                "sslmode={other} is not one of disable, prefer, require, \
                                 verify-ca, verify-full"
                            ));
                        }
                    }
                }
                "sslrootcert" => root_file = Some(value.into_owned()),
                _ => rest.push((key.into_owned(), value.into_owned())),
            }
        }
        url.set_query(None);
        if !rest.is_empty() {
            url.query_pairs_mut().extend_pairs(rest);
        }
        let tls = match mode {
            SslMode::Disable => None,
            SslMode::Prefer | SslMode::Require => Some(client_config(Arc::new(Lenient {
                provider: provider(),
                chain: None,
            }))),
            SslMode::VerifyCa | SslMode::VerifyFull => {
                let roots = roots(root_file.as_deref())?;
                let webpki = WebPkiServerVerifier::builder_with_provider(
                    Arc::new(roots),
                    Arc::new(provider()),
                )
                .build()
                .map_err(|e| format!("cannot verify the database's certificate: {e}"))?;
                let verifier: Arc<dyn ServerCertVerifier> = if mode == SslMode::VerifyFull {
                    webpki
                } else {
                    Arc::new(Lenient {
                        provider: provider(),
                        chain: Some(webpki),
                    })
                };
                Some(client_config(verifier))
            }
        };
        Ok(Self {
            url: url.to_string(),
            mode,
            tls: tls.map(|config| BufferedTls(MakeRustlsConnect::new(config))),
            sessions: OpenSessions::default(),
            backlog: NOTIFICATION_BACKLOG,
        })
    }

    /// Opens one connection as the URL asks, driven by a task of ours.
    ///
    /// diesel-async's own driver stops the moment the connection is dropped,
    /// before the statements it prepared are closed or a notification on its
    /// way is read, so PostgreSQL answered into a closed socket and logged a
    /// broken pipe or a reset for every session convo ended. Ours carries on
    /// until the session has closed them and said goodbye (Terminate), as
    /// libpq does, and hands over the notifications a LISTEN brings.
    pub async fn connect(&self) -> ConnectionResult<Opened> {
        self.attempt().await?.map_err(bad_connection)
    }

    /// [`DatabaseTarget::connect`], with a failure to connect kept as
    /// tokio-postgres reported it (see [`may_pass`]).
    async fn attempt(&self) -> ConnectionResult<Result<Opened, tokio_postgres::Error>> {
        let config = self.config()?;
        Ok(match &self.tls {
            None => match config.connect(NoTls).await {
                Ok((client, connection)) => Ok(self.adopt(client, connection).await?),
                Err(error) => Err(error),
            },
            Some(tls) => match config.connect(tls.clone()).await {
                Ok((client, connection)) => Ok(self.adopt(client, connection).await?),
                Err(error) => Err(error),
            },
        })
    }

    /// Opens a session and ends it at once: whether the server answers.
    pub(super) async fn reach(&self) -> Result<(), Unreached> {
        match self.attempt().await {
            Ok(Ok(opened)) => {
                opened.close().await;
                Ok(())
            }
            Ok(Err(error)) => Err(Unreached {
                reason: with_causes(&error),
                may_pass: may_pass(&error),
            }),
            Err(error) => Err(Unreached {
                reason: error.to_string(),
                may_pass: false,
            }),
        }
    }

    /// The connection in diesel-async's clothes, and the task that drives it
    /// among this target's [`OpenSessions`].
    async fn adopt<S>(
        &self,
        client: tokio_postgres::Client,
        mut connection: tokio_postgres::Connection<Socket, S>,
    ) -> ConnectionResult<Opened>
    where
        S: TlsStream + Unpin + Send + 'static,
    {
        let (notify, payloads) = mpsc::channel(self.backlog);
        let missed = Arc::new(AtomicBool::new(false));
        let notifications = Notifications {
            payloads,
            missed: Arc::clone(&missed),
        };
        let driver = self.sessions.0.spawn(async move {
            let end = loop {
                match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(notification))) => {
                        // A reader that fell behind is told it missed some,
                        // rather than let the backlog grow without bound or
                        // stop reading (PostgreSQL's queue would fill for
                        // every listener of the cluster). Nobody to tell
                        // once the session is being closed.
                        let payload = notification.payload().to_owned();
                        if let Err(mpsc::error::TrySendError::Full(_)) = notify.try_send(payload) {
                            missed.store(true, Ordering::Release);
                            metrics::counter!("convo_notifications_dropped_total").increment(1);
                        }
                    }
                    // Notices: nothing convo runs raises one worth a log line.
                    Some(Ok(_)) => continue,
                    end => break end,
                }
            };
            if let Some(Err(error)) = end {
                tracing::debug!(error = %with_causes(&error), "a database session ended");
            }
        });
        // On failure the client is dropped, and the driver ends the session.
        let conn = AsyncPgConnection::try_from(client).await?;
        Ok(Opened {
            conn,
            notifications,
            ended: Ended(driver),
        })
    }

    /// The same server under another `application_name` (unless the URL
    /// names one), its sessions counted with this target's.
    pub fn named(&self, application_name: &str) -> Self {
        Self {
            url: super::pool::session_url(&self.url, Some(application_name)),
            ..self.clone()
        }
    }

    /// The same target, its sessions holding up to `backlog` notifications
    /// for a reader that falls behind.
    pub fn holding(self, backlog: usize) -> Self {
        Self {
            backlog: backlog.max(1),
            ..self
        }
    }

    /// The sessions opened through this target and the targets named from
    /// it, for a shutdown to wait for their goodbyes.
    pub fn open_sessions(&self) -> OpenSessions {
        self.sessions.clone()
    }

    /// tokio-postgres's settings: the URL as given, TLS as its mode asks.
    fn config(&self) -> ConnectionResult<tokio_postgres::Config> {
        let mut config: tokio_postgres::Config =
            self.url.parse().map_err(|e: tokio_postgres::Error| {
                ConnectionError::InvalidConnectionUrl(e.to_string())
            })?;
        if self.tls.is_some() {
            config.ssl_mode(if self.mode == SslMode::Prefer {
                tokio_postgres::config::SslMode::Prefer
            } else {
                tokio_postgres::config::SslMode::Require
            });
        }
        Ok(config)
    }

    /// Asks PostgreSQL to cancel what the session of `token` is running, over
    /// the same kind of channel the session was opened on.
    pub async fn cancel(&self, token: &tokio_postgres::CancelToken) -> Result<(), String> {
        let sent = match &self.tls {
            Some(tls) => token.cancel_query(tls.clone()).await,
            None => token.cancel_query(tokio_postgres::NoTls).await,
        };
        sent.map_err(|e| with_causes(&e))
    }
}

fn bad_connection(error: tokio_postgres::Error) -> ConnectionError {
    ConnectionError::BadConnection(with_causes(&error))
}

/// How long a one-shot session's end is waited for: a goodbye to a server
/// that no longer answers must not hold up convo's own start or stop.
const CLOSE_LIMIT: Duration = Duration::from_secs(1);

/// A connection and the task that drives it (see [`DatabaseTarget::connect`]).
pub(super) struct Opened {
    pub conn: AsyncPgConnection,
    /// What the session receives by LISTEN; closed when the session ends,
    /// lost or closed.
    pub notifications: Notifications,
    pub ended: Ended,
}

/// The notifications a session has received and its reader has not yet
/// taken, up to the target's backlog.
pub(super) struct Notifications {
    payloads: mpsc::Receiver<String>,
    /// Set by the driver when the backlog was full and a payload dropped.
    missed: Arc<AtomicBool>,
}

/// One thing a LISTENing session has to say.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Notice {
    /// A notification's payload.
    Payload(String),
    /// The reader fell behind and payloads were dropped: whatever they
    /// announced must be found some other way (a fresh read).
    Missed,
}

impl Notifications {
    /// The next notice, or `None` once the session has ended. A drop is
    /// reported at the next call, ahead of the payloads still held: a reader
    /// that re-reads on `Missed` then sees what the dropped ones announced,
    /// since it was committed before they arrived.
    pub async fn recv(&mut self) -> Option<Notice> {
        // The flag is only ever set while the backlog is full, that is while
        // this reader is not waiting below.
        if self.missed.swap(false, Ordering::AcqRel) {
            return Some(Notice::Missed);
        }
        self.payloads.recv().await.map(Notice::Payload)
    }
}

/// The end of an [`Opened`] session's driver: once its connection is
/// dropped, its statements are closed and PostgreSQL is told goodbye.
pub(super) struct Ended(JoinHandle<()>);

impl Opened {
    /// Drops the connection and waits until PostgreSQL has been told
    /// goodbye: for a session opened for one task, before the process may
    /// exit.
    pub async fn close(self) {
        drop(self.conn);
        self.ended.wait().await;
    }
}

/// The drivers of every session opened through one target (and the targets
/// [named](DatabaseTarget::named) from it). Cheap to clone.
#[derive(Clone, Default)]
pub struct OpenSessions(TaskTracker);

impl OpenSessions {
    /// Once everything that could open or hold a session is dropped: waits
    /// (up to [`CLOSE_LIMIT`]) until every session has said goodbye, which
    /// the process would otherwise cut short by exiting.
    pub async fn ended(self) {
        self.0.close();
        if tokio::time::timeout(CLOSE_LIMIT, self.0.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open = self.0.len(),
                waited = ?CLOSE_LIMIT,
                "database sessions still open at exit; PostgreSQL may log their end as a reset"
            );
        }
    }
}

impl Ended {
    /// Waits (up to [`CLOSE_LIMIT`]) until the session's driver has finished,
    /// its connection having been dropped.
    pub async fn wait(self) {
        let _ = tokio::time::timeout(CLOSE_LIMIT, self.0).await;
    }
}

/// How many bytes one read from PostgreSQL's socket may bring: a resume or
/// page of 50 rows (10-20 KB) in one system call.
const READ_BUFFER_BYTES: usize = 64 * 1024;

/// rustls reads its records 4 KiB at a time, so a 13 KB answer cost four
/// `recvfrom` calls; under it, a buffer takes whatever the socket holds at
/// once (one call, as measured with `strace -c`; see BENCHMARKS.md).
#[derive(Clone)]
struct BufferedTls(MakeRustlsConnect);

/// What rustls reads from.
type BufferedSocket = BufReader<Socket>;

impl MakeTlsConnect<Socket> for BufferedTls {
    type Stream = <MakeRustlsConnect as MakeTlsConnect<BufferedSocket>>::Stream;
    type TlsConnect =
        BufferedConnect<<MakeRustlsConnect as MakeTlsConnect<BufferedSocket>>::TlsConnect>;
    type Error = <MakeRustlsConnect as MakeTlsConnect<BufferedSocket>>::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<Self::TlsConnect, Self::Error> {
        <MakeRustlsConnect as MakeTlsConnect<BufferedSocket>>::make_tls_connect(&mut self.0, domain)
            .map(BufferedConnect)
    }
}

struct BufferedConnect<C>(C);

impl<C: TlsConnect<BufferedSocket>> TlsConnect<Socket> for BufferedConnect<C> {
    type Stream = C::Stream;
    type Error = C::Error;
    type Future = C::Future;

    fn connect(self, socket: Socket) -> Self::Future {
        // Only after PostgreSQL said yes to TLS: nothing of the socket was read
        // into a buffer before.
        self.0
            .connect(BufReader::with_capacity(READ_BUFFER_BYTES, socket))
    }
}

/// Why one attempt to reach the server failed, and whether repeating it may
/// succeed.
pub(super) struct Unreached {
    pub reason: String,
    /// The server is not listening yet, is starting or stopping, is full, or
    /// its name does not resolve yet (a container starting beside convo's);
    /// not a refusal that repeating cannot change, such as a wrong password,
    /// a missing database or a certificate that does not verify.
    pub may_pass: bool,
}

/// See [`Unreached::may_pass`].
fn may_pass(error: &tokio_postgres::Error) -> bool {
    use std::io::ErrorKind;
    use tokio_postgres::error::SqlState;
    if error.is_closed() {
        // Closed before the session began: a proxy or balancer in front of a
        // server not up yet, or a server going down.
        return true;
    }
    if let Some(refusal) = error.as_db_error() {
        // 57P03: starting up, shutting down, not yet accepting connections.
        return [SqlState::CANNOT_CONNECT_NOW, SqlState::TOO_MANY_CONNECTIONS]
            .contains(refusal.code());
    }
    let mut cause = std::error::Error::source(error);
    while let Some(inner) = cause {
        if let Some(io) = inner.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                ErrorKind::ConnectionRefused
                    | ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
                    | ErrorKind::NotFound // a Unix socket not made yet
                    | ErrorKind::TimedOut
                    | ErrorKind::UnexpectedEof
                    | ErrorKind::AddrNotAvailable
                    | ErrorKind::HostUnreachable
                    | ErrorKind::NetworkUnreachable
            ) || io.to_string().contains("lookup address");
        }
        cause = inner.source();
    }
    false
}

/// An error and its causes on one line ("error performing TLS handshake:
/// invalid peer certificate: UnknownIssuer"), for the operator's log.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        line.push_str(": ");
        line.push_str(&inner.to_string());
        cause = inner.source();
    }
    line
}

fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

fn client_config(verifier: Arc<dyn ServerCertVerifier>) -> ClientConfig {
    ClientConfig::builder_with_provider(Arc::new(provider()))
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|_| unreachable!("ring supports the default protocol versions"))
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth()
}

fn roots(file: Option<&str>) -> Result<RootCertStore, String> {
    let path = match file {
        Some(path) => path.to_owned(),
        None => SYSTEM_ROOTS
            .iter()
            .find(|path| std::path::Path::new(path).exists())
            .map(|path| (*path).to_owned())
            .ok_or("sslmode verify-ca/verify-full needs sslrootcert=<PEM file> (no system CA bundle found)")?,
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&path)
        .map_err(|e| format!("cannot read sslrootcert {path}: {e}"))?
    {
        let cert =
            cert.map_err(|e| format!("sslrootcert {path} holds an unreadable certificate: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("sslrootcert {path}: {e}"))?;
    }
    if roots.is_empty() {
        return Err(format!("sslrootcert {path} holds no certificate"));
    }
    Ok(roots)
}

/// The certificate check of the modes that do not check everything:
/// `require` and `prefer` (no chain: encryption without a check of who
/// answers, as libpq does) and `verify-ca` (the chain must lead to a trusted
/// root; the name is not looked at). The handshake's signatures are always
/// verified.
#[derive(Debug)]
struct Lenient {
    provider: rustls::crypto::CryptoProvider,
    chain: Option<Arc<WebPkiServerVerifier>>,
}

impl Lenient {
    /// Without a chain to check (`prefer`, `require`), a certificate webpki
    /// cannot read is accepted as libpq accepts it: Citus, for one, makes
    /// every node an X.509 v1 self-signed certificate, which webpki refuses
    /// ("UnsupportedCertVersion"). Nothing is lost: in these modes any
    /// certificate is taken, so its key proves nothing about who answers.
    fn unchecked_identity(
        &self,
        verified: Result<HandshakeSignatureValid, rustls::Error>,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        match verified {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::BadEncoding | rustls::CertificateError::Other(_),
            )) if self.chain.is_none() => Ok(HandshakeSignatureValid::assertion()),
            other => other,
        }
    }
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.unchecked_identity(rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.unchecked_identity(rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        ))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssl_parameters_are_taken_out_of_the_url() {
        let target = DatabaseTarget::parse(
            "postgres://app@db:5432/convo?sslmode=require&application_name=x",
        )
        .unwrap();
        assert_eq!(target.mode, SslMode::Require);
        assert_eq!(
            target.url,
            "postgres://app@db:5432/convo?application_name=x"
        );
        let plain = DatabaseTarget::parse("postgres://app@db/convo").unwrap();
        assert_eq!(plain.mode, SslMode::Prefer, "libpq's default");
        assert_eq!(plain.url, "postgres://app@db/convo");
        assert!(DatabaseTarget::parse("postgres://db/convo?sslmode=sometimes").is_err());
        assert!(
            DatabaseTarget::parse(
                "postgres://db/convo?sslmode=verify-full&sslrootcert=/nonexistent"
            )
            .unwrap_err()
            .contains("/nonexistent")
        );
    }
}
