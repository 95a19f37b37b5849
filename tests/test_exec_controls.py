"""Environment files and exec controls, seen from inside real children.

``env_file`` (systemd's EnvironmentFile format, read again at every
spawn) and ``umask``, ``nice``, ``oom_score_adj``, ``rlimit_*`` and
``groups``, which the child applies between fork and exec: each test
reads what a child of a real daemon really got (its environment dumped
to a file, /proc/PID/status, /proc/PID/limits, /proc/PID/oom_score_adj).
The tests run as root, so groups and a negative nice are testable.
"""
from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shutil
import sys
import textwrap

import pytest

from conftest import PY, ROOT, proc_status, run_gafferd, wait_for

sys.path.insert(0, ROOT)
import gafferd as gd  # noqa: E402

SLEEP = shutil.which("sleep")

DUMP_ENV = """\
import json, os, sys, time
with open(sys.argv[1] + ".tmp", "w") as f:
    json.dump(dict(os.environ), f)
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(3600)
"""


def write(path, text):
    path = str(path)
    with open(path, "w") as f:
        f.write(textwrap.dedent(text).lstrip("\n"))
    return path


def read_env(path, timeout=10.0):
    """The environment a dumping child wrote to ``path``."""
    wait_for(lambda: os.path.exists(path), timeout, message="the child's environment in %s" % path)
    with open(path) as f:
        return json.load(f)


def check(tmp_path, config):
    path = write(tmp_path / "check.ini", config)
    return run_gafferd(["--check", path], cwd=str(tmp_path), timeout=30)


def proc_limits(pid):
    """/proc/PID/limits as {name: (soft, hard)}."""
    out = {}
    with open("/proc/%d/limits" % pid) as f:
        for line in f.read().splitlines()[1:]:
            m = re.match(r"(Max [a-z ]+?)\s{2,}(\S+)\s+(\S+)", line)
            if m:
                out[m.group(1)] = (m.group(2), m.group(3))
    return out


def nice_of(pid):
    with open("/proc/%d/stat" % pid) as f:
        return int(f.read().rsplit(")", 1)[1].split()[16])


def oom_of(pid):
    with open("/proc/%d/oom_score_adj" % pid) as f:
        return int(f.read())


def os_pid_of(d, name):
    pids = wait_for(lambda: d.pids(name), message="a process of %s" % name)
    return d.os_pid(pids[0])


# -- env_file: the format, pure -----------------------------------------------------------------

def test_env_file_format_quotes_export_comments_and_no_expansion():
    text = textwrap.dedent("""\
        # a comment
        ; another comment

        export EXPORTED=yes
        PLAIN = plain value with spaces   \n\
        SINGLE='single $HOME \\n "kept"'
        DOUBLE="a \\"quoted\\" \\\\ and \\$HOME and \\n"
        EMPTY=
        SUBST=$(echo no) `echo no` $HOME
        MULTI="first
        second"
        JOINED=one\\
        two
        AFTER='quoted'   \n\
        LATER=1
        LATER=2
        """)
    env = gd.parse_env_file(text)
    assert env == {
        "EXPORTED": "yes", "PLAIN": "plain value with spaces",
        "SINGLE": 'single $HOME \\n "kept"', "DOUBLE": 'a "quoted" \\ and $HOME and \\n',
        "EMPTY": "", "SUBST": "$(echo no) `echo no` $HOME", "MULTI": "first\nsecond",
        "JOINED": "onetwo", "AFTER": "quoted", "LATER": "2"}
    assert gd.parse_env_file("A=1\r\nB=2\r\n") == {"A": "1", "B": "2"}


@pytest.mark.parametrize("text, line", [
    ("GOOD=1\nnot an assignment\n", 2),
    ("1BAD=x\n", 1),
    ("A B=x\n", 1),
    ("A=1\nQ=\"never closed\n", 2),
])
def test_env_file_format_errors_name_the_line(text, line):
    with pytest.raises(ValueError, match=r"line %d\b" % line):
        gd.parse_env_file(text)


