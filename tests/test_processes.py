"""Black-box tests of process supervision: real children, checked through /proc.

Each test starts its own ``gafferd.py`` (see conftest.Daemon) and drives it
over HTTP. The child programs are tiny scripts written into ``tmp_path``.
"""
import os
import shutil
import signal
import statistics
import time

import pytest

from conftest import (PY, EventWatcher, children_of, holds_for, live_in_groups,
                      open_fds, pid_alive, proc_cmdline, proc_pgid, proc_status,
                      wait_for, zombie_children)

SLEEP = shutil.which("sleep") or "/bin/sleep"
TRUE = shutil.which("true") or "/bin/true"

# child.py NAME DIR [opts...]
#   appends "NAME PID TIME" to DIR/spawned once its signal handlers are set,
#   then sleeps forever (or exits at once with "exit1").
#   opts: ignore-term, record-signals (each signal number -> DIR/sig-PID),
#         exit1, print (writes markers to stdout and stderr first).
CHILD = r'''
import os, signal, sys, time
name, d = sys.argv[1], sys.argv[2]
opts = sys.argv[3:]
pid = os.getpid()

def rec(fname, text):
    with open(os.path.join(d, fname), "a") as f:
        f.write(text + "\n")

if "ignore-term" in opts:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if "record-signals" in opts:
    def handler(signum, frame):
        rec("sig-%d" % pid, str(signum))
    for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
        signal.signal(s, handler)
if "print" in opts:
    sys.stdout.write("MARKER-STDOUT-%s\n" % name)
    sys.stdout.flush()
    sys.stderr.write("MARKER-STDERR-%s\n" % name)
    sys.stderr.flush()
rec("spawned", "%s %d %.6f" % (name, pid, time.time()))
if "exit1" in opts:
    sys.exit(1)
while True:
    time.sleep(1000)
'''


@pytest.fixture
def child(tmp_path):
    path = tmp_path / "child.py"
    path.write_text(CHILD)
    return str(path)


def section(name, script, tmp_path, *opts, **keys):
    """INI text of a [process:NAME] section running child.py."""
    lines = ["[process:%s]" % name, "cmd = %s" % PY,
             "args = %s %s %s %s" % (script, name, tmp_path, " ".join(opts))]
    for key, value in keys.items():
        lines.append("%s = %s" % (key, value))
    return "\n".join(lines) + "\n\n"


def http_template(name, script, tmp_path, *opts, **settings):
    body = {"name": name, "cmd": PY, "args": [script, name, str(tmp_path)] + list(opts)}
    body.update(settings)
    return body


def spawned(tmp_path, name=None):
    """[(name, os_pid, time)] written by child.py, in file order."""
    try:
        with open(os.path.join(str(tmp_path), "spawned")) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        n, pid, t = line.split()
        if name is None or n == name:
            out.append((n, int(pid), float(t)))
    return out


def os_pids(d, name):
    return [d.os_pid(i) for i in d.pids(name)]


def live_os_pids(d, name):
    """Like os_pids, but skips a process that ends between the two requests."""
    found = []
    for i in d.pids(name):
        r = d.get("/processes/%d" % i)
        if r.status == 200:
            found.append(r.json()["os_pid"])
    return found


def start_time(pid):
    """When ``pid`` was forked, on the CLOCK_BOOTTIME scale, rounded up to a tick."""
    with open("/proc/%d/stat" % pid) as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    return (ticks + 1) / os.sysconf("SC_CLK_TCK")


def environ_of(pid, own=False):
    """The environment of ``pid``; without ``own``, less the GAFFERD_NAME,
    GAFFERD_ID and GAFFERD_SLOT every process gets."""
    env = _environ(pid)
    if not own:
        for key in ("GAFFERD_NAME", "GAFFERD_ID", "GAFFERD_SLOT"):
            env.pop(key, None)
    return env


def _environ(pid):
    with open("/proc/%d/environ" % pid, "rb") as f:
        raw = f.read()
    env = {}
    for item in raw.split(b"\0"):
        if item:
            k, _, v = item.decode().partition("=")
            env[k] = v
    return env


def fd_list(pid):
    return sorted(int(x) for x in os.listdir("/proc/%d/fd" % pid))


def all_dead(pids):
    return not any(pid_alive(p) for p in pids)


# -- start-up order --------------------------------------------------------------

def test_processes_start_in_priority_order(daemon_factory, tmp_path, child):
    config = (section("dflt1", child, tmp_path) +
              section("five", child, tmp_path, priority=5) +
              section("dflt2", child, tmp_path) +
              section("zero", child, tmp_path, priority=0))
    d = daemon_factory(config)
    wait_for(lambda: len(spawned(tmp_path)) == 4, message="4 children")
    order = []
    for name in ("dflt1", "five", "dflt2", "zero"):
        d.wait_running(name, 1)     # a child can record itself before its start is taken in
        (pid,) = d.pids(name)
        order.append((pid, name))
        # the child that recorded itself is the one the daemon reports
        assert d.os_pid(pid) == spawned(tmp_path, name)[0][1]
    # internal ids are handed out in spawn order
    assert [n for _, n in sorted(order)] == ["zero", "five", "dflt1", "dflt2"]
    # templates are added in priority order, so that is the listing order too
    assert d.json("GET", "/processes") == ["zero", "five", "dflt1", "dflt2"]


# -- respawn ----------------------------------------------------------------------

