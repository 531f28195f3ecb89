//! convo-bench: a load generator and report for any server that speaks
//! convo.v1, and a suite that measures convo against PostgreSQL's own ceiling
//! (pgbench issuing the same SQL) on the same machine.
//!
//! `convo-bench run --workload append --addr http://HOST:PORT` drives one
//! workload against a running server; `convo-bench suite` starts a fresh
//! PostgreSQL and server, runs every workload and pgbench, and prints the table
//! that BENCHMARKS.md quotes.

mod report;
mod seed;
mod suite;
mod watch_latency;
mod workload;

use std::{process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::workload::{Load, Workload};

#[derive(Debug, Parser)]
#[command(
    name = "convo-bench",
    version,
    about = "Load generator and benchmark suite for convo.v1"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Drive one workload against a running server and print its report.
    Run(RunArgs),
    /// Start PostgreSQL and a convo server, run every workload and pgbench, print the table.
    Suite(suite::SuiteArgs),
    /// Append at a fixed rate through one server, watch through another (or
    /// the same), and report delivery latency, gaps and duplicates.
    WatchLatency(watch_latency::WatchLatencyArgs),
}

/// How hard and how long to drive the server.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// Concurrent workers, each with one call in flight at a time.
    #[arg(long, default_value_t = 16)]
    pub workers: usize,
    /// HTTP/2 connections the workers share (round robin).
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Time to run before measuring.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Time to measure for (unless --requests is given).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Measure this many operations (shared by the workers) instead of a duration.
    #[arg(long)]
    pub requests: Option<u64>,
}

impl LoadArgs {
    fn load(&self) -> Load {
        Load {
            workers: self.workers.max(1),
            connections: self.connections.max(1),
            warmup: self.warmup,
            duration: self.duration,
            requests: self.requests,
        }
    }
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The server, as a URI.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    #[arg(long, value_enum)]
    workload: Workload,
    #[command(flatten)]
    load: LoadArgs,
    /// resume: the length of the conversation resumed (seeded in bulk).
    #[arg(long, default_value_t = 10)]
    messages: i64,
    /// list: how deep into the listing the measured page is (0 = first page).
    #[arg(long, default_value_t = 0)]
    depth: i64,
    /// The server's database, for seeding `resume` and `list` in bulk.
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// Report this process's resident memory (the server's pid, on this machine).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

// The load generator shares the machine's cores with the server and
// PostgreSQL, so it spends as little of them as it can, as pgbench's client
// does: one thread (no work stealing, no wake-ups across threads; 27 % less
// CPU per call than tokio's default of a thread per core, measured under
// `resume` and `list`) and the allocator the server uses.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Run(args) => run(args).await,
        Command::Suite(args) => suite::run(args).await,
        Command::WatchLatency(args) => watch_latency::run(args).await,
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("convo-bench: {error}");
            ExitCode::FAILURE
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn run(args: RunArgs) -> Result<(), BoxError> {
    let target = workload::Target::connect(&args.addr, args.load.connections).await?;
    let setup = workload::Setup::prepare(
        &target,
        args.workload,
        args.messages,
        args.depth,
        args.database_url.as_deref(),
    )
    .await?;
    let mut measured = workload::drive(&target, &setup, &args.load.load()).await;
    measured.server_rss_mib = args.server_pid.and_then(report::resident_mib);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&measured)?);
    } else {
        report::print_table(&[measured]);
    }
    Ok(())
}
