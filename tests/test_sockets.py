"""[socket:NAME]: listening sockets gafferd binds and passes by the systemd protocol.

The child's view is read from the outside: /proc/PID/environ for LISTEN_PID
(which must be the child's own pid), LISTEN_FDS and LISTEN_FDNAMES, and a
small script that reports what it finds on fds 3, 4, 5.  The daemon keeps a
socket (same fd) across restarts and reloads that leave its address alone,
rebinds it when the address changes, and removes its unix socket file at
shutdown.
"""
from __future__ import annotations

import json
import os
import socket
import stat
import textwrap

from conftest import PY, run_gafferd, wait_for

# Reports, in a file named after its pid, the environment and fds 3, 4, 5.
REPORTER = r'''
import json, os, socket, sys, time
out = {"pid": os.getpid(), "env": {k: v for k, v in os.environ.items() if k.startswith("LISTEN_")}}
fds = []
for fd in (3, 4, 5):
    try:
        s = socket.socket(fileno=os.dup(fd))
    except OSError:
        fds.append(None)
        continue
    listening = s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    name = s.getsockname()
    fds.append({"family": int(s.family), "listening": bool(listening),
                "name": name if isinstance(name, str) else list(name[:2])})
    s.close()
out["fds"] = fds
with open(os.path.join(sys.argv[1], "report-%d.json" % os.getpid()), "w") as f:
    json.dump(out, f)
while True:
    time.sleep(1)
'''


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def write_config(tmp, web_bind="127.0.0.1:0", extra=""):
    with open(os.path.join(tmp, "reporter.py"), "w") as f:
        f.write(REPORTER)
    text = textwrap.dedent("""
        [socket:web]
        bind = %s
        backlog = 64

        [socket:admin]
        bind = unix:admin.sock
        mode = 660

        [process:app]
        cmd = %s reporter.py %s
        sockets = web, admin
        custom_streams = ctl
        ready = spawn
        %s
        """) % (web_bind, PY, tmp, extra)
    path = os.path.join(tmp, "gaffer.ini")
    with open(path, "w") as f:
        f.write(text)
    return text


def report(tmp, os_pid):
    path = os.path.join(tmp, "report-%d.json" % os_pid)
    wait_for(lambda: os.path.exists(path) and os.path.getsize(path), 10,
             message="the report of pid %d" % os_pid)
    with open(path) as f:
        return json.load(f)


def environ(os_pid):
    with open("/proc/%d/environ" % os_pid, "rb") as f:
        items = [i.decode() for i in f.read().split(b"\0") if i]
    return dict(i.split("=", 1) for i in items)


def app_pid(d):
    wait_for(lambda: d.status("app")["running"] == 1, 10, message="app running")
    return d.status("app")["processes"][0]["os_pid"]


def test_listen_fds_protocol_restart_reload_and_shutdown(gafferd, tmp_path):
    tmp = str(tmp_path)
    d = gafferd(write_config(tmp))
    first = app_pid(d)
    env = environ(first)
    assert env["LISTEN_PID"] == str(first)               # the child's own pid
    assert env["LISTEN_FDS"] == "2" and env["LISTEN_FDNAMES"] == "web:admin"
    status = d.status("app")
    web, admin = status["sockets"]
    assert web["name"] == "web" and web["bind"] == "127.0.0.1:0" and web["backlog"] == 64
    assert admin["address"] == "unix:" + os.path.join(tmp, "admin.sock")
    assert admin["mode"] == "0660"
    assert stat.S_IMODE(os.stat(os.path.join(tmp, "admin.sock")).st_mode) == 0o660
    port = int(web["address"].rsplit(":", 1)[1])
    assert port > 0
    seen = report(tmp, first)
    assert seen["env"]["LISTEN_PID"] == str(first)
    fd3, fd4, fd5 = seen["fds"]
    assert fd3 == {"family": socket.AF_INET, "listening": True, "name": ["127.0.0.1", port]}
    assert fd4 == {"family": socket.AF_UNIX, "listening": True,
                   "name": os.path.join(tmp, "admin.sock")}
    assert fd5["family"] == socket.AF_UNIX and not fd5["listening"]   # the custom stream after
    assert d.json("GET", "/processes/app")["sockets"] == ["web", "admin"]

    # a restart: same sockets, same fds in the daemon
    assert d.post("/processes/app/_restart").status == 200
    wait_for(lambda: app_pid(d) != first, 10, message="a new process")
    second = app_pid(d)
    assert environ(second)["LISTEN_PID"] == str(second)
    assert d.status("app")["sockets"] == status["sockets"]
    assert report(tmp, second)["fds"][0]["name"] == ["127.0.0.1", port]

    # a reload that leaves the sockets alone keeps the very fds
    result = d.json("POST", "/reload")
    assert result["changed"] == []
    assert d.status("app")["sockets"] == status["sockets"] and app_pid(d) == second

    # a reload that changes web's address rebinds it and restarts its users
    new_port = free_port()
    write_config(tmp, "127.0.0.1:%d" % new_port)
    result = d.json("POST", "/reload")
    assert result["changed"] == ["app"]
    wait_for(lambda: app_pid(d) != second, 10, message="a process on the new socket")
    third = app_pid(d)
    assert report(tmp, third)["fds"][0]["name"] == ["127.0.0.1", new_port]
    after = d.status("app")["sockets"]
    assert after[0]["address"] == "127.0.0.1:%d" % new_port
    assert after[1] == status["sockets"][1]              # admin kept
    wait_for(lambda: not environ_alive(second), 15, message="the old process gone")
    probe = socket.socket()
    try:
        assert probe.connect_ex(("127.0.0.1", port)) != 0   # nobody holds the old one
    finally:
        probe.close()

    assert d.stop() == 0
    assert not os.path.exists(os.path.join(tmp, "admin.sock"))
    again = socket.socket()
    try:
        again.bind(("127.0.0.1", new_port))                 # closed at shutdown
    finally:
        again.close()


