#!/usr/bin/env python3
"""Benchmark gafferd beside supervisord, Circus and the machine's floor.

Runs the scenarios S1-S10 and prints a Markdown table of medians
(with min and max over the repetitions), each figure also given as a ratio
to the floor and to the best peer measured in the same run.

The driver is standard-library only.  supervisord and Circus are installed
by this script into a virtual environment of their own (see --venv); they
are never dependencies of gafferd.  See bench/README.md.
"""

import argparse
import datetime
import json
import math
import os
import platform
import random
import re
import select
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
THIS = os.path.abspath(__file__)
GAFFERD = os.path.join(REPO, "gafferd.py")
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
ALL_SCENARIOS = ["S1", "S2", "S3", "S4", "S4b", "S5", "S6", "S7", "S8", "S9", "S10"]
ALL_MANAGERS = ["gafferd", "supervisord", "circus"]
PEERS = ["supervisord", "circus"]
COLUMNS = ["floor", "gafferd", "supervisord", "circus"]
COLUMN_TITLES = {"floor": "floor", "gafferd": "gafferd",
                 "supervisord": "supervisord", "circus": "Circus"}
LOG_MAXBYTES = 256 * 1024 * 1024

FLOOD_CODE = """\
import os, signal
signal.signal(signal.SIGPIPE, signal.SIG_DFL)
b = (b'x' * 1023 + b'\\n') * 256   # 256 KiB per write, 1 KiB lines
w = os.write
while True:
    w(1, b)
"""


# S8's web server: answers GET with its pid; on SIGTERM it finishes the
# request in hand and exits.  Where its listening socket comes from:
# `fd` (gafferd: fd 3, LISTEN_FDS, LISTEN_PID checked), `circus FD`
# ($(circus.sockets.web)), `bind PORT` (supervisord: each process binds
# the port itself, SO_REUSEPORT, since supervisord holds no socket).
WEB_CODE = """\
import os, signal, socket, sys
mode = sys.argv[2]
if mode == "fd":
    assert int(os.environ["LISTEN_PID"]) == os.getpid()
    sock = socket.socket(fileno=3)
elif mode == "circus":
    sock = socket.socket(fileno=int(sys.argv[3]))
else:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", int(sys.argv[3])))
    sock.listen(128)
sock.settimeout(0.2)
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
print("serving", flush=True)
body = str(os.getpid()).encode()
while not stop:
    try:
        conn, _ = sock.accept()
    except socket.timeout:
        continue
    conn.settimeout(10)
    data = b""
    try:
        while b"\\r\\n\\r\\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        conn.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n%s"
                     % (len(body), body))
    except OSError:
        pass
    conn.close()
"""


class BenchError(Exception):
    pass


# --------------------------------------------------------------------------
# /proc helpers
# --------------------------------------------------------------------------

def _read(path, mode="r"):
    with open(path, mode) as f:
        return f.read()


def proc_stat_fields(pid):
    """Fields of /proc/PID/stat after the comm, index 0 = state (field 3)."""
    data = _read("/proc/%d/stat" % pid, "rb")
    return data[data.rindex(b")") + 2:].split()


def proc_ppid(pid):
    return int(proc_stat_fields(pid)[1])


def proc_cpu_ticks(pid):
    f = proc_stat_fields(pid)
    return int(f[11]) + int(f[12])          # utime + stime, all threads


def proc_status(pid, task=None):
    path = "/proc/%d/status" % pid if task is None else \
        "/proc/%d/task/%d/status" % (pid, task)
    out = {}
    for line in _read(path).splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def proc_rss_mib(pid):
    v = proc_status(pid)["VmRSS"]           # "12345 kB"
    return int(v.split()[0]) / 1024.0


def proc_ctxt(pid):
    """voluntary + nonvoluntary context switches summed over all threads."""
    total = 0
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            st = proc_status(pid, int(tid))
        except OSError:
            continue
        total += int(st.get("voluntary_ctxt_switches", 0))
        total += int(st.get("nonvoluntary_ctxt_switches", 0))
    return total


def proc_cmdline(pid):
    return _read("/proc/%d/cmdline" % pid, "rb")


def all_pids():
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


class Sample:
    """CPU ticks and context switches of one daemon at one moment."""

    def __init__(self, pid):
        self.t = time.monotonic()
        self.ticks = proc_cpu_ticks(pid)
        self.ctxt = proc_ctxt(pid)

    @staticmethod
    def cpu_percent(a, b):
        return 100.0 * (b.ticks - a.ticks) / CLK_TCK / (b.t - a.t)

    @staticmethod
    def wakeups(a, b):
        return (b.ctxt - a.ctxt) / (b.t - a.t)


class ChildWatcher:
    """Finds the direct children of PARENT whose /proc/PID/exe is EXE.

    A child counts as "exec'd" from the first scan that sees its exe link
    resolve to the target program: this never trusts the manager's report.
    Children that disappear (reaped) are recorded in `exited`.
    """

    def __init__(self, parent, exe):
        self.parent = parent
        self.exe = exe
        self.state = {}          # pid -> "x" other, "p" pending, "t" target
        self.targets = set()     # live target pids
        self.exited = []         # target pids that went away, in order seen
        self.seen_targets = 0

    def scan(self):
        pids = set()
        for name in os.listdir("/proc"):
            if name.isdigit():
                pids.add(int(name))
        state = self.state
        if len(state) > len(pids) or any(p not in pids for p in state):
            for pid in [p for p in state if p not in pids]:
                if state.pop(pid) == "t":
                    self.targets.discard(pid)
                    self.exited.append(pid)
        new = []
        parent = self.parent
        exe = self.exe
        for pid in pids:
            st = state.get(pid)
            if st == "x" or st == "t":
                continue
            if st is None:
                try:
                    ppid = proc_ppid(pid)
                except (OSError, ValueError, IndexError):
                    continue
                if ppid != parent:
                    state[pid] = "x"
                    continue
            try:
                link = os.readlink("/proc/%d/exe" % pid)
            except OSError:
                state[pid] = "p"
                continue
            if link == exe:
                state[pid] = "t"
                self.targets.add(pid)
                self.seen_targets += 1
                new.append(pid)
            else:
                state[pid] = "p"
        return new

    def wait_count(self, n, timeout, alive=None, what="children"):
        deadline = time.monotonic() + timeout
        while True:
            self.scan()
            if len(self.targets) >= n:
                return time.monotonic()
            if time.monotonic() > deadline:
                raise BenchError("only %d of %d %s exec'd after %.0f s"
                                 % (len(self.targets), n, what, timeout))
            if alive is not None:
                alive()
            time.sleep(0.002)


def proc_children(pid):
    """Direct children of PID, from /proc/PID/task/TID/children (every thread)."""
    out = set()
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            out.update(int(c) for c in _read("/proc/%d/task/%s/children"
                                             % (pid, tid)).split())
        except OSError:
            pass
    return out


class FastChildWatcher:
    """ChildWatcher for a few tens of children, cheap enough to poll every
    0.1-0.2 ms: reads the parent's /proc/PID/task/*/children (~60 us)
    instead of scanning all of /proc.

    `seen_at[pid]` is the monotonic time of the first poll that saw PID
    exec'd (its exe link resolves to EXE): an upper bound of its exec
    time, late by at most one poll period.
    """

    def __init__(self, parent, exe):
        self.parent = parent
        self.exe = exe
        self.targets = set()     # live exec'd children
        self.seen_at = {}        # pid -> monotonic time first seen exec'd
        self.order = []          # exec'd pids in the order they were seen

    def poll(self):
        now = time.monotonic()
        kids = proc_children(self.parent)
        self.targets &= kids
        for pid in kids:
            if pid in self.targets:
                continue
            try:
                link = os.readlink("/proc/%d/exe" % pid)
            except OSError:
                continue             # going away, or not readable yet
            if link == self.exe:
                self.targets.add(pid)
                self.seen_at[pid] = now
                self.order.append(pid)
            # else: forked, not exec'd yet (or another program): looked at
            # again next poll
        return now

    def wait_count(self, n, timeout, alive=None):
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            if len(self.targets) >= n:
                return
            if time.monotonic() > deadline:
                raise BenchError("only %d of %d children exec'd after %.0f s"
                                 % (len(self.targets), n, timeout))
            if alive is not None:
                alive()
            time.sleep(0.002)


class LogTracker:
    """Bytes written to PATH (plus rotated PATH.1) since tracking began.

    Holds an fd on each inode seen at PATH or PATH.1, so bytes of rotated
    files are still counted; an inode that is at neither name any more is
    counted at its final size and closed.
    """

    def __init__(self, path):
        self.path = path
        self.fds = {}
        self.closed_total = 0

    def poll(self):
        present = set()
        for p in (self.path, self.path + ".1"):
            try:
                st = os.stat(p)
            except OSError:
                continue
            present.add(st.st_ino)
            if st.st_ino not in self.fds:
                try:
                    fd = os.open(p, os.O_RDONLY)
                except OSError:
                    continue
                ino = os.fstat(fd).st_ino
                if ino in self.fds:
                    os.close(fd)
                else:
                    self.fds[ino] = fd
                    present.add(ino)
        total = self.closed_total
        for ino, fd in list(self.fds.items()):
            size = os.fstat(fd).st_size
            if ino not in present:
                self.closed_total += size
                os.close(fd)
                del self.fds[ino]
            total += size
        return total

    def close(self):
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def percentile(values, p):
    vals = sorted(values)
    if not vals:
        return float("nan")
    k = max(0, min(len(vals) - 1, int(math.ceil(p / 100.0 * len(vals))) - 1))
    return vals[k]


