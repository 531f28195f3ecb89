//! A bound on the answers a connection has not read.
//!
//! An encoded answer waits in memory until the client reads it. A client
//! that asks and never reads (and keeps answering PINGs, so keepalive does
//! not close it) would make the server hold every answer it asked for. So
//! each connection carries an account of the answer bytes not yet sent: an
//! answer is charged in full when it is encoded, then handed to HTTP/2 in
//! chunks, and each chunk is credited when HTTP/2 asks for the next one,
//! which it does only once the client's flow-control window has room for
//! it. An answer that would take a connection past its bound is not sent:
//! the call ends with RESOURCE_EXHAUSTED instead, and the connection stays
//! open for the answers it reads. Only reads are refused this way (see
//! [`reads`]).

use std::{
    collections::HashMap,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt};
use http::HeaderMap;
use http_body::Frame;
use tonic::{
    server::NamedService,
    transport::server::{TcpConnectInfo, TlsConnectInfo},
};
use tower::{Layer, Service};

/// How much of an answer is handed to HTTP/2 at a time.
const CHUNK: usize = 64 * 1024;

/// The two ends of a TCP connection.
type Connection = (SocketAddr, SocketAddr);

/// Bytes handed to HTTP/2 and not yet on their way, per connection.
#[derive(Debug, Default)]
struct Accounts(Mutex<HashMap<Connection, usize>>);

impl Accounts {
    /// Adds `bytes` to the connection's account unless that would pass
    /// `limit`; an account that is empty may always take one answer.
    fn charge(&self, connection: Connection, bytes: usize, limit: usize) -> bool {
        let mut accounts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let owed = accounts.entry(connection).or_default();
        if *owed > 0 && *owed + bytes > limit {
            return false;
        }
        *owed += bytes;
        true
    }

    fn credit(&self, connection: Connection, bytes: usize) {
        let mut accounts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(owed) = accounts.get_mut(&connection) {
            *owed = owed.saturating_sub(bytes);
            if *owed == 0 {
                accounts.remove(&connection);
            }
        }
    }
}

/// Wraps convo.v1 so that no connection holds more than `limit` bytes of
/// answers it has not read.
#[derive(Debug, Clone)]
pub struct UnreadLimitLayer {
    accounts: Arc<Accounts>,
    limit: usize,
}

impl UnreadLimitLayer {
    pub fn new(limit: usize) -> Self {
        Self {
            accounts: Arc::default(),
            limit,
        }
    }
}

impl<S> Layer<S> for UnreadLimitLayer {
    type Service = UnreadLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        UnreadLimit {
            inner,
            accounts: self.accounts.clone(),
            limit: self.limit,
        }
    }
}

#[derive(Debug, Clone)]
pub struct UnreadLimit<S> {
    inner: S,
    accounts: Arc<Accounts>,
    limit: usize,
}

impl<S: NamedService> NamedService for UnreadLimit<S> {
    const NAME: &'static str = S::NAME;
}

/// Whether the call only reads. Only reads are held to the bound: refusing
/// a write's answer would report RESOURCE_EXHAUSTED, which says "not done,
/// retry", for a write that was done. A write's answer is small anyway (what
/// the request carried, at most).
fn reads(path: &str) -> bool {
    const READS: [&str; 6] = [
        "GetConversation",
        "ListConversations",
        "ListMessages",
        "ResumeConversation",
        "SearchMessages",
        "WatchConversation",
    ];
    path.rsplit('/')
        .next()
        .is_some_and(|method| READS.contains(&method))
}

/// The connection a request came on, plaintext or TLS.
fn connection_of(extensions: &http::Extensions) -> Option<Connection> {
    let tcp = match extensions.get::<TcpConnectInfo>() {
        Some(tcp) => tcp,
        None => extensions
            .get::<TlsConnectInfo<TcpConnectInfo>>()?
            .get_ref(),
    };
    Some((tcp.local_addr()?, tcp.remote_addr()?))
}

impl<S, B, R> Service<http::Request<B>> for UnreadLimit<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    R: http_body::Body<Data = bytes::Bytes, Error = tonic::Status> + Send + Unpin + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let account = reads(request.uri().path())
            .then(|| connection_of(request.extensions()))
            .flatten()
            .map(|connection| Account {
                accounts: self.accounts.clone(),
                connection,
                owed: 0,
            });
        let limit = self.limit;
        let call = self.inner.call(request);
        async move {
            let response = call.await?;
            // Writes (and calls whose connection is unknown) pass as they are.
            let Some(account) = account else {
                return Ok(response.map(tonic::body::Body::new));
            };
            Ok(response.map(|inner| {
                tonic::body::Body::new(Unread {
                    inner,
                    account,
                    limit,
                    refused: false,
                    rest: Bytes::new(),
                    handed: 0,
                })
            }))
        }
        .boxed()
    }
}

