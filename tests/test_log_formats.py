"""Log formats and syslog: ``log_format``, ``log_events``, ``syslog*`` keys of
``[process:NAME]``, ``[gaffer] syslog``, and ``-`` / non-seekable targets.

Real daemons, real children, real datagram sockets bound by the test.
"""
import datetime
import json
import os
import re
import socket
import stat
import subprocess
import threading
import time

from conftest import GAFFERD, PY, run_gafferd, script, section, wait_for

# lines.py: a few lines on stdout and stderr (one with non-ASCII text), a
# last line without its newline, then it sleeps.
LINES = r'''
import os, sys, time
os.write(1, b"first out\nsecond out\n")
os.write(2, b"an error\n")
os.write(1, "caf\u00e9 \u2603\n".encode())
os.write(1, b"no newline at the end")
time.sleep(0.3)
sys.exit(3)
'''

# chatty.py N: N short lines on stdout, as fast as it can, then sleeps.
CHATTY = r'''
import os, sys, time
n = int(sys.argv[1])
line = b"x" * 60 + b"\n"
for i in range(n // 100):
    os.write(1, line * 100)
open(sys.argv[2], "w").close()
time.sleep(600)
'''

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d$")


def lines_section(tmp_path, name="talk", **keys):
    keys.setdefault("restart", "never")
    return section(name, PY, script(tmp_path, "lines.py", LINES), **keys)


class Datagrams:
    """A bound datagram socket (AF_UNIX path or UDP on 127.0.0.1)."""

    def __init__(self, family, address):
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)
        self.address = self.sock.getsockname()
        self.got = []

    def poll(self):
        while True:
            try:
                self.got.append(self.sock.recv(65536))
            except BlockingIOError:
                return self.got

    def wait(self, predicate, timeout=10.0, message="datagrams"):
        return wait_for(lambda: [m for m in self.poll() if predicate(m)], timeout,
                        message="%s; got %r" % (message, self.got[-5:]))

    def close(self):
        self.sock.close()


def records(path):
    text = open(path, encoding="utf-8").read()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


# -- log_format = json ----------------------------------------------------------

def test_json_lines_parse_and_carry_the_right_fields(gafferd, tmp_path):
    log = tmp_path / "talk.log"
    before = datetime.datetime.now(datetime.timezone.utc)
    d = gafferd(lines_section(tmp_path, logfile=str(log), log_format="json"))
    wait_for(lambda: log.exists() and "no newline" in log.read_text(encoding="utf-8"),
             message="the last line in the log")
    got = records(log)
    after = datetime.datetime.now(datetime.timezone.utc)
    assert [(r["stream"], r["line"]) for r in got if r["stream"] == "stdout"] == [
        ("stdout", "first out"), ("stdout", "second out"), ("stdout", "caf\u00e9 \u2603"),
        ("stdout", "no newline at the end")]
    assert [r["line"] for r in got if r["stream"] == "stderr"] == ["an error"]
    for r in got:
        assert set(r) == {"time", "name", "id", "pid", "stream", "line"}
        assert r["name"] == "talk"
        assert RFC3339.match(r["time"]), r["time"]
        when = datetime.datetime.fromisoformat(r["time"])
        assert when.utcoffset() is not None
        assert before - datetime.timedelta(seconds=1) <= when <= after
    # id is the internal process id (1, the first), pid the OS pid of the child.
    ids = {r["id"] for r in got}
    pids = {r["pid"] for r in got}
    assert ids == {1} and len(pids) == 1
    pid = pids.pop()
    assert isinstance(pid, int) and pid > 1 and pid != d.pid
    # The API shows the keys.
    shown = d.json("GET", "/processes/talk")
    assert shown["log_format"] == "json"


def test_json_ids_match_the_api(gafferd, tmp_path):
    log = tmp_path / "echo.log"
    echo = script(tmp_path, "echo.py", "import sys\nfor l in sys.stdin: print(l.strip())\n")
    d = gafferd(section("echo", PY, "-u " + echo,
                        redirect_input="true", stdout_logfile=str(log), log_format="json"))
    d.wait_running("echo", 1)
    internal = d.pids("echo")[0]
    os_pid = d.os_pid(internal)
    assert d.post("/streams/%d/stdin" % internal, body=b"hello json\n").status == 200
    wait_for(lambda: log.exists() and "hello json" in log.read_text(), message="the line")
    (rec,) = records(log)
    assert (rec["id"], rec["pid"], rec["stream"], rec["line"]) == (
        internal, os_pid, "stdout", "hello json")


