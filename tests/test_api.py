"""Black-box tests of the REST API: /, /ping, /status, templates, actions, stats, groups.

One daemon per module serves the read-mostly tests; every test that changes
state works on templates it creates itself under a unique name, so tests
stay independent of each other and of their order. Tests that need a
config of their own (reload) start their own daemon.
"""
import itertools
import json
import os
import pwd
import re
import select
import shutil
import statistics
import sys
import time
from urllib.parse import quote

import pytest

from conftest import (PY, Daemon, RawClient, http_request_bytes, pid_alive,
                      run_gafferd, wait_for)

SLEEP = shutil.which("sleep") or "/bin/sleep"

# The talker prints 150 stdout lines and two stderr lines, then exits with
# status 3 -- but only the first time (a marker file remembers it); the
# replacement the daemon spawns prints "second run" and sleeps.
TALKER = r'''
import os, sys, time
marker = sys.argv[1]
if os.path.exists(marker):
    sys.stdout.write("second run\n")
    sys.stdout.flush()
    time.sleep(300)
    sys.exit(0)
open(marker, "w").close()
for i in range(1, 151):
    sys.stdout.write("line %d\n" % i)
sys.stdout.flush()
sys.stderr.write("oops 1\noops 2\n")
sys.stderr.flush()
sys.exit(3)
'''

CONFIG = """\
[process:sleeper]
cmd = sleep 300
numprocesses = 2

[process:idle]
cmd = sleep 300
start = false

[process:flapcfg]
cmd = sleep 300
flapping = 3, 2., 5., 4
start = false

[process:ga:a]
cmd = sleep 300

[process:ga:b]
cmd = sleep 300

[process:12345]
cmd = sleep 300

[process:talker]
cmd = {py} {talker} {marker}
redirect_output = stdout, stderr

[process:churn]
cmd = sleep 0.02
numprocesses = 3
flapping = off
start = false

[env:sleeper]
port = 80
"""

INI_ORDER = ["sleeper", "idle", "flapcfg", "ga:a", "ga:b", "12345", "talker", "churn"]
STATES = {"stopped", "waiting", "starting", "running", "degraded", "backoff", "failed",
          "completed"}
CLASSIC = ("active", "running", "max_processes", "state")      # the gaffer 0.4.4 keys


def classic(status):
    """The 0.4.4 keys of a status; the lifecycle keys are checked apart."""
    return {k: status[k] for k in CLASSIC}


def ready(api, name):
    """Wait until every process of ``name`` is ready (startsecs, 1 s)."""
    wait_for(lambda: api.status(name)["state"] == "running", message="%s running" % name)
PROCESS_STATS_KEYS = {"pid", "cpu", "mem", "mem_info1", "mem_info2", "ctime",
                      "username", "nice", "cmdline", "children"}
TEMPLATE_STATS_KEYS = {"name", "stats", "mem", "max_mem", "min_mem", "cpu",
                       "max_cpu", "min_cpu"}

_names = itertools.count(1)


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    talker = tmp / "talker.py"
    talker.write_text(TALKER)
    config = CONFIG.format(py=PY, talker=talker, marker=tmp / "talker.marker")
    d = Daemon(tmp, config)
    try:
        d.start()
        yield d
    finally:
        d.close()


@pytest.fixture
def tpl(api):
    """Create templates over HTTP under unique names; delete them afterwards."""
    made = []

    def make(prefix="t", wait=True, **settings):
        name = settings.pop("name", None) or "%s%d" % (prefix, next(_names))
        body = {"name": name, "cmd": "sleep 300"}
        body.update(settings)
        r = api.post("/processes", body)
        assert r.status == 200, r
        assert r.json() == {"ok": True}
        made.append(name)
        if wait and settings.get("start", True):
            api.wait_running(name, settings.get("numprocesses", 1))
        return name

    yield make
    for name in made:
        api.request("DELETE", "/processes/" + quote(name, safe=":"))


def is_json(resp):
    return resp.headers.get("content-type", "").split(";")[0].strip() == "application/json"


def check_error(resp, status, code):
    assert resp.status == status, resp
    assert is_json(resp), resp.headers
    body = resp.json()
    assert isinstance(body, dict) and body.get("error") == code, body


def ok(resp):
    assert resp.status == 200, resp
    assert is_json(resp), resp.headers
    assert resp.json() == {"ok": True}, resp


def gafferd_version():
    out = run_gafferd(["--version"])
    m = re.match(r"gafferd (\S+) \(gaffer API 0\.4\.4\)$", out.stdout.strip())
    assert out.returncode == 0 and m, out
    return m.group(1)


def os_pids(d, name):
    return sorted(d.os_pid(i) for i in d.pids(name))


# -- misc: /, /ping, /status ---------------------------------------------------

class TestMisc:
    def test_welcome(self, api):
        r = api.get("/")
        assert r.status == 200 and is_json(r)
        assert r.json() == {"welcome": "gaffer", "version": "0.4.4",
                            "gafferd": gafferd_version()}

    def test_ping(self, api):
        r = api.get("/ping")
        assert (r.status, r.body) == (200, b"OK")

    def test_status_running_template(self, api):
        api.wait_running("sleeper", 2)
        ready(api, "sleeper")
        r = api.get("/status/sleeper")
        assert r.status == 200 and is_json(r)
        body = r.json()
        assert classic(body) == {"active": True, "running": 2, "max_processes": 2,
                                 "state": "running"}
        assert body["ready"] == 2 and body["restarts"] == 0 and body["last_exit"] is None
        assert body["waiting_for"] == []
        assert [(p["slot"], p["state"], p["restarts"]) for p in body["processes"]] == \
            [(0, "running", 0), (1, "running", 0)]
        assert sorted(p["id"] for p in body["processes"]) == api.pids("sleeper")

    def test_status_never_started_template(self, api):
        assert classic(api.status("idle")) == {"active": False, "running": 0,
                                               "max_processes": 1, "state": "stopped"}
        assert api.status("idle")["processes"] == []

    def test_status_unknown(self, api):
        check_error(api.get("/status/nosuch"), 404, "not_found")

    def test_status_all_digit_name_by_name(self, api):
        api.wait_running("12345", 1)
        assert api.status("12345")["running"] == 1

    def test_status_of_every_template(self, api):
        api.wait_running("sleeper", 2)
        ready(api, "sleeper")
        r = api.get("/status")
        assert r.status == 200 and is_json(r)
        body = r.json()
        assert isinstance(body, dict)
        names = api.json("GET", "/processes")
        assert sorted(body) == sorted(names)
        for name in INI_ORDER:
            assert set(body[name]) >= {"active", "running", "max_processes", "state"}, body[name]
            assert body[name]["state"] in STATES
        assert classic(body["sleeper"]) == {"active": True, "running": 2, "max_processes": 2,
                                            "state": "running"}
        assert body["sleeper"]["ready"] == 2 and "processes" not in body["sleeper"]
        assert body["idle"]["state"] == "stopped"
        assert body["idle"]["active"] is False

    def test_state_follows_stop_and_start(self, api, tpl):
        name = tpl()
        ready(api, name)
        ok(api.post("/processes/%s/_stop" % name))
        wait_for(lambda: classic(api.status(name)) == {"active": False, "running": 0,
                                                       "max_processes": 1, "state": "stopped"},
                 message="stopped state")
        assert api.json("GET", "/status")[name]["state"] == "stopped"
        ok(api.post("/processes/%s/_start" % name))
        api.wait_running(name, 1)
        ready(api, name)


