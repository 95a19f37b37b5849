"""The process lifecycle end to end (§8 with the table of §4): the real
``python gafferd.py`` with real children.  Per-process restart policy,
crash lines in the log, the lifecycle keys of /status, /metrics, the
GAFFERD_* environment, ``critical``."""
from __future__ import annotations

import os
import re
import signal
import time

from conftest import PY, EventWatcher, holds_for, pid_alive, section, wait_for

SLEEPER = "import time\ntime.sleep(1000)\n"
CRASHER = "import os, sys, time\ntime.sleep(float(sys.argv[1]))\nsys.exit(int(sys.argv[2]))\n"


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def os_pids(d, name):
    """The OS pids of a template's live processes, read in one request (a
    process listed by one request may be gone by the next)."""
    return [p["os_pid"] for p in d.status(name)["processes"] if p["os_pid"]]


def test_two_crashes_of_twenty_workers_never_stop_the_other_eighteen(daemon_factory, tmp_path):
    prog = write(tmp_path, "w.py", SLEEPER)
    d = daemon_factory(section("web", PY, prog, numprocesses=20, startsecs="0.2"))
    wait_for(lambda: d.status("web")["ready"] == 20, 20, message="20 ready")
    before = os_pids(d, "web")
    victims, others = before[:2], before[2:]
    for pid in victims:
        os.kill(pid, signal.SIGKILL)

    def replaced():
        st = d.status("web")
        return st["running"] == 20 and not set(victims) & set(os_pids(d, "web"))
    wait_for(replaced, 5, interval=0.005, message="two replacements")
    # the eighteen never stopped, and never left state running
    assert all(pid_alive(p) for p in others)
    assert set(others) <= set(os_pids(d, "web"))
    st = d.status("web")
    assert st["restarts"] == 2 and st["last_exit"]["term_signal"] == signal.SIGKILL
    states = {p["slot"]: p for p in st["processes"]}
    assert sorted(states) == list(range(20))
    assert sum(p["restarts"] for p in st["processes"]) == 2
    wait_for(lambda: d.status("web")["state"] == "running", message="running again")


def test_crash_lines_say_what_died_how_and_what_happens_next(daemon_factory, tmp_path):
    prog = write(tmp_path, "c.py", CRASHER)
    seg = write(tmp_path, "s.py", "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    d = daemon_factory(section("three", PY, prog + " 0.5 3", startsecs="0.2") +
                       section("quick", PY, prog + " 0 3", start_retries="1",
                               backoff="0.2") +
                       section("seg", PY, seg, startsecs="0", restart_delay="2") +
                       section("ok", PY, prog + " 0 0", restart="on-failure"))
    wait_for(lambda: "gave up after 2 failed starts" in d.log(), 10, message="give-up line")
    wait_for(lambda: re.search(r"seg\[\d+\] \(pid \d+, slot 0\) killed by SIGSEGV.* "
                               r"restarting in 2\.0s", d.log()), message="SIGSEGV line")
    wait_for(lambda: "three[" in d.log(), message="the line of 'three'")
    wait_for(lambda: "ok[" in d.log(), message="the line of 'ok'")
    log = d.log()
    assert re.search(r"WARNING.*three\[\d+\] \(pid \d+, slot 0\) exit status 3 after 0\.\ds up; "
                     r"restarting in 0\.0s", log), log
    assert re.search(r"WARNING.*quick\[\d+\] .*exit status 3 .*failed start 1, "
                     r"restarting in 0\.2s", log), log
    assert re.search(r"INFO.*ok\[\d+\] .*exit status 0 .*not restarted \(restart = "
                     r"on-failure\)", log), log
    assert d.status("quick")["state"] == "failed"
    assert d.status("ok")["state"] == "completed"
    st = d.status("seg")
    assert st["last_exit"]["term_signal"] == signal.SIGSEGV and st["last_exit"]["exit_status"] == 0
    assert st["last_exit"]["uptime"] < 2 and abs(st["last_exit"]["time"] - time.time()) < 30


def test_a_storm_of_exits_is_summarized_once_a_second(daemon_factory, tmp_path):
    d = daemon_factory(section("storm", "/bin/true", numprocesses=30, startsecs="0"))
    wait_for(lambda: re.search(r"storm: \d+ more exits in the last second", d.log()), 10,
             message="a summary line")
    d.json("POST", "/processes/storm/_stop")
    lines = [l for l in d.log().splitlines() if "storm[" in l]
    summaries = re.findall(r"storm: (\d+) more exits", d.log())
    assert sum(map(int, summaries)) > 0
    # at most STORM_LINES (10) single lines per second of the storm
    assert len(lines) <= 10 * (len(summaries) + 2), len(lines)


