"""Gaps found by an audit of the process lifecycle against its promises,
end to end with the real ``python gafferd.py``: each test pins one
behaviour that once went wrong."""
from __future__ import annotations

import os
import signal

from conftest import PY, run_gafferd, section, wait_for


def test_a_respawn_storm_never_starves_another_templates_restart(daemon_factory):
    """A template that asked for immediate respawns (startsecs = 0,
    restart_delay = 0) and crashes in a loop keeps the head of the spawn
    queue; the restart of a crashed process of another template still
    happens within a few seconds."""
    d = daemon_factory(section("victim", "sleep", "600", startsecs="0.2")
                       + section("storm", "true", numprocesses=100, startsecs=0, restart_delay=0))
    wait_for(lambda: d.status("victim")["ready"] == 1, 10, message="victim ready")
    old = d.os_pid(d.pids("victim")[0])
    os.kill(old, signal.SIGKILL)

    def respawned():
        procs = d.status("victim")["processes"]
        return procs[0]["os_pid"] not in (None, old)
    wait_for(respawned, 3, interval=0.05, message="victim to be restarted during the storm")


def test_a_critical_one_shot_that_fails_stops_everything_gracefully(daemon_factory, tmp_path):
    """``critical`` with ``restart = never``: an unsuccessful exit is
    reported once and stops everything the graceful way (a sibling gets
    its TERM and time to act on it), not as a second stop request that
    kills what is left at once; gafferd exits with status 1."""
    mark = tmp_path / "termed"
    sibling = tmp_path / "sibling.py"
    sibling.write_text("import signal, sys, time\n"
                       "def term(*_):\n"
                       "    time.sleep(0.3)\n"
                       "    open(%r, 'w').write('yes')\n"
                       "    sys.exit(0)\n"
                       "signal.signal(signal.SIGTERM, term)\n"
                       "open(%r + '.up', 'w').write('up')\n"
                       "time.sleep(600)\n" % (str(mark), str(mark)))
    d = daemon_factory(section("web", PY, str(sibling), startsecs="0.1")
                       + section("job", "sh", "-c 'sleep 1; exit 2'", restart="never",
                                 critical="true"))
    wait_for(lambda: os.path.exists(str(mark) + ".up"), 10, message="sibling up")
    assert d.proc.wait(20) == 1
    log = d.log()
    assert log.count("is critical") == 1, log
    assert "second stop request" not in log, log
    assert mark.exists(), log


def test_gafferd_variables_can_be_used_in_cmd_and_args(daemon_factory, tmp_path):
    """``$VAR`` in ``cmd`` and ``args`` comes from the process's
    environment, which has GAFFERD_NAME, GAFFERD_ID and GAFFERD_SLOT (what
    supervisord's ``%(process_num)s`` did): the config check knows they
    will be there instead of refusing them as unknown variables."""
    prog = tmp_path / "argv.py"
    prog.write_text("import sys, time\nopen(sys.argv[1], 'w').write(sys.argv[2])\n"
                    "time.sleep(600)\n")
    out = str(tmp_path / "out")
    d = daemon_factory(section("w", PY, "%s %s.$GAFFERD_SLOT $GAFFERD_NAME:${GAFFERD_ID}"
                               % (prog, out), numprocesses=2))
    wait_for(lambda: all(os.path.exists("%s.%d" % (out, n)) for n in (0, 1)), 10,
             message="both slots to write their argv")
    d.wait_running("w", 2)
    ids = sorted(d.pids("w"))
    got = sorted(open("%s.%d" % (out, n)).read() for n in (0, 1))
    assert got == sorted("w:%d" % i for i in ids)
    check = run_gafferd(["--check", d.config_path])
    assert check.returncode == 0, check.stderr
    assert "out.0 w:0" in check.stdout, check.stdout