# -- /processes listing and creation -------------------------------------------

class TestProcessList:
    def test_names_in_insertion_order(self, api, tpl):
        r = api.get("/processes")
        assert r.status == 200 and is_json(r)
        names = r.json()
        assert names[:len(INI_ORDER)] == INI_ORDER
        new = tpl(start=False)
        assert api.json("GET", "/processes")[-1] == new

    @pytest.mark.parametrize("query", ["running=true", "running=1", "running=%20true%20"])
    def test_running_ids(self, api, query):
        api.wait_running("sleeper", 2)
        ids = api.json("GET", "/processes?" + query)
        assert ids and all(type(i) is int for i in ids)
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        assert set(api.pids("sleeper")) <= set(ids)
        assert set(api.pids("ga:a")) <= set(ids)

    @pytest.mark.parametrize("query", ["running=True", "running=0", "running=yes", "other=1"])
    def test_running_other_values_give_names(self, api, query):
        names = api.json("GET", "/processes?" + query)
        assert names[:len(INI_ORDER)] == INI_ORDER


class TestCreate:
    def test_create_and_start(self, api, tpl):
        name = tpl(numprocesses=3)
        st = api.status(name)
        assert classic(st) == {"active": True, "running": 3, "max_processes": 3,
                               "state": st["state"]}
        assert st["state"] in ("starting", "running")       # ready after startsecs
        ready(api, name)
        for pid in os_pids(api, name):
            assert pid_alive(pid)

    def test_create_without_start(self, api, tpl):
        name = tpl(start=False)
        assert api.status(name)["running"] == 0
        assert "start" not in api.json("GET", "/processes/" + name)
        ok(api.post("/processes/%s/_start" % name))
        api.wait_running(name, 1)

    def test_definition_echoed_back(self, api, tpl):
        name = tpl(args=["300"], cmd=SLEEP, env={"A": "1"}, numprocesses=1,
                   redirect_output=["out", "err"],
                   flapping={"attempts": 3, "window": 2.0, "retry_in": 5.0, "max_retry": 4})
        body = api.json("GET", "/processes/" + name)
        assert body["name"] == name and body["cmd"] == SLEEP
        assert body["args"] == ["300"]
        assert body["env"] == {"A": "1"}
        assert body["redirect_output"] == ["out", "err"]
        assert body["flapping"] == {"attempts": 3, "window": 2.0, "retry_in": 5.0,
                                    "max_retry": 4}
        assert "start" not in body

    def test_args_as_string(self, api, tpl):
        name = tpl(cmd=SLEEP, args="300")
        assert api.status(name)["running"] == 1

    def test_group_from_name(self, api, tpl):
        group = "gq%d" % next(_names)
        name = tpl(name=group + ":x", start=False)
        assert api.json("GET", "/processes/" + name)["group"] == group
        assert group in api.json("GET", "/groups")

    @pytest.mark.parametrize("body", [b"{", b"", b"not json", b'{"name": "x", "cmd": }'])
    def test_invalid_json(self, api, body):
        check_error(api.post("/processes", body), 400, "invalid_json")

    @pytest.mark.parametrize("body", [{"name": "nocmd"}, {"cmd": "sleep 300"},
                                      {"name": "", "cmd": "sleep 300"},
                                      {"name": "nocmd2", "cmd": ""}])
    def test_missing_name_or_cmd(self, api, body):
        before = api.json("GET", "/processes")
        check_error(api.post("/processes", body), 400, "invalid_process_info")
        assert api.json("GET", "/processes") == before

    @pytest.mark.parametrize("body", [b"[]", b"null", b"42", b'"name"'])
    def test_body_not_an_object(self, api, body):
        r = api.post("/processes", body)
        assert r.status == 400 and is_json(r), r
        assert r.json()["error"] in ("invalid_json", "invalid_process_info")

    def test_conflict(self, api):
        before = os_pids(api, "sleeper")
        check_error(api.post("/processes", {"name": "sleeper", "cmd": "sleep 1"}), 409,
                    "conflict")
        assert api.json("GET", "/processes/sleeper")["cmd"] == "sleep 300"
        assert os_pids(api, "sleeper") == before

    def test_bad_template_is_rejected_and_not_registered(self, api):
        name = "baduid%d" % next(_names)
        r = api.post("/processes", {"name": name, "cmd": "sleep 300",
                                    "uid": "no-such-user-gafferd"})
        check_error(r, 400, "invalid_process_info")
        check_error(api.get("/processes/" + name), 404, "not_found")

    def test_name_is_percent_decoded(self, api, tpl):
        uname = tpl(name="caf\u00e9%d" % next(_names), start=False)
        assert api.json("GET", "/processes/" + quote(uname))["name"] == uname
        assert api.json("GET", "/status/" + quote(uname))["running"] == 0
        assert api.json("GET", "/processes/ga%3Aa")["name"] == "ga:a"
        plus = tpl(name="x+y%d" % next(_names), start=False)     # '+' is not a space
        assert api.json("GET", "/processes/" + plus)["name"] == plus
        assert api.json("GET", "/processes/" + plus.replace("+", "%2B"))["name"] == plus


