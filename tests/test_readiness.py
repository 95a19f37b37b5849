"""Readiness end to end: the real ``python gafferd.py`` with real children.
``ready = notify`` (the sd_notify protocol, spoken by Python children over
AF_UNIX datagrams), a forged READY=1 refused, the watchdog, the ``log:``,
``tcp:``, ``http:`` and ``cmd:`` checks against hostile children and
servers, ``ready_timeout``, and ``GET /ready``."""
from __future__ import annotations

import os
import pathlib
import pwd
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time

import pytest

from conftest import PY, EventWatcher, live_in_groups, open_fds, pid_alive, section, wait_for

NOTIFY = """\
import os, socket, sys, time
addr = os.environ["NOTIFY_SOCKET"]
addr = "\\0" + addr[1:] if addr.startswith("@") else addr
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
def send(text):
    sock.sendto(text if isinstance(text, bytes) else text.encode(), addr)
def wait_file(name):
    while not os.path.exists(name):
        time.sleep(0.01)
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def state(d, name):
    return d.status(name)["processes"][0]["state"]


def notify_address(os_pid):
    with open("/proc/%d/environ" % os_pid, "rb") as f:
        env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    addr = env[b"NOTIFY_SOCKET"].decode()
    assert addr.startswith("@gafferd-notify/")
    return addr


def test_notify_ready_status_event_and_ready_route(daemon_factory, tmp_path):
    prog = write(tmp_path, "n.py", NOTIFY + """\
send("STATUS=warming up")
wait_file(sys.argv[1])
send("READY=1\\nSTATUS=serving")
time.sleep(1000)
""")
    go = str(tmp_path / "go")
    d = daemon_factory(section("svc", PY, prog + " " + go, ready="notify") +
                       section("plain", PY, "-c 'import time; time.sleep(1000)'",
                               ready="spawn") +
                       section("off", PY, "-c 'import time; time.sleep(1000)'", start="false"))
    watcher = EventWatcher(d, "proc/svc")
    wait_for(lambda: d.status("svc")["processes"][0]["status_text"] == "warming up",
             message="STATUS= as status_text")
    wait_for(lambda: d.status("plain")["ready"] == 1, message="plain ready once spawned")
    st = d.status("svc")
    assert st["state"] == "starting" and st["ready"] == 0
    r = d.get("/ready")
    assert r.status == 503 and r.json() == {"ready": False, "not_ready": {"svc": "starting"}}
    assert d.get("/ready/svc").status == 503
    assert d.get("/ready/plain").json() == {"ready": True}
    # a template stopped on purpose is left out of /ready, not ready alone
    assert d.get("/ready/off").json() == {"ready": False, "not_ready": {"off": "stopped"}}
    assert d.get("/ready/nope").status == 404
    open(go, "w").close()
    watcher.wait(lambda ev: any(e["event"] == "proc.svc.ready" for e in ev), message="proc.svc.ready")
    st = d.status("svc")
    assert st["state"] == "running" and st["ready"] == 1
    assert st["processes"][0]["status_text"] == "serving"
    assert d.get("/ready").json() == {"ready": True}
    assert d.get("/ready/svc").status == 200
    watcher.close()


def test_forged_flooded_and_oversized_notify_messages_are_refused(daemon_factory, tmp_path):
    prog = write(tmp_path, "n.py", NOTIFY + """\
wait_file(sys.argv[1] + ".big")
send(b"READY=1\\n" + b"x" * 8192)          # over the 4096-byte limit: dropped whole
send("STATUS=after big")
wait_file(sys.argv[1] + ".ready")
send("READY=1")
time.sleep(1000)
""")
    base = str(tmp_path / "sync")
    d = daemon_factory(section("svc", PY, prog + " " + base, ready="notify",
                               ready_timeout="60"))
    wait_for(lambda: d.pids("svc"), message="spawn")
    child = d.os_pid(d.pids("svc")[0])
    addr = notify_address(child)
    # 1. another process (this test) says READY=1: its credentials say who it is
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    target = "\0" + addr[1:]
    sock.sendto(b"READY=1", target)
    wait_for(lambda: "refused an sd_notify message from pid %d" % os.getpid() in d.log(),
             message="the refusal")
    assert state(d, "svc") == "starting"
    # 2. a forged pid: the kernel refuses it to an unprivileged sender
    forger = subprocess.run([PY, "-c", """\
import os, socket, struct, sys
if os.geteuid() == 0:
    os.setgid(65534); os.setuid(65534)
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
creds = struct.pack("3i", int(sys.argv[2]), os.getuid(), os.getgid())
try:
    s.sendmsg([b"READY=1"], [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, creds)], 0,
              "\\0" + sys.argv[1][1:])
