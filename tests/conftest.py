"""Shared test harness: run the real ``gafferd.py`` and talk to it.

Every wait in the suite goes through :func:`wait_for`, which polls a
condition until a deadline; no test sleeps for a fixed time.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import signal as _signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GAFFERD = os.path.join(ROOT, "gafferd.py")
EXAMPLES = os.path.join(ROOT, "examples")
PY = sys.executable


def wait_for(predicate, timeout=10.0, interval=0.01, message="condition"):
    """Poll ``predicate`` until it returns a truthy value; return that value.

    Fails the test with ``message`` when ``timeout`` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail("timed out after %.1fs waiting for %s" % (timeout, message))
        time.sleep(interval)


def run_loop_until(loop, predicate, timeout=5.0, message="loop condition"):
    """Run an in-process gafferd.Loop until ``predicate()``; each iteration
    is bounded by a 50 ms timer, so a condition nothing wakes is seen."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for " + message
        loop.call_later(0.05, lambda: None)
        loop.run_once()


def pid_alive(pid):
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def zombie_children(ppid):
    """OS pids of zombie processes whose parent is ``ppid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == ppid:
            found.append(int(entry))
    return found


def children_of(ppid):
    """OS pids of live (non-zombie) processes whose parent is ``ppid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[1]) == ppid:
            found.append(int(entry))
    return found


def descendants(pid):
    """Every live descendant of ``pid`` (children, grandchildren, ...)."""
    kids = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in kids.get(todo.pop(), ()):
            out.append(child)
            todo.append(child)
    return out


def open_fds(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers  # dict with lower-case keys
        self.body = body

    def json(self):
        return json.loads(self.body.decode("utf-8"))

    def __repr__(self):
        return "<Response %d %r>" % (self.status, self.body[:200])


class Daemon:
    """One real ``python3 gafferd.py`` process in a temporary directory.

    ``config`` is INI text (dedented); unless it names its own endpoints the
    harness adds ``--bind 127.0.0.1:0`` so every daemon gets an ephemeral
    port, which is read back from the ``listening on`` log line.
    """

    def __init__(self, tmp_path, config=None, args=(), env=None, bind=True,
                 config_name="gaffer.ini"):
        self.dir = str(tmp_path)
        self.config_path = None
        if config is not None:
            self.config_path = os.path.join(self.dir, config_name)
            with open(self.config_path, "w") as f:
                f.write(textwrap.dedent(config))
        self.args = list(args)
        if bind and "--bind" not in self.args and (config is None or "[endpoint:" not in config):
            self.args += ["--bind", "127.0.0.1:0"]
        self.env = dict(os.environ)
        self.env.pop("PYTHONWARNINGS", None)
        if env:
            self.env.update(env)
        self.proc = None
        self.port = None
        self.urls = []
        self.log_path = os.path.join(self.dir, "gafferd.log")
        self.out_path = os.path.join(self.dir, "gafferd.out")

    # -- life cycle ---------------------------------------------------------
    def start(self, wait_ready=True, timeout=15.0):
        argv = [PY, GAFFERD] + self.args
        if self.config_path:
            argv.append(self.config_path)
        self._log = open(self.log_path, "wb")
        self._out = open(self.out_path, "wb")
        self.proc = subprocess.Popen(argv, cwd=self.dir, stdout=self._out,
                                     stderr=self._log, stdin=subprocess.DEVNULL,
                                     env=self.env)
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout=15.0):
        def ready():
            if self.proc.poll() is not None:
                pytest.fail("gafferd exited with %s:\n%s" % (self.proc.returncode, self.log()))
            return "ready (pid" in self.log()
        wait_for(ready, timeout, message="gafferd to be ready")
        self.urls = re.findall(r"listening on (\S+)", self.log())
        for url in self.urls:
            m = re.match(r"https?://(?:127\.0\.0\.1|localhost):(\d+)$", url)
            if m:
                self.port = int(m.group(1))
                break
        return self

    def log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def output(self):
        with open(self.out_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    @property
    def pid(self):
        return self.proc.pid

    def signal(self, signum):
        self.proc.send_signal(signum)

    def stop(self, signum=_signal.SIGTERM, timeout=20.0):
        """Send ``signum`` and wait for the daemon to exit; return its status."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail("gafferd did not exit within %.0fs of signal %d:\n%s"
                        % (timeout, signum, self.log()))

    def close(self):
        """Stop the daemon (SIGTERM, then SIGKILL) and anything it left."""
        if self.proc is not None and self.proc.poll() is None:
            left = descendants(self.proc.pid)
            self.proc.send_signal(_signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            for pid in left:
                try:
                    os.kill(pid, _signal.SIGKILL)
                except OSError:
                    pass
        for f in (getattr(self, "_log", None), getattr(self, "_out", None)):
            if f:
                f.close()

    # -- HTTP -----------------------------------------------------------------
    def connection(self, timeout=10.0):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method, path, body=None, headers=None, timeout=10.0):
        conn = self.connection(timeout)
        try:
            if isinstance(body, (dict, list)):
                body = json.dumps(body)
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
        finally:
            conn.close()

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body=b"", **kw):
        return self.request("POST", path, body=body, **kw)

    def json(self, method, path, body=None, expect=200):
        r = self.request(method, path, body=body)
        assert r.status == expect, r
        return r.json()

    def status(self, name):
        return self.json("GET", "/status/" + name)

    def pids(self, name):
        """Internal ids of the live processes of template ``name``."""
        return self.json("GET", "/processes/%s/_pids" % name)["pids"]

    def os_pid(self, internal_id):
        return self.json("GET", "/processes/%d" % internal_id)["os_pid"]

    def wait_running(self, name, count, timeout=10.0):
        return wait_for(lambda: self.status(name)["running"] == count, timeout,
                        message="%s to have %d running" % (name, count))

    def wait_replacement(self, name, old_id, timeout=10.0):
        """The internal id of the process that replaced ``old_id`` (ids only
        grow). Waiting on ``running`` alone is not enough: a killed process
        still counts until the daemon reaps it."""
        return wait_for(lambda: (lambda p: p and p[0] > old_id and p[0])(self.pids(name)),
                        timeout, message="a replacement for process %d of %s" % (old_id, name))


