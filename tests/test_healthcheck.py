"""The shipped health-check plugin (gafferd_plugins/healthcheck).

The daemon runs with a copy of the plugin directory. The checked programs
are small scripts written into ``tmp_path``: an HTTP server that answers 200
until a flag file appears (then 500, or it hangs), and an idle process.
Intervals are 0.2 s; every wait has a deadline.
"""
import os
import re
import shutil
import signal
import socket
import textwrap

import pytest

from conftest import PY, ROOT, EventWatcher, children_of, pid_alive, proc_cmdline, wait_for

PLUGIN_DIR = os.path.join(ROOT, "gafferd_plugins", "healthcheck")
SLEEP = shutil.which("sleep") or "/bin/sleep"
TRUE = shutil.which("true") or "/bin/true"
FALSE = shutil.which("false") or "/bin/false"

# server.py PORT FLAG MODE: 200 "ok" until FLAG exists, then MODE: "500" or
# "hang" (reads the request, never answers). Removes FLAG when it starts, so
# a restarted server is healthy again; waits for the port to be free.
SERVER = r'''
import http.server, os, sys, time
port, flag, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
try:
    os.unlink(flag)
except FileNotFoundError:
    pass

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if os.path.exists(flag):
            if mode == "hang":
                time.sleep(3600)
            body, status = b"sick", 500
        else:
            body, status = b"ok", 200
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

deadline = time.monotonic() + 20
while True:
    try:
        server = http.server.HTTPServer(("127.0.0.1", port), Handler)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
server.serve_forever()
'''

