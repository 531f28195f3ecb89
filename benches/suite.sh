#!/usr/bin/env bash
# Runs convo's whole benchmark suite against a fresh PostgreSQL and server and
# prints the table. Extra arguments go to `convo-bench suite` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins --quiet
exec target/release/convo-bench suite "$@"