/// What one answer owes its connection's account: the bytes charged and not
/// yet seen go.
struct Account {
    accounts: Arc<Accounts>,
    connection: Connection,
    owed: usize,
}

impl Account {
    fn charge(&mut self, bytes: usize, limit: usize) -> bool {
        let charged = self.accounts.charge(self.connection, bytes, limit);
        if charged {
            self.owed += bytes;
        }
        charged
    }

    fn credit(&mut self, bytes: usize) {
        let bytes = bytes.min(self.owed);
        if bytes > 0 {
            self.owed -= bytes;
            self.accounts.credit(self.connection, bytes);
        }
    }
}

impl Drop for Account {
    fn drop(&mut self) {
        self.credit(self.owed);
    }
}

struct Unread<R> {
    inner: R,
    account: Account,
    limit: usize,
    refused: bool,
    /// What is left of the message being handed over.
    rest: Bytes,
    /// The size of the chunk handed over last.
    handed: usize,
}

impl<R> Unread<R> {
    fn next_chunk(&mut self) -> Frame<Bytes> {
        let chunk = self.rest.split_to(CHUNK.min(self.rest.len()));
        self.handed = chunk.len();
        Frame::data(chunk)
    }
}

/// The trailers of an answer the connection had no room for.
fn refusal(limit: usize) -> HeaderMap {
    let status = tonic::Status::resource_exhausted(format!(
        "this connection holds answers it has not read, {} MiB or more; read them \
         (or open another connection) and retry",
        limit / (1024 * 1024)
    ));
    let mut trailers = HeaderMap::new();
    // Only fails for a message that cannot be a header, which this one can.
    let _ = status.add_header(&mut trailers);
    trailers
}

impl<R> http_body::Body for Unread<R>
where
    R: http_body::Body<Data = bytes::Bytes, Error = tonic::Status> + Unpin,
{
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if self.refused {
            return Poll::Ready(None);
        }
        // HTTP/2 asks for another chunk only once the client's window has
        // room for the last one: that one is on its way.
        let handed = std::mem::take(&mut self.handed);
        self.account.credit(handed);
        if !self.rest.is_empty() {
            return Poll::Ready(Some(Ok(self.next_chunk())));
        }
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => return Poll::Ready(Some(Ok(frame))),
        };
        let limit = self.limit;
        if !self.account.charge(data.len(), limit) {
            self.refused = true;
            return Poll::Ready(Some(Ok(Frame::trailers(refusal(limit)))));
        }
        self.rest = data;
        Poll::Ready(Some(Ok(self.next_chunk())))
    }

    fn is_end_stream(&self) -> bool {
        self.refused || (self.rest.is_empty() && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        if self.refused {
            return http_body::SizeHint::with_exact(0);
        }
        let mut hint = self.inner.size_hint();
        let rest = self.rest.len() as u64;
        hint.set_lower(hint.lower() + rest);
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper + rest);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_takes_answers_up_to_its_bound_and_always_one() {
        let accounts = Accounts::default();
        let a: Connection = (
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        );
        let b: Connection = (
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:3".parse().unwrap(),
        );
        // One answer larger than the bound still goes on an empty account.
        assert!(accounts.charge(a, 50, 10));
        assert!(!accounts.charge(a, 1, 10));
        // Other connections are not affected.
        assert!(accounts.charge(b, 4, 10));
        assert!(accounts.charge(b, 6, 10));
        assert!(!accounts.charge(b, 1, 10));
        accounts.credit(a, 50);
        assert!(accounts.charge(a, 10, 10));
        accounts.credit(a, 10);
        accounts.credit(b, 10);
        assert!(
            accounts.0.lock().unwrap().is_empty(),
            "settled accounts are forgotten"
        );
    }

    #[test]
    fn only_reads_are_held_to_the_bound() {
        assert!(reads("/convo.v1.ConversationService/ListMessages"));
        assert!(reads("/convo.v1.ConversationService/WatchConversation"));
        assert!(!reads("/convo.v1.ConversationService/AppendMessages"));
        assert!(!reads("/convo.v1.ConversationService/DeleteUserData"));
    }
}