# -- one template ----------------------------------------------------------------

class TestTemplate:
    def test_ini_definition(self, api):
        r = api.get("/processes/sleeper")
        assert r.status == 200 and is_json(r)
        body = r.json()
        for key in ("name", "cmd", "group", "args", "env", "uid", "gid", "cwd",
                    "detach", "shell", "os_env", "numprocesses", "priority"):
            assert key in body, key
        assert "start" not in body
        assert body["name"] == "sleeper" and body["cmd"] == "sleep 300"
        assert body["group"] is None and body["args"] is None
        assert body["env"] == {"PORT": "80"}          # stored, not merged with os.environ
        assert body["uid"] is None and body["gid"] is None
        assert body["detach"] is False and body["shell"] is False
        assert body["os_env"] is True and body["numprocesses"] == 2
        assert body["priority"] == sys.maxsize

    def test_ini_template_with_flapping(self, api):
        body = api.json("GET", "/processes/flapcfg")
        assert body["flapping"] == {"attempts": 3, "window": 2.0, "retry_in": 5.0,
                                    "max_retry": 4}

    def test_ini_group_member(self, api):
        assert api.json("GET", "/processes/ga:a")["group"] == "ga"

    def test_numprocesses_is_configured_value(self, api, tpl):
        name = tpl(numprocesses=1)
        assert api.json("POST", "/processes/%s/_add/2" % name)["numprocesses"] == 3
        assert api.json("GET", "/processes/" + name)["numprocesses"] == 1
        assert api.status(name)["max_processes"] == 3

    def test_head(self, api):
        r = api.request("HEAD", "/processes/sleeper")
        assert (r.status, r.body) == (200, b"")
        r = api.request("HEAD", "/processes/nosuch")
        assert (r.status, r.body) == (404, b"")

    def test_get_unknown(self, api):
        check_error(api.get("/processes/nosuch"), 404, "not_found")

    def test_delete(self, api, tpl):
        name = tpl(numprocesses=2)
        pids = os_pids(api, name)
        ok(api.request("DELETE", "/processes/" + name))
        wait_for(lambda: not any(pid_alive(p) for p in pids), message="processes to die")
        check_error(api.get("/processes/" + name), 404, "not_found")
        assert name not in api.json("GET", "/processes")
        check_error(api.request("DELETE", "/processes/" + name), 404, "not_found")

    def test_delete_unknown(self, api):
        check_error(api.request("DELETE", "/processes/nosuch"), 404, "not_found")

    def test_put_updates(self, api, tpl):
        name = tpl()
        old = os_pids(api, name)
        ok(api.request("PUT", "/processes/" + name,
                       body={"name": "ignored-name", "cmd": "sleep 301", "numprocesses": 2}))
        body = api.json("GET", "/processes/" + name)
        assert body["name"] == name and body["cmd"] == "sleep 301"
        check_error(api.get("/processes/ignored-name"), 404, "not_found")
        api.wait_running(name, 2)
        wait_for(lambda: not any(pid_alive(p) for p in old), message="old processes to die")
        assert not set(old) & set(os_pids(api, name))

    def test_post_on_template_updates(self, api, tpl):
        name = tpl()
        ok(api.post("/processes/" + name, {"cmd": "sleep 302"}))
        assert api.json("GET", "/processes/" + name)["cmd"] == "sleep 302"
        api.wait_running(name, 1)

    def test_put_with_start_false_leaves_it_stopped(self, api, tpl):
        name = tpl()
        old = os_pids(api, name)
        ok(api.request("PUT", "/processes/" + name, body={"cmd": "sleep 303", "start": False}))
        wait_for(lambda: not any(pid_alive(p) for p in old), message="old processes to die")
        assert api.status(name)["running"] == 0

    def test_put_errors(self, api, tpl):
        name = tpl(start=False)
        check_error(api.request("PUT", "/processes/" + name, body=b"{oops"), 400, "invalid_json")
        check_error(api.request("PUT", "/processes/" + name, body={"args": "1"}), 400,
                    "invalid_process_info")
        check_error(api.request("PUT", "/processes/nosuch", body={"cmd": "sleep 1"}), 404,
                    "not_found")
        assert api.json("GET", "/processes/" + name)["cmd"] == "sleep 300"


