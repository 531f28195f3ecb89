//! A private PostgreSQL cluster that convo starts and stops itself: the
//! embedded default of `convo serve` when no `DATABASE_URL` is given, and the
//! database of the test suite.
//!
//! It uses the machine's PostgreSQL server binaries (`initdb`, `postgres`) and
//! keeps its data in one directory. PostgreSQL refuses to run as root, so
//! under root the cluster runs as the unprivileged `postgres` system user.
//!
//! [`Access::Private`] (what `convo serve` uses) opens no TCP port: the only
//! way in is a Unix socket inside the data directory (or a private directory
//! of its own), which is mode 0700, so no other local account can connect.
//! The postmaster is told to stop when convo dies, and one left behind by a
//! hard kill is stopped at the next start (one a running convo started is
//! not: that start is refused); one that dies while `convo serve` runs is
//! started again ([`LocalPostgres::keep_running`]). [`Access::Loopback`]
//! listens on a 127.0.0.1 port, for the tests and the benchmark suite, whose
//! clusters are throwaway.

use std::{
    fs,
    io::{BufRead, BufReader},
    net::{Ipv4Addr, TcpListener},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::{Gid, Pid, Uid, User, chown},
};

/// Why the private cluster could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LocalPostgresError {
    #[error(
        "PostgreSQL's server binaries (initdb, postgres) were not found on PATH or under \
         /usr/lib/postgresql/*/bin: install them (Debian/Ubuntu: `apt-get install postgresql`) \
         or set DATABASE_URL to an existing server"
    )]
    BinariesNotFound,
    #[error(
        "running as root, the private PostgreSQL needs the unprivileged system user `postgres` \
         (create it, install the postgresql package, or set DATABASE_URL)"
    )]
    NoUnprivilegedUser,
    #[error("the `postgres` user cannot write to {0}: choose a --data-dir it can reach")]
    DataDirUnreachable(PathBuf),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{} is in use by another convo (process {pid}): stop it first, or give this one \
         another --data-dir",
        data_dir.display()
    )]
    InUse { data_dir: PathBuf, pid: i32 },
    #[error("initdb failed: {0}")]
    Initdb(String),
    #[error("PostgreSQL did not start: {0}")]
    Start(String),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> LocalPostgresError {
    let context = context.into();
    move |source| LocalPostgresError::Io { context, source }
}

/// How to run the private cluster.
#[derive(Debug, Clone)]
pub struct LocalPostgresOptions {
    /// Where the cluster keeps its files; created and initialised if empty.
    pub data_dir: PathBuf,
    /// Durable writes. Off only for throwaway clusters such as the tests'.
    pub fsync: bool,
    /// Who can reach it.
    pub access: Access,
    /// Under root, when the `postgres` user cannot reach `data_dir` (a
    /// checkout in a private home directory), keep the data under
    /// `/var/lib/convo` instead and leave a link at `data_dir`.
    pub relocate_if_unreachable: bool,
}

/// Who can reach the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A Unix socket in a 0700 directory and no TCP port; the postmaster
    /// stops when this process dies.
    Private,
    /// A 127.0.0.1 port (`None` picks a free one at each start), open to every
    /// local account: for throwaway clusters only.
    Loopback { port: Option<u16> },
}

/// Where clients connect.
#[derive(Debug, Clone)]
enum Endpoint {
    Socket { dir: PathBuf, port: u16 },
    Tcp { port: u16 },
}

/// The port number in a private socket's name (`.s.PGSQL.5432`): the socket
/// lives in a directory of its own, so it never collides.
const SOCKET_PORT: u16 = 5432;

/// The longest Unix socket path the kernel accepts, less a margin.
const MAX_SOCKET_PATH: usize = 100;

