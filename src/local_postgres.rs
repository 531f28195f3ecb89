//! A private PostgreSQL cluster that convo starts and stops itself: the
//! embedded default of `convo serve` when no `DATABASE_URL` is given, and the
//! database of the test suite.
//!
//! It uses the machine's PostgreSQL server binaries (`initdb`, `postgres`),
//! keeps its data in one directory and listens on a loopback port only.
//! PostgreSQL refuses to run as root, so under root the cluster runs as the
//! unprivileged `postgres` system user.

use std::{
    fs,
    io::{BufRead, BufReader},
    net::{Ipv4Addr, TcpListener},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use diesel_async::{AsyncConnection, AsyncPgConnection};
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
    /// The loopback port; `None` picks a free one at each start.
    pub port: Option<u16>,
}

/// A running private cluster. Stop it with [`LocalPostgres::stop`]; dropping it
/// asks PostgreSQL for a fast shutdown without waiting.
#[derive(Debug)]
pub struct LocalPostgres {
    child: Option<Child>,
    data_dir: PathBuf,
    port: u16,
}

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
        let data_dir = absolute(&options.data_dir)?;
        fs::create_dir_all(&data_dir).map_err(io(format!("creating {}", data_dir.display())))?;
        if let Some(user) = run_as {
            chown(&data_dir, Some(user.uid), Some(user.gid)).map_err(|e| {
                io(format!(
                    "handing {} to the postgres user",
                    data_dir.display()
                ))(e.into())
            })?;
            check_reachable(&data_dir, user)?;
        }
        if !data_dir.join("PG_VERSION").exists() {
            initdb(&bin_dir, &data_dir, run_as)?;
        }

        let port = match options.port {
            Some(port) => port,
            None => free_port()?,
        };
        let log_path = data_dir.join("convo-postgres.log");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io(format!("opening {}", log_path.display())))?;
        let log_err = log.try_clone().map_err(io("duplicating the log handle"))?;
        let mut command = Command::new(bin_dir.join("postgres"));
        command
            .arg("-D")
            .arg(&data_dir)
            .args(["-p", &port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            // No Unix socket: its path limit (107 bytes) would tie the data
            // directory to a short path.
            .args(["-c", "unix_socket_directories="])
            .args([
                "-c",
                if options.fsync {
                    "fsync=on"
                } else {
                    "fsync=off"
                },
            ])
            .args(["-c", "max_connections=200"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // Its own process group: a Ctrl-C in the terminal reaches convo,
            // which then shuts PostgreSQL down in order.
            .process_group(0);
        if let Some(user) = run_as {
            command.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        }
        let child = command.spawn().map_err(io(format!(
            "starting {}",
            bin_dir.join("postgres").display()
        )))?;
        let mut cluster = Self {
            child: Some(child),
            data_dir,
            port,
        };
        cluster.wait_until_ready(&log_path).await?;
        Ok(cluster)
    }

    /// A URL for `database` on this cluster, as the `postgres` superuser.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
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
        self.stop_with(Signal::SIGINT).await;
    }

    /// Immediate shutdown, as in a crash: no checkpoint; the next start runs
    /// crash recovery from the WAL. Test support: the fault harness crashes
    /// the database with it.
    #[doc(hidden)]
    pub async fn stop_immediately(self) {
        self.stop_with(Signal::SIGQUIT).await;
    }

    async fn stop_with(mut self, signal: Signal) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = Pid::from_raw(child.id() as i32);
        let _ = kill(pid, signal);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::warn!("PostgreSQL did not stop within 30 s; killing it");
        let _ = child.kill();
        let _ = child.wait();
    }

    async fn wait_until_ready(&mut self, log_path: &Path) -> Result<(), LocalPostgresError> {
        let url = self.url("postgres");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(LocalPostgresError::Start(format!(
                    "it exited with {status}; its log ({}) ends with: {}",
                    log_path.display(),
                    log_tail(log_path)
                )));
            }
            if AsyncPgConnection::establish(&url).await.is_ok() {
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
        return Some(dir);
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

fn absolute(path: &Path) -> Result<PathBuf, LocalPostgresError> {
    std::path::absolute(path).map_err(io(format!("resolving {}", path.display())))
}

/// Every directory above the data directory must be searchable by the
/// `postgres` user (a checkout under a private home directory is not).
fn check_reachable(data_dir: &Path, user: RunAs) -> Result<(), LocalPostgresError> {
    let status = Command::new("test")
        .arg("-w")
        .arg(data_dir)
        .uid(user.uid.as_raw())
        .gid(user.gid.as_raw())
        .status()
        .map_err(io("checking the data directory's permissions"))?;
    if status.success() {
        Ok(())
    } else {
        Err(LocalPostgresError::DataDirUnreachable(data_dir.to_owned()))
    }
}

fn initdb(
    bin_dir: &Path,
    data_dir: &Path,
    run_as: Option<RunAs>,
) -> Result<(), LocalPostgresError> {
    let mut command = Command::new(bin_dir.join("initdb"));
    command
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