class TestTemplateActions:
    def test_pids(self, api, tpl):
        name = tpl(numprocesses=2)
        r = api.get("/processes/%s/_pids" % name)
        assert r.status == 200 and is_json(r)
        body = r.json()
        assert body["ok"] is True
        assert len(body["pids"]) == 2 and body["pids"] == sorted(body["pids"])
        running = api.json("GET", "/processes?running=true")
        assert set(body["pids"]) <= set(running)

    def test_get_other_action(self, api):
        check_error(api.get("/processes/sleeper/_bogus"), 404, "resource_not_found")
        check_error(api.get("/processes/sleeper/_start"), 404, "resource_not_found")

    def test_unknown_template_checked_first(self, api):
        check_error(api.get("/processes/nosuch/_pids"), 404, "not_found")
        check_error(api.get("/processes/nosuch/_bogus"), 404, "not_found")
        for action in ("_start", "_stop", "_restart", "_add", "_sub/1", "_signal/15", "_bogus"):
            check_error(api.post("/processes/nosuch/" + action), 404, "not_found")

    def test_post_other_action(self, api):
        check_error(api.post("/processes/sleeper/_bogus"), 404, "resource_not_found")
        check_error(api.post("/processes/sleeper/_bogus/1"), 404, "resource_not_found")

    def test_stop_start(self, api, tpl):
        name = tpl(numprocesses=2)
        old = os_pids(api, name)
        ok(api.post("/processes/%s/_stop" % name))
        wait_for(lambda: not any(pid_alive(p) for p in old), message="processes to stop")
        assert api.status(name)["running"] == 0
        ok(api.post("/processes/%s/_stop" % name))      # already stopped: still ok
        ok(api.post("/processes/%s/_start" % name))
        api.wait_running(name, 2)

    def test_restart(self, api, tpl):
        name = tpl(numprocesses=2)
        old_ids, old_pids = api.pids(name), os_pids(api, name)
        ok(api.post("/processes/%s/_restart" % name))
        wait_for(lambda: (lambda p: len(p) == 2 and min(p) > max(old_ids))(api.pids(name)),
                 message="new processes")
        wait_for(lambda: not any(pid_alive(p) for p in old_pids), message="old ones to exit")

    def test_add_sub(self, api, tpl):
        name = tpl()
        r = api.post("/processes/%s/_add" % name)
        assert r.status == 200 and r.json() == {"ok": True, "numprocesses": 2}
        assert api.json("POST", "/processes/%s/_add/3" % name) == {"ok": True, "numprocesses": 5}
        api.wait_running(name, 5)
        assert api.json("POST", "/processes/%s/_sub" % name) == {"ok": True, "numprocesses": 4}
        assert api.json("POST", "/processes/%s/_sub/2" % name) == {"ok": True, "numprocesses": 2}
        api.wait_running(name, 2)

    def test_sub_never_below_zero(self, api, tpl):
        name = tpl()
        r = api.post("/processes/%s/_sub/5" % name)
        if r.status == 200:
            assert r.json() == {"ok": True, "numprocesses": 0}
        else:
            check_error(r, 400, "bad_value")
        assert api.status(name)["max_processes"] >= 0
        api.json("POST", "/processes/%s/_add" % name)
        assert api.status(name)["max_processes"] >= 1

    @pytest.mark.parametrize("action", ["_add/x", "_sub/x", "_add/1.5", "_sub/2x"])
    def test_add_sub_bad_number(self, api, action):
        before = api.status("sleeper")["max_processes"]
        check_error(api.post("/processes/sleeper/" + action), 400, "bad_value")
        assert api.status("sleeper")["max_processes"] == before

    @pytest.mark.parametrize("action,code", [("_signal", "no_signal_number"),
                                             ("_signal/", "no_signal_number"),
                                             ("_signal/x", "bad_value"),
                                             ("_signal/99999", "bad_value"),
                                             ("_signal/SIGNOPE", "bad_value")])
    def test_signal_errors(self, api, action, code):
        check_error(api.post("/processes/sleeper/" + action), 400, code)

    @pytest.mark.parametrize("sig", ["15", "TERM", "SIGTERM"])
    def test_signal_is_delivered(self, api, tpl, sig):
        name = tpl()        # one process: two quick exits would count as flapping
        old = os_pids(api, name)
        (old_id,) = api.pids(name)
        ok(api.post("/processes/%s/_signal/%s" % (name, sig)))
        wait_for(lambda: not any(pid_alive(p) for p in old), message="SIGTERM to kill them")
        api.wait_replacement(name, old_id)      # ...and it was replaced

    def test_harmless_signal(self, api, tpl):
        name = tpl()
        old = os_pids(api, name)
        ok(api.post("/processes/%s/_signal/CONT" % name))
        ok(api.post("/processes/%s/_signal/18" % name))
        assert os_pids(api, name) == old


# -- processes by internal id ---------------------------------------------------

class TestById:
    def test_head(self, api, tpl):
        name = tpl()
        pid = api.pids(name)[0]
        r = api.request("HEAD", "/processes/%d" % pid)
        assert (r.status, r.body) == (200, b"")
        r = api.request("HEAD", "/processes/999999")
        assert (r.status, r.body) == (404, b"")

    def test_get(self, api, tpl):
        name = tpl(numprocesses=2)
        for pid in api.pids(name):
            body = api.json("GET", "/processes/%d" % pid)
            assert body["name"] == name and body["cmd"] == "sleep 300"
            assert body["id"] == pid
            assert pid_alive(body["os_pid"])
        check_error(api.get("/processes/999999"), 404, "not_found")

    def test_delete_spawns_replacement(self, api, tpl):
        name = tpl(numprocesses=2)
        ids = api.pids(name)
        os_pid = api.os_pid(ids[0])
        ok(api.request("DELETE", "/processes/%d" % ids[0]))
        wait_for(lambda: not pid_alive(os_pid), message="process to die")
        wait_for(lambda: (lambda p: len(p) == 2 and ids[0] not in p)(api.pids(name)),
                 message="replacement")
        new = set(api.pids(name)) - set(ids)
        assert new and min(new) > max(ids)     # ids are never reused
        check_error(api.request("DELETE", "/processes/%d" % ids[0]), 404, "not_found")
        check_error(api.request("DELETE", "/processes/999999"), 404, "not_found")

    def test_stop_action(self, api, tpl):
        name = tpl()
        pid = api.pids(name)[0]
        os_pid = api.os_pid(pid)
        ok(api.post("/processes/%d/_stop" % pid))
        wait_for(lambda: not pid_alive(os_pid), message="process to die")
        wait_for(lambda: (lambda p: p and p[0] > pid)(api.pids(name)), message="replacement")
        check_error(api.post("/processes/%d/_stop" % pid), 404, "not_found")

    def test_signal_action(self, api, tpl):
        name = tpl()
        pid = api.pids(name)[0]
        os_pid = api.os_pid(pid)
        ok(api.post("/processes/%d/_signal/CONT" % pid))
        assert pid_alive(os_pid)
        ok(api.post("/processes/%d/_signal/15" % pid))
        wait_for(lambda: not pid_alive(os_pid), message="SIGTERM to be delivered")

    def test_action_errors(self, api, tpl):
        name = tpl()
        pid = api.pids(name)[0]
        check_error(api.post("/processes/%d/_signal" % pid), 400, "no_signal_number")
        check_error(api.post("/processes/%d/_signal/x" % pid), 400, "bad_value")
        for action in ("_add", "_sub", "_add/1", "_bogus", "_start"):
            check_error(api.post("/processes/%d/%s" % (pid, action)), 404, "resource_not_found")
        assert api.pids(name) == [pid] and api.status(name)["max_processes"] == 1
        check_error(api.post("/processes/999999/_stop"), 404, "not_found")
        check_error(api.post("/processes/999999/_signal/15"), 404, "not_found")

    def test_all_digit_segment_is_an_id(self, api):
        api.wait_running("12345", 1)
        check_error(api.get("/processes/12345"), 404, "not_found")
        assert api.request("HEAD", "/processes/12345").status == 404
        assert api.json("GET", "/stats/12345")["name"] == "12345"

    def test_non_digit_id_is_a_name(self, api):
        check_error(api.get("/processes/1a"), 404, "not_found")
        check_error(api.post("/processes/%5E1/_stop"), 404, "not_found")


