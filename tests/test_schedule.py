"""Schedules: cron parsing and next times (UTC and local time across the
changes to and from summer time), ``every``, and the scheduler driven by
an injected clock: runs, overlap modes, pause and resume, clock jumps.

Nothing here waits for a real minute: the manager runs on a Loop whose
monotonic and wall clocks are lists the test moves by hand; the runs are
real processes.
"""
from __future__ import annotations

import calendar
import os
import signal
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gafferd  # noqa: E402
from conftest import run_loop_until  # noqa: E402

Schedule = gafferd.Schedule


def utc(text):
    """'2024-03-31 01:00' (UTC) -> Unix time."""
    return float(calendar.timegm(time.strptime(text, "%Y-%m-%d %H:%M")))


def show(when):
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(when)) if when is not None else None


# -- parsing and next times in UTC ---------------------------------------------------------

# expression, now (UTC), the next run (UTC).  2024-01-01 is a Monday.
NEXT_UTC = [
    ("* * * * *", "2024-01-01 00:00", "2024-01-01 00:01"),
    ("*/15 * * * *", "2024-01-01 00:14", "2024-01-01 00:15"),
    ("*/15 * * * *", "2024-01-01 00:15", "2024-01-01 00:30"),
    ("5,35 * * * *", "2024-01-01 00:40", "2024-01-01 01:05"),
    ("10-50/20 * * * *", "2024-01-01 00:31", "2024-01-01 00:50"),
    ("7/20 * * * *", "2024-01-01 00:28", "2024-01-01 00:47"),
    ("0 9-17/4 * * *", "2024-01-01 13:00", "2024-01-01 17:00"),
    ("0 0 * * *", "2024-01-01 12:00", "2024-01-02 00:00"),
    ("@hourly", "2024-01-01 12:59", "2024-01-01 13:00"),
    ("@daily", "2024-01-01 00:00", "2024-01-02 00:00"),
    ("@midnight", "2024-12-31 23:59", "2025-01-01 00:00"),
    ("@weekly", "2024-01-01 00:00", "2024-01-07 00:00"),      # Sunday
    ("@monthly", "2024-01-15 00:00", "2024-02-01 00:00"),
    ("@yearly", "2024-01-01 00:00", "2025-01-01 00:00"),
    ("0 8 * * mon-fri", "2024-01-05 09:00", "2024-01-08 08:00"),  # Friday -> Monday
    ("0 8 * * 1-5", "2024-01-06 07:00", "2024-01-08 08:00"),
    ("0 0 * * 7", "2024-01-01 00:00", "2024-01-07 00:00"),        # 7 is Sunday
    ("0 0 * * sun", "2024-01-07 00:00", "2024-01-14 00:00"),
    ("0 0 1 jan,jul *", "2024-01-01 00:00", "2024-07-01 00:00"),
    ("0 0 29 feb *", "2024-03-01 00:00", "2028-02-29 00:00"),
    ("0 0 31 * *", "2024-04-01 00:00", "2024-05-31 00:00"),      # April has 30 days
    ("0 12 1-3 1 *", "2024-01-02 13:00", "2024-01-03 12:00"),
    # day of month and day of week both restricted: either (Vixie cron)
    ("0 0 13 * fri", "2024-01-01 00:00", "2024-01-05 00:00"),   # a Friday before the 13th
    ("0 0 13 * fri", "2024-01-12 00:00", "2024-01-13 00:00"),   # the 13th, a Saturday
    ("0 0 1 * mon", "2024-01-01 00:00", "2024-01-08 00:00"),
    # one of them '*'-prefixed: both must match ('*/2' counts as unrestricted)
    ("0 0 */2 * mon", "2024-01-01 00:00", "2024-01-15 00:00"),  # odd days that are Mondays
    ("0 0 13 * *", "2024-01-13 00:00", "2024-02-13 00:00"),
    ("30 4 1,15 * *", "2024-01-01 04:30", "2024-01-15 04:30"),
    ("0 0 * DEC Sat", "2024-01-01 00:00", "2024-12-07 00:00"),   # names in any case
]


