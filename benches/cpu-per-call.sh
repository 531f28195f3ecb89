#!/usr/bin/env bash
# Where one call's CPU goes: serves a build on a fresh database, drives one
# workload with convo-bench, and prints CPU milliseconds per call of the
# server (and how much of it was user time, not the kernel's), of the load
# generator and of the PostgreSQL cluster's processes, read from /proc over
# 5 s in the middle of the run, how many cores the three kept busy together,
# and the machine's idle share (what the three leave unused: time lost
# waiting, not working; kernel work no process is charged for, such as
# softirq time for loopback traffic, is the rest). On a machine whose
# cores the three share, these say more about a change than ops/s, which
# drift with the machine:
#
#   benches/cpu-per-call.sh target/release resume
#   benches/cpu-per-call.sh /tmp/before-target/release list
#
# Environment: SERVER (postgres://postgres@127.0.0.1:5432, without a
# database), BENCH (the build's own convo-bench), WORKERS (16), PORT (50999),
# RUST_LOG (warn: no line per call, as compare.sh runs it), LOG (a file: the
# server's log goes there through a pipe, as a log collector reads it,
# instead of to /dev/null).
set -euo pipefail
bin="$1"; workload="$2"
server="${SERVER:-postgres://postgres@127.0.0.1:5432}"
bench="${BENCH:-$bin/convo-bench}"; port="${PORT:-50999}"
. "$(dirname "$0")/serve.sh"
. "$(dirname "$0")/cpu-ticks.sh"
url="${server%/}/convo_cpu_per_call"
fresh_database "$server" convo_cpu_per_call "$bin"
postmaster="$(postmaster_of "$url")"
# The server's log: to /dev/null, or through a pipe into $LOG.
if [ -n "${LOG:-}" ]; then exec 4> >(cat >"$LOG"); else exec 4>/dev/null; fi
RUST_LOG="${RUST_LOG:-warn}" "$bin/convo" serve --listen "127.0.0.1:$port" --database-url "$url" >/dev/null 2>&4 &
server_pid=$!
report="$(mktemp)"
trap 'kill "$server_pid" 2>/dev/null || true; rm -f "$report"' EXIT
wait_for_port "$port"

"$bench" run --addr "http://127.0.0.1:$port" --workload "$workload" --database-url "$url" \
    --messages 1000 --workers "${WORKERS:-16}" --connections 4 --warmup 2s --duration 9s \
    --json >"$report" &
bench_pid=$!
sleep 4 # seeding and warm-up
i0=$(idle_ticks); s0=$(ticks "$server_pid"); u0=$(user_ticks "$server_pid"); b0=$(ticks "$bench_pid"); p0=$(postgres_ticks "$postmaster"); t0=$(date +%s.%N)
sleep 5
i1=$(idle_ticks); s1=$(ticks "$server_pid"); u1=$(user_ticks "$server_pid"); b1=$(ticks "$bench_pid"); p1=$(postgres_ticks "$postmaster"); t1=$(date +%s.%N)
wait "$bench_pid"
python3 - "$report" "$(getconf CLK_TCK)" "$s0" "$s1" "$b0" "$b1" "$p0" "$p1" "$t0" "$t1" "$u0" "$u1" "$i0" "$i1" "$(nproc)" <<'PY'
import json, sys
report, hz = json.load(open(sys.argv[1])), float(sys.argv[2])
s0, s1, b0, b1, p0, p1, t0, t1, u0, u1, i0, i1, cores = map(float, sys.argv[3:])
calls = report["per_second"] * (t1 - t0)
per_call = lambda a, b: (b - a) / hz * 1000 / calls
errors = sum(report["errors"].values())
print(f'{report["workload"]}: {report["per_second"]:,.0f} calls/s, {errors} errors; '
      f'CPU ms per call: server {per_call(s0, s1):.3f} ({(u1 - u0) / max(s1 - s0, 1):.0%} user), '
      f'load generator {per_call(b0, b1):.3f}, '
      f'PostgreSQL {per_call(p0, p1):.3f}; '
      f'cores busy {((s1 - s0) + (b1 - b0) + (p1 - p0)) / hz / (t1 - t0):.2f}, '
      f'machine idle {(i1 - i0) / hz / (t1 - t0) / cores:.1%}')
PY
