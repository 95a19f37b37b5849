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
        st = d.status("ctl")      # the replacement may still be within startsecs
        assert {k: st[k] for k in ("active", "running", "max_processes")} == \
            {"active": True, "running": 1, "max_processes": 1}
        assert st["state"] in ("starting", "running")
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


# -- adopted orphans: logged, counted, listed ---------------------------------------

def metric(d, name):
    """The value of an unlabelled sample of /metrics."""
    text = d.get("/metrics").body.decode()
    m = re.search(r"^%s (\S+)$" % re.escape(name), text, re.M)
    assert m, "no %s in /metrics" % name
    return float(m.group(1))


def pid_of_cmdline(words):
    """The pid whose command line is exactly ``words`` (None if none)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/cmdline" % entry, "rb") as f:
                    if f.read().split(b"\0")[:-1] == [w.encode() for w in words]:
                        return int(entry)
            except OSError:
                pass
    return None


def test_a_daemon_left_behind_is_logged_counted_and_listed_until_reaped(daemon_factory):
    """A program starts a daemon in a session of its own (so no stop
    reaches it) and is stopped: the daemon adopts the leftover, logs it,
    counts it in /metrics, lists it at GET /orphans, and logs and counts
    its exit."""
    d = daemon_factory(section("leaky", "/bin/sh",
                               "-c 'setsid %s 1002 & exec %s 1003'" % (SLEEP, SLEEP)))
    d.wait_running("leaky", 1)
    leftover = wait_for(lambda: pid_of_cmdline([SLEEP, "1002"]), message="the leftover daemon")
    assert d.json("GET", "/orphans") == {"orphans": [], "reaped_total": 0, "reaped": []}
    assert metric(d, "gafferd_orphans") == 0
    assert metric(d, "gafferd_orphans_reaped_total") == 0
    assert d.json("POST", "/processes/leaky/_stop") == {"ok": True}
    # found after the exit, without anyone asking
    wait_for(lambda: "adopted orphan pid %d: %s 1002" % (leftover, SLEEP) in d.log(),
             message="the adoption logged")
    assert pid_alive(leftover)
    reply = d.json("GET", "/orphans")
    assert [(o["os_pid"], o["cmdline"]) for o in reply["orphans"]] == [
        (leftover, "%s 1002" % SLEEP)]
    assert reply["orphans"][0]["seen_ago"] >= 0
    assert metric(d, "gafferd_orphans") == 1
    os.kill(leftover, signal.SIGKILL)
    wait_for(lambda: "reaped adopted orphan pid %d (%s 1002): killed by SIGKILL"
             % (leftover, SLEEP) in d.log(), message="the reap logged")
    reply = d.json("GET", "/orphans")
    assert reply["orphans"] == [] and reply["reaped_total"] == 1
    (gone,) = reply["reaped"]
    assert (gone["os_pid"], gone["cmdline"], gone["exit_status"], gone["term_signal"]) == \
        (leftover, "%s 1002" % SLEEP, 0, signal.SIGKILL)
    assert metric(d, "gafferd_orphans") == 0
    assert metric(d, "gafferd_orphans_reaped_total") == 1


def test_a_double_forked_grandchild_of_a_live_program_is_listed(daemon_factory):
    """The grandchild outlives its parent while the program runs on: the
    kernel tells nobody, GET /orphans finds it; at shutdown it is stopped
    and its exit logged, then the end of the shutdown."""
    d = daemon_factory(section("forker", "/bin/sh",
                               "-c '(setsid %s 1004 &); exec %s 1005'" % (SLEEP, SLEEP)))
    d.wait_running("forker", 1)
    grandchild = wait_for(lambda: pid_of_cmdline([SLEEP, "1004"]), message="the grandchild")
    wait_for(lambda: int(open("/proc/%d/stat" % grandchild).read().rsplit(")", 1)[1].split()[1])
             == d.pid, message="the grandchild to be re-parented to the daemon")
    reply = d.json("GET", "/orphans")
    assert [o["os_pid"] for o in reply["orphans"]] == [grandchild]
    assert "adopted orphan pid %d: %s 1004" % (grandchild, SLEEP) in d.log()
    assert d.stop() == 0
    assert not pid_alive(grandchild)
    log = d.log()
    assert "reaped adopted orphan pid %d (%s 1004): killed by SIGTERM" % (grandchild, SLEEP) \
        in log, log
    assert re.search(r"gafferd stopped \(pid %d\): shutdown took \d+\.\d\ds; "
                     r"1 adopted orphan\(s\) reaped since start" % d.pid, log), log


def test_an_orphan_that_comes_and_goes_between_looks_is_still_logged(daemon_factory):
    """A leftover killed with its parent's group is reaped before any look
    found it: its exit is logged with the name the kernel still has (the
    subshell's own, [sh], when the group's SIGTERM came before its exec)."""
    d = daemon_factory(section("brief", "/bin/sh", "-c '%s 1006 & exit 3'" % SLEEP))
    wait_for(lambda: "reaped adopted orphan pid" in d.log(), message="an orphan reaped")
    assert re.search(r"reaped adopted orphan pid \d+ \((\[sleep\]|\[sh\]|%s 1006)\): "
                     r"killed by SIGTERM" % re.escape(SLEEP), d.log()), d.log()
    assert metric(d, "gafferd_orphans_reaped_total") >= 1


def test_an_orphans_command_line_cannot_forge_log_lines():
    """Control characters of an argument are escaped; a zombie has its
    kernel name in brackets."""
    import gafferd
    p = subprocess.Popen(["/bin/sh", "-c", "read x", "x\n2026 INFO forged\x1b[2J"],
                         stdin=subprocess.PIPE)
    try:
        line = wait_for(lambda: (lambda c: c and "forged" in c and c)(gafferd.read_cmdline(p.pid)),
                        message="the command line")
        assert "\n" not in line and "\x1b" not in line
        assert line.endswith("x\\x0a2026 INFO forged\\x1b[2J"), line
    finally:
        p.stdin.close()
        p.wait()
    p = subprocess.Popen(["/bin/sh", "-c", "exit 0"])
    wait_for(lambda: os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT),
             message="a zombie")
    assert gafferd.read_cmdline(p.pid) == "[sh]"
    p.wait()
