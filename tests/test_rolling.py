"""Rolling restarts: new processes one at a time, each ready before an old one stops.

A template serves HTTP from the socket gafferd holds for it ([socket:web],
passed as fd 3 with LISTEN_FDS) while a client sends requests without pause;
``POST /processes/web/_restart?rolling=1`` must replace every process without
one failed request.  A new process that never gets ready stops the rollout and
the old processes go on answering.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import threading
import time

from conftest import GAFFERD, PY, EventWatcher, wait_for

# A small HTTP server on the socket of the systemd protocol: it checks the
# variables, answers with its pid, and on SIGTERM finishes the request in
# hand and exits.  With the file named by argv[1] present it never gets
# ready: it prints nothing and accepts nothing; if the file of that name
# + ".crash" lists its slot, it exits at once with status 3.
SERVER = r'''
import os, signal, socket, sys, time
assert int(os.environ["LISTEN_PID"]) == os.getpid(), "LISTEN_PID is not mine"
assert os.environ["LISTEN_FDS"] == "1" and os.environ["LISTEN_FDNAMES"] == "web"
sock = socket.socket(fileno=3)
sock.settimeout(0.2)
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
if os.path.exists(sys.argv[1] + ".crash"):
    with open(sys.argv[1] + ".crash") as f:
        if os.environ["GAFFERD_SLOT"] in f.read().split():
            sys.exit(3)
if os.path.exists(sys.argv[1]):
    while not stop:
        time.sleep(0.05)
    sys.exit(0)
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
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    except OSError:
        pass
    conn.close()
'''


def config(tmp, extra=""):
    with open(os.path.join(tmp, "server.py"), "w") as f:
        f.write(SERVER)
    return """
        [socket:web]
        bind = 127.0.0.1:0

        [process:web]
        cmd = %s -u server.py %s
        sockets = web
        numprocesses = 4
        ready = log:^serving
        ready_timeout = 4
        graceful_timeout = 10
        %s
        """ % (PY, os.path.join(tmp, "broken"), extra)


class Client:
    """Sends GET / on a new connection each time, without pause, from a thread."""

    def __init__(self, address):
        host, port = address.rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.ok, self.failed, self.pids = 0, [], set()
        self.stopped = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stopped:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
            try:
                conn.request("GET", "/")
                resp = conn.getresponse()
                body = resp.read()
                if resp.status == 200:
                    self.ok += 1
                    self.pids.add(int(body))
                else:
                    self.failed.append(resp.status)
            except Exception as exc:
                self.failed.append(repr(exc))
            finally:
                conn.close()

    def stop(self):
        self.stopped = True
        self.thread.join(15)


def os_pids(d):
    return {p["os_pid"] for p in d.status("web")["processes"]}


def start(gafferd, tmp_path, extra=""):
    d = gafferd(config(str(tmp_path), extra))
    wait_for(lambda: d.status("web")["ready"] == 4, 20, message="4 ready servers")
    address = d.status("web")["sockets"][0]["address"]
    return d, address


def test_rolling_restart_fails_no_request_and_replaces_every_process(gafferd, tmp_path):
    d, address = start(gafferd, tmp_path)
    before = os_pids(d)
    watcher = EventWatcher(d, "rollout")
    client = Client(address)
    try:
        wait_for(lambda: client.ok >= 20, 10, message="the client's first answers")
        r = d.post("/processes/web/_restart?rolling=1", timeout=60)
        answered = client.ok
        wait_for(lambda: client.ok >= answered + 20, 10, message="answers after the rollout")
    finally:
        client.stop()
    assert r.status == 200, r
    reply = r.json()
    assert reply["ok"] is True and reply["result"] == "done", reply
    assert [e["event"] for e in reply["events"]] == \
        ["rollout.start"] + ["rollout.step"] * 4 + ["rollout.done"]
    assert client.failed == [], client.failed[:5]
    assert client.ok > 40
    after = os_pids(d)
    assert len(after) == 4 and not after & before            # every process replaced
    assert d.status("web")["ready"] == 4
    assert client.pids & after and client.pids & before      # old and new ones answered
    events = watcher.wait(lambda es: any(e["event"] == "rollout.done" for e in es))
    steps = [e for e in events if e["event"] == "rollout.step"]
    assert [s["replaced"] for s in steps] == [1, 2, 3, 4]
    assert all(s["total"] == 4 and len(s["old"]) == len(s["new"]) == 1 for s in steps)
    watcher.close()


def test_new_process_never_ready_stops_the_rollout_and_old_ones_answer(gafferd, tmp_path):
    d, address = start(gafferd, tmp_path)
    before = os_pids(d)
    open(os.path.join(str(tmp_path), "broken"), "w").close()
    watcher = EventWatcher(d, "proc.web.rollout")
    client = Client(address)
    try:
        wait_for(lambda: client.ok >= 20, 10, message="the client's first answers")
        started = time.monotonic()
        r = d.post("/processes/web/_restart?rolling=1", timeout=60)
        took = time.monotonic() - started
        answered = client.ok
        wait_for(lambda: client.ok >= answered + 20, 10, message="answers after the rollout")
    finally:
        client.stop()
    reply = r.json()
    assert reply["ok"] is False and reply["result"] == "failed", reply
    assert "ready_timeout" in reply["reason"], reply
    assert took >= 3.5                                       # it waited for ready_timeout
    assert client.failed == [], client.failed[:5]
    assert os_pids(d) == before                              # the old ones keep serving
    assert client.pids <= before
    status = d.status("web")
    assert status["ready"] == 4 and len(status["processes"]) == 4
    events = watcher.wait(lambda es: any(e["event"] == "proc.web.rollout.failed" for e in es))
    failed = [e for e in events if e["event"] == "proc.web.rollout.failed"][0]
    assert failed["replaced"] == 0 and "ready_timeout" in failed["reason"]
    watcher.close()


def test_restart_mode_rolling_is_the_default_and_surge_two(gafferd, tmp_path):
    d, address = start(gafferd, tmp_path, "restart_mode = rolling\nrolling_max_surge = 2")
    info = d.json("GET", "/processes/web")
    assert info["restart_mode"] == "rolling" and info["rolling_max_surge"] == 2
    before = os_pids(d)
    r = d.post("/processes/web/_restart?wait=0")
    assert r.status == 202 and r.json() == {"ok": True, "rolling": ["web"]}
    # a second rolling restart while one runs is refused
    busy = d.post("/processes/web/_restart?rolling=1")
    assert busy.status == 409 and "in progress" in busy.json()["message"], busy
    assert d.status("web")["rollout"]["total"] == 4
    wait_for(lambda: not os_pids(d) & before and d.status("web")["ready"] == 4, 30,
             message="every process replaced")
    # rolling=0 asks for a plain restart
    r = d.post("/processes/web/_restart?rolling=0")
    assert r.status == 200 and r.json() == {"ok": True}


def test_group_rolling_restart_and_reload(gafferd, tmp_path):
    d = gafferd(config(str(tmp_path)).replace("[process:web]", "[process:site:web]")
                .replace("numprocesses = 4", "numprocesses = 2"))
    wait_for(lambda: d.status("site:web")["ready"] == 2, 20, message="2 ready servers")
    before = {p["os_pid"] for p in d.status("site:web")["processes"]}
    r = d.post("/groups/site/_restart?rolling=1", timeout=60)
    reply = r.json()
    assert reply["ok"] is True and reply["rolling"] == ["site:web"], reply
    after = {p["os_pid"] for p in d.status("site:web")["processes"]}
    assert len(after) == 2 and not after & before
    # a reload that changes a rolling template rolls it
    with open(d.config_path) as f:
        text = f.read()
    with open(d.config_path, "w") as f:
        f.write(text.replace("graceful_timeout = 10", "graceful_timeout = 9\nrestart_mode = rolling"))
    watcher = EventWatcher(d, "rollout")
    result = d.json("POST", "/reload")
    assert result["changed"] == ["site:web"]
    watcher.wait(lambda es: any(e["event"] == "rollout.done" for e in es), 30,
                 message="the reload's rollout")
    assert [e["event"] for e in watcher.events].count("rollout.step") == 2
    assert d.json("GET", "/processes/site:web")["graceful_timeout"] == 9
    watcher.close()
    assert json.loads(d.get("/status/site:web").body)["ready"] == 2


def test_new_process_that_exits_stops_the_rollout_after_the_replaced_ones(gafferd, tmp_path):
    d, address = start(gafferd, tmp_path, "rolling_max_surge = 2")
    before = os_pids(d)
    with open(os.path.join(str(tmp_path), "broken.crash"), "w") as f:
        f.write("2 3")                  # the new processes of the second step exit
    watcher = EventWatcher(d, "rollout")
    r = d.post("/processes/web/_restart?rolling=1&wait=0")
    assert r.status == 202
    events = watcher.wait(lambda es: any(e["event"] in ("rollout.failed", "rollout.done")
                                         for e in es), 30, message="the end of the rollout")
    end = events[-1]
    assert end["event"] == "rollout.failed", events
    assert end["replaced"] == 2 and end["total"] == 4
    assert "exited before it was ready" in end["reason"], end
    status = d.status("web")
    assert status["ready"] == 4 and "rollout" not in status
    after = os_pids(d)
    assert len(after) == 4 and len(after & before) == 2      # two replaced, two kept
    watcher.close()


def test_ctl_restart_waits_for_the_rollout_and_reports_how_it_ended(gafferd, tmp_path):
    # `ctl restart` of a `restart_mode = rolling` template returns when the
    # rollout has ended; one that failed is exit 1 with the reason, not
    # "restarted"
    d, _ = start(gafferd, tmp_path, "restart_mode = rolling")
    url = "http://127.0.0.1:%d" % d.port
    before = os_pids(d)
    done = ctl_run(["restart", "web"], url)
    assert done.returncode == 0 and done.stdout == "web: restarted\n", done
    assert not os_pids(d) & before and d.status("web")["ready"] == 4   # already replaced
    open(os.path.join(str(tmp_path), "broken"), "w").close()
    before = os_pids(d)
    failed = ctl_run(["restart", "web"], url)
    assert failed.returncode == 1 and failed.stdout == "", failed
    assert "web: rolling restart failed" in failed.stderr and "ready_timeout" in failed.stderr, \
        failed.stderr
    assert os_pids(d) == before                              # the old ones keep serving


def ctl_run(args, url):
    return subprocess.run([PY, GAFFERD, "ctl", "--url", url] + args, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=60,
                          universal_newlines=True)


def test_a_long_step_keeps_the_reply_alive_with_blanks(gafferd, tmp_path):
    # a step that waits longer than the heartbeat (15 s) sends blanks, so a
    # client with an idle timeout (ctl's is 60 s) does not give up; the
    # reply stays one JSON document
    text = config(str(tmp_path)).replace("ready_timeout = 4", "ready_timeout = 17")
    d = gafferd(text)
    wait_for(lambda: d.status("web")["ready"] == 4, 20, message="4 ready servers")
    open(os.path.join(str(tmp_path), "broken"), "w").close()
    r = d.post("/processes/web/_restart?rolling=1", timeout=40)
    assert r.status == 200
    assert re.search(rb'"rollout\.start"\} +,', r.body), r.body   # a blank while it waited
    reply = json.loads(r.body)
    assert reply["ok"] is False and "ready_timeout" in reply["reason"], reply