def log(*args):
    print(*args, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# process bookkeeping (nothing may be left behind)
# --------------------------------------------------------------------------

class Ctx:
    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.token = "%09d" % random.SystemRandom().randrange(10 ** 8, 10 ** 9)
        base = os.environ.get("TMPDIR") or "/tmp"
        self.tmp_root = tempfile.mkdtemp(prefix="gafferd-bench-%s-" % self.token,
                                         dir=base)
        self.venv = args.venv or os.path.join(base, "gafferd-bench-venv")
        self.python = sys.executable
        if os.environ.pop("PYTHONDONTWRITEBYTECODE", None) is not None:
            # gafferd runs from its cached bytecode, as in a default
            # environment; with the variable it compiles its source at
            # every start and idles at ~50 MB instead of ~18 MB
            print("note: PYTHONDONTWRITEBYTECODE unset for this run", file=sys.stderr)
        sleep = shutil.which("sleep") or "/bin/sleep"
        self.sleep_path = sleep
        self.sleep_exe = os.path.realpath(sleep)
        self.live = set()            # Popen objects still to be reaped
        self.flood_script = os.path.join(self.tmp_root, "flood.py")
        with open(self.flood_script, "w") as f:
            f.write(FLOOD_CODE)
        self.web_script = os.path.join(self.tmp_root, "web.py")
        with open(self.web_script, "w") as f:
            f.write(WEB_CODE)
        self.counter = 0
        self.verbose = args.verbose

    def sleep_argv(self, seconds):
        # GNU sleep adds up its arguments; the second one carries the run
        # token so that every child of this run can be found in /proc.
        return [self.sleep_path, str(seconds), "0.0000000" + self.token]

    def flood_argv(self):
        return [self.python, self.flood_script, self.token]

    def workdir(self, name):
        self.counter += 1
        d = os.path.join(self.tmp_root, "%s-%d" % (name, self.counter))
        os.makedirs(d)
        return d

    def popen(self, argv, **kw):
        kw.setdefault("start_new_session", True)
        kw.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen(argv, **kw)
        self.live.add(p)
        return p

    def token_pids(self):
        me = os.getpid()
        tok = self.token.encode()
        out = []
        for pid in all_pids():
            if pid == me:
                continue
            try:
                if tok in proc_cmdline(pid):
                    out.append(pid)
            except OSError:
                pass
        return out

    def sweep(self, wait=5.0):
        """SIGKILL every process of this run (found by its token)."""
        for p in list(self.live):
            if p.poll() is None:
                try:
                    p.kill()
                except OSError:
                    pass
        deadline = time.monotonic() + wait
        while True:
            pids = self.token_pids()
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            for p in list(self.live):
                try:
                    p.wait(timeout=0.05)
                    self.live.discard(p)
                except subprocess.TimeoutExpired:
                    pass
            if not pids or time.monotonic() > deadline:
                # zombies of reparented children are reaped by init
                return [pid for pid in pids if _alive_not_zombie(pid)]
            time.sleep(0.05)


def _alive_not_zombie(pid):
    try:
        return proc_stat_fields(pid)[0] != b"Z"
    except (OSError, IndexError):
        return False


class Worker:
    """A helper process: this file run with `--worker KIND PARAMS`."""

    def __init__(self, ctx, kind, params, python=None):
        self.ctx = ctx
        self.kind = kind
        ctx.counter += 1
        self.errpath = os.path.join(ctx.tmp_root, "worker-%s-%d.err"
                                    % (kind, ctx.counter))
        argv = [python or ctx.python, THIS, "--worker", kind,
                "--token", ctx.token, json.dumps(params)]
        with open(self.errpath, "wb") as err:
            self.p = ctx.popen(argv, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=err)
        self.buf = b""

    @property
    def pid(self):
        return self.p.pid

    def stderr_tail(self, n=600):
        try:
            return _read(self.errpath)[-n:].strip()
        except OSError:
            return ""

    def readline(self, timeout):
        deadline = time.monotonic() + timeout
        fd = self.p.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError("worker %s: no answer in %.0f s %s"
                                 % (self.kind, timeout, self.stderr_tail()))
            r, _, _ = select.select([fd], [], [], left)
            if r:
                data = os.read(fd, 1 << 20)
                if not data:
                    raise BenchError("worker %s died: %s"
                                     % (self.kind, self.stderr_tail()))
                self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def expect(self, prefix, timeout):
        while True:
            line = self.readline(timeout)
            if line.startswith(prefix):
                return line[len(prefix):]

    def result(self, timeout):
        res = json.loads(self.expect("RESULT ", timeout))
        if res.get("error"):
            raise BenchError("worker %s: %s" % (self.kind, res["error"]))
        return res

    def send(self, text):
        try:
            self.p.stdin.write(text.encode())
            self.p.stdin.flush()
        except OSError:
            pass

    def stop(self, timeout=5.0):
        p = self.p
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
            except OSError:
                pass
        for f in (p.stdin, p.stdout):
            try:
                f.close()
            except OSError:
                pass
        self.ctx.live.discard(p)


# --------------------------------------------------------------------------
# manager adapters
# --------------------------------------------------------------------------

class Program:
    """What a scenario asks a manager to run (one template / program)."""

    def __init__(self, name, argv, numprocesses=1, stdout_logfile=None,
                 capture=False, immediate=False, web_port=None):
        self.name = name
        self.argv = argv
        # S8: a web server on this port; each manager passes (or lets it
        # bind) the socket its own way, see WEB_CODE
        self.web_port = web_port
        self.numprocesses = numprocesses
        self.stdout_logfile = stdout_logfile
        self.capture = capture or bool(stdout_logfile)
        # True: respawn at once however fast it dies (gafferd: startsecs = 0
        # and restart_delay = 0; by default a process that dies within
        # startsecs is a failed start and waits for its backoff)
        self.immediate = immediate


class Manager:
    """Adapter interface: one instance = one daemon started once.

    prepare(programs) writes the config into a fresh work dir;
    launch() starts the daemon (the clock of S1 starts just before);
    wait_ready() returns once its status call answers;
    status() does one status call from the driver;
    status_worker(...) starts a Worker that loops on the cheapest status
    call (run in whatever interpreter has the manager's client library);
    stop() stops the daemon and everything it started.
    """

    name = "?"
    scenarios = {"S1", "S2", "S3", "S4", "S5", "S7", "S9", "S10"}

    def __init__(self, ctx):
        self.ctx = ctx
        self.proc = None
        self.dir = None

    # -- to override --
    def available(self):
        return None

    def version(self):
        return "?"

    def write_config(self, programs):
        raise NotImplementedError

    def command(self):
        raise NotImplementedError

    def status(self):
        raise NotImplementedError

    def status_worker(self, duration, start_at, interval=0.0):
        raise NotImplementedError

    def status_start_delay(self):
        return 0.7

    def ping_worker(self, duration, start_at, interval=0.0, stop_file=None):
        """Like status_worker, with the manager's cheapest call (S9, S10)."""
        raise NotImplementedError

    def restart_all(self, names):
        """Ask for a restart of every program in ``names``; may return
        before it is done (the driver watches /proc)."""
        raise NotImplementedError

    # -- common --
    def prepare(self, programs):
        self.dir = self.ctx.workdir(self.name)
        self.cfg = self.write_config(programs)

    def launch(self):
        self.logpath = os.path.join(self.dir, "daemon.log")
        with open(self.logpath, "wb") as logf:
            self.proc = self.ctx.popen(self.command(), cwd=self.dir,
                                       stdout=logf, stderr=subprocess.STDOUT)

    def start(self, programs):
        self.prepare(programs)
        self.launch()

    @property
    def pid(self):
        return self.proc.pid

    def log_tail(self, n=800):
        try:
            return _read(self.logpath, "rb")[-n:].decode("utf-8", "replace").strip()
        except (OSError, AttributeError):
            return ""

    def check_alive(self):
        if self.proc.poll() is not None:
            raise BenchError("%s exited with status %s: %s"
                             % (self.name, self.proc.returncode, self.log_tail()))

    def wait_ready(self, timeout=30.0):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                self.status()
                return
            except Exception as e:      # not up yet
                last = e
            time.sleep(0.05)
        raise BenchError("%s not ready after %.0f s (%s): %s"
                         % (self.name, timeout, last, self.log_tail()))

    def stop(self, timeout=None):
        if timeout is None:
            timeout = 3.0 if self.ctx.quick else 20.0
        p = self.proc
        if p is not None and p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                log("  %s did not stop in %.0f s, killing it" % (self.name, timeout))
                p.kill()
                p.wait(5)
        if p is not None:
            self.ctx.live.discard(p)
        left = self.ctx.sweep()
        if left:
            log("  warning: processes left after %s: %s" % (self.name, left))


class Gafferd(Manager):
    name = "gafferd"
    scenarios = {"S1", "S2", "S3", "S4", "S4b", "S5", "S6", "S7", "S8", "S9", "S10"}

    def available(self):
        if not os.path.exists(GAFFERD):
            return "not found (%s)" % GAFFERD
        return None

    def version(self):
        try:
            out = subprocess.run([self.ctx.python, GAFFERD, "--version"],
                                 capture_output=True, text=True, timeout=20)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except Exception as e:
            return "? (%s)" % e

    def write_config(self, programs):
        self.port = free_port()
        lines = ["[gaffer]", "http_endpoints = bench", "",
                 "[endpoint:bench]", "bind = 127.0.0.1:%d" % self.port, ""]
        for pr in programs:
            if pr.web_port:
                lines += ["[socket:%s]" % pr.name, "bind = 127.0.0.1:%d" % pr.web_port, "",
                          "[process:%s]" % pr.name, "sockets = %s" % pr.name,
                          "ready = log:^serving", "ready_timeout = 20"]
                pr = Program(pr.name, pr.argv + ["fd"], pr.numprocesses)
            else:
                lines.append("[process:%s]" % pr.name)
            lines += ["cmd = %s" % pr.argv[0],
                      "args = %s" % shlex.join(pr.argv[1:]),
                      "numprocesses = %d" % pr.numprocesses,
                      "graceful_timeout = 5"]
            if pr.immediate:
                lines += ["startsecs = 0", "restart_delay = 0"]
            if pr.capture:
                lines.append("redirect_output = stdout, stderr")
            if pr.stdout_logfile:
                lines += ["stdout_logfile = %s" % pr.stdout_logfile,
                          "logfile_maxbytes = %d" % LOG_MAXBYTES,
                          "logfile_backups = 1"]
            lines.append("")
        path = os.path.join(self.dir, "gafferd.ini")
        with open(path, "w") as f:
            f.write("\n".join(lines))
        return path

    def command(self):
        return [self.ctx.python, GAFFERD, self.cfg]

    def restart_web(self, name):
        """S8: a rolling restart; returns once it is over."""
        res = self.http("POST", "/processes/%s/_restart?rolling=1" % name, timeout=120)
        if not res.get("ok"):
            raise BenchError("rolling restart failed: %s" % res.get("reason"))

    def http(self, method, path, timeout=5.0):
        import http.client
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            c.request(method, path)
            r = c.getresponse()
            body = r.read()
            if r.status != 200:
                raise BenchError("%s %s -> %d %r" % (method, path, r.status, body[:200]))
            return json.loads(body) if body[:1] in (b"{", b"[") else body
        finally:
            c.close()

    def status(self):
        return self.http("GET", "/status", timeout=2.0)

    def status_worker(self, duration, start_at, interval=0.0):
        return Worker(self.ctx, "httpstatus",
                      {"port": self.port, "path": "/status", "duration": duration,
                       "start_at": start_at, "interval": interval})

    def ping_worker(self, duration, start_at, interval=0.0, stop_file=None):
        return Worker(self.ctx, "httpstatus",
                      {"port": self.port, "path": "/ping", "duration": duration,
                       "start_at": start_at, "interval": interval, "times": True,
                       "stop_file": stop_file})

    def restart_all(self, names):
        for name in names:
            self.http("POST", "/processes/%s/_restart" % name, timeout=30.0)


class Supervisord(Manager):
    name = "supervisord"
    scenarios = Manager.scenarios | {"S8"}

    def bin(self, name):
        return os.path.join(self.ctx.venv, "bin", name)

    def available(self):
        return venv_state(self.ctx).get("supervisor")

    def version(self):
        try:
            out = subprocess.run([self.bin("supervisord"), "--version"],
                                 capture_output=True, text=True, timeout=20)
            return "supervisord " + out.stdout.strip()
        except Exception as e:
            return "? (%s)" % e

    def write_config(self, programs):
        self.port = free_port()
        d = self.dir
        lines = ["[supervisord]", "nodaemon = true",
                 "logfile = %s" % os.path.join(d, "supervisord.log"),
                 "pidfile = %s" % os.path.join(d, "supervisord.pid"),
                 "childlogdir = %s" % d, "minfds = 8192", "minprocs = 1024",
                 "loglevel = warn", "",
                 "[inet_http_server]", "port = 127.0.0.1:%d" % self.port, "",
                 "[rpcinterface:supervisor]",
                 "supervisor.rpcinterface_factory = "
                 "supervisor.rpcinterface:make_main_rpcinterface", "",
                 "[supervisorctl]", "serverurl = http://127.0.0.1:%d" % self.port, ""]
        for pr in programs:
            if pr.web_port:
                pr = Program(pr.name, pr.argv + ["bind", str(pr.web_port)], pr.numprocesses)
            lines += ["[program:%s]" % pr.name,
                      "command = %s" % shlex.join(pr.argv),
                      "numprocs = %d" % pr.numprocesses,
                      "process_name = %(program_name)s_%(process_num)d",
                      "autostart = true", "autorestart = true",
                      "startsecs = 0", "stopwaitsecs = 5",
                      "stderr_logfile = NONE"]
            if pr.stdout_logfile:
                lines += ["stdout_logfile = %s" % pr.stdout_logfile,
                          "stdout_logfile_maxbytes = %d" % LOG_MAXBYTES,
                          "stdout_logfile_backups = 1"]
            else:
                lines.append("stdout_logfile = NONE")
            lines.append("")
        path = os.path.join(d, "supervisord.conf")
        with open(path, "w") as f:
            f.write("\n".join(lines))
        return path

    def command(self):
        return [self.bin("supervisord"), "-n", "-c", self.cfg]

    def status(self):
        import xmlrpc.client
        proxy = xmlrpc.client.ServerProxy("http://127.0.0.1:%d/RPC2" % self.port)
        state = proxy.supervisor.getState()
        if state.get("statename") != "RUNNING":
            raise BenchError("state %s" % state)
        return proxy.supervisor.getAllProcessInfo()

    def restart_web(self, name):
        """S8: what `supervisorctl restart web:*` does: stop the group, start it."""
        import xmlrpc.client
        proxy = xmlrpc.client.ServerProxy("http://127.0.0.1:%d/RPC2" % self.port)
        proxy.supervisor.stopProcessGroup(name, True)
        proxy.supervisor.startProcessGroup(name, True)

    def status_worker(self, duration, start_at, interval=0.0):
        return Worker(self.ctx, "xmlrpcstatus",
                      {"port": self.port, "duration": duration,
                       "start_at": start_at, "interval": interval})

    def ping_worker(self, duration, start_at, interval=0.0, stop_file=None):
        return Worker(self.ctx, "xmlrpcstatus",
                      {"port": self.port, "duration": duration, "method": "getState",
                       "start_at": start_at, "interval": interval, "times": True,
                       "stop_file": stop_file})

    def restart_all(self, names):
        # what `supervisorctl restart all` does: stop all (waits), then start
        # all; in a thread, since the calls block until done
        import threading
        import xmlrpc.client

        def run():
            proxy = xmlrpc.client.ServerProxy("http://127.0.0.1:%d/RPC2" % self.port)
            try:
                proxy.supervisor.stopAllProcesses(True)
                proxy.supervisor.startAllProcesses(False)
            except Exception as e:
                log("  supervisord restart: %s" % e)
        threading.Thread(target=run, daemon=True).start()


class Circus(Manager):
    name = "circus"
    scenarios = Manager.scenarios | {"S8"}

    def bin(self, name):
        return os.path.join(self.ctx.venv, "bin", name)

    def available(self):
        return venv_state(self.ctx).get("circus")

    def version(self):
        try:
            out = subprocess.run([self.bin("python"), "-c",
                                  "import circus; print(circus.__version__)"],
                                 capture_output=True, text=True, timeout=30)
            return "circus " + out.stdout.strip()
        except Exception as e:
            return "? (%s)" % e

    def write_config(self, programs):
        self.port = free_port()
        self.endpoint = "tcp://127.0.0.1:%d" % self.port
        lines = ["[circus]", "endpoint = %s" % self.endpoint,
                 "pubsub_endpoint = tcp://127.0.0.1:%d" % free_port(),
                 "stats_endpoint = tcp://127.0.0.1:%d" % free_port(),
                 "statsd = false", "httpd = false", "loglevel = warning",
                 "logoutput = %s" % os.path.join(self.dir, "circusd.log"), ""]
        for pr in programs:
            if pr.web_port:
                lines += ["[socket:%s]" % pr.name, "host = 127.0.0.1",
                          "port = %d" % pr.web_port, ""]
                lines += ["[watcher:%s]" % pr.name, "use_sockets = True"]
                pr = Program(pr.name, pr.argv + ["circus", "$(circus.sockets.%s)" % pr.name],
                             pr.numprocesses)
            else:
                lines.append("[watcher:%s]" % pr.name)
            lines += ["cmd = %s" % pr.argv[0],
                      "args = %s" % shlex.join(pr.argv[1:]),
                      "numprocesses = %d" % pr.numprocesses,
                      "graceful_timeout = 5"]
            if pr.stdout_logfile:
                lines += ["stdout_stream.class = FileStream",
                          "stdout_stream.filename = %s" % pr.stdout_logfile,
                          "stdout_stream.max_bytes = %d" % LOG_MAXBYTES,
                          "stdout_stream.backup_count = 1"]
            lines.append("")
        path = os.path.join(self.dir, "circus.ini")
        with open(path, "w") as f:
            f.write("\n".join(lines))
        return path

    def command(self):
        return [self.bin("circusd"), self.cfg]

    def status(self):
        # the driver has no zmq: a port check, then one real call in the venv
        socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        w = self.status_worker(0, 0)
        try:
            res = w.result(30)
        finally:
            w.stop()
        if not res["n"]:
            raise BenchError("circus status failed: %s" % res.get("first_error"))
        return res

    def status_start_delay(self):
        return 2.0          # importing zmq + tornado in the venv takes a while

    def restart_web(self, name):
        """S8: `circusctl restart web` (the watcher's processes stop, new
        ones start; circusd keeps the socket open meanwhile)."""
        w = Worker(self.ctx, "circuscmd", {"endpoint": self.endpoint,
                                           "command": {"command": "restart",
                                                       "properties": {"name": name,
                                                                      "waiting": True}}},
                   python=self.bin("python"))
        try:
            res = w.result(120)
        finally:
            w.stop()
        if res.get("status") != "ok":
            raise BenchError("circus restart: %s" % res)

    def ping_worker(self, duration, start_at, interval=0.0, stop_file=None):
        return Worker(self.ctx, "circusstatus",
                      {"endpoint": self.endpoint, "duration": duration,
                       "command": "numwatchers", "start_at": start_at,
                       "interval": interval, "times": True, "stop_file": stop_file},
                      python=self.bin("python"))

    def restart_all(self, names):
        w = Worker(self.ctx, "circuscmd", {"endpoint": self.endpoint, "command": "restart"},
                   python=self.bin("python"))
        try:
            w.result(120)
        finally:
            w.stop()

    def status_worker(self, duration, start_at, interval=0.0):
        return Worker(self.ctx, "circusstatus",
                      {"endpoint": self.endpoint, "duration": duration,
                       "start_at": start_at, "interval": interval},
                      python=self.bin("python"))


MANAGER_CLASSES = {"gafferd": Gafferd, "supervisord": Supervisord, "circus": Circus}

_VENV_STATE = {}


def venv_state(ctx):
    """{'supervisor': reason or None, 'circus': reason or None}."""
    return _VENV_STATE


def ensure_venv(ctx, wanted):
    """Install supervisor and circus into ctx.venv (once), record failures."""
    py = os.path.join(ctx.venv, "bin", "python")
    mods = {"supervisor": "import supervisor.supervisord",
            "circus": "import circus, circus.client, zmq"}

    def check():
        res = {}
        for pkg, code in mods.items():
            try:
                r = subprocess.run([py, "-c", code], capture_output=True,
                                   text=True, timeout=60)
                res[pkg] = None if r.returncode == 0 else \
                    "not installed (%s)" % (r.stderr.strip().splitlines() or ["?"])[-1]
            except (OSError, subprocess.SubprocessError) as e:
                res[pkg] = "not installed (%s)" % e
        return res

    need = [m for m in wanted if m in PEERS]
    if not need:
        return
    pkgs = {"supervisord": "supervisor", "circus": "circus"}
    state = check() if os.path.exists(py) else {p: "no venv" for p in mods}
    missing = [pkgs[m] for m in need if state.get(pkgs[m])]
    if missing and not ctx.args.no_install:
        log("installing %s into %s ..." % (" ".join(missing), ctx.venv))
        logpath = os.path.join(ctx.venv + ".install.log")
        try:
            with open(logpath, "ab") as lf:
                if not os.path.exists(py):
                    subprocess.run([sys.executable, "-m", "venv", ctx.venv],
                                   stdout=lf, stderr=lf, timeout=300, check=True)
                subprocess.run([py, "-m", "pip", "install", "--disable-pip-version-check",
                                "-q"] + missing, stdout=lf, stderr=lf, timeout=900,
                               check=True)
        except (OSError, subprocess.SubprocessError) as e:
            log("  install failed (%s), see %s" % (e, logpath))
        state = check() if os.path.exists(py) else \
            {p: "not installed (no venv, see %s)" % logpath for p in mods}
    _VENV_STATE.update(state)


# --------------------------------------------------------------------------
# worker processes (run with `run.py --worker KIND --token T PARAMS`)
# --------------------------------------------------------------------------

def _result(obj):
    sys.stdout.write("RESULT " + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _term_to_exit(*_):
    raise SystemExit(0)


def _client_loop(call, p):
    """Calls call() back to back (or every `interval` s) for `duration` s
    starting at wall time `start_at`; reports count and latencies (us)."""
    duration, interval = p["duration"], p.get("interval") or 0.0
    start_at = p.get("start_at") or 0
    while time.time() < start_at:
        time.sleep(min(0.01, max(0.0, start_at - time.time())))
    lat = []
    times = [] if p.get("times") else None       # start of each call, s after t_start
    stop_file = p.get("stop_file")
    errors = 0
    first_error = None
    pc = time.perf_counter
    t_start = pc()
    wall_start = time.time()
    t_end = t_start + duration
    nxt = t_start
    while True:
        t0 = pc()
        try:
            call()
            lat.append(int((pc() - t0) * 1e6))
            if times is not None:
                times.append(t0 - t_start)
        except Exception as e:
            errors += 1
            if first_error is None:
                first_error = "%s: %s" % (type(e).__name__, e)
            time.sleep(0.01)
        if duration <= 0 or pc() >= t_end:
            break
        if stop_file and len(lat) % 20 == 0 and os.path.exists(stop_file):
            break
        if interval:
            nxt += interval
            d = nxt - pc()
            if d > 0:
                time.sleep(d)
    elapsed = pc() - t_start
    _result({"n": len(lat), "errors": errors, "first_error": first_error,
             "lat": lat, "elapsed": elapsed, "times": times, "wall_start": wall_start})


def worker_httpstatus(p):
    import http.client
    state = {"c": None}

    def call():
        c = state["c"]
        if c is None:
            c = state["c"] = http.client.HTTPConnection("127.0.0.1", p["port"],
                                                        timeout=10)
        try:
            c.request("GET", p["path"])
            r = c.getresponse()
            r.read()
            if r.status != 200:
                raise RuntimeError("HTTP %d" % r.status)
            if r.will_close:
                c.close()
                state["c"] = None
        except Exception:
            c.close()
            state["c"] = None
            raise
    _client_loop(call, p)


def worker_xmlrpcstatus(p):
    import xmlrpc.client
    proxy = xmlrpc.client.ServerProxy("http://127.0.0.1:%d/RPC2" % p["port"])
    method = getattr(proxy.supervisor, p.get("method") or "getAllProcessInfo")
    _client_loop(lambda: method(), p)


def worker_circusstatus(p):
    from circus.client import CircusClient
    client = CircusClient(endpoint=p["endpoint"], timeout=10)

    def call():
        res = client.call({"command": p.get("command") or "status", "properties": {}})
        if res.get("status") != "ok":
            raise RuntimeError(str(res)[:200])
    try:
        _client_loop(call, p)
    finally:
        client.stop()


def worker_circuscmd(p):
    """S8, S9: one circus command, waited for; ``command`` is its name (no
    properties) or the whole message.  The result is circusd's answer."""
    from circus.client import CircusClient
    command = p["command"]
    if isinstance(command, str):
        command = {"command": command, "properties": {}}
    client = CircusClient(endpoint=p["endpoint"], timeout=120)
    try:
        _result(client.call(command))
    finally:
        client.stop()


def worker_spawnloop(p):
    """S1 floor: posix_spawn the children one after the other, then wait."""
    signal.signal(signal.SIGTERM, _term_to_exit)
    kids = []
    argv = p["argv"]
    env = dict(os.environ)
    try:
        for _ in range(p["n"]):
            kids.append(os.posix_spawn(argv[0], argv, env))
        print("ready", flush=True)
        while True:
            signal.pause()
    finally:
        _kill_reap(kids)


def worker_respawner(p):
    """S2/S5 floor: children respawned from a blocking os.wait() loop."""
    signal.signal(signal.SIGTERM, _term_to_exit)
    kids = set()
    argv = p["argv"]
    env = dict(os.environ)
    try:
        for _ in range(p["n"]):
            kids.add(os.posix_spawn(argv[0], argv, env))
        print("ready", flush=True)
        while True:
            pid, _ = os.wait()
            kids.discard(pid)
            kids.add(os.posix_spawn(argv[0], argv, env))
    finally:
        _kill_reap(kids)


def _kill_reap(kids):
    for k in kids:
        try:
            os.kill(k, signal.SIGKILL)
        except OSError:
            pass
    for k in kids:
        try:
            os.waitpid(k, 0)
        except OSError:
            pass


def worker_floorhttp(p):
    """S3 floor: a minimal selectors HTTP/1.1 server answering 60 bytes."""
    import selectors
    body = b'{"floor": {"active": true, "running": 2, "max": 2}, "ok": 1}'
    assert len(body) == 60
    resp = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: 60\r\n\r\n" + body)
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", p["port"]))
    ls.listen(128)
    ls.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(ls, selectors.EVENT_READ, None)
    bufs = {}
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            if key.data is None:
                try:
                    c, _ = ls.accept()
                except OSError:
                    continue
                c.setblocking(False)
                c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                bufs[c.fileno()] = b""
                sel.register(c, selectors.EVENT_READ, c)
                continue
            c = key.data
            try:
                data = c.recv(65536)
            except OSError:
                data = b""
            if not data:
                sel.unregister(c)
                bufs.pop(c.fileno(), None)
                c.close()
                continue
            buf = bufs[c.fileno()] + data
            n = buf.count(b"\r\n\r\n")
            if n:
                buf = buf[buf.rindex(b"\r\n\r\n") + 4:]
                c.send(resp * n)
            bufs[c.fileno()] = buf


def worker_floorcopy(p):
    """S4 floor: pipe -> Python reader -> file (same rotation as the peers)."""
    signal.signal(signal.SIGTERM, _term_to_exit)
    path, maxbytes = p["path"], p["maxbytes"]
    import fcntl
    child = subprocess.Popen(p["argv"], stdout=subprocess.PIPE)
    fd = child.stdout.fileno()
    try:
        fcntl.fcntl(fd, 1031, 1 << 20)        # F_SETPIPE_SZ: 1 MiB pipe
    except OSError:
        pass
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    out = os.open(path, flags, 0o644)
    size = 0
    buf = bytearray(1 << 20)                   # no allocation per read
    mv = memoryview(buf)
    try:
        print("ready", flush=True)
        readv, write = os.readv, os.write
        while True:
            n = readv(fd, [buf])
            if not n:
                break
            write(out, mv[:n])
            size += n
            if size >= maxbytes:
                os.close(out)
                os.replace(path, path + ".1")
                out = os.open(path, flags, 0o644)
                size = 0
    finally:
        child.kill()
        child.wait()


def worker_streamclient(p):
    """S4b: one /streams client; counts bytes received over a window."""
    s = socket.create_connection(("127.0.0.1", p["port"]), timeout=10)
    s.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n"
               % (p["path"], p["port"])).encode())
    head = b""
    while b"\r\n\r\n" not in head:
        d = s.recv(65536)
        if not d:
            _result({"error": "connection closed before headers: %r" % head[:300]})
            return
        head += d
    head, _, rest = head.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    if b" 200" not in status:
        _result({"error": "bad reply %r" % (head + rest)[:300]})
        return
    buf = bytearray(1 << 20)
    total = len(rest)
    ended = False
    mono = time.monotonic
    t_start = mono()
    phases = []
    for until in (t_start + p["warmup"], t_start + p["warmup"] + p["window"]):
        while mono() < until:
            try:
                n = s.recv_into(buf)
            except socket.timeout:
                n = 0
            if not n:
                ended = True
                break
            total += n
        phases.append((total, mono()))
        if ended:
            break
    if len(phases) < 2:
        phases.append((total, mono()))
    (b0, t0), (b1, t1) = phases[0], phases[1]
    _result({"bytes": b1 - b0, "elapsed": max(t1 - t0, 1e-9), "ended": ended,
             "total": total})