@pytest.fixture
def daemon_factory(tmp_path):
    """Make ``Daemon`` objects that are killed at the end of the test."""
    made = []

    def make(config=None, start=True, **kw):
        d = Daemon(tmp_path, config, **kw)
        made.append(d)
        if start:
            d.start()
        return d

    yield make
    for d in made:
        d.close()


@pytest.fixture
def gafferd(daemon_factory):
    """The name most test files use for ``daemon_factory``."""
    return daemon_factory


def run_gafferd(args, cwd=None, timeout=30.0, env=None):
    """Run gafferd.py to completion (``--check``, ``--version``, bad configs)."""
    e = dict(os.environ)
    if env:
        e.update(env)
    return subprocess.run([PY, GAFFERD] + list(args), cwd=cwd, timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL, env=e, universal_newlines=True)


# -- helpers for process and event tests (appended) ---------------------------

def proc_cmdline(pid):
    """argv of ``pid`` as a list of str ([] if gone or a zombie)."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0")[:-1]]


def proc_status(pid):
    """/proc/PID/status as a dict of str -> str (empty if gone)."""
    try:
        with open("/proc/%d/status" % pid) as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def proc_pgid(pid):
    """Process group id of ``pid`` or None if it is gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return int(f.read().rsplit(")", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return None


def live_in_groups(pgids):
    """OS pids of live (non-zombie) processes whose process group is in ``pgids``."""
    pgids = set(pgids)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) in pgids:
            found.append(int(entry))
    return found


def holds_for(predicate, duration, interval=0.02, message="condition"):
    """Check that ``predicate`` stays truthy for ``duration`` seconds."""
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        if not predicate():
            pytest.fail("%s stopped holding" % message)
        time.sleep(interval)


class EventWatcher:
    """Read ``GET /watch...?feed=continuous`` (one JSON object per line).

    Events are collected by a background thread as ``(monotonic_time, dict)``.
    """

    def __init__(self, daemon, pattern="", query="feed=continuous&heartbeat=0"):
        import threading
        path = "/watch" + ("/" + pattern.strip("/") if pattern else "") + "?" + query
        self.conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=None)
        self.conn.request("GET", path)
        self.sock = self.conn.sock
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200, (self.resp.status, self.resp.read())
        self.timed = []
        self.errors = []
        self.closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            try:
                line = self.resp.readline()
            except Exception as exc:  # connection closed under us
                if not self.closed:
                    self.errors.append(repr(exc))
                break
            if not line:
                break
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line.decode("utf-8"))
            except ValueError:
                self.errors.append(line)
                continue
            with self._lock:
                self.timed.append((time.monotonic(), event))

    @property
    def events(self):
        with self._lock:
            return [e for _, e in self.timed]

    def names(self, name=None):
        """Event names, optionally only those whose payload ``name`` matches."""
        return [e["event"] for e in self.events if name is None or e.get("name") == name]

    def wait(self, predicate, timeout=10.0, message="events"):
        """Wait until ``predicate(events)`` is truthy; return the events."""
        deadline = time.monotonic() + timeout
        while True:
            events = self.events
            if predicate(events):
                return events
            if time.monotonic() > deadline:
                pytest.fail("timed out after %.1fs waiting for %s; got %r"
                            % (timeout, message, [e.get("event") for e in events]))
            time.sleep(0.01)

    def close(self):
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.conn.close()


