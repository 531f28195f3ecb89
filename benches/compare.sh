#!/usr/bin/env bash
# Compares two builds of convo in one sitting: each round serves build A, then
# build B, against a database of its own on the same PostgreSQL, and drives
# the same workloads with one convo-bench; the medians over the rounds are
# printed last. Use it for before/after figures of a change:
#
#   git worktree add /tmp/before <commit>
#   (cd /tmp/before && CARGO_TARGET_DIR=/tmp/before-target cargo build --release --bins)
#   cargo build --release --workspace --bins
#   benches/compare.sh /tmp/before-target/release target/release postgres://postgres@127.0.0.1:5432
#
# Environment: ROUNDS (6), DURATION (6s), WORKLOADS ("append resume"),
# MESSAGES (1000, the length of the resumed conversation).
set -euo pipefail
before="$1"; after="$2"; server="${3:-postgres://postgres@127.0.0.1:5432}"
bench="${BENCH:-$after/convo-bench}"
rounds="${ROUNDS:-6}"; duration="${DURATION:-6s}"; workloads="${WORKLOADS:-append resume}"
results="$(mktemp)"
trap 'rm -f "$results"' EXIT

database() { # name → its URL on the server (given without a database)
    printf '%s/%s' "${server%/}" "$1"
}

port=50700
for side in before after; do
    bin="${!side}"
    url="$(database "convo_compare_$side")"
    psql -q "$(database postgres)" -c "DROP DATABASE IF EXISTS convo_compare_$side" \
        -c "CREATE DATABASE convo_compare_$side"
    "$bin/convo" migrate --database-url "$url" >/dev/null 2>&1
done

serve() { # side port
    local bin="${!1}"
    RUST_LOG=warn "$bin/convo" serve --listen "127.0.0.1:$2" \
        --database-url "$(database "convo_compare_$1")" >/dev/null 2>&1 &
    server_pid=$!
    for _ in $(seq 1 100); do
        (exec 3<>/dev/tcp/127.0.0.1/"$2") 2>/dev/null && return
        sleep 0.1
    done
}

for round in $(seq 1 "$rounds"); do
    for side in before after; do
        port=$((port + 1))
        serve "$side" "$port"
        for workload in $workloads; do
            "$bench" run --addr "http://127.0.0.1:$port" --workload "$workload" \
                --database-url "$(database "convo_compare_$side")" --messages "${MESSAGES:-1000}" \
                --workers 16 --connections 4 --warmup 2s --duration "$duration" --json |
                python3 -c 'import json, sys; m = json.load(sys.stdin); print(sys.argv[1], sys.argv[2], m["workload"].replace(" ", "_"), round(m["per_second"]), round(m["p50_ms"], 3), sum(m["errors"].values()))' "$round" "$side" |
                tee -a "$results"
        done
        kill "$server_pid"
        wait "$server_pid" 2>/dev/null || true
    done
done

python3 - "$results" <<'PY'
import collections, statistics, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    _, side, workload, ops, p50, errors = line.split()
    runs[(workload, side)].append((int(ops), float(p50), int(errors)))
print(f"{'workload':<18} {'side':<7} {'median ops/s':>12} {'median p50 ms':>14} {'errors':>7}")
for workload in sorted({w for w, _ in runs}):
    medians = {}
    for side in ("before", "after"):
        rows = runs[(workload, side)]
        medians[side] = statistics.median(r[0] for r in rows)
        print(f"{workload:<18} {side:<7} {medians[side]:>12,.0f} "
              f"{statistics.median(r[1] for r in rows):>14.2f} {sum(r[2] for r in rows):>7}")
    print(f"{workload:<18} after/before: {medians['after'] / medians['before']:.2f}x")
PY