class _Dechunk:
    """HTTP/1.1 chunked decoding, linear in what it is fed (one pass with
    an index; slicing the buffer after each chunk was quadratic and made
    S6's clients the bottleneck)."""

    def __init__(self):
        self.buf = b""
        self.left = 0
        self.crlf = False
        self.done = False

    def feed(self, data):
        buf = self.buf + data if self.buf else data
        pos, out = 0, []
        while not self.done:
            if self.left:
                take = buf[pos:pos + self.left]
                if not take:
                    break
                out.append(take)
                pos += len(take)
                self.left -= len(take)
                if not self.left:
                    self.crlf = True
                continue
            if self.crlf:
                if len(buf) - pos < 2:
                    break
                pos += 2
                self.crlf = False
            i = buf.find(b"\r\n", pos)
            if i < 0:
                break
            size = int(buf[pos:i].split(b";")[0], 16)
            pos = i + 2
            if size == 0:
                self.done = True
            self.left = size
        self.buf = buf[pos:]
        return b"".join(out)


SSE_EVENT = re.compile(rb"event: ?([^\r\n]*)\r?\n((?:data: ?[^\r\n]*\r?\n)*)\r?\n")
OS_PID = re.compile(rb'"os_pid": ?(\d+)')


def worker_watchclients(p):
    """S6: N eventsource clients on /watch in one selectors loop."""
    import selectors
    sel = selectors.DefaultSelector()
    clients = []
    for i in range(p["n"]):
        s = socket.create_connection(("127.0.0.1", p["port"]), timeout=10)
        s.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n"
                   % (p["path"], p["port"])).encode())
        s.setblocking(False)
        st = {"sock": s, "head": b"", "hdr": False, "dechunk": None, "buf": b"",
              "events": 0, "names": {}, "exit_pids": [], "closed": False}
        clients.append(st)
        sel.register(s, selectors.EVENT_READ, st)
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ, None)
    ready_sent = False
    deadline = time.monotonic() + p.get("max_time", 900)
    stop = False
    drain_until = None              # after "stop": read on until 1 s without data, 3 s at most
    while not stop and time.monotonic() < deadline:
        events = sel.select(0.2 if drain_until else 1.0)
        if drain_until is not None and time.monotonic() >= drain_until:
            stop = True
        for key, _ in events:
            st = key.data
            if st is None:
                sys.stdin.readline()
                sel.unregister(sys.stdin.fileno())
                drain_until = time.monotonic() + 1.0
                deadline = min(deadline, time.monotonic() + 3.0)    # the respawns go on
                continue
            if drain_until is not None:
                drain_until = time.monotonic() + 1.0
            try:
                data = st["sock"].recv(262144)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                st["closed"] = True
                sel.unregister(st["sock"])
                continue
            if not st["hdr"]:
                st["head"] += data
                if b"\r\n\r\n" not in st["head"]:
                    continue
                head, _, data = st["head"].partition(b"\r\n\r\n")
                st["hdr"] = True
                st["status"] = head.split(b"\r\n", 1)[0].decode("latin-1")
                if b"transfer-encoding: chunked" in head.lower():
                    st["dechunk"] = _Dechunk()
            if st["dechunk"] is not None:
                data = st["dechunk"].feed(data)
            buf = st["buf"] + data
            end = 0
            names = st["names"]
            for m in SSE_EVENT.finditer(buf):
                end = m.end()
                name = m.group(1)
                st["events"] += 1
                names[name] = names.get(name, 0) + 1
                if name == b"exit":
                    mp = OS_PID.search(m.group(2))
                    if mp:
                        st["exit_pids"].append(int(mp.group(1)))
            st["buf"] = buf[end:]
        if not ready_sent and all(c["hdr"] or c["closed"] for c in clients):
            ready_sent = True
            bad = [c.get("status", "closed") for c in clients
                   if c["closed"] or " 200" not in c.get("status", "")]
            print("ready %s" % (json.dumps(bad) if bad else ""), flush=True)
    _result({"clients": [
        {"events": c["events"], "closed": c["closed"], "status": c.get("status"),
         "names": {k.decode("latin-1"): v for k, v in sorted(c["names"].items())},
         "exit_pids": c["exit_pids"]} for c in clients]})


