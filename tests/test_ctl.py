"""``gafferd.py ctl``: the command-line client, end to end against a real
daemon over TCP, a unix socket and TLS with a token; ``logs -f`` across
process restarts and dropped connections (through a TCP proxy the test
cuts); exit statuses; output piped into ``head``; and ``top`` driven
through a pseudo-terminal."""
from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import socket
import struct
import subprocess
import termios
import textwrap
import threading
import time

import pytest

from conftest import GAFFERD, PY, wait_for

TICKER = """\
import itertools, sys, time
for i in itertools.count():
    print(i, flush=True)
    time.sleep(0.02)
"""



def config(extra=""):
    return textwrap.dedent("""\
        [process:ticker]
        cmd = %s ticker.py
        redirect_output = stdout, stderr
        graceful_timeout = 2

        [process:web:api]
        cmd = sleep 3600

        [process:web:worker]
        cmd = sleep 3600
        """ % PY) + textwrap.dedent(extra)


def make(gafferd, tmp_path, extra="", ctl_args=None):
    """A daemon running ``config(extra)``, every template running; without
    plain HTTP on d.port, ``ctl_args`` (connection options) reach it."""
    (tmp_path / "ticker.py").write_text(TICKER)
    d = gafferd(config(extra))
    if ctl_args is not None:
        r = ctl(ctl_args + ["wait", "--ready", "--timeout", "20", "all"])
        assert r.returncode == 0, r
        return d
    wait_for(lambda: all(s["state"] == "running" for s in d.json("GET", "/status").values()
                         if s["active"]), message="every template running")
    return d


def ctl(args, url=None, env=None, timeout=30, cwd=None):
    """Run ``gafferd.py ctl [--url URL] ARGS`` to completion."""
    e = dict(os.environ)
    e.pop("GAFFERD_URL", None)
    e.pop("GAFFERD_TOKEN", None)
    e.update(env or {})
    argv = [PY, GAFFERD, "ctl"] + (["--url", url] if url else []) + list(args)
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL, timeout=timeout, env=e, cwd=cwd,
                          universal_newlines=True)


def url_of(d):
    return "http://127.0.0.1:%d" % d.port


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def no_traceback(result):
    assert "Traceback" not in result.stderr, result.stderr


# -- commands over TCP -------------------------------------------------------

def test_status_table_processes_and_json(gafferd, tmp_path):
    d = make(gafferd, tmp_path)
    r = ctl(["status"], url_of(d))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["NAME", "STATE", "READY/RUN/WANT", "PIDS", "UPTIME", "RESTARTS",
                                "LAST", "EXIT", "CPU", "MEM"]
    row = [l for l in lines if l.startswith("ticker ")][0].split()
    os_pid = d.os_pid(d.pids("ticker")[0])
    assert row[1] == "running" and row[2] == "1/1/1" and row[3] == str(os_pid), row
    assert {l.split()[0] for l in lines[1:]} == {"ticker", "web:api", "web:worker"}
    r = ctl(["status", "-p", "web:"], url_of(d))
    assert r.returncode == 0, r.stderr
    assert [l.split()[0].split("#")[0] for l in r.stdout.splitlines()[1:]] == [
        "web:api", "web:worker"]
    r = ctl(["status", "--json", "ticker"], url_of(d))
    data = json.loads(r.stdout)
    assert list(data) == ["ticker"] and data["ticker"]["processes"][0]["os_pid"] == os_pid
    assert data["ticker"]["stats"][0]["pid"] == os_pid


