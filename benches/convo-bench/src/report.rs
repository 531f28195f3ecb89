//! What a run measured, as a table for people and JSON for tools.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

/// One workload's results.
#[derive(Debug, Clone, Serialize)]
pub struct Measured {
    pub workload: String,
    pub workers: usize,
    pub connections: usize,
    pub seconds: f64,
    pub operations: u64,
    pub per_second: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// Failed operations by gRPC status code.
    pub errors: BTreeMap<String, u64>,
    pub server_rss_mib: Option<f64>,
}

impl Measured {
    pub fn new(
        workload: String,
        workers: usize,
        connections: usize,
        seconds: f64,
        latencies_us: &Histogram<u64>,
        errors: BTreeMap<String, u64>,
    ) -> Self {
        let ms = |q: f64| latencies_us.value_at_quantile(q) as f64 / 1000.0;
        let operations = latencies_us.len();
        Self {
            workload,
            workers,
            connections,
            seconds,
            operations,
            per_second: if seconds > 0.0 {
                operations as f64 / seconds
            } else {
                0.0
            },
            p50_ms: ms(0.5),
            p90_ms: ms(0.9),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: latencies_us.max() as f64 / 1000.0,
            errors,
            server_rss_mib: None,
        }
    }
}

pub fn print_table(rows: &[Measured]) {
    println!(
        "{:<28} {:>7} {:>9} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8}  errors",
        "workload", "workers", "ops", "ops/s", "p50 ms", "p90 ms", "p99 ms", "p99.9", "max ms"
    );
    for row in rows {
        let errors = if row.errors.is_empty() {
            "0".to_owned()
        } else {
            row.errors
                .iter()
                .map(|(code, n)| format!("{code}={n}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        println!(
            "{:<28} {:>7} {:>9} {:>10.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}  {}",
            row.workload,
            row.workers,
            row.operations,
            row.per_second,
            row.p50_ms,
            row.p90_ms,
            row.p99_ms,
            row.p999_ms,
            row.max_ms,
            errors
        );
    }
}

/// Resident memory of a process on this machine, from /proc, in MiB.
pub fn resident_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