def worker_statussampler(p):
    """S7: the manager's own count of running processes, sampled every
    `interval` s; a line "reset" on stdin starts the figures again, any
    other line ends the sampling."""
    interval = p["interval"]
    if p["kind"] == "gafferd":
        import http.client
        state = {"c": None}

        def sample():
            if state["c"] is None:
                state["c"] = http.client.HTTPConnection("127.0.0.1", p["port"],
                                                        timeout=10)
            try:
                state["c"].request("GET", p["path"])
                r = state["c"].getresponse()
                body = r.read()
            except Exception:
                state["c"].close()
                state["c"] = None
                raise
            st = json.loads(body)
            return st["running"], st.get("ready"), st.get("state")
    else:
        import xmlrpc.client
        proxy = xmlrpc.client.ServerProxy("http://127.0.0.1:%d/RPC2" % p["port"])

        def sample():
            info = proxy.supervisor.getAllProcessInfo()
            return sum(1 for i in info if i["statename"] == "RUNNING"), None, None
    n = errors = 0
    min_running = min_ready = None
    states = []
    ready_sent = False
    while True:
        try:
            running, ready, st = sample()
            n += 1
            min_running = running if min_running is None else min(min_running, running)
            if ready is not None:
                min_ready = ready if min_ready is None else min(min_ready, ready)
            if st is not None and st not in states:
                states.append(st)
        except Exception:
            errors += 1
        if not ready_sent and n:
            print("ready", flush=True)
            ready_sent = True
        r, _, _ = select.select([0], [], [], interval)
        if r:
            line = os.read(0, 4096)
            if line.strip() != b"reset":
                break
            n = errors = 0
            min_running = min_ready = None
            states = []
    _result({"n": n, "errors": errors, "min_running": min_running,
             "min_ready": min_ready, "states": states})


