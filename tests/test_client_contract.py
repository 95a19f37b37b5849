"""The gaffer 0.4.4 client contract (what its client sends and reads), row by row.

``TestWireContract`` sends exactly the bytes the 0.4.4 client library sends
(tornado 2.4's simple HTTP client: ``Accept: application/json``,
``Connection: close``, ``Accept-Encoding: gzip``, empty bodies with
``Content-Length: 0`` on POST/PUT) and checks what the client reads.

``TestGafferctl`` installs the real 0.4.4 ``gafferctl`` (Python 2.7, from
PyPI) with the repository's own ``tests/tools/install-gafferctl.sh`` and
runs each of its commands against the daemon.  A failed install is a
failed test, never a skip: the suite must exercise the real client.
"""
import ast
import gzip
import itertools
import json
import os
import re
import subprocess
import threading
import time

import pytest

from conftest import ROOT, Daemon, RawClient, pid_alive, wait_for

CONFIG = """\
[process:dummy]
cmd = sleep 3600

[process:grp:a]
cmd = sleep 3600

[process:grp:b]
cmd = sleep 3600
"""

_names = itertools.count(1)


def unique(prefix):
    return "%s%d" % (prefix, next(_names))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("contract"), CONFIG)
    try:
        d.start()
        yield d
    finally:
        d.close()


def tornado(d, method, path, body=None, content_type=None):
    """Send one request the way gaffer 0.4.4's client does; return the reply."""
    if body is None and method in ("POST", "PUT", "PATCH"):
        body = b""
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        content_type = content_type or "application/json"
    headers = [("Accept", "application/json"), ("Connection", "close"),
               ("Host", "127.0.0.1:%d" % d.port)]
    if body is not None:
        headers.append(("Content-Length", str(len(body))))
    if method == "POST" and content_type is None:
        content_type = "application/x-www-form-urlencoded"
    if content_type:
        headers.append(("Content-Type", content_type))
    headers.append(("Accept-Encoding", "gzip"))
    data = ("%s %s HTTP/1.1\r\n" % (method, path)
            + "".join("%s: %s\r\n" % h for h in headers) + "\r\n").encode()
    with RawClient(d.port) as c:
        resp = c.request(data + (body or b""), head=(method == "HEAD"))
        assert c.wait_closed(5.0), "Connection: close was not honoured"
    if resp.header("content-encoding") == "gzip":
        resp.body = gzip.decompress(resp.body)
    return resp


def body_of(resp, status=200):
    assert resp.status == status, resp
    return json.loads(resp.body.decode("utf-8"))


def error_of(resp, status):
    body = body_of(resp, status)      # the client json-decodes 404/409 bodies
    return body["error"]


def make(d, start=False, **extra):
    name = extra.pop("name", None) or unique("c")
    obj = {"name": name, "cmd": "sleep 300", "start": start}
    obj.update(extra)
    assert body_of(tornado(d, "POST", "/processes", obj)) == {"ok": True}
    if start:
        d.wait_running(name, obj.get("numprocesses", 1))
    return name


