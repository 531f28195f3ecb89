#!/usr/bin/env bash
# PostgreSQL's CPU per transaction of a pgbench script, over a window in the
# middle of the run (after the connections are made, before they close),
# counted two ways:
#
# - the machine's busy time (/proc/stat) less pgbench's own CPU: anything
#   else running on the machine counts as PostgreSQL's, so run nothing
#   beside it;
# - the CPU of PostgreSQL's processes, read from /proc as cpu-per-call.sh
#   reads it for convo's calls, so the two scripts' PostgreSQL figures
#   compare directly; and the cores pgbench and PostgreSQL kept busy.
#
#   benches/pgbench-cpu.sh benches/pgbench/resume.sql postgres://…/db \
#       -D user=pgbench-resume -D conversation=00000000-0000-0000-0000-00000000ffff
#
# On this shared machine, alternate the runs being compared and take
# medians. Environment: CLIENTS (16), DURATION (6, seconds of the window).
set -euo pipefail
script="$1"; url="$2"; shift 2
window="${DURATION:-6}"
out="$(mktemp)"; err="$(mktemp)"
trap 'rm -f "$out" "$err"' EXIT

. "$(dirname "$0")/cpu-ticks.sh"
postmaster="$(postmaster_of "$url")"

# Two seconds either side of the window: connecting, and closing.
PGOPTIONS="-c plan_cache_mode=force_generic_plan" pgbench -n -c "${CLIENTS:-16}" -j 2 \
    -T "$((window + 4))" -M prepared "$@" -f "$script" "$url" >"$out" 2>"$err" &
pgbench_pid=$!
# pgbench gone before the window ends, or ended with an error: say why.
failed() { echo "pgbench failed:" >&2; grep -v '^progress' "$err" | tail -n 20 >&2; exit 1; }
sleep 2
i0=$(idle_ticks); m0=$(busy_ticks); b0=$(ticks "$pgbench_pid" 2>/dev/null) || failed; p0=$(postgres_ticks "$postmaster"); t0=$(date +%s.%N)
sleep "$window"
i1=$(idle_ticks); m1=$(busy_ticks); b1=$(ticks "$pgbench_pid" 2>/dev/null) || failed; p1=$(postgres_ticks "$postmaster"); t1=$(date +%s.%N)
wait "$pgbench_pid" || failed
python3 - "$script" "$(getconf CLK_TCK)" "$m0" "$m1" "$b0" "$b1" "$p0" "$p1" "$t0" "$t1" "$(cat "$out")" "$i0" "$i1" "$(nproc)" <<'PY'
import re, sys
script, hz = sys.argv[1], float(sys.argv[2])
m0, m1, b0, b1, p0, p1, t0, t1 = map(float, sys.argv[3:11])
tps = float(re.search(r"tps = ([\d.]+)", sys.argv[11]).group(1))
i0, i1, cores = map(float, sys.argv[12:15])
tx = tps * (t1 - t0)
per_tx = lambda ticks: ticks / hz * 1000 / tx
print(f"{script}: {tps:,.0f} tps; CPU ms per transaction: machine less pgbench "
      f"{per_tx(m1 - m0 - (b1 - b0)):.3f}, PostgreSQL's processes {per_tx(p1 - p0):.3f}, "
      f"pgbench {per_tx(b1 - b0):.3f}; cores busy {((p1 - p0) + (b1 - b0)) / hz / (t1 - t0):.2f}, "
      f"machine idle {(i1 - i0) / hz / (t1 - t0) / cores:.1%}")
PY
