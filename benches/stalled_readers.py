#!/usr/bin/env python3
"""Clients that ask and never read: the server's memory under stalled readers.

Seeds (in the database directly) one conversation per user of MESSAGES
messages of SIZE bytes, then opens, over raw HTTP/2 connections that never
read a byte after sending:
  - LISTS ListMessages calls for a page of 1,000 each, and
  - WATCHERS WatchConversation streams (at most 100 per user, the default cap),
    after which the script appends APPENDS more large messages through the
    database and the server's own API so every watcher has data to push.
It samples the server's resident memory (VmRSS, and VmHWM, the peak) from
/proc while the stalled clients hold on, then closes them and samples again.

Usage: benches/stalled_readers.py --pid PID --addr 127.0.0.1:50051 \
         --database-url postgres://... [--lists 200] [--watchers 1000]
Needs the `h2` package (pip install h2) and psql.
"""

import argparse
import socket
import subprocess
import time
import uuid

import h2.config
import h2.connection


def varint(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field_string(number, text):
    data = text.encode()
    return varint(number << 3 | 2) + varint(len(data)) + data


def field_varint(number, value):
    return varint(number << 3) + varint(value)


def grpc_frame(message):
    return b"\x00" + len(message).to_bytes(4, "big") + message


class StalledConnection:
    """One HTTP/2 connection whose reader never reads after the requests."""

    def __init__(self, host, port):
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.sock.sendall(self.conn.data_to_send())
        self.host = f"{host}:{port}"

    def call(self, method, user, message):
        stream = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            stream,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", f"/convo.v1.ConversationService/{method}"),
                (":authority", self.host),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                ("x-user-id", user),
            ],
        )
        self.conn.send_data(stream, grpc_frame(message), end_stream=True)
        self.sock.sendall(self.conn.data_to_send())

    def close(self):
        self.sock.close()


def psql(url, sql):
    subprocess.run(
        ["psql", "-q", url, "-c", "SET client_min_messages = warning", "-c", sql],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def memory(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) // 1024
    return f"RSS {fields['VmRSS']} MiB (peak {fields['VmHWM']} MiB)"


def seed(url, user, conversation, messages, size):
    psql(
        url,
        f"INSERT INTO users (user_id) VALUES ('{user}') ON CONFLICT DO NOTHING; "
        f"INSERT INTO conversations (user_id, id, title, create_time, update_time, message_count) "
        f"VALUES ('{user}', '{conversation}', 'stalled', now(), now(), {messages}); "
        f"INSERT INTO messages (user_id, conversation_id, sequence, id, role, content, create_time, "
        f"                      bytes_through) "
        f"SELECT '{user}', '{conversation}', s, gen_random_uuid(), 1, "
        f"       left(repeat(md5(s::text), {size // 32 + 1}), {size}), now(), {size} * s "
        f"  FROM generate_series(1, {messages}) AS s; "
        f"UPDATE conversations SET total_bytes = {size} * {messages} "
        f" WHERE user_id = '{user}' AND id = '{conversation}'",
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--addr", default="127.0.0.1:50051")
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--lists", type=int, default=200)
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--appends", type=int, default=20)
    parser.add_argument("--hold", type=float, default=10.0)
    parser.add_argument("--calls-per-connection", type=int, default=5)
    args = parser.parse_args()
    host, port = args.addr.rsplit(":", 1)
    port = int(port)
    run = uuid.uuid4().hex[:8]

    print(f"idle: {memory(args.pid)}")
    connections = []
    if args.lists:
        user, conversation = f"stalled-list-{run}", str(uuid.uuid4())
        seed(args.database_url, user, conversation, args.messages, args.size)
        request = field_string(1, conversation) + field_varint(2, 1000)
        for i in range(args.lists):
            if i % args.calls_per_connection == 0:
                connections.append(StalledConnection(host, port))
            connections[-1].call("ListMessages", user, request)
        time.sleep(args.hold)
        print(
            f"{args.lists} unread ListMessages pages of 1,000 x {args.size} B, "
            f"{args.calls_per_connection} per connection: {memory(args.pid)}"
        )

    if args.watchers:
        users = []
        for u in range((args.watchers + 99) // 100):
            user, conversation = f"stalled-watch-{run}-{u}", str(uuid.uuid4())
            seed(args.database_url, user, conversation, args.appends, args.size)
            users.append((user, conversation))
        for i in range(args.watchers):
            if i % 100 == 0:
                connections.append(StalledConnection(host, port))
            user, conversation = users[i // 100]
            connections[-1].call("WatchConversation", user, field_string(1, conversation))
        time.sleep(args.hold)
        print(
            f"{args.watchers} unread watch streams, {args.appends} x {args.size} B "
            f"each to send: {memory(args.pid)}"
        )

    for connection in connections:
        connection.close()
    time.sleep(args.hold)
    print(f"after the clients left: {memory(args.pid)}")


if __name__ == "__main__":
    main()
