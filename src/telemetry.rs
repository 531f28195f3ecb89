//! Logs (readable by default, JSON on request, filtered by `RUST_LOG`) and
//! Prometheus metrics.

use std::io::{BufWriter, IsTerminal};

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::{EnvFilter, fmt};

/// How logs are written: readable text, or one JSON object per line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Keeps the log writer running; dropping it writes out the lines still
/// queued. Hold it until the process is about to exit.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    _writer: WorkerGuard,
}

/// Lines that may wait for the writer before a caller waits in turn: enough
/// for a burst of calls, bounded so a stalled log reader holds little memory.
const QUEUED_LINES: usize = 16_384;

/// Installs the global subscriber. `RUST_LOG` overrides the default level
/// (`info`, with the noisier dependencies at `warn`).
///
/// Lines go to stderr from a thread of their own, many per `write`, so a
/// call pays for formatting its line, not for a write (BENCHMARKS.md, "Tenth
/// sitting"). None is dropped: when the queue is full, callers wait, as they
/// did for a direct write. A process killed outright (SIGKILL, out of
/// memory) loses the lines not yet written; every ordinary exit writes them
/// out (see [`LogGuard`]). Colours only on a terminal (and, as
/// tracing-subscriber does by default, not with `NO_COLOR` set), so files and
/// log collectors get plain text.
pub fn init(format: LogFormat) -> LogGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,h2=warn,tower=warn,hyper=warn,tokio_postgres=warn")
    });
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("convo-log")
        .finish(BufWriter::new(std::io::stderr()));
    let mut builder = fmt().with_env_filter(filter).with_writer(writer);
    if !std::io::stderr().is_terminal() {
        builder = builder.with_ansi(false);
    }
    // A second init keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    LogGuard { _writer: guard }
}

/// Serves Prometheus metrics at `http://ADDR/metrics`. The recorder is global
/// to the process, so this succeeds once.
pub fn serve_metrics(addr: std::net::SocketAddr) -> Result<(), String> {
    // Calls take from well under a millisecond to the statement timeout.
    const BUCKETS: &[f64] = &[
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ];
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets(BUCKETS)
        .map_err(|e| e.to_string())?
        .install()
        .map_err(|e| e.to_string())
}
