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
# MESSAGES (1000, the length of the resumed conversation), WORKERS (16).
# PGBENCH=1 also runs, in every round, pgbench's ceilings on a database of
# their own (benches/pgbench: append.sql, resume.sql, list.sql, create.sql) at the same
# concurrency, so every ratio comes from one sitting.
# PIN=1 (PostgreSQL on this machine only) gives PostgreSQL cores of its own
# for the sitting: its processes run on PG_CPUS (0), convo, convo-bench and
# pgbench's client on APP_CPUS (the other cores). Both sides then get the
# same database CPU, and a ratio says whether convo keeps PostgreSQL as busy
# as pgbench does, instead of how three processes share two cores. The
# processes are let run anywhere again at exit. It reads the postmaster's pid
# from the data directory, so run it as root or as PostgreSQL's own user.
set -euo pipefail
before="$1"; after="$2"; server="${3:-postgres://postgres@127.0.0.1:5432}"
bench="${BENCH:-$after/convo-bench}"
rounds="${ROUNDS:-6}"; duration="${DURATION:-6s}"; workloads="${WORKLOADS:-append resume}"
workers="${WORKERS:-16}"; here="$(cd "$(dirname "$0")" && pwd)"
results="$(mktemp)"
trap 'rm -f "$results"' EXIT
app=()
if [ "${PIN:-0}" = 1 ]; then
    all_cpus="0-$(($(nproc) - 1))"
    pg_cpus="${PG_CPUS:-0}"; app_cpus="${APP_CPUS:-1-$(($(nproc) - 1))}"
    data="$(psql -Atq "${server%/}/postgres" -c 'SHOW data_directory')"
    postmaster="$(head -1 "$data/postmaster.pid")"
    pin_postgres() { # cpus: the postmaster and every process it started
        # (new sessions inherit the postmaster's)
        for pid in "$postmaster" $(pgrep -P "$postmaster"); do
            taskset -a -p -c "$1" "$pid" >/dev/null
        done
    }
    pin_postgres "$pg_cpus"
    trap 'pin_postgres "$all_cpus"; rm -f "$results"' EXIT
    app=(taskset -c "$app_cpus")
    echo "PostgreSQL (postmaster $postmaster) on CPUs $pg_cpus; convo, convo-bench and pgbench on $app_cpus"
fi

database() { # name → its URL on the server (given without a database)
    printf '%s/%s' "${server%/}" "$1"
}

. "$here/serve.sh"
port=50700
for side in before after; do
    fresh_database "$server" "convo_compare_$side" "${!side}"
done

if [ "${PGBENCH:-0}" = 1 ]; then
    url="$(database convo_compare_pgbench)"
    fresh_database "$server" convo_compare_pgbench "$after"
    psql -q "$url" -v messages="${MESSAGES:-1000}" -v clients="$workers" <<'SQL'
INSERT INTO users (user_id) VALUES ('pgbench'), ('pgbench-resume'), ('pgbench-list');
-- append.sql: one conversation per client.
INSERT INTO conversations (user_id, id, title, create_time, update_time)
SELECT 'pgbench', ('00000000-0000-0000-0000-' || lpad(c::text, 12, '0'))::uuid, 'pgbench ' || c, now(), now()
  FROM generate_series(0, :clients - 1) AS c;
-- resume.sql: one conversation as long as the one convo-bench resumes.
INSERT INTO conversations (user_id, id, title, create_time, update_time, message_count)
VALUES ('pgbench-resume', '00000000-0000-0000-0000-00000000ffff', 'seeded', now(), now(), :messages);
INSERT INTO messages (user_id, conversation_id, sequence, id, role, content, create_time, bytes_through)
SELECT 'pgbench-resume', '00000000-0000-0000-0000-00000000ffff', s, gen_random_uuid(), 1 + (s % 2)::smallint,
       content, now() - make_interval(secs => (:messages - s) / 1000.0),
       sum(octet_length(content)) OVER (ORDER BY s)
  FROM (SELECT s, 'message ' || s || ': ' || repeat('lorem ipsum dolor sit amet ', 7)
          FROM generate_series(1, :messages) AS s) AS g (s, content);
UPDATE conversations SET total_bytes = (SELECT max(bytes_through) FROM messages
                                         WHERE user_id = 'pgbench-resume')
 WHERE user_id = 'pgbench-resume';