@pytest.mark.parametrize("expr,now,expected", NEXT_UTC)
def test_next_time_in_utc(expr, now, expected):
    assert show(Schedule.parse(expr).next_after(utc(now), utc=True)) == expected


def test_next_time_is_strictly_after_now_and_seconds_count():
    s = Schedule.parse("0 * * * *")
    assert s.next_after(utc("2024-01-01 01:00"), utc=True) == utc("2024-01-01 02:00")
    assert s.next_after(utc("2024-01-01 01:00") - 0.5, utc=True) == utc("2024-01-01 01:00")


@pytest.mark.parametrize("expr,field", [
    ("60 * * * *", "minute field"), ("* 24 * * *", "hour field"),
    ("* * 0 * *", "day of month field"), ("* * 32 * *", "day of month field"),
    ("* * * 13 *", "month field"), ("* * * foo *", "month field"),
    ("* * * * 8", "day of week field"), ("* * * * funday", "day of week field"),
    ("*/0 * * * *", "minute field"), ("5-1 * * * *", "minute field"),
    ("1,,2 * * * *", "minute field"), ("* * * * 1-", "day of week field"),
    ("-1 * * * *", "minute field"), ("*/100 * * * *", "minute field"),
])
def test_a_bad_field_is_named(expr, field):
    with pytest.raises(ValueError, match=field):
        Schedule.parse(expr)


@pytest.mark.parametrize("text", ["* * * *", "* * * * * *", "", "  ", "@reboot", "@daily x",
                                  "0 0 31 2 *", "0 0 30 feb *", "every", "every 0s",
                                  "every 8d", "every 5x", "every 1.5h", "every m5", 5])
def test_bad_schedules_are_refused(text):
    with pytest.raises(ValueError):
        Schedule.parse(text)


@pytest.mark.parametrize("text,seconds", [
    ("every 30s", 30), ("every 15m", 900), ("every 2h", 7200), ("every 1d", 86400),
    ("every 1h30m", 5400), ("every 90", 90), ("EVERY  1s", 1), ("every 7d", 604800)])
def test_every_durations(text, seconds):
    s = Schedule.parse(text)
    assert s.every == seconds
    assert s.next_after(1000.0) == 1000.0 + seconds


def test_the_config_error_names_the_key_and_the_field(tmp_path):
    ini = tmp_path / "g.ini"
    ini.write_text("[process:job]\ncmd = true\nschedule = 0 25 * * *\n")
    with pytest.raises((gafferd.ConfigError, gafferd.ConfigErrors)) as info:
        gafferd.read_config(str(ini))
    assert "schedule" in str(info.value) and "hour field" in str(info.value)
    ini.write_text("[process:job]\ncmd = true\noverlap = skip\n")
    with pytest.raises((gafferd.ConfigError, gafferd.ConfigErrors), match="overlap.*only to a template with a schedule"):
        gafferd.read_config(str(ini))
    ini.write_text("[process:job]\ncmd = true\nschedule = every 5m\noverlap = sometimes\n")
    with pytest.raises((gafferd.ConfigError, gafferd.ConfigErrors), match="overlap"):
        gafferd.read_config(str(ini))
    ini.write_text("[process:job]\ncmd = true\nschedule = @daily\nschedule_timezone = mars\n")
    with pytest.raises((gafferd.ConfigError, gafferd.ConfigErrors), match="schedule_timezone"):
        gafferd.read_config(str(ini))


def test_a_scheduled_template_runs_to_completion_by_default():
    spec = gafferd.build_spec("job", "true", {"schedule": "@daily"}, base_dir="/")
    assert spec.restart == "never" and spec.overlap == "skip" and not spec.run_on_start
    assert spec.schedule_timezone == "local"
    assert spec.definition()["schedule"] == "@daily"
    # restart = always retries failed runs only: a success ends the run
    spec = gafferd.build_spec("job", "true", {"schedule": "@daily", "restart": "always"},
                              base_dir="/")
    assert gafferd.RestartPolicy.of(spec).restart == "on-failure"


# -- local time: the changes to and from summer time ------------------------------------

