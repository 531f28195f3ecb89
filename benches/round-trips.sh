#!/usr/bin/env bash
# Round trips to PostgreSQL per call of one RPC: serves a build with a pool
# of one session on a fresh database (TLS off, so the wire can be read),
# makes N calls from a Python client generated from proto/, and counts under
# strace the writes on that one session. Each write is a message batch the
# server then waits on, except a write holding only a Close (a statement
# dropped after use, its answer never awaited), which is not counted:
#
#   benches/round-trips.sh target/release create
#   benches/round-trips.sh /tmp/before-target/release fork 200
#
# RPCs: create, update, get, delete (a create and a delete per call), fork,
# truncate (an append and a truncate per call), erase, append, listmsg,
# search. Needs strace and python3; the client's venv is kept in
# /tmp/convo-round-trips. Environment: SERVER
# (postgres://postgres@127.0.0.1:5432, without a database), PORT (50777).
set -euo pipefail
bin="$1"; rpc="$2"; calls="${3:-200}"
server="${SERVER:-postgres://postgres@127.0.0.1:5432}"; port="${PORT:-50777}"
here="$(cd "$(dirname "$0")/.." && pwd)"
work=/tmp/convo-round-trips
if [ ! -x "$work/venv/bin/python" ]; then
    python3 -m venv "$work/venv"
    "$work/venv/bin/pip" -q install grpcio grpcio-tools protobuf
fi
mkdir -p "$work/gen"
(cd "$here/proto" && "$work/venv/bin/python" -m grpc_tools.protoc -I. --python_out="$work/gen" \
    --grpc_python_out="$work/gen" $(find . -name '*.proto'))
. "$(dirname "$0")/serve.sh"
url="${server%/}/convo_round_trips?sslmode=disable"
fresh_database "$server" convo_round_trips "$bin"
RUST_LOG=warn "$bin/convo" serve --listen "127.0.0.1:$port" --pool-size 1 --database-url "$url" \
    >/dev/null 2>&1 &
server_pid=$!
trace="$(mktemp)"
trap 'kill "$server_pid" 2>/dev/null || true; rm -f "$trace"' EXIT
wait_for_port "$port"
# The client sets up (a conversation of three messages), says "ready", waits
# for a line, then makes the calls.
cat >"$work/client.py" <<'PY'
import sys, grpc
from google.protobuf import field_mask_pb2
from convo.v1 import convo_pb2 as pb, convo_pb2_grpc as rpc
s = rpc.ConversationServiceStub(grpc.insecure_channel(sys.argv[1]))
what, n = sys.argv[2], int(sys.argv[3])
me = [("x-user-id", "round-trips")]
base = s.CreateConversation(pb.CreateConversationRequest(title="b"), metadata=me).id
for _ in range(3):
    s.AppendMessage(pb.AppendMessageRequest(conversation_id=base, role=1, content="x"), metadata=me)
def one(i):
    if what == "create": s.CreateConversation(pb.CreateConversationRequest(title="t"), metadata=me)
    elif what == "update": s.UpdateConversation(pb.UpdateConversationRequest(conversation_id=base, title=f"t{i}", update_mask=field_mask_pb2.FieldMask(paths=["title"])), metadata=me)
    elif what == "get": s.GetConversation(pb.GetConversationRequest(conversation_id=base), metadata=me)
    elif what == "delete":
        c = s.CreateConversation(pb.CreateConversationRequest(title="d"), metadata=me).id
        s.DeleteConversation(pb.DeleteConversationRequest(conversation_id=c), metadata=me)
    elif what == "fork": s.ForkConversation(pb.ForkConversationRequest(conversation_id=base), metadata=me)
    elif what == "truncate":
        s.AppendMessage(pb.AppendMessageRequest(conversation_id=base, role=1, content="y"), metadata=me)
        s.TruncateConversation(pb.TruncateConversationRequest(conversation_id=base, after_sequence=3), metadata=me)
    elif what == "erase": s.DeleteUserData(pb.DeleteUserDataRequest(), metadata=[("x-user-id", f"erased-{i}")])
    elif what == "append": s.AppendMessage(pb.AppendMessageRequest(conversation_id=base, role=1, content="y"), metadata=me)
    elif what == "listmsg": s.ListMessages(pb.ListMessagesRequest(conversation_id=base), metadata=me)
    elif what == "search": s.SearchMessages(pb.SearchMessagesRequest(query="x"), metadata=me)
    else: sys.exit(f"unknown RPC {what}")
one(0)  # the first call prepares what later calls reuse
print("ready"); input()
for i in range(1, n + 1): one(i)
PY
coproc CLIENT { PYTHONPATH="$work/gen" "$work/venv/bin/python" -u "$work/client.py" \
    "127.0.0.1:$port" "$rpc" "$calls"; }
read -r _ <&"${CLIENT[0]}"
strace -f -qq -e trace=sendto,write,writev -p "$server_pid" -o "$trace" &
tracer=$!
sleep 1
echo >&"${CLIENT[1]}"
wait "$CLIENT_PID"
sleep 0.5; kill "$tracer"; wait "$tracer" 2>/dev/null || true
# The pool's session is the one socket whose writes begin with a frontend
# message (Q, P, B, C); the gRPC connection's writes do not.
python3 - "$rpc" "$calls" "$trace" <<'PY'
import collections, re, sys
rpc, n, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
by_fd = collections.defaultdict(collections.Counter)
for line in open(path):
    m = re.search(r'(?:sendto|write|writev)\((\d+), \[?\{?(?:iov_base=)?"(.)', line)
    if not m or m.group(2) not in "QPBC":
        continue
    # A Close followed by a Sync and nothing else: not waited for.
    if re.search(r'"C\\0\\0\\0[^"]*\\0S\\0\\0\\0\\4"', line):
        continue
    by_fd[m.group(1)][m.group(2)] += 1
fd, kinds = max(by_fd.items(), key=lambda item: sum(item[1].values()))
total = sum(kinds.values())
detail = ", ".join(f"{k} {v / n:.2f}" for k, v in sorted(kinds.items()))
print(f"{rpc}: {total / n:.2f} round trips to PostgreSQL per call ({detail}; first byte of each write)")
PY