except PermissionError:
    print("refused by the kernel")
""", addr, str(child)],
        stdout=subprocess.PIPE, universal_newlines=True, timeout=30)
    assert "refused by the kernel" in forger.stdout
    # 3. a flood and a 1 MB datagram cost nothing lasting
    sock.setblocking(False)
    sent = 0
    for _ in range(20000):
        try:
            sock.sendto(b"READY=1", target)
            sent += 1
        except BlockingIOError:
            break
    try:
        sock.sendto(b"R" * (1 << 20), target)
    except OSError:
        pass                                # EMSGSIZE / EAGAIN: the kernel bounds it too
    t0 = time.monotonic()
    assert d.get("/ping").status == 200
    assert time.monotonic() - t0 < 2.0
    assert sent > 0 and state(d, "svc") == "starting"
    # 4. the process's own oversized READY=1 is dropped; what follows counts
    open(base + ".big", "w").close()
    wait_for(lambda: d.status("svc")["processes"][0]["status_text"] == "after big",
             message="the message after the big one")
    assert state(d, "svc") == "starting"
    open(base + ".ready", "w").close()
    wait_for(lambda: state(d, "svc") == "running", message="ready at last")
    sock.close()


def test_watchdog_kills_a_silent_process_as_a_failed_start(daemon_factory, tmp_path):
    prog = write(tmp_path, "w.py", NOTIFY + """\
send("READY=1\\nSTATUS=usec=" + os.environ.get("WATCHDOG_USEC", "none"))
end = time.monotonic() + 1.2
while time.monotonic() < end:        # pings for longer than watchdog_sec
    send("WATCHDOG=1")
    time.sleep(0.1)
send("STATUS=silent")
time.sleep(1000)
""")
    d = daemon_factory(section("wd", PY, prog, ready="notify", watchdog_sec="0.5",
                               backoff="30", stop_signal="INT"))
    wait_for(lambda: d.status("wd")["processes"][0]["status_text"] == "usec=500000",
             message="WATCHDOG_USEC")
    first = d.os_pid(d.pids("wd")[0])
    wait_for(lambda: d.status("wd")["last_exit"], 10, message="the watchdog kill")
    st = d.status("wd")
    assert st["last_exit"]["os_pid"] == first
    assert st["last_exit"]["term_signal"] == signal.SIGINT        # its stop_signal
    assert st["last_exit"]["uptime"] >= 1.2                       # the pings kept it alive
    assert st["processes"][0]["state"] == "backoff"               # a failed start: 30 s
    assert "no WATCHDOG=1 for 0.5s" in d.log()
    assert "failed start 1" in d.log()


def test_log_check_bounded_on_a_huge_line_then_ready_on_a_matching_line(daemon_factory,
                                                                         tmp_path):
    prog = write(tmp_path, "l.py", """\
import fcntl, os, sys, termios, time
out = os.fdopen(1, "wb", buffering=0)
chunk = b"y" * (1 << 20)
for _ in range(100):                   # 100 MB without a newline ...
    out.write(chunk)
out.write(b" server listening on 8080\\n")   # ... whose end would match: too late
while int.from_bytes(fcntl.ioctl(1, termios.FIONREAD, b"\\0" * 4), "little"):
    time.sleep(0.01)                   # until gafferd has read (and scanned) it all
open(sys.argv[1] + ".drained", "w").close()
while not os.path.exists(sys.argv[1] + ".go"):
    time.sleep(0.01)
out.write(b"noise\\r\\nserver listening on 8080\\r\\n")
time.sleep(1000)
""")
    err = write(tmp_path, "e.py", """\
