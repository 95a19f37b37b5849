"""Manager events seen through ``GET /watch``.

Each test starts an empty daemon, opens ``/watch?feed=continuous`` (one JSON
event per line) before acting, and checks names, order and payload keys.
"""
import http.client
import json
import signal
import threading
import time

import pytest

from conftest import PY, EventWatcher as _EventWatcher, holds_for, pid_alive


def lifecycle_event(event):
    """``state`` and ``ready`` (and their proc.NAME twins): the per-process
    lifecycle, checked in test_state_events; the other tests follow the
    gaffer 0.4.4 events."""
    return event["event"].rsplit(".", 1)[-1] in ("state", "ready")


class EventWatcher(_EventWatcher):
    """The watcher of conftest without the lifecycle events."""

    @property
    def events(self):
        return [e for e in super().events if not lifecycle_event(e)]

    def names(self):
        return [e["event"] for e in self.events]

CHILD = r'''
import sys, time
if "exit1" in sys.argv[1:]:
    sys.exit(1)
while True:
    time.sleep(1000)
'''

NAME_ONLY = {"event", "name"}
SPAWN_KEYS = {"event", "name", "pid", "detached", "os_pid"}
PID_KEYS = {"event", "name", "pid", "os_pid"}
EXIT_KEYS = {"event", "name", "pid", "exit_status", "term_signal", "os_pid", "uptime",
             "restart_in"}


@pytest.fixture
def child(tmp_path):
    path = tmp_path / "child.py"
    path.write_text(CHILD)
    return str(path)


@pytest.fixture
def daemon(daemon_factory):
    return daemon_factory()


@pytest.fixture
def watcher(daemon):
    w = EventWatcher(daemon)
    yield w
    w.close()


def template(name, script, *opts, **settings):
    body = {"name": name, "cmd": PY, "args": [script] + list(opts)}
    body.update(settings)
    return body


def count(name):
    return lambda events: len(events) >= name


def check_pair(bare, proc, name):
    """``proc`` is ``proc.NAME.<bare event>`` with the same payload."""
    assert proc["event"] == "proc.%s.%s" % (name, bare["event"]), (bare, proc)
    assert dict(proc, event=bare["event"]) == bare


def pairs(events, name):
    """Check every bare event is followed by its proc.NAME twin; return the bare ones."""
    assert len(events) % 2 == 0, [e["event"] for e in events]
    bare = events[0::2]
    for b, p in zip(bare, events[1::2]):
        check_pair(b, p, name)
    return bare


def no_more_events(watcher, n, duration=0.3):
    holds_for(lambda: len(watcher.events) == n, duration,
              message="no further event after %d" % n)


def test_add_with_two_processes(daemon, watcher, child):
    assert daemon.json("POST", "/processes", template("ev", child, numprocesses=2)) == {"ok": True}
    events = watcher.wait(count(7), message="7 events")
    assert [e["event"] for e in events] == [
        "create", "start", "proc.ev.start",
        "spawn", "proc.ev.spawn", "spawn", "proc.ev.spawn"]
    assert events[0] == {"event": "create", "name": "ev"}
    assert events[1] == {"event": "start", "name": "ev"}
    check_pair(events[1], events[2], "ev")
    spawns = pairs(events[3:], "ev")
    ids = daemon.pids("ev")
    for s, pid in zip(spawns, ids):
        assert set(s) == SPAWN_KEYS
        assert s["name"] == "ev" and s["pid"] == pid and s["detached"] is False
        assert s["os_pid"] == daemon.os_pid(pid) and pid_alive(s["os_pid"])
    no_more_events(watcher, 7)


