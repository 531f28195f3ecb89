#!/usr/bin/env bash
# One sitting on a PostgreSQL server (argument: its URL without a database):
# convo's append (16 workers) against pgbench running the cheapest correct
# append (one statement, append.sql), convo's own statement
# (append-convo.sql), the same with a request_id as a turn's appends carry
# (append-request.sql) and the statements convo ran before it became one
# (append-before.sql). Needs a release build:
# cargo build --release --workspace --bins
set -u
cd "$(dirname "$0")/.."; R="${CARGO_TARGET_DIR:-target}/release"; PG="${1:-postgres://postgres@127.0.0.1:5432}"
. benches/serve.sh
fresh_database "$PG" convo_ceiling "$R"
psql -q "$PG/convo_ceiling" <<'SQL'
INSERT INTO users (user_id) VALUES ('pgbench');
INSERT INTO conversations (user_id, id, create_time, update_time)
SELECT 'pgbench', ('00000000-0000-0000-0000-' || lpad(n::text, 12, '0'))::uuid, now(), now()
FROM generate_series(0, 31) n;
SQL
pg() { pgbench -n -c 16 -j 2 -T 8 -M prepared -f "$1" "$PG/convo_ceiling" 2>/dev/null | grep -o "tps = [0-9.]*" | head -1; }
convo() {
  RUST_LOG=warn $R/convo serve --listen 127.0.0.1:50801 --database-url $PG/convo_ceiling >/dev/null 2>&1 & local pid=$!
  wait_for_port 50801 || { kill $pid; return 1; }
  $R/convo-bench run --addr http://127.0.0.1:50801 --workload append --workers 16 --connections 4 --warmup 2s --duration 8s --json \
    | python3 -c 'import json,sys; m=json.load(sys.stdin); print("convo append", round(m["per_second"]), "ops/s, errors", sum(m["errors"].values()))'
  kill $pid; wait $pid 2>/dev/null
}
for round in 1 2 3; do
  echo "round $round"
  echo -n "pgbench statements before:  "; pg benches/pgbench/append-before.sql
  echo -n "pgbench one statement:      "; pg benches/pgbench/append.sql
  echo -n "pgbench convo's statement:  "; pg benches/pgbench/append-convo.sql
  echo -n "pgbench with a request_id:  "; pg benches/pgbench/append-request.sql
  convo
done