class TestWireContract:
    def test_version(self, daemon):
        assert body_of(tornado(daemon, "GET", "/"))["version"] == "0.4.4"

    def test_processes(self, daemon):
        names = body_of(tornado(daemon, "GET", "/processes"))
        assert names[:3] == ["dummy", "grp:a", "grp:b"]

    def test_processes_running(self, daemon):
        daemon.wait_running("dummy", 1)
        ids = body_of(tornado(daemon, "GET", "/processes?running=true"))
        assert ids and all(isinstance(i, int) for i in ids)
        assert set(daemon.pids("dummy")) <= set(ids)

    def test_add_process(self, daemon):
        name = unique("add")
        obj = {"name": name, "cmd": "sleep 300", "start": False}
        assert body_of(tornado(daemon, "POST", "/processes", obj)) == {"ok": True}
        assert daemon.status(name)["running"] == 0
        assert error_of(tornado(daemon, "POST", "/processes", obj), 409) == "conflict"
        started = unique("add")
        obj = {"name": started, "cmd": "sleep 300", "start": True}
        assert body_of(tornado(daemon, "POST", "/processes", obj)) == {"ok": True}
        daemon.wait_running(started, 1)

    def test_load_process(self, daemon):
        name = unique("load")
        obj = {"name": name, "cmd": "sleep", "args": ["300"], "env": {"X": "1"},
               "numprocesses": 2, "redirect_output": ["stdout", "stderr"], "start": True}
        assert body_of(tornado(daemon, "POST", "/processes", obj)) == {"ok": True}
        daemon.wait_running(name, 2)
        got = body_of(tornado(daemon, "GET", "/processes/" + name))
        for key in ("name", "cmd", "args", "env", "numprocesses", "redirect_output"):
            assert got[key] == obj[key], key

    def test_get_process(self, daemon):
        got = body_of(tornado(daemon, "GET", "/processes/dummy"))
        assert got["name"] == "dummy" and got["cmd"] == "sleep 3600"
        assert error_of(tornado(daemon, "GET", "/processes/nosuch"), 404) == "not_found"

    def test_del_process(self, daemon):
        name = make(daemon, start=True)
        assert body_of(tornado(daemon, "DELETE", "/processes/" + name)) == {"ok": True}
        assert tornado(daemon, "HEAD", "/processes/" + name).status == 404
        assert error_of(tornado(daemon, "DELETE", "/processes/" + name), 404) == "not_found"

    def test_update_process(self, daemon):
        name = make(daemon, start=True)
        assert tornado(daemon, "HEAD", "/processes/" + name).status == 200
        obj = {"name": name, "cmd": "sleep 301"}
        assert body_of(tornado(daemon, "PUT", "/processes/" + name, obj)) == {"ok": True}
        assert body_of(tornado(daemon, "GET", "/processes/" + name))["cmd"] == "sleep 301"
        new = unique("upd")
        head = tornado(daemon, "HEAD", "/processes/" + new)
        assert head.status == 404 and head.body == b""
        obj = {"name": new, "cmd": "sleep 300"}
        assert body_of(tornado(daemon, "POST", "/processes", obj)) == {"ok": True}

    def test_start_stop_restart(self, daemon):
        name = make(daemon)
        for action in ("_start", "_stop", "_start", "_restart"):
            body_of(tornado(daemon, "GET", "/processes/" + name))
            last = max([0] + daemon.pids(name))
            assert body_of(tornado(daemon, "POST", "/processes/%s/%s" % (name, action))) \
                == {"ok": True}
            if action == "_stop":
                daemon.wait_running(name, 0)
            else:                   # a restart starts the new process first
                wait_for(lambda: (lambda p: len(p) == 1 and p[0] > last)(daemon.pids(name)),
                         message="one new process after " + action)

    def test_add_sub(self, daemon):
        name = make(daemon, start=True)
        body_of(tornado(daemon, "GET", "/processes/" + name))
        assert body_of(tornado(daemon, "POST", "/processes/%s/_add/2" % name))["numprocesses"] == 3
        assert body_of(tornado(daemon, "POST", "/processes/%s/_sub/1" % name))["numprocesses"] == 2
        daemon.wait_running(name, 2)

    def test_kill(self, daemon):
        name = make(daemon, start=True)
        old = daemon.pids(name)[0]
        os_pid = daemon.os_pid(old)
        assert body_of(tornado(daemon, "POST", "/processes/%s/_signal/15" % name)) == {"ok": True}
        wait_for(lambda: not pid_alive(os_pid), message="SIGTERM by name")
        pid = daemon.wait_replacement(name, old)
        os_pid = daemon.os_pid(pid)
        assert body_of(tornado(daemon, "POST", "/processes/%d/_signal/15" % pid)) == {"ok": True}
        wait_for(lambda: not pid_alive(os_pid), message="SIGTERM by id")

    def test_status_running_numprocesses(self, daemon):
        name = make(daemon, start=True, numprocesses=2)
        body_of(tornado(daemon, "GET", "/processes/" + name))
        st = body_of(tornado(daemon, "GET", "/status/" + name))
        assert (st["active"], st["running"], st["max_processes"]) == (True, 2, 2)
        assert error_of(tornado(daemon, "GET", "/status/nosuch"), 404) == "not_found"

    def test_pids(self, daemon):
        name = make(daemon, start=True, numprocesses=2)
        pids = body_of(tornado(daemon, "GET", "/processes/%s/_pids" % name))["pids"]
        assert len(pids) == 2 and pids == sorted(pids)

    def test_id_lookups(self, daemon):
        name = make(daemon, start=True)
        pid = daemon.pids(name)[0]
        assert body_of(tornado(daemon, "GET", "/processes/%d" % pid))["name"] == name
        assert tornado(daemon, "HEAD", "/processes/%d" % pid).status == 200
        assert body_of(tornado(daemon, "POST", "/processes/%d/_signal/18" % pid)) == {"ok": True}
        assert body_of(tornado(daemon, "POST", "/processes/%d/_stop" % pid)) == {"ok": True}
        wait_for(lambda: tornado(daemon, "HEAD", "/processes/%d" % pid).status == 404,
                 message="id %d to be gone" % pid)

    def test_stats(self, daemon):
        daemon.wait_running("dummy", 1)
        st = body_of(tornado(daemon, "GET", "/stats/dummy"))
        assert st["name"] == "dummy" and len(st["stats"]) == 1

    def test_groups(self, daemon):
        assert "grp" in body_of(tornado(daemon, "GET", "/groups"))
        assert body_of(tornado(daemon, "GET", "/groups/grp")) == ["grp:a", "grp:b"]
        group = unique("g")
        names = [make(daemon, name="%s:%s" % (group, m)) for m in ("x", "y", "z")]
        for action, running in (("_start", 1), ("_restart", 1), ("_stop", 0)):
            last = {n: max([0] + daemon.pids(n)) for n in names}
            assert body_of(tornado(daemon, "POST", "/groups/%s/%s" % (group, action))) \
                == {"ok": True}
            for n in names:             # each one new (a restart starts it first)
                wait_for(lambda: (lambda p: len(p) == running and all(i > last[n] for i in p))(
                    daemon.pids(n)), message="%s after %s" % (n, action))
        assert body_of(tornado(daemon, "DELETE", "/groups/" + group)) == {"ok": True}
        for n in names:
            assert tornado(daemon, "HEAD", "/processes/" + n).status == 404

    def test_watch(self, daemon):
        with RawClient(daemon.port) as c:
            c.send(("GET /watch?feed=eventsource&heartbeat=60 HTTP/1.1\r\n"
                    "Accept: application/json\r\nConnection: close\r\n"
                    "Host: 127.0.0.1:%d\r\nContent-Type: text/event-stream\r\n"
                    "Accept-Encoding: gzip\r\n\r\n" % daemon.port).encode())
            deadline = time.monotonic() + 5
            while b"\r\n\r\n" not in c.buf:
                assert c._fill(deadline), "watch reply closed early"
            head = c.buf.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
            assert re.match(r"http/1\.1 200 ", head), head
            assert "content-type: text/event-stream" in head, head
            chunked = "transfer-encoding: chunked" in head
            name = unique("w")
            make(daemon, name=name)
            pattern = re.compile(rb"event: create\r\ndata: (\{[^\r\n]*\})\r\n")
            deadline = time.monotonic() + 10
            while not any(json.loads(m)["name"] == name for m in pattern.findall(c.buf)):
                assert c._fill(deadline), "watch reply closed early"
        events = [json.loads(m) for m in pattern.findall(c.buf)]
        assert {"event": "create", "name": name} in events
        if chunked:
            # the client handles one SSE event per chunk and needs a ':' on every line
            body = c.buf.split(b"\r\n\r\n", 1)[1]
            while body:
                size_line, _, body = body.partition(b"\r\n")
                if not size_line.strip():
                    break
                size = int(size_line.split(b";")[0], 16)
                chunk, body = body[:size], body[size + 2:]
                lines = chunk.strip(b"\r\n").split(b"\r\n")
                if chunk.strip(b"\r\n"):
                    assert all(b":" in line for line in lines), chunk
                    assert sum(line.startswith(b"event:") for line in lines) <= 1, chunk


