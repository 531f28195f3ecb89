# Sourced by the bench scripts that serve a build of convo on a database of
# their own: the two steps each of them takes before it measures anything.

# fresh_database SERVER NAME BIN: drops database NAME on SERVER (a URL
# without a database), creates it again and applies BIN's migrations to it,
# so that no run reads what an earlier one left.
fresh_database() {
    local server="${1%/}" name="$2" bin="$3"
    psql -q "$server/postgres" -c "DROP DATABASE IF EXISTS $name" -c "CREATE DATABASE $name"
    "$bin/convo" migrate --database-url "$server/$name" >/dev/null 2>&1
}

# wait_for_port PORT [SECONDS] [LOG]: returns once something accepts
# connections on 127.0.0.1:PORT, as a server does once it serves; fails after
# SECONDS (10) rather than measure a server that never started, printing the
# end of the server's LOG when given one.
wait_for_port() {
    local deadline=$((SECONDS + ${2:-10}))
    until (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "nothing listens on 127.0.0.1:$1 after ${2:-10} s" >&2
            if [ -n "${3:-}" ]; then tail -n 20 "$3" >&2; fi
            return 1
        fi
        sleep 0.1
    done
}