def test_killed_child_is_replaced_within_50ms(daemon_factory, tmp_path, child):
    # killed before startsecs (1 s) would be a failed start with a backoff
    d = daemon_factory(section("k", child, tmp_path, flapping="off", startsecs="0"))
    d.wait_running("k", 1)

    def current(exclude=()):
        for p in children_of(d.pid):
            if p not in exclude and child in proc_cmdline(p):
                return p
        return None

    # Two measures per kill: when we saw the new child in /proc with its
    # cmdline (depends on how fast this test polls), and when the kernel
    # says it was forked (an upper bound, rounded up to a clock tick).
    seen, forked = [], []
    pid = wait_for(current, message="first child")
    for _ in range(7):
        # let the child finish starting so the kill hits a settled process
        wait_for(lambda: len(spawned(tmp_path)) == len(seen) + 1,
                 message="child to be up")
        t0 = time.perf_counter()
        k0 = time.clock_gettime(time.CLOCK_BOOTTIME)
        os.kill(pid, signal.SIGKILL)
        new = wait_for(lambda: current(exclude=(pid,)), 5.0, interval=0.0005,
                       message="replacement child")
        seen.append(time.perf_counter() - t0)
        forked.append(start_time(new) - k0)
        pid = new
    assert statistics.median(forked) < 0.05, (forked, seen)
    assert statistics.median(seen) < 0.5, (forked, seen)
    wait_for(lambda: zombie_children(d.pid) == [], message="no zombies")


# -- flapping -----------------------------------------------------------------------

def test_crash_loop_with_0_4_4_flapping_gives_up_per_process(daemon_factory, tmp_path, child):
    # flapping = attempts, window, retry_in, max_retry maps onto the
    # per-process keys: startsecs = 5 (window), backoff 0.5 flat
    # (retry_in), start_retries = 2 (max_retry): three failed starts, then
    # the process (and with one process, the template) is failed.
    d = daemon_factory(section("crash", child, tmp_path, "exit1",
                               flapping="2, 5., 0.5, 2"))
    wait_for(lambda: d.status("crash")["state"] == "backoff", 10, interval=0.005,
             message="state backoff")
    wait_for(lambda: d.status("crash")["state"] == "failed", 15,
             message="state failed")
    starts = spawned(tmp_path)
    assert len(starts) == 3, starts
    times = [t for _, _, t in starts]
    for before, after in ((0, 1), (1, 2)):  # each failed start waits the backoff
        gap = times[after] - times[before]
        assert 0.45 <= gap < 3.0, times
    st = d.status("crash")
    assert st["running"] == 0 and st["active"] is False
    assert st["processes"][0]["state"] == "failed" and st["restarts"] == 3
    assert st["last_exit"]["exit_status"] == 1
    # a template that gave up stays stopped
    holds_for(lambda: len(spawned(tmp_path)) == 3 and d.status("crash")["state"] == "failed",
              1.0, message="failed template staying stopped")

    # _start runs it again
    assert d.json("POST", "/processes/crash/_start") == {"ok": True}
    wait_for(lambda: len(spawned(tmp_path)) >= 4, message="runs after _start")
    wait_for(lambda: d.status("crash")["state"] == "backoff", 5, interval=0.005,
             message="backoff again")
    # a stop cancels the pending restart
    assert d.json("POST", "/processes/crash/_stop") == {"ok": True}
    count = len(spawned(tmp_path))
    assert d.status("crash")["state"] == "stopped"
    holds_for(lambda: len(spawned(tmp_path)) == count and
              d.status("crash")["state"] == "stopped", 1.0,
              message="stopped template not retried")


def test_flapping_off_keeps_the_backoff(daemon_factory, tmp_path, child):
    # flapping = off no longer means a tight respawn loop: failed starts
    # wait 1, 2, 4... seconds and the process is never given up
    d = daemon_factory(section("loop", child, tmp_path, "exit1", flapping="off"))
    wait_for(lambda: len(spawned(tmp_path)) >= 3, 20, message="3 runs")
    times = [t for _, _, t in spawned(tmp_path)]
    assert 0.9 <= times[1] - times[0] < 1.8, times
    assert 1.9 <= times[2] - times[1] < 3.0, times
    assert d.status("loop")["state"] in ("backoff", "starting")


def test_intentional_stops_do_not_count_as_flapping(daemon_factory, tmp_path, child):
    d = daemon_factory(section("calm", child, tmp_path, flapping="2, 5., 0.5, 2"))
    d.wait_running("calm", 1)
    w = EventWatcher(d)
    try:
        for _ in range(3):  # stop-one, three times within the window
            (pid,) = wait_for(lambda: d.pids("calm"), message="a live process")
            ospid = d.os_pid(pid)
            assert d.json("DELETE", "/processes/%d" % pid) == {"ok": True}
            wait_for(lambda: not pid_alive(ospid), message="stopped process to die")
            wait_for(lambda: (lambda p: len(p) == 1 and p[0] > pid)(d.pids("calm")), 5,
                     message="replacement after stop-one")
        # scale up then down: the reaped exits must not count either
        assert d.json("POST", "/processes/calm/_add/2")["numprocesses"] == 3
        d.wait_running("calm", 3)
        victims = os_pids(d, "calm")[:2]
        assert d.json("POST", "/processes/calm/_sub/2")["numprocesses"] == 1
        wait_for(lambda: all(not os.path.exists("/proc/%d" % p) for p in victims),
                 message="reaped processes gone")
        w.wait(lambda ev: [e["event"] for e in ev].count("exit") == 5, message="5 exits")
        (survivor,) = os_pids(d, "calm")

        def steady():
            # the survivor may still be within its startsecs (5 s): starting
            st = d.status("calm")
            return st["state"] in ("starting", "running") and st["running"] == 1 \
                and st["restarts"] == 0 and pid_alive(survivor)
        holds_for(steady, 0.8, message="template running after intentional stops")
        names = w.names()
        assert "flap" not in names and "stop" not in names, names
    finally:
        w.close()


