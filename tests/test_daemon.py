"""The daemon as a program: command line, start-up and shutdown, signals,
``--pidfile``, ``--daemon``, SIGHUP reload, ``-v``/``-vv`` console output
and the shipped example.
"""
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import textwrap
import time

import pytest

from conftest import (descendants, EXAMPLES, GAFFERD, PY, Daemon, children_of, pid_alive,
                      proc_cmdline, run_gafferd, wait_for)

SLEEP = shutil.which("sleep")
SH = shutil.which("sh")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


# -- helpers -------------------------------------------------------------------


def stop_cleanly(d):
    """Stop daemon ``d`` with SIGTERM (so its children are stopped too) and
    SIGKILL whatever of its process tree is still there afterwards."""
    if d.proc is None:
        return
    kids = descendants(d.pid) if d.proc.poll() is None else []
    if d.proc.poll() is None:
        d.proc.send_signal(signal.SIGTERM)
        try:
            d.proc.wait(10)
        except subprocess.TimeoutExpired:
            d.proc.kill()
            d.proc.wait()
    for pid in kids:
        if pid_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def write(path, text, mode=None):
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(textwrap.dedent(text).lstrip("\n"))
    if mode is not None:
        os.chmod(path, mode)
    return path


def sub(text, **values):
    values.setdefault("PY", PY)
    values.setdefault("SLEEP", SLEEP)
    values.setdefault("SH", SH)
    for key, value in values.items():
        text = text.replace("@%s@" % key, str(value))
    return text


def os_pids(d, name):
    return [d.os_pid(i) for i in d.pids(name)]


def wait_os_pids(d, name, count, timeout=10.0):
    d.wait_running(name, count, timeout)

    def got():
        pids = os_pids(d, name)
        return pids if len(pids) == count else None
    return wait_for(got, timeout, message="%d os pids for %s" % (count, name))


def wait_gone(pids, timeout=10.0):
    wait_for(lambda: not any(pid_alive(p) for p in pids), timeout,
             message="processes %r to be gone" % (pids,))


def unix_http(path, request_path="/ping", timeout=5.0):
    """A tiny HTTP/1.0 GET over a unix socket: (status, body)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(("GET %s HTTP/1.0\r\nHost: localhost\r\n\r\n" % request_path).encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b"\r\n")[0].split()[1]), body


def tcp_get(port, request_path="/ping"):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        s.sendall(("GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n" % request_path).encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    return int(data.split(b"\r\n")[0].split()[1])


def listen_backlog(port):
    """Backlog of the TCP listener on ``port`` as shown by ``ss``, or None."""
    ss = shutil.which("ss")
    if not ss:
        return None
    out = subprocess.run([ss, "-Hltn", "sport = :%d" % port], stdout=subprocess.PIPE,
                         universal_newlines=True).stdout
    for line in out.splitlines():
        fields = line.split()
        if fields and fields[0] == "LISTEN":
            return int(fields[2])
    return None


def console_lines(d):
    return [l for l in ANSI.sub("", d.output()).splitlines() if l.strip()]


TERM_SCRIPT = """
import signal, sys, time
mode = sys.argv[1]
record = sys.argv[2]
def on_term(signum, frame):
    with open(record, "a") as f:
        f.write("TERM\\n")
signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "ignore" else on_term)
with open(sys.argv[3], "w") as f:
    f.write("ready\\n")
while True:
    time.sleep(1)