def test_start_stop_restart_scale_signal(gafferd, tmp_path):
    d = make(gafferd, tmp_path)
    url = url_of(d)
    r = ctl(["stop", "web:"], url)
    assert r.returncode == 0 and r.stdout.split("\n")[:2] == [
        "web:api: stopped", "web:worker: stopped"], r
    assert d.status("web:api")["state"] == "stopped"
    assert d.status("web:worker")["state"] == "stopped"
    assert ctl(["start", "web:api"], url).returncode == 0
    d.wait_running("web:api", 1)
    old = d.pids("ticker")
    assert ctl(["restart", "ticker"], url).stdout == "ticker: restarted\n"
    wait_for(lambda: (lambda p: p and not set(p) & set(old))(d.pids("ticker")),
             message="new ticker processes")
    assert ctl(["scale", "web:api", "3"], url).stdout == "web:api: 3 process(es)\n"
    assert ctl(["scale", "web:api", "+2"], url).stdout == "web:api: 5 process(es)\n"
    assert ctl(["scale", "web:api", "-4"], url).stdout == "web:api: 1 process(es)\n"
    d.wait_running("web:api", 1)
    before = d.pids("web:api")
    r = ctl(["signal", "web:api", "KILL"], url)
    assert r.returncode == 0 and r.stdout == "web:api: sent SIGKILL\n", r
    wait_for(lambda: (lambda p: p and p != before)(d.pids("web:api")),
             message="a killed process replaced")
    r = ctl(["stop", "all"], url)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 3
    assert all(s["state"] == "stopped" for s in d.json("GET", "/status").values())


def test_add_ini_and_json_then_rm(gafferd, tmp_path):
    d = make(gafferd, tmp_path)
    url = url_of(d)
    sub = tmp_path / "more"
    sub.mkdir()
    (sub / "hello.py").write_text("import time\nprint('hi', flush=True)\ntime.sleep(3600)\n")
    (sub / "extra.ini").write_text(textwrap.dedent("""\
        [process:hello]
        cmd = %s ./hello.py
        numprocesses = 2
        redirect_output = stdout

        [env:hello]
        greeting = bonjour
        """ % PY))
    r = ctl(["add", str(sub / "extra.ini")], url)
    assert r.returncode == 0 and r.stdout == "hello: added\n", r
    d.wait_running("hello", 2)
    definition = d.json("GET", "/processes/hello")
    assert definition["env"] == {"GREETING": "bonjour"} and definition["cwd"] == str(sub)
    (tmp_path / "t.json").write_text(json.dumps([{"name": "j1", "cmd": "sleep 3600"},
                                                 {"name": "j2", "cmd": "sleep 3600"}]))
    r = ctl(["add", str(tmp_path / "t.json")], url)
    assert r.stdout == "j1: added\nj2: added\n", r
    r = ctl(["add", str(tmp_path / "t.json")], url)
    assert r.returncode == 1 and r.stderr == (
        "j1: a template named 'j1' exists\nj2: a template named 'j2' exists\n"), r
    r = ctl(["rm", "j1", "j2", "hello"], url)
    assert r.returncode == 0, r
    assert d.json("GET", "/processes") == ["ticker", "web:api", "web:worker"]


def test_reload_dry_run_and_reload(gafferd, tmp_path):
    d = make(gafferd, tmp_path)
    with open(d.config_path, "a") as f:
        f.write("\n[process:late]\ncmd = sleep 3600\n")
    r = ctl(["reload", "--dry-run"], url_of(d))
    assert r.returncode == 0
    assert r.stdout == "would be added: late\nwould be removed: -\nwould be changed: -\n"
    assert "late" not in d.json("GET", "/processes")
    r = ctl(["reload"], url_of(d))
    assert r.stdout == "added: late\nremoved: -\nchanged: -\n", r
    d.wait_running("late", 1)


def until_ended(proc, act, message):
    """Call ``act()`` every 0.3 s until ``proc`` ends.  An events client
    prints only what happens once its feed is subscribed, which nothing
    outside the daemon can see: so the action is repeated, not timed."""
    def ended():
        if proc.poll() is not None:
            return True
        act()
        return False
    wait_for(ended, timeout=30, interval=0.3, message=message)