def test_json_via_the_api_and_bad_values_name_the_key(gafferd, tmp_path):
    d = gafferd("")
    body = {"name": "j", "cmd": PY, "args": "-c 'import time; time.sleep(60)'",
            "logfile": str(tmp_path / "j.log"), "log_format": "json", "log_events": True,
            "syslog": True, "syslog_address": "udp:127.0.0.1:9", "syslog_facility": "local3",
            "syslog_tag": "jtag"}
    assert d.post("/processes", body=body).status == 200
    shown = d.json("GET", "/processes/j")
    for key in ("log_format", "log_events", "syslog", "syslog_address", "syslog_facility",
                "syslog_tag"):
        assert shown[key] == body[key], key
    for key, bad, words in (("log_format", "xml", "raw or json"),
                            ("syslog_address", "udp:example.com:514", "literal IP"),
                            ("syslog_address", "udp:127.0.0.1:0", "port"),
                            ("syslog_address", "tcp:127.0.0.1:514", "udp:HOST:PORT"),
                            ("syslog_facility", "local9", "local0"),
                            ("syslog_tag", "two words", "no blanks"),
                            ("syslog", "maybe", "")):
        r = d.post("/processes", body={"name": "bad", "cmd": PY, key: bad})
        assert r.status == 400, (key, bad, r)
        assert key in r.body.decode() and words in r.body.decode(), r.body


def test_ini_errors_name_the_key(tmp_path):
    config = tmp_path / "gaffer.ini"
    config.write_text(section("x", PY, log_format="yaml", syslog_address="udp:host:1") +
                      "[gaffer]\nsyslog_facility = nope\n")
    result = run_gafferd(["--check", str(config)])
    assert result.returncode == 2
    for key in ("log_format", "syslog_address", "syslog_facility"):
        assert key in result.stderr, result.stderr


# -- log_events -------------------------------------------------------------------

def test_log_events_tell_the_story_in_one_file(gafferd, tmp_path):
    raw, js, quiet = tmp_path / "raw.log", tmp_path / "json.log", tmp_path / "quiet.log"
    d = gafferd(lines_section(tmp_path, "raw", logfile=str(raw), log_events="true") +
                lines_section(tmp_path, "js", logfile=str(js), log_events="true",
                              log_format="json") +
                lines_section(tmp_path, "quiet", logfile=str(quiet)))
    wait_for(lambda: raw.exists() and "exit status 3" in raw.read_text(),
             message="the exit line in raw.log")
    text = raw.read_text()
    spawn = re.search(r"^gafferd: raw\[(\d+)\] spawned \(pid (\d+)\)$", text, re.M)
    assert spawn, text
    assert text.index("spawned") < text.index("first out") < text.index("exit status 3")
    assert re.search(r"^gafferd: raw\[%s\] \(pid %s\) exit status 3 after [\d.]+s up$"
                     % spawn.groups(), text, re.M), text
    assert d.post("/processes/raw/_restart").status == 200
    wait_for(lambda: "gafferd: raw: restart asked" in raw.read_text(), message="restart line")
    wait_for(lambda: raw.read_text().count("spawned") == 2, message="the second spawn")
    # json: the same story as records of stream "gafferd".
    wait_for(lambda: js.exists() and "exit status 3" in js.read_text(), message="js exit")
    events = [r for r in records(js) if r["stream"] == "gafferd"]
    assert [e["line"].split(" ", 2)[1] for e in events][:2] == ["js:", "js[%d]" % events[1]["id"]]
    spawned = [e for e in events if "spawned" in e["line"]][0]
    assert spawned["pid"] and spawned["id"]
    assert any("exit status 3" in e["line"] for e in events)
    # Without log_events the file holds the output only.
    wait_for(lambda: quiet.exists() and "no newline" in quiet.read_text(), message="quiet")
    assert "gafferd:" not in quiet.read_text()


# -- syslog -------------------------------------------------------------------------