"""


# -- command line ---------------------------------------------------------------

def test_version():
    r = run_gafferd(["--version"], timeout=15)
    assert r.returncode == 0
    assert r.stdout.strip() == "gafferd 1.0.0 (gaffer API 0.4.4)"


def test_help_lists_the_seed_options():
    r = run_gafferd(["-h"], timeout=15)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith("usage:")
    for opt in ("-c", "--config", "-p", "--plugins-dir", "-v", "-vv", "--daemon",
                "--pidfile", "--bind", "--certfile", "--keyfile", "--backlog",
                "--version", "--check", "config"):
        assert re.search(r"(^|[\s\[,])%s\b" % re.escape(opt), out), (opt, out)


def test_bad_option_value_is_a_usage_error():
    r = run_gafferd(["--backlog", "lots"], timeout=15)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "backlog" in r.stderr


def test_positional_config_beats_dash_c(tmp_path, gafferd):
    a = write(tmp_path / "a.ini", "[process:from_c]\ncmd = %s 60\n" % SLEEP)
    b = write(tmp_path / "b.ini", "[process:from_positional]\ncmd = %s 60\n" % SLEEP)
    d = gafferd(None, args=["-c", a, b])
    assert d.json("GET", "/processes") == ["from_positional"]
    assert d.stop() == 0  # the next daemon reuses the same log files
    d2 = gafferd(None, args=["-c", a])
    assert d2.json("GET", "/processes") == ["from_c"]


def test_no_config_runs_default_endpoint_only(gafferd):
    d = gafferd(None)
    assert d.urls == ["http://127.0.0.1:%d" % d.port]
    assert d.json("GET", "/processes") == []
    assert d.get("/ping").status == 200
    assert d.stop() == 0


def test_bind_several_addresses(tmp_path, gafferd):
    sock = str(tmp_path / "api.sock")
    d = gafferd(None, args=["--bind", "127.0.0.1:0,127.0.0.1:0,unix:" + sock])
    tcp = [int(u.rsplit(":", 1)[1]) for u in d.urls if u.startswith("http://127.0.0.1:")]
    assert len(tcp) == 2 and tcp[0] != tcp[1], d.urls
    assert "unix:" + sock in d.urls, d.urls
    for port in tcp:
        assert tcp_get(port) == 200
    assert stat.S_ISSOCK(os.stat(sock).st_mode)
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    assert unix_http(sock)[0] == 200


@pytest.mark.parametrize("given,expected", [("5", 5), ("0", 128)])
def test_backlog_option(gafferd, given, expected):
    d = gafferd(None, args=["--backlog", given])
    assert d.get("/ping").status == 200
    backlog = listen_backlog(d.port)
    if backlog is not None:  # `ss` (iproute2) present
        assert backlog == expected


# -- start-up and shutdown ---------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGQUIT],
                         ids=["TERM", "INT", "QUIT"])
def test_quit_signals_stop_everything_and_exit_0(tmp_path, gafferd, signum):
    d = gafferd(sub("""
        [process:pair]
        cmd = @SLEEP@ 60
        numprocesses = 2

        [process:wrapper]
        cmd = @SLEEP@ 61 & @SLEEP@ 62; wait
        shell = true
        """))
    d.wait_running("pair", 2)
    d.wait_running("wrapper", 1)
    # The shell wrapper's own child (a grandchild of the daemon) is up too.
    procs = wait_for(lambda: (lambda p: len(p) >= 5 and p)(descendants(d.pid)),
                     message="children and grandchildren")
    assert d.stop(signum, timeout=15) == 0
    wait_gone(procs, timeout=5)
    assert "Traceback" not in d.log()


def test_child_ignoring_sigterm_is_killed_after_graceful_timeout(tmp_path, gafferd):
    script = write(tmp_path / "term.py", TERM_SCRIPT)
    ready = tmp_path / "ready"
    d = gafferd(sub("""
        [process:stubborn]
        cmd = @PY@ @S@ ignore @R@.rec @R@
        graceful_timeout = 1
        """, S=script, R=ready))
    wait_for(ready.exists, message="child ready")
    (pid,) = wait_os_pids(d, "stubborn", 1)
    t0 = time.monotonic()
    assert d.stop(signal.SIGTERM, timeout=15) == 0
    elapsed = time.monotonic() - t0
    assert 0.8 <= elapsed < 6.0, elapsed
    wait_gone([pid], timeout=3)


def test_second_sigterm_skips_grace_period(tmp_path, gafferd):
    script = write(tmp_path / "term.py", TERM_SCRIPT)
    ready, record = tmp_path / "ready", tmp_path / "record"
    d = gafferd(sub("""
        [process:stubborn]
        cmd = @PY@ @S@ record @REC@ @R@
        graceful_timeout = 60
        """, S=script, R=ready, REC=record))
    wait_for(ready.exists, message="child ready")
    (pid,) = wait_os_pids(d, "stubborn", 1)
    d.signal(signal.SIGTERM)
    # The child got (and survived) its SIGTERM: shutdown is waiting.
    wait_for(lambda: record.exists() and "TERM" in record.read_text(),
             message="child to receive SIGTERM")
    assert d.proc.poll() is None
    assert pid_alive(pid)
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    try:
        rc = d.proc.wait(10)
    except subprocess.TimeoutExpired:
        pytest.fail("second SIGTERM did not end the shutdown:\n" + d.log())
    assert rc == 0
    assert time.monotonic() - t0 < 10  # far below graceful_timeout = 60
    wait_gone([pid], timeout=3)


def test_ready_and_listening_log_lines(gafferd):
    d = gafferd(None)
    log = d.log()
    line_re = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO gafferd: "
    assert re.search(line_re + r"listening on http://127\.0\.0\.1:%d$" % d.port, log, re.M), log
    assert re.search(line_re + r"gafferd 1\.0\.0 ready \(pid %d\)$" % d.pid, log, re.M), log
    assert d.output() == ""  # nothing on stdout without -v


def test_bind_failure_is_fatal_and_removes_pidfile(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    pidfile = tmp_path / "g.pid"
    try:
        r = run_gafferd(["--pidfile", str(pidfile), "--bind",
                         "127.0.0.1:%d" % busy.getsockname()[1]], timeout=15)
    finally:
        busy.close()
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert not pidfile.exists()


# -- --pidfile -------------------------------------------------------------------------

def test_pidfile_written_and_removed(tmp_path, gafferd):
    pidfile = tmp_path / "run" / "gafferd.pid"
    os.makedirs(str(pidfile.parent))
    d = gafferd(None, args=["--pidfile", str(pidfile)])
    assert pidfile.read_text() == "%d\n" % d.pid
    assert stat.S_IMODE(os.stat(str(pidfile)).st_mode) == 0o644
    assert os.listdir(str(pidfile.parent)) == ["gafferd.pid"]  # no temp file left
    assert d.stop() == 0
    assert not pidfile.exists()


def test_pidfile_held_by_live_process_is_refused(tmp_path):
    pidfile = tmp_path / "gafferd.pid"
    pidfile.write_text("%d\n" % os.getpid())
    r = run_gafferd(["--pidfile", str(pidfile), "--bind", "127.0.0.1:0"], timeout=15)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert ("Already running on PID %d (or pid file '%s' is stale)" % (os.getpid(), pidfile)
            in r.stderr), r.stderr
    assert "Traceback" not in r.stderr
    assert pidfile.read_text() == "%d\n" % os.getpid()


def _dead_pid():
    p = subprocess.Popen([PY, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("content", ["dead", "garbage", "empty", "zero"])
def test_stale_or_garbage_pidfile_is_ignored(tmp_path, gafferd, content):
    pidfile = tmp_path / "gafferd.pid"
    text = {"dead": lambda: "%d\n" % _dead_pid(), "garbage": lambda: "not a pid\n",
            "empty": lambda: "", "zero": lambda: "0\n"}[content]()
    pidfile.write_text(text)
    d = gafferd(None, args=["--pidfile", str(pidfile)])
    assert pidfile.read_text() == "%d\n" % d.pid
    assert d.stop() == 0
    assert not pidfile.exists()


def test_pidfile_missing_directory(tmp_path):
    pidfile = tmp_path / "nodir" / "gafferd.pid"
    r = run_gafferd(["--pidfile", str(pidfile), "--bind", "127.0.0.1:0"], timeout=15)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "%s doesn't exist. Can't create pidfile." % pidfile.parent in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_pidfile_removed_when_config_is_bad(tmp_path):
    pidfile = tmp_path / "gafferd.pid"
    bad = write(tmp_path / "gaffer.ini", "[process:web]\ncmd = %s 60\nnumprocesses = two\n"
                % SLEEP)
    r = run_gafferd(["--pidfile", str(pidfile), "--bind", "127.0.0.1:0", bad], timeout=15)
    assert r.returncode == 2, r.stderr
    assert not pidfile.exists()


# -- --daemon ----------------------------------------------------------------------------

@pytest.fixture
def detached():
    """OS pids of daemonised gafferds to terminate at the end of the test."""
    pids = []
    yield pids
    for pid in pids:
        kids = descendants(pid)
        if pid_alive(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
        for p in [pid] + kids:
            if pid_alive(p):
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def test_daemon_mode(tmp_path, detached):
    sock = str(tmp_path / "api.sock")
    pidfile = tmp_path / "gafferd.pid"
    umask_file, made = tmp_path / "umask.txt", tmp_path / "made"
    config = write(tmp_path / "gaffer.ini", sub("""
        [process:um]
        cmd = umask > @U@; touch @M@; exec @SLEEP@ 60
        shell = true
        """, U=umask_file, M=made))
    t0 = time.monotonic()
    r = subprocess.run([PY, GAFFERD, "--daemon", "--pidfile", str(pidfile),
                        "--bind", "unix:" + sock, config],
                       cwd=str(tmp_path), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=15, universal_newlines=True,
                       preexec_fn=lambda: os.umask(0o077))
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 < 8
    pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(),
                       message="pidfile"))
    detached.append(pid)
    assert pidfile.read_text() == "%d\n" % pid
    assert pid_alive(pid)
    # The script itself, or its cached bytecode (__pycache__/gafferd.cpython-3X.pyc)
    # when the daemon re-executed from it.
    assert any(re.search(r"gafferd(\.py|\.cpython-\d+\.pyc)$", a) for a in proc_cmdline(pid)), \
        proc_cmdline(pid)
    # Double fork: the final daemon is neither the process we started nor
    # a process-group or session leader tied to our terminal.
    assert os.getsid(pid) != os.getsid(0)
    wait_for(lambda: os.path.exists(sock), message="unix socket")
    assert unix_http(sock) == (200, b"OK")
    # umask 022 in the daemon (not the 077 it was started with).
    assert wait_for(lambda: umask_file.exists() and umask_file.read_text().strip()) == "0022"
    wait_for(made.exists, message="file made by the child")
    assert stat.S_IMODE(os.stat(str(made)).st_mode) == 0o644
    # Still supervising: kill the child, a new one replaces it.
    kids = wait_for(lambda: children_of(pid), message="daemon child")
    os.kill(kids[0], signal.SIGKILL)
    wait_for(lambda: [k for k in children_of(pid) if k not in kids], message="respawn")
    kids = descendants(pid)
    os.kill(pid, signal.SIGTERM)
    wait_gone([pid] + kids)
    wait_for(lambda: not pidfile.exists(), message="pidfile removed")


def test_daemon_mode_reports_config_errors_before_forking(tmp_path):
    pidfile = tmp_path / "gafferd.pid"
    bad = write(tmp_path / "gaffer.ini", "[process:web]\ncmd = %s 60\ndetach = maybe\n"
                % SLEEP)
    r = run_gafferd(["--daemon", "--pidfile", str(pidfile), "--bind", "127.0.0.1:0", bad],
                    timeout=15)
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    assert "gaffer.ini" in lines[0] and "[process:web]" in lines[0] and "maybe" in lines[0]
    assert not pidfile.exists()


# -- SIGHUP reload ----------------------------------------------------------------------------

RELOAD_V1 = """
[process:keep]
cmd = @SLEEP@ 61