# -- stopping -----------------------------------------------------------------------

def test_sigterm_ignoring_child_is_killed_after_graceful_timeout(daemon_factory, tmp_path, child):
    d = daemon_factory()
    w = EventWatcher(d)
    try:
        body = http_template("stubborn", child, tmp_path, "ignore-term",
                             graceful_timeout=0.5)
        assert d.json("POST", "/processes", body) == {"ok": True}
        wait_for(lambda: spawned(tmp_path), message="child ready")
        ospid = spawned(tmp_path)[0][1]
        t0 = time.monotonic()
        assert d.json("POST", "/processes/stubborn/_stop") == {"ok": True}
        wait_for(lambda: not pid_alive(ospid), 5, interval=0.005, message="child death")
        elapsed = time.monotonic() - t0
        assert 0.5 <= elapsed < 2.0, elapsed
        events = w.wait(lambda ev: any(e["event"] == "exit" and e.get("os_pid") == ospid
                                       for e in ev), message="exit event")
        (exit_event,) = [e for e in events if e["event"] == "exit"]
        assert exit_event["term_signal"] == 9
        assert exit_event["exit_status"] == 0
        assert exit_event["name"] == "stubborn"
    finally:
        w.close()


def test_shell_wrapper_grandchildren_die_with_it(daemon_factory, tmp_path):
    d = daemon_factory("""
        [process:wrap]
        cmd = sleep 1000 & sleep 1001; wait
        shell = true
        graceful_timeout = 5
        flapping = off
        """)
    d.wait_running("wrap", 1)
    (pid,) = d.pids("wrap")
    shell = d.os_pid(pid)
    assert proc_pgid(shell) == shell  # leader of its own process group
    members = wait_for(lambda: (lambda m: m if len(m) == 3 else None)(live_in_groups([shell])),
                       message="shell and its two sleeps")
    grandchildren = [p for p in members if p != shell]
    assert all("sleep" in proc_cmdline(p)[0] for p in grandchildren)
    assert d.json("POST", "/processes/wrap/_stop") == {"ok": True}
    # well before graceful_timeout: SIGTERM went to the whole group
    wait_for(lambda: not live_in_groups([shell]), 3.0, message="process group to die")
    wait_for(lambda: zombie_children(d.pid) == [], message="no zombies")


GRANDCHILD = r'''
import os, signal, sys, time
d = sys.argv[1]
slow = "slow" in sys.argv[2:]

def mark(what):
    with open(os.path.join(d, "%s-%d" % (what, os.getpid())), "w") as f:
        f.write(what)

def on_term(signum, frame):
    mark("term")
    if slow:  # a graceful shutdown that takes a moment
        time.sleep(0.3)
        mark("done")
    sys.exit(0)

signal.signal(signal.SIGTERM, on_term)
mark("gc")
while True:
    time.sleep(1000)
'''


def _grandchildren(tmp_path):
    return sorted(int(f[3:]) for f in os.listdir(str(tmp_path)) if f.startswith("gc-"))


def _marks(tmp_path, what, pids):
    return all((tmp_path / ("%s-%d" % (what, p))).exists() for p in pids)


def test_stop_sends_sigterm_to_the_whole_process_group(daemon_factory, tmp_path):
    # the shell ignores SIGTERM, so only a signal to the group reaches its children
    gc = tmp_path / "gc.py"
    gc.write_text(GRANDCHILD)
    d = daemon_factory("""
        [process:wrap]
        cmd = trap '' TERM; %s %s %s & %s %s %s; wait
        shell = true
        graceful_timeout = 5
        """ % (PY, gc, tmp_path, PY, gc, tmp_path))
    grandchildren = wait_for(lambda: len(_grandchildren(tmp_path)) == 2 and _grandchildren(tmp_path),
                             message="grandchildren")
    (shell,) = os_pids(d, "wrap")
    assert d.json("POST", "/processes/wrap/_stop") == {"ok": True}
    wait_for(lambda: _marks(tmp_path, "term", grandchildren), 3.0,
             message="both grandchildren to get SIGTERM")
    wait_for(lambda: all_dead(grandchildren + [shell]), 3.0, message="the group to end")


def test_grandchildren_get_the_graceful_timeout_too(daemon_factory, tmp_path):
    # the shell dies at once on SIGTERM; its children still get graceful_timeout
    gc = tmp_path / "gc.py"
    gc.write_text(GRANDCHILD)
    d = daemon_factory("""
        [process:wrap]
        cmd = %s %s %s slow & %s %s %s slow; wait
        shell = true
        graceful_timeout = 5
        """ % (PY, gc, tmp_path, PY, gc, tmp_path))
    grandchildren = wait_for(lambda: len(_grandchildren(tmp_path)) == 2 and _grandchildren(tmp_path),
                             message="grandchildren")
    assert d.json("POST", "/processes/wrap/_stop") == {"ok": True}
    wait_for(lambda: all_dead(grandchildren), 4.0, message="grandchildren to end")
    assert _marks(tmp_path, "done", grandchildren), \
        "a grandchild was killed before finishing its SIGTERM handler (0.3 s < graceful_timeout 5 s)"


