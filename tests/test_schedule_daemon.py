"""Schedules end to end: a real daemon runs a template ``every 1s``;
/status shows the run facts, /metrics the last success and exit status,
``_stop`` pauses the schedule and ``_start`` runs it now."""
from __future__ import annotations

import json
import re
import time

from conftest import holds_for, wait_for


def metric(d, name, template):
    text = d.get("/metrics").body.decode()
    match = re.search(r'^%s\{name="%s"\} (\S+)$' % (name, re.escape(template)), text, re.M)
    assert match, "%s{name=%r} not in /metrics" % (name, template)
    return float(match.group(1))


def test_every_1s_runs_reports_pauses_and_runs_now(gafferd, tmp_path):
    runs = tmp_path / "runs"
    d = gafferd("""
        [process:tick]
        cmd = sh
        args = -c "echo run >> %s"
        schedule = every 1s

        [process:broken]
        cmd = sh
        args = -c "exit 3"
        schedule = every 1s
        overlap = allow
        """ % runs)
    started = time.time()
    sched = d.status("tick")["schedule"]
    assert sched["schedule"] == "every 1s" and sched["overlap"] == "skip"
    assert sched["runs"] == 0 and sched["last_run"] is None and not sched["paused"]
    assert started - 2 < sched["next_run"] <= started + 2

    # two runs, a second apart
    first = wait_for(lambda: (lambda s: s["runs"] >= 1 and s)(d.status("tick")["schedule"]),
                     10, message="the first run")
    assert first["last_exit"] == 0 and first["last_duration"] >= 0
    assert started - 1 < first["last_run"] < time.time()
    assert first["last_success"] >= first["last_run"]
    second = wait_for(lambda: (lambda s: s["runs"] >= 2 and s)(d.status("tick")["schedule"]),
                      10, message="the second run")
    assert 0.5 < second["last_run"] - first["last_run"] < 3
    assert second["next_run"] > second["last_run"]
    assert d.status("tick")["state"] in ("scheduled", "starting", "running")
    assert d.json("GET", "/processes/tick")["schedule"] == "every 1s"

    # /metrics: last success time and last exit status of each scheduled template
    assert metric(d, "gafferd_schedule_last_success_timestamp_seconds", "tick") >= \
        first["last_success"]
    assert metric(d, "gafferd_schedule_last_exit_status", "tick") == 0
    wait_for(lambda: d.status("broken")["schedule"]["runs"] >= 1, 10, message="broken's run")
    assert metric(d, "gafferd_schedule_last_exit_status", "broken") == 3
    assert metric(d, "gafferd_schedule_last_success_timestamp_seconds", "broken") == 0
    assert d.status("broken")["schedule"]["failures"] >= 1

    # _stop pauses: no run for 2.5 s, no next_run
    d.json("POST", "/processes/tick/_stop")
    paused = wait_for(lambda: (lambda s: not s["schedule"]["running"] and s)(d.status("tick")),
                      10, message="the pause")
    assert paused["schedule"]["paused"] and paused["schedule"]["next_run"] is None
    assert paused["state"] == "stopped"
    count = paused["schedule"]["runs"]
    lines = runs.read_text().count("run")
    holds_for(lambda: d.status("tick")["schedule"]["runs"] == count, 2.5,
              message="the pause")
    assert runs.read_text().count("run") == lines

    # _start runs it now (well before a second passes) and resumes the schedule
    asked = time.time()
    d.json("POST", "/processes/tick/_start")
    after = wait_for(lambda: (lambda s: s["runs"] > count and s)(d.status("tick")["schedule"]),
                     10, message="the run _start asked for")
    assert asked - 0.1 <= after["last_run"] < asked + 0.9
    assert not after["paused"] and after["next_run"] is not None
    wait_for(lambda: d.status("tick")["schedule"]["runs"] > count + 1, 10,
             message="the schedule to go on")


def test_schedules_over_the_json_api(gafferd):
    d = gafferd("")
    body = json.dumps({"name": "job", "cmd": "true", "schedule": "*/5 * * * *",
                       "schedule_timezone": "utc", "overlap": "restart"})
    d.json("POST", "/processes", body)
    info = d.json("GET", "/processes/job")
    assert info["schedule"] == "*/5 * * * *" and info["overlap"] == "restart"
    assert info["schedule_timezone"] == "utc"
    status = d.status("job")
    assert status["state"] == "scheduled" and status["running"] == 0
    assert status["schedule"]["next_run"] % 300 == 0
    assert 0 < status["schedule"]["next_run"] - time.time() <= 301
    bad = d.request("POST", "/processes", json.dumps(
        {"name": "bad", "cmd": "true", "schedule": "0 0 * * 9"}))
    assert bad.status == 400
    text = json.dumps(bad.json())
    assert "schedule" in text and "day of week field" in text, text