/// A running private cluster. Stop it with [`LocalPostgres::stop`]; dropping it
/// asks PostgreSQL for a fast shutdown without waiting.
#[derive(Debug)]
pub struct LocalPostgres {
    child: Option<Child>,
    data_dir: PathBuf,
    endpoint: Endpoint,
    /// A socket directory made outside the data directory, removed at stop.
    own_socket_dir: Option<PathBuf>,
    /// What starting the postmaster again takes.
    bin_dir: PathBuf,
    run_as: Option<RunAs>,
    fsync: bool,
}

/// How often [`LocalPostgres::keep_running`] looks whether the postmaster is
/// still there.
const EXIT_CHECK_INTERVAL: Duration = Duration::from_millis(250);
/// The wait before starting an exited postmaster again, doubled at each
/// start up to the maximum, and back to the minimum once a start has stayed
/// up for [`STAYED_UP`]. The first wait also lets the old postmaster's
/// backends notice its death and leave its shared memory.
const RESTART_DELAY_MIN: Duration = Duration::from_millis(500);
const RESTART_DELAY_MAX: Duration = Duration::from_secs(30);
const STAYED_UP: Duration = Duration::from_secs(60);

/// The unprivileged account the cluster runs as when convo runs as root.
#[derive(Debug, Clone, Copy)]
struct RunAs {
    uid: Uid,
    gid: Gid,
}

impl LocalPostgres {
    /// Initialises the data directory if needed, starts PostgreSQL on a free
    /// loopback port and waits until it accepts connections.
    pub async fn start(options: &LocalPostgresOptions) -> Result<Self, LocalPostgresError> {
        let bin_dir = find_binaries().ok_or(LocalPostgresError::BinariesNotFound)?;
        let run_as = run_as()?;
        let mut data_dir = absolute(&options.data_dir)?;
        if data_dir.exists() {
            // A link left by an earlier relocation leads to the real directory.
            data_dir = fs::canonicalize(&data_dir)
                .map_err(io(format!("resolving {}", data_dir.display())))?;
        }
        if let Some(user) = run_as
            && options.relocate_if_unreachable
            && !data_dir.exists()
            && !user_may(user, "-x", data_dir.parent().unwrap_or(Path::new("/")))?
        {
            data_dir = relocate(&data_dir)?;
        }
        fs::create_dir_all(&data_dir).map_err(io(format!("creating {}", data_dir.display())))?;
        if let Some(user) = run_as {
            chown(&data_dir, Some(user.uid), Some(user.gid)).map_err(|e| {
                io(format!(
                    "handing {} to the postgres user",
                    data_dir.display()
                ))(e.into())
            })?;
            if !user_may(user, "-w", &data_dir)? {
                return Err(LocalPostgresError::DataDirUnreachable(data_dir));
            }
        }
        if !data_dir.join("PG_VERSION").exists() {
            initdb(&bin_dir, &data_dir, run_as)?;
        }
        stop_leftover_postmaster(&data_dir).await?;

        let (endpoint, own_socket_dir) = match options.access {
            Access::Loopback { port } => {
                let port = match port {
                    Some(port) => port,
                    None => free_port()?,
                };
                (Endpoint::Tcp { port }, None)
            }
            Access::Private => {
                let socket = data_dir.join(format!(".s.PGSQL.{SOCKET_PORT}"));
                if socket.as_os_str().len() <= MAX_SOCKET_PATH {
                    let dir = data_dir.clone();
                    (
                        Endpoint::Socket {
                            dir,
                            port: SOCKET_PORT,
                        },
                        None,
                    )
                } else {
                    // The data directory's path is too long for a socket
                    // name: a private directory of its own in /tmp.
                    let dir = private_socket_dir(run_as)?;
                    let endpoint = Endpoint::Socket {
                        dir: dir.clone(),
                        port: SOCKET_PORT,
                    };
                    (endpoint, Some(dir))
                }
            }
        };
        let mut cluster = Self {
            child: None,
            data_dir,
            endpoint,
            own_socket_dir,
            bin_dir,
            run_as,
            fsync: options.fsync,
        };
        cluster.spawn()?;
        cluster.wait_until_ready().await?;
        Ok(cluster)
    }