def test_sigterm_to_daemon_leaves_nothing_behind(daemon_factory, tmp_path, child):
    config = (section("many", child, tmp_path, numprocesses=2) +
              section("det", child, tmp_path, detach="true") +
              section("stubborn", child, tmp_path, "ignore-term", graceful_timeout="0.5") +
              "[process:wrap]\ncmd = sleep 1000 & sleep 1001; wait\nshell = true\n")
    d = daemon_factory(config)
    wait_for(lambda: len(spawned(tmp_path)) == 4, message="python children ready")
    for name, count in (("many", 2), ("det", 1), ("stubborn", 1), ("wrap", 1)):
        d.wait_running(name, count)
    leaders = []
    for name in ("many", "det", "stubborn", "wrap"):
        leaders += os_pids(d, name)
    assert len(leaders) == 5
    for p in leaders:
        assert proc_pgid(p) == p, "child %d is not a process-group leader" % p
    wait_for(lambda: len(live_in_groups(leaders)) >= 7, message="shell grandchildren")
    everything = set(live_in_groups(leaders)) | set(children_of(d.pid))
    assert set(leaders) <= set(children_of(d.pid))
    t0 = time.monotonic()
    assert d.stop(signal.SIGTERM) == 0
    assert time.monotonic() - t0 < 8.0
    wait_for(lambda: all_dead(everything) and not live_in_groups(leaders), 3.0,
             message="every process of the daemon to be gone")


# -- many cycles --------------------------------------------------------------------

def test_10000_spawn_exit_cycles_leak_no_fd_and_no_zombie(daemon_factory, tmp_path):
    d = daemon_factory("""
        [process:blink]
        cmd = %s
        numprocesses = 20
        startsecs = 0
        start = false
        """ % TRUE)

    def highest_id():
        # internal ids are 1, 2, ... so the spawn count is the highest id so
        # far (the processes live ~1 ms; a poll of the running ones may find none)
        for line in d.get("/metrics").body.decode().splitlines():
            if line.startswith("gafferd_spawns_total "):
                return int(line.split()[1])
        return 0

    def run_until(target, timeout):
        assert d.json("POST", "/processes/blink/_start") == {"ok": True}
        wait_for(lambda: highest_id() >= target, timeout, interval=0.05,
                 message="internal id %d" % target)
        assert d.json("POST", "/processes/blink/_stop") == {"ok": True}
        wait_for(lambda: d.status("blink")["running"] == 0 and not children_of(d.pid)
                 and not zombie_children(d.pid), message="all children gone")

    # The deadlines bound a hang, not the speed: ~12 s on 3.11, more on 3.8,
    # and 80 s was not enough with both cores taken by other work.
    run_until(200, 60)  # warm up: anything opened once and kept is not a leak
    baseline = open_fds(d.pid)
    run_until(10200, 300)
    wait_for(lambda: open_fds(d.pid) <= baseline, 5,
             message="fd count back to %d (now %d)" % (baseline, open_fds(d.pid)))
    assert zombie_children(d.pid) == []
    assert d.get("/ping").status == 200


# -- lifecycle -------------------------------------------------------------------------

def test_start_after_stop(daemon_factory, tmp_path, child):
    d = daemon_factory(section("s", child, tmp_path))
    d.wait_running("s", 1)
    (old,) = os_pids(d, "s")
    assert d.json("POST", "/processes/s/_stop") == {"ok": True}
    wait_for(lambda: not pid_alive(old), message="stopped")
    assert d.status("s")["running"] == 0
    assert d.status("s")["state"] == "stopped"
    assert d.json("POST", "/processes/s/_start") == {"ok": True}
    d.wait_running("s", 1)
    (new,) = os_pids(d, "s")
    assert new != old and pid_alive(new)
    wait_for(lambda: d.status("s")["state"] == "running", message="ready after startsecs")


def test_restart_spawns_new_processes_and_reaps_old(daemon_factory, tmp_path, child):
    d = daemon_factory(section("r", child, tmp_path, numprocesses=2))
    d.wait_running("r", 2)
    old_ids = d.pids("r")
    old_os = os_pids(d, "r")
    assert d.json("POST", "/processes/r/_restart") == {"ok": True}
    wait_for(lambda: all_dead(old_os), message="old processes to die")
    wait_for(lambda: len(d.pids("r")) == 2, message="two new processes")
    new_ids = d.pids("r")
    assert min(new_ids) > max(old_ids)
    new_os = os_pids(d, "r")
    assert not set(new_os) & set(old_os)
    assert all(pid_alive(p) for p in new_os)
    wait_for(lambda: zombie_children(d.pid) == [], message="old ones reaped")
    # restart of a stopped template: it runs again, and a later stop works
    assert d.json("POST", "/processes/r/_stop") == {"ok": True}
    wait_for(lambda: all_dead(new_os), message="stop")
    assert d.json("POST", "/processes/r/_restart") == {"ok": True}
    d.wait_running("r", 2)
    again = os_pids(d, "r")
    assert d.json("POST", "/processes/r/_stop") == {"ok": True}
    wait_for(lambda: all_dead(again), message="stop after restart of a stopped template")
    assert d.status("r")["running"] == 0


