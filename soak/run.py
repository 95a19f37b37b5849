#!/usr/bin/env python3
"""Soak and fault-injection suite for gafferd.

Every scenario starts a fresh ``python3 gafferd.py CONFIG`` in a temporary
directory (``bind = 127.0.0.1:0``, port read from the ``listening on``
log line), attacks it, checks the invariants of soak/README.md and prints its
figures::

    python3 soak/run.py              # full version of every scenario
    python3 soak/run.py --short      # CI version (all of them < 5 minutes)
    python3 soak/run.py --only 1,3   # some scenarios
    python3 soak/run.py --json out.json

Scenarios: 1 crash storm, 2 scale, 3 HTTP churn, 4 stream pressure,
5 reload storm, 6 hostile children, 7 resource exhaustion, 8 last output
of a crashing process, 9 hostile connections.

Invariants checked after every scenario:

* no zombie child of the daemon;
* the daemon's open fd count back to its baseline (fds a scenario keeps
  on purpose are allowed and named);
* RSS back within 10 % (+ 2 MB of interpreter slack) of its baseline,
  measured after a warm-up;
* every template at its target count, or in the state its policy says;
* ``/ping`` answers in under 100 ms during the load (p99) and after it;
* no ``Traceback`` in the daemon's stderr;
* on SIGTERM every process it started (found by a token in the
  environment every child inherits, and by the ``spawn`` events of
  ``/watch``) is gone within ``graceful_timeout`` + 1 s, and the daemon
  exits with status 0.

Standard library only.  The load clients (pings, /watch, the Linux proc
connector, HTTP churn, stream subscribers) run as worker processes of
this same script (``run.py --worker KIND PARAMS``) so that they do not
share a GIL with each other or with the measurements.  The child
programs the scenarios supervise are written into the temporary
directory.  Needs Linux (/proc); scenario 7 uses ``prlimit`` and, as
root, a 1 MB tmpfs (simulated with /dev/full otherwise).
"""

import argparse
import base64
import collections
import hashlib
import http.client
import json
import os
import queue
import random
import re
import resource
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
THIS = os.path.abspath(__file__)
GAFFERD = os.path.join(REPO, "gafferd.py")
PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 1024 * 1024

PING_LIMIT_MS = 100.0
RSS_RATIO = 1.10
RSS_SETTLE = 5.0

SCENARIOS = collections.OrderedDict()


def log(msg, *args):
    text = msg % args if args else msg
    sys.stderr.write("[soak %s] %s\n" % (time.strftime("%H:%M:%S"), text))
    sys.stderr.flush()


def percentile(values, p):
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def fmt_ms(v):
    return "n/a" if v is None else "%.1f ms" % v


def wait_until(pred, timeout, interval=0.05):
    """Poll ``pred`` until truthy (returned) or ``timeout`` (returns the
    last falsy value)."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


# ---------------------------------------------------------------------------
# /proc
# ---------------------------------------------------------------------------

def proc_stat(pid):
    """Fields of /proc/PID/stat after the comm (index 0 = state) or None."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2:].split()


def cpu_ticks(pid):
    f = proc_stat(pid)
    return int(f[11]) + int(f[12]) if f else 0


def start_time(pid):
    f = proc_stat(pid)
    return int(f[19]) if f else None


def rss_bytes(pid):
    f = proc_stat(pid)
    return int(f[21]) * PAGE if f else 0


def fd_count(pid):
    try:
        return len(os.listdir("/proc/%d/fd" % pid))
    except OSError:
        return -1


def fd_targets(pid):
    out = []
    try:
        for fd in os.listdir("/proc/%d/fd" % pid):
            try:
                out.append(os.readlink("/proc/%d/fd/%s" % (pid, fd)))
            except OSError:
                pass
    except OSError:
        pass
    return sorted(out)


def cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def all_pids():
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def children_of(ppid, zombies=False):
    """Children of ``ppid``: live ones, or zombies only."""
    out = []
    for pid in all_pids():
        f = proc_stat(pid)
        if f and int(f[1]) == ppid and (f[0] == b"Z") == zombies:
            out.append(pid)
    return out


def alive(pid, stime=None):
    """True if ``pid`` exists, is not a zombie and (if given) has that
    start time (so a reused pid does not count)."""
    f = proc_stat(pid)
    if f is None or f[0] in (b"Z", b"X"):
        return False
    return stime is None or int(f[19]) == stime


def token_procs(token, exclude=()):
    """{pid: start time} of every live process whose environment holds
    SOAK_TOKEN=<token> (everything a daemon started inherits it)."""
    needle = ("SOAK_TOKEN=%s\0" % token).encode()
    found = {}
    for pid in all_pids():
        if pid in exclude:
            continue
        try:
            with open("/proc/%d/environ" % pid, "rb") as f:
                env = f.read()
        except OSError:
            continue
        if needle in env + b"\0":
            f = proc_stat(pid)
            if f is not None and f[0] not in (b"Z", b"X"):
                found[pid] = int(f[19])
    return found


def nofile_limits(pid):
    try:
        with open("/proc/%d/limits" % pid) as f:
            for line in f:
                if line.startswith("Max open files"):
                    parts = line.split()
                    return int(parts[3]), int(parts[4])
    except (OSError, ValueError, IndexError):
        pass
    return None


# ---------------------------------------------------------------------------
# wire helpers (raw HTTP, chunked decoding, websocket, records)
# ---------------------------------------------------------------------------

def read_head(sock, buf=b"", timeout=10.0):
    """Read a response head; return (status, headers, rest of data)."""
    deadline = time.monotonic() + timeout
    while b"\r\n\r\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("no response head")
        sock.settimeout(left)
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed before the response head (%r)" % buf[:100])
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, rest


