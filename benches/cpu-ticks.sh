# CPU time read from /proc, in clock ticks (getconf CLK_TCK per second);
# sourced by cpu-per-call.sh and pgbench-cpu.sh so both count the same way.

# A process's user + system time.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# The machine's busy time, all cores (user, nice, system, irq and softirq
# in /proc/stat), and its idle time (idle + iowait).
busy_ticks() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8}' /proc/stat; }
idle_ticks() { awk '/^cpu /{print $5 + $6}' /proc/stat; }
# A process's user time alone.
user_ticks() { awk '{print $14}' "/proc/$1/stat"; }
# The pid of the postmaster serving URL: the parent of its checkpointer,
# a process that lives as long as the cluster (reading another user's
# /proc/PID/stat needs no privilege).
postmaster_of() {
    local checkpointer
    checkpointer=$(psql -Atq "$1" -c "SELECT pid FROM pg_stat_activity WHERE backend_type = 'checkpointer'")
    awk '{print $4}' "/proc/$checkpointer/stat"
}
# The user + system time of a postmaster and every process it started,
# summed: the cluster being measured, not every PostgreSQL on the machine
# (a Citus cluster beside it opens and closes sessions of its own, and a
# process that exits inside the window would subtract its whole life's
# time). A backend that exits between pgrep and its read is skipped: under
# `set -o pipefail` the failed read would otherwise end the calling script,
# silently.
postgres_ticks() {
    for pid in "$1" $(pgrep -P "$1"); do awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || true; done |
        awk '{s += $1} END {print s + 0}'
}
