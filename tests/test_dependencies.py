"""Dependencies between templates and one-shot tasks: the ``depends_on``
key and its graph checks (pure, §3 and §4), then end to end with the real
``python gafferd.py``: waiting for a dependency, a migration before a web
server, ``_start`` through dependencies, the shutdown order, and the
refusals of a bad graph by --check, reload and the API."""
from __future__ import annotations

import os
import signal
import time

import pytest

import gafferd
from conftest import PY, EventWatcher, holds_for, run_gafferd, section, wait_for
from gafferd import (DEPENDENCY_CONDITIONS, EXITED, FAILED, RUNNING, STARTING, _c_depends_on,
                     build_spec, dependency_problems, dependency_status, template_state)


# -- pure: the key and the graph --------------------------------------------------

def test_depends_on_parses_names_conditions_and_names_with_a_colon():
    assert _c_depends_on("db, migrate:completed_successfully, web:api, web:api:started,"
                         " db:ready", {}) == (
        ("db", "ready"), ("migrate", "completed_successfully"), ("web:api", "ready"),
        ("web:api", "started"))
    assert _c_depends_on(["db:started", "cache"], {}) == (("db", "started"), ("cache", "ready"))
    assert _c_depends_on("", {}) == ()
    for bad in ("a b", "a/b", ["db", 5], 7, [""], ":ready"):
        with pytest.raises(ValueError):
            _c_depends_on(bad, {})
    assert DEPENDENCY_CONDITIONS == ("started", "ready", "completed", "completed_successfully")


def spec(name, depends_on="", tmp="/"):
    return build_spec(name, "/bin/true", {"depends_on": depends_on} if depends_on else {},
                      base_dir=tmp)


def test_a_sound_graph_has_no_problems():
    specs = [spec("db"), spec("migrate", "db"), spec("web:a", "migrate:completed"),
             spec("web:b", "migrate:completed_successfully, db:started"), spec("lb", "web")]
    assert dependency_problems(specs) == []


def test_a_cycle_is_reported_once_with_its_path():
    problems = dependency_problems([spec("a", "b"), spec("b", "c:started"), spec("c", "a"),
                                    spec("d", "a")])
    assert problems == [("a", "dependency cycle: a -> b -> c -> a")]


def test_a_cycle_through_a_group_is_a_cycle():
    problems = dependency_problems([spec("web:1", "db"), spec("web:2"), spec("db", "web")])
    assert problems == [("web:1", "dependency cycle: web:1 -> db -> web:1")]


def test_unknown_names_and_self_dependencies_are_named():
    problems = dict(dependency_problems([spec("a", "nope"), spec("b", "b"),
                                         spec("w:1", "w"), spec("c", "a:redy")]))
    assert problems["a"] == "depends on 'nope', which is neither a template nor a group"
    assert problems["b"] == "depends on itself"
    assert problems["w:1"] == "depends on itself (through its group 'w')"
    assert "'a:redy'" in problems["c"] and "conditions: started, ready" in problems["c"]


def test_a_long_chain_does_not_hit_the_recursion_limit():
    specs = [spec("t0")] + [spec("t%d" % i, "t%d" % (i - 1)) for i in range(1, 3000)]
    assert dependency_problems(specs) == []
    specs[0] = spec("t0", "t2999")
    ((name, message),) = dependency_problems(specs)
    assert message.startswith("dependency cycle: t0 -> t2999 -> t2998")


@pytest.mark.parametrize("condition, state, counts, expected", [
    ("started", "stopped", {}, "waits"),
    ("started", "waiting", {}, "waits"),
    ("started", "starting", {STARTING: 1}, "holds"),
    ("started", "backoff", {"backoff": 1}, "holds"),
    ("started", "failed", {FAILED: 1}, "never"),
    ("ready", "starting", {STARTING: 1}, "waits"),
    ("ready", "degraded", {RUNNING: 1, "backoff": 1}, "waits"),
    ("ready", "running", {RUNNING: 2}, "holds"),
    ("ready", "completed", {EXITED: 1}, "holds"),
    ("ready", "failed", {FAILED: 1}, "never"),
    ("completed", "running", {RUNNING: 1}, "waits"),
    ("completed", "completed", {EXITED: 2}, "holds"),
    ("completed", "failed", {EXITED: 1, "exited_failed": 1}, "holds"),
    ("completed", "failed", {FAILED: 1}, "never"),
    ("completed", "failed", {}, "never"),            # failed for its own dependency
    ("completed_successfully", "completed", {EXITED: 1}, "holds"),
    ("completed_successfully", "failed", {"exited_failed": 1}, "never"),
    ("completed_successfully", "backoff", {"backoff": 1}, "waits"),
])
def test_dependency_status(condition, state, counts, expected):
    assert dependency_status(condition, state, counts) == expected


