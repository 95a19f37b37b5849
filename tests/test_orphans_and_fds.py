"""Custom stream fds (one owner, closed once, nothing else reaches a child)
and adopted orphans (logged, counted in /metrics, listed at GET /orphans).

Real daemons, real children, checked through /proc; every wait has a
deadline.
"""
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import pytest

SLEEP = shutil.which("sleep") or "/bin/sleep"

from conftest import (GAFFERD, PY, Daemon, EventWatcher, StreamReply, holds_for,
                      pid_alive, proc_status, script, section, wait_for)

# ctrl.py DIR: notes DIR/ready-PID, then echoes what arrives on fd 3 (a
# custom stream) back to it; on the line "close" it closes fd 3, notes
# DIR/closed-PID and sleeps on.
CTRL = r'''
import os, socket, sys, time
d = sys.argv[1]
sock = socket.socket(fileno=3)
f = sock.makefile("rb")
open(os.path.join(d, "ready-%d" % os.getpid()), "w").close()
for line in f:
    if line.strip() == b"close":
        f.close()
        sock.close()
        open(os.path.join(d, "closed-%d" % os.getpid()), "w").close()
        break
    sock.sendall(b"echo:" + line)
while True:
    time.sleep(1000)
'''


def fd_links(pid):
    """{fd number: readlink target} of ``pid``."""
    out = {}
    base = "/proc/%d/fd" % pid
    for entry in os.listdir(base):
        try:
            out[int(entry)] = os.readlink(os.path.join(base, entry))
        except OSError:
            pass
    return out


def os_pid_of(d, name):
    ids = d.pids(name)
    assert len(ids) == 1, ids
    return ids[0], d.os_pid(ids[0])


def inode(link):
    m = re.match(r"(?:socket|pipe):\[(\d+)\]", link)
    return m and int(m.group(1))


# -- custom streams: one owner per fd ---------------------------------------------

def test_custom_stream_exit_is_handled_once_respawn_exit_event_and_shutdown(
        daemon_factory, tmp_path):
    ctrl = script(tmp_path, "ctrl.py", CTRL)
    d = daemon_factory(section("ctl", PY, "%s %s" % (ctrl, tmp_path),
                               custom_streams="ctrl"))
    w = EventWatcher(d)
    try:
        d.wait_running("ctl", 1)
        first_id, first = os_pid_of(d, "ctl")
        os.kill(first, signal.SIGKILL)
        w.wait(lambda ev: any(e["event"] == "exit" and e.get("os_pid") == first for e in ev),
               message="the exit event of the killed process")
        wait_for(lambda: d.pids("ctl") not in ([], [first_id]), message="a respawn")
        assert d.status("ctl") == {"active": True, "running": 1, "max_processes": 1,
                                   "state": "running"}
        # the new one has a working stream
        new_id, _ = os_pid_of(d, "ctl")
        reply = StreamReply(d.port, "/streams/%d/ctrl?feed=continuous" % new_id)
        try:
            reply.read_headers()
            assert d.post("/streams/%d/ctrl" % new_id, b"hi\n").status == 200
            reply.read_until(lambda body: b"echo:hi\n" in body, message="the echo")
        finally:
            reply.close()
    finally:
        w.close()
    assert d.stop(timeout=20) == 0
    log = d.log()
    assert "Traceback" not in log, log
    assert "Bad file descriptor" not in log, log