import sys, time
sys.stderr.write("boot\\n"); sys.stderr.flush()
sys.stderr.write("partial "); sys.stderr.flush()
time.sleep(0.3)
sys.stderr.write("line: accepting connections\\n"); sys.stderr.flush()
time.sleep(1000)
""")
    base = str(tmp_path / "sync")
    d = daemon_factory(section("big", PY, prog + " " + base,
                               ready="log:^server listening on \\d+$") +
                       section("err", PY, err, ready="log:partial line: accepting",
                               redirect_output="out, err"))
    rss0 = int(open("/proc/%d/status" % d.pid).read().split("VmRSS:")[1].split()[0])
    wait_for(lambda: os.path.exists(base + ".drained"), 60, message="100 MB read")
    rss1 = int(open("/proc/%d/status" % d.pid).read().split("VmRSS:")[1].split()[0])
    assert rss1 - rss0 < 16 * 1024, (rss0, rss1)          # kB: nothing buffered
    assert state(d, "big") == "starting"
    open(base + ".go", "w").close()
    wait_for(lambda: state(d, "big") == "running", message="the matching line")
    # stderr is read too (a line cut across reads is whole), and redirected
    # output still reaches its label
    wait_for(lambda: state(d, "err") == "running", message="the stderr line")
    r = d.get("/processes/err/_log?label=err")
    assert b"accepting connections" in r.body


class _Http(threading.Thread):
    """A server for the http: check: ``behaviour(conn)`` per connection."""

    def __init__(self, behaviour):
        super().__init__(daemon=True)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.behaviour, self.hits, self.stop = behaviour, 0, False
        self.start()

    def run(self):
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.hits += 1
            threading.Thread(target=self._serve, args=(conn, self.hits), daemon=True).start()

    def _serve(self, conn, n):
        try:
            conn.recv(65536)
            self.behaviour(conn, n)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self.stop = True
        self.sock.close()


def test_tcp_and_http_checks_become_ready(daemon_factory, tmp_path):
    port = free_port()
    listener = write(tmp_path, "t.py", """\