def test_a_blocked_template_is_failed_unless_stopped():
    assert template_state(True, True, {}, blocked=True) == "failed"
    assert template_state(False, False, {}, blocked=True) == "stopped"
    assert template_state(True, True, {}) == "waiting"


# -- end to end -----------------------------------------------------------------------

STAMP = ("import os, sys, time\n"
         "with open(sys.argv[1], 'a') as f: f.write('%s %r\\n' % (sys.argv[2], time.time()))\n")
SLEEP = "time.sleep(1000)\n"


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def stamps(path):
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {line.split()[0]: float(line.split()[1]) for line in f if line.strip()}


def stamps_of(path, *names):
    """stamps(path) once every one of ``names`` has written its line: a
    process is ready after startsecs, which a slow interpreter start-up on
    a busy machine can outlast before the program's first line runs."""
    return wait_for(lambda: all(n in stamps(path) for n in names) and stamps(path), 10,
                    message="start stamps of %s" % ", ".join(names))


def test_web_waits_for_db_to_be_ready_whatever_the_priority(daemon_factory, tmp_path):
    log = str(tmp_path / "stamps")
    prog = write(tmp_path, "p.py", STAMP + SLEEP)
    d = daemon_factory(section("web", PY, "%s %s web" % (prog, log), depends_on="db",
                               priority="1", startsecs="0.2") +
                       section("db", PY, "%s %s db" % (prog, log), priority="2",
                               startsecs="1.5"))
    w = EventWatcher(d)
    try:
        st = d.status("web")
        assert st["state"] == "waiting" and st["waiting_for"] == ["db:ready"], st
        assert st["running"] == 0
        wait_for(lambda: d.status("web")["state"] == "running", 10, message="web running")
        events = w.wait(lambda ev: ("spawn", "web") in [(e["event"], e.get("name"))
                                                        for e in ev], message="web spawn")
    finally:
        w.close()
    seen = [(e["event"], e.get("name")) for e in events]
    assert seen.index(("ready", "db")) < seen.index(("spawn", "web")), seen
    assert d.status("web")["waiting_for"] == []
    when = stamps_of(log, "db", "web")
    assert when["db"] < when["web"], when


def test_a_migration_runs_before_the_web_server(daemon_factory, tmp_path):
    log = str(tmp_path / "stamps")
    migrate = write(tmp_path, "m.py", STAMP + "time.sleep(0.3)\n")
    web = write(tmp_path, "w.py", STAMP + SLEEP)
    d = daemon_factory(section("web", PY, "%s %s web" % (web, log),
                               depends_on="migrate:completed_successfully", startsecs="0.1") +
                       section("db", PY, "%s %s db" % (web, log), startsecs="0.2") +
                       section("migrate", PY, "%s %s migrate" % (migrate, log),
                               restart="never", depends_on="db"))
    wait_for(lambda: d.status("web")["state"] == "running", 10, message="web running")
    assert d.status("migrate")["state"] == "completed"
    when = stamps_of(log, "migrate", "web")
    assert when["migrate"] < when["web"] - 0.25, when        # web began after migrate ended
    assert d.pids("db")[0] < d.status("migrate")["last_exit"]["id"] < d.pids("web")[0]


def test_a_failed_migration_fails_the_web_server_which_never_starts(daemon_factory, tmp_path):
    log = str(tmp_path / "stamps")
    migrate = write(tmp_path, "m.py", "import sys, time\ntime.sleep(1.0)\nsys.exit(3)\n")
    web = write(tmp_path, "w.py", STAMP + SLEEP)
    d = daemon_factory(section("migrate", PY, migrate, restart="never") +
                       section("web", PY, "%s %s web" % (web, log),
                               depends_on="migrate:completed_successfully") +
                       section("lb", PY, "%s %s lb" % (web, log), depends_on="web:started"))
    w = EventWatcher(d, "state")
    try:
        assert d.status("web")["state"] == "waiting"
        events = w.wait(lambda ev: any(e.get("name") == "lb" and e.get("state") == "failed"
                                       for e in ev), message="lb failed")
    finally:
        w.close()
    (web_failed,) = [e for e in events if e.get("name") == "web" and e["state"] == "failed"]
    assert web_failed["previous"] == "waiting"
    assert web_failed["reason"] == ("dependency migrate is failed, so "
                                    "migrate:completed_successfully can never hold"), web_failed
    assert "web cannot start: dependency migrate is failed" in d.log()
    assert "lb cannot start: dependency web is failed" in d.log()
    holds_for(lambda: d.status("web")["running"] == 0 and not stamps(log), 0.5,
              message="web never started")
    assert d.status("migrate")["state"] == "failed"


