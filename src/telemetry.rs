//! Logs (readable by default, JSON on request, filtered by `RUST_LOG`) and
//! Prometheus metrics.

use tracing_subscriber::{EnvFilter, fmt};

/// How logs are written: readable text, or one JSON object per line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber. `RUST_LOG` overrides the default level
/// (`info`, with the noisier dependencies at `warn`).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,h2=warn,tower=warn,hyper=warn,tokio_postgres=warn")
    });
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // A second init (as in tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
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