def test_events_lines_json_and_pattern(gafferd, tmp_path):
    d = make(gafferd, tmp_path)
    client = subprocess.Popen([PY, GAFFERD, "ctl", "--url", url_of(d), "events", "--json",
                               "-n", "2", "proc.web:api"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True)
    try:
        d.post("/processes/ticker/_stop")              # another template: never shown
        actions = iter(["_stop", "_start"] * 100)
        until_ended(client, lambda: d.post("/processes/web:api/" + next(actions)),
                    "the events client to print two events")
        out, err = client.communicate(timeout=20)
        assert client.returncode == 0, err
        events = [json.loads(line) for line in out.splitlines()]
        assert len(events) == 2, out
        assert all(e["name"] == "web:api" and e["event"].startswith("proc.web:api.")
                   for e in events), events
        client = subprocess.Popen([PY, GAFFERD, "ctl", "--url", url_of(d), "events", "-n",
                                   "1", "create"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, universal_newlines=True)
        names = ("fresh%d" % i for i in range(100))
        until_ended(client, lambda: d.post("/processes", {"name": next(names),
                                                          "cmd": "sleep 3600"}),
                    "the events client to print a create")
        out, err = client.communicate(timeout=20)
        assert re.fullmatch(r"\d\d:\d\d:\d\d create fresh\d+\n", out), (out, err)
    finally:
        if client.poll() is None:
            client.kill()
            client.communicate(timeout=10)


# -- connecting: unix socket, TLS and a token, -c FILE, the environment ------

def test_unix_socket_from_config_and_url(gafferd, tmp_path):
    d = make(gafferd, tmp_path, """
        [gaffer]
        http_endpoints = sock

        [endpoint:sock]
        bind = unix:gafferd.sock
        """, ["--url", "unix:" + str(tmp_path / "gafferd.sock")])
    r = ctl(["-c", d.config_path, "status", "ticker"])
    assert r.returncode == 0 and r.stdout.splitlines()[1].split()[:3] == [
        "ticker", "running", "1/1/1"], r
    sock = str(tmp_path / "gafferd.sock")
    r = ctl(["ping"], "unix:" + sock)
    assert (r.returncode, r.stdout) == (0, "OK\n"), r
    r = ctl(["version"], env={"GAFFERD_URL": "unix:" + sock})
    assert r.stdout.splitlines()[1] == "daemon at unix:%s: gafferd 1.0.0 (gaffer API 0.4.4)" % sock
    assert ctl(["stop", "ticker"], "unix:" + sock).returncode == 0
    r = ctl(["status", "ticker"], "unix:" + sock)
    assert r.stdout.splitlines()[1].split()[:3] == ["ticker", "stopped", "0/0/1"], r


def test_tls_with_token(gafferd, tmp_path, cert):
    certfile, keyfile = cert
    (tmp_path / "token").write_text("s3cret\n")
    os.chmod(str(tmp_path / "token"), 0o600)
    port = free_port()
    d = make(gafferd, tmp_path, """
        [gaffer]
        http_endpoints = tls

        [endpoint:tls]
        bind = 127.0.0.1:%d
        certfile = %s
        keyfile = %s
        auth_token_file = token
        """ % (port, certfile, keyfile), ["--insecure", "--url", "https://127.0.0.1:%d" % port,
                                          "--token", "s3cret"])
    url = "https://127.0.0.1:%d" % port
    # -c: the endpoint, its token and (self-signed) certificate
    r = ctl(["-c", d.config_path, "status", "ticker"])
    assert r.returncode == 0 and "running" in r.stdout, r
    r = ctl(["-c", d.config_path, "stop", "ticker"])
    assert (r.returncode, r.stdout) == (0, "ticker: stopped\n"), r
    # --url: the certificate is checked; --cafile or --insecure
    r = ctl(["--token", "s3cret", "ping"], url)
    assert r.returncode == 4 and "--cafile" in r.stderr and url in r.stderr, r
    no_traceback(r)
    r = ctl(["--cafile", certfile, "--token", "s3cret", "start", "ticker"], url)
    assert (r.returncode, r.stdout) == (0, "ticker: started\n"), r
    r = ctl(["--insecure", "--token-file", str(tmp_path / "token"), "ping"], url)
    assert (r.returncode, r.stdout) == (0, "OK\n"), r
    r = ctl(["--cafile", certfile, "ping"], url, env={"GAFFERD_TOKEN": "s3cret"})
    assert r.returncode == 0, r
    # a wrong or missing token: the API refuses (1), its message on one line
    r = ctl(["--cafile", certfile, "--token", "wrong", "status"], url)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r
    assert r.stderr.startswith("gafferd ctl: ") and "token" in r.stderr.lower(), r
    no_traceback(r)


# -- exit statuses -----------------------------------------------------------

def test_refused_is_1_with_the_message(gafferd, tmp_path):
    d = make(gafferd, tmp_path)
    for args, message in ((["stop", "nope"], "gafferd ctl: no template named 'nope'"),
                          (["scale", "nope", "2"], "gafferd ctl: no template named 'nope'"),
                          (["logs", "web:api"],
                           "gafferd ctl: web:api does not redirect its output"),
                          (["reload"], None)):
        if args == ["reload"]:
            with open(d.config_path, "a") as f:
                f.write("\n[process:bad]\ncmd = sleep 1\nnumprocesses = two\n")
        r = ctl(args, url_of(d))
        assert r.returncode == 1, (args, r)
        assert len(r.stderr.splitlines()) == 1, r
        if message:
            assert r.stderr == message + "\n"
        no_traceback(r)


def test_usage_is_2(gafferd, tmp_path):
    for args in (["bogus"], [], ["scale", "x", "y"], ["signal", "x", "NOTASIGNAL"],
                 ["wait", "--timeout", "soon", "x"], ["--url", "ftp://x", "ping"],
                 ["add", str(tmp_path / "missing.ini")]):
        r = ctl(args)
        assert r.returncode == 2, (args, r)
        assert r.stderr.strip(), args
        no_traceback(r)


def test_unreachable_is_4_and_says_where(tmp_path):
    port = free_port()
    r = ctl(["status"], "http://127.0.0.1:%d" % port)
    assert r.returncode == 4, r
    assert "http://127.0.0.1:%d (from --url)" % port in r.stderr and "GAFFERD_URL" in r.stderr
    assert len(r.stderr.splitlines()) == 1
    no_traceback(r)
    r = ctl(["ping"], env={"GAFFERD_URL": "unix:" + str(tmp_path / "none.sock")})
    assert r.returncode == 4 and "(from GAFFERD_URL)" in r.stderr, r
    (tmp_path / "g.ini").write_text("[gaffer]\nhttp_endpoints = a\n[endpoint:a]\n"
                                    "bind = 127.0.0.1:%d\n" % port)
    r = ctl(["-c", str(tmp_path / "g.ini"), "ping"])
    assert r.returncode == 4 and "[endpoint:a] of %s" % (tmp_path / "g.ini") in r.stderr, r


def test_wait_running_ready_and_timeout(gafferd, tmp_path):
    d = make(gafferd, tmp_path)
    url = url_of(d)
    r = ctl(["wait", "ticker", "web:"], url)
    assert r.returncode == 0, r
    # running at once, ready (started for startsecs) only after startsecs
    d.json("POST", "/processes", {"name": "never", "cmd": "sleep 3600", "startsecs": 600})
    r = ctl(["wait", "--timeout", "20", "never"], url)
    assert r.returncode == 0, r
    r = ctl(["wait", "--ready", "--timeout", "0.5", "never"], url)
    assert r.returncode == 3 and "never" in r.stderr, r
    assert d.status("never")["ready"] == 0
    d.json("POST", "/processes", {"name": "slow", "cmd": "sleep 3600", "startsecs": 2})
    started = time.monotonic()
    r = ctl(["wait", "--ready", "--timeout", "30", "slow", "ticker"], url)
    assert r.returncode == 0, r
    assert d.status("slow")["ready"] == 1 and time.monotonic() - started >= 1.5
    r = ctl(["wait", "nope"], url)
    assert r.returncode == 1 and "nope" in r.stderr


# -- logs --------------------------------------------------------------------

class Proxy:
    """A TCP proxy to the daemon whose connections the test can cut."""

    def __init__(self, port):
        self.port_to = port
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.socks = []
        self.lock = threading.Lock()
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.port_to))
            with self.lock:
                self.socks += [client, upstream]
                self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a, b):
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def drop(self):
        """Cut every open connection (as a dead network path would)."""
        with self.lock:
            socks, self.socks = self.socks, []
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self):
        self.listener.close()
        self.drop()