IDLE = "import time\nwhile True:\n    time.sleep(1000)\n"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def hc(tmp_path, daemon_factory):
    """Write the helper scripts and the plugin root; return a starter."""
    root = tmp_path / "plugins"
    shutil.copytree(PLUGIN_DIR, str(root / "healthcheck"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "server.py").write_text(SERVER)
    (tmp_path / "idle.py").write_text(IDLE)

    def start(config):
        config = "[gaffer]\nplugins_dir = %s\n\n%s" % (root, textwrap.dedent(config))
        return daemon_factory(config.replace("@PY@", PY))
    return start


def hc_status(d):
    r = d.get("/_plugin/healthcheck/api/status")
    assert r.status == 200, r
    return r.json()


def current_os_pid(d, name):
    """OS pid of the one live process of ``name``; None while there are
    none or several (restarting) or it went away between two requests."""
    ids = d.pids(name)
    if len(ids) != 1:
        return None
    r = d.get("/processes/%d" % ids[0])
    return r.json()["os_pid"] if r.status == 200 else None


def of(events, name, outcome):
    return [e for e in events if e.get("event") == "healthcheck.%s.%s" % (name, outcome)]


def test_http_check_restarts_a_process_that_stops_answering(hc, tmp_path):
    port = free_port()
    flag = tmp_path / "sick"
    d = hc("""
        [process:web]
        cmd = @PY@ server.py %d %s 500

        [healthcheck:web]
        http = http://127.0.0.1:%d/health
        interval = 0.2
        timeout = 2
        failures = 3
        start_period = 1.5
        """ % (port, flag, port))
    w = EventWatcher(d, "healthcheck/web")
    try:
        w.wait(lambda ev: of(ev, "web", "ok"), message="a passing check")
        old = current_os_pid(d, "web")
        assert old
        assert hc_status(d)["web"]["healthy"] is True
        flag.write_text("now")
        new = wait_for(lambda: (lambda p: p if p and p != old else None)(current_os_pid(d, "web")),
                       timeout=15, message="web to be restarted with a new OS pid")
        wait_for(lambda: not pid_alive(old), message="the old server to be gone")
        # events reach the watcher asynchronously: wait for the third one
        fails = of(w.wait(lambda ev: len(of(ev, "web", "fail")) >= 3,
                          message="three fail events"), "web", "fail")
        assert [e["failures"] for e in fails[:3]] == [1, 2, 3], fails
        for e in fails[:3]:
            assert e["name"] == "web" and e["check"] == "http", e
            assert "500" in e["detail"], e
        # the new server answers again: healthy, one restart, counter reset
        wait_for(lambda: hc_status(d)["web"]["healthy"] is True
                 and hc_status(d)["web"]["restarts"] == 1,
                 timeout=15, message="web healthy again after one restart")
        st = hc_status(d)["web"]
        assert st["check"] == "http" and st["target"] == "http://127.0.0.1:%d/health" % port
        assert st["consecutive_failures"] == 0
        assert st["last_error"]   # a failure (or a start_period miss while restarting)
        assert isinstance(st["last_checked"], (int, float))
        assert current_os_pid(d, "web") == new
        assert re.search(r"WARNING.*web.*restart", d.log()), d.log()
    finally:
        w.close()


def test_hanging_http_check_is_timed_out(hc, tmp_path):
    port = free_port()
    flag = tmp_path / "sick"
    d = hc("""
        [process:web]
        cmd = @PY@ server.py %d %s hang

        [healthcheck:web]
        http = http://127.0.0.1:%d/
        interval = 0.2
        timeout = 0.4
        failures = 2
        start_period = 1.5
        """ % (port, flag, port))
    w = EventWatcher(d, "healthcheck/web")
    try:
        w.wait(lambda ev: of(ev, "web", "ok"), message="a passing check")
        old = current_os_pid(d, "web")
        flag.write_text("now")
        wait_for(lambda: (lambda p: p and p != old)(current_os_pid(d, "web")),
                 timeout=15, message="the hanging web to be restarted")
        # the restart can be seen on the API before the event stream
        # has brought the second fail event
        fails = of(w.wait(lambda ev: len(of(ev, "web", "fail")) >= 2,
                          message="two fail events"), "web", "fail")
        for e in fails[:2]:
            assert re.search(r"time[sd]? ?out", e["detail"], re.I), e
        wait_for(lambda: hc_status(d)["web"]["restarts"] >= 1, message="restart counted")
    finally:
        w.close()


def test_passing_checks_never_restart_and_status_and_metrics(hc, tmp_path):
    port = free_port()
    d = hc("""
        [process:web]
        cmd = @PY@ server.py %d %s 500

        [process:idle]
        cmd = @PY@ idle.py

        [process:idle2]
        cmd = @PY@ idle.py

        [healthcheck:web]
        http = http://127.0.0.1:%d/
        expect_status = 200, 204
        interval = 0.2
        timeout = 2
        failures = 1
        start_period = 3

        [healthcheck:idle]
        tcp = localhost:%d
        interval = 0.2
        timeout = 2
        failures = 1
        grace = 3

        [healthcheck:idle2]
        command = %s
        interval = 0.2
        timeout = 2
        failures = 1
        """ % (port, tmp_path / "flag", port, port, TRUE))
    w = EventWatcher(d, "healthcheck")
    try:
        pids = {name: wait_for(lambda: current_os_pid(d, name), message=name)
                for name in ("web", "idle", "idle2")}
        w.wait(lambda ev: all(len(of(ev, n, "ok")) >= 5 for n in pids),
               timeout=20, message="five passing checks of each")
        assert not [e for e in w.events if e["event"].endswith(".fail")], w.events
        assert {name: current_os_pid(d, name) for name in pids} == pids
        st = hc_status(d)
        assert set(st) == {"web", "idle", "idle2"}
        expected = {"web": ("http", "http://127.0.0.1:%d/" % port),
                    "idle": ("tcp", "localhost:%d" % port),
                    "idle2": ("command", TRUE)}
        for name, (check, target) in expected.items():
            assert st[name]["check"] == check and st[name]["target"] == target, st
            assert st[name]["healthy"] is True
            assert st[name]["consecutive_failures"] == 0
            assert st[name]["restarts"] == 0
        # (web and idle may have missed a check during their start_period)
        assert st["idle2"]["last_error"] is None
        ok = of(w.events, "idle2", "ok")[0]
        assert ok["name"] == "idle2" and ok["check"] == "command" and ok["failures"] == 0

        r = d.get("/metrics")
        assert r.status == 200
        text = r.body.decode()
        for metric, kind in (("gafferd_healthcheck_up", "gauge"),
                             ("gafferd_healthcheck_failures_total", "counter")):
            assert re.search(r"(?m)^# HELP %s \S" % metric, text), text
            assert re.search(r"(?m)^# TYPE %s %s$" % (metric, kind), text), text
        for name in pids:
            assert re.search(r'(?m)^gafferd_healthcheck_up\{name="%s"\} 1$' % name, text), text
            assert re.search(r'(?m)^gafferd_healthcheck_failures_total\{name="%s"\} 0$'
                             % name, text), text

        # SIGHUP restarts the plugin application; the checks go on
        seen = len(of(w.events, "idle2", "ok"))
        d.signal(signal.SIGHUP)
        w.wait(lambda ev: len(of(ev, "idle2", "ok")) >= seen + 3, message="checks after SIGHUP")
        assert {name: current_os_pid(d, name) for name in pids} == pids
    finally:
        w.close()


def test_failing_checks_action_log_and_restart(hc, tmp_path):
    closed = free_port()  # nobody listens there
    d = hc("""
        [process:logonly]
        cmd = @PY@ idle.py

        [process:tcpdown]
        cmd = @PY@ idle.py

        [process:restarted]
        cmd = @PY@ idle.py

        [healthcheck:logonly]
        command = %s
        interval = 0.2
        failures = 2
        action = log

        [healthcheck:tcpdown]
        tcp = 127.0.0.1:%d
        interval = 0.2
        failures = 2
        action = log

        [healthcheck:restarted]
        command = %s
        interval = 0.2
        failures = 2
        """ % (FALSE, closed, FALSE))
    w = EventWatcher(d, "healthcheck")
    try:
        logonly = wait_for(lambda: current_os_pid(d, "logonly"), message="logonly")
        tcpdown = wait_for(lambda: current_os_pid(d, "tcpdown"), message="tcpdown")
        restarted = wait_for(lambda: current_os_pid(d, "restarted"), message="restarted")
        w.wait(lambda ev: len(of(ev, "logonly", "fail")) >= 5
               and len(of(ev, "tcpdown", "fail")) >= 5,
               timeout=20, message="five failures of the log-only checks")
        # action = log: never restarted, and the count keeps growing
        assert current_os_pid(d, "logonly") == logonly
        assert current_os_pid(d, "tcpdown") == tcpdown
        assert [e["failures"] for e in of(w.events, "logonly", "fail")[:5]] == [1, 2, 3, 4, 5]
        assert "exit status 1" in of(w.events, "logonly", "fail")[0]["detail"]
        st = hc_status(d)
        assert st["logonly"]["restarts"] == 0 and st["logonly"]["healthy"] is False
        assert st["logonly"]["consecutive_failures"] >= 5
        assert st["tcpdown"]["restarts"] == 0 and st["tcpdown"]["last_error"]
        assert re.search(r"WARNING.*logonly", d.log()), d.log()
        # action = restart (the default): restarted after 2 failures, counter reset
        wait_for(lambda: (lambda p: p and p != restarted)(current_os_pid(d, "restarted")),
                 message="restarted to be restarted")
        wait_for(lambda: hc_status(d)["restarted"]["restarts"] >= 1, message="restart counted")
        fails = [e["failures"] for e in of(w.wait(lambda ev: len(of(ev, "restarted", "fail")) >= 2,
                                                  message="two fail events"), "restarted", "fail")]
        assert fails[:2] == [1, 2], fails
        if len(fails) > 2:
            assert fails[2] == 1, fails  # counted again from zero after the restart

        text = d.get("/metrics").body.decode()
        m = re.search(r'(?m)^gafferd_healthcheck_failures_total\{name="logonly"\} (\d+)$', text)
        assert m and int(m.group(1)) >= 5, text
        assert re.search(r'(?m)^gafferd_healthcheck_up\{name="logonly"\} 0$', text), text
        m = re.search(r'(?m)^gafferd_healthcheck_restarts_total\{name="restarted"\} (\d+)$', text)
        assert m and int(m.group(1)) >= 1, text
    finally:
        w.close()


def test_hanging_command_is_killed_and_counted(hc, tmp_path):
    arg = "600.%05d" % os.getpid()   # a duration no other process uses
    d = hc("""
        [process:idle]
        cmd = @PY@ idle.py

        [healthcheck:idle]
        command = %s %s
        interval = 0.2
        timeout = 0.4
        failures = 2
        action = log
        """ % (SLEEP, arg))

    def sleepers():
        # live command checks; they are children of the daemon
        return [p for p in children_of(d.pid) if proc_cmdline(p)[1:] == [arg]]

    seen = set()

    def enough_failures():
        seen.update(sleepers())
        return hc_status(d)["idle"]["consecutive_failures"] >= 3 and seen

    wait_for(enough_failures, timeout=15, message="three timed-out command checks")
    # each timed-out check was killed: at most the one in flight is alive
    # (without the kill, three or more would be running)
    wait_for(lambda: len(sleepers()) <= 1, message="at most one sleep check alive")
    st = hc_status(d)["idle"]
    assert re.search(r"time[sd]? ?out", st["last_error"], re.I), st
    assert st["healthy"] is False and st["restarts"] == 0
    assert d.stop() == 0
    # stop() killed the check in flight; nothing is left behind
    wait_for(lambda: not sleepers(), message="sleep checks gone")


def test_checks_run_only_while_the_template_runs(hc, tmp_path):
    d = hc("""
        [process:lazy]
        cmd = @PY@ idle.py
        start = false

        [process:busy]
        cmd = @PY@ idle.py

        [healthcheck:lazy]
        command = %s
        interval = 0.2

        [healthcheck:busy]
        command = %s
        interval = 0.2
        """ % (TRUE, TRUE))
    w = EventWatcher(d, "healthcheck")
    try:
        w.wait(lambda ev: len(of(ev, "busy", "ok")) >= 5, message="busy checked 5 times")
        assert not [e for e in w.events if e.get("name") == "lazy"]
        st = hc_status(d)["lazy"]
        assert st["healthy"] is None and st["last_checked"] is None, st
        assert d.post("/processes/lazy/_start").status == 200
        w.wait(lambda ev: of(ev, "lazy", "ok"), message="lazy checked once started")
        assert hc_status(d)["lazy"]["healthy"] is True
    finally:
        w.close()


def test_start_period_failures_do_not_count(hc, tmp_path):
    d = hc("""
        [process:slow]
        cmd = @PY@ idle.py

        [process:busy]
        cmd = @PY@ idle.py

        [healthcheck:slow]
        command = %s
        interval = 0.2
        failures = 1
        start_period = 60

        [healthcheck:busy]
        command = %s
        interval = 0.2
        """ % (FALSE, TRUE))
    w = EventWatcher(d, "healthcheck")
    try:
        slow = wait_for(lambda: current_os_pid(d, "slow"), message="slow")
        w.wait(lambda ev: len(of(ev, "busy", "ok")) >= 5, message="busy checked 5 times")
        assert not of(w.events, "slow", "fail")
        st = hc_status(d)["slow"]
        assert st["consecutive_failures"] == 0 and st["restarts"] == 0, st
        assert current_os_pid(d, "slow") == slow
    finally:
        w.close()


def test_bad_healthcheck_sections_are_logged_and_skipped(hc, tmp_path):
    d = hc("""
        [process:idle]
        cmd = @PY@ idle.py

        [healthcheck:nocheck]
        interval = 1

        [healthcheck:badinterval]
        command = %s
        interval = soon

        [healthcheck:badaction]
        command = %s
        action = explode

        [healthcheck:badfailures]
        command = %s
        failures = 0

        [healthcheck:twotypes]
        command = %s
        tcp = 127.0.0.1:1

        [healthcheck:badtcp]
        tcp = no-port-here

        [healthcheck:idle]
        command = %s
        interval = 0.2
        """ % (TRUE, TRUE, TRUE, TRUE, TRUE))
    wait_for(lambda: hc_status(d)["idle"]["healthy"] is True, message="the good check passes")
    assert set(hc_status(d)) == {"idle"}
    log_lines = d.log().splitlines()
    for section, word in (("nocheck", "check"), ("badinterval", "interval"),
                          ("badaction", "action"), ("badfailures", "failures"),
                          ("twotypes", "tcp"), ("badtcp", "tcp")):
        hits = [l for l in log_lines if "ERROR" in l and "[healthcheck:%s]" % section in l]
        assert hits, "no ERROR line for [healthcheck:%s]:\n%s" % (section, d.log())
        assert word in hits[0]
    assert "Traceback" not in d.log()
    assert d.get("/").status == 200
