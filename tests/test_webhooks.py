"""Webhooks: the daemon POSTs event payloads to the
URLs of ``[webhooks]``.

Receivers are stdlib HTTP servers running in threads of the test; a
"hanging" receiver is a socket that accepts connections and never
answers, a "refusing" one is a port nobody listens on.
"""
import http.server
import json
import re
import socket
import statistics
import threading
import time

import pytest

from conftest import EventWatcher, wait_for


class Receiver:
    """Records every request: (path, method, headers, body). On paths that
    start with /fail, the first body ever seen there is always answered with
    500 (so it is retried until the daemon gives up); the rest get 200."""

    def __init__(self):
        self.hits = []
        self.first_fail = None
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                length = self.headers.get("Content-Length")
                body = self.rfile.read(int(length)) if length is not None else None
                status = 200
                with receiver.lock:
                    receiver.hits.append((self.path, self.command, dict(self.headers), body))
                    if self.path.startswith("/fail"):
                        receiver.first_fail = receiver.first_fail or body
                        status = 500 if body == receiver.first_fail else 200
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def bodies(self, path):
        with self.lock:
            return [json.loads(body) for p, _, _, body in self.hits if p == path]

    def requests(self, path):
        with self.lock:
            return [hit for hit in self.hits if hit[0] == path]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class Hanger:
    """Accepts connections, reads what comes, never answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(50)
        self.url = "http://127.0.0.1:%d/hang" % self.sock.getsockname()[1]
        self.conns = []
        self.stop = False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self):
        self.stop = True
        self.sock.close()
        for conn in self.conns:
            conn.close()


def refused_url():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nobody listens there now
    return "http://127.0.0.1:%d/refused" % port


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


# with startsecs = 600 the process stays "starting": the state events of
# a start and a stop come in this order
HOOK_SEQUENCE = ["create", "start", "proc.Hook.start", "state", "proc.Hook.state",
                 "spawn", "proc.Hook.spawn",
                 "stop", "proc.Hook.stop", "stop_pid", "proc.Hook.stop_pid",
                 "state", "proc.Hook.state", "exit", "proc.Hook.exit"]


def test_matching_events_are_posted_in_order_with_exact_payloads(gafferd, receiver):
    u = receiver.url
    d = gafferd("""
        [process:Hook]
        cmd = sleep
        args = 600
        start = false
        startsecs = 600

        [webhooks]
        . = %(u)s/all
        spawn = %(u)s/all
        create = %(u)s/create
        proc.Hook.spawn = %(u)s/spawn-a   %(u)s/spawn-b
            %(u)s/spawn-c
        proc.Hook = %(u)s/prefix
        proc = %(u)s/prefix
        exi = %(u)s/prefix
        """ % {"u": u})
    watcher = EventWatcher(d)
    try:
        assert d.post("/processes/Hook/_start").status == 200
        watcher.wait(lambda ev: "proc.Hook.spawn" in [e["event"] for e in ev])
        assert d.post("/processes/Hook/_stop").status == 200
        watched = watcher.wait(lambda ev: len(ev) >= len(HOOK_SEQUENCE) - 1,
                               message="the start/stop events")
    finally:
        watcher.close()
    wait_for(lambda: len(receiver.requests("/all")) >= len(HOOK_SEQUENCE), 10.0,
             message="every event at the '.' hook")
    wait_for(lambda: receiver.requests("/spawn-c"), 10.0, message="the third spawn hook")
    all_bodies = receiver.bodies("/all")
    # in order, each once (the '.' hook and the 'spawn' hook share one URL)
    assert [b["event"] for b in all_bodies] == HOOK_SEQUENCE
    assert all_bodies[0] == {"event": "create", "name": "Hook"}
    # the exact payloads the event bus carries (as /watch shows them)
    assert all_bodies[1:] == watched
    for path, method, headers, body in receiver.requests("/all"):
        assert method == "POST"
        assert headers.get("Content-Type") == "application/json", headers
        assert body is not None and json.loads(body)
    assert receiver.bodies("/create") == [all_bodies[0]]
    spawn = all_bodies[HOOK_SEQUENCE.index("proc.Hook.spawn")]
    assert set(spawn) == {"event", "name", "pid", "detached", "os_pid"}
    for path in ("/spawn-a", "/spawn-b", "/spawn-c"):
        assert receiver.bodies(path) == [spawn], path
    # matching is exact: no prefix key ever fires
    assert receiver.requests("/prefix") == []


def test_bad_receivers_are_retried_logged_and_do_not_hold_anything_up(gafferd, receiver):
    hanger = Hanger()
    refused = refused_url()
    u = receiver.url
    try:
        d = gafferd("""
            [process:w]
            cmd = sleep
            args = 600
            start = false

            [webhooks]
            . = %(hang)s %(u)s/all
            proc.w.spawn = %(u)s/fail %(refused)s %(u)s/after
            """ % {"u": u, "hang": hanger.url, "refused": refused})
        t0 = time.monotonic()
        assert d.post("/processes/w/_start").status == 200
        expected = ["create", "start", "proc.w.start", "state", "proc.w.state", "spawn",
                    "proc.w.spawn"]
        # the good receivers get their events at once, whatever the others do
        wait_for(lambda: len(receiver.requests("/all")) >= len(expected), 10.0,
                 message="the events at the good '.' receiver")
        assert [b["event"] for b in receiver.bodies("/all")][:len(expected)] == expected
        wait_for(lambda: receiver.requests("/after"), 15.0,
                 message="the hook listed after the failing ones")
        # the daemon stays responsive while deliveries hang (p90 of 50 pings)
        latencies = []
        for _ in range(50):
            t = time.monotonic()
            assert d.get("/ping").status == 200
            latencies.append(time.monotonic() - t)
        assert statistics.quantiles(latencies, n=10, method="inclusive")[-1] < 0.1, sorted(latencies)
        # a 500 is retried: 3 attempts in all, each with the same body
        wait_for(lambda: len(receiver.requests("/fail")) >= 3, 40.0,
                 message="3 attempts at the failing receiver")
        wait_for(lambda: re.search(r"WARNING.*%s/fail" % re.escape(u), d.log()), 10.0,
                 message="a warning naming the failing URL")
        wait_for(lambda: re.search(r"WARNING.*%s" % re.escape(refused), d.log()), 40.0,
                 message="a warning naming the refusing URL")
        # the next event for that URL is sent once the failing one is given
        # up (deliveries to one URL keep their order): 3 attempts, no more
        assert d.post("/processes/w/_stop").status == 200
        wait_for(lambda: "proc.w.exit" in [b["event"] for b in receiver.bodies("/all")], 10.0,
                 message="the exit of the first process")
        assert d.post("/processes/w/_start").status == 200
        wait_for(lambda: len(receiver.requests("/fail")) >= 4, 20.0,
                 message="the second spawn at the failing receiver")
        fails = receiver.bodies("/fail")
        first = receiver.bodies("/after")[0]
        assert fails[:3] == [first] * 3 and first["event"] == "proc.w.spawn"
        assert fails[3] != first and fails[3]["event"] == "proc.w.spawn", fails
        assert hanger.conns, "the hanging receiver was never contacted"
        assert time.monotonic() - t0 < 60
        # pending deliveries to the hanging receiver do not hold up shutdown
        t = time.monotonic()
        assert d.stop() == 0
        assert time.monotonic() - t < 10.0
        assert "Traceback" not in d.log()
    finally:
        hanger.close()