# -- raw HTTP helpers for the HTTP server, API and security tests (appended) --

_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9])(?: ([^\r\n]*))?\Z")
_HEADER_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([^\r\n]*?)[ \t]*\Z")
_CHUNK_SIZE = re.compile(rb"([0-9a-fA-F]+)[ \t]*(?:;[^\r\n]*)?\Z")


class MalformedResponse(AssertionError):
    pass


class RawResponse:
    """One parsed HTTP response (``headers``: list of (lower-case name, value))."""

    def __init__(self, status, reason, headers, body, raw):
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body
        self.raw = raw

    def header(self, name, default=None):
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return default

    def header_all(self, name):
        return [v for k, v in self.headers if k == name.lower()]

    def json(self):
        return json.loads(self.body.decode("utf-8"))

    def __repr__(self):
        return "<RawResponse %d %r>" % (self.status, self.body[:200])


def parse_http_response(buf, eof=False, head=False):
    """Strictly parse one response at the start of ``buf``.

    Returns ``(response, bytes_consumed)``, or ``None`` when more data is
    needed (``eof`` says none will come). Raises ``MalformedResponse``.
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if eof and buf:
            raise MalformedResponse("truncated response head: %r" % buf[:300])
        if len(buf) > 65536:
            raise MalformedResponse("response head too long")
        return None
    lines = buf[:end].split(b"\r\n")
    if any(b"\n" in line or b"\r" in line for line in lines):
        raise MalformedResponse("bare CR or LF in response head: %r" % buf[:end])
    m = _STATUS_LINE.match(lines[0])
    if not m:
        raise MalformedResponse("bad status line %r" % lines[0])
    status = int(m.group(1))
    reason = (m.group(2) or b"").decode("latin-1")
    headers = []
    for line in lines[1:]:
        h = _HEADER_LINE.match(line)
        if not h:
            raise MalformedResponse("bad header line %r" % line)
        headers.append((h.group(1).decode("latin-1").lower(), h.group(2).decode("latin-1")))
    pos = end + 4
    names = [k for k, _ in headers]
    if head or 100 <= status < 200 or status in (204, 304):
        return RawResponse(status, reason, headers, b"", buf[:pos]), pos
    te = [v for k, v in headers if k == "transfer-encoding"]
    cl = [v for k, v in headers if k == "content-length"]
    if te:
        if te[-1].strip().lower() != "chunked" or cl:
            raise MalformedResponse("bad framing headers %r" % headers)
        body = b""
        while True:
            nl = buf.find(b"\r\n", pos)
            if nl < 0:
                if eof:
                    raise MalformedResponse("truncated chunked body")
                return None
            c = _CHUNK_SIZE.match(buf[pos:nl])
            if not c:
                raise MalformedResponse("bad chunk size line %r" % buf[pos:nl])
            size = int(c.group(1), 16)
            pos = nl + 2
            if size == 0:
                while True:  # trailers
                    nl = buf.find(b"\r\n", pos)
                    if nl < 0:
                        if eof:
                            raise MalformedResponse("truncated trailers")
                        return None
                    line = buf[pos:nl]
                    pos = nl + 2
                    if not line:
                        return RawResponse(status, reason, headers, body, buf[:pos]), pos
                    if not _HEADER_LINE.match(line):
                        raise MalformedResponse("bad trailer %r" % line)
            if len(buf) < pos + size + 2:
                if eof:
                    raise MalformedResponse("truncated chunk")
                return None
            if buf[pos + size:pos + size + 2] != b"\r\n":
                raise MalformedResponse("chunk not followed by CRLF")
            body += buf[pos:pos + size]
            pos += size + 2
    if cl:
        if len(set(v.strip() for v in cl)) != 1 or not cl[0].strip().isdigit():
            raise MalformedResponse("bad Content-Length %r" % cl)
        size = int(cl[0])
        if len(buf) < pos + size:
            if eof:
                raise MalformedResponse("truncated body (%d of %d bytes)" % (len(buf) - pos, size))
            return None
        return RawResponse(status, reason, headers, buf[pos:pos + size], buf[:pos + size]), pos + size
    assert "content-length" not in names
    if not eof:
        return None  # close-delimited body
    return RawResponse(status, reason, headers, buf[pos:], buf), len(buf)


class RawClient:
    """A plain (or given) socket speaking raw HTTP bytes to the daemon."""

    def __init__(self, port=None, host="127.0.0.1", sock=None, timeout=10.0):
        if sock is None:
            sock = socket.create_connection((host, port), timeout=timeout)
        sock.settimeout(timeout)
        self.sock = sock
        self.timeout = timeout
        self.buf = b""
        self.eof = False

    def send(self, data):
        if isinstance(data, str):
            data = data.encode("latin-1")
        self.sock.sendall(data)

    def _fill(self, deadline):
        if self.eof:
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("no complete response in time; have %r" % self.buf[:300])
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def read_response(self, head=False, timeout=None):
        """Next response; raises EOFError if the peer closed before any byte."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            parsed = parse_http_response(self.buf, self.eof, head)
            if parsed is not None:
                resp, used = parsed
                self.buf = self.buf[used:]
                return resp
            if not self._fill(deadline) and not self.buf:
                raise EOFError("connection closed by the daemon")

    def request(self, data, head=False, timeout=None):
        self.send(data)
        return self.read_response(head=head, timeout=timeout)

    def wait_closed(self, timeout=5.0):
        """True if the daemon closes the connection within ``timeout`` seconds
        (data that arrives meanwhile is kept in ``buf``)."""
        deadline = time.monotonic() + timeout
        try:
            while self._fill(deadline):
                pass
        except socket.timeout:
            return False
        return True

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def http_request_bytes(method, path, host="127.0.0.1", headers=(), body=None,
                       version="HTTP/1.1"):
    """Build a raw request; ``Content-Length`` is added when ``body`` is given."""
    lines = ["%s %s %s" % (method, path, version)]
    if host is not None:
        lines.append("Host: %s" % host)
    for name, value in headers:
        lines.append("%s: %s" % (name, value))
    if body is not None:
        if isinstance(body, str):
            body = body.encode("utf-8")
        lines.append("Content-Length: %d" % len(body))
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + (body or b"")


