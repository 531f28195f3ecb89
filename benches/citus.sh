#!/usr/bin/env bash
# convo on a Citus cluster beside convo on plain PostgreSQL, in one sitting:
# each round serves one build three ways and drives the same workloads with
# convo-bench, then the medians are printed.
#
#   plain        a database on the plain PostgreSQL
#   citus        a distributed database on the coordinator (the append is the
#                function Citus delegates to the user's worker)
#   citus-cte    the same, with that function dropped: the append is the
#                one-statement CTE plain PostgreSQL runs
#
#   scripts/citus-cluster.sh start
#   cargo build --release --workspace --bins
#   benches/citus.sh [plain server URL] [coordinator URL]
#
# Environment: ROUNDS (3), DURATION (6s), WORKLOADS ("append resume"),
# WORKERS (16), MESSAGES (1000), BIN (target/release).
set -euo pipefail
plain="${1:-postgres://postgres@127.0.0.1:5432}"
coordinator="${2:-postgres://postgres@127.0.0.1:9700}"
bin="${BIN:-target/release}"; rounds="${ROUNDS:-3}"; duration="${DURATION:-6s}"
workloads="${WORKLOADS:-append resume}"; workers="${WORKERS:-16}"
here="$(cd "$(dirname "$0")" && pwd)"
results="$(mktemp)"; logs="$(mktemp -d)"
trap 'rm -rf "$results" "$logs"' EXIT

. "$here/serve.sh"
fresh_database "$plain" convo_citus_bench "$bin"
for name in convo_citus_bench convo_citus_bench_cte; do
    # A database of that name on every node, with the nodes added.
    CITUS_DATABASE="$name" CITUS_PORT="$(python3 -c 'import sys, urllib.parse; print(urllib.parse.urlparse(sys.argv[1]).port)' "$coordinator")" \
        "$here/../scripts/citus-cluster.sh" start >/dev/null
    "$bin/convo" distribute --database-url "${coordinator%/}/$name" >/dev/null 2>&1
done
psql -q "${coordinator%/}/convo_citus_bench_cte" -c "DROP FUNCTION IF EXISTS convo_append_v1"

url_of() {
    case "$1" in
        plain) echo "${plain%/}/convo_citus_bench" ;;
        citus) echo "${coordinator%/}/convo_citus_bench" ;;
        citus-cte) echo "${coordinator%/}/convo_citus_bench_cte" ;;
    esac
}

port=50800
for round in $(seq 1 "$rounds"); do
    for side in plain citus citus-cte; do
        port=$((port + 1))
        RUST_LOG=warn "$bin/convo" serve --listen "127.0.0.1:$port" \
            --database-url "$(url_of "$side")" >"$logs/$side.log" 2>&1 &
        server=$!
        # One run, right after the API suite on the same cluster, found
        # nothing listening after 10 s: wait longer, and show the server's
        # log if it never serves.
        wait_for_port "$port" 60 "$logs/$side.log"
        for workload in $workloads; do
            "$bin/convo-bench" run --addr "http://127.0.0.1:$port" --workload "$workload" \
                --database-url "$(url_of "$side")" --messages "${MESSAGES:-1000}" \
                --workers "$workers" --connections 4 --warmup 2s --duration "$duration" --json |
                python3 -c 'import json, sys; m = json.load(sys.stdin); print(sys.argv[1], sys.argv[2], m["workload"].replace(" ", "_"), round(m["per_second"]), round(m["p50_ms"], 3), sum(m["errors"].values()))' "$round" "$side" |
                tee -a "$results"
        done
        kill "$server"
        wait "$server" 2>/dev/null || true
    done
done

python3 - "$results" <<'PY'
import collections, statistics, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    _, side, workload, ops, p50, errors = line.split()
    runs[(workload, side)].append((int(ops), float(p50), int(errors)))
print(f"{'workload':<18} {'side':<10} {'median ops/s':>12} {'median p50 ms':>14} {'errors':>7} {'vs plain':>9}")
for workload in sorted({w for w, _ in runs}):
    plain = statistics.median(r[0] for r in runs[(workload, "plain")])
    for side in ("plain", "citus", "citus-cte"):
        rows = runs[(workload, side)]
        ops = statistics.median(r[0] for r in rows)
        print(f"{workload:<18} {side:<10} {ops:>12,.0f} {statistics.median(r[1] for r in rows):>14.2f} "
              f"{sum(r[2] for r in rows):>7} {ops / plain:>8.2f}x")
PY