def test_start_starts_stopped_dependencies_first_unless_no_deps(daemon_factory, tmp_path):
    log = str(tmp_path / "stamps")
    prog = write(tmp_path, "p.py", STAMP + SLEEP)
    d = daemon_factory(section("db", PY, "%s %s db" % (prog, log), start="false",
                               startsecs="0.3") +
                       section("app", PY, "%s %s app" % (prog, log), start="false",
                               depends_on="db:started", startsecs="0.1") +
                       section("web", PY, "%s %s web" % (prog, log), start="false",
                               depends_on="app", startsecs="0.1"))
    assert d.json("POST", "/processes/web/_start?no_deps=1") == {"ok": True}
    st = d.status("web")
    assert st["state"] == "waiting" and st["waiting_for"] == ["app:ready"], st
    holds_for(lambda: d.status("app")["state"] == "stopped" and not stamps(log), 0.3,
              message="nothing else started")
    assert d.json("POST", "/processes/web/_start") == {"ok": True}
    wait_for(lambda: d.status("web")["state"] == "running", 10, message="web running")
    assert d.status("app")["state"] == "running"
    wait_for(lambda: d.status("db")["state"] == "running", 10, message="db running")
    when = stamps_of(log, "app", "web")
    assert when["app"] < when["web"], when
    assert d.pids("db")[0] < d.pids("app")[0] < d.pids("web")[0]      # ids follow the spawns
    # a completed or running dependency is left alone; a failed one is started again
    first_db = d.pids("db")
    d.json("POST", "/processes/web/_stop")
    d.json("POST", "/processes/web/_start")
    wait_for(lambda: d.status("web")["state"] == "running", 10, message="web running again")
    assert d.pids("db") == first_db


def test_shutdown_stops_a_template_only_after_its_dependents_exited(daemon_factory, tmp_path):
    order, up = str(tmp_path / "order"), str(tmp_path / "up")
    prog = write(tmp_path, "t.py", (
        "import signal, sys, time\n"
        "def bye(*a):\n"
        "    time.sleep(float(sys.argv[2]))\n"
        "    with open(%r, 'a') as f: f.write(sys.argv[1] + '\\n')\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        "with open(%r, 'a') as f: f.write(sys.argv[1] + '\\n')\n"
        "time.sleep(1000)\n") % (order, up))
    d = daemon_factory(section("db", PY, prog + " db 0", startsecs="0.1") +
                       section("web", PY, prog + " web 0.4", depends_on="db",
                               startsecs="0.1", numprocesses="2") +
                       section("worker", PY, prog + " worker 0.2", depends_on="web:started",
                               startsecs="0.1") +
                       section("other", PY, prog + " other 0", startsecs="0.1"))
    wait_for(lambda: d.status("worker")["state"] == "running", 10, message="all running")
    wait_for(lambda: os.path.exists(up) and len(open(up).read().split()) == 5, 10,
             message="every handler installed")
    started = time.monotonic()
    assert d.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 5
    with open(order) as f:
        lines = f.read().split()
    assert lines.index("worker") < lines.index("web") < lines.index("db"), lines
    assert lines.count("web") == 2 and lines[-1] == "db", lines
    assert lines[0] == "other", lines          # nothing depends on it: stopped at once


def test_reload_refuses_a_cycle_and_changes_nothing(daemon_factory, tmp_path):
    prog = write(tmp_path, "p.py", "import time\n" + SLEEP)
    d = daemon_factory(section("a", PY, prog, startsecs="0.1") +
                       section("b", PY, prog, depends_on="a", startsecs="0.1"))
    wait_for(lambda: d.status("b")["state"] == "running", 10, message="b running")
    with open(d.config_path, "w") as f:
        f.write(section("a", PY, prog, startsecs="0.1", depends_on="b") +
                section("b", PY, prog, depends_on="a", startsecs="0.1"))
    r = d.post("/reload")
    assert r.status == 400, r
    body = r.json()
    assert body["error"] == "invalid_config"
    assert "[process:a] depends_on: dependency cycle: a -> b -> a" in body["message"], body
    assert "depends_on" not in d.json("GET", "/processes/a")
    d.signal(signal.SIGHUP)
    wait_for(lambda: "reload failed" in d.log() and d.log().count("dependency cycle") >= 2,
             message="SIGHUP refused too")
    # a reload that changes only depends_on restarts nothing
    pids = d.pids("b")
    with open(d.config_path, "w") as f:
        f.write(section("a", PY, prog, startsecs="0.1") +
                section("b", PY, prog, depends_on="a:started", startsecs="0.1"))
    assert d.post("/reload").json()["changed"] == ["b"]
    assert d.pids("b") == pids and d.status("b")["state"] == "running"