@pytest.mark.parametrize("method", ["PUT", "POST"])
def test_update_replaces_the_definition(daemon_factory, tmp_path, child, method):
    d = daemon_factory()
    assert d.json("POST", "/processes", http_template("up", child, tmp_path, "one")) == {"ok": True}
    d.wait_running("up", 1)
    (old,) = os_pids(d, "up")
    assert proc_cmdline(old)[-1] == "one"
    new_def = http_template("up", child, tmp_path, "two", numprocesses=2)
    del new_def["name"]
    assert d.json(method, "/processes/up", new_def) == {"ok": True}
    wait_for(lambda: not pid_alive(old), message="old process to stop")
    d.wait_running("up", 2)
    new = wait_for(lambda: (lambda p: len(p) == 2 and old not in p and p)(os_pids(d, "up")),
                   message="two new processes")
    for p in new:
        assert proc_cmdline(p)[-1] == "two"
    info = d.json("GET", "/processes/up")
    assert info["args"][-1] == "two" and info["numprocesses"] == 2
    assert d.status("up")["max_processes"] == 2
    if method == "PUT":
        r = d.request(method, "/processes/nosuch", body={"cmd": PY})
        assert r.status == 404 and r.json()["error"] == "not_found"
    r = d.request(method, "/processes/up", body={"args": []})
    assert r.status == 400 and r.json()["error"] == "invalid_process_info"


def test_add_sub_and_clamp_at_zero(daemon_factory, tmp_path, child):
    d = daemon_factory(section("n", child, tmp_path))
    d.wait_running("n", 1)
    assert d.json("POST", "/processes/n/_add") == {"ok": True, "numprocesses": 2}
    assert d.json("POST", "/processes/n/_add/3") == {"ok": True, "numprocesses": 5}
    d.wait_running("n", 5)
    ids = d.pids("n")
    assert d.json("POST", "/processes/n/_sub/2") == {"ok": True, "numprocesses": 3}
    wait_for(lambda: d.pids("n") == ids[2:], message="the two oldest reaped")
    r = d.post("/processes/n/_sub/10")
    if r.status == 200:
        assert r.json() == {"ok": True, "numprocesses": 0}
        assert d.status("n")["max_processes"] == 0
        d.wait_running("n", 0)
        assert d.json("POST", "/processes/n/_sub") == {"ok": True, "numprocesses": 0}
        assert d.json("POST", "/processes/n/_add") == {"ok": True, "numprocesses": 1}
        d.wait_running("n", 1)
    else:
        assert r.status == 400, r
        assert d.status("n")["max_processes"] == 3
    assert d.status("n")["max_processes"] >= 0
    r = d.post("/processes/n/_add/x")
    assert r.status == 400 and r.json()["error"] == "bad_value"


def test_stop_one_gets_a_replacement_with_a_new_id(daemon_factory, tmp_path, child):
    d = daemon_factory(section("one", child, tmp_path, numprocesses=2))
    d.wait_running("one", 2)
    a, b = d.pids("one")
    a_os = d.os_pid(a)
    assert d.json("DELETE", "/processes/%d" % a) == {"ok": True}
    wait_for(lambda: not pid_alive(a_os), message="stopped process")
    wait_for(lambda: (lambda p: len(p) == 2 and p[0] == b)(d.pids("one")), message="replacement")
    c = d.pids("one")[1]
    assert c > b
    assert d.request("HEAD", "/processes/%d" % a).status == 404
    assert d.request("DELETE", "/processes/%d" % a).status == 404
    b_os = d.os_pid(b)
    assert d.json("POST", "/processes/%d/_stop" % b) == {"ok": True}
    wait_for(lambda: not pid_alive(b_os), message="second stopped process")
    wait_for(lambda: (lambda p: len(p) == 2 and p[0] == c)(d.pids("one")), message="replacement")
    assert d.pids("one")[1] > c
    assert d.status("one")["max_processes"] == 2
    r = d.post("/processes/%d/_stop" % a)
    assert r.status == 404


def test_signals_to_template_and_to_one_id(daemon_factory, tmp_path, child):
    d = daemon_factory(section("sig", child, tmp_path, "record-signals", numprocesses=2))
    wait_for(lambda: len(spawned(tmp_path)) == 2, message="handlers installed")
    d.wait_running("sig", 2)
    first, second = d.pids("sig")
    p1, p2 = d.os_pid(first), d.os_pid(second)

    def got(pid):
        try:
            with open(os.path.join(str(tmp_path), "sig-%d" % pid)) as f:
                return f.read().split()
        except FileNotFoundError:
            return []

    assert d.json("POST", "/processes/sig/_signal/%d" % signal.SIGUSR1) == {"ok": True}
    wait_for(lambda: got(p1) == [str(int(signal.SIGUSR1))] and
             got(p2) == [str(int(signal.SIGUSR1))], message="SIGUSR1 to both")
    assert d.json("POST", "/processes/%d/_signal/%d" % (second, signal.SIGUSR2)) == {"ok": True}
    wait_for(lambda: str(int(signal.SIGUSR2)) in got(p2), message="SIGUSR2 to one")
    assert got(p1) == [str(int(signal.SIGUSR1))]
    r = d.post("/processes/sig/_signal")
    assert r.status == 400 and r.json()["error"] == "no_signal_number"
    r = d.post("/processes/sig/_signal/x")
    assert r.status == 400 and r.json()["error"] == "bad_value"
    r = d.post("/processes/%d/_signal/x" % first)
    assert r.status == 400 and r.json()["error"] == "bad_value"
    assert pid_alive(p1) and pid_alive(p2)