def worker_webclient(p):
    """S8's client: GET / on a new connection each time, without pause,
    until "stop" on stdin; counts answers, failures and the pids seen."""
    import http.client
    ok, failed, first_error, pids = 0, 0, None, {}
    last_ok, gap = None, 0.0
    print("ready", flush=True)
    while not select.select([sys.stdin], [], [], 0)[0]:
        c = http.client.HTTPConnection("127.0.0.1", p["port"], timeout=10)
        try:
            c.request("GET", "/")
            r = c.getresponse()
            body = r.read()
            if r.status != 200:
                raise RuntimeError("HTTP %d" % r.status)
            ok += 1
            now = time.monotonic()
            if last_ok is not None:
                gap = max(gap, now - last_ok)
            last_ok = now
            pids[body.decode()] = pids.get(body.decode(), 0) + 1
            if ok == 1:
                print("answered", flush=True)
        except Exception as e:
            failed += 1
            if first_error is None:
                first_error = "%s: %s" % (type(e).__name__, e)
        finally:
            c.close()
    _result({"ok": ok, "failed": failed, "first_error": first_error,
             "pids": sorted(int(x) for x in pids), "gap_ms": round(gap * 1000.0, 1)})


WORKERS = {
    "circuscmd": worker_circuscmd,
    "webclient": worker_webclient,
    "statussampler": worker_statussampler,
    "httpstatus": worker_httpstatus,
    "xmlrpcstatus": worker_xmlrpcstatus,
    "circusstatus": worker_circusstatus,
    "circuscmd": worker_circuscmd,
    "spawnloop": worker_spawnloop,
    "respawner": worker_respawner,
    "floorhttp": worker_floorhttp,
    "floorcopy": worker_floorcopy,
    "streamclient": worker_streamclient,
    "watchclients": worker_watchclients,
}


def worker_main(argv):
    # run.py --worker KIND --token T PARAMS
    kind, params = argv[1], json.loads(argv[4])
    try:
        WORKERS[kind](params)
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as e:
        _result({"error": "%s: %s" % (type(e).__name__, e)})
        raise


# --------------------------------------------------------------------------
# scenarios: each *_once() measures one column once and returns {row: value}
# --------------------------------------------------------------------------

class Settings:
    def __init__(self, quick, reps):
        self.quick = quick
        self.reps = reps or (1 if quick else 5)
        self.s1_n = 500
        self.s2_kills = 4 if quick else 20
        self.s3_dur = 1.5 if quick else 5.0
        self.s4_window = 2.0 if quick else 5.0
        self.s5_settle = 1.0 if quick else 5.0
        self.s5_window = 5.0 if quick else 60.0
        self.s6_window = 4.0 if quick else 10.0
        self.s7_pairs = 4 if quick else 12     # half timed, half sampled
        self.settle_past_startsecs = 1.5      # > gafferd's default startsecs (1 s)
        self.s8_before = 0.5 if quick else 1.0   # S8: client alone before the restart
        self.s8_after = 0.5 if quick else 1.0    # and after it
        self.s9_n = 500 if quick else 2000
        self.s9_limit = 60.0 if quick else 180.0  # a restart slower than this is an error
        self.s10_templates = 100
        self.s10_window = 3.0 if quick else 10.0


def start_column(ctx, col, programs, floor_kind=None, floor_params=None):
    """Starts the floor worker or a manager; returns (obj, parent pid)."""
    if col == "floor":
        w = Worker(ctx, floor_kind, floor_params)
        return w, w.pid
    m = MANAGER_CLASSES[col](ctx)
    m.start(programs)
    return m, m.pid


def s1_once(ctx, S, col):
    n = S.s1_n
    argv = ctx.sleep_argv(86400)
    obj = None
    try:
        if col == "floor":
            t0 = time.monotonic()
            obj = Worker(ctx, "spawnloop", {"n": n, "argv": argv})
            alive = lambda: obj.p.poll() is None or _raise(
                BenchError("floor died: " + obj.stderr_tail()))
        else:
            obj = MANAGER_CLASSES[col](ctx)
            obj.prepare([Program("sleep", argv, n)])
            t0 = time.monotonic()
            obj.launch()
            alive = obj.check_alive
        cw = ChildWatcher(obj.pid, ctx.sleep_exe)
        t1 = cw.wait_count(n, 120, alive, "sleep children")
        return {"S1": t1 - t0}
    finally:
        if obj is not None:
            obj.stop()
            ctx.sweep()


def _raise(e):
    raise e


def s2_once(ctx, S, col):
    n = 20
    argv = ctx.sleep_argv(86400)
    # default settings: every worker is up longer than startsecs (1 s)
    # before the first kill, so each kill is a crash after a good run
    # (restart_delay 0), never a failed start (which waits for its backoff)
    obj, parent = start_column(ctx, col, [Program("sleep", argv, n)],
                               "respawner", {"n": n, "argv": argv})
    try:
        # the manager's children are polled through /proc/PID/task/*/children
        # (~60 us a poll; a scan of all of /proc takes 1-3 ms on a busy machine)
        cw = FastChildWatcher(parent, ctx.sleep_exe)
        cw.wait_count(n, 60)
        time.sleep(S.settle_past_startsecs)
        cw.poll()
        victims = [p for p in cw.order if p in cw.targets]     # oldest first
        lats = []
        timeouts = 0
        for i in range(S.s2_kills):
            victim = victims[i % len(victims)]
            if victim not in cw.targets:
                continue
            first_new = len(cw.order)
            t0 = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            while True:
                cw.poll()
                if len(cw.order) > first_new:
                    lats.append((cw.seen_at[cw.order[first_new]] - t0) * 1000.0)
                    break
                if time.monotonic() - t0 > 15:
                    timeouts += 1
                    break
                time.sleep(0.0002)
            time.sleep(random.uniform(0.05, 0.15))
        if not lats:
            raise BenchError("no replacement seen (%d timeouts)" % timeouts)
        if timeouts:
            lats += [15000.0] * timeouts
        return {"S2": statistics.median(lats), "S2p99": percentile(lats, 99),
                "_S2all": lats}
    finally:
        obj.stop()
        ctx.sweep()


def run_status_clients(ctx, col, target, k, duration, interval=0.0):
    """k concurrent status clients for `duration` s; returns aggregate."""
    if col == "floor":
        make = lambda start_at: Worker(ctx, "httpstatus", {
            "port": target, "path": "/status", "duration": duration,
            "start_at": start_at, "interval": interval})
        delay = 0.7
    else:
        make = lambda start_at: target.status_worker(duration, start_at, interval)
        delay = target.status_start_delay()
    start_at = time.time() + delay + 0.1 * k
    workers = [make(start_at) for _ in range(k)]
    try:
        results = [w.result(duration + delay + 0.1 * k + 60) for w in workers]
    finally:
        for w in workers:
            w.stop()
    lat = []
    rps = 0.0
    errors = 0
    for r in results:
        lat += r["lat"]
        errors += r["errors"]
        rps += r["n"] / max(r["elapsed"], 1e-9)
    if not lat:
        raise BenchError("no successful status call (%s)" % results[0].get("first_error"))
    return {"rps": rps, "p99": percentile(lat, 99) / 1000.0,
            "p50": percentile(lat, 50) / 1000.0, "errors": errors, "n": len(lat)}


def s3_once(ctx, S, col):
    argv = ctx.sleep_argv(86400)
    if col == "floor":
        port = free_port()
        obj = Worker(ctx, "floorhttp", {"port": port})
        target = port
    else:
        obj = MANAGER_CLASSES[col](ctx)
        target = obj
    try:
        if col == "floor":
            obj.expect("ready", 20)
        else:
            obj.start([Program("sleep%d" % i, argv, 2) for i in range(10)])
            ChildWatcher(obj.pid, ctx.sleep_exe).wait_count(20, 60, obj.check_alive)
            obj.wait_ready()
            time.sleep(0.3)
        one = run_status_clients(ctx, col, target, 1, S.s3_dur)
        ten = run_status_clients(ctx, col, target, 10, S.s3_dur)
        return {"S3": one["rps"], "S3p99": one["p99"], "S3c10": ten["rps"],
                "_S3c10p99": ten["p99"], "_S3err": one["errors"] + ten["errors"]}
    finally:
        obj.stop()
        ctx.sweep()


def measure_log_rate(tracker, window, alive=None):
    """Polls the log tracker every 10 ms for `window` s; returns MB/s."""
    b0 = tracker.poll()
    t0 = time.monotonic()
    while time.monotonic() - t0 < window:
        time.sleep(0.01)
        tracker.poll()
        if alive:
            alive()
    b1 = tracker.poll()
    return (b1 - b0) / (time.monotonic() - t0) / 1e6


def wait_growing(tracker, timeout, alive=None):
    deadline = time.monotonic() + timeout
    while tracker.poll() == 0:
        if time.monotonic() > deadline:
            raise BenchError("log file %s does not grow" % tracker.path)
        if alive:
            alive()
        time.sleep(0.02)


def s4_once(ctx, S, col):
    d = ctx.workdir("s4-" + col)
    path = os.path.join(d, "flood.log")
    tracker = LogTracker(path)
    obj = None
    status_w = None
    try:
        if col == "floor":
            obj = Worker(ctx, "floorcopy", {"argv": ctx.flood_argv(), "path": path,
                                            "maxbytes": LOG_MAXBYTES})
            obj.expect("ready", 20)
            alive = None
        else:
            obj = MANAGER_CLASSES[col](ctx)
            obj.start([Program("flood", ctx.flood_argv(), 1, stdout_logfile=path)])
            obj.wait_ready()
            alive = obj.check_alive
        wait_growing(tracker, 30, alive)
        time.sleep(0.5)
        res = {}
        if col != "floor":
            delay = obj.status_start_delay()
            start_at = time.time() + delay
            status_w = obj.status_worker(S.s4_window, start_at, 0.02)
            time.sleep(max(0.0, start_at - time.time()))
        res["S4"] = measure_log_rate(tracker, S.s4_window, alive)
        if status_w is not None:
            r = status_w.result(S.s4_window + 60)
            if not r["lat"]:
                raise BenchError("no status answer during the flood (%s)"
                                 % r.get("first_error"))
            res["S4p99"] = percentile(r["lat"], 99) / 1000.0
            res["_S4statusN"] = r["n"]
            res["_S4statusErr"] = r["errors"]
        return res
    finally:
        if status_w is not None:
            status_w.stop()
        tracker.close()
        if obj is not None:
            obj.stop()
        ctx.sweep()
        shutil.rmtree(d, ignore_errors=True)