# -- stats ------------------------------------------------------------------------

def check_process_stats(st, os_pid=None):
    assert set(st) >= PROCESS_STATS_KEYS, st
    if os_pid is not None:
        assert st["pid"] == os_pid
    assert isinstance(st["cpu"], (int, float)) and not isinstance(st["cpu"], bool)
    assert isinstance(st["mem"], (int, float)) and 0 <= st["mem"] <= 100
    assert re.match(r"^\d+[BKMGTPEZY]$", st["mem_info1"]), st["mem_info1"]
    assert re.match(r"^\d+[BKMGTPEZY]$", st["mem_info2"]), st["mem_info2"]
    assert re.match(r"^\d+:\d\d\.\d\d$", st["ctime"]), st["ctime"]
    assert st["username"] == pwd.getpwuid(os.getuid()).pw_name
    assert isinstance(st["nice"], int)
    assert isinstance(st["children"], list)


def check_template_stats(body, name, n):
    assert set(body) >= TEMPLATE_STATS_KEYS, body
    assert body["name"] == name
    assert len(body["stats"]) == n
    if n == 0:
        for key in ("mem", "max_mem", "min_mem", "cpu", "max_cpu", "min_cpu"):
            assert body[key] == "N/A", (key, body)
        return
    ids = [s["id"] for s in body["stats"]]
    assert ids == sorted(ids)
    for st in body["stats"]:
        check_process_stats(st)
    for kind in ("mem", "cpu"):
        values = [s[kind] for s in body["stats"]]
        assert body["max_" + kind] == pytest.approx(max(values), abs=0.1)
        assert body["min_" + kind] == pytest.approx(min(values), abs=0.1)
        assert body[kind] == pytest.approx(sum(values), abs=0.1 * n)


class TestStats:
    def test_all(self, api):
        api.wait_running("sleeper", 2)
        r = api.get("/stats")
        assert r.status == 200 and is_json(r)
        body = r.json()
        assert isinstance(body, list)
        assert [t["name"] for t in body] == api.json("GET", "/processes")
        by_name = {t["name"]: t for t in body}
        check_template_stats(by_name["sleeper"], "sleeper", 2)
        check_template_stats(by_name["idle"], "idle", 0)
        assert {s["id"] for s in by_name["sleeper"]["stats"]} == set(api.pids("sleeper"))
        for st in by_name["sleeper"]["stats"]:
            assert st["pid"] == api.os_pid(st["id"])
            assert st["cmdline"] == "sleep"

    def test_query_ignored(self, api):
        body = api.json("GET", "/stats?feed=continuous&x=1")
        assert isinstance(body, list) and [t["name"] for t in body][:2] == ["sleeper", "idle"]

    @pytest.mark.parametrize("query", ["", "?feed=normal"])
    def test_template(self, api, query):
        api.wait_running("sleeper", 2)
        r = api.get("/stats/sleeper" + query)
        assert r.status == 200 and is_json(r)
        check_template_stats(r.json(), "sleeper", 2)

    def test_template_without_processes(self, api):
        check_template_stats(api.json("GET", "/stats/idle"), "idle", 0)

    def test_template_unknown(self, api):
        check_error(api.get("/stats/nosuch"), 404, "not_found")

    def test_all_digit_template(self, api):
        api.wait_running("12345", 1)
        check_template_stats(api.json("GET", "/stats/12345"), "12345", 1)

    def test_process(self, api):
        api.wait_running("sleeper", 2)
        pid = api.pids("sleeper")[0]
        os_pid = api.os_pid(pid)
        for name in ("sleeper", "whatever"):          # the name is ignored
            r = api.get("/stats/%s/%d" % (name, pid))
            assert r.status == 200 and is_json(r)
            check_process_stats(r.json(), os_pid)
            assert r.json()["cmdline"] == "sleep"

    def test_process_errors(self, api):
        check_error(api.get("/stats/sleeper/abc"), 400, "bad_value")
        check_error(api.get("/stats/sleeper/999999"), 404, "not_found")

    def test_stats_do_not_block_the_loop(self, api, tpl):
        name = tpl(numprocesses=8)
        slow = RawClient(api.port)
        stats = http_request_bytes("GET", "/stats/" + name)
        slow.send(stats)
        # 50 pings, each while a /stats is being computed (a new one is
        # asked for as soon as the last is answered); the p90 of their
        # latencies, not the worst, which one scheduling hiccup decides
        latencies, replies = [], []
        try:
            while len(latencies) < 50:
                t0 = time.monotonic()
                r = api.get("/ping")
                latencies.append(time.monotonic() - t0)
                assert r.status == 200
                if select.select([slow.sock], [], [], 0)[0]:
                    replies.append(slow.read_response())
                    slow.send(stats)
            replies.append(slow.read_response())
        finally:
            slow.close()
        for resp in replies:
            assert resp.status == 200
            check_template_stats(resp.json(), name, 8)
        p90 = statistics.quantiles(latencies, n=10, method="inclusive")[-1]
        assert p90 < 0.1, "p90 of 50 /ping: %.3fs while /stats was computed" % p90

    def test_processes_that_just_exited_never_give_500(self, api):
        ok(api.post("/processes/churn/_start"))
        try:
            statuses = set()
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                r = api.get("/stats")
                statuses.add(r.status)
                assert r.status == 200, r
                for t in r.json():
                    if t["name"] == "churn":
                        assert set(t) >= TEMPLATE_STATS_KEYS
                r = api.get("/stats/churn")
                assert r.status == 200, r
                assert set(r.json()) >= TEMPLATE_STATS_KEYS
                ids = api.json("GET", "/processes/churn/_pids")["pids"]
                for pid in ids:
                    for path in ("/stats/churn/%d" % pid, "/processes/%d" % pid):
                        r = api.get(path)
                        assert r.status in (200, 404), r
                        r.json()
            assert api.get("/ping").status == 200
        finally:
            ok(api.post("/processes/churn/_stop"))


# -- groups -------------------------------------------------------------------------

