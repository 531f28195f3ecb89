#!/usr/bin/env bash
# A local Citus cluster for trying convo scaled out: one coordinator and two
# workers on loopback ports, from a Citus already installed into the
# machine's PostgreSQL (this script downloads nothing; README "Scaling out"
# says how to build Citus). Not for production: trust authentication on
# 127.0.0.1, data in a throwaway directory.
#
#   scripts/citus-cluster.sh start    # prints the coordinator's URL
#   scripts/citus-cluster.sh stop     # stops the three servers
#   scripts/citus-cluster.sh destroy  # stops them and removes their data
#   scripts/citus-cluster.sh status
#
# Environment: CITUS_DIR (data, default /var/tmp/convo-citus), CITUS_PORT
# (the coordinator's port; workers take the next two; default 9700),
# CITUS_DATABASE (default convo), PG_BIN (default: the newest
# /usr/lib/postgresql/*/bin).
set -euo pipefail

dir=${CITUS_DIR:-/var/tmp/convo-citus}
port=${CITUS_PORT:-9700}
database=${CITUS_DATABASE:-convo}
pg_bin=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)}
nodes=(coordinator worker1 worker2)

die() { echo "citus-cluster: $*" >&2; exit 1; }

[ -x "$pg_bin/pg_ctl" ] || die "no PostgreSQL server binaries found (set PG_BIN)"
[ -f "$("$pg_bin/pg_config" --pkglibdir 2>/dev/null || echo /nonexistent)/citus.so" ] \
  || [ -f "$(dirname "$pg_bin")/lib/citus.so" ] \
  || die "Citus is not installed into $pg_bin's PostgreSQL (see README, \"Scaling out\")"

# PostgreSQL refuses to run as root: as root, the servers run as `postgres`.
as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

node_port() { echo $((port + $1)); }

psql_on() { # port database sql
  as_owner "$pg_bin/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$1" -U postgres -d "$2" -c "$3"
}

start() {
  if [ "$(id -u)" = 0 ]; then
    mkdir -p "$dir" && chown postgres: "$dir"
  else
    mkdir -p "$dir"
  fi
  for i in 0 1 2; do
    local data="$dir/${nodes[$i]}" p
    p=$(node_port "$i")
    if [ ! -f "$data/PG_VERSION" ]; then
      as_owner "$pg_bin/initdb" -D "$data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
      cat >>"$data/postgresql.conf" <<CONF
shared_preload_libraries = 'citus'
listen_addresses = '127.0.0.1'
port = $p
unix_socket_directories = '$dir'
max_connections = 300
max_prepared_transactions = 300
# One Citus maintenance daemon per database that uses Citus (the API tests
# make one database per test).
max_worker_processes = 64
lc_messages = 'C'
CONF
    fi
    if ! as_owner "$pg_bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
      as_owner "$pg_bin/pg_ctl" -D "$data" -l "$data/server.log" -w start >/dev/null \
        || die "${nodes[$i]} did not start; see $data/server.log"
    fi
  done
  for i in 0 1 2; do
    local p
    p=$(node_port "$i")
    if [ "$(as_owner "$pg_bin/psql" -X -tA -h 127.0.0.1 -p "$p" -U postgres -d postgres \
          -c "SELECT count(*) FROM pg_database WHERE datname = '$database'")" != 1 ]; then
      psql_on "$p" postgres "CREATE DATABASE \"$database\""
    fi
    psql_on "$p" "$database" "CREATE EXTENSION IF NOT EXISTS citus"
  done
  local coordinator
  coordinator=$(node_port 0)
  psql_on "$coordinator" "$database" "SELECT citus_set_coordinator_host('127.0.0.1', $coordinator)" >/dev/null
  for i in 1 2; do
    psql_on "$coordinator" "$database" \
      "SELECT citus_add_node('127.0.0.1', $(node_port "$i")) WHERE NOT EXISTS (SELECT FROM pg_dist_node WHERE nodeport = $(node_port "$i"))" >/dev/null
  done
  echo "postgres://postgres@127.0.0.1:$coordinator/$database"
}

stop() {
  for i in 2 1 0; do
    local data="$dir/${nodes[$i]}"
    [ -f "$data/PG_VERSION" ] || continue
    as_owner "$pg_bin/pg_ctl" -D "$data" -m fast -w stop >/dev/null 2>&1 || true
  done
}

status() {
  for i in 0 1 2; do
    local data="$dir/${nodes[$i]}"
    printf '%-12s port %s: ' "${nodes[$i]}" "$(node_port "$i")"
    if [ -f "$data/PG_VERSION" ] && as_owner "$pg_bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
      echo running
    else
      echo stopped
    fi
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  destroy) stop; rm -rf "$dir" ;;
  status) status ;;
  *) die "usage: $0 start|stop|destroy|status" ;;
esac
