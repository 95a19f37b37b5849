"""§4 process lifecycle, pure: the slot state table (every (state, event)
pair), exit classification, backoff delays, the restart policy and the
derived template state.  No subprocess, no clock: times are numbers."""
from __future__ import annotations

import itertools
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gafferd  # noqa: E402
from gafferd import (  # noqa: E402
    BACKOFF, EXITED, FAILED, PROCESS_STATES, RUNNING, SLOT_EVENTS, STARTING, STOPPED,
    STOPPING, TRANSITIONS, Backoff, LifecycleError, RestartPolicy, Slot, classify_exit,
    template_state)

# The table as the documentation states it: (state, event) -> (new state, actions).
EXPECTED = {
    ("stopped", "start"): ("starting", ("spawn",)),
    ("exited", "start"): ("starting", ("spawn",)),
    ("failed", "start"): ("starting", ("spawn",)),
    ("backoff", "start"): ("starting", ("cancel", "spawn")),
    ("starting", "start"): ("starting", ()),
    ("running", "start"): ("running", ()),
    ("starting", "spawned"): ("starting", ("watch_ready",)),
    ("starting", "ready"): ("running", ()),
    ("running", "ready"): ("running", ()),
    ("stopping", "ready"): ("stopping", ()),
    ("starting", "ready_timeout"): ("stopping", ("unwatch", "kill")),
    ("starting", "watchdog_timeout"): ("stopping", ("unwatch", "kill")),
    ("running", "watchdog_timeout"): ("stopping", ("unwatch", "kill")),
    ("backoff", "backoff_elapsed"): ("starting", ("spawn",)),
    ("starting", "stop"): ("stopping", ("unwatch", "kill")),
    ("running", "stop"): ("stopping", ("unwatch", "kill")),
    ("stopping", "stop"): ("stopping", ()),
    ("backoff", "stop"): ("stopped", ("cancel",)),
    ("exited", "stop"): ("stopped", ()),
    ("failed", "stop"): ("stopped", ()),
    ("stopped", "stop"): ("stopped", ()),
    ("stopping", "stopped"): ("stopped", ()),
    ("starting", "exit_restart"): ("backoff", ("unwatch", "schedule")),
    ("running", "exit_restart"): ("backoff", ("unwatch", "schedule")),
    ("starting", "exit_retry"): ("backoff", ("unwatch", "schedule")),
    ("running", "exit_retry"): ("backoff", ("unwatch", "schedule")),
    ("starting", "exit_give_up"): ("failed", ("unwatch", "give_up")),
    ("running", "exit_give_up"): ("failed", ("unwatch", "give_up")),
    ("starting", "exit_done"): ("exited", ("unwatch", "done")),
    ("running", "exit_done"): ("exited", ("unwatch", "done")),
    ("stopping", "exit_retry"): ("backoff", ("schedule",)),
    ("stopping", "exit_give_up"): ("failed", ("give_up",)),
    ("stopping", "exit_done"): ("exited", ("done",)),
}


def test_the_table_is_the_documented_one():
    assert TRANSITIONS == EXPECTED
    assert set(PROCESS_STATES) == {"starting", "running", "backoff", "stopping", "stopped",
                                   "exited", "failed"}


@pytest.mark.parametrize("state,event", list(itertools.product(PROCESS_STATES, SLOT_EVENTS)))
def test_every_state_event_pair(state, event):
    slot = Slot(0, now=10.0)
    slot.state = state
    if (state, event) in EXPECTED:
        new, actions = EXPECTED[(state, event)]
        assert slot.feed(event, 20.0, RestartPolicy()) == actions
        assert slot.state == new
        assert slot.since == (20.0 if new != state else 10.0)
    else:
        with pytest.raises(LifecycleError) as info:
            slot.feed(event, 20.0, RestartPolicy())
        assert (info.value.state, info.value.event) == (state, event)
        assert slot.state == state and slot.since == 10.0     # unchanged


def test_every_state_is_reachable_and_can_be_left():
    targets = {new for new, _ in TRANSITIONS.values()}
    sources = {state for state, _ in TRANSITIONS}
    assert targets == sources == set(PROCESS_STATES)


