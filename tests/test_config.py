"""Configuration file parsing (INI files, includes, endpoints, templates and
their errors), checked from the outside: through ``--check`` and through
a running daemon's HTTP API (``GET /processes/NAME`` shows the stored
settings).
"""
import http.server
import os
import pwd
import grp
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import threading

import pytest

from conftest import (PY, proc_cmdline, run_gafferd,
                      wait_for)

SLEEP = shutil.which("sleep")
SH = shutil.which("sh")
MAXSIZE = sys.maxsize


# -- helpers -------------------------------------------------------------------


def write(path, text, mode=None):
    """Write dedented ``text`` to ``path`` (directories created)."""
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(textwrap.dedent(text).lstrip("\n"))
    if mode is not None:
        os.chmod(path, mode)
    return path


def sub(text, **values):
    """Replace ``@KEY@`` markers (avoids clashes with INI/shell syntax)."""
    values.setdefault("PY", PY)
    values.setdefault("SLEEP", SLEEP)
    for key, value in values.items():
        text = text.replace("@%s@" % key, str(value))
    return text


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


# -- --check -------------------------------------------------------------------

def test_check_valid_config_prints_templates_and_exits_0(tmp_path):
    path = write(tmp_path / "gaffer.ini", sub("""
        [process:alpha]
        cmd = @SLEEP@ 60
        numprocesses = 2

        [process:beta:worker]
        cmd = @SLEEP@ 61
        start = false
        """))
    r = check(path)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert "alpha" in r.stdout and "beta:worker" in r.stdout, r.stdout
    assert "%s 60" % SLEEP in r.stdout and "%s 61" % SLEEP in r.stdout, r.stdout
    assert not any("error" in line.lower() for line in stderr_lines(r)), r.stderr


def test_check_does_not_start_anything(tmp_path):
    marker = tmp_path / "ran"
    path = write(tmp_path / "gaffer.ini", sub("""
        [process:touch]
        cmd = touch @M@
        """, M=marker))
    r = check(path)
    assert r.returncode == 0, r.stderr
    assert not marker.exists()


# -- 2.1 parsing rules ---------------------------------------------------------

def test_section_case_kept_option_names_lowercased_colon_separator(tmp_path, gafferd):
    path = write(tmp_path / "conf" / "gaffer.ini", sub("""
        [process:WebApp]
        CMD: @SLEEP@ 60
        NumProcesses: 2
        Priority = 3

        [env:WebApp]
        Port: 8080
        """))
    r = check(path)
    assert r.returncode == 0, r.stderr
    # Upper-case option names are known keys once lower-cased: no warning.
    assert "did you mean" not in r.stderr, r.stderr
    d = start(gafferd, path)
    assert d.json("GET", "/processes") == ["WebApp"]
    d.wait_running("WebApp", 2)
    info = definition(d, "WebApp")
    assert info["name"] == "WebApp"
    assert info["cmd"] == "%s 60" % SLEEP
    assert info["numprocesses"] == 2
    assert info["priority"] == 3
    assert info["env"] == {"PORT": "8080"}
    assert d.status("WebApp")["max_processes"] == 2


def test_percent_signs_survive_no_interpolation(tmp_path, gafferd):
    out = tmp_path / "pct.txt"
    path = write(tmp_path / "gaffer.ini", sub("""
        [process:pct]
        cmd = printf 100%%
        start = false

        [process:pctargs]
        cmd = printf
        args = 50% done %(name)s
        start = false

        [process:pctrun]
        cmd = printf '100%% %s\\n' ok > @OUT@; exec @SLEEP@ 60
        shell = true
        """, OUT=out))
    r = check(path)
    assert r.returncode == 0, r.stderr
    d = start(gafferd, path)
    info = definition(d, "pct")
    assert info["cmd"] == "printf 100%%"
    assert definition(d, "pctargs")["args"] == "50% done %(name)s"
    assert definition(d, "pctrun")["cmd"].startswith("printf '100%% %s\\n' ok")
    # printf turns %% into %: the shell saw the value uninterpolated.
    assert read_when_present(str(out)) == "100% ok\n"