    /// Starts the postmaster on the cluster's data directory and endpoint;
    /// its output goes to `convo-postgres.log` there.
    fn spawn(&mut self) -> Result<(), LocalPostgresError> {
        let log_path = self.log_path();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io(format!("opening {}", log_path.display())))?;
        let log_err = log.try_clone().map_err(io("duplicating the log handle"))?;
        let postgres = self.bin_dir.join("postgres");
        let mut command = Command::new(&postgres);
        command
            .arg("-D")
            .arg(&self.data_dir)
            .current_dir(NEUTRAL_DIR);
        match &self.endpoint {
            Endpoint::Tcp { port } => {
                command
                    .args(["-p", &port.to_string()])
                    .args(["-c", "listen_addresses=127.0.0.1"])
                    // No Unix socket: its path limit (107 bytes) would tie the
                    // data directory to a short path.
                    .args(["-c", "unix_socket_directories="]);
            }
            Endpoint::Socket { dir, port } => {
                command
                    .args(["-p", &port.to_string()])
                    .args(["-c", "listen_addresses="])
                    .arg("-c")
                    .arg(format!("unix_socket_directories={}", dir.display()))
                    .args(["-c", "unix_socket_permissions=0700"]);
            }
        }
        command
            .args(["-c", if self.fsync { "fsync=on" } else { "fsync=off" }])
            .args(["-c", "max_connections=200"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // Its own process group: a Ctrl-C in the terminal reaches convo,
            // which then shuts PostgreSQL down in order.
            .process_group(0);
        if let Some(user) = self.run_as {
            command.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        }
        // A socket is the private kind's only way in (see Access).
        if matches!(self.endpoint, Endpoint::Socket { .. }) {
            die_with_this_process(&mut command);
        }
        let child = command
            .spawn()
            .map_err(io(format!("starting {}", postgres.display())))?;
        self.child = Some(child);
        Ok(())
    }

    /// Keeps the cluster running for as long as it is polled, which is never
    /// to its end: when the postmaster exits on its own (a crash, the OOM
    /// killer, someone's `pg_ctl stop`), logs how and starts it again on the
    /// same data directory and socket. PostgreSQL's crash recovery replays
    /// the WAL, so nothing it committed is lost; meanwhile the server's calls
    /// fail with UNAVAILABLE as in any outage. Each start waits twice as long
    /// as the one before (from half a second up to 30 s) until the cluster
    /// has stayed up for a minute, so a cluster that cannot start, or dies
    /// again at once, is not restarted in a tight loop. Poll it from the
    /// thread that started the cluster (see [`die_with_this_process`]).
    pub async fn keep_running(&mut self) -> std::convert::Infallible {
        let mut delay = RESTART_DELAY_MIN;
        let mut up_since = Instant::now();
        loop {
            let Some(child) = self.child.as_mut() else {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RESTART_DELAY_MAX);
                up_since = Instant::now();
                match self.start_again().await {
                    Ok(()) => tracing::info!("the private PostgreSQL accepts connections again"),
                    // Running, still recovering: watched as any running one.
                    Err(error) if self.child.is_some() => tracing::warn!(
                        %error,
                        "the private PostgreSQL started again but is not ready yet"
                    ),
                    Err(error) => tracing::error!(
                        %error,
                        retry_in = ?delay,
                        "could not start the private PostgreSQL again"
                    ),
                }
                continue;
            };
            match child.try_wait() {
                Ok(None) => tokio::time::sleep(EXIT_CHECK_INTERVAL).await,
                Ok(Some(status)) => {
                    if up_since.elapsed() >= STAYED_UP {
                        delay = RESTART_DELAY_MIN;
                    }
                    tracing::error!(
                        %status,
                        data_dir = %self.data_dir.display(),
                        log = %log_tail(&self.log_path()),
                        retry_in = ?delay,
                        "the private PostgreSQL exited on its own; starting it again"
                    );
                    self.child = None;
                }
                Err(error) => {
                    // Not expected for a child of ours; keep looking.
                    tracing::warn!(%error, "could not check on the private PostgreSQL");
                    tokio::time::sleep(EXIT_CHECK_INTERVAL).await;
                }
            }
        }
    }