def policy(**kw):
    return RestartPolicy(**kw)


def exited(slot_state="running", failed_starts=0, failing=False):
    slot = Slot(0, 0.0)
    slot.state, slot.failed_starts, slot.failing = slot_state, failed_starts, failing
    return slot


@pytest.mark.parametrize("kw,status,sig,uptime,asked,expected", [
    ({}, 0, None, 5.0, True, "stopped"),                     # a stop that was asked for
    ({}, 1, None, 5.0, False, "exit_restart"),               # up long enough
    ({}, 0, None, 5.0, False, "exit_restart"),               # always: even a success
    ({}, 0, None, 0.2, False, "exit_retry"),                 # up < startsecs: failed start
    ({}, None, 9, 0.2, False, "exit_retry"),
    ({"startsecs": 0.0}, 1, None, 0.0, False, "exit_restart"),
    ({"restart": "on-failure"}, 0, None, 0.1, False, "exit_done"),
    ({"restart": "on-failure"}, 1, None, 5.0, False, "exit_restart"),
    ({"restart": "on-failure"}, None, 15, 5.0, False, "exit_restart"),    # a signal fails
    ({"restart": "on-failure", "success_exit_codes": [0, 3]}, 3, None, 0.1, False, "exit_done"),
    ({"restart": "never"}, 1, None, 0.1, False, "exit_done"),
    ({"restart": "never"}, 0, None, 9.0, False, "exit_done"),
    ({"start_retries": 0}, 1, None, 0.1, False, "exit_give_up"),
    ({"start_retries": 0}, 1, None, 5.0, False, "exit_restart"),
])
def test_classify_exit(kw, status, sig, uptime, asked, expected):
    assert classify_exit(policy(**kw), exited(), status, sig, uptime, asked) == expected


def test_a_kill_for_a_missed_deadline_is_a_failed_start_even_when_asked():
    slot = exited(STOPPING, failing=True)
    assert classify_exit(policy(), slot, 0, None, 50.0, True) == "exit_retry"
    assert classify_exit(policy(restart="on-failure"), slot, 0, None, 50.0, True) == "exit_retry"
    slot.failed_starts = 3
    assert classify_exit(policy(start_retries=3), slot, None, 15, 50.0, True) == "exit_give_up"


def test_start_retries_counts_consecutive_failed_starts():
    p = policy(start_retries=3, backoff=Backoff(1, 2, 60))
    slot = Slot(2, 0.0)
    slot.feed("start", 0.0, p)
    now, delays = 0.0, []
    for _ in range(4):
        slot.feed("spawned", now, p)
        event, actions = slot.exit(p, 1, None, 0.1, False, now)
        if event == "exit_give_up":
            break
        assert actions == ("unwatch", "schedule")
        delays.append(slot.delay)
        now += slot.delay
        assert slot.feed("backoff_elapsed", now, p) == ("spawn",)
    assert event == "exit_give_up" and slot.state == FAILED
    assert delays == [1.0, 2.0, 4.0] and slot.failed_starts == 4 and slot.restarts == 4
    slot.feed("start", now, p)                     # a start clears the count
    assert slot.failed_starts == 0 and slot.state == STARTING


def test_a_long_run_resets_the_backoff_and_waits_restart_delay():
    p = policy(restart_delay=2.5)
    slot = exited("running", failed_starts=6)
    event, _ = slot.exit(p, 1, None, 30.0, False, 100.0)
    assert event == "exit_restart" and slot.failed_starts == 0 and slot.delay == 2.5
    assert slot.state == BACKOFF and slot.since == 100.0


def test_ready_timeout_kills_and_the_exit_counts_as_a_failed_start():
    p = policy(start_retries=5)
    slot = exited(STARTING)
    assert slot.feed("ready_timeout", 60.0, p) == ("unwatch", "kill")
    assert slot.failing and slot.state == STOPPING
    event, actions = slot.exit(p, None, 15, 60.0, True, 61.0)
    assert event == "exit_retry" and actions == ("schedule",)
    assert slot.failed_starts == 1 and not slot.failing and slot.ok is False