# -- the real gaffer 0.4.4 client ----------------------------------------------------------

INSTALLER = os.path.join(ROOT, "tests", "tools", "install-gafferctl.sh")


@pytest.fixture(scope="module")
def gafferctl():
    venv = os.path.join(os.environ.get("TMPDIR") or "/tmp", "gafferctl-venv")
    try:
        out = subprocess.run(["bash", INSTALLER, venv], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, universal_newlines=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.fail("cannot install gafferctl 0.4.4 (needs Python 2.7 and PyPI): %s" % exc)
    if out.returncode != 0:
        pytest.fail("cannot install gafferctl 0.4.4 (needs Python 2.7 and PyPI): %s"
                    % (out.stderr.strip().splitlines() or ["?"])[-1])
    path = out.stdout.strip().splitlines()[-1]
    assert os.access(path, os.X_OK), path
    return path


def strip_ansi(text):
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


class Ctl:
    def __init__(self, exe, daemon):
        self.exe = exe
        self.python = os.path.join(os.path.dirname(exe), "python")
        self.daemon = daemon
        self.url = "http://127.0.0.1:%d" % daemon.port
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}

    def run(self, *args, expect=0, stdin=None):
        out = subprocess.run([self.exe, "--connect=" + self.url] + list(args),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, input=stdin,
                             universal_newlines=True, timeout=60, env=self.env)
        assert out.returncode == expect, (args, out.returncode, out.stdout, out.stderr)
        return out.stdout.strip() if expect == 0 else strip_ansi(out.stderr)

    def library(self, script):
        """Run a Python 2 snippet with ``s`` = gaffer.httpclient.Server(url);
        it prints one JSON document."""
        code = ("import json, sys\nfrom gaffer.httpclient import Server, ProcessId\n"
                "s = Server(%r)\n" % self.url) + script
        out = subprocess.run([self.python, "-c", code], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, universal_newlines=True, timeout=60,
                             env=self.env)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def ctl(gafferctl, daemon):
    return Ctl(gafferctl, daemon)