class TestGroups:
    def make_group(self, tpl, members=("a", "b", "c"), **kw):
        group = "grp%d" % next(_names)
        names = [tpl(name="%s:%s" % (group, m), **kw) for m in members]
        return group, names

    def test_list_in_creation_order(self, api, tpl):
        g1, _ = self.make_group(tpl, ("a",), start=False)
        g2, _ = self.make_group(tpl, ("a",), start=False)
        r = api.get("/groups")
        assert r.status == 200 and is_json(r)
        groups = r.json()
        assert groups[0] == "ga"
        assert groups.index(g1) < groups.index(g2)

    def test_members(self, api, tpl):
        group, names = self.make_group(tpl, start=False)
        r = api.get("/groups/" + group)
        assert r.status == 200 and is_json(r)
        assert r.json() == names
        assert api.json("GET", "/groups/ga") == ["ga:a", "ga:b"]
        check_error(api.get("/groups/nosuch"), 404, "not_found")

    def test_get_with_action_segment_lists(self, api, tpl):
        group, names = self.make_group(tpl, start=False)
        assert api.json("GET", "/groups/%s/_start" % group) == names
        assert all(api.status(n)["running"] == 0 for n in names)

    def test_start_stop_restart(self, api, tpl):
        group, names = self.make_group(tpl, start=False)
        ok(api.post("/groups/%s/_start" % group))
        for n in names:
            api.wait_running(n, 1)
        ids = {n: api.pids(n) for n in names}
        ok(api.post("/groups/%s/_restart" % group))
        for n in names:
            wait_for(lambda: (lambda p: len(p) == 1 and p[0] > ids[n][0])(api.pids(n)),
                     message="restart of " + n)
        ok(api.post("/groups/%s/_stop" % group))
        for n in names:
            api.wait_running(n, 0)
            assert api.status(n)["state"] == "stopped"

    def test_action_errors(self, api, tpl):
        group, names = self.make_group(tpl, start=False)
        for action in ("_start_x", "_bogus", "_stopp"):
            check_error(api.post("/groups/%s/%s" % (group, action)), 404, "resource_not_found")
        assert all(api.status(n)["running"] == 0 for n in names)
        check_error(api.post("/groups/nosuch/_start"), 404, "not_found")
        r = api.post("/groups/" + group)
        assert r.status in (404, 405) and is_json(r), r
        if r.status == 404:
            assert r.json()["error"] == "resource_not_found"

    def test_delete_removes_every_member(self, api, tpl):
        group, names = self.make_group(tpl, ("a", "b", "c", "d"))
        pids = [p for n in names for p in os_pids(api, n)]
        ok(api.request("DELETE", "/groups/" + group))
        for n in names:
            check_error(api.get("/processes/" + n), 404, "not_found")
        assert group not in api.json("GET", "/groups")
        check_error(api.get("/groups/" + group), 404, "not_found")
        wait_for(lambda: not any(pid_alive(p) for p in pids), message="members to die")
        check_error(api.request("DELETE", "/groups/" + group), 404, "not_found")

    def test_empty_group_stays(self, api, tpl):
        group, names = self.make_group(tpl, ("only",), start=False)
        ok(api.request("DELETE", "/processes/" + names[0]))
        assert group in api.json("GET", "/groups")
        assert api.json("GET", "/groups/" + group) == []


# -- routing errors, content types, CORS default ----------------------------------

class TestRouting:
    @pytest.mark.parametrize("path", ["/nope", "/processes/", "/ping/", "/status/",
                                      "/processes/sleeper/", "/groups/", "/stats/",
                                      "//processes", "/processes//_pids"])
    def test_unknown_path(self, api, path):
        check_error(api.get(path), 404, "not_found")

    @pytest.mark.parametrize("method,path,allowed", [
        ("PATCH", "/processes", {"GET", "POST"}),
        ("PUT", "/processes", {"GET", "POST"}),
        ("PATCH", "/processes/sleeper", {"GET", "PUT", "DELETE"}),
        ("DELETE", "/ping", {"GET"}),
        ("POST", "/status/sleeper", {"GET"}),
        ("PUT", "/stats", {"GET"}),
        ("PUT", "/groups", {"GET"}),
        ("PATCH", "/", {"GET"}),
    ])
    def test_method_not_allowed(self, api, method, path, allowed):
        r = api.request(method, path, body=b"{}" if method in ("PUT", "PATCH", "POST") else None)
        check_error(r, 405, "method_not_allowed")
        allow = {m.strip() for m in r.headers.get("allow", "").split(",")}
        assert allow >= allowed, r.headers
        assert method not in allow

    def test_error_bodies_have_a_message(self, api):
        for r in (api.get("/nope"), api.request("PATCH", "/processes", body=b"")):
            assert isinstance(r.json().get("message", ""), str)

    def test_content_types(self, api):
        for path in ("/", "/status/sleeper", "/processes/sleeper", "/processes/sleeper/_pids",
                     "/processes", "/groups", "/stats", "/stats/sleeper", "/status"):
            r = api.get(path)
            assert r.status == 200 and is_json(r), (path, r.headers)
            json.loads(r.body.decode("utf-8"))

    def test_cors_is_off_by_default(self, api):
        origin = "http://127.0.0.1:%d" % api.port
        replies = [api.get("/processes", headers={"Origin": origin}),
                   api.get("/", headers={"Origin": "https://elsewhere.example"}),
                   api.get("/nope", headers={"Origin": origin}),
                   api.request("OPTIONS", "/processes",
                               headers={"Origin": origin,
                                        "Access-Control-Request-Method": "POST"})]
        for r in replies:
            assert not [h for h in r.headers if h.startswith("access-control-")], r.headers
        assert replies[0].status == 200 and replies[1].status == 200
        assert replies[3].status in (200, 204, 403, 404, 405)
        assert replies[3].status >= 400 or replies[3].body == b""


BOOM_PLUGIN = """\
from gafferd import Plugin

__all__ = ["Boom"]


class App(object):
    def start(self, loop, manager):
        pass

    def stop(self):
        pass

    def restart(self):
        pass

    def routes(self):
        return [("GET", "crash", self.crash), ("GET", "fine", self.fine)]

    def crash(self, request):
        raise RuntimeError("deliberate handler bug")

    def fine(self, request):
        return 200, {"fine": True}


class Boom(Plugin):
    name = "boom"

    def app(self, cfg):
        return App()
"""