@pytest.fixture
def berlin():
    """TZ=Europe/Berlin for this test, restored after it."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "Europe/Berlin"
    time.tzset()
    if time.localtime(utc("2024-07-01 12:00")).tm_gmtoff != 7200:
        pytest.fail("the zone database has no Europe/Berlin")   # tzdata is required
    yield
    if old is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = old
    time.tzset()


# 2024-03-31: 02:00 CET -> 03:00 CEST (01:00 UTC); 2024-10-27: 03:00 CEST -> 02:00 CET
# (01:00 UTC), so 02:00-02:59 local happens twice (00:00-00:59 and 01:00-01:59 UTC).
NEXT_BERLIN = [
    # winter, summer: 09:00 local is 08:00 UTC, then 07:00 UTC
    ("0 9 * * *", "2024-03-30 09:00", "2024-03-31 07:00"),
    # a time that does not exist runs at the end of the gap, once
    ("30 2 * * *", "2024-03-30 23:00", "2024-03-31 01:00"),
    ("30 2 * * *", "2024-03-31 01:00", "2024-04-01 00:30"),
    ("*/15 * * * *", "2024-03-31 00:50", "2024-03-31 01:00"),   # 02:00..02:45 -> 03:00
    ("*/15 * * * *", "2024-03-31 01:00", "2024-03-31 01:15"),
    ("0 3 * * *", "2024-03-30 23:00", "2024-03-31 01:00"),
    # a fixed time in the repeated hour runs once, at its first occurrence
    ("30 2 * * *", "2024-10-26 23:00", "2024-10-27 00:30"),
    ("30 2 * * *", "2024-10-27 00:30", "2024-10-28 01:30"),
    # an hour field of '*' also runs in the repeated hour
    ("*/30 * * * *", "2024-10-27 00:30", "2024-10-27 01:00"),
    ("*/30 * * * *", "2024-10-27 01:00", "2024-10-27 01:30"),
    ("*/30 * * * *", "2024-10-27 01:30", "2024-10-27 02:00"),
    ("0 9 * * *", "2024-10-26 09:00", "2024-10-27 08:00"),
    ("@daily", "2024-03-30 23:00", "2024-03-31 22:00"),
    ("@daily", "2024-10-26 22:00", "2024-10-27 23:00"),
]


@pytest.mark.parametrize("expr,now,expected", NEXT_BERLIN)
def test_next_time_in_local_time_across_summer_time(berlin, expr, now, expected):
    assert show(Schedule.parse(expr).next_after(utc(now), utc=False)) == expected


def test_utc_schedules_ignore_the_local_zone(berlin):
    s = Schedule.parse("30 2 * * *")
    assert show(s.next_after(utc("2024-03-30 23:00"), utc=True)) == "2024-03-31 02:30"


def test_local_instants_of_normal_repeated_and_missing_minutes(berlin):
    assert gafferd.local_instants(2024, 1, 1, 12, 0) == (utc("2024-01-01 11:00"),)
    assert gafferd.local_instants(2024, 10, 27, 2, 30) == (utc("2024-10-27 00:30"),
                                                           utc("2024-10-27 01:30"))
    assert gafferd.local_instants(2024, 3, 31, 2, 30) == (utc("2024-03-31 01:00"),)


# -- the scheduler, with an injected clock ----------------------------------------------

WALL0 = utc("2024-01-01 00:00") + 100.0


class Clocks:
    def __init__(self):
        self.mono, self.wall = [1000.0], [WALL0]

    def advance(self, seconds, wall=True):
        self.mono[0] += seconds
        if wall:
            self.wall[0] += seconds


@pytest.fixture
def sched():
    clocks = Clocks()
    loop = gafferd.Loop(time_func=lambda: clocks.mono[0], wall_func=lambda: clocks.wall[0])
    loop.add_signal_handler(signal.SIGCHLD, lambda signum: None)
    manager = gafferd.Manager(loop)
    yield clocks, loop, manager
    done = []
    manager.stop(lambda: done.append(True))
    run_loop_until(loop, lambda: done, 15, "the manager to stop")
    loop.close()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def report(manager, name):
    return manager.get_process_status(name)["schedule"]


def run_until(loop, predicate, message):
    run_loop_until(loop, predicate, 10, message)


def spin(loop, iterations=3):
    """A few loop iterations, none waiting longer than 10 ms of real time."""
    for _ in range(iterations):
        loop.call_later(0.01, lambda: None)
        loop.run_once()


def test_every_runs_on_its_interval_and_reports_the_run(sched):
    clocks, loop, m = sched
    m.add_process("job", "sh", args=["-c", "exit 3"], schedule="every 10s")
    t = m.templates["job"]
    assert t.state == "scheduled" and not t.slots
    r = report(m, "job")
    assert r["next_run"] == WALL0 + 10 and r["last_run"] is None and r["last_exit"] is None
    clocks.advance(9.9)
    spin(loop)
    assert not t.slots                               # not due yet
    clocks.advance(0.1)
    run_until(loop, lambda: report(m, "job")["runs"] == 1, "the first run")
    r = report(m, "job")
    assert r["last_exit"] == 3 and r["failures"] == 1 and r["last_success"] is None
    assert r["last_run"] == WALL0 + 10 and r["next_run"] == WALL0 + 20
    assert r["last_duration"] == 0.0                # the monotonic clock stood still
    assert t.state == "scheduled"
    m.update_process("job", "sh", args=["-c", "exit 0"], schedule="every 10s")
    clocks.advance(10)
    run_until(loop, lambda: report(m, "job")["runs"] == 2, "the second run")
    r = report(m, "job")
    assert r["last_exit"] == 0 and r["last_success"] == WALL0 + 20


def test_the_wall_clock_does_not_move_every_runs(sched):
    clocks, loop, m = sched
    m.add_process("job", "true", schedule="every 10s")
    clocks.wall[0] += 3600                           # the clock is set forward an hour
    spin(loop)
    assert report(m, "job")["runs"] == 0 and not m.templates["job"].slots
    clocks.advance(10)
    run_until(loop, lambda: report(m, "job")["runs"] == 1, "the run")


def test_missed_every_runs_are_not_caught_up(sched):
    clocks, loop, m = sched
    m.add_process("job", "true", schedule="every 10s")
    clocks.advance(55)                               # five runs were due
    run_until(loop, lambda: report(m, "job")["runs"] == 1, "the run")
    spin(loop, 20)
    assert report(m, "job")["runs"] == 1
    assert report(m, "job")["next_run"] == WALL0 + 60    # in phase with the arming


def test_overlap_skip_keeps_the_run_going(sched):
    clocks, loop, m = sched
    m.add_process("job", "sleep 60", schedule="every 10s")
    t = m.templates["job"]
    clocks.advance(10)
    run_until(loop, lambda: len(t.running) == 1, "the run's process")
    pid = t.running[0].pid
    clocks.advance(10)
    run_until(loop, lambda: report(m, "job")["skipped"] == 1, "a skipped run")
    assert [p.pid for p in t.running] == [pid] and report(m, "job")["running"]


def test_overlap_allow_runs_side_by_side_then_shrinks_back(sched):
    clocks, loop, m = sched
    m.add_process("job", "sleep 60", schedule="every 10s", overlap="allow",
                  graceful_timeout=5)
    t = m.templates["job"]
    clocks.advance(10)
    run_until(loop, lambda: len(t.running) == 1, "the first run")
    clocks.advance(10)
    run_until(loop, lambda: len(t.running) == 2, "the second run beside it")
    assert t.numprocesses == 2
    for proc in list(t.running):
        os.kill(proc.pid, signal.SIGKILL)
    run_until(loop, lambda: t.state == "scheduled", "both runs to end")
    r = report(m, "job")
    assert r["runs"] == 1 and r["last_exit"] == 128 + signal.SIGKILL
    assert t.numprocesses == 1 and len(t.slots) == 1


def test_overlap_restart_replaces_the_process(sched):
    clocks, loop, m = sched
    m.add_process("job", "sleep 60", schedule="every 10s", overlap="restart",
                  graceful_timeout=5)
    t = m.templates["job"]
    clocks.advance(10)
    run_until(loop, lambda: len(t.running) == 1, "the first run")
    first = t.running[0].pid
    clocks.advance(10)
    run_until(loop, lambda: len(t.running) == 1 and t.running[0].pid != first
              and not gafferd_alive(m, first), "the run to start again")
    assert report(m, "job")["last_run"] == WALL0 + 20


def gafferd_alive(manager, os_pid):
    return os_pid in manager._by_pid


def test_stop_pauses_and_start_runs_now(sched):
    clocks, loop, m = sched
    m.add_process("job", "sleep 60", schedule="every 10s", graceful_timeout=5)
    t = m.templates["job"]
    clocks.advance(10)
    run_until(loop, lambda: len(t.running) == 1, "the run")
    m.stop_process("job")                            # stops the run, pauses the schedule
    run_until(loop, lambda: not m._by_pid, "the run's process to exit")
    r = report(m, "job")
    assert r["paused"] and r["next_run"] is None and t.state == "stopped"
    clocks.advance(100)
    spin(loop, 5)
    assert not t.running and report(m, "job")["runs"] == 0
    m.start_process("job")                           # runs now, and the schedule goes on
    run_until(loop, lambda: len(t.running) == 1, "the run started by _start")
    r = report(m, "job")
    assert not r["paused"] and r["next_run"] == clocks.wall[0] + 10
    assert r["last_run"] == clocks.wall[0]


def test_start_false_loads_it_paused_and_run_on_start_runs_at_once(sched):
    clocks, loop, m = sched
    m.add_process("paused", "true", schedule="every 10s", start=False)
    assert report(m, "paused")["paused"] and m.templates["paused"].state == "stopped"
    m.add_process("eager", "true", schedule="@daily", run_on_start=True)
    run_until(loop, lambda: report(m, "eager")["runs"] == 1, "the run at load")
    assert report(m, "eager")["last_run"] == WALL0


def test_cron_runs_at_the_wall_clock_time_and_rechecks_after_a_jump(sched):
    clocks, loop, m = sched
    m.add_process("job", "true", schedule="*/5 * * * *", schedule_timezone="utc")
    t = m.templates["job"]
    due = utc("2024-01-01 00:05")
    assert report(m, "job")["next_run"] == due
    assert t.sched.timer.when == clocks.mono[0] + (due - WALL0)     # one timer, no tick
    # the clock is set back an hour: the timer fires, sees it is early, waits again
    clocks.wall[0] -= 3600
    clocks.advance(due - WALL0)
    spin(loop)
    assert report(m, "job")["runs"] == 0 and not t.slots
    assert report(m, "job")["next_run"] == due
    assert t.sched.timer.when == clocks.mono[0] + 3600
    # now forward by two hours: the run happens once, later ones are not caught up
    clocks.wall[0] += 2 * 3600
    clocks.advance(3600, wall=False)
    run_until(loop, lambda: report(m, "job")["runs"] == 1, "the late run")
    now = clocks.wall[0]
    assert report(m, "job")["next_run"] == Schedule.parse("*/5 * * * *").next_after(now)
    spin(loop, 5)
    assert report(m, "job")["runs"] == 1


def test_a_removed_template_leaves_no_timer_behind(sched):
    clocks, loop, m = sched
    m.add_process("job", "true", schedule="every 10s")
    handle = m.templates["job"].sched.timer
    m.remove_process("job")
    assert handle.cancelled


def test_a_run_waits_for_its_dependencies(sched):
    clocks, loop, m = sched
    m.add_process("db", "sleep 60", start=False)
    m.add_process("job", "true", schedule="every 10s", depends_on="db:started")
    clocks.advance(10)
    spin(loop)
    assert m.templates["job"].state == "waiting"
    m.start_process("db")
    run_until(loop, lambda: report(m, "job")["runs"] == 1, "the run after db started")


def test_retries_of_a_failed_run_follow_restart(sched):
    clocks, loop, m = sched
    m.add_process("job", "sh", args=["-c", "exit 1"], schedule="every 1h",
                  restart="on-failure", start_retries=2, backoff="0, 1, 0")
    t = m.templates["job"]
    clocks.advance(3600)
    run_until(loop, lambda: report(m, "job")["runs"] == 1, "the run and its retries")
    assert t.exits["failed_start"] == 2 and t.exits["gave_up"] == 1
    assert report(m, "job")["last_exit"] == 1 and t.state == "scheduled"