# -- streaming helpers for /streams, /watch and stats feeds (appended) --------

class StreamReply:
    """One request on a raw socket whose reply body is read as it arrives
    (``curl -N``). The chunked transfer coding is decoded here, strictly.

    ``read()`` returns the next decoded piece of body as soon as it is on
    the wire; ``body`` keeps everything read so far (unless ``keep=False``).
    Waits raise ``TimeoutError`` at their deadline.
    """

    def __init__(self, port, path, method="GET", headers=None, body=b"",
                 rcvbuf=None, keep=True, timeout=10.0):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        lines = ["%s %s HTTP/1.1" % (method, path), "Host: 127.0.0.1:%d" % port]
        lines += ["%s: %s" % item for item in (headers or {}).items()]
        if body:
            lines.append("Content-Length: %d" % len(body))
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        self.keep = keep
        self.raw = bytearray()   # received, not yet decoded
        self.body = bytearray()  # decoded body so far (if keep)
        self.status = None
        self.headers = {}
        self.chunked = False
        self.left = None         # bytes left of a Content-Length body
        self.ended = False       # the whole reply body has been read
        self.eof = False         # the daemon closed the connection
        self._state = "size"     # chunk decoder: size, data, crlf, trailer
        self._chunk_left = 0

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def _fill(self, deadline, what):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no %s in time; body so far ends %r"
                               % (what, bytes(self.body[-200:])))
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(262144)
        except socket.timeout:
            raise TimeoutError("no %s in time; body so far ends %r"
                               % (what, bytes(self.body[-200:])))
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
        self.raw += data

    def read_headers(self, timeout=10.0):
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.raw:
            if self.eof:
                raise AssertionError("connection closed before the reply head: %r"
                                     % bytes(self.raw))
            self._fill(deadline, "reply head")
        head, _, rest = bytes(self.raw).partition(b"\r\n\r\n")
        self.raw = bytearray(rest)
        lines = head.decode("latin-1").split("\r\n")
        m = re.match(r"HTTP/1\.[01] (\d{3})( |$)", lines[0])
        assert m, "bad status line %r" % lines[0]
        self.status = int(m.group(1))
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            assert sep and name.strip() == name, "bad header line %r" % line
            self.headers[name.lower()] = value.strip()
        self.chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
        if not self.chunked and "content-length" in self.headers:
            self.left = int(self.headers["content-length"])
            self.ended = self.left == 0
        return self

    def _decode(self):
        raw, out = self.raw, bytearray()
        if not self.chunked:
            take = len(raw) if self.left is None else min(self.left, len(raw))
            out += raw[:take]
            del raw[:take]
            if self.left is not None:
                self.left -= take
                self.ended = self.left == 0
            return out
        while not self.ended:
            if self._state == "size":
                i = raw.find(b"\r\n")
                if i < 0:
                    assert len(raw) < 1024, "chunk size line too long: %r" % bytes(raw[:60])
                    break
                line = bytes(raw[:i])
                del raw[:i + 2]
                m = re.match(rb"([0-9a-fA-F]+)[ \t]*(;.*)?\Z", line)
                assert m, "bad chunk size line %r" % line
                self._chunk_left = int(m.group(1), 16)
                self._state = "data" if self._chunk_left else "trailer"
            elif self._state == "data":
                if not raw:
                    break
                take = min(self._chunk_left, len(raw))
                out += raw[:take]
                del raw[:take]
                self._chunk_left -= take
                if not self._chunk_left:
                    self._state = "crlf"
            elif self._state == "crlf":
                if len(raw) < 2:
                    break
                assert raw[:2] == b"\r\n", "chunk data not followed by CRLF: %r" % bytes(raw[:40])
                del raw[:2]
                self._state = "size"
            else:  # trailer section after the last chunk
                i = raw.find(b"\r\n")
                if i < 0:
                    break
                empty = i == 0
                del raw[:i + 2]
                self.ended = empty
        return out

    def read(self, timeout=10.0):
        """Next piece of body (waiting up to ``timeout``); b"" once it ended."""
        deadline = time.monotonic() + timeout
        if self.status is None:
            self.read_headers(timeout)
        while True:
            out = self._decode()
            if out:
                if self.keep:
                    self.body += out
                return bytes(out)
            if self.ended:
                return b""
            if self.eof:
                assert not self.chunked and self.left is None, \
                    "connection closed inside the reply body (body ends %r)" % bytes(self.body[-100:])
                self.ended = True
                return b""
            self._fill(deadline, "body data")

    def read_until(self, predicate, timeout=10.0, message="body"):
        """Read until ``predicate(body)`` is true; fails if the body ends first."""
        deadline = time.monotonic() + timeout
        while not predicate(bytes(self.body)):
            if self.ended:
                pytest.fail("reply ended before %s; body %r" % (message, bytes(self.body[-300:])))
            try:
                self.read(deadline - time.monotonic())
            except TimeoutError:
                pytest.fail("timed out after %.1fs waiting for %s; body ends %r"
                            % (timeout, message, bytes(self.body[-300:])))
        return bytes(self.body)

    def read_to_end(self, timeout=10.0):
        """Read until the reply body is complete; return the whole body."""
        deadline = time.monotonic() + timeout
        while not self.ended:
            try:
                self.read(deadline - time.monotonic())
            except TimeoutError:
                pytest.fail("reply did not end within %.1fs; body ends %r"
                            % (timeout, bytes(self.body[-300:])))
        return bytes(self.body)


