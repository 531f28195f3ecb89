//! The whole suite in one command: a fresh PostgreSQL and convo server, every
//! workload, pgbench running the same SQL as convo for the ceiling, and the
//! server's resident memory under load.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use clap::Args;
use convo::local_postgres::{self, Access, LocalPostgres, LocalPostgresOptions};
use serde::Serialize;
use tokio::process::{Child, Command};

use crate::{
    BoxError, LoadArgs,
    report::{self, Measured},
    seed,
    workload::{self, Load, Setup, Target, Workload},
};

/// The cheapest correct append on convo's schema: the ceiling.
const PGBENCH_APPEND: &str = include_str!("../../../benches/pgbench/append.sql");
/// The append's statements before it became one (for the record).
const PGBENCH_APPEND_BEFORE: &str = include_str!("../../../benches/pgbench/append-before.sql");
/// The resume statement convo runs.
const PGBENCH_RESUME: &str = include_str!("../../../benches/pgbench/resume.sql");
const PGBENCH_RESUME_BEFORE: &str = include_str!("../../../benches/pgbench/resume-before.sql");
/// The first ListConversations page.
const PGBENCH_LIST: &str = include_str!("../../../benches/pgbench/list.sql");
/// The shortest conversation whose resume fills the page.
const FULL_PAGE: i64 = workload::RESUME_PAGE as i64;

#[derive(Debug, Args)]
pub struct SuiteArgs {
    #[command(flatten)]
    load: LoadArgs,
    /// Workers of the memory run (append), which reports the server's resident memory.
    #[arg(long, default_value_t = 64)]
    memory_workers: usize,
    /// Length of the memory run; 0s skips it.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    memory_duration: Duration,
    /// The server's pool size.
    #[arg(long, default_value_t = 16)]
    pool_size: u32,
    /// Lengths of the conversations resumed.
    #[arg(long, value_delimiter = ',', default_values_t = [10_i64, 50, 10_000, 100_000])]
    resume_lengths: Vec<i64>,
    /// Depth of the deep ListConversations page.
    #[arg(long, default_value_t = 10_000)]
    list_depth: i64,
    /// Durable commits (fsync) in the benchmark's PostgreSQL.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    fsync: bool,
    /// Also write the full report here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct SuiteReport {
    workers: usize,
    connections: usize,
    seconds_per_run: f64,
    fsync: bool,
    pool_size: u32,
    runs: Vec<Measured>,
    pgbench_append_tps: Option<f64>,
    pgbench_append_before_tps: Option<f64>,
    pgbench_resume_tps: Option<f64>,
    pgbench_resume_before_tps: Option<f64>,
    pgbench_list_tps: Option<f64>,
    append_ratio: Option<f64>,
    /// Resume of the shortest conversation that fills a page (resume(50))
    /// against pgbench running the same statement on it.
    resume_ratio: Option<f64>,
    list_ratio: Option<f64>,
    resume_length_ratio: Option<f64>,
    /// The same ratio against the shortest conversation that fills a page of
    /// 50, so both sides return the same number of messages.
    resume_full_page_ratio: Option<f64>,
    list_depth_ratio: Option<f64>,
    memory: Option<MemoryReport>,
}

#[derive(Debug, Serialize)]
struct MemoryReport {
    workers: usize,
    seconds: f64,
    idle_mib: f64,
    after_10s_mib: f64,
    peak_mib: f64,
    end_mib: f64,
    run: Measured,
}