def environ_alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def check(tmp_path, text):
    path = tmp_path / "bad.ini"
    path.write_text(textwrap.dedent(text))
    return run_gafferd(["--check", str(path)], cwd=str(tmp_path))


def test_bad_socket_configs_are_config_errors(tmp_path):
    cases = [
        ("[socket:web]\nbind = 127.0.0.1\n", "[socket:web] bind: '127.0.0.1' has no port"),
        ("[socket:web]\nbind = 127.0.0.1:99999\n", "[socket:web] bind:"),
        ("[socket:web]\nbind = ::1:80\n", "write IPv6 addresses as [addr]:port"),
        ("[socket:web]\n", "[socket:web] bind: missing"),
        ("[socket:web]\nbind = 127.0.0.1:80\nmode = 660\n", "only a unix: socket has a mode"),
        ("[socket:web]\nbind = unix:/tmp/x.sock\nmode = 999\n", "not an octal mode"),
        ("[socket:web]\nbind = 127.0.0.1:80\nbacklg = 5\n", "unknown socket key"),
        ("[socket:a:b]\nbind = 127.0.0.1:80\n", "invalid socket name"),
        ("[process:x]\ncmd = %s\nsockets = web\n" % PY, "[process:x] sockets: names 'web'"),
        ("[socket:web]\nbind = 127.0.0.1:80\n[process:x]\ncmd = %s\nsockets = web\n"
         "custom_streams = web\n" % PY, "custom_streams: web is also in sockets"),
    ]
    for text, message in cases:
        r = check(tmp_path, text)
        assert r.returncode == 2 and message in r.stderr, (text, r.stderr)
    ok = check(tmp_path, "[socket:web]\nbind = [::1]:8080\nreuseport = true\n"
               "[process:x]\ncmd = %s\nsockets = web\n" % PY)
    assert ok.returncode == 0 and '[socket:web] {"name": "web", "bind": "[::1]:8080"' in ok.stdout


def test_socket_in_use_is_a_clear_start_up_error(gafferd, tmp_path):
    taken = socket.socket()
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(tmp_path / "live.sock"))
    live.listen(1)
    try:
        for bind, message in (("127.0.0.1:%d" % port, "[socket:web] cannot listen on "
                               "127.0.0.1:%d: Address already in use" % port),
                              ("unix:live.sock", "a program is listening there already")):
            d = gafferd("[socket:web]\nbind = %s\n" % bind, start=False)
            d.start(wait_ready=False)
            assert d.proc.wait(20) == 2
            assert message in d.log(), d.log()
    finally:
        taken.close()
        live.close()


def test_sockets_over_the_json_api(gafferd, tmp_path):
    tmp = str(tmp_path)
    d = gafferd(write_config(tmp).replace("sockets = web, admin", "sockets = admin"))
    bad = d.post("/processes", {"name": "x", "cmd": PY, "args": ["reporter.py", tmp],
                                "sockets": ["nope"]})
    assert bad.status == 400 and "sockets" in bad.json()["message"], bad
    made = d.post("/processes", {"name": "x", "cmd": PY, "args": ["reporter.py", tmp],
                                 "cwd": tmp, "sockets": ["web"]})
    assert made.status == 200, made
    assert d.json("GET", "/processes/x")["sockets"] == ["web"]
    wait_for(lambda: d.status("x")["running"] == 1, 10, message="x running")
    pid = d.status("x")["processes"][0]["os_pid"]
    report(tmp, pid)              # /bin/sh sets LISTEN_PID, then execs the program
    env = environ(pid)
    assert env["LISTEN_PID"] == str(pid) and env["LISTEN_FDS"] == "1"
    assert env["LISTEN_FDNAMES"] == "web"
    assert d.status("x")["sockets"][0]["name"] == "web"
    # a reload may not remove a socket a template made over HTTP uses
    path = os.path.join(tmp, "gaffer.ini")
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace("[socket:web]\nbind = 127.0.0.1:0\nbacklog = 64\n", "")
                .replace("sockets = web, admin", "sockets = admin"))
    r = d.post("/reload")
    assert r.status != 200 and "names 'web'" in r.body.decode(), r