# -- env_file: what the child sees ----------------------------------------------------------------

def test_env_files_reach_the_child_in_order_below_the_env_section(tmp_path, gafferd):
    dump = write(tmp_path / "dump.py", DUMP_ENV)
    write(tmp_path / "base.env", """
        # shared settings
        export SHARED=from-base
        ONLY_BASE='single quoted $NOT_EXPANDED'
        FROM_DAEMON=overridden-by-base
        WIN=base
        """)
    write(tmp_path / "local.env", """
        SHARED="from \\"local\\""
        WIN=local
        """)
    d = gafferd("""
        [process:app]
        cmd = %s
        args = %s %s
        env_file = base.env, -missing.env, -local.env
        [env:app]
        win = section
        """ % (PY, dump, tmp_path / "env.json"), env={"FROM_DAEMON": "daemon", "KEEP": "daemon"})
    env = read_env(str(tmp_path / "env.json"))
    assert env["KEEP"] == "daemon"                       # os_env, lowest
    assert env["FROM_DAEMON"] == "overridden-by-base"    # a file wins over the daemon
    assert env["SHARED"] == 'from "local"'               # a later file wins
    assert env["ONLY_BASE"] == "single quoted $NOT_EXPANDED"
    assert env["WIN"] == "section"                       # [env:NAME] wins over every file
    assert env["GAFFERD_NAME"] == "app"
    d.close()


def test_env_file_without_os_env_gives_only_files_and_section(tmp_path, gafferd):
    dump = write(tmp_path / "dump.py", DUMP_ENV)
    write(tmp_path / "a.env", "PATH=/usr/bin:/bin\nFROM_FILE=1\n")
    gafferd("""
        [process:app]
        cmd = %s
        args = %s %s
        os_env = false
        env_file = a.env
        """ % (PY, dump, tmp_path / "env.json"), env={"SECRET_OF_DAEMON": "x"})
    env = read_env(str(tmp_path / "env.json"))
    assert env["FROM_FILE"] == "1"
    assert "SECRET_OF_DAEMON" not in env


def test_env_file_is_read_again_at_every_spawn(tmp_path, gafferd):
    dump = write(tmp_path / "dump.py", DUMP_ENV)
    env_path = write(tmp_path / "a.env", "VERSION=1\n")
    out = str(tmp_path / "env.json")
    d = gafferd("""
        [process:app]
        cmd = %s
        args = %s %s
        env_file = a.env
        """ % (PY, dump, out))
    assert read_env(out)["VERSION"] == "1"
    os.unlink(out)
    write(env_path, "VERSION=2\n")
    d.json("POST", "/processes/app/_restart")
    assert read_env(out)["VERSION"] == "2"


def test_env_file_gone_later_fails_the_start_until_it_is_back(tmp_path, gafferd):
    dump = write(tmp_path / "dump.py", DUMP_ENV)
    env_path = write(tmp_path / "a.env", "VERSION=1\n")
    out = str(tmp_path / "env.json")
    d = gafferd("""
        [process:app]
        cmd = %s
        args = %s %s
        env_file = a.env
        backoff = 0.2, 1, 0.2
        """ % (PY, dump, out))
    read_env(out)
    os.unlink(out)
    os.unlink(env_path)
    d.json("POST", "/processes/app/_restart")
    wait_for(lambda: "env_file: %r does not exist" % env_path in d.log(), 10,
             message="the failed start in the log")
    metrics = d.get("/metrics").body.decode()
    assert re.search(r"^gafferd_spawn_failures_total [1-9]", metrics, re.M), metrics
    assert re.search(r'^gafferd_template_exits_total\{name="app",reason="failed_start"\} [1-9]',
                     metrics, re.M), metrics
    write(env_path, "VERSION=3\n")
    assert read_env(out)["VERSION"] == "3"             # the backoff retried it


