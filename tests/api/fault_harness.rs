//! Tools for doing damage on purpose: a TCP proxy between convo and
//! PostgreSQL that a test can cut, reset, slow down or make lose a commit's
//! reply (it also counts bytes, in front of any server), and a private
//! PostgreSQL of the test's own that it can restart.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use convo::local_postgres::{Access, LocalPostgres, LocalPostgresOptions};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

#[derive(Default)]
struct ProxyState {
    /// Refuse new connections (and the links were closed when this was set).
    refusing: bool,
    /// Accept new connections and never answer them: a server that hangs.
    stalling: bool,
    /// Added before each chunk PostgreSQL sends back.
    delay: Duration,
    /// Lose the reply to the next message convo sends that holds these bytes:
    /// forward it, then close the link before any answer reaches convo.
    lose_reply_to: Option<Vec<u8>>,
    /// Bytes forwarded from the upstream to the clients, in total.
    bytes_to_client: u64,
    links: Vec<JoinHandle<()>>,
}

/// A TCP proxy on loopback in front of one upstream address.
pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<Mutex<ProxyState>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let state = Arc::new(Mutex::new(ProxyState::default()));
        let accept_state = state.clone();
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let (refusing, stalling) = {
                    let state = accept_state.lock().unwrap();
                    (state.refusing, state.stalling)
                };
                if refusing {
                    drop(inbound);
                    continue;
                }
                if stalling {
                    // Held open, never read, never answered.
                    let hang = tokio::spawn(async move {
                        let _held = inbound;
                        std::future::pending::<()>().await;
                    });
                    accept_state.lock().unwrap().links.push(hang);
                    continue;
                }
                let link = tokio::spawn(link(inbound, upstream, accept_state.clone()));
                let mut state = accept_state.lock().unwrap();
                state.links.retain(|l| !l.is_finished());
                state.links.push(link);
            }
        });
        Self {
            addr,
            state,
            accept,
        }
    }

    /// A database URL that goes through the proxy.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@{}/{database}", self.addr)
    }

    /// Closes every connection and refuses new ones: the database is gone.
    pub fn cut(&self) {
        let mut state = self.state.lock().unwrap();
        state.refusing = true;
        state.links.drain(..).for_each(|l| l.abort());
    }

    /// Accepts connections again (and answers them).
    pub fn restore(&self) {
        let mut state = self.state.lock().unwrap();
        state.refusing = false;
        state.stalling = false;
    }

    /// Closes every connection, then accepts new ones but never answers
    /// them: the database hangs. Connections accepted meanwhile stay hung
    /// after [`Proxy::restore`].
    pub fn stall(&self) {
        let mut state = self.state.lock().unwrap();
        state.stalling = true;
        state.links.drain(..).for_each(|l| l.abort());
    }

    /// Closes every open connection but keeps accepting new ones.
    pub fn reset(&self) {
        self.state
            .lock()
            .unwrap()
            .links
            .drain(..)
            .for_each(|l| l.abort());
    }

    /// Delays everything PostgreSQL sends by `delay` (zero to stop).
    pub fn delay(&self, delay: Duration) {
        self.state.lock().unwrap().delay = delay;
    }

    /// Bytes the upstream has sent back through the proxy so far.
    pub fn bytes_to_client(&self) -> u64 {
        self.state.lock().unwrap().bytes_to_client
    }

    /// The next statement about this conversation (its id is bound in it, as
    /// 16 bytes) reaches PostgreSQL and commits, but its reply never reaches
    /// convo. An append is one statement in autocommit: its reply is its
    /// commit's.
    pub fn lose_next_reply_about(&self, conversation_id: &str) {
        let id = uuid::Uuid::parse_str(conversation_id).expect("a conversation id");
        self.state.lock().unwrap().lose_reply_to = Some(id.as_bytes().to_vec());
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.reset();
    }
}

async fn link(mut inbound: TcpStream, upstream: SocketAddr, state: Arc<Mutex<ProxyState>>) {
    let Ok(mut outbound) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (mut client_read, mut client_write) = inbound.split();
    let (mut server_read, mut server_write) = outbound.split();
    let reply_lost = AtomicBool::new(false);
    let to_server = async {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = match client_read.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let chunk = &buffer[..n];
            {
                let mut state = state.lock().unwrap();
                let matches = state
                    .lose_reply_to
                    .as_ref()
                    .is_some_and(|bytes| chunk.windows(bytes.len()).any(|w| w == bytes));
                if matches {
                    state.lose_reply_to = None;
                    // Set before PostgreSQL can possibly answer.
                    reply_lost.store(true, Ordering::SeqCst);
                }
            }
            if server_write.write_all(chunk).await.is_err() {
                return;
            }
        }
    };
    let to_client = async {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = match server_read.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let delay = {
                let mut state = state.lock().unwrap();
                state.bytes_to_client += n as u64;
                state.delay
            };
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if reply_lost.load(Ordering::SeqCst) {
                // Give PostgreSQL a moment to finish the commit, then drop
                // the link with its answer undelivered.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return;
            }
            if client_write.write_all(&buffer[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        () = to_server => {}
        () = to_client => {}
    }
}

/// A private PostgreSQL for one test, on a fixed port so that it can be
/// restarted under convo's feet. Removed when the test ends.
pub struct DedicatedCluster {
    running: Option<LocalPostgres>,
    options: LocalPostgresOptions,
}

impl DedicatedCluster {
    pub async fn start() -> Self {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let options = LocalPostgresOptions {
            data_dir: base.join(format!("convo-fault-{}", uuid::Uuid::now_v7().simple())),
            fsync: false,
            access: Access::Loopback { port: Some(port) },
            relocate_if_unreachable: false,
        };
        let running = LocalPostgres::start(&options)
            .await
            .expect("start a dedicated PostgreSQL");
        Self {
            running: Some(running),
            options,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        let Access::Loopback { port: Some(port) } = self.options.access else {
            unreachable!("a dedicated cluster listens on a fixed loopback port")
        };
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@{}/{database}", self.addr())
    }

    /// Fast shutdown (sessions ended, checkpoint), then start again.
    pub async fn restart(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await;
        }
        self.running = Some(
            LocalPostgres::start(&self.options)
                .await
                .expect("restart PostgreSQL"),
        );
    }

    /// Immediate shutdown, as in a crash, then start again (crash recovery).
    pub async fn crash_and_restart(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop_immediately().await;
        }
        self.running = Some(
            LocalPostgres::start(&self.options)
                .await
                .expect("restart PostgreSQL"),
        );
    }

    /// Stops PostgreSQL and removes its files.
    pub async fn remove(mut self) {
        if let Some(running) = self.running.take() {
            running.stop_immediately().await;
        }
        let _ = std::fs::remove_dir_all(&self.options.data_dir);
    }
}

impl Drop for DedicatedCluster {
    fn drop(&mut self) {
        // A test that panicked did not call `remove`: stop without waiting.
        if self.running.take().is_some() {
            let _ = std::fs::remove_dir_all(&self.options.data_dir);
        }
    }
}