class Lines:
    """Collect a client's stdout lines in a thread."""

    def __init__(self, stream):
        self.lines = []
        self.lock = threading.Lock()
        threading.Thread(target=self._run, args=(stream,), daemon=True).start()

    def _run(self, stream):
        for line in stream:
            with self.lock:
                self.lines.append(line.rstrip("\n"))

    def by_id(self):
        out = {}
        with self.lock:
            for line in self.lines:
                m = re.fullmatch(r"ticker#(\d+) \| (\d+)", line)
                assert m, line
                out.setdefault(int(m.group(1)), []).append(int(m.group(2)))
        return out


def consecutive(numbers):
    return numbers == list(range(numbers[0], numbers[0] + len(numbers)))


def test_logs_recent_and_stderr(gafferd, tmp_path):
    d = make(gafferd, tmp_path)
    wait_for(lambda: len(d.json("GET", "/processes/ticker/_log")["lines"]) >= 5)
    pid = d.pids("ticker")[0]
    r = ctl(["logs", "-n", "3", "ticker"], url_of(d))
    assert r.returncode == 0, r
    lines = r.stdout.splitlines()
    assert len(lines) == 3 and all(l.startswith("ticker#%d | " % pid) for l in lines), lines
    numbers = [int(l.split("| ")[1]) for l in lines]
    assert consecutive(numbers)
    r = ctl(["logs", "--stderr", "ticker"], url_of(d))
    assert (r.returncode, r.stdout) == (0, ""), r