def test_stop(daemon, watcher, child):
    daemon.json("POST", "/processes", template("ev", child, numprocesses=2))
    watcher.wait(count(7))
    ids = daemon.pids("ev")
    os_pids = [daemon.os_pid(i) for i in ids]
    assert daemon.json("POST", "/processes/ev/_stop") == {"ok": True}
    events = watcher.wait(count(7 + 10), message="stop events and exits")[7:]
    assert [e["event"] for e in events[:6]] == [
        "stop", "proc.ev.stop",
        "stop_pid", "proc.ev.stop_pid", "stop_pid", "proc.ev.stop_pid"]
    assert events[0] == {"event": "stop", "name": "ev"}
    check_pair(events[0], events[1], "ev")
    stop_pids = pairs(events[2:6], "ev")
    assert [e["pid"] for e in stop_pids] == ids  # oldest first
    for e, ospid in zip(stop_pids, os_pids):
        assert set(e) == PID_KEYS and e["os_pid"] == ospid
    exits = pairs(events[6:], "ev")
    assert sorted(e["pid"] for e in exits) == ids
    for e in exits:
        assert set(e) == EXIT_KEYS
        assert e["exit_status"] == 0 and e["term_signal"] == signal.SIGTERM
        assert e["os_pid"] == os_pids[ids.index(e["pid"])]
    no_more_events(watcher, 17)
    # stopping again does nothing, not even events
    assert daemon.json("POST", "/processes/ev/_stop") == {"ok": True}
    no_more_events(watcher, 17)


def test_remove_running_template(daemon, watcher, child):
    daemon.json("POST", "/processes", template("ev", child, numprocesses=2))
    watcher.wait(count(7))
    ids = daemon.pids("ev")
    assert daemon.json("DELETE", "/processes/ev") == {"ok": True}
    events = watcher.wait(count(7 + 11), message="remove events and exits")[7:]
    assert [e["event"] for e in events[:7]] == [
        "stop", "proc.ev.stop",
        "stop_pid", "proc.ev.stop_pid", "stop_pid", "proc.ev.stop_pid",
        "delete"]
    assert [e["pid"] for e in events[2:6:2]] == ids
    assert events[6] == {"event": "delete", "name": "ev"}
    exits = pairs(events[7:], "ev")
    assert sorted(e["pid"] for e in exits) == ids
    assert all(e["event"] == "exit" for e in exits)
    no_more_events(watcher, 18)


def test_remove_never_started_template(daemon, watcher, child):
    daemon.json("POST", "/processes", template("idle", child, start=False))
    watcher.wait(count(1))
    assert daemon.json("DELETE", "/processes/idle") == {"ok": True}
    events = watcher.wait(count(4), message="remove events")
    assert events == [
        {"event": "create", "name": "idle"},
        {"event": "stop", "name": "idle"},
        {"event": "proc.idle.stop", "name": "idle"},
        {"event": "delete", "name": "idle"}]
    no_more_events(watcher, 4)


def test_scale_down_and_up(daemon, watcher, child):
    daemon.json("POST", "/processes", template("ev", child, numprocesses=3))
    watcher.wait(count(9))
    ids = daemon.pids("ev")
    assert daemon.json("POST", "/processes/ev/_sub/2") == {"ok": True, "numprocesses": 1}
    events = watcher.wait(count(9 + 9), message="scale-down events and exits")[9:]
    assert events[0] == {"event": "update", "name": "ev"}
    assert [e["event"] for e in events[1:5]] == ["reap", "proc.ev.reap"] * 2
    reaps = pairs(events[1:5], "ev")
    assert [e["pid"] for e in reaps] == ids[:2]  # the oldest go
    for e in reaps:
        assert set(e) == PID_KEYS
    exits = pairs(events[5:], "ev")
    assert sorted(e["pid"] for e in exits) == ids[:2]
    assert all(e["event"] == "exit" for e in exits)
    no_more_events(watcher, 18)  # a reap is not followed by a respawn

    assert daemon.json("POST", "/processes/ev/_add") == {"ok": True, "numprocesses": 2}
    events = watcher.wait(count(18 + 3), message="scale-up events")[18:]
    assert events[0] == {"event": "update", "name": "ev"}
    (spawn,) = pairs(events[1:], "ev")
    assert spawn["event"] == "spawn" and spawn["pid"] > ids[-1]
    no_more_events(watcher, 21)