    /// Starts the postmaster after it exited and waits until it accepts
    /// connections. On a timeout the postmaster is left running.
    async fn start_again(&mut self) -> Result<(), LocalPostgresError> {
        self.spawn()?;
        self.wait_until_ready().await
    }

    /// A URL for `database` on this cluster, as the `postgres` superuser.
    pub fn url(&self, database: &str) -> String {
        self.url_as("postgres", database)
    }

    /// A URL for `database` on this cluster, as `role`.
    pub fn url_as(&self, role: &str, database: &str) -> String {
        match &self.endpoint {
            Endpoint::Tcp { port } => format!("postgres://{role}@127.0.0.1:{port}/{database}"),
            Endpoint::Socket { dir, port } => {
                // The socket's directory is the URL's host, percent-encoded.
                let host = percent_encoding::utf8_percent_encode(
                    &dir.to_string_lossy(),
                    percent_encoding::NON_ALPHANUMERIC,
                )
                .to_string();
                format!("postgres://{role}@{host}:{port}/{database}")
            }
        }
    }

    /// Where clients connect, for the log: a socket directory or a port.
    pub fn endpoint(&self) -> String {
        match &self.endpoint {
            Endpoint::Tcp { port } => format!("127.0.0.1:{port}"),
            Endpoint::Socket { dir, .. } => format!("a Unix socket in {}", dir.display()),
        }
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Where PostgreSQL's own output goes: `convo-postgres.log` in the data
    /// directory.
    fn log_path(&self) -> PathBuf {
        self.data_dir.join("convo-postgres.log")
    }

    /// The postmaster's process id, while it runs. Test support: the test
    /// process stops its cluster from an exit hook.
    #[doc(hidden)]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Fast shutdown: ends sessions, checkpoints and exits. Waits up to 30 s,
    /// then kills the process.
    pub async fn stop(self) {
        self.stop_with(&[(Signal::SIGINT, STOP_LIMIT)]).await;
    }

    /// Shutdown once convo is done with it: a smart shutdown first, which
    /// lets the sessions still closing behind convo's last tasks end on
    /// their own instead of being terminated with an error line each in the
    /// log; after [`SESSIONS_GRACE`] (someone else's session still open), a
    /// fast one, as [`stop`](Self::stop).
    pub async fn shut_down(self) {
        self.stop_with(&[
            (Signal::SIGTERM, SESSIONS_GRACE),
            (Signal::SIGINT, STOP_LIMIT),
        ])
        .await;
    }

    /// Immediate shutdown, as in a crash: no checkpoint; the next start runs
    /// crash recovery from the WAL. Test support: the fault harness crashes
    /// the database with it.
    #[doc(hidden)]
    pub async fn stop_immediately(self) {
        self.stop_with(&[(Signal::SIGQUIT, STOP_LIMIT)]).await;
    }

    /// Sends the postmaster each signal in turn until it exits within the
    /// signal's limit, and kills it if it still runs after the last.
    async fn stop_with(mut self, steps: &[(Signal, Duration)]) {
        if let Some(mut child) = self.child.take()
            && !stops_after(Pid::from_raw(child.id() as i32), steps, || {
                matches!(child.try_wait(), Ok(Some(_)))
            })
            .await
        {
            tracing::warn!("PostgreSQL did not stop; killing it");
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(dir) = self.own_socket_dir.take() {
            let _ = fs::remove_dir_all(dir);
        }
    }

    async fn wait_until_ready(&mut self) -> Result<(), LocalPostgresError> {
        let log_path = self.log_path();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(LocalPostgresError::Start(format!(
                    "it exited with {status}; its log ({}) ends with: {}",
                    log_path.display(),
                    log_tail(&log_path)
                )));
            }
            // Ready when the directory's postmaster is the one we started
            // (another one holding the directory makes ours exit) and says
            // so in `postmaster.pid`, as pg_ctl reads it. Probing with a
            // connection left a line in the log for every attempt that came
            // too early or hung up before reading the whole greeting.
            let ready = self
                .child
                .as_ref()
                .is_some_and(|child| postmaster_ready(&self.data_dir, child.id() as i32));
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(LocalPostgresError::Start(format!(
                    "not accepting connections after 60 s; see {}",
                    log_path.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGINT);
        }
    }
}

/// The directory that holds both `initdb` and `postgres`: first on PATH, then
/// the newest of Debian's `/usr/lib/postgresql/<version>/bin`. Its other tools
/// (`pgbench`, `psql`) are usually there too.
pub fn find_binaries() -> Option<PathBuf> {
    let has_both = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Some(path) = std::env::var_os("PATH")
        && let Some(dir) = std::env::split_paths(&path).find(|dir| has_both(dir))
    {
        // Absolute: the binaries run from another directory (NEUTRAL_DIR).
        return std::path::absolute(dir).ok();
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            has_both(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn run_as() -> Result<Option<RunAs>, LocalPostgresError> {
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    let user = User::from_name("postgres")
        .ok()
        .flatten()
        .ok_or(LocalPostgresError::NoUnprivilegedUser)?;
    Ok(Some(RunAs {
        uid: user.uid,
        gid: user.gid,
    }))
}

/// Where initdb and the postmaster start: a directory every account may
/// enter. They find their own binaries from the directory they start in and
/// go back to it, and from a checkout in root's 0700 home the `postgres`
/// user could not ("could not change directory to …: Permission denied",
/// the first line of the cluster's log). Every path given to them is
/// absolute.
const NEUTRAL_DIR: &str = "/";

fn absolute(path: &Path) -> Result<PathBuf, LocalPostgresError> {
    std::path::absolute(path).map_err(io(format!("resolving {}", path.display())))
}

/// True when `user` passes `test <flag> <path>` (`-w`: may write there, `-x`:
/// may enter it), which also needs every directory above to be searchable
/// (a checkout under a private home directory is not).
fn user_may(user: RunAs, flag: &str, path: &Path) -> Result<bool, LocalPostgresError> {
    Ok(Command::new("test")
        .arg(flag)
        .arg(path)
        .uid(user.uid.as_raw())
        .gid(user.gid.as_raw())
        .status()
        .map_err(io("checking the data directory's permissions"))?
        .success())
}

/// Where the data goes when the `postgres` user cannot reach the requested
/// directory: `/var/lib/convo/<name>-<hash of the requested path>`, with a
/// link at the requested path so that the next start finds it there.
fn relocate(requested: &Path) -> Result<PathBuf, LocalPostgresError> {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    requested.hash(&mut hasher);
    let name = requested
        .file_name()
        .map_or_else(|| "data".into(), |n| n.to_string_lossy().into_owned());
    let relocated = Path::new(RELOCATED_BASE).join(format!("{name}-{:016x}", hasher.finish()));
    fs::create_dir_all(&relocated).map_err(io(format!("creating {}", relocated.display())))?;
    let linked = std::os::unix::fs::symlink(&relocated, requested).is_ok();
    tracing::info!(
        requested = %requested.display(),
        data_dir = %relocated.display(),
        linked,
        "the postgres user cannot reach the requested data directory (a parent directory is \
         private): keeping the private PostgreSQL's data here instead"
    );
    Ok(relocated)
}

/// Where relocated data directories go.
const RELOCATED_BASE: &str = "/var/lib/convo";

/// A 0700 directory in /tmp for the socket of a cluster whose data directory
/// has too long a path, owned by the user the cluster runs as.
fn private_socket_dir(run_as: Option<RunAs>) -> Result<PathBuf, LocalPostgresError> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = std::env::temp_dir().join(format!(
        "convo-pg-{}-{}",
        std::process::id(),
        uuid::Uuid::now_v7().simple()
    ));
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(io(format!("creating {}", dir.display())))?;
    if let Some(user) = run_as {
        chown(&dir, Some(user.uid), Some(user.gid))
            .map_err(|e| io(format!("handing {} to the postgres user", dir.display()))(e.into()))?;
    }
    Ok(dir)
}

/// Asks the kernel to stop PostgreSQL (fast shutdown) when this process dies,
/// however it dies: a postmaster must not outlive the convo that owns it.
/// (The signal follows the thread that started it; `convo serve` starts the
/// cluster from its main thread.)
fn die_with_this_process(command: &mut Command) {
    let parent = std::process::id();
    // SAFETY: the closure runs in the child between fork and exec and calls
    // only prctl and getppid, which are async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            use nix::libc;
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGINT as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // convo may have died before the request took effect.
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::other(
                    "convo exited while starting PostgreSQL",
                ));
            }
            Ok(())
        });
    }
}