def raw_get(port, path, timeout=10.0):
    """GET with Connection: close on a new socket; (status, body)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n"
                   % (path, port)).encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, body


def ping_once(port, timeout=5.0):
    """One liveness probe on a fresh connection: (ms, error or None)."""
    t = time.perf_counter()
    try:
        status, body = raw_get(port, "/ping", timeout)
        err = None if status == 200 and body == b"OK" else "status %s body %r" % (status, body[:60])
    except OSError as exc:
        err = repr(exc)
    return (time.perf_counter() - t) * 1000.0, err


class ChunkDecoder:
    """Incremental decoder of the chunked transfer coding."""

    def __init__(self):
        self.buf = bytearray()
        self.left = 0
        self.state = "size"
        self.ended = False

    def feed(self, data):
        buf = self.buf
        buf += data
        out = []
        while not self.ended:
            if self.state == "size":
                i = buf.find(b"\r\n")
                if i < 0:
                    if len(buf) > 1024:
                        raise ValueError("chunk size line too long: %r" % bytes(buf[:40]))
                    break
                size = int(bytes(buf[:i]).split(b";")[0].strip(), 16)
                del buf[:i + 2]
                if size == 0:
                    self.state = "trailer"
                else:
                    self.left, self.state = size, "data"
            elif self.state == "data":
                if not buf:
                    break
                take = min(self.left, len(buf))
                out.append(bytes(buf[:take]))
                del buf[:take]
                self.left -= take
                if not self.left:
                    self.state = "crlf"
            elif self.state == "crlf":
                if len(buf) < 2:
                    break
                if buf[:2] != b"\r\n":
                    raise ValueError("chunk not followed by CRLF: %r" % bytes(buf[:20]))
                del buf[:2]
                self.state = "size"
            else:
                i = buf.find(b"\r\n")
                if i < 0:
                    break
                del buf[:i + 2]
                if i == 0:
                    self.ended = True
        return out


def ws_connect(port, path, timeout=10.0, rcvbuf=None):
    """RFC 6455 client handshake; returns (socket, leftover bytes)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(timeout)
    s.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
               % (path, port, key)).encode())
    status, headers, rest = read_head(s, timeout=timeout)
    expect = base64.b64encode(hashlib.sha1(
        (key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
    if status != 101 or headers.get("sec-websocket-accept") != expect:
        s.close()
        raise ConnectionError("websocket handshake failed: %s %r" % (status, headers))
    return s, rest


def ws_client_frame(opcode, payload=b""):
    """A masked client frame."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


class WSDecoder:
    """Incremental decoder of (unmasked) server frames: feed() returns
    [(opcode, fin, payload)]."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data):
        buf = self.buf
        buf += data
        out = []
        while len(buf) >= 2:
            b0, b1 = buf[0], buf[1]
            if b1 & 0x80:
                raise ValueError("server frame is masked")
            n, pos = b1 & 0x7F, 2
            if n == 126:
                if len(buf) < 4:
                    break
                n, pos = struct.unpack("!H", bytes(buf[2:4]))[0], 4
            elif n == 127:
                if len(buf) < 10:
                    break
                n, pos = struct.unpack("!Q", bytes(buf[2:10]))[0], 10
            if len(buf) < pos + n:
                break
            out.append((b0 & 0x0F, bool(b0 & 0x80), bytes(buf[pos:pos + n])))
            del buf[:pos + n]
        return out


REC = 4096
REC_TAIL = bytes(97 + (i * 7) % 26 for i in range(10, REC - 1)) + b"\n"


class RecordVerifier:
    """Checks a stream of the producer's 4 KiB records: ``R%09d`` + fixed
    filler, then one ``E%09d`` (the record count) at the end.  The first
    (partial) record is skipped; after that no byte may be missing."""

    def __init__(self):
        self.buf = bytearray()
        self.synced = False
        self.expect = None
        self.first = None
        self.records = 0
        self.bytes = 0
        self.errors = []
        self.end = None          # count announced by the end record

    def feed(self, data):
        self.bytes += len(data)
        buf = self.buf
        buf += data
        if not self.synced and buf[:10] == b"R000000000":
            self.synced = True                  # the very first record
        if not self.synced:
            i = buf.find(b"\nR")
            if i < 0:
                i = buf.find(b"\nE")
                if i < 0:
                    if len(buf) > 2 * REC:
                        del buf[:-REC]
                    return
            del buf[:i + 1]
            self.synced = True
        pos, n = 0, len(buf)
        while n - pos >= REC and self.end is None:
            kind = buf[pos]
            try:
                seq = int(bytes(buf[pos + 1:pos + 10]))
            except ValueError:
                seq = None
            if kind == 0x52 and seq is not None and buf[pos + 10:pos + REC] == REC_TAIL:
                if self.expect is not None and seq != self.expect:
                    if len(self.errors) < 5:
                        self.errors.append("gap: record %s after %s" % (seq, self.expect - 1))
                if self.first is None:
                    self.first = seq
                self.expect = seq + 1
                self.records += 1
            elif kind == 0x45 and seq is not None:
                self.end = seq
                if self.expect is not None and seq != self.expect:
                    self.errors.append("end record says %d records, last seen %s"
                                       % (seq, self.expect - 1))
            else:
                if len(self.errors) < 5:
                    self.errors.append("corrupt record at byte %d: %r"
                                       % (self.bytes - (n - pos), bytes(buf[pos:pos + 40])))
                # resynchronise on the next record start
                j = buf.find(b"\nR", pos + 1)
                if j < 0:
                    pos = n
                    break
                pos = j + 1
                self.expect = None
                continue
            pos += REC
        del buf[:pos]


# ---------------------------------------------------------------------------
# workers (``run.py --worker KIND PARAMS``): stop on "stop" or EOF on stdin,
# print one JSON line with their results
# ---------------------------------------------------------------------------

STOP = threading.Event()
COMMANDS = queue.Queue()


def _stdin_reader():
    for line in sys.stdin:
        line = line.strip()
        if line == "stop":
            break
        COMMANDS.put(line)
    STOP.set()


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def ready():
    sys.stdout.write("READY\n")
    sys.stdout.flush()


def worker_ping(p):
    """Liveness probes every ``interval`` seconds on fresh connections.
    With ``refusable``, a connection closed unanswered (what the daemon
    does with one it accepts while out of file descriptors) is counted as
    refused, not failed."""
    lat, fails, slow, refused = [], [], [], 0
    ready()
    while not STOP.is_set():
        when = time.time()
        ms, err = ping_once(p["port"])
        stamp = time.strftime("%H:%M:%S", time.localtime(when)) + ",%03d" % (when % 1 * 1000)
        if err and p.get("refusable") and (err.startswith("ConnectionResetError")
                                           or err == "status 0 body b''"):
            refused += 1
        elif err:
            fails.append("%s %.0f ms: %s" % (stamp, ms, err))
        else:
            lat.append(ms)
            if ms > p.get("limit", PING_LIMIT_MS):
                slow.append("%s %.0f ms" % (stamp, ms))
        STOP.wait(p["interval"])
    emit({"lat": lat, "fails": fails[:20], "nfails": len(fails), "slow": slow[:20],
          "refused": refused})


def worker_watch(p):
    """GET /watch?feed=continuous; keeps the raw bytes, parses at the end
    (after it saw the create event of ``__sentinel__``, or EOF)."""
    s = socket.create_connection(("127.0.0.1", p["port"]), timeout=10)
    s.sendall(("GET /watch?feed=continuous&heartbeat=0 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n"
               % p["port"]).encode())
    status, headers, rest = read_head(s)
    if status != 200:
        emit({"error": "watch status %d" % status})
        return
    ready()
    dec = ChunkDecoder()
    body = bytearray()
    for piece in dec.feed(rest):
        body += piece
    s.settimeout(0.2)
    stop_deadline = None
    eof = False
    sentinel = b'"__sentinel__"'
    seen = False
    while True:
        if STOP.is_set() and stop_deadline is None:
            stop_deadline = time.monotonic() + 15.0
        if stop_deadline is not None and (seen or time.monotonic() > stop_deadline):
            break
        try:
            data = s.recv(1 << 20)
        except socket.timeout:
            continue
        except OSError:
            data = b""
        if not data:
            eof = True
            if stop_deadline is None:
                STOP.wait()
            break
        start = max(0, len(body) - len(sentinel))
        for piece in dec.feed(data):
            body += piece
        if sentinel in body[start:]:
            seen = True
    events, bad = [], 0
    for line in bytes(body).split(b"\n"):
        line = line.strip()
        if not line:
            continue
        try:
            events.append(json.loads(line.decode()))
        except ValueError:
            bad += 1
    emit({"events": events, "bad_lines": bad, "eof": eof, "ended": dec.ended})


NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
PROC_EVENT_FORK = 0x1
PROC_EVENT_EXIT = 0x80000000


def worker_netlink(p):
    """Linux proc connector: kernel timestamps (CLOCK_MONOTONIC ns) of
    every fork by the daemon and of the exit of those children."""
    daemon = p["pid"]
    try:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
        try:
            s.setsockopt(socket.SOL_SOCKET, 33, 16 * MB)     # SO_RCVBUFFORCE
        except OSError:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * MB)
        s.bind((os.getpid(), CN_IDX_PROC))
        op = struct.pack("I", 1)                                  # PROC_CN_MCAST_LISTEN
        cn = struct.pack("IIIIHH", CN_IDX_PROC, 1, 0, 0, len(op), 0) + op
        s.send(struct.pack("IHHII", 16 + len(cn), 3, 0, 0, os.getpid()) + cn)
    except OSError as exc:
        ready()
        STOP.wait()
        emit({"error": "proc connector unavailable: %s" % exc})
        return
    s.settimeout(0.2)
    forks, exits = {}, {}
    overruns = 0
    ready()
    while not STOP.is_set():
        try:
            data = s.recv(65536)
        except socket.timeout:
            continue
        except OSError:
            overruns += 1          # ENOBUFS: events were lost
            continue
        off = 0
        while off + 16 <= len(data):
            length = struct.unpack_from("I", data, off)[0]
            if length < 16:
                break
            if length >= 16 + 20 + 16:
                what, _cpu, ts = struct.unpack_from("IIQ", data, off + 36)
                if what == PROC_EVENT_FORK:
                    _ppid, ptgid, cpid, ctgid = struct.unpack_from("IIII", data, off + 52)
                    if ptgid == daemon and cpid == ctgid:
                        forks[cpid] = ts
                elif what == PROC_EVENT_EXIT:
                    pid, tgid = struct.unpack_from("II", data, off + 52)
                    if pid == tgid and pid in forks:
                        exits[pid] = ts
            off += (length + 3) & ~3
    emit({"forks": forks, "exits": exits, "overruns": overruns})


def worker_churn(p):
    """``n`` connections opened and closed: full requests, bare
    connect/close, and request lines cut short."""
    port, n = p["port"], p["n"]
    counts = collections.Counter()
    errors = []
    lat = []
    ready()
    for i in range(n):
        if STOP.is_set():
            break
        kind = i % 4
        t = time.perf_counter()
        try:
            if kind in (0, 1):
                path = "/ping" if kind == 0 else "/status/churn"
                status, body = raw_get(port, path, 10)
                if status != 200:
                    counts["bad_status"] += 1
                    if len(errors) < 10:
                        errors.append("%s -> %s %r" % (path, status, body[:100]))
                else:
                    counts["ok"] += 1
                lat.append((time.perf_counter() - t) * 1000)
            elif kind == 2:
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                s.close()
                counts["bare"] += 1
            else:
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                s.sendall(b"GET /stat")
                s.close()
                counts["cut_line"] += 1
        except OSError as exc:
            counts["error"] += 1
            if len(errors) < 10:
                errors.append("connection %d (kind %d): %r" % (i, kind, exc))
    emit({"counts": counts, "errors": errors, "p50": percentile(lat, 50),
          "p99": percentile(lat, 99), "max": max(lat) if lat else None})


def _closed_by_peer(s):
    """True if the peer closed ``s`` (never blocks)."""
    s.setblocking(False)
    try:
        data = s.recv(1, socket.MSG_PEEK)
        return data == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def worker_idle(p):
    """``n`` keep-alive connections: one request each, then idle."""
    port, n = p["port"], p["n"]
    socks, errors = [], []
    for i in range(n):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(("GET /ping HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % port).encode())
            status, headers, rest = read_head(s)
            need = int(headers.get("content-length", "0")) - len(rest)
            while need > 0:
                need -= len(s.recv(need))
            if status != 200:
                errors.append("idle %d: status %d" % (i, status))
            socks.append(s)
        except OSError as exc:
            errors.append("idle %d: %r" % (i, exc))
    ready()
    STOP.wait()
    closed = sum(1 for s in socks if _closed_by_peer(s))
    for s in socks:
        s.close()
    emit({"opened": len(socks), "closed_by_server": closed, "errors": errors[:10],
          "nerrors": len(errors)})


def worker_loris(p):
    """``n`` slow-loris clients: a never-ending header, one byte a second."""
    port, n = p["port"], p["n"]
    text = b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Loris: " + b"z" * 100000
    conns, errors = [], []
    for i in range(n):
        try:
            conns.append([socket.create_connection(("127.0.0.1", port), timeout=10), 0, None])
        except OSError as exc:
            errors.append(repr(exc))
    ready()
    t0 = time.monotonic()
    while not STOP.is_set():
        for c in conns:
            if c[2] is not None:
                continue
            try:
                if _closed_by_peer(c[0]):
                    raise ConnectionError("closed")
                c[0].send(text[c[1]:c[1] + 1])
                c[1] += 1
            except OSError:
                c[2] = time.monotonic() - t0
        STOP.wait(p.get("interval", 1.0))
    closed = [round(c[2], 1) for c in conns if c[2] is not None]
    for c in conns:
        c[0].close()
    emit({"opened": len(conns), "closed_by_server": len(closed),
          "closed_after_s": sorted(closed)[:5], "sent_bytes_max": max([c[1] for c in conns] or [0]),
          "errors": errors[:10]})


def worker_cutbody(p):
    """``n`` requests whose bodies are cut short (close, or half-close and
    read what the daemon says)."""
    port, n = p["port"], p["n"]
    counts = collections.Counter()
    anomalies = []
    ready()
    for i in range(n):
        if STOP.is_set():
            break
        method = ("POST /processes", "PUT /processes/churn", "POST /streams/1/stdin")[i % 3]
        body = json.dumps({"name": "cut%d" % i, "cmd": "sleep", "args": ["1000"]}).encode()
        head = ("%s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
                "Content-Length: %d\r\n\r\n" % (method, port, len(body) + 100)).encode()
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(head + body[:len(body) // 2])
            if i % 2:
                s.close()
                counts["closed"] += 1
                continue
            s.shutdown(socket.SHUT_WR)
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            s.close()
            if data.startswith(b"HTTP/1.1 2"):
                anomalies.append("cut body answered %r" % data[:80])
            counts["half_closed:" + (data[9:12].decode() if data else "close")] += 1
        except OSError as exc:
            counts["error"] += 1
            if len(anomalies) < 10:
                anomalies.append("request %d: %r" % (i, exc))
    emit({"counts": counts, "anomalies": anomalies[:10], "nanomalies": len(anomalies)})


def worker_requests(p):
    """Requests in a loop (keep-alive and fresh connections); every reply
    must be 2xx."""
    port, paths = p["port"], p["paths"]
    counts = collections.Counter()
    failures = []
    conn = None
    ready()
    i = 0
    lat = []
    while not STOP.is_set():
        method, path = paths[i % len(paths)]
        i += 1
        t = time.perf_counter()
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request(method, path, body=b"" if method == "POST" else None)
            resp = conn.getresponse()
            data = resp.read()
            if not 200 <= resp.status < 300:
                counts["fail"] += 1
                if len(failures) < 10:
                    failures.append("%s %s -> %d %r" % (method, path, resp.status, data[:200]))
            else:
                counts["ok"] += 1
            if i % 7 == 0:
                conn.close()
                conn = None
        except (OSError, http.client.HTTPException) as exc:
            counts["fail"] += 1
            if len(failures) < 10:
                failures.append("%s %s -> %r" % (method, path, exc))
            conn = None
        lat.append((time.perf_counter() - t) * 1000)
    emit({"counts": counts, "failures": failures, "p99": percentile(lat, 99),
          "max": max(lat) if lat else None})


def worker_subs(p):
    """Stream pressure subscribers: ``subs`` = [{"id", "kind": "stream"|"ws",
    "stalled": bool}].  Good ones read and verify everything; stalled
    ones stop reading after the head until the "drain" command."""
    port = p["port"]
    sel = selectors.DefaultSelector()
    subs = []
    for spec in p["subs"]:
        sub = dict(spec, bytes=0, ended=False, eof=False, error=None, ver=RecordVerifier(),
                   closed_by="", t_end=None)
        try:
            if spec["kind"] == "ws":
                s, rest = ws_connect(port, "/wstreams/%d" % spec["id"],
                                     rcvbuf=4096 if spec["stalled"] else None)
                sub["dec"] = WSDecoder()
            else:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                if spec["stalled"]:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.settimeout(10)
                s.connect(("127.0.0.1", port))
                s.sendall(("GET /streams/%d/stdout?feed=continuous&heartbeat=0 HTTP/1.1\r\n"
                           "Host: 127.0.0.1:%d\r\n\r\n" % (spec["id"], port)).encode())
                status, headers, rest = read_head(s)
                if status != 200:
                    raise ConnectionError("stream status %d" % status)
                sub["dec"] = ChunkDecoder()
        except OSError as exc:
            sub["error"] = "connect: %r" % exc
            subs.append(sub)
            continue
        sub["sock"] = s
        s.setblocking(False)
        _sub_feed(sub, rest)
        if not spec["stalled"]:
            sel.register(s, selectors.EVENT_READ, sub)
        subs.append(sub)
    ready()
    t0 = time.monotonic()
    drain = False
    while True:
        try:
            cmd = COMMANDS.get_nowait()
            if cmd == "drain":
                drain = True
                drain_deadline = time.monotonic() + p.get("drain_timeout", 60.0)
        except queue.Empty:
            pass
        if STOP.is_set():
            break
        if drain:
            # stalled ones: read what is left now (the daemon should have
            # closed them); good ones: wait for their end
            for sub in subs:
                if sub["stalled"] and "sock" in sub and not sub.get("drained"):
                    sub["drained"] = True
                    sel.register(sub["sock"], selectors.EVENT_READ, sub)
            if not sel.get_map() or time.monotonic() > drain_deadline:
                break
        for key, _ in sel.select(0.1):
            sub = key.data
            try:
                data = sub["sock"].recv(1 << 20)
            except BlockingIOError:
                continue
            except OSError as exc:
                data = b""
                sub["error"] = sub["error"] or "recv: %r" % exc
            if not data:
                sub["eof"] = True
            else:
                _sub_feed(sub, data)
            if sub["eof"] or sub["ended"]:
                sub["t_end"] = time.monotonic() - t0
                sel.unregister(sub["sock"])
    out = []
    for sub in subs:
        ver = sub["ver"]
        out.append({"id": sub["id"], "kind": sub["kind"], "stalled": sub["stalled"],
                    "bytes": ver.bytes, "records": ver.records, "first": ver.first,
                    "end": ver.end, "errors": ver.errors, "ended": sub["ended"],
                    "eof": sub["eof"], "error": sub["error"], "t_end": sub["t_end"]})
        if "sock" in sub:
            sub["sock"].close()
    emit({"subs": out})


def _sub_feed(sub, data):
    if not data:
        return
    if sub["kind"] == "ws":
        for opcode, fin, payload in sub["dec"].feed(data):
            if opcode in (0, 1, 2):
                sub["ver"].feed(payload)
            elif opcode == 8:
                sub["ended"] = True
                try:
                    sub["sock"].send(ws_client_frame(8, payload[:2]))
                except OSError:
                    pass
            elif opcode == 9:
                try:
                    sub["sock"].send(ws_client_frame(10, payload))
                except OSError:
                    pass
    else:
        for piece in sub["dec"].feed(data):
            sub["ver"].feed(piece)
        if sub["dec"].ended:
            sub["ended"] = True


def _tcp_state(s):
    """The kernel's TCP state of ``s`` (1 = established); it tells when
    the daemon closed a connection without reading from it (a read would
    make progress for the daemon and move its deadline)."""
    try:
        return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    except OSError:
        return 7                                     # TCP_CLOSE


def worker_pipeline(p):
    """``n`` connections that pipeline requests as fast as the daemon
    takes them and never read a reply, until the daemon closes them.
    Reports the bytes each got in, and how long after its last byte went
    in the daemon closed it.  A small receive window (``rcvbuf``) makes the
    daemon's replies back up after a few hundred kilobytes instead of the
    megabytes loopback's autotuning would buffer for it.  It keeps
    trying to send (up to ``cap`` bytes, for ``max_s`` seconds at most):
    its last byte taken is the daemon's last read."""
    port, n = p["port"], p["n"]
    request = ("GET /ping HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % port).encode() * 400
    conns, errors = [], []
    for i in range(n):
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, p.get("rcvbuf", 16384))
            s.settimeout(10)
            s.connect(("127.0.0.1", port))
            s.setblocking(False)
            conns.append({"sock": s, "sent": 0, "last": time.monotonic(), "closed": None})
        except OSError as exc:
            errors.append(repr(exc))
    ready()
    t0 = time.monotonic()
    cap = p.get("cap", 12 * MB)          # a daemon that buffers all is not fed gigabytes
    while not STOP.is_set() and time.monotonic() - t0 < p.get("max_s", 120):
        for c in conns:
            if c["closed"] is not None:
                continue
            if c["sent"] >= cap:
                if _tcp_state(c["sock"]) != 1:
                    c["closed"] = time.monotonic()
                continue
            try:
                c["sent"] += c["sock"].send(request)
                c["last"] = time.monotonic()
                continue
            except BlockingIOError:
                if _tcp_state(c["sock"]) == 1:
                    continue
            except OSError:
                pass
            c["closed"] = time.monotonic()
        if all(c["closed"] is not None for c in conns):
            break
        STOP.wait(0.005)
    after = [c["closed"] - c["last"] for c in conns if c["closed"] is not None]
    for c in conns:
        c["sock"].close()
    emit({"opened": len(conns), "closed_by_server": len(after),
          "sent_total": sum(c["sent"] for c in conns), "sent_max": max([c["sent"] for c in conns] or [0]),
          "closed_after_max": max(after) if after else None,
          "closed_after_min": min(after) if after else None,
          "flood_s": max([c["last"] for c in conns] or [t0]) - t0, "errors": errors[:10]})


def worker_nohandshake(p):
    """``n`` TCP connections to a TLS endpoint that never send a byte;
    reports how long the daemon took to close each."""
    port, n = p["port"], p["n"]
    conns, errors = [], []
    t0 = time.monotonic()
    for i in range(n):
        try:
            conns.append([socket.create_connection(("127.0.0.1", port), timeout=10),
                          time.monotonic(), None])
        except OSError as exc:
            errors.append(repr(exc))
    ready()
    while not STOP.is_set() and any(c[2] is None for c in conns):
        for c in conns:
            if c[2] is None and _tcp_state(c[0]) != 1:
                c[2] = time.monotonic() - c[1]
        STOP.wait(0.05)
    closed = [c[2] for c in conns if c[2] is not None]
    for c in conns:
        c[0].close()
    emit({"opened": len(conns), "closed_by_server": len(closed),
          "closed_after_max": max(closed) if closed else None,
          "closed_after_min": min(closed) if closed else None,
          "connect_s": time.monotonic() - t0, "errors": errors[:10]})


WORKERS = {"ping": worker_ping, "watch": worker_watch, "netlink": worker_netlink,
           "churn": worker_churn, "idle": worker_idle, "loris": worker_loris,
           "cutbody": worker_cutbody, "requests": worker_requests, "subs": worker_subs,
           "pipeline": worker_pipeline, "nohandshake": worker_nohandshake}


def worker_main(kind, params):
    threading.Thread(target=_stdin_reader, daemon=True).start()
    try:
        WORKERS[kind](json.loads(params))
    except Exception:
        emit({"error": traceback.format_exc()})


class Worker:
    """A worker process of this script."""

    def __init__(self, sc, kind, **params):
        self.kind = kind
        if kind == "ping":
            params.setdefault("limit", PING_LIMIT_MS)
        self.errpath = os.path.join(sc.dir, "worker-%s-%d.err" % (kind, len(sc.workers)))
        self.err = open(self.errpath, "wb")
        self.proc = subprocess.Popen([PY, THIS, "--worker", kind, json.dumps(params)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err)
        self.result = None
        sc.workers.append(self)

    def wait_ready(self, timeout=60):
        out = []
        t = threading.Thread(target=lambda: out.append(self.proc.stdout.readline()), daemon=True)
        t.start()
        t.join(timeout)
        if not out or out[0].strip() != b"READY":
            raise Failure("worker %s did not get ready: %r %s" % (
                self.kind, out[:1], open(self.errpath, "rb").read()[-2000:]))
        return self

    def command(self, text):
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def stop(self, timeout=120, finish=False):
        """Stop the worker and return its result; ``finish``: let it end
        on its own (after a command) instead of sending "stop"."""
        if self.result is not None:
            return self.result
        if finish:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            self.proc.stdin.write(b"stop\n")
            self.proc.stdin.close()
        except (OSError, ValueError):
            pass
        self.proc.stdin = None
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        self.err.close()
        lines = [l for l in out.splitlines() if l.strip() and l.strip() != b"READY"]
        try:
            self.result = json.loads(lines[-1])
        except (IndexError, ValueError):
            self.result = {"error": "no result; stderr: %s" % open(self.errpath, "rb").read()[-2000:]}
        if "error" in self.result and self.kind != "netlink":
            raise Failure("worker %s failed: %s" % (self.kind, self.result["error"]))
        return self.result

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------------------
# the harness
# ---------------------------------------------------------------------------

class Failure(Exception):
    pass


def endpoint_config(extra=""):
    return ("[gaffer]\nhttp_endpoints = main\n\n[endpoint:main]\nbind = 127.0.0.1:0\n%s\n"
            % extra)


class Daemon:
    """One ``python3 gafferd.py CONFIG`` with SOAK_TOKEN in its environment."""

    def __init__(self, sc, config, name="gaffer.ini", preexec=None):
        self.sc = sc
        self.token = "%s-%d" % (sc.token, len(sc.daemons))
        self.config_path = os.path.join(sc.dir, name)
        self.write_config(config)
        self.preexec = preexec
        self.proc = None
        self.port = None
        self.pid = None
        self.log_path = os.path.join(sc.dir, "gafferd-%d.log" % len(sc.daemons))
        self.out_path = os.path.join(sc.dir, "gafferd-%d.out" % len(sc.daemons))
        sc.daemons.append(self)

    def write_config(self, text):
        tmp = self.config_path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.config_path)

    def start(self, wait=True, timeout=120):
        env = dict(os.environ)
        env.pop("PYTHONWARNINGS", None)
        env["SOAK_TOKEN"] = self.token
        self._log = open(self.log_path, "wb")
        self._out = open(self.out_path, "wb")
        self.t_launch = time.monotonic()
        # faulthandler: a hung daemon is sent SIGABRT by diagnose() and prints
        # where it was stuck (an environment variable, because gafferd
        # re-executes itself; the children inherit it, which is harmless)
        env["PYTHONFAULTHANDLER"] = "1"
        self.proc = subprocess.Popen([PY, GAFFERD, self.config_path],
                                     cwd=self.sc.dir,
                                     stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._log,
                                     env=env, preexec_fn=self.preexec)
        self.pid = self.proc.pid
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout=120):
        def check():
            if self.proc.poll() is not None:
                raise Failure("gafferd exited with status %s during start-up:\n%s"
                              % (self.proc.returncode, self.log()[-3000:]))
            return re.search(r"gafferd \S+ ready \(pid \d+\)", self.log())
        if not wait_until(check, timeout, 0.02):
            raise Failure("gafferd not ready within %ss:\n%s" % (timeout, self.log()[-3000:]))
        self.t_ready = time.monotonic()
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", self.log())
        if not m:
            raise Failure("no 'listening on http://127.0.0.1:PORT' line:\n%s" % self.log()[-2000:])
        self.port = int(m.group(1))
        return self

    def log(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    # -- HTTP ---------------------------------------------------------------
    def api(self, method, path, body=None, timeout=30.0):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            if isinstance(body, (dict, list)):
                body = json.dumps(body)
            if body is None and method in ("POST", "PUT"):
                body = b""
            conn.request(method, path, body=body)
            resp = conn.getresponse()
            return resp.status, resp.read()
        except socket.timeout:
            raise Failure("%s %s: no reply within %.0f s; the daemon is hung:\n%s"
                          % (method, path, timeout, self.diagnose()))
        finally:
            conn.close()

    def diagnose(self):
        """Where is a hung daemon?  /proc facts, then SIGABRT for the
        faulthandler traceback (this kills the daemon)."""
        pid = self.pid
        facts = []
        for name in ("wchan", "syscall"):
            try:
                with open("/proc/%d/%s" % (pid, name)) as f:
                    facts.append("%s=%s" % (name, f.read().strip()))
            except OSError:
                pass
        f = proc_stat(pid)
        facts.append("state=%s cpu=%.2fs" % (f[0].decode() if f else "?", cpu_ticks(pid) / CLK_TCK))
        t1 = cpu_ticks(pid)
        time.sleep(1.0)
        facts.append("cpu over 1 s: %d%%" % (cpu_ticks(pid) - t1))
        before = len(self.log())
        try:
            os.kill(pid, signal.SIGABRT)
        except OSError:
            pass
        wait_until(lambda: self.proc.poll() is not None, 5)
        return " ".join(facts) + "\n" + self.log()[before:][-4000:]

    def j_refusable(self, method, path, body=None, timeout=10.0):
        """``j`` for a daemon that may be out of file descriptors: it then
        accepts a connection and closes it unread (a request it never saw,
        so sending it again is safe), and that is retried until ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.j(method, path, body)
            except ConnectionResetError:         # http.client.RemoteDisconnected too
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    def j(self, method, path, body=None, expect=200, timeout=30.0):
        status, data = self.api(method, path, body, timeout)
        if status != expect:
            raise Failure("%s %s -> %d (expected %d): %r" % (method, path, status, expect, data[:300]))
        try:
            return json.loads(data.decode())
        except ValueError:
            return data

    def status_all(self):
        return self.j("GET", "/status")

    def wait_status(self, pred, timeout, what):
        last = [None]

        def check():
            try:
                last[0] = self.status_all()
            except (OSError, Failure, http.client.HTTPException) as exc:
                last[0] = repr(exc)
                return False
            return pred(last[0])
        if not wait_until(check, timeout, 0.1):
            raise Failure("timed out after %ss waiting for %s; /status: %s"
                          % (timeout, what, json.dumps(last[0])[:1500]))
        return last[0]

    def live_pids(self, name):
        """OS pids of the live processes of template ``name``."""
        out = []
        for ident in self.j("GET", "/processes/%s/_pids" % name)["pids"]:
            status, data = self.api("GET", "/processes/%d" % ident)
            if status == 200:
                out.append(json.loads(data.decode())["os_pid"])
        return out

    def cpu(self):
        return cpu_ticks(self.pid)

    def rss(self):
        return rss_bytes(self.pid)

    def fds(self):
        return fd_count(self.pid)

    def settled_fds(self, timeout=10.0):
        last = [None]

        def stable():
            n = self.fds()
            same, last[0] = n == last[0], n
            return same
        wait_until(stable, timeout, 0.2)
        return last[0]

    def kill_all(self):
        """Clean-up: SIGKILL the daemon and everything holding its token."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in token_procs(self.token):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for f in (getattr(self, "_log", None), getattr(self, "_out", None)):
            if f:
                f.close()


class Baseline:
    def __init__(self, fds, rss, targets):
        self.fds, self.rss, self.targets = fds, rss, targets


class Scenario:
    def __init__(self, num, title, args):
        self.num, self.title, self.args = num, title, args
        self.short = args.short
        self.dir = tempfile.mkdtemp(prefix="gafferd-soak-%d-" % num)
        self.token = "soak%d-%d-%s" % (num, os.getpid(), base64.b32encode(os.urandom(5)).decode())
        self.figures = collections.OrderedDict()
        self.failures = []
        self.notes = []
        self.daemons = []
        self.workers = []
        self.cleanups = []

    # -- reporting ------------------------------------------------------------
    def fig(self, key, value):
        self.figures[key] = value
        log("  %-34s %s", key, value)

    def note(self, text):
        self.notes.append(text)
        log("  note: %s", text)

    def check(self, cond, msg):
        if not cond:
            self.failures.append(msg)
            log("  FAIL: %s", msg)
        return bool(cond)

    def write(self, name, text, mode=0o755):
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)
        return path

    def daemon(self, config, **kw):
        return Daemon(self, config, **kw)

    def worker(self, kind, **params):
        return Worker(self, kind, **params).wait_ready()

    def cleanup(self):
        for w in self.workers:
            w.kill()
        for d in self.daemons:
            d.kill_all()
        for fn in reversed(self.cleanups):
            try:
                fn()
            except Exception as exc:
                log("clean-up step failed: %r", exc)

    # -- invariants ------------------------------------------------------------------
    def baseline(self, d, settle=1.0):
        """fd count and RSS of the quiet daemon after the warm-up."""
        time.sleep(settle)
        fds = d.settled_fds()
        rss = d.rss()
        targets = d.status_all()
        self.fig("baseline fds / RSS", "%d / %.1f MB" % (fds, rss / MB))
        return Baseline(fds, rss, targets)

    def check_ping_during(self, res, what="during the load"):
        lat = res["lat"]
        p50, p99 = percentile(lat, 50), percentile(lat, 99)
        over = sum(1 for v in lat if v > PING_LIMIT_MS)
        self.fig("/ping %s" % what, "n=%d p50 %s p99 %s max %s, %d over %d ms, %d failed%s"
                 % (len(lat), fmt_ms(p50), fmt_ms(p99), fmt_ms(max(lat) if lat else None),
                    over, PING_LIMIT_MS, res["nfails"],
                    ", %d refused while out of fds" % res["refused"] if res.get("refused")
                    else ""))
        self.check(res["nfails"] == 0, "/ping failed %s: %s" % (what, res["fails"][:5]))
        self.check(p99 is not None and p99 < PING_LIMIT_MS,
                   "/ping p99 %s %s is not under %d ms (max %s; slow pings sent at %s)"
                   % (what, fmt_ms(p99), PING_LIMIT_MS, fmt_ms(max(lat) if lat else None),
                      ", ".join(res.get("slow", [])[:8])))

    def check_ping_after(self, d, n=20):
        lats, errs = [], []
        for _ in range(n):
            ms, err = ping_once(d.port)
            (errs.append(err) if err else lats.append(ms))
            time.sleep(0.02)
        self.fig("/ping after the load", "p50 %s max %s" % (fmt_ms(percentile(lats, 50)),
                                                          fmt_ms(max(lats) if lats else None)))
        self.check(not errs, "/ping failed after the load: %s" % errs[:3])
        self.check(lats and max(lats) < PING_LIMIT_MS,
                   "/ping after the load took %s (limit %d ms)"
                   % (fmt_ms(max(lats) if lats else None), PING_LIMIT_MS))

    def check_invariants(self, d, base, states=None, fd_allow=0, fd_why="", rss_allow=0,
                         converge=15.0):
        """The invariants of soak/README.md (shutdown is checked separately).
        ``states``: {template: set of acceptable states} (default running at
        target); ``fd_allow``: fds the scenario legitimately keeps."""
        log("  checking invariants")
        self.check(d.alive(), "the daemon died (status %s)" % (d.proc.poll(),))
        if not d.alive():
            return
        zombies = wait_until(lambda: not children_of(d.pid, zombies=True), 5.0) or \
            children_of(d.pid, zombies=True)
        self.check(zombies is True, "zombie children of the daemon: %s" % (zombies,))
        states = states or {}

        def at_target(st):
            for name, s in st.items():
                want = states.get(name, {"running"})
                if s.get("state") not in want:
                    return False
                if s.get("state") == "running" and s["running"] != s["max_processes"]:
                    return False
            return True
        try:
            st = d.wait_status(at_target, converge, "every template at its target or state")
            self.fig("templates", "%d, all at target/state (%s)" % (
                len(st), ", ".join(sorted(set(s["state"] for s in st.values()))) or "-"))
        except Failure as exc:
            self.check(False, str(exc))
        fds = d.settled_fds()
        extra = " (+%d allowed: %s)" % (fd_allow, fd_why) if fd_allow else ""
        self.fig("fds after / baseline", "%d / %d%s" % (fds, base.fds, extra))
        if not self.check(fds <= base.fds + fd_allow, "fd count %d is not back to its baseline %d%s"
                          % (fds, base.fds, extra)):
            self.note("daemon fds now: %s" % collections.Counter(
                re.sub(r"\d+", "N", t) for t in fd_targets(d.pid)).most_common())
        # the daemon gives freed memory back after 1 s without activity
        # (MemoryTrimmer): RSS is read 1.5 s after the load ends, and again
        # until RSS_SETTLE if it is still above the limit
        limit = base.rss * RSS_RATIO + rss_allow
        t0 = time.monotonic()
        time.sleep(1.5)
        wait_until(lambda: d.rss() <= limit, RSS_SETTLE - 1.5, 0.1)
        rss = d.rss()
        self.fig("RSS after / baseline", "%.1f MB / %.1f MB (limit %.1f MB), after %.1f s"
                 % (rss / MB, base.rss / MB, limit / MB, time.monotonic() - t0))
        self.check(rss <= limit, "RSS %.1f MB is not back within 10%% of its baseline "
                   "%.1f MB %.0f s after the load" % (rss / MB, base.rss / MB, RSS_SETTLE))
        self.check_ping_after(d)
        self.check_log(d)

    def check_log(self, d):
        text = d.log()
        self.check("Traceback" not in text, "Traceback in the daemon's log:\n%s"
                   % text[text.find("Traceback") - 200:][:3000])

    def shutdown(self, d, graceful=10.0, expect_procs=None, label="SIGTERM"):
        """SIGTERM: everything the daemon started must be gone within
        ``graceful`` + 1 s, and the daemon must exit with status 0."""
        log("  SIGTERM (graceful_timeout %.1f s)", graceful)
        self.check_log(d)
        if expect_procs is None:
            # what the daemon says it runs (API), and its children (/proc)
            expect_procs = set(children_of(d.pid))
            try:
                ids = d.j("GET", "/processes?running=1")
                if len(ids) <= 500:
                    for ident in ids:
                        status, data = d.api("GET", "/processes/%d" % ident)
                        if status == 200:
                            expect_procs.add(json.loads(data.decode())["os_pid"])
            except (Failure, OSError, ValueError) as exc:
                self.check(False, "listing the running processes failed: %s" % exc)
        before = token_procs(d.token, exclude={d.pid})
        if expect_procs is not None:
            missing = [p for p in expect_procs if p not in before and alive(p)]
            self.check(not missing, "processes started by the daemon without its token: %s"
                       % missing)
            for p in expect_procs:
                if alive(p):
                    before.setdefault(p, start_time(p))
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        deadline = t0 + graceful + 1.0
        gone_at = None
        at_deadline = None
        while time.monotonic() < deadline + 5.0:
            left = [p for p, st in before.items() if alive(p, st)]
            left += [p for p in token_procs(d.token, exclude={d.pid}) if p not in left]
            if not left:
                gone_at = time.monotonic() - t0
                break
            if at_deadline is None and time.monotonic() > deadline:
                at_deadline = ["%d %s" % (p, cmdline(p)) for p in left]
            time.sleep(0.01)
        try:
            rc = d.proc.wait(graceful + 15)
        except subprocess.TimeoutExpired:
            rc = None
        exit_at = time.monotonic() - t0
        survivors = token_procs(d.token, exclude={d.pid})
        self.fig("%s: processes gone / daemon exit" % label, "%s / %.2f s (%d processes, limit %.1f s)"
                 % ("%.2f s" % gone_at if gone_at is not None else "NEVER", exit_at, len(before),
                    graceful + 1.0))
        self.check(gone_at is not None and gone_at <= graceful + 1.0,
                   "after SIGTERM, processes of the daemon still alive after %.1f s "
                   "(all gone after %s): %s" % (graceful + 1.0, "%.2f s" % gone_at if gone_at
                                                else "never", (at_deadline or [])[:10]))
        self.check(rc == 0, "the daemon exited with status %s after SIGTERM" % rc)
        # the daemon itself: its processes' grace, the orphans' second, the
        # webhooks' drain (3 s) and a little slack
        self.check(rc is not None and exit_at <= graceful + 5.0,
                   "the daemon took %.1f s to exit after SIGTERM (graceful_timeout %.1f s)"
                   % (exit_at, graceful))
        self.check(not survivors, "processes left behind after the daemon exited: %s"
                   % ["%d %s" % (p, cmdline(p)) for p in survivors][:10])
        self.check_log(d)
        d.kill_all()


def scenario(num, title):
    def deco(fn):
        SCENARIOS[num] = (title, fn)
        return fn
    return deco


# ---------------------------------------------------------------------------
# child programs (written into each scenario's temporary directory)
# ---------------------------------------------------------------------------

CRASH_SH = """#!/bin/sh
# exits after 0-50 ms (pseudo-random: the pid), no fork of its own
ms=$(( $$ % 51 ))
[ $ms -lt 10 ] && ms=0$ms
exec sleep 0.0$ms
"""

PRODUCER_PY = r"""
import os, sys, time
REC = 4096
TAIL = bytes(97 + (i * 7) % 26 for i in range(10, REC - 1)) + b"\n"
rate = float(sys.argv[1])
line = sys.stdin.readline()
if not line.startswith("GO"):
    sys.exit(0)
duration = float(line.split()[1])
out = sys.stdout.fileno()
seq = 0
t0 = time.monotonic()
sent = 0
def write(data):
    view = memoryview(data)
    while view:
        view = view[os.write(out, view):]
while time.monotonic() - t0 < duration:
    block = b"".join(b"R%09d" % (seq + i) + TAIL for i in range(16))
    seq += 16
    write(block)
    sent += len(block)
    ahead = sent / rate - (time.monotonic() - t0)
    if ahead > 0:
        time.sleep(ahead)
write(b"E%09d" % seq + TAIL)
elapsed = time.monotonic() - t0
with open(sys.argv[2] + ".%d" % os.getpid(), "w") as f:
    f.write("%d %d %.3f\n" % (seq, sent, elapsed))
"""

HOSTILE_PY = r"""
import os, signal, sys, time
mode, state = sys.argv[1], sys.argv[2]

def note(kind, pid):
    path = os.path.join(state, "%s-%d" % (kind, pid))
    with open(path + ".tmp", "w") as f:
        f.write("%d %d\n" % (os.getppid(), os.getpgrp()))
    os.rename(path + ".tmp", path)

def forever():
    while True:
        time.sleep(3600)

if mode == "ignoreterm":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    forever()
elif mode == "forker":
    pid = os.fork()
    if pid == 0:
        note("grand", os.getpid())
        forever()
    note("forker", os.getpid())
    time.sleep(1.0)
    os._exit(0)
elif mode == "closer":
    sys.stdout.write("closing my stdout and stderr\n")
    sys.stdout.flush()
    os.close(1)
    os.close(2)
    forever()
elif mode == "nonewline":
    block = b"x" * 65536
    while True:
        os.write(1, block)
        time.sleep(0.03)        # ~2 MB/s, never a newline
elif mode == "daemonizer":
    marker = os.path.join(state, "daemonized")
    if not os.path.exists(marker):
        open(marker, "w").close()
        r, w = os.pipe()
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                devnull = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(devnull, fd)
                note("daemon", os.getpid())
                os.write(w, b"ready")
                forever()
            os._exit(0)
        os.read(r, 5)            # like systemd Type=forking: exit once the daemon is up
        os._exit(0)              # the original exits: "I am a daemon now"
    forever()
elif mode == "racy":
    # the classic daemon(3) dance: the original exits at once, before its
    # child has called setsid()
    marker = os.path.join(state, "daemonized-racy")
    if not os.path.exists(marker):
        open(marker, "w").close()
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                devnull = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(devnull, fd)
                note("rdaemon", os.getpid())
                forever()
            os._exit(0)
        os._exit(0)
    forever()
elif mode == "pgroup":
    if os.fork() == 0:
        os.setpgid(0, 0)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        note("pgroup", os.getpid())
        forever()
    forever()
"""

WRITER_PY = r"""
import os, sys, time
i = 0
pad = "." * 90
while True:
    os.write(1, ("line %08d %s\n" % (i, pad)).encode())
    i += 1
    time.sleep(0.002)
"""

LASTWORD_PY = r"""
import faulthandler, hashlib, os, signal, sys
faulthandler.disable()           # os.abort() below must stay silent
line = sys.stdin.readline().split()
if not line or line[0] != "GO":
    sys.exit(0)
size, seed, mode, tail = int(line[1]), int(line[2]), line[3], line[4]
os.write(2, b"E" * 99 + b"\n")
import time
time.sleep(0.05)
h = hashlib.sha256()
out = bytearray()
n = 0
while len(out) < size:
    out += b"O%d:%08d %s\n" % (seed, n, b"abcdefghij" * ((n * 7 + seed) % 13))
    n += 1
final = b"LAST %d" % seed
if tail == "nl":
    final += b"\n"
out += final
view = memoryview(bytes(out))
while view:
    step = view[:65536]
    view = view[os.write(1, step):]
os.write(2, b"E" + b"Z" * 98 + b"\n")
if mode == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
elif mode == "abort":
    os.abort()
os._exit(3)
"""


def expected_lastword(size, seed, tail):
    out = bytearray()
    n = 0
    while len(out) < size:
        out += b"O%d:%08d %s\n" % (seed, n, b"abcdefghij" * ((n * 7 + seed) % 13))
        n += 1
    out += b"LAST %d" % seed + (b"\n" if tail == "nl" else b"")
    return bytes(out)


LASTWORD_ERR = (b"E" * 99 + b"\n", b"E" + b"Z" * 98 + b"\n")


# ---------------------------------------------------------------------------
# 1. crash storm
# ---------------------------------------------------------------------------

@scenario(1, "crash storm")
def s1_crash_storm(sc):
    n = 100
    duration = 10.0 if sc.short else 60.0
    crash = sc.write("crash.sh", CRASH_SH)
    cfg = endpoint_config() + "".join(
        "[process:storm:c%03d]\ncmd = %s\nstartsecs = 0\nrestart_delay = 0\n\n" % (i, crash) for i in range(n))
    d = sc.daemon(cfg).start()
    sc.fig("templates / lifetime", "%d / 0-50 ms, immediate respawns (startsecs = 0, restart_delay = 0), %.0f s" % (n, duration))
    time.sleep(4.0)                                   # warm-up storm (fills every recent list)
    d.j("POST", "/groups/storm/_stop")
    d.wait_status(lambda st: all(s["running"] == 0 for s in st.values()), 30, "the warm-up to stop")
    base = sc.baseline(d)
    nl = sc.worker("netlink", pid=d.pid)
    watch = sc.worker("watch", port=d.port)
    ping = sc.worker("ping", port=d.port, interval=0.05)
    cpu0, t0 = d.cpu(), time.monotonic()
    d.j("POST", "/groups/storm/_start")
    rss_max = fd_max = 0
    while time.monotonic() - t0 < duration:
        rss_max, fd_max = max(rss_max, d.rss()), max(fd_max, d.fds())
        time.sleep(0.25)
    d.j("POST", "/groups/storm/_stop")
    cpu1, t1 = d.cpu(), time.monotonic()
    d.wait_status(lambda st: all(s["running"] == 0 for s in st.values()), 30, "the storm to stop")
    ping_res = ping.stop()
    # every process of the storm has exited: the sentinel marks the end
    time.sleep(0.5)
    d.j("POST", "/processes", {"name": "__sentinel__", "cmd": "sleep", "args": ["1"],
                               "start": False})
    events = watch.stop()["events"]
    kernel = nl.stop()
    d.j("DELETE", "/processes/__sentinel__")

    # -- the /watch feed: complete and in order -------------------------------
    spawns = [e for e in events if e["event"] == "spawn"]
    exits = [e for e in events if e["event"] == "exit"]
    spawned_ids = [e["pid"] for e in spawns]
    exit_ids = collections.Counter(e["pid"] for e in exits)
    sc.fig("spawns / exits seen on /watch", "%d / %d" % (len(spawns), len(exits)))
    missing = [i for i in spawned_ids if exit_ids[i] != 1]
    sc.check(not missing, "%d spawned processes without exactly one exit event on /watch "
             "(ids %s)" % (len(missing), missing[:10]))
    unknown = set(exit_ids) - set(spawned_ids)
    sc.check(not unknown, "exit events for ids never spawned: %s" % sorted(unknown)[:10])
    order_errors = []
    per = collections.defaultdict(list)
    for e in events:
        if e["event"] in ("spawn", "exit") and e.get("name", "").startswith("storm:"):
            per[e["name"]].append(e)
    for name, seq in per.items():
        expect = "spawn"
        for e in seq:
            if e["event"] != expect:
                order_errors.append("%s: %s of id %s when %s was due" % (name, e["event"],
                                                                        e["pid"], expect))
                break
            expect = "exit" if expect == "spawn" else "spawn"
        ids = [e["pid"] for e in seq if e["event"] == "spawn"]
        if ids != sorted(ids):
            order_errors.append("%s: spawn ids out of order" % name)
        for a, b in zip(seq[::2], seq[1::2]):
            if a["pid"] != b["pid"]:
                order_errors.append("%s: exit of id %s follows spawn of id %s"
                                    % (name, b["pid"], a["pid"]))
                break
    sc.check(not order_errors, "/watch events out of order: %s" % order_errors[:5])
    twins = [e for e in events if e["event"].startswith("proc.storm:") and
             e["event"].endswith(".exit")]
    sc.check([(e["name"], e["pid"]) for e in twins] == [(e["name"], e["pid"]) for e in exits],
             "proc.NAME.exit events do not match the exit events one for one "
             "(%d vs %d)" % (len(twins), len(exits)))

    # -- kernel view: respawn latency, every fork accounted for ------------------
    spawns_in_storm = len(spawns)
    secs = t1 - t0
    cpu_s = (cpu1 - cpu0) / float(CLK_TCK)
    sc.fig("respawns per second", "%.0f (%d in %.1f s)" % (spawns_in_storm / secs,
                                                          spawns_in_storm, secs))
    sc.fig("daemon CPU during the storm", "%.2f s = %.0f %% of a core" % (cpu_s, 100 * cpu_s / secs))
    sc.fig("CPU per respawn", "%.2f ms" % (1000.0 * cpu_s / max(1, spawns_in_storm)))
    if "error" in kernel:
        sc.note("respawn latency not measured: %s" % kernel["error"])
    else:
        forks = {int(k): v for k, v in kernel["forks"].items()}
        kexits = {int(k): v for k, v in kernel["exits"].items()}
        osp = [e["os_pid"] for e in spawns]
        not_forked = [p for p in osp if p not in forks]
        extra = set(forks) - set(osp)
        if kernel["overruns"]:
            sc.note("proc connector lost events (%d overruns); fork cross-check skipped"
                    % kernel["overruns"])
        else:
            sc.check(not not_forked, "spawn events for pids the daemon never forked: %s"
                     % not_forked[:10])
            sc.check(not extra, "the daemon forked %d processes with no spawn event (%s)"
                     % (len(extra), sorted(extra)[:10]))
        by_id = {e["pid"]: e for e in exits}
        lat = []
        for name, seq in per.items():
            sp = [e for e in seq if e["event"] == "spawn"]
            for a, b in zip(sp, sp[1:]):
                ex = by_id.get(a["pid"])
                if ex is None or ex["term_signal"] != 0:
                    continue         # only crashes, not our stop
                if a["os_pid"] in kexits and b["os_pid"] in forks:
                    lat.append((forks[b["os_pid"]] - kexits[a["os_pid"]]) / 1e6)
        sc.fig("respawn latency (exit -> fork)", "n=%d p50 %s p99 %s max %s" % (
            len(lat), fmt_ms(percentile(lat, 50)), fmt_ms(percentile(lat, 99)),
            fmt_ms(max(lat) if lat else None)))
        sc.figures["respawn_p50_ms"] = percentile(lat, 50)
        sc.figures["respawn_p99_ms"] = percentile(lat, 99)
    sc.fig("peak RSS / fds during the storm", "%.1f MB / %d" % (rss_max / MB, fd_max))
    sc.check_ping_during(ping_res)
    sc.check_invariants(d, base, states={"storm:c%03d" % i: {"stopped"} for i in range(n)})
    d.j("POST", "/groups/storm/_start")
    time.sleep(1.0)
    sc.shutdown(d, graceful=10.0)


# ---------------------------------------------------------------------------
# 2. scale
# ---------------------------------------------------------------------------

def _setrlimit_nofile(soft, hard):
    def preexec():
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return preexec


@scenario(2, "scale")
def s2_scale(sc):
    total = 300 if sc.short else 2000
    ntemplates = 20
    per = total // ntemplates
    idle_s = 10.0 if sc.short else 60.0

    def cfg(start="true"):
        return endpoint_config() + "".join(
            "[process:scale:s%02d]\ncmd = sleep 100000\nnumprocesses = %d\n"
            "redirect_output = stdout, stderr\nstart = %s\n\n" % (i, per, start)
            for i in range(ntemplates))

    # a limit too low for the configured processes is said clearly
    low = sc.daemon(cfg(), name="low.ini", preexec=_setrlimit_nofile(256, 256)).start()
    m = re.search(r"WARNING.*(open-file limit.*)", low.log())
    sc.check(m, "no warning about an open-file limit (256) too low for %d processes" % total)
    if m:
        sc.fig("limit too low (256)", m.group(1)[:110])
    time.sleep(1.5)
    sc.check(low.alive(), "the daemon died under a too-low fd limit")
    if low.alive():
        st = low.status_all()
        sc.fig("running under the 256 limit", "%d of %d, %d spawn errors logged" % (
            sum(s["running"] for s in st.values()), total, low.log().count("cannot start")))
        sc.shutdown(low, graceful=10.0, label="SIGTERM (256 limit)")

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    d = sc.daemon(cfg(), preexec=_setrlimit_nofile(1024, hard))
    d.start(wait=False)
    d.wait_ready(300)
    ready_s = d.t_ready - d.t_launch

    def all_up():
        kids = children_of(d.pid)
        return len(kids) >= total
    wait_until(all_up, 300, 0.05)
    up_s = time.monotonic() - d.t_launch
    sc.fig("processes", "%d (%d templates x %d, stdout+stderr piped)" % (total, ntemplates, per))
    sc.fig("start: ready line / all running", "%.2f s / %.2f s" % (ready_s, up_s))
    sc.figures["start_s"] = up_s
    lim = nofile_limits(d.pid)
    sc.check(lim and lim[0] == hard, "RLIMIT_NOFILE soft limit not raised to the hard limit "
             "%d at start-up: %s" % (hard, lim))
    d.wait_status(lambda st: all(s["running"] == per for s in st.values()), 120,
                  "all templates at target")
    sc.fig("RSS at start-up", "%.1f MB" % (d.rss() / MB))

    def restart_all():
        old = set(children_of(d.pid))
        t0, cpu0 = time.monotonic(), d.cpu()
        d.j("POST", "/groups/scale/_restart", timeout=600)
        wait_until(lambda: not (old & set(children_of(d.pid))) and
                   len(children_of(d.pid)) >= total, 600, 0.1)
        return time.monotonic() - t0, (d.cpu() - cpu0) / float(CLK_TCK)
    # warm-up: the same load once (every process replaced), so that the
    # baseline is the daemon's working set, not its start-up size
    restart_all()
    d.wait_status(lambda st: all(s["running"] == per for s in st.values()), 120,
                  "all templates at target after the warm-up")
    base = sc.baseline(d, settle=3.0)
    ping = sc.worker("ping", port=d.port, interval=1.0)
    cpu0, t0 = d.cpu(), time.monotonic()
    time.sleep(idle_s)
    cpu1, t1 = d.cpu(), time.monotonic()
    sc.check_ping_during(ping.stop(), "while idle (1/s)")
    idle_pct = 100.0 * (cpu1 - cpu0) / CLK_TCK / (t1 - t0)
    sc.fig("idle CPU over %.0f s" % idle_s, "%.2f %% of a core" % idle_pct)
    sc.figures["idle_cpu_pct"] = idle_pct
    sc.check(idle_pct < 1.0, "idle CPU %.2f %% of a core is not under 1 %%" % idle_pct)

    # load: every process replaced, then every template scaled down and up
    ping = sc.worker("ping", port=d.port, interval=0.05)
    restart_s, cpu_s = restart_all()
    sc.fig("restart of all %d" % total, "%.2f s, %.2f ms CPU per process"
           % (restart_s, 1000.0 * cpu_s / total))
    for i in range(ntemplates):
        d.j("POST", "/processes/scale:s%02d/_sub/%d" % (i, per // 2))
    for i in range(ntemplates):
        d.j("POST", "/processes/scale:s%02d/_add/%d" % (i, per // 2))
    d.wait_status(lambda st: all(s["running"] == per for s in st.values()), 120,
                  "all templates back at target")
    wait_until(lambda: len(children_of(d.pid)) == total, 30, 0.1)
    sc.check_ping_during(ping.stop(), "during restart/scale")
    sc.fig("RSS at %d processes" % total, "%.1f MB" % (d.rss() / MB))
    sc.check_invariants(d, base)
    sc.shutdown(d, graceful=10.0)


# ---------------------------------------------------------------------------
# 3. HTTP churn
# ---------------------------------------------------------------------------

@scenario(3, "HTTP churn")
def s3_churn(sc):
    conns = 1000 if sc.short else 10000
    idle = 200 if sc.short else 500
    loris = 20 if sc.short else 50
    cut = 200 if sc.short else 1000
    cfg = endpoint_config() + "[process:churn]\ncmd = sleep 100000\nnumprocesses = 2\n\n"
    d = sc.daemon(cfg).start()
    d.wait_status(lambda st: st["churn"]["running"] == 2, 20, "churn at target")
    # warm-up: the same shape of load, briefly (all the concurrent connections)
    warm = [sc.worker("idle", port=d.port, n=idle), sc.worker("loris", port=d.port, n=loris),
            sc.worker("churn", port=d.port, n=400), sc.worker("cutbody", port=d.port, n=60)]
    for w in reversed(warm):
        w.stop()
    base = sc.baseline(d)
    ping = sc.worker("ping", port=d.port, interval=0.05)
    t0 = time.monotonic()
    idle_w = sc.worker("idle", port=d.port, n=idle)
    loris_w = sc.worker("loris", port=d.port, n=loris)
    sc.fig("concurrent idle / slow-loris", "%d / %d connections" % (idle, loris))
    churners = [sc.worker("churn", port=d.port, n=conns // 2) for _ in range(2)]
    cutter = sc.worker("cutbody", port=d.port, n=cut)
    scale_ops = scale_fail = 0
    scale_errors = []
    target = 2
    min_s = 5.0 if sc.short else 40.0      # full: past the 30 s request-head timeout
    while any(w.proc.poll() is None for w in churners + [cutter]) or \
            time.monotonic() - t0 < min_s:
        for path in ("/processes/churn/_add/3", "/processes/churn/_sub/3"):
            status, data = d.api("POST", path)
            scale_ops += 1
            if status != 200:
                scale_fail += 1
                scale_errors.append("%s -> %d %r" % (path, status, data[:100]))
        time.sleep(0.05)
        if time.monotonic() - t0 > 900:
            break
    results = [w.stop() for w in churners]
    cut_res = cutter.stop()
    churn_s = time.monotonic() - t0
    sc.fig("scaling operations during churn", "%d (%d failed)" % (scale_ops, scale_fail))
    sc.check(not scale_fail, "scaling requests failed: %s" % scale_errors[:5])
    counts = collections.Counter()
    for r in results:
        counts.update(r["counts"])
    sc.fig("connections opened and closed", "%d in %.1f s: %s" % (
        sum(counts.values()), churn_s, dict(counts)))
    sc.fig("churn request latency", "p50 %s p99 %s max %s" % (
        fmt_ms(max(r["p50"] or 0 for r in results)), fmt_ms(max(r["p99"] or 0 for r in results)),
        fmt_ms(max(r["max"] or 0 for r in results))))
    errors = [e for r in results for e in r["errors"]]
    sc.check(not counts["error"] and not counts["bad_status"],
             "churn connections failed: %s" % errors[:5])
    sc.fig("requests with bodies cut short", "%d: %s" % (cut, dict(cut_res["counts"])))
    sc.check(not cut_res["nanomalies"], "cut-short requests: %s" % cut_res["anomalies"][:5])
    ping_res = ping.stop()
    idle_res = idle_w.stop()
    loris_res = loris_w.stop()
    sc.fig("idle connections", "%d opened, %d closed by the daemon (keepalive_timeout 60 s)"
           % (idle_res["opened"], idle_res["closed_by_server"]))
    sc.check(idle_res["opened"] == idle and not idle_res["nerrors"],
             "idle connections refused: %s" % idle_res["errors"][:3])
    if churn_s < 55:
        sc.check(idle_res["closed_by_server"] == 0, "%d idle connections closed before "
                 "keepalive_timeout" % idle_res["closed_by_server"])
    sc.fig("slow-loris clients", "%d opened, %d cut off by the daemon %s" % (
        loris_res["opened"], loris_res["closed_by_server"], loris_res["closed_after_s"]))
    sc.check_ping_during(ping_res)
    st = d.j("GET", "/status/churn")
    sc.check(st["max_processes"] == target, "churn target is %s after balanced _add/_sub, not %d"
             % (st["max_processes"], target))
    sc.check_invariants(d, base)
    sc.shutdown(d, graceful=10.0)


# ---------------------------------------------------------------------------
# 4. stream pressure
# ---------------------------------------------------------------------------

@scenario(4, "stream pressure")
def s4_streams(sc):
    nprod = 4 if sc.short else 20
    nsubs = 10 if sc.short else 50
    nstalled = 2 if sc.short else 5
    rate = 5 * MB
    duration = 8.0 if sc.short else 30.0
    prod = sc.write("producer.py", PRODUCER_PY)
    stats = os.path.join(sc.dir, "produced")
    cfg = endpoint_config() + (
        "[process:prod]\ncmd = %s\nargs = -u %s %d %s\nnumprocesses = %d\n"
        "redirect_output = stdout\nredirect_input = true\nstartsecs = 0\nrestart_delay = 0\n"
        "graceful_timeout = 2\n\n" % (PY, prod, rate, stats, nprod))
    d = sc.daemon(cfg).start()
    d.wait_status(lambda st: st["prod"]["running"] == nprod, 30, "producers")

    def run_round(subs_spec, secs, workers=2 if sc.short else 4):
        ids = d.j("GET", "/processes/prod/_pids")["pids"]
        specs = []
        for i in range(len(subs_spec)):
            kind, stalled = subs_spec[i]
            specs.append({"id": ids[i % len(ids)], "kind": kind, "stalled": stalled})
        parts = [specs[i::workers] for i in range(workers)]
        for name in os.listdir(sc.dir):
            if name.startswith("produced."):
                os.unlink(os.path.join(sc.dir, name))
        ws = [sc.worker("subs", port=d.port, subs=part) for part in parts if part]
        t0 = time.monotonic()
        for ident in ids:
            d.j("POST", "/streams/%d/stdin" % ident, "GO %s\n" % secs)
        rss_max = 0
        # the producers end after ``secs``; their replacements wait for GO
        while time.monotonic() - t0 < secs + 60:
            rss_max = max(rss_max, d.rss())
            st = d.j("GET", "/processes/prod/_pids")["pids"]
            if not set(ids) & set(st):
                break
            time.sleep(0.2)
        for w in ws:
            w.command("drain")
        res = [s for w in ws for s in w.stop(finish=True)["subs"]]
        return ids, res, rss_max, time.monotonic() - t0

    spec = []
    for i in range(nsubs):
        spec.append(("ws" if i % 2 else "stream", i >= nsubs - nstalled))
    # warm-up round: the same subscribers (stalled ones included), 3 seconds
    run_round(spec, 3.0)
    d.wait_status(lambda st: st["prod"]["running"] == nprod, 30, "producers after warm-up")
    base = sc.baseline(d)
    ping = sc.worker("ping", port=d.port, interval=0.05)
    drops_before = d.log().count("dropping slow")
    ids, res, rss_max, secs = run_round(spec, duration)
    sc.check_ping_during(ping.stop())
    produced = {}
    for name in os.listdir(sc.dir):
        if name.startswith("produced."):
            with open(os.path.join(sc.dir, name)) as f:
                n, sent, el = f.read().split()
                produced[int(name.split(".")[1])] = (int(n), int(sent), float(el))
    total_sent = sum(v[1] for v in produced.values())
    sc.fig("producers / subscribers / stalled", "%d / %d (%d stream, %d websocket) / %d" % (
        nprod, nsubs, sum(1 for k, _ in spec if k == "stream"),
        sum(1 for k, _ in spec if k == "ws"), nstalled))
    sc.fig("written by the producers", "%.1f MB in %.1f s = %.1f MB/s (asked %d x %.0f MB/s)" % (
        total_sent / MB, secs, total_sent / MB / max(0.1, duration), nprod, rate / MB))
    good = [r for r in res if not r["stalled"]]
    stalled = [r for r in res if r["stalled"]]
    got = sum(r["bytes"] for r in good)
    sc.fig("delivered to the readers", "%.1f MB = %.1f MB/s" % (got / MB, got / MB / duration))
    bad = []
    for r in good:     # subscribed before GO: from record 0 to the end record
        if r["error"] or r["errors"] or r["end"] is None or not r["ended"] or r["first"] != 0:
            bad.append(r)
    sc.check(not bad, "%d of %d reading subscribers did not get every byte: %s" % (
        len(bad), len(good), [{k: r[k] for k in ("id", "kind", "records", "first", "end",
                                                   "errors", "error", "ended", "eof")}
                              for r in bad[:3]]))
    not_dropped = [r for r in stalled if r["end"] is not None]
    sc.fig("stalled subscribers dropped", "%d of %d (got %s KB before the drop)" % (
        len(stalled) - len(not_dropped), len(stalled),
        [r["bytes"] // 1024 for r in stalled]))
    broken = [r for r in stalled if r["error"] or not (r["eof"] or r["ended"])]
    sc.check(not broken, "stalled subscribers neither dropped nor ended: %s" % broken[:3])
    sc.check(not not_dropped, "stalled subscribers were not dropped: %s" % not_dropped[:3])
    drops = d.log().count("dropping slow") - drops_before
    sc.check(drops >= len(stalled) - len(not_dropped),
             "%d drops logged for %d stalled subscribers" % (drops, len(stalled)))
    bound = base.rss + nstalled * 2 * MB + nprod * 512 * 1024 + 16 * MB
    sc.fig("peak RSS under pressure", "%.1f MB (bound %.1f MB)" % (rss_max / MB, bound / MB))
    sc.check(rss_max <= bound, "RSS grew to %.1f MB under stream pressure (bound %.1f MB)"
             % (rss_max / MB, bound / MB))
    sc.check_invariants(d, base)
    sc.shutdown(d, graceful=2.0)


# ---------------------------------------------------------------------------
# 5. reload storm
# ---------------------------------------------------------------------------

@scenario(5, "reload storm")
def s5_reload(sc):
    reloads = 60 if sc.short else 200

    def cfg(variant):
        a = variant == "A"
        text = endpoint_config()
        text += "[process:stable:a]\ncmd = sleep 100000\nnumprocesses = 2\n\n"
        text += ("[process:stable:b]\ncmd = sleep 100001\nredirect_output = stdout, stderr\n"
                 "graceful_timeout = 3\n\n")
        text += "[env:stable:b]\nmode = fixed\n\n"
        text += "[process:scaled]\ncmd = sleep 100002\nnumprocesses = %d\n\n" % (1 if a else 3)
        text += "[process:changed]\ncmd = sleep %d\n\n" % (100003 if a else 100004)
        text += "[process:only%s]\ncmd = sleep 100005\n\n" % variant
        return text

    d = sc.daemon(cfg("A")).start()
    d.wait_status(lambda st: all(s["running"] == s["max_processes"] for s in st.values()), 30,
                  "config A running")
    d.j("POST", "/processes", {"name": "api1", "cmd": "sleep", "args": ["100006"]})
    count = [d.log().count("reloaded ")]

    def reload_to(variant):
        d.write_config(cfg(variant))
        want = count[0] + 1
        t = time.monotonic()
        d.proc.send_signal(signal.SIGHUP)
        if not wait_until(lambda: d.log().count("reloaded ") >= want or
                          "reload failed" in d.log(), 20, 0.005):
            raise Failure("reload %d not logged within 20 s" % want)
        if "reload failed" in d.log():
            raise Failure("reload failed:\n%s" % d.log()[-2000:])
        count[0] = want
        return time.monotonic() - t

    # warm-up: a quarter of the storm, so that the baseline is the working
    # set reloads settle at (about 1.5 MB of allocator caches over the first
    # few hundred; 1,200 reloads plateau at +1.9 MB), not the start-up size
    for i in range(2 * max(2, reloads // 8)):          # even: config A at the end
        reload_to("B" if i % 2 == 0 else "A")
    d.wait_status(lambda st: "onlyA" in st and st["scaled"]["running"] == 1, 30, "config A again")
    base = sc.baseline(d)
    stable = {name: sorted(d.live_pids(name)) for name in ("stable:a", "stable:b")}
    watch = sc.worker("watch", port=d.port)
    ping = sc.worker("ping", port=d.port, interval=0.05)
    paths = [("GET", "/ping"), ("GET", "/processes"), ("GET", "/status"),
             ("GET", "/status/stable:a"), ("GET", "/processes/stable:a/_pids"),
             ("GET", "/stats/stable:b"), ("GET", "/processes?running=1"), ("GET", "/groups"),
             ("POST", "/processes/api1/_add"), ("POST", "/processes/api1/_sub"),
             ("GET", "/processes/stable:b"), ("GET", "/metrics")]
    req = [sc.worker("requests", port=d.port, paths=paths) for _ in range(2)]
    lat = []
    for i in range(reloads):
        lat.append(reload_to("B" if i % 2 == 0 else "A") * 1000)
        if i % 10 == 9:                                   # the config is really applied
            st = d.status_all()
            want = "B" if i % 2 == 0 else "A"
            sc.check("only" + want in st and "only" + ("A" if want == "B" else "B") not in st,
                     "after reload %d the templates are %s" % (i + 1, sorted(st)))
    req_res = [w.stop() for w in req]
    sc.check_ping_during(ping.stop())
    final = "B" if reloads % 2 else "A"
    st = d.wait_status(lambda st: ("only" + final) in st and
                       st["scaled"]["running"] == (3 if final == "B" else 1), 30,
                       "the last config applied")
    d.j("POST", "/processes", {"name": "__sentinel__", "cmd": "sleep", "args": ["1"],
                               "start": False})
    events = watch.stop()["events"]
    d.j("DELETE", "/processes/__sentinel__")
    sc.fig("reloads (SIGHUP -> 'reloaded' line)", "%d, p50 %s p99 %s max %s" % (
        reloads, fmt_ms(percentile(lat, 50)), fmt_ms(percentile(lat, 99)), fmt_ms(max(lat))))
    counts = collections.Counter()
    for r in req_res:
        counts.update(r["counts"])
    sc.fig("requests during the storm", "%d ok, %d failed, p99 %s max %s" % (
        counts["ok"], counts["fail"], fmt_ms(max(r["p99"] or 0 for r in req_res)),
        fmt_ms(max(r["max"] or 0 for r in req_res))))
    sc.check(not counts["fail"], "requests failed during the reload storm: %s"
             % [f for r in req_res for f in r["failures"]][:5])
    after = {name: sorted(d.live_pids(name)) for name in stable}
    sc.check(after == stable, "processes of unchanged templates were restarted: %s -> %s"
             % (stable, after))
    sc.check("api1" in d.status_all(), "the template made over HTTP did not survive the reloads")
    touched = [e for e in events if e.get("name") in stable and
               e["event"] in ("spawn", "exit", "stop", "stop_pid", "reap", "update", "restart")]
    sc.check(not touched, "events for unchanged templates during the storm: %s" % touched[:5])
    per = collections.Counter(e["event"] for e in events if e.get("name") == "changed")
    sc.fig("'changed' template spawns/exits", "%d / %d" % (per["spawn"], per["exit"]))
    sc.check(per["spawn"] == reloads, "the changed template was spawned %d times in %d reloads"
             % (per["spawn"], reloads))
    want_cmd = "sleep %d" % (100004 if final == "B" else 100003)
    pids = d.live_pids("changed")
    sc.check(pids and cmdline(pids[0]) == want_cmd, "'changed' runs %r, not %r"
             % (cmdline(pids[0]) if pids else None, want_cmd))
    sc.check_invariants(d, base, rss_allow=0)
    sc.shutdown(d, graceful=10.0)


# ---------------------------------------------------------------------------
# 6. hostile children
# ---------------------------------------------------------------------------

@scenario(6, "hostile children")
def s6_hostile(sc):
    duration = 8.0 if sc.short else 30.0
    state = os.path.join(sc.dir, "state")
    os.mkdir(state)
    prog = sc.write("hostile.py", HOSTILE_PY)
    gt = 1.0
    modes = ["ignoreterm", "forker", "closer", "nonewline", "daemonizer", "racy", "pgroup"]
    cfg = endpoint_config()
    for mode in modes:
        cfg += ("[process:hostile:%s]\ncmd = %s\nargs = %s %s %s\nredirect_output = stdout, stderr\n"
                "graceful_timeout = %s\nstartsecs = 0\nrestart_delay = 0\nstart = false\n\n"
                % (mode, PY, prog, mode, state, gt))
    cfg += "[process:warm]\ncmd = sleep 100000\nstart = false\n\n"
    d = sc.daemon(cfg).start()
    d.j("POST", "/processes/warm/_start")
    d.wait_status(lambda st: st["warm"]["running"] == 1, 10, "warm")
    d.j("POST", "/processes/warm/_stop")
    d.wait_status(lambda st: st["warm"]["running"] == 0, 10, "warm stopped")
    base = sc.baseline(d)

    def notes(kind):
        out = {}
        for name in os.listdir(state):
            if name.startswith(kind + "-") and not name.endswith(".tmp"):
                with open(os.path.join(state, name)) as f:
                    ppid, pgrp = f.read().split()
                out[int(name.split("-")[1])] = (int(ppid), int(pgrp))
        return out

    watch = sc.worker("watch", port=d.port)
    ping = sc.worker("ping", port=d.port, interval=0.1)
    d.j("POST", "/groups/hostile/_start")
    t0 = time.monotonic()
    leaked_grand = {}
    rss = []
    log_lat = []
    # a reader of the newline-less output
    nl_id = wait_until(lambda: d.j("GET", "/processes/hostile:nonewline/_pids")["pids"], 10)
    stream = socket.create_connection(("127.0.0.1", d.port), timeout=10)
    stream.sendall(("GET /streams/%d/stdout?feed=continuous&heartbeat=0 HTTP/1.1\r\n"
                    "Host: 127.0.0.1:%d\r\n\r\n" % (nl_id[0], d.port)).encode())
    status, _, _ = read_head(stream)
    sc.check(status == 200, "stream of the newline-less writer: %d" % status)
    stream.setblocking(False)
    streamed = 0
    while time.monotonic() - t0 < duration:
        try:
            while True:
                data = stream.recv(1 << 20)
                if not data:
                    break
                streamed += len(data)
        except BlockingIOError:
            pass
        # grandchildren of exited forkers must be gone
        for gpid, (ppid, _) in notes("grand").items():
            if not alive(ppid) and alive(gpid):
                leaked_grand.setdefault(gpid, time.monotonic())
            elif gpid in leaked_grand and not alive(gpid):
                del leaked_grand[gpid]
        rss.append(d.rss())
        t = time.perf_counter()
        st, body = d.api("GET", "/processes/hostile:nonewline/_log?lines=3")
        log_lat.append((time.perf_counter() - t) * 1000)
        if st == 200:
            lines = json.loads(body.decode())["lines"]
            sc.check(len(lines) <= 3 and sum(map(len, lines)) <= 64 * 1024 + 3,
                     "_log of a newline-less writer returned %d lines / %d bytes"
                     % (len(lines), sum(map(len, lines))))
        time.sleep(0.25)
    stream.close()
    stuck = [g for g, t in leaked_grand.items() if time.monotonic() - t > 0.5 and alive(g)]
    sc.fig("forker cycles / grandchildren left", "%d / %d" % (len(notes("forker")), len(stuck)))
    sc.check(not stuck, "grandchildren of exited processes still alive: %s" % stuck)
    sc.fig("newline-less writer: streamed / _log", "%.1f MB / p99 %s" % (
        streamed / MB, fmt_ms(percentile(log_lat, 99))))
    half = len(rss) // 2
    sc.fig("RSS first half / second half (max)", "%.1f / %.1f MB" % (
        max(rss[:half] or [0]) / MB, max(rss[half:] or [0]) / MB))
    sc.check(max(rss[half:] or [0]) <= max(rss[:half] or [0]) * 1.05 + 2 * MB,
             "RSS keeps growing with a newline-less writer")
    daemons = notes("daemon")
    sc.check(len(daemons) == 1, "the daemonizer made %d daemons" % len(daemons))
    for pid in daemons:
        f = proc_stat(pid)
        sc.check(f and int(f[1]) == d.pid, "the double-forked daemon %d was not adopted by gafferd "
                 "(ppid %s): no subreaper?" % (pid, f and int(f[1])))
    racy = notes("rdaemon")
    sc.fig("daemon(3) without waiting", "%s" % ("killed with its process group before its "
                                                 "setsid()" if not racy else "escaped, adopted"))
    closer = d.live_pids("hostile:closer")
    sc.check(len(closer) == 1, "the process that closed its stdout is not running (%s)" % closer)

    sc.check_ping_during(ping.stop())      # (pings would cost CPU below)
    # stop each one through the API: stopped within graceful_timeout + 1 s;
    # once the busy ones are gone, the daemon must idle beside a child with
    # closed stdout/stderr, one that ignores SIGTERM and adopted daemons
    results = {}
    for mode in ["nonewline", "forker", "idle"] + [m for m in modes
                                                   if m not in ("nonewline", "forker")]:
        if mode == "idle":
            time.sleep(0.5)
            cpu0, t0 = d.cpu(), time.monotonic()
            time.sleep(3.0)
            idle = 100.0 * (d.cpu() - cpu0) / CLK_TCK / (time.monotonic() - t0)
            sc.fig("idle CPU beside closed pipes/orphans", "%.2f %% of a core" % idle)
            sc.check(idle < 1.0, "idle CPU %.2f %% beside a child with closed stdout, a "
                     "SIGTERM-ignoring child and adopted daemons" % idle)
            continue
        name = "hostile:" + mode
        pids = d.live_pids(name)
        pg = notes("pgroup") if mode == "pgroup" else {}
        t = time.monotonic()
        d.j("POST", "/processes/%s/_stop" % name)
        ok = wait_until(lambda: not any(alive(p) for p in pids) and
                        d.j("GET", "/status/" + name)["running"] == 0, gt + 1.0, 0.01)
        results[mode] = time.monotonic() - t
        sc.check(ok, "%s not stopped within graceful_timeout + 1 s (%s still alive)"
                 % (name, [p for p in pids if alive(p)]))
        if mode == "pgroup":
            # it never gets SIGTERM (another group); the session is killed
            # when the grace period ends, within graceful_timeout + 1 s
            wait_until(lambda: not any(alive(p) for p in pg), gt + 1.0, 0.01)
            left = [p for p in pg if alive(p)]
            sc.check(not left, "the grandchild that moved to its own process group survives a stop of "
                     "%s: %s (ppid now %s)" % (name, left, [int(proc_stat(p)[1]) for p in left]))
        if mode == "forker":
            # the grandchildren got the same SIGTERM (the whole group) but
            # may die a moment after the forker the check above waited for
            wait_until(lambda: not any(alive(p) for p in notes("grand")), gt + 1.0, 0.01)
            left = [p for p in notes("grand") if alive(p)]
            sc.check(not left, "a forker's grandchild survives the stop: %s" % left)
    sc.fig("stop times", ", ".join("%s %.2f s" % kv for kv in results.items()))
    sc.check(results["ignoreterm"] >= gt - 0.05, "the SIGTERM-ignoring child stopped before "
             "graceful_timeout: %.2f s" % results["ignoreterm"])
    time.sleep(0.5)
    d.j("POST", "/processes", {"name": "__sentinel__", "cmd": "sleep", "args": ["1"],
                               "start": False})
    events = watch.stop()["events"]
    d.j("DELETE", "/processes/__sentinel__")
    ign = [e for e in events if e["event"] == "exit" and e["name"] == "hostile:ignoreterm"]
    sc.check(ign and ign[-1]["term_signal"] == 9, "exit of the SIGTERM-ignoring child: %s" % ign)
    spawned = {e["pid"] for e in events if e["event"] == "spawn"}
    exited = {e["pid"] for e in events if e["event"] == "exit"}
    sc.check(spawned == exited, "processes without an exit event: %s" % sorted(spawned - exited))
    left_daemons = [p for p in daemons if alive(p)]
    sc.fig("adopted daemons alive after the stops", "%d (killed at shutdown)" % len(left_daemons))
    states = {"hostile:" + m: {"stopped"} for m in modes}
    states["warm"] = {"stopped"}
    sc.check_invariants(d, base, states=states)
    # shutdown with everything hostile running again (the forker's exits included)
    d.j("POST", "/groups/hostile/_start")
    time.sleep(1.5)
    sc.shutdown(d, graceful=gt)


# ---------------------------------------------------------------------------
# 7. resource exhaustion
# ---------------------------------------------------------------------------

def _prlimit(pid, soft):
    """Set the soft RLIMIT_NOFILE of ``pid`` (the hard limit is kept: raising
    it again would need CAP_SYS_RESOURCE, which containers often lack)."""
    hard = nofile_limits(pid)[1]
    if shutil.which("prlimit"):
        subprocess.check_call(["prlimit", "--pid", str(pid), "--nofile=%d:%d" % (soft, hard)])
    else:                                            # the same syscall
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))


@scenario(7, "resource exhaustion")
def s7_exhaustion(sc):
    writer = sc.write("writer.py", WRITER_PY)
    disk = os.path.join(sc.dir, "disk")
    os.mkdir(disk)
    mounted = False
    if sc.args.no_mount:
        sc.note("--no-mount: the full disk is simulated with /dev/full")
    elif os.geteuid() == 0 and shutil.which("mount"):
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", disk],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        mounted = r.returncode == 0
        if mounted:
            sc.cleanups.append(lambda: subprocess.call(["umount", "-l", disk]))
        else:
            sc.note("mount -t tmpfs failed (%s): the full disk is simulated with /dev/full"
                    % r.stdout.decode().strip())
    elif not sc.args.no_mount:
        sc.note("not root or no mount: the full disk is simulated with /dev/full")
    logpath = os.path.join(disk, "writer.log")
    if not mounted:
        os.symlink(os.path.join(sc.dir, "writer-real.log"), logpath)
    cfg = endpoint_config() + (
        "[process:hog]\ncmd = sleep 100000\nnumprocesses = 10\nredirect_output = stdout, stderr\n"
        "start = false\nstartsecs = 0\nrestart_delay = 0\n\n"
        "[process:many]\ncmd = sleep 100001\nnumprocesses = 10\nredirect_output = stdout, stderr\n"
        "start = false\nstartsecs = 0\nrestart_delay = 0\n\n"
        "[process:writer]\ncmd = %s\nargs = -u %s\nredirect_output = stdout\n"
        "stdout_logfile = %s\n\n" % (PY, writer, logpath))
    d = sc.daemon(cfg).start()
    d.wait_status(lambda st: st["writer"]["running"] == 1, 20, "writer")
    wait_until(lambda: os.path.exists(logpath) and os.path.getsize(logpath) > 1000, 10)
    base = sc.baseline(d)
    ping = sc.worker("ping", port=d.port, interval=0.1, refusable=True)   # out of fds soon

    # -- EMFILE ----------------------------------------------------------------------
    limit = base.fds + 30
    _prlimit(d.pid, limit)
    sc.fig("RLIMIT_NOFILE lowered to", "%d (daemon holds %d fds)" % (limit, base.fds))
    d.j("POST", "/processes/hog/_start")
    d.wait_status(lambda st: st["hog"]["running"] == 10, 20, "hog at 10")
    errors_before = d.log().count("cannot start many")
    d.j("POST", "/processes/many/_start")
    ok = wait_until(lambda: d.log().count("cannot start many") >= errors_before + 2, 10)
    sc.check(ok, "no 'cannot start many' error line under EMFILE")
    m = re.search(r"ERROR gafferd: (cannot start many: .*)", d.log())
    if m:
        sc.fig("EMFILE error line", m.group(1)[:100])
        sc.check("Too many open files" in m.group(1) or "EMFILE" in m.group(1),
                 "the spawn error does not say 'Too many open files': %s" % m.group(1))
    st = d.j_refusable("GET", "/status/many")
    sc.fig("many under EMFILE", "%d of 10 running" % st["running"])
    sc.check(st["running"] < 10, "EMFILE was not reached (the test limit is wrong)")
    time.sleep(1.0)
    sc.check_ping_during(ping.stop(), "while spawns fail with EMFILE")
    # accept() under EMFILE: 40 connections more than there are fds for,
    # held 1.5 s, then closed: how soon does the API answer again?
    accept_errors = d.log().count("cannot accept")
    socks = []
    for _ in range(40):
        try:
            socks.append(socket.create_connection(("127.0.0.1", d.port), timeout=5))
        except OSError:
            break
    time.sleep(1.5)
    for s in socks:
        s.close()
    t = time.monotonic()
    answered = wait_until(lambda: ping_once(d.port, timeout=0.5)[1] is None, 20, 0.05)
    back = time.monotonic() - t
    sc.fig("accept() EMFILE: API back after the flood", "%.2f s (%d 'cannot accept' lines)" % (
        back, d.log().count("cannot accept") - accept_errors))
    sc.check(answered and back <= 2.0, "after a connection flood under EMFILE the API answered "
             "again only after %.1f s (the fds were free again at once)" % back)
    sc.check(d.alive(), "the daemon died under EMFILE")
    # (a listener still pausing after the flood is counted by the check above)
    wait_until(lambda: d.log().count("cannot accept") == accept_errors or
               time.time() - _last_log_time(d, "cannot accept") > 1.5, 15, 0.1)
    # (out of fds again in both recoveries: a new connection can be refused)
    ping = sc.worker("ping", port=d.port, interval=0.1, refusable=True)
    # recovery 1: processes go away
    t = time.monotonic()
    d.j_refusable("POST", "/processes/hog/_sub/10")
    d.wait_status(lambda st: st["many"]["running"] == 10 and st["hog"]["running"] == 0, 20,
                  "many at 10 once hog is gone")
    sc.fig("recovery when processes go away", "%.2f s" % (time.monotonic() - t))
    # recovery 2: the limit is raised again
    d.j_refusable("POST", "/processes/many/_add/10")
    wait_until(lambda: d.log().count("cannot start many") > errors_before + 3, 10)
    sc.check(d.j_refusable("GET", "/status/many")["running"] < 20, "EMFILE not reached again")
    t = time.monotonic()
    _prlimit(d.pid, 4096)
    d.wait_status(lambda st: st["many"]["running"] == 20, 20, "many at 20 after the limit is raised")
    sc.fig("recovery when the limit is raised", "%.2f s" % (time.monotonic() - t))
    sc.fig("spawn errors logged", "%d" % (d.log().count("cannot start many") - errors_before))
    d.j("POST", "/processes/many/_stop")
    d.wait_status(lambda st: st["many"]["running"] == 0, 20, "many stopped")

    # -- full disk ---------------------------------------------------------------------
    filler = os.path.join(disk, "filler")
    if mounted:
        vfs = os.statvfs(disk)
        free = vfs.f_bavail * vfs.f_frsize
        with open(filler, "wb") as f:
            try:
                f.write(b"\0" * max(0, free - 20 * 1024))
            except OSError:
                pass
        sc.fig("tmpfs", "1 MB, %d KB left for the log" % (os.statvfs(disk).f_bavail *
                                                           vfs.f_frsize // 1024))
    else:
        os.replace(_symlink_tmp(logpath, "/dev/full"), logpath)
        d.proc.send_signal(signal.SIGUSR1)             # reopen: now /dev/full
    full_errors = d.log().count("cannot write log file")
    ok = wait_until(lambda: d.log().count("cannot write log file") > full_errors, 15)
    sc.check(ok, "no 'cannot write log file' error line on a full disk")
    m = re.search(r"ERROR gafferd: (cannot write log file.*)", d.log())
    if m:
        sc.fig("ENOSPC error line", m.group(1)[-70:])
        sc.check("No space left" in m.group(1), "the error does not say 'No space left on device'")
    time.sleep(1.0)
    sc.check(d.alive() and ping_once(d.port)[1] is None, "the daemon is not answering on a full disk")
    ring = d.j("GET", "/processes/writer/_log?lines=1")["lines"]
    sc.check(ring, "the ring buffer stopped while the disk was full")
    last_ring = int(ring[-1].split()[1]) if ring else 0
    if mounted:
        os.unlink(filler)
    else:
        os.replace(_symlink_tmp(logpath, os.path.join(sc.dir, "writer-real.log")), logpath)
    target = os.path.realpath(logpath)

    def resumed():
        try:
            with open(target, "rb") as f:
                f.seek(max(0, os.path.getsize(target) - 4096))
                tail = f.read().splitlines()
        except OSError:
            return False
        nums = [int(l.split()[1]) for l in tail[-5:] if l.startswith(b"line ") and len(l.split()) > 1]
        return nums and max(nums) > last_ring + 20
    t = time.monotonic()
    ok = wait_until(resumed, 15, 0.1)
    sc.check(ok, "logging did not resume after space was freed")
    sc.fig("logging resumed after freeing space", "%.2f s" % (time.monotonic() - t) if ok else "NO")
    sc.check_ping_during(ping.stop(), "during recovery and a full disk")
    sc.check_invariants(d, base, states={"hog": {"running"}, "many": {"stopped"}})
    sc.shutdown(d, graceful=10.0)


def _last_log_time(d, needle):
    """Epoch time of the last daemon log line holding ``needle`` (0 if none)."""
    stamp = None
    for line in d.log().splitlines():
        if needle in line:
            stamp = line[:23]
    if not stamp:
        return 0.0
    return time.mktime(time.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S")) + int(stamp[20:23]) / 1000.0


def _symlink_tmp(path, target):
    tmp = path + ".new"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(target, tmp)
    return tmp


# ---------------------------------------------------------------------------
# 8. last output of a crashing process
# ---------------------------------------------------------------------------

class _Reader(threading.Thread):
    """Reads one streaming reply to its end in a thread."""

    def __init__(self, port, path, kind):
        threading.Thread.__init__(self, daemon=True)
        self.kind = kind
        self.data = bytearray()
        self.events = []
        self.error = None
        self.ended = False
        if kind == "ws":
            self.sock, self.rest = ws_connect(port, path)
        else:
            self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
            self.sock.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (path, port)).encode())
            status, headers, self.rest = read_head(self.sock)
            if status != 200:
                raise Failure("GET %s -> %d" % (path, status))
        self.sock.settimeout(30)
        self.start()

    def run(self):
        try:
            if self.kind == "ws":
                dec = WSDecoder()
                data = self.rest
                while True:
                    for opcode, fin, payload in dec.feed(data):
                        if opcode in (0, 1, 2):
                            self.events.append(payload)
                        elif opcode == 8:
                            self.ended = True
                            self.sock.sendall(ws_client_frame(8, payload[:2]))
                            return
                    data = self.sock.recv(1 << 20)
                    if not data:
                        return
            dec = ChunkDecoder()
            data = self.rest
            while True:
                for piece in dec.feed(data):
                    self.data += piece
                if dec.ended:
                    self.ended = True
                    return
                data = self.sock.recv(1 << 20)
                if not data:
                    return
        except Exception as exc:
            self.error = repr(exc)
        finally:
            self.sock.close()


def sse_bytes(raw, start=None):
    """Rebuild the output bytes from SSE events (one ``data:`` per line, the
    ``id:`` = byte offset after the chunk; ``start`` = the offset before
    the first event, if known)."""
    out = bytearray()
    last = start
    problems = []
    for block in bytes(raw).split(b"\r\n\r\n"):
        if not block.strip():
            continue
        ident, data = None, []
        for line in block.split(b"\r\n"):
            if line.startswith(b"id: "):
                ident = int(line[4:])
            elif line.startswith(b"data: "):
                data.append(line[6:])
            elif line == b"data:":
                data.append(b"")
        if ident is None:
            continue
        payload = b"\n".join(data)
        if last is not None:
            delta = ident - last
            if len(payload) + 1 == delta:
                payload += b"\n"
            elif len(payload) != delta:
                problems.append("event id %d: %d bytes for a delta of %d" % (ident, len(payload), delta))
        last = ident
        out += payload
    return bytes(out), problems, last


@scenario(8, "last output of a crashing process")
def s8_last_output(sc):
    rounds = 30 if sc.short else 100
    prog = sc.write("lastword.py", LASTWORD_PY)
    logs = os.path.join(sc.dir, "logs")
    os.mkdir(logs)
    cfg = endpoint_config() + (
        "[process:last]\ncmd = %s\nargs = -u %s\nredirect_output = stdout, stderr\n"
        "redirect_input = true\nstdout_logfile = logs/last.out\nstderr_logfile = logs/last.err\n"
        "startsecs = 0\nrestart_delay = 0\noutput_buffer = 256KB\n\n" % (PY, prog))
    d = sc.daemon(cfg).start()
    out_log, err_log = os.path.join(logs, "last.out"), os.path.join(logs, "last.err")
    sizes = [10, 4000, 65536, 200000, 70000, 1000, 300000]
    modes = ["kill", "abort", "exit"]
    rng = random.Random(7)

    def one_round(i, check=True):
        size = sizes[i % len(sizes)]
        mode = modes[i % len(modes)]
        tail = "nl" if i % 2 else "nonl"
        ident = wait_until(lambda: d.j("GET", "/processes/last/_pids")["pids"], 10, 0.02)
        if not ident:
            raise Failure("no live 'last' process")
        ident = ident[0]
        seed = rng.randrange(1, 10 ** 6)
        expected = expected_lastword(size, seed, tail)
        off_out = os.path.getsize(out_log) if os.path.exists(out_log) else 0
        off_err = os.path.getsize(err_log) if os.path.exists(err_log) else 0
        r_cont = _Reader(d.port, "/streams/%d/stdout?feed=continuous&heartbeat=0" % ident, "stream")
        r_sse = _Reader(d.port, "/streams/%d/stdout?feed=eventsource&heartbeat=0" % ident, "sse")
        r_ws = _Reader(d.port, "/wstreams/%d" % ident, "ws")
        time.sleep(0.05)
        d.j("POST", "/streams/%d/stdin" % ident, "GO %d %d %s %s\n" % (size, seed, mode, tail))
        for r in (r_cont, r_sse, r_ws):
            r.join(30)
        if not check:
            return 0
        problems = []
        for r in (r_cont, r_sse, r_ws):
            if r.error or not r.ended:
                problems.append("%s reader: ended=%s error=%s" % (r.kind, r.ended, r.error))
        if bytes(r_cont.data) != expected:
            problems.append("continuous stream: %d of %d bytes, ends %r" % (
                len(r_cont.data), len(expected), bytes(r_cont.data[-40:])))
        # nothing went to stdout before GO: the first event starts at offset 0
        sse, sse_problems, _ = sse_bytes(r_sse.data, start=0)
        problems += sse_problems[:2]
        if sse != expected:
            problems.append("eventsource: %d of %d bytes, ends %r" % (len(sse), len(expected),
                                                                     sse[-40:]))
        ws_out = b"".join(m for m in r_ws.events if m not in LASTWORD_ERR)
        ws_err = [m for m in r_ws.events if m in LASTWORD_ERR]
        if ws_out != expected:
            problems.append("websocket: %d of %d stdout bytes, ends %r" % (
                len(ws_out), len(expected), ws_out[-40:]))
        if len(ws_err) != 2:
            problems.append("websocket: %d of 2 stderr messages" % len(ws_err))
        with open(out_log, "rb") as f:
            f.seek(off_out)
            logged = f.read()
        if logged != expected:
            problems.append("stdout_logfile: %d of %d bytes, ends %r" % (
                len(logged), len(expected), logged[-40:]))
        with open(err_log, "rb") as f:
            f.seek(off_err)
            logged_err = f.read()
        if logged_err != b"".join(LASTWORD_ERR):
            problems.append("stderr_logfile: %r" % logged_err[-120:])
        lines = d.j("GET", "/processes/last/_log?lines=20&pid=%d" % ident)["lines"]
        want = expected.decode().split("\n")
        if want[-1] == "":
            want = want[:-1]
        if lines != want[-20:]:
            problems.append("ring buffer (_log): last lines %r, want %r" % (lines[-2:], want[-2:]))
        elines = d.j("GET", "/processes/last/_log?lines=5&label=stderr&pid=%d" % ident)["lines"]
        if elines[-1:] != [LASTWORD_ERR[1].decode().strip()]:
            problems.append("ring buffer stderr: %r" % elines[-2:])
        sc.check(not problems, "round %d (%d bytes, %s, %s): %s" % (i, size, mode, tail,
                                                                    "; ".join(problems)))
        return len(expected)

    # warm-up: every size at least once, and enough rounds that the daemon
    # keeps its full set of recent processes (with their ring buffers)
    for i in range(max(len(sizes), 12)):
        one_round(i, check=False)
        d.wait_status(lambda st: st["last"]["running"] == 1, 10, "respawn")
    d.wait_status(lambda st: st["last"]["running"] == 1, 10, "respawn")
    base = sc.baseline(d)
    ping = sc.worker("ping", port=d.port, interval=0.1)
    total = 0
    t0 = time.monotonic()
    for i in range(rounds):
        total += one_round(i + 1)
        if len(sc.failures) > 5:
            break
    sc.fig("crash rounds (kill -9, abort, exit 3)", "%d, %.1f MB checked in %.1f s" % (
        rounds, total / MB, time.monotonic() - t0))
    sc.fig("checked paths", "continuous stream, eventsource, websocket, log files, _log ring")
    sc.check_ping_during(ping.stop())
    sc.check_invariants(d, base, fd_allow=2, fd_why="last.out/last.err may be open or closed")
    sc.shutdown(d, graceful=10.0)


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------
# ---------------------------------------------------------------------------
# 9. hostile connections
# ---------------------------------------------------------------------------

def _make_cert(sc):
    """A self-signed certificate for 127.0.0.1 (the openssl command)."""
    if not shutil.which("openssl"):
        raise Failure("scenario 9 needs the openssl command to make a test certificate")
    certfile, keyfile = os.path.join(sc.dir, "cert.pem"), os.path.join(sc.dir, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                    "-keyout", keyfile, "-out", certfile, "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    return certfile, keyfile


def _tls_ping(port, certfile, timeout=5.0):
    """GET /ping over TLS: None if answered 200 OK, else what went wrong."""
    import ssl
    ctx = ssl.create_default_context(cafile=certfile)
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=ctx)
    try:
        conn.request("GET", "/ping")
        resp = conn.getresponse()
        body = resp.read()
        return None if (resp.status, body) == (200, b"OK") else "%d %r" % (resp.status, body[:80])
    except (OSError, http.client.HTTPException) as exc:
        return repr(exc)
    finally:
        conn.close()


@scenario(9, "hostile connections")
def s9_hostile_connections(sc):
    """Clients that pipeline without reading and TLS clients that never
    handshake: the daemon's memory stays bounded, every such connection
    is closed by the deadline of its state (request_timeout) and its slot
    freed, and /ping is answered throughout."""
    npipe = 100
    ntls = 50 if sc.short else 200
    rt = 3.0 if sc.short else 30.0
    certfile, keyfile = _make_cert(sc)
    cfg = ("[gaffer]\nhttp_endpoints = main, tls\nrequest_timeout = %s\n\n"
           "[endpoint:main]\nbind = 127.0.0.1:0\n\n"
           "[endpoint:tls]\nbind = 127.0.0.1:0\ncertfile = %s\nkeyfile = %s\n"
           "max_connections = %d\n\n"
           "[process:bystander]\ncmd = sleep 100000\n" % (rt, certfile, keyfile, ntls))
    d = sc.daemon(cfg).start()
    m = re.search(r"listening on https://127\.0\.0\.1:(\d+)", d.log())
    if not m:
        raise Failure("no https listener in the log:\n%s" % d.log()[-2000:])
    tls_port = int(m.group(1))
    d.wait_status(lambda st: st["bystander"]["running"] == 1, 20, "bystander running")
    # warm-up: the same load, small, until the daemon has closed it all
    warm = [sc.worker("pipeline", port=d.port, n=10, max_s=rt * 3 + 20),
            sc.worker("nohandshake", port=tls_port, n=5)]
    for w in warm:
        w.stop(timeout=rt + 30, finish=True)
    base = sc.baseline(d)
    ping = sc.worker("ping", port=d.port, interval=0.05)
    t0 = time.monotonic()
    tls_w = sc.worker("nohandshake", port=tls_port, n=ntls)
    pipe_w = sc.worker("pipeline", port=d.port, n=npipe, max_s=rt * 3 + 20)
    sc.fig("hostile connections", "%d pipelining without reading, %d TLS never handshaking "
           "(request_timeout %.0f s, TLS max_connections %d)" % (npipe, ntls, rt, ntls))
    # the TLS slots are all taken now: a real TLS client is refused ...
    full = _tls_ping(tls_port, certfile, timeout=2.0)
    sc.fig("TLS /ping while the slots are held", full or "answered")
    peak = 0
    while any(w.proc.poll() is None for w in (tls_w, pipe_w)) and time.monotonic() - t0 < rt * 3 + 60:
        peak = max(peak, d.rss())
        time.sleep(0.1)
    tls_res = tls_w.stop(timeout=10, finish=True)
    pipe_res = pipe_w.stop(timeout=10, finish=True)
    elapsed = time.monotonic() - t0
    # ... and answered once the deadline has freed them
    after = _tls_ping(tls_port, certfile)
    ping_res = ping.stop()
    sc.fig("pipelined bytes sent", "%.1f MB in all, %.2f MB at most per connection (mostly "
           "left in the clients' own socket buffers), %.1f s of "
           "flooding" % (pipe_res["sent_total"] / MB, pipe_res["sent_max"] / MB,
                         pipe_res["flood_s"]))
    sc.fig("RSS peak / baseline", "%.1f MB / %.1f MB" % (peak / MB, base.rss / MB))
    sc.check(peak <= base.rss + 40 * MB, "RSS peaked at %.1f MB, baseline %.1f MB: the "
             "connections' buffers are not bounded" % (peak / MB, base.rss / MB))
    sc.check(pipe_res["sent_max"] < 12 * MB, "one connection got %.1f MB of requests in "
             "without reading a reply" % (pipe_res["sent_max"] / MB))
    for what, res in (("pipelining", pipe_res), ("TLS", tls_res)):
        sc.fig("%s connections closed by the daemon" % what, "%d of %d, %s-%s s after their last "
               "byte" % (res["closed_by_server"], res["opened"],
                         "%.1f" % res["closed_after_min"] if res["closed_after_min"] else "-",
                         "%.1f" % res["closed_after_max"] if res["closed_after_max"] else "-"))
        sc.check(res["opened"] and res["closed_by_server"] == res["opened"],
                 "%s: %d of %d connections were never closed by the daemon (%s)"
                 % (what, res["opened"] - res["closed_by_server"], res["opened"], res["errors"][:3]))
        # the deadline counts from the daemon's last progress: its last
        # read, plus the time it took to answer what it read (the whole
        # flood is answered in turns, a few requests per connection each)
        slack = 2.0 if what == "TLS" else 2.0 + pipe_res["flood_s"]
        sc.check(res["closed_after_max"] is not None and res["closed_after_max"] <= rt + slack,
                 "%s: a connection was closed %.1f s after its last byte (request_timeout %.0f s "
                 "+ %.1f s)" % (what, res["closed_after_max"] or -1, rt, slack))
    sc.check(full is not None, "a TLS client was answered while every TLS slot was held")
    sc.check(after is None, "TLS /ping after the deadline freed the slots: %s" % after)
    sc.fig("all closed after", "%.1f s" % elapsed)
    sc.check_ping_during(ping_res)
    sc.check_invariants(d, base)
    sc.shutdown(d, graceful=10.0)


def gafferd_version():
    """(sha1, mtime) of the gafferd.py under test."""
    with open(GAFFERD, "rb") as f:
        digest = hashlib.sha1(f.read()).hexdigest()
    return digest, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(GAFFERD)))


def main(argv=None):
    global PING_LIMIT_MS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="CI version of every scenario")
    parser.add_argument("--only", help="comma-separated scenario numbers, e.g. 1,3")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directories")
    parser.add_argument("--no-mount", action="store_true",
                        help="scenario 7: simulate the full disk with /dev/full, no tmpfs")
    parser.add_argument("--ping-limit", type=float, default=PING_LIMIT_MS, metavar="MS",
                        help="/ping latency limit (default %(default)s ms)")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    PING_LIMIT_MS = args.ping_limit
    if args.worker:
        worker_main(*args.worker)
        return 0
    if not sys.platform.startswith("linux"):
        print("soak/run.py needs Linux (/proc)", file=sys.stderr)
        return 2
    wanted = list(SCENARIOS)
    if args.only:
        wanted = [int(x) for x in args.only.split(",") if x.strip()]
        unknown = [n for n in wanted if n not in SCENARIOS]
        if unknown:
            parser.error("unknown scenario(s) %s; known: %s" % (unknown, list(SCENARIOS)))
    results = collections.OrderedDict()
    t_all = time.monotonic()
    version = gafferd_version()
    log("gafferd soak suite (%s), %s, %d CPUs", "short" if args.short else "full",
        sys.version.split()[0], os.cpu_count())

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    for num in wanted:
        title, fn = SCENARIOS[num]
        sc = Scenario(num, title, args)
        log("== scenario %d: %s (%s) in %s", num, title, "short" if args.short else "full", sc.dir)
        sc.fig("machine load average (1 min)", "%.1f at start" % os.getloadavg()[0])
        t0 = time.monotonic()
        try:
            fn(sc)
        except Failure as exc:
            sc.failures.append(str(exc))
            log("  FAIL: %s", exc)
        except KeyboardInterrupt:
            sc.failures.append("interrupted")
            sc.cleanup()
            raise
        except Exception:
            sc.failures.append("soak script error:\n" + traceback.format_exc())
            log("  ERROR:\n%s", traceback.format_exc())
        finally:
            sc.cleanup()
        secs = time.monotonic() - t0
        results[num] = {"title": title, "ok": not sc.failures, "seconds": round(secs, 1),
                        "figures": sc.figures, "failures": sc.failures, "notes": sc.notes,
                        "dir": sc.dir}
        log("== scenario %d %s in %.1f s", num, "PASSED" if not sc.failures else "FAILED", secs)
        if not sc.failures and not args.keep:
            shutil.rmtree(sc.dir, ignore_errors=True)
    total = time.monotonic() - t_all
    changed = gafferd_version() != version
    print()
    print("gafferd.py sha1 %s (%s)%s" % (version[0][:12], version[1], "; CHANGED during the run, "
                                         "figures are mixed" if changed else ""))
    print("gafferd soak (%s): %d scenario(s) in %.1f s" % ("short" if args.short else "full",
                                                         len(results), total))
    for num, r in results.items():
        print("\n%d. %s: %s (%.1f s)" % (num, r["title"], "PASS" if r["ok"] else "FAIL", r["seconds"]))
        for k, v in r["figures"].items():
            if not k.endswith(("_ms", "_s", "_pct")):
                print("   %-36s %s" % (k, v))
        for n in r["notes"]:
            print("   note: %s" % n)
        for f in r["failures"]:
            print("   FAILED: %s" % f)
        if not r["ok"]:
            print("   (files kept in %s)" % r["dir"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mode": "short" if args.short else "full", "seconds": round(total, 1),
                       "gafferd_sha1": version[0], "gafferd_mtime": version[1],
                       "gafferd_changed_during_run": changed,
                       "python": sys.version.split()[0], "scenarios": results}, f, indent=2,
                      default=str)
    failed = [n for n, r in results.items() if not r["ok"]]
    if failed:
        print("\nFAILED scenario(s): %s" % ", ".join(map(str, failed)))
        return 1
    print("\nall scenarios passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