def test_custom_stream_closed_by_the_child_never_touches_a_reused_fd(daemon_factory, tmp_path):
    ctrl = script(tmp_path, "ctrl.py", CTRL)
    d = daemon_factory(section("ctl", PY, "%s %s" % (ctrl, tmp_path),
                               custom_streams="ctrl"))
    d.wait_running("ctl", 1)
    pid_id, ospid = os_pid_of(d, "ctl")
    assert d.post("/streams/%d/ctrl" % pid_id, b"close\n").status == 200
    wait_for(lambda: os.path.exists(os.path.join(str(tmp_path), "closed-%d" % ospid)),
             message="the child to close its end")
    # let the daemon see the EOF and settle (the old code closed the
    # number here, behind its socket object's back)
    settled = []

    def quiet():
        assert d.get("/ping").status == 200
        n = len(os.listdir("/proc/%d/fd" % d.pid))
        settled.append(n)
        return len(settled) > 3 and len(set(settled[-3:])) == 1
    wait_for(quiet, message="the daemon's fds to settle")
    # idle clients take the lowest free numbers, the freed one among them

    def ping(sock):
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % d.port)
        data = b""
        while not data.endswith(b"\r\n\r\nOK"):
            chunk = sock.recv(4096)
            assert chunk, "connection closed; got %r" % data
            data += chunk
        return data
    clients = [socket.create_connection(("127.0.0.1", d.port), timeout=10) for _ in range(4)]
    try:
        for sock in clients:
            assert ping(sock).startswith(b"HTTP/1.1 200")      # accepted
        r = d.post("/streams/%d/ctrl" % pid_id, b"STRAY-BYTES\n")
        assert r.status == 503, r
        assert r.json()["error"] == "write_failed"
        for sock in clients:
            data = ping(sock)
            assert data.startswith(b"HTTP/1.1 200"), data
            assert b"STRAY" not in data
        # the exit closes the custom socket once: the clients live on
        os.kill(ospid, signal.SIGKILL)
        wait_for(lambda: d.pids("ctl") not in ([], [pid_id]), message="a respawn")
        for sock in clients:
            assert ping(sock).startswith(b"HTTP/1.1 200")
    finally:
        for sock in clients:
            sock.close()
    assert "Traceback" not in d.log(), d.log()


def test_children_get_their_custom_streams_and_no_other_fd(tmp_path):
    """An fd the daemon inherited without close-on-exec reaches no child,
    with or without custom streams or a uid change; the custom streams
    sit on 3, 4, ... and are the daemon's live sockets."""
    assert os.geteuid() == 0, "this test needs root (uid = nobody)"
    echo = "'exec <&3 >&3; while read -r line; do echo \"echo:$$line\"; done'"
    config = (section("plain", SLEEP, "1000") +
              section("custom", "/bin/sh", "-c " + echo, custom_streams="a, b") +
              section("dropped", "/bin/sh", "-c " + echo, custom_streams="a",
                      uid="nobody", cwd="/"))
    d = Daemon(tmp_path, config)
    r, w = os.pipe()
    leak = 60
    os.dup2(w, leak)                      # inheritable: no close-on-exec
    os.close(w)
    d._log = open(d.log_path, "wb")
    d._out = open(d.out_path, "wb")
    try:
        d.proc = subprocess.Popen([PY, GAFFERD] + d.args + [d.config_path], cwd=d.dir,
                                  stdout=d._out, stderr=d._log, stdin=subprocess.DEVNULL,
                                  env=d.env, pass_fds=(leak,))
        os.close(leak)
        d.wait_ready()
        leaked = inode(fd_links(d.pid)[leak])
        assert leaked, "the daemon did not inherit the pipe"
        expected = {"plain": [0, 1, 2], "custom": [0, 1, 2, 3, 4], "dropped": [0, 1, 2, 3]}
        for name, fds in expected.items():
            d.wait_running(name, 1)
            pid_id, ospid = os_pid_of(d, name)
            if name != "plain":          # fd 3 is the daemon's stream: it answers
                reply = StreamReply(d.port, "/streams/%d/a?feed=continuous" % pid_id)
                try:
                    reply.read_headers()
                    assert d.post("/streams/%d/a" % pid_id, b"ping\n").status == 200
                    reply.read_until(lambda body: b"echo:ping\n" in body, message="the echo")
                finally:
                    reply.close()
            links = fd_links(ospid)
            assert sorted(links) == fds, (name, links)
            assert leaked not in [inode(v) for v in links.values()], (name, links)
            for fd in fds[3:]:
                assert links[fd].startswith("socket:["), (name, links)
        assert proc_status(os_pid_of(d, "dropped")[1])["Uid"].split() == ["65534"] * 4
        # the pipe's only writer was the daemon: once it is gone, EOF
        assert d.stop() == 0

        def eof():
            try:
                return os.read(r, 1) == b""
            except BlockingIOError:
                return False
        os.set_blocking(r, False)
        wait_for(eof, message="EOF on the inherited pipe (a child still holds it)")
    finally:
        d.close()
        os.close(r)