/// Stops a postmaster that an earlier convo left running on this data
/// directory (it was killed too hard to stop it), so this start can proceed.
/// Only a `postgres` process whose `-D` is this very directory is touched,
/// and not one that a running convo started: that convo is still using it,
/// and this start is refused instead.
async fn stop_leftover_postmaster(data_dir: &Path) -> Result<(), LocalPostgresError> {
    let Some(pid) = postmaster_pid(data_dir) else {
        return Ok(());
    };
    if !serves(pid, data_dir) {
        return Ok(());
    }
    if let Some(owner) = parent_convo(pid) {
        return Err(LocalPostgresError::InUse {
            data_dir: data_dir.to_owned(),
            pid: owner,
        });
    }
    tracing::warn!(
        pid,
        data_dir = %data_dir.display(),
        "a PostgreSQL left behind by an earlier convo still serves this data directory; stopping it"
    );
    // Not our child: it is gone once the process no longer exists. Should
    // it outlive both steps, this start fails on the directory it holds.
    let pid = Pid::from_raw(pid);
    stops_after(
        pid,
        &[
            (Signal::SIGINT, STOP_LIMIT),
            (Signal::SIGQUIT, Duration::from_secs(1)),
        ],
        || kill(pid, None).is_err(),
    )
    .await;
    Ok(())
}