-- list.sql: as many conversations as convo-bench's list seeds.
INSERT INTO conversations (user_id, id, title, create_time, update_time)
SELECT 'pgbench-list', gen_random_uuid(), 'seeded ' || s,
       now() - make_interval(secs => s / 1000.0), now() - make_interval(secs => s / 1000.0)
  FROM generate_series(1, 100) AS s;
ANALYZE;
SQL
fi

pgbench_round() { # round
    local url; url="$(database convo_compare_pgbench)"
    for script in list resume append create; do
        # The append scripts leave dead rows and stale statistics behind; a
        # list planned on those picks the wrong index (seen: 4x slower).
        psql -q "$url" -c "VACUUM ANALYZE conversations, messages"
        # The plans convo's sessions use (see store/pool.rs).
        tps="$(PGOPTIONS="-c plan_cache_mode=force_generic_plan" ${app[@]+"${app[@]}"} pgbench -n -c "$workers" -j 2 -T "${duration%s}" -M prepared \
            -D user="$(case $script in list) echo pgbench-list;; create) echo pgbench-create;; *) echo pgbench-resume;; esac)" \
            -D conversation=00000000-0000-0000-0000-00000000ffff \
            -f "$here/pgbench/$script.sql" "$url" 2>/dev/null | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -1)"
        echo "$1 pgbench $script ${tps%.*} 0 0" | tee -a "$results"
    done
}

serve() { # side port
    local bin="${!1}"
    RUST_LOG=warn ${app[@]+"${app[@]}"} "$bin/convo" serve --listen "127.0.0.1:$2" \
        --database-url "$(database "convo_compare_$1")" >/dev/null 2>&1 &
    server_pid=$!
    wait_for_port "$2"
}

for round in $(seq 1 "$rounds"); do
    for side in before after; do
        port=$((port + 1))
        # As for pgbench: each side starts from fresh statistics.
        psql -q "$(database "convo_compare_$side")" -c "VACUUM ANALYZE conversations, messages"
        serve "$side" "$port"
        for workload in $workloads; do
            ${app[@]+"${app[@]}"} "$bench" run --addr "http://127.0.0.1:$port" --workload "$workload" \
                --database-url "$(database "convo_compare_$side")" --messages "${MESSAGES:-1000}" \
                --workers "$workers" --connections 4 --warmup 2s --duration "$duration" --json |
                python3 -c 'import json, sys; m = json.load(sys.stdin); print(sys.argv[1], sys.argv[2], m["workload"].replace(" ", "_"), round(m["per_second"]), round(m["p50_ms"], 3), sum(m["errors"].values()))' "$round" "$side" |
                tee -a "$results"
        done
        kill "$server_pid"
        wait "$server_pid" 2>/dev/null || true
    done
    if [ "${PGBENCH:-0}" = 1 ]; then pgbench_round "$round"; fi
done

python3 - "$results" <<'PY'
import collections, statistics, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    _, side, workload, ops, p50, errors = line.split()
    runs[(workload, side)].append((int(ops), float(p50), int(errors)))
print(f"{'workload':<18} {'side':<7} {'median ops/s':>12} {'median p50 ms':>14} {'errors':>7}")
ceilings = {w: statistics.median(r[0] for r in rows) for (w, side), rows in runs.items() if side == "pgbench"}
for workload, tps in sorted(ceilings.items()):
    print(f"pgbench {workload:<10} {'':<7} {tps:>12,.0f} tps")
for workload in sorted({w for w, side in runs if side != "pgbench"}):
    medians = {}
    for side in ("before", "after"):
        rows = runs[(workload, side)]
        medians[side] = statistics.median(r[0] for r in rows)
        print(f"{workload:<18} {side:<7} {medians[side]:>12,.0f} "
              f"{statistics.median(r[1] for r in rows):>14.2f} {sum(r[2] for r in rows):>7}")
    print(f"{workload:<18} after/before: {medians['after'] / medians['before']:.2f}x")
    ceiling = ("append" if workload == "append" else "resume" if workload.startswith("resume_L=")
               else "list" if workload == "list_depth=0" else "create" if workload == "create" else None)
    if ceiling in ceilings:
        for side in ("before", "after"):
            print(f"{workload:<18} {side} / pgbench {ceiling}: {medians[side] / ceilings[ceiling]:.2f}x")
PY
