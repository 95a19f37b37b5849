"""Every number a client, a config file or a plugin can give has a range
(gafferd.RANGES) and ASCII digits only.

``GET /watch?heartbeat=1e9`` once put a timer 1e9 s away in the loop;
when it became the nearest, epoll refused the timeout and the daemon
exited, orphaning every child.  These tests fuzz every numeric query
parameter, number in a path, JSON key and config key with huge, negative,
nan, inf, 1e400 and non-ASCII digits, and require a 400 (or a config error
naming the key, exit status 2, no traceback) and a daemon that still
answers.  The parameters and keys are enumerated from gafferd itself, so a
new one is fuzzed (or makes these tests fail until it is classified).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse

import pytest

from conftest import pid_alive, run_gafferd, wait_for

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gafferd  # noqa: E402

SLEEP = shutil.which("sleep") or "/bin/sleep"
SOURCE = open(gafferd.__file__, encoding="utf-8").read()

# What a number is not: too large for anything, negative, not finite,
# exponents, Python-only spellings (int() takes '1_0', '+5', ' 5') and
# digits of other scripts that str.isdigit() and int() accept.
BAD = ["1" + "0" * 30, "-5", "nan", "inf", "-inf", "1e400", "1e9", "1.5e3",
       "\u0661\u0662", "\u0665", "\xb2", "\uff15", "1_0", "+5", " 5", "5 ", "0x10"]

# -- enumerating what takes a number -------------------------------------------

# Every query parameter a handler reads; the numeric ones with the URLs that
# read them ({name}: a template, {id}: its process, {v}: the value).
NUMERIC_QUERY = {
    "heartbeat": ["/watch?feed=continuous&heartbeat={v}",
                  "/watch/proc?feed=eventsource&heartbeat={v}",
                  "/stats/{name}?feed=continuous&heartbeat={v}",
                  "/stats/{name}/{id}?feed=continuous&heartbeat={v}",
                  "/streams/{id}/stdout?feed=continuous&heartbeat={v}"],
    "lines": ["/processes/{name}/_log?lines={v}"],
    "pid": ["/processes/{name}/_log?pid={v}"],
    "tail": ["/streams/{id}/stdout?tail={v}"],
    "last_event_id": ["/streams/{id}/stdout?feed=eventsource&last_event_id={v}",
                      "/watch?feed=eventsource&last_event_id={v}"],
}
OTHER_QUERY = {"dry_run", "running", "label", "feed", "v", "no_deps",
               "rolling", "wait"}                # booleans of a rolling _restart

# Numbers in paths: (method, path).  Where a value that is not an id
# can also be a template name, 404 is right; a count or a signal is 400.
PATH_NUMBERS = [
    ("GET", "/processes/{v}"), ("HEAD", "/processes/{v}"), ("DELETE", "/processes/{v}"),
    ("POST", "/processes/{v}/_stop"), ("POST", "/processes/{v}/_signal/15"),
    ("GET", "/stats/{name}/{v}"), ("GET", "/streams/{v}/stdout"),
    ("POST", "/streams/{v}/stdin"), ("GET", "/wstreams/{v}"),
]
PATH_COUNTS = [("POST", "/processes/{name}/_add/{v}"), ("POST", "/processes/{name}/_sub/{v}"),
               ("POST", "/processes/{name}/_signal/{v}"), ("POST", "/processes/{id}/_signal/{v}")]


def query_parameters_in_source():
    names = set(re.findall(r"""req\.query(?:\.get\(|\[)["'](\w+)["']""", SOURCE))
    names |= set(re.findall(r"""["'](\w+)["'] in req\.query""", SOURCE))
    return names


def numeric_process_keys(table=None):
    """PROCESS_KEYS (or ENDPOINT_KEYS, which has the same format) whose
    coerce function takes '5' and refuses words: the numeric ones, found
    by their behaviour, not by a list."""
    ctx = {"base_dir": "/"}
    found = []
    for key, (coerce, _, _) in (table or gafferd.PROCESS_KEYS).items():
        try:
            coerce("5", ctx)
        except Exception:
            continue
        try:
            coerce("five", ctx)
        except ValueError:
            found.append(key)
    return found


def numeric_endpoint_keys():
    return numeric_process_keys(gafferd.ENDPOINT_KEYS)


def may_be_negative(key):
    return gafferd.RANGES.get(key, (0, 0))[0] < 0


def test_the_enumeration_finds_what_it_must():
    assert query_parameters_in_source() == set(NUMERIC_QUERY) | OTHER_QUERY, \
        "classify the new query parameter in NUMERIC_QUERY or OTHER_QUERY"
    assert {"numprocesses", "priority", "flapping", "graceful_timeout", "logfile_maxbytes",
            "logfile_backups", "output_buffer"} <= set(numeric_process_keys())
    assert set(numeric_endpoint_keys()) == {"backlog", "max_body_size", "keepalive_timeout",
                                            "request_timeout", "max_connections"}
    for key in numeric_process_keys() + numeric_endpoint_keys():
        # flapping and backoff are lists of numbers with ranges per field
        # (ids of users and groups are looked up; every rlimit_* key shares
        # the range of "rlimit")
        assert key in gafferd.RANGES or key in ("uid", "gid", "groups", "flapping", "backoff") or \
            key.startswith("rlimit_") and "rlimit" in gafferd.RANGES, key
    assert gafferd.MAX_DURATION == 7 * 24 * 3600


# -- a small raw client: a bad request must never become a stream ---------------

def raw_request(port, method, path, headers=(), body=b"", timeout=10.0):
    """(status, JSON body or None, connection closed?) of one request."""
    head = "%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\n" % (method, path)
    for name, value in headers:
        head += "%s: %s\r\n" % (name, value)
    if body:
        head += "Content-Length: %d\r\n" % len(body)
    data = head.encode("latin-1") + b"\r\n" + body
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        buf = b""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in buf:
            assert time.monotonic() < deadline, "no reply to %s %s" % (method, path)
            chunk = s.recv(65536)
            assert chunk, "closed without a reply to %s %s: %r" % (method, path, buf)
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        status = int(head.split()[1])
        m = re.search(rb"\r\ncontent-length: *(\d+)", head, re.I)
        if m is None or method == "HEAD":
            return status, None, head
        length = int(m.group(1))
        while len(rest) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
        try:
            return status, json.loads(rest[:length].decode("utf-8")), head
        except ValueError:
            return status, None, head


CONFIG = """
[process:talker]
cmd = %s
args = -c "import sys, time; print('hello', flush=True); time.sleep(600)"
redirect_output = stdout, stderr
""" % sys.executable


@pytest.fixture
def talker(gafferd):
    d = gafferd(CONFIG)
    d.wait_running("talker", 1)
    [proc_id] = d.pids("talker")
    return d, proc_id


def check_alive(d, proc_id):
    assert d.proc.poll() is None, d.log()
    assert d.get("/ping").status == 200
    assert d.pids("talker") == [proc_id]               # nothing scaled, signalled or stopped


def test_watch_with_a_heartbeat_of_1e9_seconds_is_a_400_not_a_dead_daemon(talker):
    d, proc_id = talker
    status, body, _ = raw_request(d.port, "GET", "/watch?heartbeat=1e9")
    assert status == 400 and body["error"] == "bad_value", body
    assert "heartbeat" in body["message"] and "604800" in body["message"], body
    check_alive(d, proc_id)


@pytest.mark.parametrize("value", BAD, ids=repr)
def test_numeric_query_parameters(talker, value):
    d, proc_id = talker
    for name, urls in NUMERIC_QUERY.items():
        for url in urls:
            path = url.format(name="talker", id=proc_id, v=urllib.parse.quote(value, safe=""))
            status, body, _ = raw_request(d.port, "GET", path)
            assert status == 400, (path, status, body)
            assert body["error"] == "bad_value" and name in body["message"], (path, body)
    # the header form of last_event_id
    status, body, _ = raw_request(d.port, "GET", "/streams/%d/stdout?feed=eventsource" % proc_id,
                                  headers=[("Last-Event-ID", urllib.parse.quote(value))])
    assert status == 400, (value, body)
    check_alive(d, proc_id)


@pytest.mark.parametrize("value", BAD, ids=repr)
def test_numbers_in_paths(talker, value):
    d, proc_id = talker
    v = urllib.parse.quote(value, safe="")
    for method, path in PATH_NUMBERS + PATH_COUNTS:
        expected = (400,) if (method, path) in PATH_COUNTS else (400, 404)
        path = path.format(name="talker", id=proc_id, v=v)
        status, body, _ = raw_request(d.port, method, path, body=b"x" if method == "POST" else b"")
        assert status in expected, (method, path, status, body)
    check_alive(d, proc_id)


@pytest.mark.parametrize("value", [b"\xb2", b"\xb9\xb2", b"1_0", b"+5", b"0x5", b"-1"], ids=repr)
def test_content_length_that_is_not_ascii_digits_is_a_400_and_a_closed_connection(talker, value):
    d, proc_id = talker
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
        s.sendall(b"POST /processes/%d/_stop HTTP/1.1\r\nHost: a\r\nContent-Length: " % proc_id
                  + value + b"\r\n\r\n2\r\nGET /ping HTTP/1.1\r\nHost: a\r\n\r\n")
        buf = b""
        deadline = time.monotonic() + 10
        while True:
            assert time.monotonic() < deadline
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    assert buf.startswith(b"HTTP/1.1 400 "), buf
    assert b"HTTP/1.1 200" not in buf                 # nothing after the bad framing is served
    check_alive(d, proc_id)


JSON_BAD = ["1e400", "NaN", "Infinity", "-Infinity", "1" + "0" * 30, "-5", "1e9",
            '"\u0661\u0662"', '"1_0"', '"+5"', '" 5"', '"nan"', '"1e400"', '"\xb2"', '"-5"']


def test_numbers_in_json_bodies(talker):
    d, proc_id = talker
    keys = numeric_process_keys()
    for i, raw in enumerate(JSON_BAD):
        for key in keys:
            if key in ("flapping", "backoff", "groups") and raw == '" 5"':
                continue       # a list "attempts, window, ...": blanks separate values
            if may_be_negative(key) and raw in ("-5", '"-5"'):
                continue
            body = ('{"name": "fz", "cmd": "%s", "args": "60", "start": false, "%s": %s}'
                    % (SLEEP, key, raw)).encode("utf-8")
            for method, path in (("POST", "/processes"), ("PUT", "/processes/talker")):
                status, reply, _ = raw_request(d.port, method, path, body=body)
                assert status == 400, (method, key, raw, status, reply)
                assert reply["error"] == "invalid_process_info", reply
                assert reply["message"].startswith(key + ":"), (key, reply)
    assert d.get("/processes/fz").status == 404
    check_alive(d, proc_id)


# -- config keys ------------------------------------------------------------------

INI_BAD = [v for v in BAD if v.strip() == v]      # an INI value is stripped: ' 5' is 5


def bad_config(tmp_path, value):
    """One file with ``value`` in every numeric key of [process:*] and
    [endpoint:*] (one section per key, so each gets its own line)."""
    text = "[gaffer]\nhttp_endpoints = %s\n\n" % ", ".join(numeric_endpoint_keys())
    expected = []
    for key in numeric_endpoint_keys():
        text += "[endpoint:%s]\nbind = 127.0.0.1:0\n%s = %s\n\n" % (key, key, value)
        expected.append("[endpoint:%s] %s" % (key, key))
    for key in numeric_process_keys():
        if value.startswith("-") and may_be_negative(key):
            continue
        text += "[process:%s]\ncmd = %s 60\n%s = %s\n\n" % (key, SLEEP, key, value)
        expected.append("[process:%s] %s" % (key, key))
    path = tmp_path / "bad.ini"
    path.write_text(text, encoding="utf-8")
    return str(path), expected


def gaffer_defaults_config(tmp_path, value):
    text = "[gaffer]\n" + "".join("%s = %s\n" % (k, value) for k in numeric_endpoint_keys())
    path = tmp_path / "defaults.ini"
    path.write_text(text, encoding="utf-8")
    return str(path), ["[gaffer] %s" % k for k in numeric_endpoint_keys()]


def assert_refused(result, expected):
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    for where in expected:
        assert [l for l in lines if where + ":" in l], (where, result.stderr)


@pytest.mark.parametrize("value", INI_BAD, ids=repr)
def test_numeric_config_keys_with_check(tmp_path, value):
    for make in (bad_config, gaffer_defaults_config):
        path, expected = make(tmp_path, value)
        assert_refused(run_gafferd(["--check", path]), expected)


@pytest.mark.parametrize("value", INI_BAD, ids=repr)
def test_backlog_on_the_command_line(value):
    result = run_gafferd(["--check", "--backlog", value])
    assert_refused(result, [])
    assert "--backlog" in result.stderr, result.stderr


def test_numeric_config_keys_on_reload(tmp_path, gafferd):
    d = gafferd(CONFIG, config_name="gaffer.ini")
    d.wait_running("talker", 1)
    [proc_id] = d.pids("talker")
    good = open(d.config_path).read()
    for value in INI_BAD:
        path, expected = bad_config(tmp_path, value)
        with open(d.config_path, "w") as f:
            f.write(good + "\n" + open(path).read().split("\n\n", 1)[1])
        r = d.post("/reload")
        assert r.status == 400, (value, r)
        errors = r.json()["errors"]
        for where in expected:
            if where.startswith("[process:"):
                assert [e for e in errors if where + ":" in e], (where, errors)
    with open(d.config_path, "w") as f:
        f.write(good)
    check_alive(d, proc_id)


# -- plugin sections: the healthcheck plugin ------------------------------------------

def healthcheck_module():
    root = os.path.join(os.path.dirname(gafferd.__file__), "gafferd_plugins", "healthcheck")
    sys.path.insert(0, root)
    try:
        from healthcheck import plugin
    finally:
        sys.path.remove(root)
    return plugin


def test_healthcheck_numeric_keys():
    plugin = healthcheck_module()
    numeric = [k for k, v in plugin.DEFAULTS.items() if isinstance(v, (int, float))] + ["grace"]
    assert set(numeric) >= {"interval", "timeout", "failures", "start_period", "grace"}
    for key in numeric:
        for value in INI_BAD:
            with pytest.raises(plugin.CheckConfigError) as info:
                plugin.parse_section("healthcheck:web", {"tcp": "127.0.0.1:80", key: value})
            assert ("%s: " % key) in str(info.value) or ("start_period" in str(info.value)
                                                        and key == "grace"), str(info.value)
    for value in INI_BAD + ["0", "65536"]:
        with pytest.raises(plugin.CheckConfigError):
            plugin.parse_section("healthcheck:web", {"tcp": "127.0.0.1:%s" % value})
        with pytest.raises(plugin.CheckConfigError):
            plugin.parse_section("healthcheck:web", {"http": "http://127.0.0.1/",
                                                     "expect_status": value})
    spec, _ = plugin.parse_section("healthcheck:web", {"tcp": "127.0.0.1:80",
                                                       "interval": "604800", "timeout": "0.5"})
    assert spec.interval == 604800 and spec.timeout == 0.5


# -- the last resort: a loop that cannot go on stops the children first --------------

BREAKER = '''
import signal
from gafferd import Plugin

__all__ = ["BreakerPlugin"]


class App:
    def start(self, loop, manager):
        self.loop = loop
        loop.add_signal_handler(signal.SIGUSR2, self.break_the_loop)

    def break_the_loop(self, signum):
        def broken(timeout=None):
            raise OSError("the selector is gone")
        self.loop._selector.select = broken

    def stop(self):
        pass

    def restart(self):
        pass


class BreakerPlugin(Plugin):
    name = "breaker"

    def app(self, cfg):
        return App()
'''


def test_a_daemon_whose_loop_cannot_go_on_stops_its_children_before_exiting(tmp_path, gafferd):
    base = tmp_path / "plugins" / "breaker" / "breaker"
    base.mkdir(parents=True)
    (base / "__init__.py").write_text("")
    (base / "main.py").write_text(BREAKER)
    d = gafferd("""
        [gaffer]
        plugins_dir = plugins

        [process:kids]
        cmd = %s 600
        numprocesses = 2
        graceful_timeout = 5
        """ % SLEEP)
    d.wait_running("kids", 2)
    os_pids = [d.os_pid(i) for i in d.pids("kids")]
    d.signal(signal.SIGUSR2)
    assert d.proc.wait(30) == 1, d.log()
    log = d.log()
    assert "error in the event loop itself" in log
    assert "stopping 2 process(es) before exiting" in log and "every process stopped" in log, log
    for pid in os_pids:
        assert not pid_alive(pid), (pid, log)