class TestGafferctl:
    def test_processes(self, ctl):
        names = ast.literal_eval(ctl.run("processes"))
        assert names[:3] == ["dummy", "grp:a", "grp:b"]

    def test_processes_running(self, ctl, daemon):
        daemon.wait_running("dummy", 1)
        ids = ast.literal_eval(ctl.run("processes", "--running"))
        assert ids == daemon.json("GET", "/processes?running=true")

    def test_add_process(self, ctl, daemon):
        name = unique("ctl")
        assert ctl.run("add_process", name, "sleep 300") == name
        assert daemon.status(name)["running"] == 0
        assert "conflict" in ctl.run("add_process", name, "sleep 300", expect=1)
        started = unique("ctl")
        assert ctl.run("add_process", "--start", started, "sleep 300") == started
        daemon.wait_running(started, 1)

    def test_load_process(self, ctl, daemon, tmp_path):
        name = unique("ctl")
        path = tmp_path / "proc.json"
        path.write_text(json.dumps({"name": name, "cmd": "sleep", "args": ["300"],
                                    "numprocesses": 2}))
        assert ctl.run("load_process", "--start", str(path)) == name
        daemon.wait_running(name, 2)
        assert daemon.json("GET", "/processes/" + name)["args"] == ["300"]
        other = unique("ctl")
        path.write_text(json.dumps({"name": other, "cmd": "sleep 300"}))
        assert ctl.run("load_process", str(path)) == other
        assert daemon.status(other)["running"] == 0

    def test_get_process(self, ctl):
        out = json.loads(ctl.run("get_process", "dummy"))
        if isinstance(out, str):            # gafferctl prints the JSON text as a JSON string
            out = json.loads(out)
        assert out["name"] == "dummy" and out["cmd"] == "sleep 3600"

    def test_del_process(self, ctl, daemon):
        name = make(daemon, start=True)
        assert ctl.run("del_process", name) == "ok"
        assert daemon.get("/processes/" + name).status == 404
        assert "not_found" in ctl.run("del_process", name, expect=1)

    def test_start_stop_status(self, ctl, daemon):
        name = make(daemon)
        assert ctl.run("status", name) == "stopped"
        assert ctl.run("start", name) == "ok"
        daemon.wait_running(name, 1)
        assert ctl.run("status", name) == "active"
        assert ctl.run("stop", name) == "ok"
        daemon.wait_running(name, 0)
        assert ctl.run("status", name) == "stopped"

    def test_add_sub_running_numprocesses(self, ctl, daemon):
        name = make(daemon, start=True)
        assert ctl.run("add", name, "2") == "3"
        daemon.wait_running(name, 3)
        assert ctl.run("running", name) == "3"
        assert ctl.run("sub", name, "1") == "2"
        assert ctl.run("numprocesses", name) == "2"
        daemon.wait_running(name, 2)
        assert ctl.run("running", name) == "2"

    def test_pids(self, ctl, daemon):
        name = make(daemon, start=True, numprocesses=2)
        assert ast.literal_eval(ctl.run("pids", name)) == daemon.pids(name)

    def test_kill(self, ctl, daemon):
        name = make(daemon, start=True)
        old = daemon.pids(name)[0]
        os_pid = daemon.os_pid(old)
        assert ctl.run("kill", name, "CONT") == "ok"
        assert pid_alive(os_pid)
        assert ctl.run("kill", name, "TERM") == "ok"
        wait_for(lambda: not pid_alive(os_pid), message="SIGTERM by name")
        pid = daemon.wait_replacement(name, old)
        os_pid = daemon.os_pid(pid)
        assert ctl.run("kill", str(pid), "15") == "ok"
        wait_for(lambda: not pid_alive(os_pid), message="SIGTERM by id")

    def test_unknown_template(self, ctl):
        assert "not_found" in ctl.run("status", "nosuch", expect=1)

    def test_watch(self, ctl, daemon):
        proc = subprocess.Popen([ctl.exe, "--connect=" + ctl.url, "watch", "create"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=ctl.env)
        out = []
        reader = threading.Thread(target=lambda: out.extend(iter(proc.stdout.readline, b"")),
                                  daemon=True)
        reader.start()
        made = []
        try:
            def seen():
                text = strip_ansi(b"".join(out).decode("utf-8", "replace"))
                if any(re.search(r"\| create %s\b" % n, text) for n in made):
                    return True
                assert proc.poll() is None, text
                made.append(make(daemon, name=unique("watched")))
                return False
            wait_for(seen, timeout=20, interval=0.3, message="gafferctl watch to print")
        finally:
            proc.kill()
            proc.wait()
            reader.join(5)
            proc.stdout.close()

    def test_library_calls(self, ctl, daemon):
        existing = make(daemon, start=True)
        new = unique("lib")
        group = unique("lg")
        make(daemon, name=group + ":a")
        make(daemon, name=group + ":b")
        daemon.wait_running("dummy", 1)
        out = ctl.library("""
out = {}
out["version"] = s.version
s.update_process(%(existing)r, "sleep 301")
s.update_process(%(new)r, "sleep 300", start=False)
out["existing"] = s.get_process(%(existing)r).process["cmd"]
out["new"] = s.get_process(%(new)r).process["cmd"]
p = s.get_process("dummy")
out["stats"] = p.stats()["name"]
pid = p.pids[0]
pid_obj = s.get_process(pid)
out["pid_name"] = pid_obj.process["name"]
out["pid_active"] = pid_obj.active
out["pid_signal"] = pid_obj.signal("CONT")
out["restart"] = p.restart()
out["groups"] = s.groups()
out["group"] = s.get_group(%(group)r)
out["start_group"] = s.start_group(%(group)r)
out["restart_group"] = s.restart_group(%(group)r)
out["stop_group"] = s.stop_group(%(group)r)
out["remove_group"] = s.remove_group(%(group)r)
out["after"] = s.processes()
out["stale_active"] = ProcessId(s, 999999, {}).active
print(json.dumps(out))
""" % {"existing": existing, "new": new, "group": group})
        assert out["version"] == "0.4.4"
        assert out["existing"] == "sleep 301" and out["new"] == "sleep 300"
        assert out["stats"] == "dummy"
        assert out["pid_name"] == "dummy" and out["pid_active"] is True
        assert out["pid_signal"] is True and out["restart"] is True
        assert group in out["groups"] and out["group"] == [group + ":a", group + ":b"]
        assert out["start_group"] is out["restart_group"] is out["stop_group"] is True
        assert out["remove_group"] is True
        assert group + ":a" not in out["after"] and new in out["after"]
        assert out["stale_active"] is False