[process:gone]
cmd = @SLEEP@ 62

[process:change]
cmd = @SLEEP@ 63

[process:scale]
cmd = @SLEEP@ 64
"""

RELOAD_V2 = """
[process:keep]
cmd = @SLEEP@ 61

[process:change]
cmd = @SLEEP@ 73

[process:scale]
cmd = @SLEEP@ 64
numprocesses = 3

[process:added]
cmd = @SLEEP@ 65
"""


def test_sighup_reloads_config(tmp_path, gafferd):
    # With -v: the console application must not break the reload (in gaffer 0.4.4 it did).
    d = gafferd(sub(RELOAD_V1), args=["-v"])
    before = {name: wait_os_pids(d, name, 1) for name in ("keep", "gone", "change", "scale")}
    write(d.config_path, sub(RELOAD_V2))
    d.signal(signal.SIGHUP)
    wait_for(lambda: sorted(d.json("GET", "/processes")) == ["added", "change", "keep", "scale"],
             message="templates after reload")
    after = {name: wait_os_pids(d, name, n)
             for name, n in (("keep", 1), ("change", 1), ("scale", 3), ("added", 1))}
    assert after["keep"] == before["keep"]                 # untouched
    assert before["scale"][0] in after["scale"]            # scaled in place
    assert after["change"] != before["change"]             # cmd changed: new process
    assert proc_cmdline(after["change"][0])[-1] == "73"
    wait_gone(before["gone"] + before["change"])           # removed / replaced ones stopped
    assert d.get("/status/gone").status == 404
    assert "ERROR" not in d.log()
    assert "Traceback" not in d.log()
    assert d.proc.poll() is None
    wait_for(lambda: any(re.match(r"\d\d:\d\d:\d\d added \| create added$", l)
                         for l in console_lines(d)), message="console line for the new template")


def test_sighup_with_broken_config_changes_nothing(tmp_path, gafferd):
    d = gafferd(sub(RELOAD_V1))
    before = {name: wait_os_pids(d, name, 1) for name in ("keep", "gone", "change", "scale")}
    write(d.config_path, sub(RELOAD_V2).replace("numprocesses = 3", "numprocesses = three"))
    d.signal(signal.SIGHUP)
    wait_for(lambda: re.search(r"ERROR gafferd: reload failed.*'three'", d.log(), re.S),
             message="reload failure logged")
    assert d.proc.poll() is None
    assert d.get("/ping").status == 200
    assert d.json("GET", "/processes") == ["keep", "gone", "change", "scale"]
    for name, pids in before.items():
        assert os_pids(d, name) == pids
    # Fixing the file and sending SIGHUP again works.
    write(d.config_path, sub(RELOAD_V2))
    d.signal(signal.SIGHUP)
    wait_for(lambda: sorted(d.json("GET", "/processes")) == ["added", "change", "keep", "scale"],
             message="templates after the second reload")
    assert os_pids(d, "keep") == before["keep"]


# -- -v and -vv ------------------------------------------------------------------------------

def test_reloads_sigusr1_and_the_end_of_shutdown_are_logged_with_who_asked(tmp_path, gafferd):
    """POST /reload logs like SIGHUP and says who asked (the API and the
    client's address); a failed one too; SIGUSR1's reopen and the end of
    the shutdown are logged."""
    logfile = tmp_path / "out.log"
    d = gafferd(sub(RELOAD_V1) + "stdout_logfile = %s\nredirect_output = out\n" % logfile)
    wait_os_pids(d, "scale", 1)
    write(d.config_path, sub(RELOAD_V2))
    r = d.post("/reload?dry_run=1")
    assert r.status == 200 and r.json()["dry_run"] is True
    wait_for(lambda: re.search(
        r"INFO gafferd: dry run: would reload \S+gaffer\.ini \(asked by the API "
        r"\(POST /reload from 127\.0\.0\.1:\d+\)\): added \['added'\], removed \['gone'\], "
        r"changed \['change', 'scale'\]", d.log()), message="the dry run logged")
    assert d.post("/reload").status == 200
    wait_for(lambda: re.search(
        r"INFO gafferd: reloaded \S+gaffer\.ini \(asked by the API \(POST /reload from "
        r"127\.0\.0\.1:\d+\)\): added \['added'\], removed \['gone'\]", d.log()),
        message="the API reload logged")
    write(d.config_path, sub(RELOAD_V2).replace("numprocesses = 3", "numprocesses = three"))
    assert d.post("/reload").status == 400
    wait_for(lambda: re.search(r"ERROR gafferd: reload failed, nothing changed \(asked by the "
                               r"API \(POST /reload from 127\.0\.0\.1:\d+\)\):.*'three'",
                               d.log()), message="the failed API reload logged")
    write(d.config_path, sub(RELOAD_V1))
    d.signal(signal.SIGHUP)
    wait_for(lambda: re.search(r"INFO gafferd: reloaded \S+ \(asked by SIGHUP\): "
                               r"added \['gone'\]", d.log()), message="the SIGHUP reload logged")
    d.signal(signal.SIGUSR1)
    wait_for(lambda: "INFO gafferd: received SIGUSR1: reopened" in d.log(),
             message="the reopen logged")
    assert d.stop() == 0
    assert re.search(r"INFO gafferd: gafferd stopped \(pid %d\): shutdown took \d+\.\d\ds"
                     % d.pid, d.log()), d.log()


def test_verbose_prints_each_lifecycle_event_once(tmp_path, gafferd):
    d = gafferd(sub("""
        [process:v]
        cmd = @PY@ -c "import sys, time; print('chatter-out'); sys.stdout.flush(); time.sleep(60)"
        redirect_output = stdout, stderr
        """), args=["-v"])
    (pid,) = wait_os_pids(d, "v", 1)
    t = r"\d\d:\d\d:\d\d v \| "
    wait_for(lambda: any(re.match(t + "spawn process with pid %d$" % pid, l)
                         for l in console_lines(d)),
             message="spawn line on stdout")
    assert d.stop() == 0
    lines = console_lines(d)
    for text in ("create v", "start v", "spawn process with pid %d" % pid, "stop v",
                 "stop_pid process with pid %d" % pid):
        matching = [l for l in lines if re.match(t + re.escape(text) + "$", l)]
        assert len(matching) == 1, (text, lines)
    # the exit line says how it ended and after how long
    exit_line = t + r"exit process with pid %d: killed by SIGTERM after [0-9.]+s up$" % pid
    assert len([l for l in lines if re.match(exit_line, l)]) == 1, lines
    assert not any("proc." in l for l in lines), lines
    # -v alone does not copy the children's output.
    assert not any("chatter-out" in l for l in lines), lines


def test_very_verbose_copies_child_output(tmp_path, gafferd):
    d = gafferd(sub("""
        [process:talker]
        cmd = @PY@ -c "import sys, time; print('hello-out'); sys.stdout.flush(); sys.stderr.write('hello-err\\n'); sys.stderr.flush(); time.sleep(60)"
        redirect_output = stdout, stderr
        """), args=["-vv"])
    t = r"^\d\d:\d\d:\d\d talker \| "
    wait_for(lambda: any(re.match(t + "hello-out$", l) for l in console_lines(d)),
             message="child stdout on the daemon's stdout")
    wait_for(lambda: any(re.match(t + "hello-err$", l) for l in console_lines(d)),
             message="child stderr on the daemon's stdout")
    assert any(re.match(t + r"spawn process with pid \d+$", l) for l in console_lines(d))
    assert d.stop() == 0


# -- the shipped example ------------------------------------------------------------------------

def _copy_examples(tmp_path):
    dest = tmp_path / "examples"
    shutil.copytree(EXAMPLES, str(dest), symlinks=True)
    ini = dest / "gaffer.ini"
    text = ini.read_text()
    new = re.sub(r"(?m)^(\s*bind\s*[=:]\s*).*$", r"\g<1>127.0.0.1:0", text)
    assert new != text, "examples/gaffer.ini has no bind line to rewrite"
    ini.write_text(new)
    return dest


@pytest.mark.parametrize("where", ["repo-root", "examples-dir"])
def test_example_config_runs(tmp_path, where):
    dest = _copy_examples(tmp_path)
    if where == "repo-root":
        d = Daemon(tmp_path, None, args=["examples/gaffer.ini"], bind=False)
    else:
        d = Daemon(dest, None, args=["gaffer.ini"], bind=False)
    try:
        d.start()
        names = d.json("GET", "/processes")
        assert {"dummy", "echo", "priority0"} <= set(names), names
        assert names.index("priority0") < names.index("dummy")
        for name in ("dummy", "echo", "priority0"):
            d.wait_running(name, 1)
        pids = {name: wait_os_pids(d, name, 1)[0] for name in ("dummy", "echo", "priority0")}
        assert d.json("GET", "/processes/dummy")["env"] == {"PORT": "80"}
        # Each one really runs the example script from the examples directory.
        for name, pid in pids.items():
            assert pid_alive(pid), name
            assert os.path.realpath(os.readlink("/proc/%d/cwd" % pid)) == \
                os.path.realpath(str(dest)), name
        kids = descendants(d.pid)
        assert d.stop() == 0
        wait_gone(kids)
    finally:
        stop_cleanly(d)
        d.close()