/// The process id in the data directory's `postmaster.pid`, if there is one
/// (the tests read it too).
pub fn postmaster_pid(data_dir: &Path) -> Option<i32> {
    pid_line(&fs::read_to_string(data_dir.join("postmaster.pid")).ok()?)
}

/// The process id on the first line of a `postmaster.pid`.
fn pid_line(file: &str) -> Option<i32> {
    file.lines().next()?.trim().parse().ok()
}

/// How long [`LocalPostgres::shut_down`] lets sessions end on their own.
const SESSIONS_GRACE: Duration = Duration::from_secs(1);

/// How long a shutdown may take before the postmaster is killed.
const STOP_LIMIT: Duration = Duration::from_secs(30);

/// Whether process `pid` is gone (as `gone` tells) after one of `steps`: a
/// signal sent, then how long to wait for it to take effect.
async fn stops_after(
    pid: Pid,
    steps: &[(Signal, Duration)],
    mut gone: impl FnMut() -> bool,
) -> bool {
    for &(signal, limit) in steps {
        let _ = kill(pid, signal);
        let deadline = Instant::now() + limit;
        loop {
            if gone() {
                return true;
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    false
}

/// Whether postmaster `pid` wrote the directory's `postmaster.pid` and
/// accepts connections: the file's eighth line holds its status, padded with
/// spaces (`starting`, `stopping`, `ready` or `standby`; PostgreSQL 10 and
/// later, and convo needs 13). The line is missing while the file is being
/// written at start.
fn postmaster_ready(data_dir: &Path, pid: i32) -> bool {
    fs::read_to_string(data_dir.join("postmaster.pid")).is_ok_and(|file| says_ready(&file, pid))
}

fn says_ready(file: &str, pid: i32) -> bool {
    pid_line(file) == Some(pid) && file.lines().nth(7).map(str::trim) == Some("ready")
}

/// Whether process `pid` is a `postgres` whose `-D` is `data_dir`.
fn serves(pid: i32, data_dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.first().is_some_and(|a| a.ends_with(b"postgres"))
        && args
            .windows(2)
            .any(|w| w[0] == b"-D" && Path::new(std::ffi::OsStr::from_bytes(w[1])) == data_dir)
}

/// The process that started `pid`, when it is a running convo other than
/// this one (its name, in `/proc/<pid>/comm`, is readable by every account).
fn parent_convo(pid: i32) -> Option<i32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let parent: i32 = status
        .lines()
        .find_map(|line| line.strip_prefix("PPid:"))?
        .trim()
        .parse()
        .ok()?;
    let name = fs::read_to_string(format!("/proc/{parent}/comm")).ok()?;
    (name.trim_end() == "convo" && u32::try_from(parent).ok()? != std::process::id())
        .then_some(parent)
}

fn initdb(
    bin_dir: &Path,
    data_dir: &Path,
    run_as: Option<RunAs>,
) -> Result<(), LocalPostgresError> {
    let mut command = Command::new(bin_dir.join("initdb"));
    command
        .current_dir(NEUTRAL_DIR)
        .arg("-D")
        .arg(data_dir)
        .args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
        ])
        .arg("--no-sync")
        .stdin(Stdio::null());
    if let Some(user) = run_as {
        command.uid(user.uid.as_raw()).gid(user.gid.as_raw());
    }
    let output = command.output().map_err(io("running initdb"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(LocalPostgresError::Initdb(
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        ))
    }
}

/// A port that was free a moment ago. PostgreSQL reports a clear error if
/// another process takes it first.
fn free_port() -> Result<u16, LocalPostgresError> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(io("finding a free port"))?;
    let port = listener
        .local_addr()
        .map_err(io("finding a free port"))?
        .port();
    Ok(port)
}