def test_stop_one_process(daemon, watcher, child):
    daemon.json("POST", "/processes", template("ev", child))
    watcher.wait(count(5))
    (pid,) = daemon.pids("ev")
    assert daemon.json("DELETE", "/processes/%d" % pid) == {"ok": True}
    events = watcher.wait(count(5 + 6), message="stop-one events")[5:]
    assert [e["event"] for e in events] == [
        "stop_pid", "proc.ev.stop_pid", "exit", "proc.ev.exit", "spawn", "proc.ev.spawn"]
    stop, exit_, spawn = pairs(events, "ev")
    assert stop["pid"] == exit_["pid"] == pid
    assert spawn["pid"] > pid
    no_more_events(watcher, 11)


def test_restart(daemon, watcher, child):
    daemon.json("POST", "/processes", template("ev", child, numprocesses=2))
    watcher.wait(count(7))
    old = daemon.pids("ev")
    assert daemon.json("POST", "/processes/ev/_restart") == {"ok": True}
    # 2 spawn pairs, 2 reap pairs, restart pair, 2 exit pairs
    events = watcher.wait(count(7 + 14), message="restart events and exits")[7:]
    names = [e["event"] for e in events]
    assert names.count("restart") == 1 and names.count("proc.ev.restart") == 1
    i = names.index("restart")
    assert names[i + 1] == "proc.ev.restart"
    assert events[i] == {"event": "restart", "name": "ev"}
    rest = events[:i] + events[i + 2:]
    assert [e["event"] for e in rest[:8]] == ["spawn", "proc.ev.spawn"] * 2 + \
        ["reap", "proc.ev.reap"] * 2
    spawns = pairs(rest[:4], "ev")
    reaps = pairs(rest[4:8], "ev")
    assert all(s["pid"] > max(old) for s in spawns)
    assert [r["pid"] for r in reaps] == old
    exits = pairs(rest[8:], "ev")
    assert sorted(e["pid"] for e in exits) == old
    assert all(e["event"] == "exit" for e in exits)
    assert daemon.pids("ev") == [s["pid"] for s in spawns]
    no_more_events(watcher, 21)


def test_flap_when_a_process_gives_up(daemon, watcher, child):
    # gaffer 0.4.4 flapping maps onto startsecs 5, backoff 0.5 flat,
    # start_retries 1: run, (0.5 s) run, give up; the give-up is a "flap"
    flapping = {"attempts": 2, "window": 5.0, "retry_in": 0.5, "max_retry": 1}
    daemon.json("POST", "/processes", template("fl", child, "exit1", flapping=flapping))
    watcher.wait(lambda ev: [e["event"] for e in ev].count("proc.fl.flap") == 1, 10,
                 message="a flap")
    timed = [(t, e) for t, e in watcher.timed if not lifecycle_event(e)]
    names = [e["event"] for _, e in timed]
    assert names[:3] == ["create", "start", "proc.fl.start"]
    core = [(t, e) for t, e in timed if e["event"] in ("spawn", "exit", "flap", "proc.fl.flap")]
    assert [e["event"] for _, e in core] == [
        "spawn", "exit", "spawn", "exit", "flap", "proc.fl.flap"]
    assert core[4][1] == {"event": "flap", "name": "fl"}
    exits = [e for _, e in core if e["event"] == "exit"]
    for e in exits:
        assert e["exit_status"] == 1 and e["term_signal"] == 0 and e["uptime"] < 5
    assert exits[0]["restart_in"] == 0.5 and exits[1]["restart_in"] is None
    # the backoff (0.5 s; less when this reader saw the exit late)
    assert core[2][0] - core[1][0] >= 0.3
    assert daemon.status("fl")["state"] == "failed"
    assert pairs([e for _, e in timed if e["event"] in ("exit", "proc.fl.exit")], "fl")


def test_state_events(daemon, child):
    w = _EventWatcher(daemon, "state")
    try:
        daemon.json("POST", "/processes", template("st", child, numprocesses=2))
        w.wait(lambda ev: len(ev) >= 2, message="starting, running")
        assert w.events[:2] == [
            {"event": "state", "name": "st", "state": "starting", "previous": "stopped"},
            {"event": "state", "name": "st", "state": "running", "previous": "starting"}]
        daemon.json("POST", "/processes/st/_stop")
        w.wait(lambda ev: len(ev) >= 3, message="stopped")
        assert w.events[2] == {"event": "state", "name": "st", "state": "stopped",
                               "previous": "running"}
    finally:
        w.close()