def s4b_once(ctx, S, col):
    if col == "floor":
        return {"S4b": s4_once(ctx, S, "floor")["S4"]}
    m = Gafferd(ctx)
    w = None
    try:
        m.start([Program("flood", ctx.flood_argv(), 1, capture=True)])
        m.wait_ready()
        deadline = time.monotonic() + 20
        while True:
            pids = m.http("GET", "/processes/flood/_pids").get("pids")
            if pids:
                break
            if time.monotonic() > deadline:
                raise BenchError("flood process never listed")
            time.sleep(0.05)
        w = Worker(ctx, "streamclient", {
            "port": m.port, "path": "/streams/%d/stdout?feed=continuous&heartbeat=0"
            % pids[0], "warmup": 0.5, "window": S.s4_window})
        r = w.result(S.s4_window + 60)
        if r["ended"]:
            raise BenchError("stream ended early after %.1f MB (client dropped?)"
                             % (r["total"] / 1e6))
        return {"S4b": r["bytes"] / r["elapsed"] / 1e6}
    finally:
        if w is not None:
            w.stop()
        m.stop()
        ctx.sweep()


def bare_python(ctx):
    return ctx.popen([ctx.python, "-c", "import time; time.sleep(86400)", ctx.token],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def s5_once(ctx, S, col):
    res = {}
    # idle daemon, no programs
    if col == "floor":
        p = bare_python(ctx)
        try:
            time.sleep(max(0.5, S.s5_settle))
            res["S5idle"] = proc_rss_mib(p.pid)
        finally:
            p.kill()
            p.wait()
            ctx.live.discard(p)
    else:
        m = MANAGER_CLASSES[col](ctx)
        try:
            m.start([])
            m.wait_ready()
            time.sleep(S.s5_settle)
            res["S5idle"] = proc_rss_mib(m.pid)
        finally:
            m.stop()
    # 200 idle children
    n = 200
    argv = ctx.sleep_argv(86400)
    obj, parent = start_column(ctx, col, [Program("sleep", argv, n)],
                               "respawner", {"n": n, "argv": argv})
    try:
        ChildWatcher(parent, ctx.sleep_exe).wait_count(
            n, 120, None if col == "floor" else obj.check_alive)
        if col != "floor":
            obj.wait_ready()
        time.sleep(S.s5_settle)
        a = Sample(parent)
        time.sleep(S.s5_window)
        b = Sample(parent)
        res["S5cpu"] = Sample.cpu_percent(a, b)
        res["S5wake"] = Sample.wakeups(a, b)
        res["_S5rss200"] = proc_rss_mib(parent)
        if col != "floor":
            res["S5rss"] = res["_S5rss200"]
    finally:
        obj.stop()
        ctx.sweep()
    return res


S6_TEMPLATES = 50
S6_SLEEP = 0.048


def s6_once(ctx, S, col):
    """1,000 respawns/s nominal (50 x `sleep 0.048`), 20 /watch clients.

    Exits are counted from /proc (a child of the daemon whose exe was
    `sleep` and that went away); every one must reach every client as an
    `exit` event.  The floor is the os.wait() respawner with the same 50
    children (no clients): the machine's own respawn limit."""
    argv = ctx.sleep_argv(S6_SLEEP)
    w = None
    if col == "floor":
        obj = Worker(ctx, "respawner", {"n": S6_TEMPLATES, "argv": argv})
        alive = lambda: obj.p.poll() is None or _raise(
            BenchError("floor died: " + obj.stderr_tail()))
    else:
        obj = Gafferd(ctx)
        alive = obj.check_alive
    try:
        if col != "floor":
            obj.start([Program("r%d" % i, argv, 1, immediate=True)
                       for i in range(S6_TEMPLATES)])
            obj.wait_ready()
        cw = ChildWatcher(obj.pid, ctx.sleep_exe)
        cw.wait_count(S6_TEMPLATES * 3 // 4, 60, alive)
        if col != "floor":
            w = Worker(ctx, "watchclients", {
                "port": obj.port, "n": 20,
                "path": "/watch?feed=eventsource&heartbeat=0"})
            bad = w.expect("ready", 30).strip()
            if bad:
                raise BenchError("watch clients refused: %s" % bad)
        t_end = time.monotonic() + 0.5
        while time.monotonic() < t_end:
            cw.scan()
            time.sleep(0.003)
        cw.exited = []
        a = Sample(obj.pid)
        t_end = a.t + S.s6_window
        while time.monotonic() < t_end:
            cw.scan()
            time.sleep(0.003)
        cw.scan()
        b = Sample(obj.pid)
        exited = set(cw.exited)
        alive()
        if not exited:
            raise BenchError("no child exited during the window")
        rate = len(exited) / (b.t - a.t)
        cpu = Sample.cpu_percent(a, b)
        res = {"S6rate": rate, "S6cpu": cpu * 1000.0 / rate, "_S6cpu_raw": cpu}
        if w is not None:
            w.send("stop\n")               # the clients read until 1 s without data
            r = w.result(60)
            delivered = []
            for c in r["clients"]:
                got = set(c["exit_pids"]) & exited
                delivered.append(100.0 * len(got) / len(exited))
            events = [c["events"] for c in r["clients"]]
            res.update({"S6deliv": min(delivered),
                        "_S6events_min_max": [min(events), max(events)],
                        "_S6closed": sum(1 for c in r["clients"] if c["closed"]),
                        "_S6names": {k: v for k, v in r["clients"][0]["names"].items()
                                     if not k.startswith("proc.")}})
        return res
    finally:
        if w is not None:
            w.stop()
        obj.stop()
        ctx.sweep()


S7_N = 20


def s7_once(ctx, S, col):
    """`kill -9` two of 20 workers within 100 ms, default settings.

    Each pair: the two workers seen exec'd longest ago (both up more than
    startsecs), the second killed 10-90 ms after the first.  The k-th new
    `sleep` child of the manager seen after the first kill replaces the
    k-th kill; its latency is from just before that kill() call to the
    first poll (every ~0.2 ms, FastChildWatcher) that sees it exec'd.
    Meanwhile every other worker's pid is watched: one that disappears is
    a sibling stopped.  During the second half of the pairs the manager's
    own running count is sampled every 10 ms by a separate process
    (gafferd `/status/NAME`, supervisord XML-RPC; not Circus: its client
    needs zmq).  Only the first half's latencies make the S7 rows: a
    status call wakes a manager that polls (supervisord reaps and restarts
    on its next wake-up, so the sampler alone cuts its latency from ~1 s
    to ~50 ms); the second half's are `_S7lat_sampled`."""
    n = S7_N
    argv = ctx.sleep_argv(86400)
    obj, parent = start_column(ctx, col, [Program("sleep", argv, n)],
                               "respawner", {"n": n, "argv": argv})
    if col == "floor":
        alive = lambda: obj.p.poll() is None or _raise(
            BenchError("floor died: " + obj.stderr_tail()))
    else:
        alive = obj.check_alive
    sampler = None
    try:
        fw = FastChildWatcher(parent, ctx.sleep_exe)
        fw.wait_count(n, 60, alive)
        if col != "floor":
            obj.wait_ready()

        def idle(seconds):
            """Polls (every 5 ms) for `seconds`; returns the fewest live."""
            fewest = n
            t_end = time.monotonic() + seconds
            while time.monotonic() < t_end:
                fw.poll()
                fewest = min(fewest, len(fw.targets))
                time.sleep(0.005)
            return fewest

        min_live = idle(S.settle_past_startsecs)
        lats = []
        lats_sampled = []
        timeouts = 0
        siblings_stopped = set()
        for pair in range(S.s7_pairs):
            if pair == S.s7_pairs // 2 and col in ("gafferd", "supervisord"):
                params = {"kind": col, "port": obj.port, "interval": 0.01,
                          "path": "/status/sleep"}
                sampler = Worker(ctx, "statussampler", params)
                sampler.expect("ready", 30)
                sampler.send("reset\n")    # count from here: all 20 up
                min_live = min(min_live, idle(0.05))
            now = fw.poll()
            old = sorted((p for p in fw.targets
                          if now - fw.seen_at[p] > S.settle_past_startsecs),
                         key=lambda p: fw.seen_at[p])
            if len(old) < 2:
                min_live = min(min_live, idle(0.5))
                continue
            victims = old[:2]
            others = fw.targets - set(victims)
            first_new = len(fw.order)
            gap = random.uniform(0.01, 0.09)
            kills = []
            new = []
            deadline = None
            while True:
                if len(kills) < 2 and (not kills or time.monotonic() - kills[0] >= gap):
                    kills.append(time.monotonic())
                    os.kill(victims[len(kills) - 1], signal.SIGKILL)
                    if len(kills) == 2:
                        deadline = kills[1] + 15.0
                fw.poll()
                min_live = min(min_live, len(fw.targets))
                siblings_stopped |= others - fw.targets
                new = fw.order[first_new:]
                if len(kills) == 2 and len(new) >= 2:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    timeouts += 2 - len(new)
                    break
                time.sleep(0.0002)
            for k, pid in enumerate(new[:2]):
                (lats if sampler is None else lats_sampled).append(
                    (fw.seen_at[pid] - kills[k]) * 1000.0)
            t_pause = random.uniform(0.2, 0.4)
            min_live = min(min_live, idle(t_pause))
            siblings_stopped |= others - fw.targets
            alive()
        min_live = min(min_live, idle(0.5))
        alive()
        if not lats:
            raise BenchError("no replacement seen (%d timeouts)" % timeouts)
        lats += [15000.0] * timeouts
        res = {"S7": statistics.median(lats), "S7max": max(lats),
               "S7sib": float(len(siblings_stopped)), "S7live": float(min_live),
               "_S7all": lats}
        if lats_sampled:
            res["_S7lat_sampled"] = [round(x, 2) for x in lats_sampled]
        if sampler is not None:
            sampler.send("stop\n")
            r = sampler.result(30)
            if r["min_running"] is None:
                raise BenchError("status sampler: no answer (%d errors)" % r["errors"])
            res["S7run"] = float(r["min_running"])
            res["_S7samples"] = r["n"]
            if r["min_ready"] is not None:
                res["_S7minready"] = r["min_ready"]
                res["_S7states"] = r["states"]
        return res
    finally:
        if sampler is not None:
            sampler.stop()
        obj.stop()
        ctx.sweep()


def _web_pids(m, port, old, timeout=30.0):
    """The pids of 4 web servers not in ``old`` that answer GET /."""
    import http.client
    deadline = time.monotonic() + timeout
    seen = set()
    while len(seen) < 4:
        m.check_alive()
        if time.monotonic() > deadline:
            raise BenchError("only %d of 4 new web servers answered" % len(seen))
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/")
            pid = int(c.getresponse().read())
            c.close()
            if pid not in old:
                seen.add(pid)
        except (OSError, ValueError, http.client.HTTPException):
            time.sleep(0.01)
    return seen


def s8_once(ctx, S, col):
    """Rolling restart of 4 web processes while a client sends requests
    without pause (a new connection each): the requests that failed.
    gafferd holds the socket ([socket:web], LISTEN_FDS) and restarts with
    `_restart?rolling=1` (each new process ready, `ready = log:`, before
    an old one stops); Circus holds it too (`use_sockets`) and restarts
    the watcher (`restart`); supervisord holds none, so each process binds
    the port itself (SO_REUSEPORT) and the group is stopped and started
    (`supervisorctl restart web:*`).  Every old process must have been
    replaced (the client's answers carry the server's pid)."""
    port = free_port()
    argv = [ctx.python, ctx.web_script, ctx.token]
    m = MANAGER_CLASSES[col](ctx)
    m.start([Program("web", argv, 4, web_port=port)])
    client = None
    try:
        m.wait_ready()
        old = _web_pids(m, port, set())
        client = Worker(ctx, "webclient", {"port": port})
        client.expect("answered", 30)
        time.sleep(S.s8_before)
        t0 = time.monotonic()
        m.restart_web("web")
        took = time.monotonic() - t0
        _web_pids(m, port, old)             # until 4 new servers answer
        time.sleep(S.s8_after)
        client.send("stop\n")
        res = client.result(30)
        new = set(res["pids"]) - old
        left = [pid for pid in old if _alive_not_zombie(pid)]
        if left:
            raise BenchError("old web servers still running: %s" % left)
        return {"S8": float(res["failed"]), "_S8ok": res["ok"],
                "_S8restart_s": round(took, 2), "_S8new_pids_answering": len(new),
                "_S8longest_gap_ms": res["gap_ms"],
                "_S8first_error": res["first_error"]}
    finally:
        if client is not None:
            client.stop()
        m.stop()
        ctx.sweep()


def _latency_during(r, t_from, t_to):
    """Latencies (ms) of the calls a ping worker started between wall
    times t_from and t_to."""
    base = r["wall_start"]
    return [lat / 1000.0 for lat, t in zip(r["lat"], r["times"])
            if t_from <= base + t <= t_to]


def s9_once(ctx, S, col):
    """Restart of all N `sleep` children (one program): time until every
    one was replaced (N new children exec'd, none of the old left, seen
    in /proc), and the manager's cheapest call (gafferd `/ping`,
    supervisord `getState`, Circus `numwatchers`) back to back meanwhile:
    p99 and max.  supervisord restarts as `supervisorctl restart all`
    does (stop all, then start all), Circus with its `restart` command,
    gafferd with `POST /processes/NAME/_restart` (new before old)."""
    n = S.s9_n
    argv = ctx.sleep_argv(86400)
    obj = MANAGER_CLASSES[col](ctx)
    ping = None
    stop_file = os.path.join(ctx.workdir("s9-" + col), "stop")
    try:
        obj.start([Program("sleep", argv, n)])
        obj.wait_ready(60)
        cw = ChildWatcher(obj.pid, ctx.sleep_exe)
        cw.wait_count(n, S.s9_limit, obj.check_alive, "sleep children")
        time.sleep(1.5)
        cw.scan()
        old = set(cw.targets)
        start_at = time.time() + obj.status_start_delay()
        ping = obj.ping_worker(S.s9_limit + 30, start_at, 0.0, stop_file)
        time.sleep(max(0.0, start_at - time.time()) + 0.3)
        w0, t0 = time.time(), time.monotonic()
        obj.restart_all(["sleep"])
        deadline = t0 + S.s9_limit
        while True:
            cw.scan()
            new = cw.targets - old
            if len(new) >= n and not (cw.targets & old):
                break
            if time.monotonic() > deadline:
                raise BenchError("restart not done after %.0f s: %d new, %d old left"
                                 % (S.s9_limit, len(new), len(cw.targets & old)))
            obj.check_alive()
            time.sleep(0.005)
        t1, w1 = time.monotonic(), time.time()
        open(stop_file, "w").close()
        r = ping.result(S.s9_limit + 60)
        lat = _latency_during(r, w0, w1)
        if not lat:
            raise BenchError("no answer during the restart (%s)" % r.get("first_error"))
        return {"S9time": t1 - t0, "S9p99": percentile(lat, 99), "S9max": max(lat),
                "_S9calls": len(lat), "_S9errors": r["errors"]}
    finally:
        if ping is not None:
            ping.stop()
        obj.stop()
        ctx.sweep()


def s10_once(ctx, S, col):
    """Crash storm: 100 programs whose child exits at once (`sleep` of a
    few ms), respawned at once (gafferd `startsecs = 0, restart_delay =
    0`; supervisord `startsecs = 0`; Circus defaults); the cheapest call
    back to back for the window: p99 and max, and the respawn rate."""
    argv = ctx.sleep_argv(0.001)
    obj = MANAGER_CLASSES[col](ctx)
    ping = None
    try:
        obj.start([Program("c%d" % i, argv, 1, immediate=True)
                   for i in range(S.s10_templates)])
        obj.wait_ready(60)
        cw = ChildWatcher(obj.pid, ctx.sleep_exe)
        t_end = time.monotonic() + 1.0
        while time.monotonic() < t_end:
            cw.scan()
            time.sleep(0.003)
        start_at = time.time() + obj.status_start_delay()
        ping = obj.ping_worker(S.s10_window, start_at, 0.0)
        time.sleep(max(0.0, start_at - time.time()))
        cw.exited = []
        t0 = time.monotonic()
        t_end = t0 + S.s10_window
        while time.monotonic() < t_end:
            cw.scan()
            time.sleep(0.003)
        rate = len(set(cw.exited)) / (time.monotonic() - t0)
        r = ping.result(S.s10_window + 60)
        lat = [x / 1000.0 for x in r["lat"]]
        if not lat:
            raise BenchError("no answer during the storm (%s)" % r.get("first_error"))
        obj.check_alive()
        return {"S10p99": percentile(lat, 99), "S10max": max(lat), "_S10rate": rate,
                "_S10calls": len(lat), "_S10errors": r["errors"]}
    finally:
        if ping is not None:
            ping.stop()
        obj.stop()
        ctx.sweep()


SCENARIO_FUNCS = {"S1": s1_once, "S2": s2_once, "S3": s3_once, "S4": s4_once,
                  "S4b": s4b_once, "S5": s5_once, "S6": s6_once, "S7": s7_once,
                  "S8": s8_once, "S9": s9_once, "S10": s10_once}
SCENARIO_COLUMNS = {"S1": COLUMNS, "S2": COLUMNS, "S3": COLUMNS, "S4": COLUMNS,
                    "S4b": ["floor", "gafferd"], "S5": COLUMNS, "S6": ["floor", "gafferd"],
                    "S7": COLUMNS, "S8": ["gafferd", "supervisord", "circus"],
                    "S9": ALL_MANAGERS, "S10": ALL_MANAGERS}


# --------------------------------------------------------------------------
# table
# --------------------------------------------------------------------------

# key, label, unit, better, target text, check(g, floor) -> bool
ROWS = [
    ("S1", "S1 cold start until 500 `sleep` children have exec'd", "s", "lower",
     "≤ 1.5× floor", lambda g, f: g <= 1.5 * f),
    ("S2", "S2 kill -9 one of 20: until the replacement has exec'd, median", "ms",
     "lower", "≤ 5 ms", lambda g, f: g <= 5),
    ("S2p99", "S2 same, p99", "ms", "lower", "≤ 20 ms", lambda g, f: g <= 20),
    ("S3", "S3 status of all processes (10 × 2), one keep-alive client", "req/s",
     "higher", "≥ 70 % of floor", lambda g, f: g >= 0.70 * f),
    ("S3p99", "S3 same, p99 latency", "ms", "lower", "≤ 1 ms", lambda g, f: g <= 1),
    ("S3c10", "S3 same, 10 concurrent clients", "req/s", "higher",
     "≥ 50 % of floor", lambda g, f: g >= 0.50 * f),
    ("S4", "S4 a child floods stdout, written to a log file", "MB/s", "higher",
     "≥ 80 % of floor and ahead of supervisord",
     lambda g, f, peers: g >= 0.80 * f and g > (peers.get("supervisord") or 0)),
    ("S4p99", "S4 status p99 during the flood (1 call / 20 ms)", "ms", "lower",
     "≤ 5 ms", lambda g, f: g <= 5),
    ("S4b", "S4b same flood streamed to one `/streams` client", "MB/s", "higher",
     "≥ 50 % of floor", lambda g, f: g >= 0.50 * f),
    ("S5idle", "S5 daemon RSS, idle, no programs (floor: bare `python3`)", "MiB",
     "lower", "≤ 1.3× bare python", lambda g, f: g <= 1.3 * f),
    ("S5cpu", "S5 200 idle children: daemon CPU (floor: `os.wait()` respawner)",
     "%", "lower", "– (floor 0)", None),
    ("S5wake", "S5 200 idle children: daemon wake-ups", "/s", "lower",
     "0 /s (< 0.05)", lambda g, f: g < 0.05),
    ("S5rss", "S5 200 idle children: daemon RSS (floor: bare `python3`)", "MiB",
     "lower", "≤ 1.6× bare python", lambda g, f: g <= 1.6 * f),
    ("S6rate", "S6 respawns/s achieved, 50 templates of `sleep 0.048` "
     "(nominal 1,000/s; floor: `os.wait()` respawner)", "/s", "higher",
     "≥ 600 /s", lambda g, f: g >= 600),
    ("S6deliv", "S6 `exit` events delivered, worst of 20 eventsource clients", "%",
     "higher", "100 %", lambda g, f: g >= 100.0),
    ("S6cpu", "S6 daemon CPU, scaled to 1,000 respawns/s", "% of a core", "lower",
     "≤ 50 % (0.5 ms a respawn)", lambda g, f: g <= 50),
    ("S7", "S7 kill -9 two of 20 within 100 ms (default settings): kill → "
     "replacement exec'd, median", "ms", "lower", "≤ 5 ms", lambda g, f: g <= 5),
    ("S7max", "S7 same, slowest replacement", "ms", "lower", "–", None),
    ("S7sib", "S7 other workers that stopped (their pids, watched in `/proc`)",
     "processes", "lower", "0", lambda g, f: g == 0),
    ("S7live", "S7 fewest live workers seen in `/proc` (of 20)", "processes",
     "higher", "≥ 18", lambda g, f: g >= 18),
    ("S7run", "S7 fewest `running` in the manager's own status, sampled every "
     "10 ms (of 20)", "processes", "higher", "≥ 18", lambda g, f: g >= 18),
    ("S8", "S8 requests failed during a rolling restart of 4 web processes "
     "(client without pause; gafferd `_restart?rolling=1`, Circus `restart` "
     "with its socket, supervisord `restart web:*`)", "requests", "lower", "0",
     lambda g, f: g == 0),
    ("S9time", "S9 restart of all 2,000 `sleep` children (quick: 500): until every one "
     "was replaced", "s", "lower", "≤ 3 s", lambda g, f: g <= 3),
    ("S9p99", "S9 cheapest call (gafferd `/ping`) back to back during that restart, p99",
     "ms", "lower", "≤ 5 ms", lambda g, f: g <= 5),
    ("S9max", "S9 same, slowest", "ms", "lower", "≤ 20 ms", lambda g, f: g <= 20),
    ("S10p99", "S10 crash storm, 100 templates (`startsecs = 0`, `restart_delay = 0`): "
     "cheapest call back to back, p99", "ms", "lower", "≤ 5 ms", lambda g, f: g <= 5),
    ("S10max", "S10 same, slowest", "ms", "lower", "≤ 20 ms", lambda g, f: g <= 20),
]
ROW_SCENARIO = {"S1": "S1", "S2": "S2", "S2p99": "S2", "S3": "S3", "S3p99": "S3",
                "S3c10": "S3", "S4": "S4", "S4p99": "S4", "S4b": "S4b",
                "S5idle": "S5", "S5cpu": "S5", "S5wake": "S5", "S5rss": "S5",
                "S6rate": "S6", "S6deliv": "S6", "S6cpu": "S6",
                "S7": "S7", "S7max": "S7", "S7sib": "S7", "S7live": "S7", "S7run": "S7",
                "S8": "S8", "S9time": "S9", "S9p99": "S9", "S9max": "S9",
                "S10p99": "S10", "S10max": "S10"}
NO_RATIO = {"S7sib", "S7live", "S7run", "S8"}   # counts: a ratio means nothing
FLOOR_ALIAS = {"S5rss": "S5idle"}     # RSS targets are against bare python


def fmt(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "?"
    a = abs(v)
    if a >= 1000:
        return "{:,.0f}".format(v)
    if a >= 100:
        return "%.0f" % v
    if a >= 10:
        return "%.1f" % v
    if a >= 1:
        return "%.2f" % v
    if a == 0:
        return "0"
    if a >= 0.01:
        return "%.3f" % v
    return "%.2g" % v


def fmt_ratio(r):
    if r is None or math.isnan(r) or math.isinf(r):
        return "?"
    return ("%.2f" % r) if r < 10 else ("%.0f" % r) if r >= 100 else ("%.1f" % r)


class Results:
    def __init__(self):
        self.values = {}      # (row, col) -> [value per rep]
        self.extra = {}       # (key, col) -> [value per rep]
        self.errors = {}      # (scenario, col) -> [error strings]
        self.status = {}      # col -> reason it was not measured

    def add(self, col, res):
        for k, v in res.items():
            d = self.extra if k.startswith("_") else self.values
            d.setdefault((k, col), []).append(v)

    def median(self, row, col):
        v = self.values.get((row, col))
        return statistics.median(v) if v else None


def ratio(v, ref):
    if v is None or ref is None:
        return None
    if ref == 0:
        return 1.0 if v == 0 else float("inf")
    return v / ref


def build_table(results, columns, rows_wanted):
    out = []
    hdr = ["scenario", "unit"] + [COLUMN_TITLES[c] for c in columns] + \
          ["target (gafferd)", "gafferd"]
    out.append("| " + " | ".join(hdr) + " |")
    out.append("|" + "---|" * len(hdr))
    for key, label, unit, better, ttext, check in ROWS:
        if key not in rows_wanted:
            continue
        fkey = FLOOR_ALIAS.get(key, key)
        fmed = results.median(fkey, "floor")
        peer_meds = [(p, results.median(key, p)) for p in PEERS]
        peer_meds = [(p, m) for p, m in peer_meds if m is not None]
        best_peer = None
        if peer_meds:
            pick = min if better == "lower" else max
            best_peer = pick(peer_meds, key=lambda pm: pm[1])
        cells = []
        for col in columns:
            vals = results.values.get((key if col != "floor" else fkey, col))
            if not vals:
                sc = ROW_SCENARIO[key]
                if col in results.status:
                    cells.append(results.status[col])
                elif results.errors.get((sc, col)):
                    cells.append("error (see Errors)")
                elif col not in SCENARIO_COLUMNS[sc] or \
                        (col == "floor" and key in ("S4p99",)):
                    cells.append("–")
                else:
                    cells.append("–")
                continue
            med = statistics.median(vals)
            txt = "**%s**" % fmt(med)
            if len(vals) > 1:
                txt += " (%s–%s)" % (fmt(min(vals)), fmt(max(vals)))
            if col != "floor" and key not in NO_RATIO:
                rf = ratio(med, fmed)
                if rf is not None and fmed != 0:
                    txt += " · %s× floor" % fmt_ratio(rf)
                if best_peer is not None and best_peer[1] != 0:
                    txt += " · %s× best peer" % fmt_ratio(ratio(med, best_peer[1]))
            cells.append(txt)
        g = results.median(key, "gafferd")
        if check is None or g is None:
            verdict = "–" if check is None else "not measured"
        else:
            needs_floor = key in ("S1", "S3", "S3c10", "S4", "S4b", "S5idle", "S5rss")
            if needs_floor and fmed is None:
                verdict = "no floor"
            else:
                args = (g, fmed, dict(peer_meds)) if check.__code__.co_argcount == 3 \
                    else (g, fmed)
                verdict = "PASS" if check(*args) else "**MISS**"
        out.append("| " + " | ".join([label, unit] + cells + [ttext, verdict]) + " |")
    return "\n".join(out)


def machine_info():
    info = {}
    info["cores"] = os.cpu_count()
    info["kernel"] = platform.release()
    info["python"] = platform.python_version()
    try:
        info["loadavg"] = _read("/proc/loadavg").split()[:3]
    except OSError:
        info["loadavg"] = "?"
    try:
        for line in _read("/proc/cpuinfo").splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def report(ctx, S, results, columns, scenarios, versions, t_start, interrupted,
           load_start):
    rows_wanted = {k for k, s in ROW_SCENARIO.items() if s in scenarios}
    now = datetime.datetime.now()
    mi = machine_info()
    lines = ["# gafferd benchmark, %s%s" % (now.strftime("%Y-%m-%d %H:%M"),
                                             " (quick)" if S.quick else ""), ""]
    if interrupted:
        lines += ["**Interrupted: partial results.**", ""]
    lines += ["- machine: %s cores, %s, Linux %s, Python %s; load average %s at the "
              "start, %s at the end (above ~0.5 the figures are noisy)"
              % (mi["cores"], mi.get("cpu", "?"), mi["kernel"], mi["python"],
                 " ".join(load_start), " ".join(mi["loadavg"])),
              "- mode: %s, %d repetition(s) per figure; median **bold**, (min–max) "
              "over the repetitions; duration %.0f s"
              % ("quick" if S.quick else "full", S.reps, time.monotonic() - t_start)]
    for col in columns:
        if col != "floor":
            lines.append("- %s: %s" % (COLUMN_TITLES[col], versions.get(col, "?")))
    lines += ["- `N× floor` = value ÷ floor value, `N× best peer` = value ÷ the better "
              "of supervisord and Circus in this run (for times lower is better, for "
              "rates higher is better)", ""]
    lines.append(build_table(results, columns, rows_wanted))
    notes = []
    for (sc, col), errs in sorted(results.errors.items()):
        for e in errs:
            notes.append("- %s %s: %s" % (sc, COLUMN_TITLES[col], e))
    extra = []
    for (k, col), vals in sorted(results.extra.items()):
        if k in ("_S2all", "_S7all"):
            vals = ["%d kills, max %.1f ms" % (len(v), max(v)) for v in vals]
        extra.append("- %s %s: %s" % (k[1:], COLUMN_TITLES[col], json.dumps(vals)))
    if notes:
        lines += ["", "## Errors", ""] + notes
    if extra:
        lines += ["", "## Other figures (per repetition)", ""] + extra
    raw = {"%s|%s" % k: v for k, v in results.values.items()}
    lines += ["", "<details><summary>raw values</summary>", "", "```json",
              json.dumps(raw, sort_keys=True), "```", "", "</details>", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog="bench/run.py",
        description="Benchmark gafferd beside supervisord, Circus and the machine's "
                    "floor (scenarios S1-S10). Prints a Markdown table and "
                    "writes it to bench/results-<date>.md.")
    ap.add_argument("--quick", action="store_true",
                    help="short windows and 1 repetition (under 3 minutes)")
    ap.add_argument("--only", metavar="S1,S3",
                    help="scenarios to run (default all: %s)" % ",".join(ALL_SCENARIOS))
    ap.add_argument("--managers", metavar="gafferd,supervisord",
                    help="managers to measure (default all: %s); the floor is "
                         "always measured" % ",".join(ALL_MANAGERS))
    ap.add_argument("--reps", type=int, help="repetitions (default 5, quick 1)")
    ap.add_argument("--venv", help="virtualenv for supervisor and circus "
                                   "(default ${TMPDIR:-/tmp}/gafferd-bench-venv)")
    ap.add_argument("--no-install", action="store_true",
                    help="never pip install; peers missing from the venv are "
                         "reported as not installed")
    ap.add_argument("--output", help="Markdown file to write (default "
                                     "bench/results-<date>[-quick].md; '-' for none)")
    ap.add_argument("--keep-tmp", action="store_true",
                    help="keep the temporary configs and logs")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)

    def split(v, allowed, what):
        if not v:
            return list(allowed)
        items = [x.strip() for x in v.split(",") if x.strip()]
        low = {a.lower(): a for a in allowed}
        out = []
        for x in items:
            if x.lower() == "floor" and what == "manager":
                continue
            if x.lower() not in low:
                ap.error("unknown %s %r (choose from %s)" % (what, x, ", ".join(allowed)))
            out.append(low[x.lower()])
        return [a for a in allowed if a in out]
    args.scenarios = split(args.only, ALL_SCENARIOS, "scenario")
    args.manager_list = split(args.managers, ALL_MANAGERS, "manager")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker_main(argv)
    args = parse_args(argv)
    S = Settings(args.quick, args.reps)
    ctx = Ctx(args)

    def on_signal(signum, frame):
        raise KeyboardInterrupt()
    # explicit: a background job of a non-interactive shell starts with
    # SIGINT ignored, and Ctrl-C must always clean up
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    load_start = machine_info()["loadavg"]

    t_start = time.monotonic()
    results = Results()
    columns = ["floor"] + args.manager_list
    versions = {}
    interrupted = False
    try:
        ensure_venv(ctx, args.manager_list)
        for col in args.manager_list:
            m = MANAGER_CLASSES[col](ctx)
            why = m.available()
            if why:
                results.status[col] = why if why.startswith("not") else "not installed"
                log("%s: %s" % (col, why))
            else:
                versions[col] = m.version()
        for sc in args.scenarios:
            cols = [c for c in columns if c in SCENARIO_COLUMNS[sc]
                    and (c == "floor" or sc in MANAGER_CLASSES[c].scenarios)
                    and c not in results.status]
            for rep in range(S.reps):
                for col in cols:
                    if (col in ("supervisord", "circus")
                            and len(results.errors.get((sc, col), [])) >= 2):
                        continue        # it keeps failing, save the time
                    t0 = time.monotonic()
                    try:
                        res = SCENARIO_FUNCS[sc](ctx, S, col)
                    except BenchError as e:
                        results.errors.setdefault((sc, col), []).append(str(e)[:600])
                        log("%s %s rep %d: ERROR %s" % (sc, col, rep + 1, str(e)[:600]))
                        continue
                    results.add(col, res)
                    shown = ", ".join("%s=%s" % (k, fmt(v)) for k, v in res.items()
                                      if not k.startswith("_"))
                    log("%s %s rep %d/%d: %s (%.1f s)"
                        % (sc, col, rep + 1, S.reps, shown, time.monotonic() - t0))
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted, cleaning up ...")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)      # do not interrupt the sweep
        left = ctx.sweep()
        if left:
            log("warning: could not kill %s" % left)
        if not args.keep_tmp:
            shutil.rmtree(ctx.tmp_root, ignore_errors=True)
        else:
            log("temporary files kept in %s" % ctx.tmp_root)
    text = report(ctx, S, results, columns, args.scenarios, versions, t_start,
                  interrupted, load_start)
    print(text)
    if args.output != "-":
        out = args.output or os.path.join(
            HERE, "results-%s%s.md" % (datetime.date.today().isoformat(),
                                       "-quick" if args.quick else ""))
        with open(out, "w") as f:
            f.write(text)
        log("written to %s" % out)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