fn log_tail(path: &Path) -> String {
    let Ok(file) = fs::File::open(path) else {
        return "(no log)".to_owned();
    };
    let lines: Vec<String> = BufReader::new(file).lines().map_while(Result::ok).collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::says_ready;

    /// As PostgreSQL 15 writes it, with the status padded to eight columns.
    fn pid_file(pid: i32, status: &str) -> String {
        format!(
            "{pid}\n/var/lib/convo/data\n1796321606\n5432\n/var/lib/convo/data\n\n   729204         4\n{status:<8}\n"
        )
    }

    #[test]
    fn only_a_ready_status_line_of_our_postmaster_means_ready() {
        assert!(says_ready(&pid_file(2285, "ready"), 2285));
        for status in ["starting", "stopping", "standby"] {
            assert!(!says_ready(&pid_file(2285, status), 2285), "{status}");
        }
        assert!(
            !says_ready(&pid_file(2285, "ready"), 77),
            "another postmaster's file"
        );
    }

    #[test]
    fn a_file_still_being_written_is_not_ready() {
        let file = pid_file(2285, "ready");
        let partial: String = file
            .lines()
            .take(7)
            .map(|line| format!("{line}\n"))
            .collect();
        assert!(!says_ready(&partial, 2285));
        assert!(!says_ready("", 2285));
    }
}