def test_handler_bug_gives_json_500_and_daemon_carries_on(daemon_factory, tmp_path):
    package = tmp_path / "plugins" / "boom" / "boom"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "main.py").write_text(BOOM_PLUGIN)
    d = daemon_factory(args=["-p", str(tmp_path / "plugins")])
    assert d.json("GET", "/_plugin/boom/api/fine") == {"fine": True}
    for _ in range(2):
        check_error(d.get("/_plugin/boom/api/crash"), 500, "internal_error")
    wait_for(lambda: "deliberate handler bug" in d.log() and "Traceback" in d.log(),
             message="the traceback in the log")
    assert d.get("/ping").body == b"OK"
    assert d.json("GET", "/_plugin/boom/api/fine") == {"fine": True}


# -- /metrics --------------------------------------------------------------------------

_M_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_L_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
_M_VALUE = re.compile(r"(?:[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|[+-]?Inf|NaN)\Z")
_M_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? ([^ ]+)(?: (-?\d+))?\Z")
_M_TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


def _parse_labels(text, where):
    """Parse ``{a="x",b="y\\"z"}`` strictly; return a dict."""
    assert text[0] == "{" and text[-1] == "}", where
    body, labels, i = text[1:-1], {}, 0
    while i < len(body):
        m = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)=\"").match(body, i)
        assert m, "bad label syntax at %r in %s" % (body[i:], where)
        name, i, value = m.group(1), m.end(), []
        while True:
            assert i < len(body), "unterminated label value in %s" % where
            c = body[i]
            if c == "\\":
                assert i + 1 < len(body) and body[i + 1] in "\\\"n", "bad escape in %s" % where
                value.append({"n": "\n"}.get(body[i + 1], body[i + 1]))
                i += 2
            elif c == '"':
                i += 1
                break
            else:
                assert c != "\n"
                value.append(c)
                i += 1
        assert name not in labels, "duplicate label %s in %s" % (name, where)
        assert not name.startswith("__"), where
        labels[name] = "".join(value)
        if i < len(body):
            assert body[i] == ",", "expected ',' in %s" % where
            i += 1
    return labels


def parse_prometheus(text):
    """A strict parser of the Prometheus text format (0.0.4) with promtool's
    lint rules (HELP and TYPE for every family, counters end in _total).
    Returns a list of (name, labels, value) samples."""
    assert text.endswith("\n"), "exposition must end with a newline"
    helps, types, samples, series = {}, {}, [], set()
    done, current = set(), None

    def family_of(name):
        for suffix in ("_bucket", "_sum", "_count"):
            base = name[:-len(suffix)]
            if name.endswith(suffix) and types.get(base) in ("histogram", "summary"):
                return base
        return name

    for lineno, line in enumerate(text.split("\n")[:-1], 1):
        where = "line %d: %r" % (lineno, line)
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[0] == "#" and parts[1] in ("HELP", "TYPE"):
                name = parts[2]
                assert _M_NAME.match(name), where
                if parts[1] == "TYPE":
                    assert len(parts) == 4 and parts[3] in _M_TYPES, where
                    assert name not in types, "second TYPE for %s" % name
                    assert name not in done and current != name, "TYPE after samples: " + where
                    types[name] = parts[3]
                else:
                    assert name not in helps, "second HELP for %s" % name
                    text_ = parts[3] if len(parts) == 4 else ""
                    assert not re.search(r"\\[^\\n]", text_.replace("\\\\", "")), where
                    helps[name] = text_
            continue
        m = _M_SAMPLE.match(line)
        assert m, "bad sample " + where
        name, labels_text, value, _ts = m.groups()
        labels = _parse_labels(labels_text, where) if labels_text else {}
        assert _M_VALUE.match(value), "bad value " + where
        family = family_of(name)
        if family != current:
            assert family not in done, "samples of %s are not grouped: %s" % (family, where)
            if current is not None:
                done.add(current)
            current = family
        key = (name, tuple(sorted(labels.items())))
        assert key not in series, "duplicate series " + where
        series.add(key)
        samples.append((name, labels, float(value)))
    for family in done | {current} - {None}:
        assert family in types, "no TYPE for %s" % family
        assert family in helps, "no HELP for %s" % family
        if types[family] == "counter":
            assert family.endswith("_total"), "counter %s lacks _total" % family
    return samples


class TestMetrics:
    def fetch(self, api):
        r = api.get("/metrics")
        assert r.status == 200, r
        ctype = r.headers.get("content-type", "")
        assert ctype.startswith("text/plain"), ctype
        return parse_prometheus(r.body.decode("utf-8"))

    def test_parser_rejects_bad_expositions(self):
        good = "# HELP gafferd_x_total X.\n# TYPE gafferd_x_total counter\ngafferd_x_total{a=\"b\"} 1\n"
        parse_prometheus(good)
        for bad in (good[:-1], good.replace("{a=", "{1a="), good.replace(" 1\n", " one\n"),
                    good.replace('"b"', "b"), good.replace("counter", "count"),
                    good + "gafferd_x_total{a=\"b\"} 2\n", good.replace("# HELP gafferd_x_total X.\n", ""),
                    good.replace("gafferd_x_total", "gafferd_x"),
                    good + "# HELP gafferd_y Y.\n# TYPE gafferd_y gauge\ngafferd_y 1\ngafferd_x_total 3\n"):
            with pytest.raises(AssertionError):
                parse_prometheus(bad)

    def test_metrics(self, api):
        api.wait_running("sleeper", 2)
        samples = self.fetch(api)
        assert all(name.startswith("gafferd_") for name, _, _ in samples)

        def find(words, labels=None, exclude=()):
            found = []
            for name, lab, value in samples:
                if all(w in name for w in words) and not any(x in name for x in exclude):
                    if labels is None or all(lab.get(k) == v for k, v in labels.items()):
                        found.append((name, lab, value))
            return found

        sleeper = {"name": "sleeper"}
        # per template: state, running and target counts, restarts, flapping give-ups
        assert find(["state"], sleeper), "no state metric for template sleeper"
        running = [v for n, lab, v in find(["running"], sleeper) if "state" not in n]
        assert 2.0 in running, find(["running"], sleeper)
        assert find(["restart"], sleeper), "no restarts metric"
        assert find(["flap"], sleeper) or find(["give"], sleeper), "no flapping metric"
        targets = [v for word in ("target", "max", "desired", "numprocesses", "wanted")
                   for _, _, v in find([word], {"name": "idle"})]
        assert 1.0 in targets, "no target count metric"
        # per process: uptime, cpu seconds, rss, fds
        per_process = [s for s in samples if s[1].get("name") == "sleeper" and len(s[1]) > 1]
        names = " ".join(n for n, _, _ in per_process)
        for word in ("uptime", "cpu", "fd"):
            assert word in names, (word, names)
        assert "rss" in names or "resident" in names or "memory" in names, names
        # daemon: uptime, children, http requests by class, open connections
        daemon = [s for s in samples if "name" not in s[1]]
        dnames = " ".join(n for n, _, _ in daemon)
        assert "uptime" in dnames and "children" in dnames and "connections" in dnames, dnames
        assert [s for s in samples if s[1].get("code") == "2xx"], "no code=\"2xx\" series"

    def test_request_counter_by_class(self, api):
        def count(samples, code):
            return sum(v for n, lab, v in samples if lab.get("code") == code and "request" in n)

        before = self.fetch(api)
        for _ in range(3):
            assert api.get("/nope").status == 404
        after = self.fetch(api)
        assert count(after, "4xx") >= count(before, "4xx") + 3
        assert count(after, "2xx") >= count(before, "2xx") + 1