def test_groups(daemon_factory, tmp_path, child):
    config = (section("zz:a", child, tmp_path) + section("zz:b", child, tmp_path) +
              section("aa:c", child, tmp_path) + section("solo", child, tmp_path))
    d = daemon_factory(config)
    for name in ("zz:a", "zz:b", "aa:c", "solo"):
        d.wait_running(name, 1)
    assert d.json("GET", "/groups") == ["zz", "aa"]
    assert d.json("GET", "/groups/zz") == ["zz:a", "zz:b"]
    assert d.json("GET", "/processes/zz:a")["group"] == "zz"
    other = os_pids(d, "aa:c")

    zz_os = os_pids(d, "zz:a") + os_pids(d, "zz:b")
    assert d.json("POST", "/groups/zz/_stop") == {"ok": True}
    wait_for(lambda: all_dead(zz_os), message="group stop")
    assert d.status("zz:a")["running"] == 0 and d.status("zz:b")["running"] == 0
    assert d.json("POST", "/groups/zz/_start") == {"ok": True}
    d.wait_running("zz:a", 1)
    d.wait_running("zz:b", 1)
    ids = d.pids("zz:a") + d.pids("zz:b")
    zz_os = os_pids(d, "zz:a") + os_pids(d, "zz:b")
    assert d.json("POST", "/groups/zz/_restart") == {"ok": True}
    wait_for(lambda: all_dead(zz_os), message="group restart reaps the old")
    wait_for(lambda: (lambda p: len(p) == 2 and min(p) > max(ids))(
             d.pids("zz:a") + d.pids("zz:b")), message="new ones")
    assert min(d.pids("zz:a") + d.pids("zz:b")) > max(ids)

    r = d.post("/groups/zz/_bogus")
    assert r.status == 404 and r.json()["error"] == "resource_not_found"
    r = d.post("/groups/nope/_start")
    assert r.status == 404 and r.json()["error"] == "not_found"

    zz_os = os_pids(d, "zz:a") + os_pids(d, "zz:b")
    assert d.json("DELETE", "/groups/zz") == {"ok": True}
    wait_for(lambda: all_dead(zz_os), message="group delete stops the members")
    assert d.request("GET", "/processes/zz:a").status == 404
    assert d.request("GET", "/processes/zz:b").status == 404
    assert d.json("GET", "/groups") == ["aa"]
    assert d.json("GET", "/processes") == ["aa:c", "solo"]
    assert os_pids(d, "aa:c") == other and pid_alive(other[0])


# -- spawn details ------------------------------------------------------------------

def test_env_and_os_env(daemon_factory, tmp_path, child):
    config = section("e", child, tmp_path) + "[env:e]\nfoo = explicit\n"
    d = daemon_factory(config, env={"FOO": "daemon", "BAR": "fromdaemon"})
    d.wait_running("e", 1)
    env = environ_of(os_pids(d, "e")[0])
    assert env["FOO"] == "explicit"          # explicit env wins
    assert env["BAR"] == "fromdaemon"        # os_env defaults to true
    assert d.json("GET", "/processes/e")["env"] == {"FOO": "explicit"}  # stored, unmerged

    body = http_template("only", child, tmp_path, os_env=False, env={"ONLY": "1", "NUM": 5})
    assert d.json("POST", "/processes", body) == {"ok": True}
    d.wait_running("only", 1)
    assert environ_of(os_pids(d, "only")[0]) == {"ONLY": "1", "NUM": "5"}

    body = http_template("empty", child, tmp_path, os_env=False)
    assert d.json("POST", "/processes", body) == {"ok": True}
    d.wait_running("empty", 1)
    assert environ_of(os_pids(d, "empty")[0]) == {}


def test_var_substitution_and_args_forms(daemon_factory, tmp_path, child):
    config = ("[process:v]\ncmd = %s\nargs = %s v %s $PORT ${PORT}x $$lit\n\n"
              % (PY, child, tmp_path) +
              "[env:v]\nport = 8080\n\n" +
        "[process:split]\ncmd = %s %s split %s x y\n" % (PY, child, tmp_path))
    d = daemon_factory(config)
    d.wait_running("v", 1)
    want = [PY, child, "v", str(tmp_path), "8080", "8080x", "$lit"]
    wait_for(lambda: proc_cmdline(os_pids(d, "v")[0]) == want, message="argv of v")
    d.wait_running("split", 1)
    want = [PY, child, "split", str(tmp_path), "x", "y"]
    wait_for(lambda: proc_cmdline(os_pids(d, "split")[0]) == want, message="argv of split")

    body = {"name": "aslist", "cmd": PY, "args": [child, "aslist", str(tmp_path), "a b", 7]}
    assert d.json("POST", "/processes", body) == {"ok": True}
    d.wait_running("aslist", 1)
    want = [child, "aslist", str(tmp_path), "a b", "7"]
    wait_for(lambda: proc_cmdline(os_pids(d, "aslist")[0])[1:] == want, message="argv of aslist")

    body = {"name": "asstr", "cmd": PY, "args": "%s asstr %s 'a b' c" % (child, tmp_path)}
    assert d.json("POST", "/processes", body) == {"ok": True}
    d.wait_running("asstr", 1)
    want = [child, "asstr", str(tmp_path), "a b", "c"]
    wait_for(lambda: proc_cmdline(os_pids(d, "asstr")[0])[1:] == want, message="argv of asstr")