class SSEEvent:
    def __init__(self, event, id, data):
        self.event = event   # str or None
        self.id = id         # str or None (the id field of this very event)
        self.data = data     # list of bytes, one per data: line

    def __repr__(self):
        return "<SSEEvent %s id=%s %r>" % (self.event, self.id, self.data[:5])


class SSEParser:
    """A strict ``text/event-stream`` parser (WHATWG rules, plus strictness).

    Lines end with CRLF, LF or CR. An event is dispatched only on a blank
    line. Fields other than event/data/id/retry, a line without a colon,
    and an event/id block without any ``data:`` line are errors.
    Comments (``:...``) and blank lines with nothing pending count as
    ``heartbeats``.
    """

    def __init__(self):
        self.pending = b""
        self.events = []
        self.heartbeats = 0
        self._reset()

    def _reset(self):
        self._event = None
        self._id = None
        self._data = []
        self._fields = 0

    @property
    def idle(self):
        """True when no partial line or partial event is pending."""
        return not self.pending and not self._fields

    def feed(self, data):
        """Parse ``data``; return the events it dispatched."""
        before = len(self.events)
        self.pending += data
        while True:
            m = re.search(rb"\r\n|\n|\r", self.pending)
            if not m:
                break
            if m.group() == b"\r" and m.end() == len(self.pending):
                break  # maybe the first half of a CRLF
            line, self.pending = self.pending[:m.start()], self.pending[m.end():]
            self._line(line)
        return self.events[before:]

    def _line(self, line):
        if not line:
            if self._data:
                self.events.append(SSEEvent(self._event, self._id, self._data))
            else:
                assert not self._fields, "SSE event block without data: %r" % ((self._event, self._id),)
                self.heartbeats += 1
            self._reset()
            return
        if line.startswith(b":"):
            self.heartbeats += 1
            return
        field, sep, value = line.partition(b":")
        assert sep, "SSE line without a colon: %r" % line
        if value.startswith(b" "):
            value = value[1:]
        self._fields += 1
        if field == b"data":
            self._data.append(value)
        elif field == b"event":
            self._event = value.decode("utf-8")
        elif field == b"id":
            self._id = value.decode("utf-8")
        elif field != b"retry":
            raise AssertionError("unknown SSE field in %r" % line)