# -- /processes/NAME/_log ----------------------------------------------------------------

class TestLog:
    def wait_second_run(self, api):
        def seen():
            r = api.get("/processes/talker/_log?lines=1")
            return (r.status == 200
                    and [x.rstrip("\r\n") for x in r.json()["lines"]] == ["second run"])
        wait_for(seen, message="the talker's second run")

    def lines(self, api, query):
        r = api.get("/processes/talker/_log" + query)
        assert r.status == 200 and is_json(r), r
        body = r.json()
        assert body["name"] == "talker"
        return body["label"], [line.rstrip("\r\n") for line in body["lines"]]

    def test_last_lines_include_exited_process(self, api):
        self.wait_second_run(api)
        label, lines = self.lines(api, "?lines=4")
        assert label == "stdout"
        assert lines == ["line 148", "line 149", "line 150", "second run"]

    def test_default_is_100_lines(self, api):
        self.wait_second_run(api)
        label, lines = self.lines(api, "")
        assert label == "stdout" and len(lines) == 100
        assert lines[-2:] == ["line 150", "second run"]
        assert lines[0] == "line 52"

    def test_label(self, api):
        self.wait_second_run(api)
        label, lines = self.lines(api, "?lines=10&label=stderr")
        assert (label, lines) == ("stderr", ["oops 1", "oops 2"])
        label, lines = self.lines(api, "?label=stdout&lines=2")
        assert (label, lines) == ("stdout", ["line 150", "second run"])

    def test_errors(self, api):
        check_error(api.get("/processes/nosuch/_log"), 404, "not_found")
        check_error(api.get("/processes/talker/_log?lines=abc"), 400, "bad_value")
        r = api.get("/processes/talker/_log?label=nolabel")
        assert r.status in (400, 404) and is_json(r), r


# -- POST /reload ---------------------------------------------------------------------------

RELOAD_V1 = """\
[process:keep]
cmd = sleep 300

[process:change]
cmd = sleep 300

[process:remove]
cmd = sleep 300

[process:scale]
cmd = sleep 300
"""

RELOAD_V2 = """\
[process:keep]
cmd = sleep 300

[process:change]
cmd = sleep 301

[process:scale]
cmd = sleep 300
numprocesses = 2

[process:new]
cmd = sleep 300
"""


class TestReload:
    def snapshot(self, d):
        names = d.json("GET", "/processes")
        return {n: (d.json("GET", "/processes/" + n)["cmd"], os_pids(d, n)) for n in names}

    def check_reply(self, r, dry_run):
        assert r.status == 200 and is_json(r), r
        body = r.json()
        assert set(body) >= {"added", "removed", "changed", "unchanged", "dry_run"}, body
        assert body["dry_run"] is dry_run
        assert sorted(body["added"]) == ["new"]
        assert sorted(body["removed"]) == ["remove"]
        assert sorted(body["changed"]) == ["change", "scale"]
        assert sorted(body["unchanged"]) == ["keep"]

    def test_reload(self, daemon_factory):
        d = daemon_factory(RELOAD_V1)
        for n in ("keep", "change", "remove", "scale"):
            d.wait_running(n, 1)
        before = self.snapshot(d)
        with open(d.config_path, "w") as f:
            f.write(RELOAD_V2)

        self.check_reply(d.post("/reload?dry_run=1"), True)
        assert self.snapshot(d) == before

        self.check_reply(d.post("/reload"), False)
        assert d.json("GET", "/processes")[:3] == ["keep", "change", "scale"]
        assert set(d.json("GET", "/processes")) == {"keep", "change", "scale", "new"}
        d.wait_running("new", 1)
        d.wait_running("scale", 2)
        after = self.snapshot(d)
        assert after["keep"] == before["keep"]                 # untouched
        assert before["scale"][1][0] in after["scale"][1]      # scaled in place
        assert after["change"][0] == "sleep 301"
        d.wait_running("change", 1)
        assert os_pids(d, "change") != before["change"][1]
        wait_for(lambda: not pid_alive(before["remove"][1][0]), message="removed one to die")
        check_error(d.get("/processes/remove"), 404, "not_found")

    def test_broken_config_changes_nothing(self, daemon_factory):
        d = daemon_factory(RELOAD_V1)
        for n in ("keep", "change", "remove", "scale"):
            d.wait_running(n, 1)
        before = self.snapshot(d)
        with open(d.config_path, "w") as f:
            f.write(RELOAD_V2.replace("numprocesses = 2", "numprocesses = two"))
        for path in ("/reload?dry_run=1", "/reload"):
            r = d.post(path)
            assert r.status == 400 and is_json(r), r
            body = r.json()
            assert "error" in body
            assert "numprocesses" in json.dumps(body), body
            assert self.snapshot(d) == before
        assert d.get("/ping").status == 200

    def test_reload_method(self, api):
        check_error(api.get("/reload"), 405, "method_not_allowed")