def test_no_inline_comments_semicolon_survives_in_shell_cmd(tmp_path, gafferd):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    path = write(tmp_path / "gaffer.ini", sub("""
        [process:semi]
        cmd = echo one > @A@ ; echo two > @B@ ; exec @SLEEP@ 60
        shell = true
        """, A=a, B=b))
    d = start(gafferd, path)
    assert definition(d, "semi")["cmd"] == \
        "echo one > %s ; echo two > %s ; exec %s 60" % (a, b, SLEEP)
    assert read_when_present(str(a)) == "one\n"
    assert read_when_present(str(b)) == "two\n"


def test_full_line_comments_and_continuation_lines(tmp_path, gafferd):
    path = write(tmp_path / "gaffer.ini", sub("""
        # a comment
        ; another comment
        [process:cont]
        # comment inside a section
        cmd = @SLEEP@
        args = 60
          extra
        start = false
        """))
    d = start(gafferd, path)
    assert definition(d, "cont")["args"] == "60\nextra"


# -- [gaffer] --------------------------------------------------------------------

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


@pytest.mark.parametrize("keys", [
    "plugins_dir = plugs",
    "plugin_dir = plugs",
    "plugins_dir = plugs\nplugin_dir = wrong",
], ids=["plugins_dir", "plugin_dir", "plugins_dir-first"])
def test_plugins_dir_key_relative_to_config_file(tmp_path, gafferd, keys):
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
    os.makedirs(str(conf / "wrong"))
    path = write(conf / "gaffer.ini", "[gaffer]\n" + keys + "\n\n[myplugin]\nmarker = %s\n" % marker)
    # A -p option is beaten by the config key.
    os.makedirs(str(tmp_path / "other"))
    start(gafferd, path, "-p", str(tmp_path / "other"))
    assert read_when_present(str(marker)) == "started\n"


