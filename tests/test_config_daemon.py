"""A config file through a real daemon, end to end: ``gafferd --check``
and a daemon refusing a bad file (its one line and exit status 2), and a
good file's settings reaching the running children (their cwd, argv,
environment, log files), the listeners, the plugins and the webhooks.
How each key is parsed and checked is tested in-process, fast, in
test_config.py; these are the few runs that show the daemon uses it.
"""
import http.server
import os
import pwd
import grp
import shutil
import signal
import socket
import subprocess
import threading

import pytest

from conftest import PY, proc_cmdline, run_gafferd, wait_for
from test_config import (BAD, BAD_NAMES, DID_YOU_MEAN, SH, SLEEP, bad_config, load, sub,
                         write)
import test_config


# -- helpers -------------------------------------------------------------------


def check(path, cwd=None, timeout=20.0):
    return run_gafferd(["--check", str(path)], cwd=cwd, timeout=timeout)


def stderr_lines(result):
    return [line for line in result.stderr.splitlines() if line.strip()]


def single_error_line(result):
    """The one error line of a refused config (exit status 2, no traceback)."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert "Traceback" not in result.stdout, result.stdout
    lines = stderr_lines(result)
    assert len(lines) == 1, "expected exactly one error line, got:\n" + result.stderr
    return lines[0]


def start(gafferd, config_path, *args, bind=True):
    """Start a daemon on ``config_path``; the daemon's cwd is tmp_path
    (so a config in a sub-directory is run from a *different* cwd)."""
    return gafferd(None, args=list(args) + [str(config_path)], bind=bind)


def definition(d, name):
    return d.json("GET", "/processes/" + name)


def os_pids(d, name):
    return [d.os_pid(i) for i in d.pids(name)]


def wait_os_pids(d, name, count, timeout=10.0):
    d.wait_running(name, count, timeout)
    return wait_for(lambda: (lambda p: len(p) == count and p)(os_pids(d, name)),
                    timeout, message="%d os pids for %s" % (count, name))


def read_when_present(path, timeout=10.0):
    def content():
        try:
            with open(path) as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data if data.endswith("\n") else None
    return wait_for(content, timeout, message="%s to be written" % path)


# -- --check and refusals ----------------------------------------------------------

def test_check_prints_templates_exits_0_and_starts_nothing(tmp_path):
    marker = tmp_path / "ran"
    path = write(tmp_path / "gaffer.ini", sub("""
        [process:alpha]
        cmd = @SLEEP@ 60
        numprocesses = 2

        [process:beta:worker]
        cmd = @SLEEP@ 61
        start = false

        [process:touch]
        cmd = touch @M@
        """, M=marker))
    r = check(path)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert "alpha" in r.stdout and "beta:worker" in r.stdout, r.stdout
    assert "%s 60" % SLEEP in r.stdout and "%s 61" % SLEEP in r.stdout, r.stdout
    assert not any("error" in line.lower() for line in stderr_lines(r)), r.stderr
    assert not marker.exists()


def test_check_refuses_a_bad_config_with_one_line_and_status_2(tmp_path):
    path, section, key, fragments, fname = bad_config(tmp_path, "error-in-include")
    line = single_error_line(check(path, cwd=str(tmp_path)))
    assert fname in line and "[%s] %s" % (section, key) in line, line
    for fragment in fragments:
        assert fragment in line, (fragment, line)


def test_check_reports_every_mistake_and_its_warning(tmp_path):
    path = write(tmp_path / "gaffer.ini", sub("""
        [process:web]
        cmd = @SLEEP@ 60
        numprocesses = two
        priority = high
        numproceses = 3
        """))
    r = check(path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    errors = [l for l in stderr_lines(r) if "WARNING" not in l]
    assert [l.split(": ")[1] for l in errors] == ["[process:web] numprocesses",
                                                  "[process:web] priority"], r.stderr
    warnings = [l for l in stderr_lines(r) if "WARNING" in l]
    assert len(warnings) == 1 and DID_YOU_MEAN in warnings[0], r.stderr


@pytest.mark.parametrize("case_id", ["int-numprocesses", "unknown-uid",
                                     "missing-executable-relative", "misspelt-process",
                                     "non-loopback-without-token", "error-in-include"])
def test_bad_config_refused_at_start_up(tmp_path, case_id):
    """Without --check, the daemon refuses the same configs the same way."""
    assert [c for c in BAD if c[0] == case_id]
    path, section, key, fragments, fname = bad_config(tmp_path, case_id)
    r = run_gafferd([path, "--bind", "127.0.0.1:0"], cwd=str(tmp_path), timeout=15)
    line = single_error_line(r)
    assert "[%s]" % section in line, line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert r.stdout == ""


def test_missing_config_file(tmp_path):
    missing = str(tmp_path / "nope.ini")
    line = single_error_line(run_gafferd([missing, "--bind", "127.0.0.1:0"], timeout=15))
    assert "nope.ini" in line
    line = single_error_line(check(missing))
    assert "nope.ini" in line


def test_help_describes_the_program():
    r = run_gafferd(["--help"])
    assert r.returncode == 0
    assert "watchers" not in r.stdout
    assert "process supervisor" in r.stdout


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["--check", "CONFIG"],
                                  ["CONFIG", "--bind", "127.0.0.1:0", "--check"]])
def test_no_traceback_when_the_reader_of_the_output_is_gone(tmp_path, args):
    # The `| head -1` case made certain: the pipe is closed before gafferd writes.
    lines = "".join("[process:p%d]\ncmd = @SLEEP@ 60\n" % i for i in range(300))
    path = write(tmp_path / "gaffer.ini", sub(lines))
    r_fd, w_fd = os.pipe()
    os.close(r_fd)
    try:
        p = subprocess.run([PY, os.path.join(os.path.dirname(__file__), "..", "gafferd.py")]
                           + [path if a == "CONFIG" else a for a in args],
                           stdout=w_fd, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                           timeout=30, universal_newlines=True)
    finally:
        os.close(w_fd)
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr
    assert p.stderr == "", p.stderr
    assert p.returncode in (-13, 141, 0), p.returncode


# -- a good config: what the running daemon does with it ----------------------------

def test_parsing_rules_reach_the_api_and_the_children(tmp_path, gafferd):
    # case kept in names, option names lower-cased, ':' separators, no %
    # interpolation, no inline comments: what a shell child is given
    out, a, b = tmp_path / "pct.txt", tmp_path / "a.txt", tmp_path / "b.txt"
    path = write(tmp_path / "conf" / "gaffer.ini", sub("""
        [process:WebApp]
        CMD: @SLEEP@ 60
        NumProcesses: 2
        Priority = 3

        [env:WebApp]
        Port: 8080

        [process:pctrun]
        cmd = printf '100%% %s\\n' ok > @OUT@; exec @SLEEP@ 60
        shell = true
        priority = 4

        [process:semi]
        cmd = echo one > @A@ ; echo two > @B@ ; exec @SLEEP@ 60
        shell = true
        priority = 5
        """, OUT=out, A=a, B=b))
    d = start(gafferd, path)
    assert d.json("GET", "/processes") == ["WebApp", "pctrun", "semi"]
    d.wait_running("WebApp", 2)
    info = definition(d, "WebApp")
    assert info["name"] == "WebApp"
    assert info["cmd"] == "%s 60" % SLEEP
    assert info["numprocesses"] == 2
    assert info["priority"] == 3
    assert info["env"] == {"PORT": "8080"}
    assert d.status("WebApp")["max_processes"] == 2
    # printf turns %% into %: the shell saw the value uninterpolated.
    assert read_when_present(str(out)) == "100% ok\n"
    assert read_when_present(str(a)) == "one\n"
    assert read_when_present(str(b)) == "two\n"
    # GET /processes/NAME is the spec's definition the in-process tests check
    cfg = load(path)
    for name in ("WebApp", "pctrun", "semi"):
        assert definition(d, name) == test_config.definition(cfg, name), name


def test_process_keys_reach_the_processes(tmp_path, gafferd):
    user = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    path = write(tmp_path / "gaffer.ini", sub("""
        [process:full]
        cmd = @SLEEP@
        args = 60
        uid = @UID@
        gid = @GID@
        detach = yes
        numprocesses = 2
        flapping = 3, 2., 4., 6

        [process:named]
        cmd = @SLEEP@ 60
        uid = @USER@
        gid = @GROUP@
        start = FALSE

        [process:plain]
        cmd = @SLEEP@ 60
        """, UID=os.getuid(), GID=os.getgid(), USER=user, GROUP=group))
    d = start(gafferd, path)
    d.wait_running("full", 2)
    d.wait_running("plain", 1)
    assert d.status("named")["running"] == 0
    named = definition(d, "named")
    assert named["uid"] == user and named["gid"] == group
    assert definition(d, "full")["flapping"] == {"attempts": 3, "window": 2.0,
                                                 "retry_in": 4.0, "max_retry": 6}
    # The processes really run: detached children lead their own session.
    for pid in os_pids(d, "full"):
        assert os.getsid(pid) == pid


def test_plugins_dir_key_relative_to_config_file(tmp_path, gafferd):
    conf = tmp_path / "conf"
    marker = tmp_path / "marker.txt"
    write(conf / "plugs" / "markdir" / "markpkg" / "__init__.py", "")
    write(conf / "plugs" / "markdir" / "markpkg" / "main.py", """
        from gafferd import Plugin

        __all__ = ["MarkPlugin"]


        class MarkApp(object):
            def __init__(self, cfg):
                self.path = cfg.get("myplugin", "marker")

            def start(self, loop, manager):
                with open(self.path, "w") as f:
                    f.write("started\\n")

            def stop(self):
                pass

            def restart(self):
                pass


        class MarkPlugin(Plugin):
            name = "mark"

            def app(self, cfg):
                return MarkApp(cfg)
        """)
    path = write(conf / "gaffer.ini", "[gaffer]\nplugins_dir = plugs\n\n[myplugin]\n"
                 "marker = %s\n" % marker)
    # A -p option is beaten by the config key.
    os.makedirs(str(tmp_path / "other"))
    start(gafferd, path, "-p", str(tmp_path / "other"))
    assert read_when_present(str(marker)) == "started\n"


def test_included_templates_run(tmp_path, gafferd):
    conf = tmp_path / "conf"
    write(conf / "extra" / "one.ini", sub("""
        [process:one]
        cmd = @SLEEP@ 60
        """))
    write(conf / "more" / "sub" / "c.ini", sub("""
        [process:c]
        cmd = @SLEEP@ 60
        """))
    write(conf / "more" / "a.ini", sub("""
        [process:a]
        cmd = @SLEEP@ 60
        numprocesses = 2
        """))
    path = write(conf / "gaffer.ini", sub("""
        [gaffer]
        include = extra/one.ini missing.ini
        include_dir = more

        [process:main]
        cmd = @SLEEP@ 60
        """))
    d = start(gafferd, path)
    assert d.json("GET", "/processes") == ["main", "one", "a", "c"]
    d.wait_running("a", 2)
    d.wait_running("c", 1)
    d.wait_running("one", 1)


def test_an_unknown_key_is_warned_about_in_the_daemon_log(tmp_path, gafferd):
    path = write(tmp_path / "gaffer.ini", sub("""
        [process:web]
        cmd = @SLEEP@ 60
        numprocess = 2
        """))
    d = start(gafferd, path)
    d.wait_running("web", 1)
    assert "did you mean 'numprocesses'?" in d.log()


PRINTER = """\
import sys
sys.stdout.write("to-stdout\\n"); sys.stdout.flush()
sys.stderr.write("to-stderr\\n"); sys.stderr.flush()
import time
time.sleep(60)
"""


def _log_has(path, text):
    return os.path.exists(path) and text in open(path).read()


def test_stdout_and_stderr_logfile_without_redirect_output(tmp_path, gafferd):
    write(tmp_path / "printer.py", PRINTER)
    path = write(tmp_path / "gaffer.ini", sub("""
        [process:p]
        cmd = @PY@
        args = printer.py
        stdout_logfile = out.log
        stderr_logfile = err.log
        """))
    d = start(gafferd, path)
    out, err = str(tmp_path / "out.log"), str(tmp_path / "err.log")
    wait_for(lambda: _log_has(out, "to-stdout") and _log_has(err, "to-stderr"),
             message="both log files written")
    assert "to-stderr" not in open(out).read() and "to-stdout" not in open(err).read()


# -- listeners, webhooks, order of start ------------------------------------------


def test_http_endpoints_are_stripped_and_unlisted_endpoints_unused(tmp_path, gafferd):
    unlisted = tmp_path / "unlisted.sock"
    path = write(tmp_path / "gaffer.ini", sub("""
        [gaffer]
        http_endpoints =  one ,two

        [endpoint:one]
        bind = 127.0.0.1:0
        backlog = 7

        [endpoint:two]
        bind = 127.0.0.1:0

        [endpoint:three]
        bind = unix:@U@
        """, U=unlisted))
    d = start(gafferd, path, bind=False)
    tcp = [u for u in d.urls if u.startswith("http://127.0.0.1:")]
    assert len(tcp) == 2, d.urls
    assert len(set(tcp)) == 2
    for url in tcp:
        port = int(url.rsplit(":", 1)[1])
        conn = socket.create_connection(("127.0.0.1", port), timeout=5)
        conn.sendall(b"GET /ping HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        data = b""
        while True:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        conn.close()
        assert data.startswith(b"HTTP/1.") and b" 200 " in data.split(b"\r\n")[0], data
    assert not unlisted.exists()
    assert not any(u.startswith("unix:") for u in d.urls), d.urls
    # backlog in an endpoint section is honoured (gaffer 0.4.4 crashed on it).
    ss = shutil.which("ss")
    if ss:  # iproute2 present
        backlogs = []
        for url in tcp:
            out = subprocess.run([ss, "-Hltn", "sport = :%s" % url.rsplit(":", 1)[1]],
                                 stdout=subprocess.PIPE, universal_newlines=True).stdout
            backlogs += [int(l.split()[2]) for l in out.splitlines() if l.startswith("LISTEN")]
        assert sorted(backlogs) == [7, 128], backlogs


def test_listed_but_missing_endpoint_falls_back_to_default(tmp_path, gafferd):
    path = write(tmp_path / "gaffer.ini", sub("""
        [gaffer]
        http_endpoints = ghost, nobind

        [endpoint:nobind]
        backlog = 5

        [process:x]
        cmd = @SLEEP@ 60
        """))
    d = start(gafferd, path, "--bind", "127.0.0.1:0", bind=False)
    assert d.port is not None, d.log()
    assert len(d.urls) == 1, d.urls
    assert d.get("/ping").status == 200
    assert d.json("GET", "/processes") == ["x"]


def test_include_dir_sorted_order_decides_start_order_on_priority_ties(tmp_path, gafferd):
    log = tmp_path / "order.log"
    conf = tmp_path / "conf"
    for name in ("zeta", "alpha", "mid"):
        write(conf / "d" / ("%s.ini" % name), sub("""
            [process:@N@]
            cmd = echo @N@ >> @LOG@; exec @SLEEP@ 60
            shell = true
            priority = 1
            """, N=name, LOG=log))
    path = write(conf / "gaffer.ini", "[gaffer]\ninclude_dir = d\n")
    d = start(gafferd, path)
    for name in ("alpha", "mid", "zeta"):
        d.wait_running(name, 1)
    assert d.json("GET", "/processes") == ["alpha", "mid", "zeta"]
    wait_for(lambda: log.exists() and len(log.read_text().split()) == 3,
             message="three start lines")


def test_webhooks_key_case_kept_and_several_urls(tmp_path, gafferd):
    received = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            received.append((self.path, body))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = "http://127.0.0.1:%d" % server.server_address[1]
        path = write(tmp_path / "gaffer.ini", sub("""
            [webhooks]
            proc.WebApp.spawn = @B@/first   @B@/second
            proc.Other.spawn = @B@/other

            [process:WebApp]
            cmd = @SLEEP@ 60
            """, B=base))
        d = start(gafferd, path)
        d.wait_running("WebApp", 1)
        wait_for(lambda: {p for p, _ in received} >= {"/first", "/second"},
                 message="both webhook URLs to be called")
        for p, body in received:
            if p in ("/first", "/second"):
                assert b"proc.WebApp.spawn" in body, body
        # Exact matching: a hook of another template never fires.
        assert "/other" not in {p for p, _ in received}
    finally:
        server.shutdown()
        server.server_close()


# -- environment, paths, crash loops -----------------------------------------------


def test_env_section_upper_cased_explicit_wins_over_os_environ(tmp_path, gafferd):
    merged, bare = tmp_path / "merged.txt", tmp_path / "bare.txt"
    path = write(tmp_path / "gaffer.ini", sub("""
        [process:merged]
        cmd = @SH@
        args = -c 'echo "$PORT|$FOO|$ONLYOS|$MixedCase" > @M@; exec @SLEEP@ 60'

        [env:merged]
        port = 80
        Foo = fromini
        mixedcase = mc

        [process:bare]
        cmd = @SH@
        args = -c 'echo "[$PORT][$$ONLYOS]" > @B@; exec @SLEEP@ 60'
        os_env = false

        [env:bare]
        PORT = 81
        """, SH=SH, M=merged, B=bare))
    d = gafferd(None, args=[path], env={"FOO": "fromos", "ONLYOS": "yes",
                                               "MixedCase": "x"})
    # $MixedCase: the env key was upper-cased, so the os value "x" is used.
    assert read_when_present(str(merged)) == "80|fromini|yes|x\n"
    assert read_when_present(str(bare)) == "[81][]\n"
    assert definition(d, "merged")["env"] == {"PORT": "80", "FOO": "fromini",
                                              "MIXEDCASE": "mc"}
    assert definition(d, "bare")["env"] == {"PORT": "81"}


def test_relative_cmd_and_cwd_resolved_against_config_dir(tmp_path, gafferd):
    conf = tmp_path / "conf"
    write(conf / "bin" / "prog.py", "#!%s\nimport time\ntime.sleep(60)\n" % PY, mode=0o755)
    os.makedirs(str(conf / "work"))
    # A decoy with the same relative name next to the daemon's cwd.
    write(tmp_path / "bin" / "prog.py", "#!/bin/false\n", mode=0o755)
    path = write(conf / "gaffer.ini", sub("""
        [process:rel]
        cmd = ./bin/prog.py

        [process:relcwd]
        cmd = ./bin/prog.py
        cwd = work

        [process:updir]
        cmd = ../conf/bin/prog.py
        cwd = work/

        [process:plain]
        cmd = @SLEEP@ 60
        """))
    r = check(path, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    d = start(gafferd, path)
    assert d.dir == str(tmp_path)
    real_conf = os.path.realpath(str(conf))
    expect_cwd = {"rel": real_conf, "relcwd": os.path.join(real_conf, "work"),
                  "updir": os.path.join(real_conf, "work"), "plain": real_conf}
    for name, cwd in expect_cwd.items():
        (pid,) = wait_os_pids(d, name, 1)
        assert os.path.realpath(os.readlink("/proc/%d/cwd" % pid)) == cwd, name
        if name != "plain":
            argv = proc_cmdline(pid)
            assert any(os.path.realpath(a) == os.path.join(real_conf, "bin", "prog.py")
                       for a in argv if "prog.py" in a), (name, argv)


def test_crash_loops_back_off_unless_startsecs_and_restart_delay_are_0(tmp_path, gafferd):
    counts = {n: tmp_path / ("%s.count" % n) for n in ("off", "on", "fast")}
    path = write(tmp_path / "gaffer.ini", sub("""
        [process:crash_off]
        cmd = echo x >> @OFF@
        shell = true
        flapping = off

        [process:crash_on]
        cmd = echo x >> @ON@
        shell = true

        [process:crash_fast]
        cmd = echo x >> @FAST@
        shell = true
        startsecs = 0
        """, OFF=counts["off"], ON=counts["on"], FAST=counts["fast"]))
    d = start(gafferd, path)

    def lines(name):
        try:
            return len(counts[name].read_text().split())
        except FileNotFoundError:
            return 0
    # startsecs = 0 and restart_delay = 0: respawned again and again
    wait_for(lambda: lines("fast") >= 10, message="crash_fast respawns")
    # the defaults, with or without the 0.4.4 flapping = off: each exit
    # within startsecs is a failed start, retried after 1, 2, 4... s
    wait_for(lambda: d.status("crash_on").get("state") == "backoff",
             message="crash_on in backoff")
    assert d.status("crash_off").get("state") in ("backoff", "starting")
    assert lines("on") <= 3 and lines("off") <= 3
    assert d.status("crash_on")["restarts"] >= 1


def test_logfile_alone_captures_both_streams(tmp_path, gafferd):
    write(tmp_path / "printer.py", PRINTER)
    path = write(tmp_path / "gaffer.ini", sub("""
        [process:p]
        cmd = @PY@
        args = printer.py
        logfile = all.log
        """))
    d = start(gafferd, path)
    both = str(tmp_path / "all.log")
    wait_for(lambda: _log_has(both, "to-stdout") and _log_has(both, "to-stderr"),
             message="the log file to get both streams")


def test_a_logfile_for_the_second_stream_adds_only_that_label(tmp_path, gafferd):
    write(tmp_path / "printer.py", PRINTER)
    path = write(tmp_path / "gaffer.ini", sub("""
        [process:p]
        cmd = @PY@
        args = printer.py
        redirect_output = out
        stderr_logfile = err.log
        """))
    d = start(gafferd, path)
    wait_for(lambda: _log_has(str(tmp_path / "err.log"), "to-stderr"), message="err.log")
    assert "to-stdout" not in open(str(tmp_path / "err.log")).read()
    wait_for(lambda: "to-stdout" in d.get("/processes/p/_log?label=out").body.decode(),
             message="stdout on its own label")


# -- unknown keys in a reload and over HTTP ----------------------------------------


def test_reload_with_a_misspelt_key_warns_and_restarts_nothing(tmp_path, gafferd):
    path = write(tmp_path / "gaffer.ini", sub("""
        [process:web]
        cmd = @SLEEP@ 60
        """))
    d = start(gafferd, path)
    d.wait_running("web", 1)
    before = os_pids(d, "web")
    with open(path, "a") as f:
        f.write("numproceses = 3\n")
    d.signal(signal.SIGHUP)
    wait_for(lambda: DID_YOU_MEAN in d.log(), message="the reload's warning")
    assert "[process:web]" in [l for l in d.log().splitlines() if DID_YOU_MEAN in l][0]
    r = d.json("POST", "/reload")
    assert r["changed"] == [] and r["unchanged"] == ["web"], r
    assert [w for w in r["warnings"] if w.endswith(DID_YOU_MEAN)], r
    assert os_pids(d, "web") == before
    assert "numproceses" not in definition(d, "web")
    assert d.status("web")["running"] == 1


def test_a_failed_reload_still_shows_its_warnings(tmp_path, gafferd):
    path = write(tmp_path / "gaffer.ini", sub("""
        [process:web]
        cmd = @SLEEP@ 60
        """))
    d = start(gafferd, path)
    with open(path, "a") as f:
        f.write("numproceses = 3\nnumprocesses = many\n")
    r = d.request("POST", "/reload")
    assert r.status == 400
    body = r.json()
    assert [w for w in body["warnings"] if w.endswith(DID_YOU_MEAN)], body
    assert any("many" in e for e in body["errors"]), body


def test_post_and_put_processes_warn_about_unknown_keys(tmp_path, gafferd):
    d = start(gafferd, write(tmp_path / "gaffer.ini", "[gaffer]\n"))
    body = {"name": "api", "cmd": SLEEP, "args": ["60"], "numproceses": 3}
    r = d.json("POST", "/processes", body)
    assert r == {"ok": True, "warnings": [DID_YOU_MEAN]}
    assert "numproceses" not in definition(d, "api")
    assert DID_YOU_MEAN in d.log()
    d.wait_running("api", 1)
    # The same definition plus an unknown key: nothing stored, nothing new.
    r = d.json("PUT", "/processes/api", dict(body, numproceses=5, colour="red"))
    assert r["warnings"] == [DID_YOU_MEAN, "colour: unknown key, ignored"]
    assert set(definition(d, "api")) == {"name", "cmd", "args"}
    # Known keys only: no warnings key at all (the 0.4.4 reply).
    assert d.json("POST", "/processes", {"name": "b", "cmd": SLEEP, "args": ["60"]}) \
        == {"ok": True}


def test_bad_template_names_are_refused_over_http(tmp_path, gafferd):
    d = start(gafferd, write(tmp_path / "gaffer.ini", "[gaffer]\n"))
    for name in BAD_NAMES:
        r = d.request("POST", "/processes", {"name": name, "cmd": SLEEP, "args": ["60"]})
        assert r.status == 400, (name, r)
        assert r.json()["error"] == "invalid_process_info"
        assert "invalid template name" in r.json()["message"]
    assert d.json("GET", "/processes") == []
    ok = "x" * 200
    assert d.json("POST", "/processes", {"name": ok, "cmd": SLEEP, "args": ["60"]}) == \
        {"ok": True}
    assert d.json("GET", "/processes") == [ok]