def sse_until(reply, parser, predicate, timeout=10.0, message="events"):
    """Feed ``reply`` into ``parser`` until ``predicate(parser)`` is true."""
    deadline = time.monotonic() + timeout
    while not predicate(parser):
        if reply.ended:
            pytest.fail("reply ended before %s; events %r" % (message, parser.events[-5:]))
        try:
            parser.feed(reply.read(deadline - time.monotonic()))
        except TimeoutError:
            pytest.fail("timed out after %.1fs waiting for %s; events %r"
                        % (timeout, message, parser.events[-5:]))
    return parser.events


def settled_fds(pid, timeout=10.0):
    """The daemon's open fd count once two readings 50 ms apart agree."""
    last = [None]

    def stable():
        n = open_fds(pid)
        same, last[0] = n == last[0], n
        return n if same else None
    return wait_for(stable, timeout, interval=0.05, message="a stable fd count")


def vm_rss(pid):
    """Resident set size of ``pid`` in bytes (0 if gone)."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def shutdown_daemon(d, timeout=10.0):
    """Stop ``d`` gracefully (SIGTERM, a second SIGTERM half-way through),
    then SIGKILL anything left in the process groups of its children, so a
    test leaves no orphan behind (a SIGKILLed daemon's children live on)."""
    if d.proc is None or d.proc.poll() is not None:
        return
    groups = children_of(d.pid)
    for _ in range(2):
        d.proc.send_signal(signal.SIGTERM)
        try:
            d.proc.wait(timeout / 2)
            break
        except subprocess.TimeoutExpired:
            pass
    else:
        d.proc.kill()
        d.proc.wait()
    for pid in live_in_groups(groups):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def script(tmp_path, name, text):
    """Write a helper program ``name`` into ``tmp_path``; return its path."""
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def section(name, cmd, args="", **keys):
    """An INI ``[process:NAME]`` section with ``cmd``, ``args`` and keys."""
    lines = ["[process:%s]" % name, "cmd = %s" % cmd]
    if args:
        lines.append("args = %s" % args)
    lines += ["%s = %s" % item for item in keys.items()]
    return "\n".join(lines) + "\n\n"


@pytest.fixture(scope="session")
def cert(tmp_path_factory):
    """(certfile, keyfile): a throwaway self-signed certificate for localhost
    and 127.0.0.1, made once per test run with the openssl command."""
    if not shutil.which("openssl"):
        pytest.fail("the openssl command is needed to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    certfile, keyfile = str(d / "cert.pem"), str(d / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                    "-keyout", keyfile, "-out", certfile, "-days", "2",
                    "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=60)
    return certfile, keyfile