import socket, sys, time
time.sleep(0.6)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(5)
time.sleep(1000)
""")

    def answer(conn, n):                    # 503 twice, then 200
        code = b"503 Busy" if n <= 2 else b"200 OK"
        conn.sendall(b"HTTP/1.1 " + code + b"\r\nContent-Length: 2\r\n\r\nok")
    server = _Http(answer)
    try:
        d = daemon_factory(
            section("tcp", PY, listener + " %d" % port, ready="tcp:%d" % port,
                    ready_interval="0.1") +
            section("name", PY, listener + " %d" % free_port(),
                    ready="tcp:localhost:%d" % server.port, ready_interval="0.1") +
            section("http", PY, "-c 'import time; time.sleep(1000)'",
                    ready="http:http://127.0.0.1:%d/healthz" % server.port,
                    ready_interval="0.1"))
        assert state(d, "tcp") == "starting"
        wait_for(lambda: state(d, "tcp") == "running", message="tcp ready")
        wait_for(lambda: state(d, "name") == "running", message="tcp by name ready")
        wait_for(lambda: state(d, "http") == "running", message="http ready")
        assert server.hits >= 3
        assert d.get("/ready").json() == {"ready": True}
    finally:
        server.close()


def test_hostile_tcp_and_http_peers_end_in_ready_timeout(daemon_factory, tmp_path):
    # a port whose accept queue is full never answers a SYN
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    fillers = []
    for _ in range(4):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(full.getsockname())
        fillers.append(c)

    def trickle(conn, n):                   # a 2xx head, then a byte at a time for ever
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n")
        for _ in range(2000):
            conn.sendall(b"x")
            time.sleep(0.05)

    def huge(conn, n):                      # 2xx and far more than the limit at once
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 8000000\r\n\r\n" + b"z" * 8000000)
    slow, big = _Http(trickle), _Http(huge)
    try:
        sleeper = "-c 'import time; time.sleep(1000)'"
        keys = dict(ready_timeout="2", ready_interval="0.1", backoff="30")
        d = daemon_factory(
            section("tcp", PY, sleeper, ready="tcp:%d" % full.getsockname()[1], **keys) +
            section("slow", PY, sleeper, ready="http:http://127.0.0.1:%d/" % slow.port,
                    **keys) +
            section("big", PY, sleeper, ready="http:http://127.0.0.1:%d/" % big.port, **keys))
        fds = open_fds(d.pid)
        for name in ("tcp", "slow", "big"):
            wait_for(lambda: d.status(name)["last_exit"], 15, message=name + " timed out")
            st = d.status(name)
            assert st["processes"][0]["state"] == "backoff", st
            assert st["last_exit"]["term_signal"] == signal.SIGTERM
        assert "not ready within 2.0s" in d.log()
        assert d.get("/ready").json()["not_ready"] == {"tcp": "backoff", "slow": "backoff",
                                                       "big": "backoff"}
        assert big.hits >= 2                # each oversized answer failed one attempt
        wait_for(lambda: open_fds(d.pid) <= fds, message="probe sockets closed")
    finally:
        slow.close()
        big.close()
        full.close()
        for c in fillers:
            c.close()


def test_cmd_check_runs_as_the_user_in_its_env_and_dir_and_is_never_left_behind(
        daemon_factory, tmp_path):
    nobody = pwd.getpwnam("nobody")
    tmp_path = pathlib.Path(tempfile.mkdtemp(prefix="gafferd-ready-"))   # nobody can enter
    os.chmod(str(tmp_path), 0o755)
    workdir = tmp_path / "work"
    workdir.mkdir()
    check = ('cmd:sh -c \'test "$(id -u)" = %d && test "$(pwd)" = %s && '
             'test "$TOKEN" = abc && test "$GAFFERD_NAME" = svc && test -e %s\''
             % (nobody.pw_uid, workdir, tmp_path / "up"))
    hang = "cmd:sh -c 'echo $$ > %s; sleep 1000 & sleep 1000; wait'" % (tmp_path / "pgid")
    d = daemon_factory("[env:svc]\ntoken = abc\n\n" +
                       section("svc", "sleep", "1000", ready=check, uid="nobody", cwd=str(workdir), ready_interval="0.1") +
                       section("hang", PY, "-c 'import time; time.sleep(1000)'", ready=hang,
                               ready_timeout="1.5", backoff="30"))
    wait_for(lambda: d.pids("svc"), message="spawn")
    assert state(d, "svc") == "starting"
    (tmp_path / "up").write_text("")
    wait_for(lambda: state(d, "svc") == "running", message="cmd check passed")
    # the hanging check dies with its whole group when ready_timeout stops the process
    wait_for(lambda: (tmp_path / "pgid").exists() and (tmp_path / "pgid").read_text(),
             message="the check ran")
    pgid = int((tmp_path / "pgid").read_text())
    wait_for(lambda: d.status("hang")["last_exit"], 10, message="ready_timeout")
    wait_for(lambda: not live_in_groups([pgid]), message="the check's group killed")
    assert not pid_alive(pgid)
    assert d.status("hang")["processes"][0]["state"] == "backoff"
    shutil.rmtree(str(tmp_path))


def test_ready_counts_completed_tasks_and_follows_public_ping(daemon_factory, tmp_path):
    d = daemon_factory("[gaffer]\nauth_token = s3cret\npublic_ping = true\n\n" +
                       section("task", PY, "-c 'pass'", restart="never") +
                       section("svc", PY, "-c 'import time; time.sleep(1000)'", ready="spawn"))
    wait_for(lambda: d.get("/ready").status == 200, message="ready without a token")
    assert d.get("/ready/task").json() == {"ready": True}
    assert d.get("/status").status == 401                   # only the checks are public
    r = d.post("/processes/svc/_stop", headers={"Authorization": "Bearer s3cret"})
    assert r.status == 200
    assert d.get("/ready").json() == {"ready": True}        # stopped on purpose: left out
    assert d.get("/ready/svc").status == 503


@pytest.mark.parametrize("value", ["log:(", "tcp:host:notaport", "http:ftp://x", "cmd:"])
def test_bad_ready_values_are_config_errors(value, tmp_path):
    from conftest import run_gafferd
    path = write(tmp_path, "g.ini", section("x", "true", ready=value))
    r = run_gafferd(["--check", path])
    assert r.returncode == 2 and "ready" in r.stderr


def _line_watch(pattern):
    import re
    import gafferd
    hits = []
    watch = gafferd.LineWatch(re.compile(pattern), lambda: hits.append(1))
    return gafferd, watch, hits


def test_line_watch_whole_bytewise_and_per_stream():
    text = b"boot\r\nnoise\nserver ready on 80\r\nafter\n"
    for step in (len(text), 1, 3):
        gafferd, watch, hits = _line_watch(rb"^server ready on \d+$")
        for i in range(0, len(text), step):
            watch("out", text[i:i + step])
        assert hits == [1], step
        watch("out", b"server ready on 81\n")
        assert hits == [1]                      # once
    gafferd, watch, hits = _line_watch(rb"^ab$")
    watch("out", b"a")
    watch("err", b"b\n")                        # two streams never make one line
    assert hits == []
    watch("err", b"ab\n")
    assert hits == [1]


def test_line_watch_caps_lines_and_skips_the_rest():
    gafferd, watch, hits = _line_watch(rb"MARK")
    cap = gafferd.READY_LINE_MAX
    watch("out", b"x" * (cap - 3) + b"MA")      # the mark straddles the cap ...
    watch("out", b"RK" + b"y" * (3 * cap))      # ... so it is cut off
    watch("out", b"MARK, still the same line\n")
    assert hits == [] and watch.partial["out"] == b""
    for _ in range(100):                        # 100 reads of a line with no end
        watch("out", b"z" * 65536)
        assert watch.partial["out"] is None     # nothing kept
    watch("out", b"\nMARK\n")
    assert hits == [1]
    gafferd, watch, hits = _line_watch(rb"MARK$")
    watch("out", b"x" * (cap - 4) + b"MARK" + b"rest of a long line\n")
    assert hits == [1]                          # the first READY_LINE_MAX bytes count