def test_logs_follow_across_restarts_and_dropped_connections(gafferd, tmp_path):
    d = make(gafferd, tmp_path)
    proxy = Proxy(d.port)
    client = subprocess.Popen([PY, GAFFERD, "ctl", "--url", "http://127.0.0.1:%d" % proxy.port,
                               "logs", "-f", "-n", "5", "ticker"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True)
    try:
        out = Lines(client.stdout)
        first = d.pids("ticker")[0]
        wait_for(lambda: len(out.by_id().get(first, [])) >= 20, message="first lines")
        # the connections drop: resumed by offset (stream) and event id (watch)
        for _ in range(2):
            count = len(out.by_id()[first])
            accepted = proxy.accepted
            proxy.drop()
            wait_for(lambda: proxy.accepted >= accepted + 2, message="reconnections")
            wait_for(lambda: len(out.by_id()[first]) >= count + 20, message="lines resumed")
        # the process is restarted: the new one is followed from its first line
        d.post("/processes/ticker/_restart")
        second = wait_for(lambda: [p for p in d.pids("ticker") if p != first])[0]
        wait_for(lambda: len(out.by_id().get(second, [])) >= 20, message="new process lines")
        # dropped again, then restarted while the client reconnects
        proxy.drop()
        d.post("/processes/ticker/_restart")
        third = wait_for(lambda: [p for p in d.pids("ticker") if p not in (first, second)])[0]
        wait_for(lambda: len(out.by_id().get(third, [])) >= 20, message="third process lines")
        by_id = out.by_id()
        assert set(by_id) == {first, second, third}, set(by_id)
        for pid, numbers in by_id.items():
            assert consecutive(numbers), (pid, numbers)    # no gap, no duplicate
        assert by_id[second][0] == 0 and by_id[third][0] == 0
        assert client.poll() is None
    finally:
        client.kill()
        client.wait()
        proxy.close()
    assert "Traceback" not in client.stderr.read()


def test_logs_follow_survives_a_daemon_restart(daemon_factory, tmp_path):
    """The daemon stops and another starts on the same socket: its ids
    start again at 1, and its process is followed from its first line."""
    (tmp_path / "ticker.py").write_text(
        "import itertools, os, time\n"
        "for i in itertools.count():\n"
        "    print(os.getpid(), i, flush=True)\n"
        "    time.sleep(0.02)\n")
    ini = config("""
        [gaffer]
        http_endpoints = sock

        [endpoint:sock]
        bind = unix:gafferd.sock
        """)
    sock = ["--url", "unix:" + str(tmp_path / "gafferd.sock")]

    def ticker_os_pid():
        r = ctl(sock + ["status", "--json", "ticker"])
        assert r.returncode == 0, r
        return json.loads(r.stdout)["ticker"]["processes"][0]["os_pid"]
    d = daemon_factory(ini)
    assert ctl(sock + ["wait", "--timeout", "20", "ticker"]).returncode == 0
    client = subprocess.Popen([PY, GAFFERD, "ctl", "-c", d.config_path, "logs", "-f",
                               "-n", "0", "ticker"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True)
    try:
        out = Lines(client.stdout)

        def by_os_pid():
            found = {}
            with out.lock:
                for line in out.lines:
                    m = re.fullmatch(r"ticker#\d+ \| (\d+) (\d+)", line)
                    assert m, line
                    found.setdefault(int(m.group(1)), []).append(int(m.group(2)))
            return found
        first = ticker_os_pid()
        wait_for(lambda: len(by_os_pid().get(first, [])) >= 10, message="lines before")
        assert d.stop() == 0
        daemon_factory(ini)
        assert ctl(sock + ["wait", "--timeout", "20", "ticker"]).returncode == 0
        second = ticker_os_pid()
        wait_for(lambda: len(by_os_pid().get(second, [])) >= 10, timeout=20,
                 message="lines of the new daemon's process")
        found = by_os_pid()
        assert found[second][0] == 0, found[second][:5]
        for numbers in found.values():
            assert consecutive(numbers)
        assert client.poll() is None
    finally:
        client.kill()
        client.wait()
    assert "Traceback" not in client.stderr.read()


def test_logs_follow_joins_a_line_cut_before_it_connected(gafferd, tmp_path):
    """A line half written when ``logs -f`` connects is printed whole once
    it ends: the stream says at which byte offset it starts
    (``Gafferd-Stream-Offset``), so the client knows the backlog did not
    end a line.  (Unbuffered children write a line in several pieces.)"""
    (tmp_path / "half.py").write_text(
        "import os, sys, time\n"
        "sys.stdout.write('half'); sys.stdout.flush()\n"
        "while not os.path.exists('go'):\n"
        "    time.sleep(0.01)\n"
        "print('-rest', flush=True)\n"
        "time.sleep(3600)\n")
    d = gafferd("""
        [process:half]
        cmd = %s half.py
        redirect_output = stdout
        """ % PY)
    pid = wait_for(lambda: d.pids("half"))[0]
    wait_for(lambda: d.json("GET", "/processes/half/_log")["lines"], message="half a line")
    r = d.get("/streams/%d/stdout?tail=1" % pid)
    assert (r.status, r.body, r.headers["gafferd-stream-offset"]) == (200, b"half", "0"), r

    def open_connections():
        text = d.get("/metrics").body.decode()
        return int(re.search(r"^gafferd_http_connections (\d+)$", text, re.M).group(1))
    client = subprocess.Popen([PY, GAFFERD, "ctl", "--url", url_of(d), "logs", "-f",
                               "-n", "5", "half"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True)
    try:
        out = Lines(client.stdout)
        # its event feed, its stream and this request
        wait_for(lambda: open_connections() >= 3, message="the client's stream")
        (tmp_path / "go").write_text("")
        wait_for(lambda: out.lines, message="the line")
        with out.lock:
            assert out.lines == ["half#%d | half-rest" % pid], out.lines
    finally:
        client.kill()
        client.wait()
    assert "Traceback" not in client.stderr.read()


def test_colour_on_a_terminal_only_and_never_with_no_color(gafferd, tmp_path):
    d = make(gafferd, tmp_path)
    wait_for(lambda: d.json("GET", "/processes/ticker/_log")["lines"])
    for env, coloured in (({}, True), ({"NO_COLOR": "1"}, False)):
        master, slave = os.openpty()
        e = dict(os.environ)
        e.pop("NO_COLOR", None)
        e.update(env)
        client = subprocess.Popen([PY, GAFFERD, "ctl", "--url", url_of(d), "logs", "-n", "1",
                                   "ticker"], stdout=slave, stderr=subprocess.PIPE, env=e)
        os.close(slave)
        data = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:                       # EIO: the client closed the terminal
                break
            if not chunk:
                break
            data += chunk
        client.wait(20)
        os.close(master)
        assert b"ticker#" in data
        assert (b"\x1b[" in data) == coloured, data
    r = ctl(["logs", "-n", "1", "ticker"], url_of(d))          # a pipe: never coloured
    assert "\x1b[" not in r.stdout and "ticker#" in r.stdout


def test_piped_into_head_or_grep_q(gafferd, tmp_path):
    d = make(gafferd, tmp_path)
    wait_for(lambda: len(d.json("GET", "/processes/ticker/_log?lines=1000")["lines"]) >= 200,
             timeout=20)
    base = "%s %s ctl --url %s " % (PY, GAFFERD, url_of(d))
    for command in ("logs -n 1000 ticker 2>err | head -n 1",
                    "logs -f -n 1000 ticker 2>err | head -n 2",
                    "status -p 2>err | grep -q ticker"):
        r = subprocess.run(base + command, shell=True, cwd=str(tmp_path), timeout=30,
                           stdout=subprocess.PIPE, universal_newlines=True,
                           executable="/bin/bash")
        assert r.returncode == 0, (command, r)
        assert (tmp_path / "err").read_text() == "", command
    events = subprocess.Popen(base + "events 2>err | head -n 1", shell=True,
                              cwd=str(tmp_path), stdout=subprocess.PIPE,
                              universal_newlines=True, executable="/bin/bash",
                              start_new_session=True)
    try:
        until_ended(events, lambda: d.post("/processes/web:api/_restart"),
                    "`events | head -n 1` to end")
        assert events.returncode == 0
        assert events.stdout.read().strip()
        assert (tmp_path / "err").read_text() == ""
    finally:
        if events.poll() is None:
            os.killpg(events.pid, signal.SIGKILL)
        events.wait(10)
        events.stdout.close()


# -- top ---------------------------------------------------------------------

def test_top_shows_a_new_template_and_a_key_stops_it(gafferd, tmp_path):
    d = gafferd()                                       # no template yet
    env = dict(os.environ, TERM="xterm", LINES="30", COLUMNS="120")
    env.pop("NO_COLOR", None)
    pid, fd = pty.fork()
    if pid == 0:                                         # the child: the client
        try:
            os.execve(PY, [PY, GAFFERD, "ctl", "--url", url_of(d), "top"], env)
        finally:
            os._exit(127)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    screen = bytearray()

    def read_more():
        while select.select([fd], [], [], 0)[0]:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                return bytes(screen)
            if not chunk:
                break
            screen.extend(chunk)
        return bytes(screen)

    def shows(text):
        return lambda: text in read_more()
    try:
        wait_for(shows(b"gafferd top"), timeout=20, message="the top screen")
        seen = len(read_more())
        d.json("POST", "/processes", {"name": "latecomer", "cmd": "sleep 3600"})
        d.wait_running("latecomer", 1)
        wait_for(lambda: b"latecomer" in read_more()[seen:], message="the new template shown")
        wait_for(lambda: b"running" in read_more()[seen:], message="its state shown")
        seen = len(read_more())
        os.write(fd, b"x")                                # stop the selected template
        wait_for(lambda: d.status("latecomer")["state"] == "stopped",
                 message="the template stopped by the key")
        wait_for(lambda: b"stopped" in read_more()[seen:], message="the screen updated")
        os.write(fd, b"q")

        def exited():
            read_more()
            done, status = os.waitpid(pid, os.WNOHANG)
            return (done, status) if done else None
        _, status = wait_for(exited, message="top to quit")
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
        assert b"Traceback" not in bytes(screen)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass
        os.close(fd)


# -- help --------------------------------------------------------------------

def test_help_for_ctl_and_every_command():
    r = ctl(["--help"])
    assert r.returncode == 0
    commands = ["status", "start", "stop", "restart", "scale", "signal", "add", "rm", "logs",
                "events", "reload", "wait", "top", "ping", "version"]
    for command in commands:
        assert re.search(r"^    %s " % command, r.stdout, re.M), command
    assert "Exit status" in r.stdout and "GAFFERD_URL" in r.stdout
    for command in commands:
        r = ctl([command, "--help"])
        assert r.returncode == 0 and r.stdout.startswith("usage: gafferd ctl %s" % command), r
        assert "Exit status" in r.stdout
    r = ctl(["logs", "--help"])
    for option in ("-f", "-n N", "--stderr"):
        assert option in r.stdout


def test_the_installed_entry_point_dispatches_ctl(gafferd, tmp_path):
    """``gafferd ctl`` is gafferd:main() with sys.argv[1] == "ctl"."""
    d = gafferd()
    code = ("import sys, gafferd; sys.argv = ['gafferd', 'ctl', '--url', %r, 'ping']; "
            "sys.exit(gafferd.main())" % url_of(d))
    r = subprocess.run([PY, "-c", code], cwd=os.path.dirname(GAFFERD), timeout=30,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    assert (r.returncode, r.stdout) == (0, "OK\n"), r