def test_syslog_lines_arrive_with_priority_and_tag(gafferd, tmp_path):
    sink = Datagrams(socket.AF_UNIX, str(tmp_path / "log.sock"))
    try:
        d = gafferd(lines_section(tmp_path, "web:api", syslog="true",
                                  syslog_address="unix:" + str(tmp_path / "log.sock"),
                                  syslog_facility="local0") +
                    lines_section(tmp_path, "tagged", syslog="true",
                                  syslog_address=str(tmp_path / "log.sock"),
                                  syslog_tag="myapp"))
        sink.wait(lambda m: b"no newline" in m and b"web.api" in m, message="web:api")
        sink.wait(lambda m: b"no newline" in m and b"myapp" in m, message="tagged")
        line = re.compile(rb"^<(\d+)>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d ([^\[ ]+)\[(\d+)\]: (.*)$",
                          re.S)
        parsed = [line.match(m).groups() for m in sink.poll()]
        assert all(parsed), sink.got
        web = [(int(p), msg) for p, tag, _, msg in parsed if tag == b"web.api"]
        # local0 = 16: stdout at INFO (16*8+6 = 134), stderr at ERR (16*8+3 = 131).
        assert (134, b"first out") in web and (134, b"second out") in web
        assert (131, b"an error") in web
        assert (134, "caf\u00e9 \u2603".encode()) in web
        assert (134, b"no newline at the end") in web
        tagged = [(int(p), msg) for p, tag, _, msg in parsed if tag == b"myapp"]
        # The default facility is user = 1: 14 and 11.
        assert (14, b"first out") in tagged and (11, b"an error") in tagged
        pids = {pid for _, tag, pid, _ in parsed if tag == b"web.api"}
        assert len(pids) == 1 and int(pids.pop()) != d.pid
        metrics = d.get("/metrics").body.decode()
        sent = re.search(r'gafferd_syslog_sent_total\{address="unix:%s"\} (\d+)'
                         % re.escape(str(tmp_path / "log.sock")), metrics)
        assert sent and int(sent.group(1)) >= 5, metrics
    finally:
        sink.close()


def test_syslog_over_udp_names_the_host(gafferd, tmp_path):
    sink = Datagrams(socket.AF_INET, ("127.0.0.1", 0))
    try:
        gafferd(lines_section(tmp_path, "udp", syslog="true", syslog_facility="daemon",
                              syslog_address="udp:127.0.0.1:%d" % sink.address[1]))
        (msg,) = sink.wait(lambda m: b"an error" in m, message="the stderr line")
        host = socket.gethostname().split(".")[0].encode()
        assert re.match(rb"^<27>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d %s udp\[\d+\]: an error$"
                        % re.escape(host), msg), msg
    finally:
        sink.close()


def test_daemon_lines_go_to_syslog(gafferd, tmp_path):
    sink = Datagrams(socket.AF_UNIX, str(tmp_path / "log.sock"))
    try:
        d = gafferd("[gaffer]\nsyslog = true\nsyslog_address = %s\nsyslog_facility = local7\n"
                    % (tmp_path / "log.sock") + section(
                        "fail", PY, "-c 'import sys; sys.exit(1)'", restart="never"))
        # local7 = 23: INFO 190, WARNING 188.
        (ready,) = sink.wait(lambda m: b"ready (pid %d)" % d.pid in m, message="ready line")
        assert re.match(rb"^<190>.{15} gafferd\[%d\]: gafferd \S+ ready" % d.pid, ready), ready
        sink.wait(lambda m: m.startswith(b"<188>") and b"exit status 1" in m,
                  message="the warning about the failed program")
        metrics = d.get("/metrics").body.decode()
        assert re.search(r'gafferd_syslog_sent_total\{address="%s"\} [1-9]'
                         % re.escape(str(tmp_path / "log.sock")), metrics), metrics
    finally:
        sink.close()


def ping_times(d, count):
    times = []
    for _ in range(count):
        t0 = time.monotonic()
        assert d.get("/ping").status == 200
        times.append(time.monotonic() - t0)
    return sorted(times)


