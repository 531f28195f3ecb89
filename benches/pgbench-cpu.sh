#!/usr/bin/env bash
# PostgreSQL's CPU per transaction of a pgbench script: the machine's busy
# time over the run (/proc/stat) less pgbench's own CPU, divided by the
# transactions. cpu-per-call.sh does the same for convo's calls; on this
# shared machine, alternate the scripts being compared and take medians:
#
#   benches/pgbench-cpu.sh benches/pgbench/resume.sql postgres://…/db \
#       -D user=pgbench-resume -D conversation=00000000-0000-0000-0000-00000000ffff
#
# Anything else running on the machine counts as PostgreSQL's: run nothing
# beside it. Environment: CLIENTS (16), DURATION (6, seconds).
set -euo pipefail
script="$1"; url="$2"; shift 2
busy() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8}' /proc/stat; }
times="$(mktemp)"; trap 'rm -f "$times"' EXIT
before="$(busy)"
out="$(/usr/bin/time -o "$times" -f "%U %S" env PGOPTIONS="-c plan_cache_mode=force_generic_plan" \
    pgbench -n -c "${CLIENTS:-16}" -j 2 -T "${DURATION:-6}" -M prepared "$@" -f "$script" "$url" 2>/dev/null)"
after="$(busy)"
python3 - "$script" "$before" "$after" "$(getconf CLK_TCK)" "$(tail -1 "$times")" "$out" <<'PY'
import re, sys
script, before, after, hz, own, out = sys.argv[1:]
tx = int(re.search(r"actually processed: (\d+)", out).group(1))
tps = float(re.search(r"tps = ([\d.]+)", out).group(1))
user, system = map(float, own.split())
busy = (int(after) - int(before)) / int(hz)
print(f"{script}: {tps:,.0f} tps; CPU ms per transaction: PostgreSQL and kernel "
      f"{(busy - user - system) * 1000 / tx:.3f}, pgbench {(user + system) * 1000 / tx:.3f}")
PY