def test_check_reports_the_cycle_path_and_exits_2(tmp_path):
    prog = write(tmp_path, "p.py", "import time\n" + SLEEP)
    cfg = tmp_path / "gaffer.ini"
    cfg.write_text(section("a", PY, prog, depends_on="c") + section("b", PY, prog, depends_on="a")
                   + section("c", PY, prog, depends_on="b") + section("d", PY, prog,
                                                                       depends_on="nope"))
    r = run_gafferd(["--check", str(cfg)])
    assert r.returncode == 2, r
    assert "[process:a] depends_on: dependency cycle: a -> c -> b -> a" in r.stderr, r.stderr
    assert "[process:d] depends_on: depends on 'nope'" in r.stderr


def test_api_refuses_bad_dependencies_with_400_and_deleting_a_needed_template(
        daemon_factory, tmp_path):
    prog = write(tmp_path, "p.py", "import time\n" + SLEEP)
    d = daemon_factory(section("db", PY, prog, startsecs="0.1"))
    r = d.request("POST", "/processes", {"name": "web", "cmd": PY, "args": prog,
                                         "depends_on": "cache"})
    assert r.status == 400 and "'cache', which is neither a template nor a group" in \
        r.json()["message"], r
    r = d.request("POST", "/processes", {"name": "web", "cmd": PY, "args": prog,
                                         "depends_on": ["web"]})
    assert r.status == 400 and "web: depends on itself" in r.json()["message"], r
    assert d.json("POST", "/processes", {"name": "web", "cmd": PY, "args": prog,
                                         "depends_on": ["db:started"],
                                         "startsecs": 0.1}) == {"ok": True}
    wait_for(lambda: d.status("web")["state"] == "running", 10, message="web running")
    assert d.json("GET", "/processes/web")["depends_on"] == ["db:started"]
    r = d.request("PUT", "/processes/db", {"cmd": PY, "args": prog, "depends_on": "web"})
    assert r.status == 400 and "dependency cycle: db -> web -> db" in r.json()["message"], r
    r = d.request("DELETE", "/processes/db")
    assert r.status == 409 and "web depends on it" in r.json()["message"], r
    assert d.status("db")["state"] == "running"
    d.json("DELETE", "/processes/web")
    d.json("DELETE", "/processes/db")


def test_a_group_dependency_waits_for_every_template_of_the_group(daemon_factory, tmp_path):
    prog = write(tmp_path, "p.py", "import time\n" + SLEEP)
    d = daemon_factory(section("db:a", PY, prog, startsecs="0.2") +
                       section("db:b", PY, prog, start="false", startsecs="0.2") +
                       section("web", PY, prog, depends_on="db", startsecs="0.1"))
    wait_for(lambda: d.status("web")["waiting_for"] == ["db:b:ready"], 10,
             message="web waiting for db:b only")
    assert d.status("web")["state"] == "waiting"
    d.json("POST", "/processes/db:b/_start")
    wait_for(lambda: d.status("web")["state"] == "running", 10, message="web running")
    r = d.request("DELETE", "/groups/db")
    assert r.status == 409, r


def test_scaling_a_waiting_template_and_reload_removing_what_an_api_template_needs(
        daemon_factory, tmp_path):
    prog = write(tmp_path, "p.py", "import time\n" + SLEEP)
    d = daemon_factory(section("db", PY, prog, start="false", startsecs="0.1"))
    assert d.json("POST", "/processes", {"name": "web", "cmd": PY, "args": prog,
                                         "depends_on": "db", "startsecs": 0.1}) == {"ok": True}
    assert d.json("POST", "/processes/web/_add/2")["numprocesses"] == 3
    st = d.status("web")
    assert st["state"] == "waiting" and st["running"] == 0 and st["max_processes"] == 3, st
    d.json("POST", "/processes/db/_start")
    wait_for(lambda: d.status("web")["ready"] == 3, 10, message="three web processes ready")
    with open(d.config_path, "w") as f:
        f.write("")
    r = d.post("/reload")
    assert r.status == 400 and "[process:web] depends_on: depends on 'db'" in \
        r.json()["message"], r
    assert d.status("db")["state"] == "running"