def test_each_process_knows_its_name_id_and_slot_and_a_replacement_keeps_the_slot(
        daemon_factory, tmp_path):
    prog = write(tmp_path, "w.py", SLEEPER)
    d = daemon_factory(section("env", PY, prog, numprocesses=3, startsecs="0"))
    d.wait_running("env", 3)

    def environ(pid):
        with open("/proc/%d/environ" % pid, "rb") as f:
            items = [i.decode().partition("=") for i in f.read().split(b"\0") if i]
        return {k: v for k, _, v in items if k.startswith("GAFFERD_")}
    ids = d.pids("env")
    slots = {}
    for i in ids:
        env = environ(d.os_pid(i))
        assert env["GAFFERD_NAME"] == "env" and env["GAFFERD_ID"] == str(i)
        slots[i] = env["GAFFERD_SLOT"]
    assert sorted(slots.values()) == ["0", "1", "2"]
    victim = ids[1]
    os.kill(d.os_pid(victim), signal.SIGKILL)
    seen = []                     # one listing per probe: both tests on the same one
    wait_for(lambda: seen.append(d.pids("env")) or
             (len(seen[-1]) == 3 and victim not in seen[-1]), message="replacement")
    (new,) = set(seen[-1]) - set(ids)
    assert environ(d.os_pid(new))["GAFFERD_SLOT"] == slots[victim]


def test_metrics_show_restarts_exits_by_reason_ready_and_state(daemon_factory, tmp_path):
    prog = write(tmp_path, "c.py", CRASHER)
    d = daemon_factory(section("m", PY, prog + " 0 2", start_retries="0"))
    wait_for(lambda: d.status("m")["state"] == "failed", message="failed")
    text = d.get("/metrics").body.decode()
    assert 'gafferd_template_exits_total{name="m",reason="gave_up"} 1' in text
    assert 'gafferd_template_restarts_total{name="m"} 1' in text
    assert 'gafferd_template_ready{name="m"} 0' in text
    assert 'gafferd_template_state{name="m",state="failed"} 1' in text


def test_a_critical_template_that_fails_stops_gafferd_with_status_1(daemon_factory, tmp_path):
    prog = write(tmp_path, "c.py", CRASHER)
    other = write(tmp_path, "w.py", SLEEPER)
    d = daemon_factory(section("db", PY, prog + " 0 1", start_retries="1", backoff="0.1",
                               critical="true") +
                       section("web", PY, other))
    wait_for(lambda: d.proc.poll() is not None, 15, message="gafferd to exit")
    assert d.proc.returncode == 1, d.log()
    assert "db is critical and failed" in d.log()


def test_a_critical_one_shot_that_fails_stops_gafferd(daemon_factory, tmp_path):
    prog = write(tmp_path, "c.py", CRASHER)
    d = daemon_factory(section("migrate", PY, prog + " 0 4", restart="never",
                               critical="yes"))
    wait_for(lambda: d.proc.poll() is not None, 15, message="gafferd to exit")
    assert d.proc.returncode == 1


def test_a_one_shot_that_succeeds_completes_and_start_runs_it_again(daemon_factory, tmp_path):
    prog = write(tmp_path, "c.py", CRASHER)
    d = daemon_factory(section("task", PY, prog + " 0 0", restart="never", critical="yes"))
    wait_for(lambda: d.status("task")["state"] == "completed", message="completed")
    first = d.status("task")["last_exit"]["id"]
    holds_for(lambda: d.proc.poll() is None, 0.3, message="gafferd still up")
    assert d.json("POST", "/processes/task/_start") == {"ok": True}
    wait_for(lambda: (lambda s: s["last_exit"]["id"] > first and s["state"] == "completed")(
             d.status("task")), message="ran again")


def test_stop_signal_is_what_a_stop_sends(daemon_factory, tmp_path):
    flag = tmp_path / "handlers"
    prog = write(tmp_path, "t.py", "import signal, sys, time\n"
                 "signal.signal(signal.SIGINT, lambda *a: sys.exit(42))\n"
                 "signal.signal(signal.SIGTERM, lambda *a: sys.exit(43))\n"
                 "open(%r, 'w').close()\n"
                 "time.sleep(1000)\n" % str(flag))
    d = daemon_factory(section("sig", PY, prog, stop_signal="INT", startsecs="0"))
    d.wait_running("sig", 1)
    wait_for(flag.exists, message="the child's handlers")
    w = EventWatcher(d, "exit")
    try:
        (pid,) = d.pids("sig")
        d.json("DELETE", "/processes/%d" % pid)
        (event,) = w.wait(lambda ev: len(ev) >= 1, message="the exit")[:1]
        assert event["pid"] == pid and event["exit_status"] == 42, event
        assert event["restart_in"] is None
    finally:
        w.close()