def test_prefix_and_exact_subscribers_get_each_event_once(daemon, child):
    every = EventWatcher(daemon)
    proc = EventWatcher(daemon, "proc")
    mine = EventWatcher(daemon, "proc/ev")
    exact = EventWatcher(daemon, "proc/ev/spawn")
    bare = EventWatcher(daemon, "spawn")
    try:
        daemon.json("POST", "/processes", template("ev", child))
        daemon.json("POST", "/processes", template("other", child))
        every.wait(count(10), message="both templates started")
        assert daemon.json("POST", "/processes/ev/_stop") == {"ok": True}
        every.wait(count(16), message="stop of ev")
        expected_proc = [e["event"] for e in every.events if e["event"].startswith("proc.")]
        proc.wait(count(len(expected_proc)))
        mine.wait(count(5))
        exact.wait(count(1))
        bare.wait(count(2))
        holds_for(lambda: len(proc.events) == len(expected_proc) and len(mine.events) == 5
                  and len(exact.events) == 1 and len(bare.events) == 2, 0.3,
                  message="no duplicates")
        assert proc.names() == expected_proc
        assert mine.names() == ["proc.ev.start", "proc.ev.spawn", "proc.ev.stop",
                                "proc.ev.stop_pid", "proc.ev.exit"]
        assert exact.names() == ["proc.ev.spawn"]
        assert [e["name"] for e in bare.events] == ["ev", "other"]
        assert bare.names() == ["spawn", "spawn"]
    finally:
        for w in (every, proc, mine, exact, bare):
            w.close()


def test_eventsource_feed(daemon, child):
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
    conn.request("GET", "/watch?feed=eventsource&heartbeat=0")
    resp = conn.getresponse()
    try:
        assert resp.status == 200
        assert resp.getheader("Content-Type", "").startswith("text/event-stream")
        daemon.json("POST", "/processes", template("es", child))
        received = []
        fields = {}
        while len(received) < 7:
            line = resp.readline()
            assert line, "stream ended early after %r" % received
            line = line.rstrip(b"\r\n").decode()
            if not line:
                if fields:
                    received.append(fields)
                fields = {}
                continue
            key, _, value = line.partition(":")
            fields[key] = value[1:] if value.startswith(" ") else value
        assert [f["event"] for f in received] == [
            "create", "start", "proc.es.start", "state", "proc.es.state", "spawn",
            "proc.es.spawn"]
        for f in received:
            assert json.loads(f["data"])["event"] == f["event"]
        assert json.loads(received[5]["data"])["os_pid"] == daemon.os_pid(daemon.pids("es")[0])
    finally:
        conn.close()


def test_longpoll_gives_one_event_then_ends(daemon, child):
    result = {}

    def poll():
        conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=15)
        try:
            conn.request("GET", "/watch/create")
            resp = conn.getresponse()
            result["status"] = resp.status
            result["body"] = resp.read()  # the reply ends after the first event
        except Exception as exc:
            result["error"] = repr(exc)
        finally:
            conn.close()

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    # the subscription starts when the daemon has read the request: keep
    # creating templates until the long poll answers
    created = []
    deadline = time.monotonic() + 10
    while t.is_alive() and time.monotonic() < deadline:
        name = "lp%d" % len(created)
        daemon.json("POST", "/processes", template(name, child, start=False))
        created.append(name)
        t.join(0.2)
    assert not t.is_alive(), "long poll did not answer"
    assert "error" not in result, result
    assert result["status"] == 200
    lines = [l for l in result["body"].splitlines() if l.strip()]
    assert len(lines) == 1, result
    event = json.loads(lines[0].decode())
    assert event["event"] == "create" and event["name"] in created
    assert set(event) == NAME_ONLY
