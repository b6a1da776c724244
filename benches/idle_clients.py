#!/usr/bin/env python3
"""Opens N idle PostgreSQL client connections (trust auth, plain startup) and holds them until stdin closes.

Usage: idle_clients.py PORT N   (prints "ready N" once every connection got ReadyForQuery)
"""
import resource
import socket
import struct
import sys

port, n = int(sys.argv[1]), int(sys.argv[2])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
body = struct.pack("!i", 196608) + b"user\0postgres\0database\0postgres\0\0"
startup = struct.pack("!i", len(body) + 4) + body


def ready(s):
    buf = b""
    while True:
        while len(buf) < 5:
            chunk = s.recv(65536)
            if not chunk:
                raise SystemExit("connection closed during startup")
            buf += chunk
        t, ln = buf[0:1], struct.unpack("!i", buf[1:5])[0]
        while len(buf) < 1 + ln:
            buf += s.recv(65536)
        if t == b"E":
            raise SystemExit("error: %r" % buf[5 : 1 + ln])
        buf = buf[1 + ln :]
        if t == b"Z":
            return


conns = []
while len(conns) < n:
    batch = [socket.create_connection(("127.0.0.1", port)) for _ in range(min(500, n - len(conns)))]
    for s in batch:
        s.sendall(startup)
    for s in batch:
        ready(s)
    conns.extend(batch)
print("ready", len(conns), flush=True)
sys.stdin.read()