def test_shell_runs_the_whole_multi_word_command(daemon_factory, tmp_path):
    out = tmp_path / "shell-out.txt"
    d = daemon_factory("""
        [process:sh]
        cmd = echo one two > %s; exec sleep 1000
        shell = true
        """ % out)
    d.wait_running("sh", 1)
    wait_for(lambda: out.exists() and out.read_text() == "one two\n", message="shell output")


def test_cwd(daemon_factory, tmp_path, child):
    conf = tmp_path / "conf"
    (conf / "work").mkdir(parents=True)
    config = (section("rel", child, tmp_path, cwd="work") +
              section("dflt", child, tmp_path) +
              section("root", child, tmp_path, cwd="/"))
    d = daemon_factory(config, config_name="conf/gaffer.ini")
    for name, where in (("rel", conf / "work"), ("dflt", conf), ("root", "/")):
        d.wait_running(name, 1)
        assert os.readlink("/proc/%d/cwd" % os_pids(d, name)[0]) == str(where), name
    assert d.json("POST", "/processes", http_template("web", child, tmp_path)) == {"ok": True}
    d.wait_running("web", 1)
    assert os.readlink("/proc/%d/cwd" % os_pids(d, "web")[0]) == str(tmp_path)


def test_uid_and_gid(daemon_factory, tmp_path):
    assert os.geteuid() == 0, "this test needs root"
    d = daemon_factory("""
        [process:names]
        cmd = %s 1000
        uid = nobody
        gid = nogroup
        cwd = /

        [process:digits]
        cmd = %s 1001
        uid = 65534
        gid = 65534
        cwd = /
        """ % (SLEEP, SLEEP))
    for name in ("names", "digits"):
        d.wait_running(name, 1)
        st = proc_status(os_pids(d, name)[0])
        assert st["Uid"].split() == ["65534"] * 4, (name, st["Uid"])
        assert st["Gid"].split() == ["65534"] * 4, (name, st["Gid"])
        assert "0" not in st.get("Groups", "").split(), (name, st.get("Groups"))
    body = {"name": "json", "cmd": SLEEP, "args": ["1002"], "uid": 65534, "gid": "nogroup",
            "cwd": "/"}
    assert d.json("POST", "/processes", body) == {"ok": True}
    d.wait_running("json", 1)
    assert proc_status(os_pids(d, "json")[0])["Uid"].split() == ["65534"] * 4


def test_uid_change_sets_the_users_home_user_logname_and_shell(daemon_factory, tmp_path):
    """A uid change gives the child that user's HOME, USER, LOGNAME and
    SHELL (as su - does), with or without os_env; the template's own env
    wins over them; without a uid the daemon's values pass through."""
    import pwd
    assert os.geteuid() == 0, "this test needs root"
    nobody = pwd.getpwnam("nobody")
    user_env = {"HOME": nobody.pw_dir, "USER": "nobody", "LOGNAME": "nobody",
                "SHELL": nobody.pw_shell or "/bin/sh"}
    config = ("[process:dropped]\ncmd = %s 1000\nuid = nobody\ncwd = /\n\n"
              "[process:explicit]\ncmd = %s 1001\nuid = nobody\ncwd = /\n\n"
              "[env:explicit]\nhome = /srv/app\nshell = /bin/false\n\n"
              "[process:bare]\ncmd = %s 1002\nuid = 65534\nos_env = false\ncwd = /\n\n"
              "[process:same]\ncmd = %s 1003\n\n" % (SLEEP, SLEEP, SLEEP, SLEEP))
    d = daemon_factory(config, env={"HOME": "/root", "USER": "root", "LOGNAME": "root",
                                    "SHELL": "/bin/bash", "KEEP": "1"})
    for name in ("dropped", "explicit", "bare", "same"):
        d.wait_running(name, 1)
    env = environ_of(os_pids(d, "dropped")[0])
    assert {k: env[k] for k in user_env} == user_env
    assert env["KEEP"] == "1"
    env = environ_of(os_pids(d, "explicit")[0])
    assert {k: env[k] for k in user_env} == dict(user_env, HOME="/srv/app", SHELL="/bin/false")
    assert environ_of(os_pids(d, "bare")[0]) == user_env
    env = environ_of(os_pids(d, "same")[0])
    assert (env["HOME"], env["USER"], env["SHELL"]) == ("/root", "root", "/bin/bash")


def test_detach_is_still_supervised(daemon_factory, tmp_path, child):
    d = daemon_factory()
    w = EventWatcher(d)
    try:
        assert d.json("POST", "/processes",
                      http_template("dt", child, tmp_path, detach=True)) == {"ok": True}
        events = w.wait(lambda ev: any(e["event"] == "spawn" for e in ev), message="spawn")
        (spawn,) = [e for e in events if e["event"] == "spawn"]
        assert spawn["detached"] is True
        ospid = spawn["os_pid"]
        with open("/proc/%d/stat" % ospid) as f:
            session = int(f.read().rsplit(")", 1)[1].split()[3])
        assert session == ospid
        os.kill(ospid, signal.SIGKILL)
        wait_for(lambda: live_os_pids(d, "dt") not in ([], [ospid]),
                 message="detached process respawned")
        new = os_pids(d, "dt")[0]
        assert d.json("POST", "/processes/dt/_stop") == {"ok": True}
        wait_for(lambda: not pid_alive(new), message="detached process stopped")
    finally:
        w.close()