def test_missing_required_env_file_is_a_config_error(tmp_path):
    write(tmp_path / "present.env", "A=1\n")
    r = check(tmp_path, """
        [process:app]
        cmd = %s 10
        env_file = present.env, -optional-missing.env, required-missing.env
        """ % SLEEP)
    assert r.returncode == 2, r
    assert "[process:app] env_file: %r does not exist" % str(tmp_path / "required-missing.env") \
        in r.stderr, r.stderr
    write(tmp_path / "broken.env", "A=1\nthis is not an assignment\n")
    r = check(tmp_path, "[process:app]\ncmd = %s 10\nenv_file = broken.env\n" % SLEEP)
    assert r.returncode == 2 and "env_file:" in r.stderr and "line 2" in r.stderr, r.stderr


def test_env_file_variables_are_known_to_cmd_at_check_time(tmp_path):
    write(tmp_path / "a.env", "SECONDS_TO_SLEEP=5\n")
    ok = check(tmp_path, "[process:app]\ncmd = %s $SECONDS_TO_SLEEP\nenv_file = a.env\n" % SLEEP)
    assert ok.returncode == 0, ok.stderr
    assert "argv = %s 5" % SLEEP in ok.stdout


def test_api_shows_env_file_names_never_their_values(tmp_path, gafferd):
    write(tmp_path / "secret.env", "TOKEN=hunter2-very-secret\n")
    d = gafferd("""
        [process:app]
        cmd = %s 3600
        env_file = secret.env, -other.env
        """ % SLEEP)
    info = d.json("GET", "/processes/app")
    assert info["env_file"] == "secret.env, -other.env"
    assert d.json("POST", "/processes", {
        "name": "api", "cmd": "%s 3600" % SLEEP,
        "env_file": [str(tmp_path / "secret.env"), "-/nonexistent/x.env"]}) == {"ok": True}
    info = d.json("GET", "/processes/api")
    assert info["env_file"] == [str(tmp_path / "secret.env"), "-/nonexistent/x.env"]
    for path in ("/processes/app", "/processes/api", "/status/app", "/processes?detail=1"):
        assert b"hunter2" not in d.get(path).body
    r = d.post("/processes", {"name": "bad", "cmd": "%s 1" % SLEEP,
                              "env_file": "/nonexistent/required.env"})
    assert r.status == 400 and "env_file" in r.json()["message"], r


# -- exec controls ---------------------------------------------------------------------------------

def test_exec_controls_reach_the_child_and_leave_the_daemon_alone(tmp_path, gafferd):
    d = gafferd("""
        [process:ctl]
        cmd = %s 3600
        umask = 027
        nice = 7
        oom_score_adj = 500
        rlimit_nofile = 256:512
        rlimit_core = unlimited
        rlimit_as = 1GB
        rlimit_nproc = 300:1000
        rlimit_memlock = 64KB
        rlimit_stack = 4MB:8MB
        rlimit_cpu = 3600
        rlimit_fsize = 1GB:unlimited
        [process:plain]
        cmd = %s 3600
        """ % (SLEEP, SLEEP))
    pid = os_pid_of(d, "ctl")
    status = proc_status(pid)
    assert status["Umask"] == "0027"
    assert nice_of(pid) == 7
    assert oom_of(pid) == 500
    limits = proc_limits(pid)
    assert limits["Max open files"] == ("256", "512")
    assert limits["Max core file size"] == ("unlimited", "unlimited")
    assert limits["Max address space"] == (str(1 << 30), str(1 << 30))
    assert limits["Max processes"] == ("300", "1000")
    assert limits["Max locked memory"] == ("65536", "65536")
    assert limits["Max stack size"] == (str(4 << 20), str(8 << 20))
    assert limits["Max cpu time"] == ("3600", "3600")
    assert limits["Max file size"] == (str(1 << 30), "unlimited")
    # the daemon and a template without controls keep what they had
    for other in (d.pid, os_pid_of(d, "plain")):
        assert proc_status(other)["Umask"] == proc_status(os.getpid())["Umask"]
        assert nice_of(other) == nice_of(os.getpid())
        assert oom_of(other) == oom_of(os.getpid())
        assert proc_limits(other)["Max open files"] == proc_limits(d.pid)["Max open files"]


