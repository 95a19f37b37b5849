"""The max_memory / max_cpu watchdog.

A real daemon with real children that allocate or spin: the process over
its limit for ``limit_for`` seconds is replaced (its sibling untouched),
the trip is an event ``proc.NAME.limit`` and a counter in /metrics, and
the other actions (stop, log, signal:NAME) do what they say.  The
judgement itself is a pure function fed with a fake clock, and an
in-process manager shows that no timer runs while no template has a limit.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import textwrap
import time
import types

import pytest

from conftest import PY, ROOT, EventWatcher, run_gafferd, wait_for

sys.path.insert(0, ROOT)
import gafferd as gd  # noqa: E402

SLEEP = shutil.which("sleep")
MB = 1 << 20

# Slot 0 allocates ``HOG_MB`` and touches every page (so it is resident),
# then says so in a file; every other slot stays small.
HOG = """\
import os, sys, time
if os.environ["GAFFERD_SLOT"] == "0":
    block = bytearray(int(os.environ["HOG_MB"]) << 20)
    for i in range(0, len(block), 4096):
        block[i] = 1
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(3600)
"""


def write(path, text):
    path = str(path)
    with open(path, "w") as f:
        f.write(textwrap.dedent(text).lstrip("\n"))
    return path


def slot_pids(d, name):
    """slot -> OS pid of the live processes of ``name``."""
    return {p["slot"]: p["os_pid"] for p in d.status(name)["processes"] if p["os_pid"]}


def metric(d, metric_name, **labels):
    text = d.get("/metrics").body.decode()
    want = ",".join('%s="%s"' % item for item in labels.items())
    m = re.search(r"^%s\{%s\} (\S+)$" % (re.escape(metric_name), re.escape(want)), text, re.M)
    return float(m.group(1)) if m else None


# -- end to end ---------------------------------------------------------------------------------

def test_a_process_over_max_memory_is_replaced_and_its_sibling_untouched(tmp_path, gafferd):
    hog = write(tmp_path / "hog.py", HOG)
    marker = str(tmp_path / "allocated")
    d = gafferd("""
        [process:hog]
        cmd = %s
        args = %s %s
        numprocesses = 2
        max_memory = 60MB
        limit_for = 1
        [env:hog]
        HOG_MB = 120
        """ % (PY, hog, marker))
    events = EventWatcher(d, "proc/hog/limit")
    try:
        before = wait_for(lambda: len(slot_pids(d, "hog")) == 2 and slot_pids(d, "hog"),
                          message="two processes")
        wait_for(lambda: os.path.exists(marker), 15, message="slot 0 to allocate")
        allocated = time.monotonic()
        with open(marker) as f:
            hog_pid = int(f.read())
        os.unlink(marker)
        assert hog_pid == before[0]
        after = wait_for(lambda: slot_pids(d, "hog").get(0) not in (None, hog_pid)
                         and slot_pids(d, "hog"), 10, message="slot 0 replaced")
        took = time.monotonic() - allocated
        assert took <= 1 + 2, "replaced %.2fs after the allocation (limit_for = 1)" % took
        assert after[1] == before[1]                      # the sibling was left alone
        trip = events.wait(lambda e: e, message="a limit event")[0]
        assert trip["event"] == "proc.hog.limit"
        assert trip["os_pid"] == hog_pid and trip["limit"] == "max_memory"
        assert trip["value"] > 60 * MB and trip["max"] == 60 * MB
        assert trip["action"] == "restart" and trip["limit_for"] == 1
        assert metric(d, "gafferd_template_limit_trips_total",
                      name="hog", limit="max_memory") >= 1
        assert "memory" in d.log() and "over 60MB for 1s (limit_for); restart" in d.log()
        exits = d.get("/metrics").body.decode()
        assert 'reason="crashed"' not in exits            # a replacement, not a crash
    finally:
        events.close()


def test_max_memory_counts_the_descendants(tmp_path, gafferd):
    hog = write(tmp_path / "hog.py", HOG)
    marker = str(tmp_path / "allocated")
    d = gafferd("""
        [process:tree]
        cmd = sh
        args = -c '%s %s %s & wait'
        max_memory = 60MB
        limit_for = 0
        [env:tree]
        HOG_MB = 120
        """ % (PY, hog, marker))
    shell = wait_for(lambda: slot_pids(d, "tree").get(0), message="the shell")
    wait_for(lambda: os.path.exists(marker), 15, message="its child to allocate")
    wait_for(lambda: slot_pids(d, "tree").get(0) not in (None, shell), 5,
             message="the shell replaced for its child's memory")


def test_limit_actions_stop_log_and_signal(tmp_path, gafferd):
    hog = write(tmp_path / "hog.py", HOG)
    usr1 = write(tmp_path / "usr1.py", """
        import os, signal, sys, time
        def note(signum, frame):
            with open(sys.argv[1], "a") as f:
                f.write("USR1\\n")
        signal.signal(signal.SIGUSR1, note)
        block = bytearray(120 << 20)
        for i in range(0, len(block), 4096):
            block[i] = 1
        while True:
            time.sleep(1)
        """)
    d = gafferd("""
        [process:stopper]
        cmd = %(py)s
        args = %(hog)s %(tmp)s/stopper
        max_memory = 60MB
        limit_for = 0
        limit_action = stop
        [env:stopper]
        HOG_MB = 120
        [process:logger]
        cmd = %(py)s
        args = %(hog)s %(tmp)s/logger
        max_memory = 60MB
        limit_for = 0
        limit_action = log
        [env:logger]
        HOG_MB = 120
        [process:signaller]
        cmd = %(py)s
        args = %(usr1)s %(tmp)s/signalled
        max_memory = 60MB
        limit_for = 0
        limit_action = signal:USR1
        """ % {"py": PY, "hog": hog, "usr1": usr1, "tmp": tmp_path})
    logger = wait_for(lambda: slot_pids(d, "logger").get(0), message="logger")
    signaller = wait_for(lambda: slot_pids(d, "signaller").get(0), message="signaller")
    wait_for(lambda: d.status("stopper")["state"] == "stopped", 15,
             message="stopper stopped by its limit")
    wait_for(lambda: (metric(d, "gafferd_template_limit_trips_total",
                             name="logger", limit="max_memory") or 0) >= 2, 15,
             message="the logger over its limit twice")
    wait_for(lambda: os.path.exists(str(tmp_path / "signalled")), 15, message="SIGUSR1")
    assert slot_pids(d, "logger").get(0) == logger          # log: left running
    assert slot_pids(d, "signaller").get(0) == signaller    # signal: left running
    assert d.status("stopper")["running"] == 0


def test_max_cpu_over_the_window(tmp_path, gafferd):
    d = gafferd("""
        [process:spin]
        cmd = %s
        args = -c 'while True: pass'
        max_cpu = 5
        limit_for = 1
        limit_action = log
        [process:idle]
        cmd = %s 3600
        max_cpu = 5
        limit_for = 1
        limit_action = log
        """ % (PY, SLEEP))
    events = EventWatcher(d, "limit")
    try:
        trip = events.wait(lambda e: e, 15, message="a max_cpu trip")[0]
        assert trip["name"] == "spin" and trip["limit"] == "max_cpu"
        assert trip["value"] > 5 and trip["max"] == 5 and trip["action"] == "log"
    finally:
        events.close()
    assert metric(d, "gafferd_template_limit_trips_total", name="idle", limit="max_cpu") is None


def test_limit_keys_over_http(tmp_path, gafferd):
    d = gafferd(None)
    definition = {"name": "j", "cmd": "%s 3600" % SLEEP, "max_memory": "1GB", "max_cpu": 80,
                  "limit_for": 5, "limit_action": "signal:HUP"}
    assert d.json("POST", "/processes", definition) == {"ok": True}
    info = d.json("GET", "/processes/j")
    assert {k: info[k] for k in definition} == definition
    r = d.post("/processes", {"name": "bad", "cmd": "%s 1" % SLEEP, "max_memory": "lots",
                              "limit_action": "kill"})
    assert r.status == 400
    assert "max_memory:" in r.json()["message"] and "limit_action:" in r.json()["message"]


@pytest.mark.parametrize("key, value, message", [
    ("max_memory", "lots", "not a size"),
    ("max_memory", "-1", "not a size"),
    ("max_cpu", "-1", "at least 0"),
    ("max_cpu", "1e3", "not a number"),
    ("limit_for", "forever", "not a number"),
    ("limit_for", "604801", "at most 604800"),
    ("limit_action", "kill", "use restart, stop, log or signal:NAME"),
    ("limit_action", "signal", "use restart, stop, log or signal:NAME"),
    ("limit_action", "restart:TERM", "use restart, stop, log or signal:NAME"),
    ("limit_action", "signal:NOPE", "is not a signal"),
])
def test_bad_limit_values_are_config_errors(tmp_path, key, value, message):
    path = write(tmp_path / "check.ini", "[process:app]\ncmd = %s 10\n%s = %s\n"
                 % (SLEEP, key, value))
    r = run_gafferd(["--check", path], cwd=str(tmp_path), timeout=30)
    assert r.returncode == 2, r
    assert "[process:app] %s:" % key in r.stderr and message in r.stderr, r.stderr


# -- the judgement, with a fake clock -----------------------------------------------------------

def limits(max_memory=0, max_cpu=0.0, limit_for=3.0):
    return types.SimpleNamespace(max_memory=max_memory, max_cpu=max_cpu, limit_for=limit_for)


def judge_all(spec, samples):
    """Feed (now, rss, cpu seconds) samples; the trips, as (now, limit, value)."""
    state, trips = [(0.0, 0.0), None, None], []
    for now, rss, cpu in samples:
        trip = gd.ResourceWatch._judge(spec, state, now, rss, cpu)
        if trip:
            trips.append((now,) + trip)
            state[1] = state[2] = None
    return trips


def test_memory_must_stay_over_for_limit_for():
    spec = limits(max_memory=100, limit_for=3.0)
    # over at 1, 2, 3, under at 4 (reset), over from 5: trips at 8, not before
    samples = [(t, 150 if t in (1, 2, 3) or t >= 5 else 50, 0.0) for t in range(1, 10)]
    assert judge_all(spec, samples) == [(8, "max_memory", 150)]
    assert judge_all(limits(max_memory=100, limit_for=0), [(1, 101, 0.0)]) == \
        [(1, "max_memory", 101)]
    assert judge_all(limits(max_memory=100, limit_for=0), [(1, 100, 0.0)]) == []


def test_cpu_is_averaged_over_the_window():
    spec = limits(max_cpu=50.0, limit_for=3.0)
    # 80 % for a second opens the window; 40 % then keeps the average over 50 %
    # until three seconds have passed: (0.8 + 0.4 + 0.4) / 3 = 53 %
    cpu, samples = 0.0, []
    for t, used in ((1, 0.8), (2, 0.4), (3, 0.4)):
        cpu += used
        samples.append((t, 0, cpu))
    assert judge_all(spec, samples) == [(3, "max_cpu", 53.3)]
    # the average falls under the limit: the window closes, nothing trips
    cpu, samples = 0.0, []
    for t, used in ((1, 0.8), (2, 0.1), (3, 0.1), (4, 0.1)):
        cpu += used
        samples.append((t, 0, cpu))
    assert judge_all(spec, samples) == []


# -- no limit, no timer -------------------------------------------------------------------------

def run_until(loop, predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        loop.call_later(0.05, lambda: None)
        loop.run_once()


def test_no_timer_while_no_template_has_a_limit(tmp_path):
    loop = gd.Loop()
    manager = gd.Manager(loop)

    def sampling():
        return [h for h in loop._timers if not h.cancelled and h.callback == manager.limits.sample]
    try:
        manager.add_template(gd.build_spec("free", "%s 60" % SLEEP, {}, base_dir=str(tmp_path)))
        run_until(loop, lambda: len(manager.running) == 1)
        assert not sampling()
        manager.add_template(gd.build_spec("capped", "%s 60" % SLEEP, {"max_memory": "1GB"},
                                           base_dir=str(tmp_path)))
        run_until(loop, lambda: len(manager.running) == 2)
        assert len(sampling()) == 1                     # one timer for every process
        manager.add_template(gd.build_spec("capped2", "%s 60" % SLEEP, {"max_cpu": "90"},
                                           base_dir=str(tmp_path)))
        run_until(loop, lambda: len(manager.running) == 3)
        assert len(sampling()) == 1
    finally:
        for proc in list(manager._by_pid.values()):
            os.killpg(proc.pid, signal.SIGKILL)
            os.waitpid(proc.pid, 0)
    run_until(loop, lambda: manager.limits._timer is None, 5.0)   # the next sample finds none
    assert not sampling()