def test_a_missing_or_full_syslog_socket_never_slows_the_api(gafferd, tmp_path):
    # Two programs write 200,000 lines each: one to a path nobody listens on,
    # one to a socket the test binds but never reads (it fills up at once).
    full = Datagrams(socket.AF_UNIX, str(tmp_path / "full.sock"))
    try:
        chatty = script(tmp_path, "chatty.py", CHATTY)
        d = gafferd(
            section("missing", PY, "%s 200000 %s" % (chatty, tmp_path / "m.done"), syslog="true",
                    syslog_address=str(tmp_path / "nobody.sock")) +
            section("full", PY, "%s 200000 %s" % (chatty, tmp_path / "f.done"), syslog="true",
                    syslog_address=str(tmp_path / "full.sock")))
        times = ping_times(d, 200)
        wait_for(lambda: (tmp_path / "m.done").exists() and (tmp_path / "f.done").exists(),
                 timeout=60, message="both programs to write their lines")
        p50, p95, worst = times[100], times[190], times[-1]
        print("ping while dropping: p50 %.1f ms, p95 %.1f ms, max %.1f ms"
              % (p50 * 1e3, p95 * 1e3, worst * 1e3))
        assert p95 < 0.25 and worst < 2.0, (p50, p95, worst)
        metrics = d.get("/metrics").body.decode()
        dropped = {a: int(n) for a, n in re.findall(
            r'gafferd_syslog_dropped_total\{address="([^"]+)"\} (\d+)', metrics)}
        wait_for(lambda: dict((a, int(n)) for a, n in re.findall(
            r'gafferd_syslog_dropped_total\{address="([^"]+)"\} (\d+)',
            d.get("/metrics").body.decode())).get(str(tmp_path / "nobody.sock"), 0) >= 200000,
            timeout=30, message="every line to the missing socket counted as dropped")
        assert dropped.get(str(tmp_path / "full.sock"), 0) > 0, metrics
        # One warning a minute per address, not one per line.
        assert d.log().count("syslog %s" % (tmp_path / "nobody.sock")) == 1, d.log()
    finally:
        full.close()


# -- '-' and other targets that cannot seek -----------------------------------------

def test_dash_on_a_pipe_is_never_rotated(daemon_factory, tmp_path):
    lines = script(tmp_path, "chatty.py", CHATTY)
    d = daemon_factory(section("c", PY, "%s 5000 %s" % (lines, tmp_path / "done"),
                               stdout_logfile="-", logfile_maxbytes="1KB", logfile_backups=2,
                               log_format="json"), start=False)
    d._log = open(d.log_path, "wb")
    d._out = None
    d.proc = subprocess.Popen([PY, GAFFERD] + d.args + [d.config_path], cwd=d.dir,
                              stdout=subprocess.PIPE, stderr=d._log,
                              stdin=subprocess.DEVNULL, env=d.env)
    chunks = []
    reader = threading.Thread(target=lambda: chunks.extend(
        iter(lambda: d.proc.stdout.read1(65536), b"")), daemon=True)
    reader.start()
    try:
        d.wait_ready()
        wait_for(lambda: b"".join(chunks).count(b'"stream": "stdout"') == 5000, timeout=30,
                 message="5000 json lines on the daemon's stdout (300 KB through a 1 KB limit)")
        assert all(json.loads(line)["line"] == "x" * 60
                   for line in b"".join(chunks).splitlines())
        assert "Illegal seek" not in d.log() and "cannot write" not in d.log()
        assert not [p for p in os.listdir(d.dir) if p.startswith("-")]
        assert d.stop() == 0
    finally:
        d.close()
        reader.join(5)
        d.proc.stdout.close()


def test_dash_on_a_regular_file_and_a_fifo_are_never_truncated(gafferd, tmp_path):
    # The daemon's stdout is a regular file here (the harness's): '-' still
    # never rotates or truncates it.  A FIFO with a reader is written to,
    # never rotated either.
    fifo = tmp_path / "fifo"
    os.mkfifo(str(fifo))
    reader = os.open(str(fifo), os.O_RDONLY | os.O_NONBLOCK)
    got = bytearray()
    try:
        lines = script(tmp_path, "chatty.py", CHATTY)
        d = gafferd(section("c", PY, "%s 3000 %s" % (lines, tmp_path / "done"),
                            stdout_logfile="-", logfile_maxbytes="1KB", logfile_backups=0) +
                    section("f", PY, "%s 3000 %s" % (lines, tmp_path / "done2"),
                            stdout_logfile=str(fifo), logfile_maxbytes="1KB",
                            logfile_backups=1))

        def fifo_lines():
            try:
                while True:
                    data = os.read(reader, 65536)
                    if not data:
                        break
                    got.extend(data)
            except BlockingIOError:
                pass
            return got.count(b"\n") >= 3000      # 183 KB: more than a pipe holds
        wait_for(lambda: d.output().count("\n") >= 3000, timeout=30,
                 message="3000 lines in the daemon's stdout file")
        wait_for(fifo_lines, timeout=30, message="3000 lines through the FIFO (more than it holds: the rest follows)")
        assert d.output().count("x" * 60 + "\n") == 3000
        assert stat.S_ISFIFO(os.stat(str(fifo)).st_mode)
        assert not os.path.exists(str(fifo) + ".1")
        assert "Illegal seek" not in d.log() and "cannot write" not in d.log(), d.log()
    finally:
        os.close(reader)