def has_capability(bit):
    return bool(int(proc_status(os.getpid())["CapEff"], 16) >> bit & 1)


CAP_SYS_NICE, CAP_SYS_RESOURCE = 23, 24                 # capabilities(7)


def test_negative_nice_and_oom_score_adj_need_the_privilege_of_the_daemon(tmp_path, gafferd):
    assert has_capability(CAP_SYS_NICE)                  # the tests run as root
    d = gafferd("""
        [process:urgent]
        cmd = %s 3600
        nice = -5
        [process:protected]
        cmd = %s 3600
        oom_score_adj = -900
        backoff = 5, 1, 5
        """ % (SLEEP, SLEEP))
    assert nice_of(os_pid_of(d, "urgent")) == -5
    if has_capability(CAP_SYS_RESOURCE):
        assert oom_of(os_pid_of(d, "protected")) == -900
    else:                   # a container without CAP_SYS_RESOURCE: the spawn fails, and says why
        wait_for(lambda: "cannot apply oom_score_adj = -900 in the child: EACCES" in d.log(),
                 10, message="the failed oom_score_adj in the log")
        assert d.status("protected")["running"] == 0


def groups_of(pid):
    return sorted(int(g) for g in proc_status(pid)["Groups"].split())


def test_groups_alone_and_combined_with_a_user(tmp_path, gafferd):
    nobody = pwd.getpwnam("nobody")
    daemon_gid, bin_gid = grp.getgrnam("daemon").gr_gid, grp.getgrnam("bin").gr_gid
    user_groups = os.getgrouplist("nobody", nobody.pw_gid)
    os.chmod(str(tmp_path), 0o755)                     # the user's working directory
    d = gafferd("""
        [process:alone]
        cmd = %(sleep)s 3600
        groups = daemon, %(bin)d
        [process:user]
        cmd = %(sleep)s 3600
        uid = nobody
        groups = daemon
        [process:user_and_controls]
        cmd = %(sleep)s 3600
        uid = nobody
        groups = daemon
        umask = 077
        nice = -3
        oom_score_adj = 100
        rlimit_nofile = 1000
        """ % {"sleep": SLEEP, "bin": bin_gid})
    assert groups_of(os_pid_of(d, "alone")) == sorted({daemon_gid, bin_gid})
    wanted = sorted(set(user_groups) | {daemon_gid})
    for name in ("user", "user_and_controls"):
        pid = os_pid_of(d, name)
        assert groups_of(pid) == wanted, name
        assert proc_status(pid)["Uid"].split()[0] == str(nobody.pw_uid)
        assert proc_status(pid)["Gid"].split()[0] == str(nobody.pw_gid)
    # applied before the switch to nobody, which could not have done it itself
    pid = os_pid_of(d, "user_and_controls")
    assert (nice_of(pid), oom_of(pid), proc_status(pid)["Umask"]) == (-3, 100, "0077")
    assert proc_limits(pid)["Max open files"] == ("1000", "1000")


def test_a_control_that_cannot_be_applied_fails_the_spawn_with_its_errno(tmp_path, gafferd):
    with open("/proc/sys/fs/nr_open") as f:
        too_many = int(f.read()) + 1                   # setrlimit(2): EPERM above nr_open
    d = gafferd("""
        [process:bad]
        cmd = %s 3600
        rlimit_nofile = %d
        backoff = 5, 1, 5
        [process:good]
        cmd = %s 3600
        rlimit_nofile = 1000
        """ % (SLEEP, too_many, SLEEP))
    wait_for(lambda: "cannot apply rlimit_nofile = %d in the child: EPERM "
             "(Operation not permitted)" % too_many in d.log(), 10, message="the errno in the log")
    wait_for(lambda: re.search(r'^gafferd_template_exits_total\{name="bad",reason="failed_start"\}'
                               r' [1-9]', d.get("/metrics").body.decode(), re.M),
             10, message="a failed start counted")
    assert d.status("bad")["running"] == 0
    d.wait_running("good", 1)
    assert proc_limits(d.pid)["Max open files"][0] != str(too_many)


