//! Logs: readable by default, JSON on request, filtered by `RUST_LOG`.

use tracing_subscriber::{EnvFilter, fmt};

use crate::config::LogFormat;

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
