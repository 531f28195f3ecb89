#!/usr/bin/env bash
# The server's instructions per call, counted by valgrind's callgrind: the
# same build and workload give the same count to a fraction of a percent
# (seen: 569,304, 569,626 and 572,204 for resume, busy machine or not), where
# ops/s and CPU time drift by up to 2x on this shared machine, and the
# machine's VMs expose no hardware counters to `perf stat`. Use it to tell
# whether a small change to the server's per-call work helps:
#
#   benches/instructions-per-call.sh target/release resume
#   callgrind_annotate --inclusive=no /tmp/convo-callgrind/out.*   # where they go
#
# It serves the build under callgrind on a fresh database, drives the
# workload slowly (4 workers: callgrind runs the server about 50x slower),
# and counts only a window in the middle of the run: the counters are zeroed
# when it opens and dumped when it closes. Calls are the handler's own entries
# in that window (RPC, the handler method's name: resume_conversation for
# resume, list_conversations for list, list_messages for history,
# append_message for append), so the figure does not depend on how fast the
# run went. Counts only user-space instructions of the server: not the
# kernel's, not PostgreSQL's.
#
# Environment: SERVER (postgres://postgres@127.0.0.1:5432, without a
# database), BENCH (the build's own convo-bench), PORT (50996), RPC.
set -euo pipefail
bin="$1"; workload="$2"
server="${SERVER:-postgres://postgres@127.0.0.1:5432}"
bench="${BENCH:-$bin/convo-bench}"; port="${PORT:-50996}"
rpc="${RPC:-}"
if [ -z "$rpc" ]; then
    case "$workload" in
        resume | tool-resume) rpc=resume_conversation ;;
        list) rpc=list_conversations ;;
        history) rpc=list_messages ;;
        append | hot-append) rpc=append_message ;;
        *) echo "set RPC to the handler method to count for $workload" >&2; exit 2 ;;
    esac
fi
url="${server%/}/convo_instructions"
out=/tmp/convo-callgrind
rm -rf "$out"; mkdir -p "$out"
. "$(dirname "$0")/serve.sh"
fresh_database "$server" convo_instructions "$bin"
RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$out/out.%p" \
    "$bin/convo" serve --listen "127.0.0.1:$port" --database-url "$url" >/dev/null 2>"$out/valgrind.log" &
server_pid=$!
trap 'kill "$server_pid" 2>/dev/null || true' EXIT
wait_for_port "$port" 120 # callgrind starts the server slowly
"$bench" run --addr "http://127.0.0.1:$port" --workload "$workload" --database-url "$url" \
    --messages 1000 --workers 4 --connections 2 --warmup 20s --duration 40s >/dev/null &
bench_pid=$!
sleep 35 # seeding and warm-up, under callgrind
callgrind_control -z "$server_pid" >/dev/null 2>&1
sleep 20
callgrind_control -d "$server_pid" >/dev/null 2>&1
wait "$bench_pid"
python3 - "$rpc" "$out"/out.*.* <<'PY'
import re, sys
rpc, files = sys.argv[1], sys.argv[2:]
# A call is an entry into the handler method, or, where the build inlined
# it (LTO), into the request parser's method of the same name.
entries = [("<convo::grpc::handlers::ConversationApi as "
            f"convo::grpc::proto::conversation_service_server::ConversationService>::{rpc}"),
           f"convo::grpc::parse::Parser::{rpc}"]
total, counted = 0, dict.fromkeys(entries, 0)
for path in files:
    names, counting = {}, None
    for line in open(path):
        m = re.match(r"c?fn=\((\d+)\)(?: (.*))?$", line.rstrip("\n"))
        if m:
            if m.group(2):
                names[m.group(1)] = m.group(2)
            name = names.get(m.group(1))
            counting = name if line.startswith("cfn=") and name in counted else None
        elif line.startswith("calls=") and counting:
            counted[counting] += int(line.split("=")[1].split()[0])
            counting = None
        elif line.startswith("summary: "):
            total += int(line.split()[1])
calls = next((n for n in counted.values() if n), 0)
if not calls:
    sys.exit(f"no call of {rpc} in the window: is the workload's RPC {rpc}?")
print(f"{rpc}: {calls} calls, {total / calls:,.0f} server instructions per call")
PY