@pytest.mark.parametrize("key, value, message", [
    ("umask", "0800", "not an octal umask"),
    ("umask", "abc", "not an octal umask"),
    ("nice", "20", "at most 19"),
    ("nice", "-21", "at least -20"),
    ("oom_score_adj", "1001", "at most 1000"),
    ("rlimit_nofile", "10MB", "not an integer"),
    ("rlimit_as", "2GB:1GB", "soft limit is above the hard one"),
    ("rlimit_core", "unlimited:10", "soft limit is above the hard one"),
    ("rlimit_stack", "1:2:3", "SOFT:HARD"),
    ("rlimit_cpu", "lots", "not an integer"),
    ("groups", "no-such-group-i15", "unknown group"),
])
def test_bad_exec_control_values_are_config_errors(tmp_path, key, value, message):
    r = check(tmp_path, "[process:app]\ncmd = %s 10\n%s = %s\n" % (SLEEP, key, value))
    assert r.returncode == 2, r
    assert "[process:app] %s:" % key in r.stderr and message in r.stderr, r.stderr


def test_only_a_template_with_controls_gets_a_preexec_step(tmp_path):
    plain = gd.build_spec("plain", "%s 1" % SLEEP, {}, base_dir=str(tmp_path))
    assert gd.exec_controls(plain) is None
    grouped = gd.build_spec("g", "%s 1" % SLEEP, {"groups": "daemon"}, base_dir=str(tmp_path))
    assert gd.exec_controls(grouped) is None        # Popen's own extra_groups on 3.9+
    masked = gd.build_spec("m", "%s 1" % SLEEP, {"umask": "022"}, base_dir=str(tmp_path))
    controls = gd.exec_controls(masked)
    assert [step[0] for step in controls.steps] == ["umask"]
    kwargs = controls.arm({})
    try:
        assert callable(kwargs["preexec_fn"])
    finally:
        controls.close()


def test_json_templates_take_every_control(tmp_path, gafferd):
    d = gafferd(None)
    definition = {"name": "j", "cmd": "%s 3600" % SLEEP, "umask": "0o022", "nice": 2,
                  "oom_score_adj": 10, "rlimit_nofile": 4096, "rlimit_core": "0:unlimited",
                  "groups": ["daemon"]}
    assert d.json("POST", "/processes", definition) == {"ok": True}
    info = d.json("GET", "/processes/j")
    assert {k: info[k] for k in definition} == definition
    pid = os_pid_of(d, "j")
    assert proc_status(pid)["Umask"] == "0022" and nice_of(pid) == 2 and oom_of(pid) == 10
    assert proc_limits(pid)["Max core file size"] == ("0", "unlimited")
    r = d.post("/processes", {"name": "bad", "cmd": "%s 1" % SLEEP, "nice": "x",
                              "rlimit_fsize": True})
    assert r.status == 400
    assert "nice:" in r.json()["message"] and "rlimit_fsize:" in r.json()["message"]


def test_env_file_errors_never_quote_the_file(tmp_path, gafferd):
    secret = write(tmp_path / "not-an-env-file", "root:$6$hash-that-must-not-leak:19000\n")
    d = gafferd(None)
    r = d.post("/processes", {"name": "probe", "cmd": "%s 1" % SLEEP, "env_file": secret})
    assert r.status == 400
    assert "line 1 is not NAME=VALUE" in r.json()["message"]
    assert b"must-not-leak" not in r.body
