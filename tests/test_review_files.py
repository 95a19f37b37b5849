"""A second review of files, children and descriptors, with inputs other
than the first one's: what a program (or what it leaves behind) can do to
the daemon, and what the daemon leaves behind when it stops.

Real daemons and processes, checked through /proc; every wait has a
deadline.
"""
import os
import random
import signal
import stat
import subprocess
import sys

from conftest import GAFFERD, PY, pid_alive, section, wait_for


def pids_of(words):
    """The pids whose command line is exactly ``words``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/cmdline" % entry, "rb") as f:
                    if f.read().split(b"\0")[:-1] == [w.encode() for w in words]:
                        found.append(int(entry))
            except OSError:
                pass
    return found


# -- nothing left behind after shutdown ----------------------------------------------

def test_the_children_of_an_orphan_are_not_left_behind_at_shutdown(gafferd, tmp_path):
    """A program starts a helper in a session of its own that ignores
    SIGTERM and has children of its own (which ignore it too).  When the
    program is stopped, the helper is an orphan of the daemon; its
    children are not the daemon's children until the helper dies.  After
    the shutdown none of them may be running."""
    marks = ["%d.%d" % (random.randrange(10 ** 6, 10 ** 7), n) for n in range(2)]
    helper = tmp_path / "helper.sh"
    helper.write_text("trap '' TERM\nsleep %s &\nsleep %s\n" % tuple(marks))
    d = gafferd(section("p", "/bin/sh", "-c 'setsid /bin/sh %s & exec sleep 1000'" % helper))
    try:
        wait_for(lambda: all(pids_of(["sleep", m]) for m in marks), 10.0,
                 message="the helper's children")
        assert d.stop() == 0
        left = [p for m in marks for p in pids_of(["sleep", m]) if pid_alive(p)]
        assert left == [], "left behind after shutdown: %s\n%s" % (left, d.log())
    finally:
        for m in marks:
            for pid in pids_of(["sleep", m]):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass


# -- fd numbers 0-2 ------------------------------------------------------------------

def test_closed_stdio_at_start_is_never_reused_for_a_file_or_socket(tmp_path):
    """Started with stdout and stderr closed (as some init scripts do),
    the daemon must not let its own log, a directory it holds or a client
    connection take fd 1 or 2: ``stdout_logfile = -`` (fd 1), a -vv copy
    or a log line meant for stderr would go into it.  They are /dev/null."""
    conf = tmp_path / "gaffer.ini"
    conf.write_text(section("talk", "/bin/sh", "-c 'while true; do echo FORGED-LINE; "
                            "sleep 0.05; done'", stdout_logfile="-"))
    dlog = tmp_path / "daemon.log"
    cmd = "exec %s %s --log-file %s --bind 127.0.0.1:0 %s >&- 2>&-" % (
        PY, GAFFERD, dlog, conf)
    proc = subprocess.Popen(["/bin/sh", "-c", cmd], stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: dlog.exists() and b"ready (pid" in dlog.read_bytes(), 15.0,
                 message="the daemon to be ready")
        wait_for(lambda: b"spawn" in dlog.read_bytes() or os.path.exists(
            "/proc/%d/fd/1" % proc.pid), 5.0, message="the program to run")
        links = {fd: os.readlink("/proc/%d/fd/%d" % (proc.pid, fd)) for fd in (0, 1, 2)}
        assert links == {0: "/dev/null", 1: "/dev/null", 2: "/dev/null"}, links
        proc.send_signal(signal.SIGUSR1)               # reopen: fd numbers are freed
        wait_for(lambda: b"reopen" in dlog.read_bytes().lower(), 5.0, message="the reopen")
        assert b"FORGED-LINE" not in dlog.read_bytes()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the unix socket's path -------------------------------------------------------------

UNIX = "[gaffer]\nhttp_endpoints = local\n\n[endpoint:local]\nbind = unix:%s/g.sock\n"

def test_shutdown_removes_its_own_unix_socket_only(gafferd, tmp_path):
    """The socket's directory (a program's own, say) is swapped for a link
    to another directory that holds a file of the same name: the shutdown
    must not remove that file through the link, nor anything that is not
    the socket it made."""
    run = tmp_path / "run"
    run.mkdir()
    os.chmod(str(run), 0o777)
    other = tmp_path / "etc"
    other.mkdir()
    victim = other / "g.sock"
    victim.write_bytes(b"not a socket of gafferd\n")
    d = gafferd(UNIX % run)
    assert stat.S_ISSOCK(os.lstat(str(run / "g.sock")).st_mode)
    os.rename(str(run), str(tmp_path / "run.old"))
    os.symlink(str(other), str(run))
    assert d.stop() == 0
    assert victim.read_bytes() == b"not a socket of gafferd\n"
    # and a regular file put where the socket was is not the daemon's either
    os.unlink(str(run))
    os.rename(str(tmp_path / "run.old"), str(run))
    d = gafferd(UNIX % run)
    os.unlink(str(run / "g.sock"))
    (run / "g.sock").write_bytes(b"someone else's\n")
    assert d.stop() == 0
    assert (run / "g.sock").read_bytes() == b"someone else's\n"


def test_the_unix_socket_mode_is_never_set_through_a_path():
    """bind() makes the socket 0600 by the umask alone: no chmod by path,
    which a link swapped in after bind() would redirect to any file."""
    import inspect
    sys.path.insert(0, os.path.dirname(GAFFERD))
    import gafferd as module
    source = inspect.getsource(module.Listener._bind)
    assert "os.chmod(" not in source


# -- a plugin's site ------------------------------------------------------------------

SWAPPER = r'''
import os, sys
site, secret = sys.argv[1], sys.argv[2]
reg, tmp, target = os.path.join(site, "reg"), os.path.join(site, "tmp"), os.path.join(site, "a.txt")
n = 0
while True:
    n += 1
    kind = n % 4
    if kind in (0, 2):
        os.link(reg, tmp)
    elif kind == 1:
        os.symlink(secret, tmp)
    else:
        os.mkfifo(tmp)
    os.replace(tmp, target)
'''


def test_a_site_file_swapped_during_a_request_never_leaks_or_blocks(gafferd, tmp_path):
    """Whoever can write a plugin's _site swaps a file, as fast as it
    can, between a regular file, a link to a file outside the site and a
    FIFO: the daemon serves the regular file or refuses, never the
    outside file, and never blocks on the FIFO."""
    import http.client
    plugins = tmp_path / "plugins"
    site = plugins / "web" / "_site"
    site.mkdir(parents=True)
    (site / "reg").write_bytes(b"public\n")
    (site / "a.txt").write_bytes(b"public\n")
    secret = tmp_path / "secret"
    secret.write_bytes(b"SECRET\n")
    d = gafferd(None, args=["--plugins-dir", str(plugins)])
    swapper = subprocess.Popen([PY, "-c", SWAPPER, str(site), str(secret)])
    try:
        conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=3)
        served = set()
        for _ in range(400):
            conn.request("GET", "/_plugin/web/a.txt")
            r = conn.getresponse()
            body = r.read()
            served.add((r.status, body if r.status == 200 else None))
            assert body != b"SECRET\n", "a file outside the site was served"
        conn.close()
        assert (200, b"public\n") in served, served
    finally:
        swapper.kill()
        swapper.wait()
    assert d.get("/ping").status == 200