pub async fn run(args: SuiteArgs) -> Result<(), BoxError> {
    let load = args.load.load();
    let data_dir =
        std::env::temp_dir().join(format!("convo-bench-{}", uuid::Uuid::now_v7().simple()));
    eprintln!(
        "starting PostgreSQL in {} (fsync={})",
        data_dir.display(),
        args.fsync
    );
    let postgres = LocalPostgres::start(&LocalPostgresOptions {
        data_dir: data_dir.clone(),
        fsync: args.fsync,
        access: Access::Loopback { port: None },
        relocate_if_unreachable: false,
    })
    .await?;
    let database_url = postgres.url("convo");
    let outcome = async {
        convo::startup::prepare_database(&database_url).await?;
        let mut server = Server::start(&database_url, args.pool_size, &data_dir).await?;
        let report = measure(&args, load, &database_url, &server).await;
        server.stop().await;
        report
    }
    .await;
    postgres.stop().await;
    let _ = std::fs::remove_dir_all(&data_dir);
    let report = outcome?;
    print(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

async fn measure(
    args: &SuiteArgs,
    load: Load,
    database_url: &str,
    server: &Server,
) -> Result<SuiteReport, BoxError> {
    let target = Target::connect(&server.addr, load.connections).await?;
    let mut runs = Vec::new();
    let mut run =
        async |workload: Workload, messages: i64, depth: i64| -> Result<Setup, BoxError> {
            let setup =
                Setup::prepare(&target, workload, messages, depth, Some(database_url)).await?;
            let mut measured = workload::drive(&target, &setup, &load).await;
            measured.server_rss_mib = report::resident_mib(server.pid);
            eprintln!(
                "  {:<22} {:>9.0} ops/s  p50 {:.2} ms",
                measured.workload, measured.per_second, measured.p50_ms
            );
            runs.push(measured);
            Ok(setup)
        };
    eprintln!(
        "running the workloads ({} workers, {:?} each)",
        load.workers, load.duration
    );
    run(Workload::Append, 0, 0).await?;
    run(Workload::HotAppend, 0, 0).await?;
    // pgbench resumes the shortest conversation that fills a page, else the
    // shortest one.
    let full_page_length = args
        .resume_lengths
        .iter()
        .copied()
        .find(|&length| length >= FULL_PAGE);
    let paged_length = full_page_length.or(args.resume_lengths.first().copied());
    let mut paged_resume = None;
    for &length in &args.resume_lengths {
        let setup = run(Workload::Resume, length, 0).await?;
        if Some(length) == paged_length {
            paged_resume.get_or_insert(setup);
        }
    }
    let list = run(Workload::List, 0, 0).await?;
    run(Workload::List, 0, args.list_depth).await?;
    run(Workload::Turn, 0, 0).await?;
    run(Workload::Watch, 0, 0).await?;
    run(Workload::ToolAppend, 0, 0).await?;
    run(Workload::ToolResume, 1000, 0).await?;

    eprintln!("running pgbench: the ceilings, and the SQL convo ran before");
    seed::pgbench_conversations(database_url, load.workers).await?;
    let pgbench_append_tps = pgbench(database_url, &load, PGBENCH_APPEND, &[]).await?;
    let pgbench_append_before_tps =
        pgbench(database_url, &load, PGBENCH_APPEND_BEFORE, &[]).await?;
    let (pgbench_resume_tps, pgbench_resume_before_tps) = match &paged_resume {
        Some(setup) => (
            pgbench_resume(database_url, &load, setup, PGBENCH_RESUME).await?,
            pgbench_resume(database_url, &load, setup, PGBENCH_RESUME_BEFORE).await?,
        ),
        None => (None, None),
    };
    let pgbench_list_tps =
        pgbench(database_url, &load, PGBENCH_LIST, &[("user", list.user())]).await?;

    let memory = if args.memory_duration.is_zero() {
        None
    } else {
        Some(memory_run(&server.addr, server.pid, args, &load).await?)
    };

    let find = |label: &str| runs.iter().find(|r| r.workload == label);
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let first_resume = args.resume_lengths.first().map(|l| format!("resume L={l}"));
    let paged_resume_label = paged_length.map(|l| format!("resume L={l}"));
    let last_resume = args.resume_lengths.last().map(|l| format!("resume L={l}"));
    let full_page_resume = full_page_length.map(|l| format!("resume L={l}"));
    Ok(SuiteReport {
        workers: load.workers,
        connections: load.connections,
        seconds_per_run: load.duration.as_secs_f64(),
        fsync: args.fsync,
        pool_size: args.pool_size,
        append_ratio: ratio(find("append").map(|r| r.per_second), pgbench_append_tps),
        resume_ratio: ratio(
            paged_resume_label
                .as_deref()
                .and_then(find)
                .map(|r| r.per_second),
            pgbench_resume_tps,
        ),
        resume_length_ratio: ratio(
            last_resume.as_deref().and_then(find).map(|r| r.p50_ms),
            first_resume.as_deref().and_then(find).map(|r| r.p50_ms),
        ),
        resume_full_page_ratio: ratio(
            last_resume.as_deref().and_then(find).map(|r| r.p50_ms),
            full_page_resume.as_deref().and_then(find).map(|r| r.p50_ms),
        ),
        list_depth_ratio: ratio(
            find(&format!("list depth={}", args.list_depth)).map(|r| r.p50_ms),
            find("list depth=0").map(|r| r.p50_ms),
        ),
        list_ratio: ratio(find("list depth=0").map(|r| r.per_second), pgbench_list_tps),
        runs,
        pgbench_append_tps,
        pgbench_append_before_tps,
        pgbench_resume_tps,
        pgbench_resume_before_tps,
        pgbench_list_tps,
        memory,
    })
}

fn print(report: &SuiteReport) {
    println!();
    println!(
        "convo-bench suite: {} workers over {} connections, {:.0} s per run, pool {}, fsync={}",
        report.workers, report.connections, report.seconds_per_run, report.pool_size, report.fsync
    );
    report::print_table(&report.runs);
    let show = |name: &str, value: Option<f64>, unit: &str| match value {
        Some(v) => println!("{name:<44} {v:>10.2}{unit}"),
        None => println!("{name:<44} {:>10}", "n/a"),
    };
    println!();
    show(
        "pgbench append, one statement (ceiling), tps",
        report.pgbench_append_tps,
        "",
    );
    show(
        "pgbench append, statements before, tps",
        report.pgbench_append_before_tps,
        "",
    );
    show(
        "pgbench resume, convo's statement, tps",
        report.pgbench_resume_tps,
        "",
    );
    show(
        "pgbench resume, statements before, tps",
        report.pgbench_resume_before_tps,
        "",
    );
    show("pgbench list, first page, tps", report.pgbench_list_tps, "");
    show("append / pgbench append", report.append_ratio, "x");
    show(
        "resume, full page / pgbench resume",
        report.resume_ratio,
        "x",
    );
    show("list / pgbench list", report.list_ratio, "x");
    show(
        "resume p50, longest / shortest conversation",
        report.resume_length_ratio,
        "x",
    );
    show(
        "resume p50, longest / shortest full page (50)",
        report.resume_full_page_ratio,
        "x",
    );
    show(
        "list p50, deep page / first page",
        report.list_depth_ratio,
        "x",
    );
    if let Some(memory) = &report.memory {
        println!(
            "server RSS at {} workers over {:.0} s: idle {:.1} MiB, at 10 s {:.1} MiB, peak {:.1} MiB, end {:.1} MiB ({:.0} appends/s)",
            memory.workers,
            memory.seconds,
            memory.idle_mib,
            memory.after_10s_mib,
            memory.peak_mib,
            memory.end_mib,
            memory.run.per_second
        );
    }
}

/// The convo server under test, a child process of this one.
struct Server {
    child: Child,
    pid: u32,
    addr: String,
}

impl Server {
    async fn start(database_url: &str, pool_size: u32, log_dir: &Path) -> Result<Self, BoxError> {
        let binary = std::env::current_exe()?
            .parent()
            .map(|dir| dir.join("convo"))
            .filter(|path| path.is_file())
            .ok_or("the convo binary was not found beside convo-bench: build both (cargo build --release)")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let log = std::fs::File::create(log_dir.join("convo-server.log"))?;
        let child = Command::new(&binary)
            .arg("serve")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--database-url", database_url])
            .args(["--pool-size", &pool_size.to_string()])
            .args(["--max-in-flight", "100000"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()?;
        let pid = child.id().ok_or("the server exited at once")?;
        let addr = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while Target::connect(&addr, 1).await.is_err() {
            if Instant::now() > deadline {
                return Err("the convo server did not start within 30 s".into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!(
            "convo server {} listening on {addr} (pid {pid})",
            binary.display()
        );
        Ok(Self { child, pid, addr })
    }

    async fn stop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
    }
}

/// pgbench beside the PostgreSQL that the suite runs (following a symlinked
/// `postgres` to its real directory), else on PATH.
fn pgbench_binary() -> Result<PathBuf, BoxError> {
    let beside_server = local_postgres::find_binaries().and_then(|dir| {
        let real_dir = std::fs::canonicalize(dir.join("postgres"))
            .ok()?
            .parent()?
            .to_owned();
        [dir, real_dir]
            .into_iter()
            .map(|d| d.join("pgbench"))
            .find(|p| p.is_file())
    });
    let on_path = || {
        std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join("pgbench"))
                .find(|p| p.is_file())
        })
    };
    beside_server.or_else(on_path).ok_or_else(|| {
        "pgbench was not found (Debian: apt-get install postgresql-contrib or postgresql)".into()
    })
}

/// Runs a pgbench script at the suite's concurrency: a warm-up, then the
/// measured run. Returns transactions per second. Its sessions plan as
/// convo's do (`plan_cache_mode = force_generic_plan`, see
/// `store/pool.rs`), as in `benches/compare.sh`: the ceiling runs the same
/// plan, not one made for each call's values.
async fn pgbench(
    database_url: &str,
    load: &Load,
    script: &str,
    defines: &[(&str, &str)],
) -> Result<Option<f64>, BoxError> {
    let binary = pgbench_binary()?;
    let script_path = std::env::temp_dir().join(format!(
        "convo-pgbench-{}.sql",
        uuid::Uuid::now_v7().simple()
    ));
    std::fs::write(&script_path, script)?;
    let mut tps = None;
    for (seconds, measured) in [
        (load.warmup.as_secs().max(1), false),
        (load.duration.as_secs().max(1), true),
    ] {
        let mut command = Command::new(&binary);
        command
            .env("PGOPTIONS", "-c plan_cache_mode=force_generic_plan")
            .args(["-n", "-M", "prepared", "-j", "2"])
            .args(["-c", &load.workers.to_string()])
            .args(["-T", &seconds.to_string()])
            .arg("-f")
            .arg(&script_path);
        for (name, value) in defines {
            command.arg("-D").arg(format!("{name}={value}"));
        }
        let output = command.arg(database_url).output().await?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            let _ = std::fs::remove_file(&script_path);
            return Err(format!(
                "pgbench failed: {}{}",
                stdout,
                String::from_utf8_lossy(&output.stderr)
            )
            .into());
        }
        if measured {
            tps = stdout
                .lines()
                .find(|line| line.starts_with("tps = "))
                .and_then(|line| line.split_whitespace().nth(2))
                .and_then(|n| n.parse::<f64>().ok());
        }
    }
    let _ = std::fs::remove_file(&script_path);
    Ok(tps)
}

async fn pgbench_resume(
    database_url: &str,
    load: &Load,
    setup: &Setup,
    script: &str,
) -> Result<Option<f64>, BoxError> {
    let Some(conversation) = setup.conversation() else {
        return Ok(None);
    };
    pgbench(
        database_url,
        load,
        script,
        &[("user", setup.user()), ("conversation", conversation)],
    )
    .await
}

/// Appends at `memory_workers` for `memory_duration`, sampling the server's
/// resident memory every second.
async fn memory_run(
    addr: &str,
    pid: u32,
    args: &SuiteArgs,
    load: &Load,
) -> Result<MemoryReport, BoxError> {
    eprintln!(
        "memory run: append at {} workers for {:?}",
        args.memory_workers, args.memory_duration
    );
    let idle_mib = report::resident_mib(pid).unwrap_or(0.0);
    let load = Load {
        workers: args.memory_workers,
        warmup: Duration::ZERO,
        duration: args.memory_duration,
        requests: None,
        ..*load
    };
    let target = Target::connect(addr, load.connections).await?;
    let setup = Setup::prepare(&target, Workload::Append, 0, 0, None).await?;
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let sampler = tokio::spawn(async move {
        let mut samples = Vec::new();
        let started = Instant::now();
        loop {
            tokio::select! {
                _ = &mut stopped => return samples,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            match report::resident_mib(pid) {
                Some(mib) => samples.push((started.elapsed().as_secs_f64(), mib)),
                None => return samples,
            }
        }
    });
    let run = workload::drive(&target, &setup, &load).await;
    let _ = stop.send(());
    let samples = sampler.await.unwrap_or_default();
    let end_mib = report::resident_mib(pid).unwrap_or(0.0);
    let after_10s_mib = samples
        .iter()
        .find(|(t, _)| *t >= 10.0)
        .map_or(end_mib, |(_, m)| *m);
    let peak_mib = samples.iter().map(|(_, m)| *m).fold(end_mib, f64::max);
    Ok(MemoryReport {
        workers: load.workers,
        seconds: run.seconds,
        idle_mib,
        after_10s_mib,
        peak_mib,
        end_mib,
        run,
    })
}
