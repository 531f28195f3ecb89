# CPU time read from /proc, in clock ticks (getconf CLK_TCK per second);
# sourced by cpu-per-call.sh and pgbench-cpu.sh so both count the same way.

# A process's user + system time.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# A process's user time alone.
user_ticks() { awk '{print $14}' "/proc/$1/stat"; }
# Every PostgreSQL process's user + system time, summed (a backend that
# exits between the two reads drops out: read over a window mid-run).
postgres_ticks() {
    for pid in $(pgrep -x postgres); do awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null; done |
        awk '{s += $1} END {print s + 0}'
}