def test_output_not_redirected_is_thrown_away(daemon_factory, tmp_path, child):
    d = daemon_factory(section("quiet", child, tmp_path, "print"))
    wait_for(lambda: spawned(tmp_path), message="child printed")
    ospid = spawned(tmp_path)[0][1]
    for fd in (0, 1, 2):
        assert os.readlink("/proc/%d/fd/%d" % (ospid, fd)) == "/dev/null"
    assert "MARKER" not in d.output()
    assert "MARKER" not in d.log()


def test_child_has_only_its_own_fds_and_default_signals(daemon_factory, tmp_path):
    d = daemon_factory("""
        [process:plain]
        cmd = %s 1000

        [process:piped]
        cmd = %s 1001
        redirect_output = out, err
        redirect_input = true
        """ % (SLEEP, SLEEP))
    assert open_fds(d.pid) > 3  # the daemon itself holds more than 0,1,2
    for name in ("plain", "piped"):
        d.wait_running(name, 1)
        ospid = os_pids(d, name)[0]
        assert fd_list(ospid) == [0, 1, 2], name
        st = proc_status(ospid)
        assert int(st["SigIgn"], 16) == 0, (name, st["SigIgn"])
        assert int(st["SigBlk"], 16) == 0, (name, st["SigBlk"])
    body = {"name": "custom", "cmd": SLEEP, "args": ["1002"], "custom_streams": ["ctrl"]}
    assert d.json("POST", "/processes", body) == {"ok": True}
    d.wait_running("custom", 1)
    assert fd_list(os_pids(d, "custom")[0]) == [0, 1, 2, 3]


# -- spawn failures --------------------------------------------------------------------

def test_bad_http_templates_are_refused_and_not_registered(daemon_factory, tmp_path, child):
    d = daemon_factory(section("steady", child, tmp_path))
    d.wait_running("steady", 1)
    (steady,) = os_pids(d, "steady")
    bad = [
        {"name": "b1", "cmd": str(tmp_path / "does-not-exist")},
        {"name": "b2", "cmd": "no-such-command-gafferd-test"},
        {"name": "b3", "cmd": PY, "args": ["-c", "pass", "$NO_SUCH_VARIABLE_XYZ"]},
        {"name": "b4", "cmd": SLEEP, "args": ["1"], "uid": "no-such-user-xyz"},
        {"name": "b5", "cmd": SLEEP, "args": ["1"], "gid": "no-such-group-xyz"},
        {"name": "b6", "cmd": SLEEP, "args": ["1"], "cwd": str(tmp_path / "no-such-dir")},
    ]
    for body in bad:
        r = d.post("/processes", body=body)
        assert r.status == 400, (body, r)
        assert r.json()["error"] == "invalid_process_info", (body, r)
        assert d.request("HEAD", "/processes/" + body["name"]).status == 404
    assert d.json("GET", "/processes") == ["steady"]
    assert d.proc.poll() is None
    assert os_pids(d, "steady") == [steady] and pid_alive(steady)


def _fragile_daemon(daemon_factory, tmp_path, child):
    prog = tmp_path / "prog.sh"
    prog.write_text("#!/bin/sh\nexec %s 1000\n" % SLEEP)
    prog.chmod(0o755)
    config = (section("steady", child, tmp_path) +
              "[process:fragile]\ncmd = %s\nflapping = 2, 5., 0.3, 1\n" % prog)
    d = daemon_factory(config)
    d.wait_running("steady", 1)
    d.wait_running("fragile", 1)
    (fragile,) = os_pids(d, "fragile")
    wait_for(lambda: proc_cmdline(fragile)[:1] == [SLEEP], message="prog.sh to exec sleep")
    # the program disappears, then its process dies: the respawn cannot exec
    prog.unlink()
    os.kill(fragile, signal.SIGKILL)
    wait_for(lambda: not os.path.exists("/proc/%d" % fragile), message="killed child reaped")
    return d, prog


def test_exec_failure_at_run_time_does_not_hurt_the_daemon(daemon_factory, tmp_path, child):
    d, prog = _fragile_daemon(daemon_factory, tmp_path, child)
    (steady,) = os_pids(d, "steady")

    def fine():
        return (d.proc.poll() is None and d.get("/ping").status == 200 and
                os_pids(d, "steady") == [steady] and pid_alive(steady) and
                d.status("fragile")["running"] == 0 and not zombie_children(d.pid))
    holds_for(fine, 1.0, message="daemon and the other template unharmed")
    # once the program is back, a start runs it again
    prog.write_text("#!/bin/sh\nexec %s 1000\n" % SLEEP)
    prog.chmod(0o755)
    assert d.json("POST", "/processes/fragile/_start") == {"ok": True}
    d.wait_running("fragile", 1)
    (again,) = os_pids(d, "fragile")
    wait_for(lambda: proc_cmdline(again)[:1] == [SLEEP], message="the program to run again")
    assert os_pids(d, "steady") == [steady]


def test_exec_failure_goes_through_flapping_and_gives_up(daemon_factory, tmp_path, child):
    # A failed exec is an exit with status 127: respawn and flapping apply
    # as usual, so with max_retry = 1 the template ends up "failed".
    d, prog = _fragile_daemon(daemon_factory, tmp_path, child)
    wait_for(lambda: d.status("fragile")["state"] == "failed", 8,
             message="failing template to reach state 'failed'")
    assert d.status("fragile")["running"] == 0