def test_exited_records_success():
    slot = exited(RUNNING)
    slot.exit(policy(restart="never"), 0, None, 0.1, False, 1.0)
    assert slot.state == EXITED and slot.ok is True and slot.bucket == "exited"
    assert slot.restarts == 0                        # an expected exit
    slot = exited(RUNNING)
    slot.exit(policy(restart="never"), 2, None, 0.1, False, 1.0)
    assert slot.ok is False and slot.bucket == "exited_failed" and slot.restarts == 1


@pytest.mark.parametrize("n,expected", [(0, 0.0), (1, 1.0), (2, 2.0), (3, 4.0), (7, 60.0),
                                        (10 ** 6, 60.0)])
def test_backoff_delays(n, expected):
    assert Backoff().delay(n) == expected


@pytest.mark.parametrize("text,expected", [
    ("1, 2, 60", [1.0, 2.0, 60.0]), ("0.5", [0.5, 2.0, 60.0]), ("3 1.5", [3.0, 1.5, 60.0]),
    ([2, 3, 10], [2.0, 3.0, 10.0]), ({"max": 5}, [1.0, 2.0, 5.0]),
])
def test_backoff_parse(text, expected):
    assert Backoff.parse(text).to_list() == expected


@pytest.mark.parametrize("text", ["", "1 2 3 4", "fast", "1, 0.5", {"min": 1}, "nan"])
def test_backoff_rejects(text):
    with pytest.raises(ValueError):
        Backoff.parse(text)


def counts(**kw):
    return {k.replace("exited_failed", "exited_failed"): v for k, v in kw.items()}


@pytest.mark.parametrize("wanted,waiting,c,expected", [
    (False, False, {"running": 3}, "stopped"),
    (True, True, {}, "waiting"),
    (True, False, {}, "running"),                          # numprocesses = 0
    (True, False, {"running": 3}, "running"),
    (True, False, {"running": 2, "starting": 1}, "starting"),
    (True, False, {"starting": 3}, "starting"),
    (True, False, {"running": 18, "backoff": 2}, "degraded"),
    (True, False, {"running": 18, "failed": 2}, "degraded"),
    (True, False, {"starting": 1, "exited_failed": 1}, "degraded"),
    (True, False, {"backoff": 3}, "backoff"),
    (True, False, {"backoff": 1, "failed": 2}, "backoff"),
    (True, False, {"failed": 3}, "failed"),
    (True, False, {"exited": 1, "exited_failed": 1}, "failed"),
    (True, False, {"exited": 4}, "completed"),
    (True, False, {"exited": 2, "running": 1}, "running"),
])
def test_template_state(wanted, waiting, c, expected):
    assert template_state(wanted, waiting, c) == expected
    assert expected in gafferd.TEMPLATE_STATES


def test_one_slot_failing_never_touches_another():
    p = policy(start_retries=1)
    slots = [Slot(i, 0.0) for i in range(20)]
    for s in slots:
        s.feed("start", 0.0, p)
        s.feed("spawned", 0.0, p)
        s.feed("ready", 1.0, p)
    for s in slots[:2]:
        s.exit(p, None, 9, 0.1, False, 2.0)
        s.feed("backoff_elapsed", 3.0, p)
        s.feed("spawned", 3.0, p)
        s.exit(p, None, 9, 0.1, False, 3.1)
    states = [s.state for s in slots]
    assert states == [FAILED] * 2 + [RUNNING] * 18
    c = {}
    for s in slots:
        c[s.bucket] = c.get(s.bucket, 0) + 1
    assert template_state(True, False, c) == "degraded"
    assert STOPPED not in states


def test_the_loop_takes_its_clock_as_a_parameter():
    clock = [1000.0]
    loop = gafferd.Loop(time_func=lambda: clock[0], wall_func=lambda: 1.7e9)
    try:
        assert loop.time() == 1000.0
        handle = loop.call_later(5.0, lambda: None)
        assert handle.when == 1005.0
        clock[0] = 1010.0
        assert loop.unix_time(1005.0) == 1.7e9 - 5.0
    finally:
        loop.close()