def test_include_and_include_dir_relative_to_config_file(tmp_path, gafferd):
    conf = tmp_path / "conf"
    write(conf / "extra" / "one.ini", sub("""
        [process:one]
        cmd = @SLEEP@ 60
        """))
    # Written out of order on purpose: include_dir files are read sorted by path.
    write(conf / "more" / "sub" / "c.ini", sub("""
        [process:c]
        cmd = @SLEEP@ 60
        """))
    write(conf / "more" / "b.ini", sub("""
        [process:b]
        cmd = @SLEEP@ 60
        """))
    write(conf / "more" / "a.ini", sub("""
        [process:a]
        cmd = @SLEEP@ 60
        numprocesses = 2
        """))
    write(conf / "more" / "notes.txt", sub("""
        [process:txt]
        cmd = @SLEEP@ 60
        """))
    path = write(conf / "gaffer.ini", sub("""
        [gaffer]
        include = extra/one.ini missing.ini
        include_dir = more

        [process:main]
        cmd = @SLEEP@ 60
        """))
    r = check(path, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    d = start(gafferd, path)
    names = d.json("GET", "/processes")
    assert sorted(names) == ["a", "b", "c", "main", "one"], names
    assert names[0] == "main"
    from_dir = [n for n in names if n in ("a", "b", "c")]
    assert from_dir == ["a", "b", "c"], names
    d.wait_running("a", 2)
    d.wait_running("c", 1)
    d.wait_running("one", 1)


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


# -- [process:NAME] ------------------------------------------------------------

def test_process_defaults_shown_by_api(tmp_path, gafferd):
    path = write(tmp_path / "gaffer.ini", sub("""
        [process:plain]
        cmd = @SLEEP@ 60
        """))
    d = start(gafferd, path)
    d.wait_running("plain", 1)
    info = definition(d, "plain")
    expected = {"name": "plain", "cmd": SLEEP + " 60", "group": None,
                "args": None, "env": {}, "uid": None, "gid": None,
                "detach": False, "shell": False, "os_env": True,
                "numprocesses": 1, "priority": MAXSIZE}
    for key, value in expected.items():
        assert key in info, (key, info)
        assert info[key] == value, (key, info[key], value)
    assert "start" not in info
    # The daemon's environment is never merged into the stored settings.
    assert "PATH" not in info["env"]


def test_process_keys_all_set(tmp_path, gafferd):
    user = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    path = write(tmp_path / "gaffer.ini", sub("""
        [process:full]
        cmd = @SLEEP@
        args = 60
        uid = @UID@
        gid = @GID@
        detach = yes
        shell = off
        os_env = 0
        numprocesses = 2
        start = true
        priority = 5
        redirect_output = out ,  err
        redirect_input = on
        graceful_timeout = 2.5
        flapping = 3, 2., 4., 6

        [process:named]
        cmd = @SLEEP@ 60
        uid = @USER@
        gid = @GROUP@
        start = FALSE
        """, UID=os.getuid(), GID=os.getgid(), USER=user, GROUP=group))
    d = start(gafferd, path)
    d.wait_running("full", 2)
    info = definition(d, "full")
    assert info["cmd"] == SLEEP
    assert info["args"] == "60"
    assert str(info["uid"]) == str(os.getuid())
    assert str(info["gid"]) == str(os.getgid())
    assert info["detach"] is True
    assert info["shell"] is False
    assert info["os_env"] is False
    assert info["numprocesses"] == 2
    assert info["priority"] == 5
    assert info["redirect_output"] == ["out", "err"]
    assert info["redirect_input"] is True
    assert info["graceful_timeout"] == 2.5
    assert info["flapping"] == {"attempts": 3, "window": 2.0, "retry_in": 4.0, "max_retry": 6}
    assert "start" not in info
    named = definition(d, "named")
    assert named["uid"] == user and named["gid"] == group
    assert d.status("named")["running"] == 0
    # The processes really run: detached children lead their own session.
    for pid in os_pids(d, "full"):
        assert os.getsid(pid) == pid


def _flapping_through_api(gafferd, tmp_path):
    cases = {
        "comma": "2, 1., 7., 5",
        "space": "2 1 7 5",
        "mixed": "3 0.5, 2 4",
        "two": "4, 2.5",
        "one": "4",
    }
    text = ""
    for name, value in cases.items():
        text += "[process:%s]\ncmd = %s 60\nflapping = %s\nstart = false\n\n" % (name, SLEEP, value)
    text += "[process:off]\ncmd = %s 60\nflapping = off\nstart = false\n" % SLEEP
    path = write(tmp_path / "gaffer.ini", text)
    r = check(path)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return start(gafferd, path)


def test_flapping_forms_through_api(tmp_path, gafferd):
    d = _flapping_through_api(gafferd, tmp_path)
    default = {"attempts": 2, "window": 1.0, "retry_in": 7.0, "max_retry": 5}
    assert definition(d, "comma")["flapping"] == default
    assert definition(d, "space")["flapping"] == default
    assert definition(d, "mixed")["flapping"] == {"attempts": 3, "window": 0.5,
                                                   "retry_in": 2.0, "max_retry": 4}
    assert definition(d, "two")["flapping"] == {"attempts": 4, "window": 2.5,
                                                 "retry_in": 7.0, "max_retry": 5}
    assert definition(d, "one")["flapping"] == {"attempts": 4, "window": 1.0,
                                                 "retry_in": 7.0, "max_retry": 5}
    flapping = definition(d, "off").get("flapping")
    assert not isinstance(flapping, dict), flapping
    assert flapping in (None, False, "off"), flapping


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


# -- [env:NAME] ----------------------------------------------------------------

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


# -- relative paths, cwd, groups -------------------------------------------------

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


def test_group_from_name_prefix(tmp_path, gafferd):
    path = write(tmp_path / "gaffer.ini", sub("""
        [process:web:api]
        cmd = @SLEEP@ 60

        [process:web:worker:x]
        cmd = @SLEEP@ 60
        start = false

        [process:solo]
        cmd = @SLEEP@ 60
        start = false
        """))
    d = start(gafferd, path)
    assert d.json("GET", "/processes") == ["web:api", "web:worker:x", "solo"]
    assert definition(d, "web:api")["group"] == "web"
    assert definition(d, "web:api")["name"] == "web:api"
    assert definition(d, "web:worker:x")["group"] == "web"
    assert definition(d, "solo")["group"] is None
    d.wait_running("web:api", 1)


def test_section_without_cmd_is_an_error(tmp_path):
    # gaffer 0.4.4 ignored such a section silently; gafferd makes
    # every mistake an error, and a [process:*] without cmd is one.
    path = write(tmp_path / "gaffer.ini", sub("""
        [process:empty]
        numprocesses = 2

        [process:real]
        cmd = @SLEEP@ 60
        """))
    r = check(path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = stderr_lines(r)
    assert len(lines) == 1 and "[process:empty] cmd" in lines[0], r.stderr


# -- warnings and plugin sections ----------------------------------------------

def test_unknown_key_warns_with_closest_key_and_continues(tmp_path, gafferd):
    path = write(tmp_path / "gaffer.ini", sub("""
        [process:web]
        cmd = @SLEEP@ 60
        numprocess = 2
        """))
    r = check(path)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    warn = [l for l in stderr_lines(r) if "numprocess" in l]
    assert len(warn) == 1, r.stderr
    assert "did you mean 'numprocesses'?" in warn[0]
    assert "[process:web]" in warn[0]
    d = start(gafferd, path)
    d.wait_running("web", 1)
    assert "did you mean 'numprocesses'?" in d.log()


def test_plugin_sections_are_accepted(tmp_path, gafferd):
    path = write(tmp_path / "gaffer.ini", sub("""
        [healthcheck:web]
        url = http://127.0.0.1:1/health
        interval = 5

        [myplugin]
        anything = goes here

        [process:web]
        cmd = @SLEEP@ 60
        """))
    r = check(path)
    assert r.returncode == 0, r.stderr
    assert "did you mean" not in r.stderr
    d = start(gafferd, path)
    d.wait_running("web", 1)
    assert d.json("GET", "/processes") == ["web"]


# -- bad configs -----------------------------------------------------------------

# (id, config text, extra files, section, key, fragments expected in the line)
P = "[process:web]\ncmd = @SLEEP@ 60\n"
EP = "[gaffer]\nhttp_endpoints = public\n\n[endpoint:public]\nbind = 127.0.0.1:0\n"
BAD = [
    ("bool-detach", P + "detach = maybe\n", {}, "process:web", "detach", ["maybe"]),
    ("bool-shell", P + "shell = yess\n", {}, "process:web", "shell", ["yess"]),
    ("bool-os_env", P + "os_env = 2\n", {}, "process:web", "os_env", ["2"]),
    ("bool-start", P + "start = nope\n", {}, "process:web", "start", ["nope"]),
    ("bool-redirect_input", P + "redirect_input = sure\n", {}, "process:web",
     "redirect_input", ["sure"]),
    ("bool-log_timestamps", P + "log_timestamps = kinda\n", {}, "process:web",
     "log_timestamps", ["kinda"]),
    ("int-numprocesses", P + "numprocesses = two\n", {}, "process:web", "numprocesses", ["two"]),
    ("float-numprocesses", P + "numprocesses = 1.5\n", {}, "process:web", "numprocesses", ["1.5"]),
    ("negative-numprocesses", P + "numprocesses = -1\n", {}, "process:web", "numprocesses",
     ["-1"]),
    ("int-priority", P + "priority = high\n", {}, "process:web", "priority", ["high"]),
    ("graceful_timeout", P + "graceful_timeout = soon\n", {}, "process:web",
     "graceful_timeout", ["soon"]),
    ("flapping-too-many", P + "flapping = 2 1 7 5 9\n", {}, "process:web", "flapping",
     ["2 1 7 5 9"]),
    ("flapping-too-many-commas", P + "flapping = 2, 1., 7., 5, 3\n", {}, "process:web",
     "flapping", ["2, 1., 7., 5, 3"]),
    ("flapping-not-numeric", P + "flapping = 2, fast\n", {}, "process:web", "flapping",
     ["fast"]),
    ("unknown-uid", P + "uid = no-such-user-xyz\n", {}, "process:web", "uid",
     ["no-such-user-xyz"]),
    ("unknown-gid", P + "gid = no-such-group-xyz\n", {}, "process:web", "gid",
     ["no-such-group-xyz"]),
    ("missing-executable-relative", "[process:web]\ncmd = ./nope.py\n", {}, "process:web",
     "cmd", ["./nope.py"]),
    ("missing-executable-path", "[process:web]\ncmd = no-such-program-xyz --flag\n", {},
     "process:web", "cmd", ["no-such-program-xyz"]),
    ("missing-cwd", P + "cwd = /nonexistent-cwd-xyz\n", {}, "process:web", "cwd",
     ["/nonexistent-cwd-xyz"]),
    ("missing-relative-cwd", P + "cwd = missing-subdir\n", {}, "process:web", "cwd",
     ["missing-subdir"]),
    ("unknown-var-in-args", "[process:web]\ncmd = @SLEEP@\nargs = $NO_SUCH_VAR_XYZ\n", {},
     "process:web", "args", ["NO_SUCH_VAR_XYZ"]),
    ("misspelt-process", "[proces:web]\ncmd = @SLEEP@ 60\n", {}, "proces:web", None,
     ["did you mean [process:web]"]),
    ("misspelt-webhooks", "[webhook]\ncreate = http://127.0.0.1:1/\n", {}, "webhook", None,
     ["did you mean [webhooks]"]),
    ("misspelt-endpoint", "[endpiont:x]\nbind = 127.0.0.1:0\n", {}, "endpiont:x", None,
     ["did you mean [endpoint:x]"]),
    ("misspelt-gaffer", "[gafer]\nhttp_endpoints = x\n", {}, "gafer", None,
     ["did you mean [gaffer]"]),
    ("misspelt-env", P + "[evn:web]\nport = 80\n", {}, "evn:web", None,
     ["did you mean [env:web]"]),
    ("duplicate-section", P + "\n" + P, {}, "process:web", None, []),
    ("duplicate-key", P + "numprocesses = 1\nnumprocesses = 2\n", {}, "process:web",
     "numprocesses", []),
    ("bind-bad-port", EP.replace("127.0.0.1:0", "127.0.0.1:http"), {}, "endpoint:public",
     "bind", ["127.0.0.1:http"]),
    ("bind-port-out-of-range", EP.replace("127.0.0.1:0", "127.0.0.1:70000"), {},
     "endpoint:public", "bind", ["70000"]),
    ("bad-backlog", EP + "backlog = lots\n", {}, "endpoint:public", "backlog", ["lots"]),
    ("bad-keepalive", EP + "keepalive_timeout = forever\n", {}, "endpoint:public",
     "keepalive_timeout", ["forever"]),
    ("bad-max-connections", EP + "max_connections = many\n", {}, "endpoint:public",
     "max_connections", ["many"]),
    ("gaffer-bad-bool", "[gaffer]\npublic_ping = perhaps\n", {}, "gaffer", "public_ping",
     ["perhaps"]),
    ("gaffer-bad-max-body", "[gaffer]\nmax_body_size = huge\n", {}, "gaffer", "max_body_size",
     ["huge"]),
    ("non-loopback-without-token", EP.replace("127.0.0.1:0", "0.0.0.0:0"), {},
     "endpoint:public", None, ["auth_token", "insecure"]),
    ("bad-size-suffix", P + "logfile = @DIR@/web.log\nlogfile_maxbytes = 10XB\n", {},
     "process:web", "logfile_maxbytes", ["10XB"]),
    ("bad-output-buffer", P + "output_buffer = lots\n", {}, "process:web", "output_buffer",
     ["lots"]),
    ("bad-logfile-backups", P + "logfile = @DIR@/web.log\nlogfile_backups = ten\n", {},
     "process:web", "logfile_backups", ["ten"]),
    ("missing-log-dir", P + "redirect_output = out, err\n"
     "stdout_logfile = /nonexistent-dir-xyz/out.log\n", {}, "process:web", "stdout_logfile",
     ["/nonexistent-dir-xyz"]),
    ("error-in-include", "[gaffer]\ninclude = extra.ini\n",
     {"extra.ini": "[process:inc]\ncmd = @SLEEP@ 60\nnumprocesses = zero\n"},
     "process:inc", "numprocesses", ["zero", "extra.ini"]),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_config(tmp_path, case):
    _id, text, extra, section, key, fragments = case
    for name, content in extra.items():
        write(tmp_path / name, sub(content, DIR=tmp_path))
    path = write(tmp_path / "gaffer.ini", sub(text, DIR=tmp_path))
    line = single_error_line(check(path, cwd=str(tmp_path)))
    fname = "extra.ini" if extra else "gaffer.ini"
    assert fname in line, line
    assert "[%s]" % section in line, line
    if key is not None:
        assert re.search(r"\b%s\b" % re.escape(key), line), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)


def test_bad_config_table_is_large_enough():
    assert len(BAD) >= 30


def test_unparsable_line(tmp_path):
    path = write(tmp_path / "gaffer.ini", sub(P + "this line has no separator\n"))
    line = single_error_line(check(path))
    assert "gaffer.ini" in line
    assert "this line has no separator" in line


def test_key_before_any_section(tmp_path):
    path = write(tmp_path / "gaffer.ini", sub("cmd = @SLEEP@ 60\n" + P))
    line = single_error_line(check(path))
    assert "gaffer.ini" in line


def test_missing_config_file(tmp_path):
    missing = str(tmp_path / "nope.ini")
    line = single_error_line(run_gafferd([missing, "--bind", "127.0.0.1:0"], timeout=15))
    assert "nope.ini" in line
    line = single_error_line(check(missing))
    assert "nope.ini" in line


@pytest.mark.parametrize("case_id", ["int-numprocesses", "unknown-uid",
                                     "missing-executable-relative", "misspelt-process",
                                     "non-loopback-without-token", "error-in-include"])
def test_bad_config_refused_at_start_up(tmp_path, case_id):
    """Without --check, the daemon refuses the same configs the same way."""
    _id, text, extra, section, key, fragments = [c for c in BAD if c[0] == case_id][0]
    for name, content in extra.items():
        write(tmp_path / name, sub(content, DIR=tmp_path))
    path = write(tmp_path / "gaffer.ini", sub(text, DIR=tmp_path))
    r = run_gafferd([path, "--bind", "127.0.0.1:0"], cwd=str(tmp_path), timeout=15)
    line = single_error_line(r)
    assert "[%s]" % section in line, line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert r.stdout == ""


def test_default_section_values_apply_to_every_process(tmp_path, gafferd):
    path = write(tmp_path / "gaffer.ini", sub("""
        [DEFAULT]
        numprocesses = 2

        [process:inherits]
        cmd = @SLEEP@ 60
        start = false

        [process:overrides]
        cmd = @SLEEP@ 60
        numprocesses = 1
        start = false
        """))
    d = start(gafferd, path)
    assert definition(d, "inherits")["numprocesses"] == 2
    assert definition(d, "overrides")["numprocesses"] == 1


# -- unknown keys in a reload and over HTTP ----------------------------------------

DID_YOU_MEAN = "numproceses: unknown key, ignored; did you mean 'numprocesses'?"


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
    d.signal(__import__("signal").SIGHUP)
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


# -- a log file captures its stream ---------------------------------------------------

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
    r = check(path)
    assert r.returncode == 0, r.stderr
    assert "# resolved: stdout -> label 'stdout', file %s" % (tmp_path / "out.log") in r.stdout
    assert "# resolved: stderr -> label 'stderr', file %s" % (tmp_path / "err.log") in r.stdout
    d = start(gafferd, path)
    out, err = str(tmp_path / "out.log"), str(tmp_path / "err.log")
    wait_for(lambda: _log_has(out, "to-stdout") and _log_has(err, "to-stderr"),
             message="both log files written")
    assert "to-stderr" not in open(out).read() and "to-stdout" not in open(err).read()


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


# -- every mistake in one run -----------------------------------------------------------

def test_every_bad_value_of_a_section_in_one_run(tmp_path):
    path = write(tmp_path / "gaffer.ini", sub("""
        [process:web]
        cmd = @SLEEP@ 60
        numprocesses = two
        priority = high
        graceful_timeout = soon
        shell = maybe
        logfile_maxbytes = lots
        uid = no-such-user-here
        numproceses = 3
        """))
    r = check(path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    errors = [l for l in stderr_lines(r) if "WARNING" not in l]
    keys = ["numprocesses", "priority", "graceful_timeout", "shell", "logfile_maxbytes", "uid"]
    assert len(errors) == len(keys), r.stderr
    for key, line in zip(keys, errors):
        assert line.startswith("%s: [process:web] %s: " % (path, key)), line
    warnings = [l for l in stderr_lines(r) if "WARNING" in l]
    assert len(warnings) == 1 and DID_YOU_MEAN in warnings[0], r.stderr


def test_mistakes_in_several_sections_and_endpoints_in_one_run(tmp_path):
    path = write(tmp_path / "gaffer.ini", sub("""
        [gaffer]
        http_endpoints = a
        [endpoint:a]
        bind = 127.0.0.1:0
        backlog = many
        max_body_size = huge
        [process:one]
        cmd = @SLEEP@ 60
        numprocesses = x
        [process:two]
        numprocesses = y
        """))
    r = check(path)
    assert r.returncode == 2
    lines = stderr_lines(r)
    assert len(lines) == 5, r.stderr
    for fragment in ("[endpoint:a] backlog", "[endpoint:a] max_body_size",
                     "[process:one] numprocesses", "[process:two] cmd",
                     "[process:two] numprocesses"):
        assert [l for l in lines if fragment in l], (fragment, r.stderr)


def test_every_unparsable_line_in_one_run(tmp_path):
    path = write(tmp_path / "gaffer.ini", sub("""
        [process:web]
        cmd = @SLEEP@ 60
        first bad line
        second bad line
        """))
    r = check(path)
    assert r.returncode == 2
    lines = stderr_lines(r)
    assert len(lines) == 2 and "first bad line" in lines[0] and "second" in lines[1], r.stderr


def test_check_prints_the_absolute_executable(tmp_path):
    write(tmp_path / "bin" / "tool", "#!/bin/sh\nsleep 60\n", mode=0o755)
    path = write(tmp_path / "conf" / "gaffer.ini", sub("""
        [process:bare]
        cmd = sleep 60
        [process:relative]
        cmd = ../bin/tool
        [process:on_a_relative_path]
        cmd = tool
        cwd = ..
        [env:on_a_relative_path]
        PATH = bin
        """))
    r = check(path, cwd="/")
    assert r.returncode == 0, r.stderr
    assert "# resolved: executable = %s" % SLEEP in r.stdout
    tool = str(tmp_path / "bin" / "tool")
    assert r.stdout.count("# resolved: executable = %s\n" % tool) == 2, r.stdout


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


def test_help_describes_the_program():
    r = run_gafferd(["--help"])
    assert r.returncode == 0
    assert "watchers" not in r.stdout
    assert "process supervisor" in r.stdout


# -- template names -----------------------------------------------------------------------

BAD_NAMES = [".", "..", "x" * 201, "..:web", "grp:..", ".:x"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=["dot", "dotdot", "201-chars", "dotdot-group",
                                                 "dotdot-in-group", "dot-group"])
def test_bad_template_names_are_refused_in_the_config(tmp_path, name):
    path = write(tmp_path / "gaffer.ini", sub("[process:%s]\ncmd = @SLEEP@ 60\n" % name))
    line = single_error_line(check(path))
    assert "invalid template name" in line, line
    assert "at most 200" in line or "'.' and '..'" in line, line


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


# -- endpoint sections guard the API: a misspelt key is an error -----------------------

def test_a_misspelt_endpoint_key_is_an_error_not_an_open_api(tmp_path):
    path = write(tmp_path / "gaffer.ini", """
        [gaffer]
        http_endpoints = main

        [endpoint:main]
        bind = 127.0.0.1:0
        token = s3cret
        """)
    r = check(path)
    assert r.returncode == 2, r.stderr
    assert ("[endpoint:main] token: unknown endpoint key; did you mean 'auth_token'?"
            in r.stderr), r.stderr
    assert "Traceback" not in r.stderr


def test_an_endpoint_section_that_is_not_listed_is_warned_about(tmp_path):
    path = write(tmp_path / "gaffer.ini", """
        [gaffer]
        http_endpoints = main

        [endpoint:main]
        bind = 127.0.0.1:0

        [endpoint:admin]
        bind = 127.0.0.1:0
        auth_token = s3cret
        """)
    r = check(path)
    assert r.returncode == 0, r.stderr
    assert "[endpoint:admin] is not in [gaffer] http_endpoints, so it is not opened" in r.stderr
