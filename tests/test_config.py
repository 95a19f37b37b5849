"""Configuration file parsing (INI files, includes, endpoints, templates and
their errors), tested in-process: ``read_config``, ``Config``, the spec
builder (``build_spec``, ``TemplateSpec``) and what ``--check`` prints
(``Daemon.load`` and ``Daemon.describe``), with no subprocess and no
daemon.  What a running daemon does with a config (children started,
files written, the refusal's exit status) is in test_config_daemon.py.
"""
import contextlib
import grp
import json
import os
import pwd
import re
import shutil
import sys
import textwrap

import pytest

from conftest import PY

import gafferd

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


@contextlib.contextmanager
def cwd_of(directory):
    """Run the block from ``directory`` (None: stay), then come back."""
    before = os.getcwd()
    if directory is not None:
        os.chdir(str(directory))
    try:
        yield
    finally:
        os.chdir(before)


class Checked:
    """What ``gafferd --check PATH`` reports, computed in-process as
    ``main`` does: ``returncode`` 0 or 2, ``stdout`` (the resolved config),
    ``errors`` and ``warnings`` (one line each) and ``stderr`` (the
    warnings, marked WARNING as the log shows them, then the errors)."""

    def __init__(self, returncode, stdout, warnings, errors, config):
        self.returncode, self.stdout, self.config = returncode, stdout, config
        self.warnings, self.errors = list(warnings), list(errors)
        self.stderr = "\n".join(["WARNING " + w for w in self.warnings] + self.errors)


def check(path, cwd=None, args=()):
    """``gafferd [ARGS] --check PATH`` without the subprocess; an exception
    other than a ConfigError(s) fails the test (the CLI would show a
    traceback)."""
    parsed = gafferd.build_arg_parser().parse_args(list(args) + ["--check", str(path)])
    daemon = gafferd.Daemon(parsed)
    with cwd_of(cwd):
        try:
            daemon.load()
        except gafferd.ConfigErrors as exc:
            return Checked(2, "", exc.warnings, [str(e) for e in exc.errors], None)
        except gafferd.ConfigError as exc:
            return Checked(2, "", [], [str(exc)], None)
        return Checked(0, daemon.describe(), daemon.config.warnings, [], daemon.config)


def stderr_lines(result):
    return [line for line in result.stderr.splitlines() if line.strip()]


def single_error_line(result):
    """The one error line of a refused config (exit status 2, nothing else)."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = stderr_lines(result)
    assert len(lines) == 1, "expected exactly one error line, got:\n" + result.stderr
    return lines[0]


def load(path, cwd=None, **kw):
    """``read_config`` of a valid file (its ConfigErrors fail the test)."""
    with cwd_of(cwd):
        try:
            return gafferd.read_config(str(path), **kw)
        except gafferd.ConfigErrors as exc:
            pytest.fail("config refused:\n%s" % exc)


def names(cfg):
    """What ``GET /processes`` lists: the templates in start-up order."""
    return [spec.name for spec in cfg.templates]


def definition(cfg, name):
    """What ``GET /processes/NAME`` shows (through JSON, as the API sends it)."""
    spec = [s for s in cfg.templates if s.name == name][0]
    return json.loads(gafferd.json_dumps(spec.definition()).decode())


def spec_of(cfg, name):
    return [s for s in cfg.templates if s.name == name][0]


# -- --check -------------------------------------------------------------------

def test_check_valid_config_prints_templates(tmp_path):
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
    assert "alpha" in r.stdout and "beta:worker" in r.stdout, r.stdout
    assert "%s 60" % SLEEP in r.stdout and "%s 61" % SLEEP in r.stdout, r.stdout
    assert not any("error" in line.lower() for line in stderr_lines(r)), r.stderr
    assert r.stdout.endswith("2 template(s), 1 endpoint(s): config OK"), r.stdout


# -- 2.1 parsing rules ---------------------------------------------------------

def test_section_case_kept_option_names_lowercased_colon_separator(tmp_path):
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
    cfg = r.config
    assert names(cfg) == ["WebApp"]
    info = definition(cfg, "WebApp")
    assert info["name"] == "WebApp"
    assert info["cmd"] == "%s 60" % SLEEP
    assert info["numprocesses"] == 2
    assert info["priority"] == 3
    assert info["env"] == {"PORT": "8080"}
    assert spec_of(cfg, "WebApp").numprocesses == 2


def test_percent_signs_survive_no_interpolation(tmp_path):
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
    cfg = r.config
    assert definition(cfg, "pct")["cmd"] == "printf 100%%"
    assert definition(cfg, "pctargs")["args"] == "50% done %(name)s"
    assert definition(cfg, "pctrun")["cmd"].startswith("printf '100%% %s\\n' ok")
    # what sh -c is given: the value uninterpolated
    spec = spec_of(cfg, "pctrun")
    argv = gafferd.command_line(spec, gafferd.checked_environment(spec, os.environ))
    assert argv[:2] == ["sh", "-c"] and argv[2].startswith("printf '100%% %s\\n' ok > ")


def test_no_inline_comments_semicolon_survives_in_shell_cmd(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    path = write(tmp_path / "gaffer.ini", sub("""
        [process:semi]
        cmd = echo one > @A@ ; echo two > @B@ ; exec @SLEEP@ 60
        shell = true
        """, A=a, B=b))
    assert definition(load(path), "semi")["cmd"] == \
        "echo one > %s ; echo two > %s ; exec %s 60" % (a, b, SLEEP)


def test_full_line_comments_and_continuation_lines(tmp_path):
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
    assert definition(load(path), "cont")["args"] == "60\nextra"


# -- [gaffer] --------------------------------------------------------------------

def test_http_endpoints_are_stripped_and_unlisted_endpoints_unused(tmp_path):
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
    cfg = load(path)
    assert [ep.name for ep in cfg.endpoints] == ["one", "two"]
    assert [ep.backlog for ep in cfg.endpoints] == [7, 128]
    assert [a.text for ep in cfg.endpoints for a in ep.addresses] == ["127.0.0.1:0"] * 2
    assert [w for w in cfg.warnings if "[endpoint:three] is not in [gaffer] http_endpoints"
            in w], cfg.warnings


def test_listed_but_missing_endpoint_falls_back_to_default(tmp_path):
    path = write(tmp_path / "gaffer.ini", sub("""
        [gaffer]
        http_endpoints = ghost, nobind

        [endpoint:nobind]
        backlog = 5

        [process:x]
        cmd = @SLEEP@ 60
        """))
    cfg = load(path)
    assert cfg.endpoints == []
    assert [w for w in cfg.warnings if "[gaffer] http_endpoints: no [endpoint:ghost] section"
            in w], cfg.warnings
    assert [w for w in cfg.warnings if "[endpoint:nobind] has no bind, skipped" in w], \
        cfg.warnings
    r = check(path, args=["--bind", "127.0.0.1:0"])
    assert r.returncode == 0, r.stderr
    assert [(ep.name, [a.text for a in ep.addresses]) for ep in r.config.endpoints] == \
        [("default", ["127.0.0.1:0"])]
    assert names(r.config) == ["x"]


@pytest.mark.parametrize("keys", [
    "plugins_dir = plugs",
    "plugin_dir = plugs",
    "plugins_dir = plugs\nplugin_dir = wrong",
], ids=["plugins_dir", "plugin_dir", "plugins_dir-first"])
def test_plugins_dir_key_relative_to_config_file(tmp_path, keys):
    conf = tmp_path / "conf"
    os.makedirs(str(conf / "plugs"))
    os.makedirs(str(conf / "wrong"))
    path = write(conf / "gaffer.ini", "[gaffer]\n" + keys + "\n\n[myplugin]\nmarker = x\n")
    # A -p option is beaten by the config key, whatever the cwd.
    os.makedirs(str(tmp_path / "other"))
    cfg = load(path, cwd=str(tmp_path / "other"), plugins_dir=str(tmp_path / "other"))
    assert cfg.plugins_dirs == [str(conf / "plugs")]
    # the plugin's own section reaches it through the parser
    assert cfg.parser.get("myplugin", "marker") == "x"
    assert load(write(tmp_path / "bare.ini", "[gaffer]\n"),
                plugins_dir=str(tmp_path / "other")).plugins_dirs == [str(tmp_path / "other")]


def test_include_and_include_dir_relative_to_config_file(tmp_path):
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
    found = names(r.config)
    assert sorted(found) == ["a", "b", "c", "main", "one"], found
    assert found[0] == "main"
    from_dir = [n for n in found if n in ("a", "b", "c")]
    assert from_dir == ["a", "b", "c"], found
    assert spec_of(r.config, "a").numprocesses == 2
    assert [w for w in r.warnings if "missing.ini" in w and "not found, skipped" in w], \
        r.warnings


def test_include_dir_sorted_order_decides_start_order_on_priority_ties(tmp_path):
    conf = tmp_path / "conf"
    for name in ("zeta", "alpha", "mid"):
        write(conf / "d" / ("%s.ini" % name), sub("""
            [process:@N@]
            cmd = @SLEEP@ 60
            priority = 1
            """, N=name))
    path = write(conf / "gaffer.ini", "[gaffer]\ninclude_dir = d\n")
    assert names(load(path)) == ["alpha", "mid", "zeta"]


def test_webhooks_key_case_kept_and_several_urls(tmp_path):
    base = "http://127.0.0.1:1"
    path = write(tmp_path / "gaffer.ini", sub("""
        [webhooks]
        proc.WebApp.spawn = @B@/first   @B@/second
        proc.Other.spawn = @B@/other

        [process:WebApp]
        cmd = @SLEEP@ 60
        """, B=base))
    cfg = load(path)
    assert cfg.webhooks == [("proc.WebApp.spawn", base + "/first"),
                            ("proc.WebApp.spawn", base + "/second"),
                            ("proc.Other.spawn", base + "/other")]


# -- [process:NAME] ------------------------------------------------------------

def test_process_defaults_shown_by_api(tmp_path):
    path = write(tmp_path / "gaffer.ini", sub("""
        [process:plain]
        cmd = @SLEEP@ 60
        """))
    info = definition(load(path), "plain")
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


def test_process_keys_all_set(tmp_path):
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
    cfg = load(path)
    info = definition(cfg, "full")
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
    assert spec_of(cfg, "full").start is True
    named = definition(cfg, "named")
    assert named["uid"] == user and named["gid"] == group
    assert spec_of(cfg, "named").start is False
    assert (spec_of(cfg, "named").uid, spec_of(cfg, "named").gid) == (os.getuid(), os.getgid())


FLAPPING_FORMS = {
    "comma": "2, 1., 7., 5",
    "space": "2 1 7 5",
    "mixed": "3 0.5, 2 4",
    "two": "4, 2.5",
    "one": "4",
}


def test_flapping_forms_through_api(tmp_path):
    text = ""
    for name, value in FLAPPING_FORMS.items():
        text += "[process:%s]\ncmd = %s 60\nflapping = %s\nstart = false\n\n" % (name, SLEEP, value)
    text += "[process:off]\ncmd = %s 60\nflapping = off\nstart = false\n" % SLEEP
    r = check(write(tmp_path / "gaffer.ini", text))
    assert r.returncode == 0, r.stderr
    cfg = r.config
    default = {"attempts": 2, "window": 1.0, "retry_in": 7.0, "max_retry": 5}
    assert definition(cfg, "comma")["flapping"] == default
    assert definition(cfg, "space")["flapping"] == default
    assert definition(cfg, "mixed")["flapping"] == {"attempts": 3, "window": 0.5,
                                                    "retry_in": 2.0, "max_retry": 4}
    assert definition(cfg, "two")["flapping"] == {"attempts": 4, "window": 2.5,
                                                  "retry_in": 7.0, "max_retry": 5}
    assert definition(cfg, "one")["flapping"] == {"attempts": 4, "window": 1.0,
                                                  "retry_in": 7.0, "max_retry": 5}
    flapping = definition(cfg, "off").get("flapping")
    assert not isinstance(flapping, dict), flapping
    assert flapping in (None, False, "off"), flapping


def test_flapping_maps_onto_startsecs_backoff_and_start_retries(tmp_path):
    # what the crash loop test of test_config_daemon.py sees at run time
    path = write(tmp_path / "gaffer.ini", sub("""
        [process:mapped]
        cmd = @SLEEP@ 60
        flapping = 3, 2., 4., 6
        [process:off]
        cmd = @SLEEP@ 60
        flapping = off
        [process:fast]
        cmd = @SLEEP@ 60
        startsecs = 0
        """))
    cfg = load(path)
    mapped, off, fast = (spec_of(cfg, n) for n in ("mapped", "off", "fast"))
    assert mapped.startsecs == 2.0 and mapped.start_retries == 6
    assert mapped.backoff.to_list() == gafferd.Backoff(4.0, 1.0, 4.0).to_list()
    default = gafferd.PROCESS_KEYS
    for key in ("startsecs", "restart_delay", "backoff", "start_retries"):
        assert getattr(off, key) == default[key][1] or \
            getattr(off, key).to_list() == default[key][1].to_list(), key
    assert (fast.startsecs, fast.restart_delay) == (0.0, 0.0)


# -- [env:NAME] ----------------------------------------------------------------

def test_env_section_upper_cased(tmp_path):
    path = write(tmp_path / "gaffer.ini", sub("""
        [process:merged]
        cmd = @SH@
        args = -c 'echo "$PORT|$FOO|$ONLYOS|$MixedCase"; exec @SLEEP@ 60'

        [env:merged]
        port = 80
        Foo = fromini
        mixedcase = mc

        [process:bare]
        cmd = @SH@
        args = -c 'echo "[$PORT][$$ONLYOS]"; exec @SLEEP@ 60'
        os_env = false

        [env:bare]
        PORT = 81
        """, SH=SH))
    environ = {"FOO": "fromos", "ONLYOS": "yes", "MixedCase": "x", "PATH": os.environ["PATH"]}
    cfg = load(path, environ=environ)
    assert definition(cfg, "merged")["env"] == {"PORT": "80", "FOO": "fromini",
                                                "MIXEDCASE": "mc"}
    assert definition(cfg, "bare")["env"] == {"PORT": "81"}
    # the environment each child starts with: explicit values win over the
    # daemon's, os_env = false starts from nothing
    merged = gafferd.child_environment(spec_of(cfg, "merged"), environ)
    assert (merged["PORT"], merged["FOO"], merged["ONLYOS"], merged["MixedCase"]) == \
        ("80", "fromini", "yes", "x")
    bare = gafferd.child_environment(spec_of(cfg, "bare"), environ)
    assert bare["PORT"] == "81" and "ONLYOS" not in bare


# -- relative paths, cwd, groups -------------------------------------------------

def test_relative_cmd_and_cwd_resolved_against_config_dir(tmp_path):
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
    real_conf = os.path.realpath(str(conf))
    expect_cwd = {"rel": real_conf, "relcwd": os.path.join(real_conf, "work"),
                  "updir": os.path.join(real_conf, "work"), "plain": real_conf}
    with cwd_of(tmp_path):
        for name, cwd in expect_cwd.items():
            spec = spec_of(r.config, name)
            assert os.path.realpath(spec.cwd) == cwd, name
            if name != "plain":
                env = gafferd.checked_environment(spec, os.environ)
                exe = gafferd.find_executable(gafferd.command_line(spec, env)[0], spec, env)
                assert os.path.realpath(exe) == os.path.join(real_conf, "bin", "prog.py"), name


def test_group_from_name_prefix(tmp_path):
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
    cfg = load(path)
    assert names(cfg) == ["web:api", "web:worker:x", "solo"]
    assert definition(cfg, "web:api")["group"] == "web"
    assert definition(cfg, "web:api")["name"] == "web:api"
    assert definition(cfg, "web:worker:x")["group"] == "web"
    assert definition(cfg, "solo")["group"] is None
    assert spec_of(cfg, "web:worker:x").group == "web"


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
    lines = stderr_lines(r)
    assert len(lines) == 1 and "[process:empty] cmd" in lines[0], r.stderr


# -- warnings and plugin sections ----------------------------------------------

def test_unknown_key_warns_with_closest_key_and_continues(tmp_path):
    path = write(tmp_path / "gaffer.ini", sub("""
        [process:web]
        cmd = @SLEEP@ 60
        numprocess = 2
        """))
    r = check(path)
    assert r.returncode == 0, r.stderr
    warn = [l for l in stderr_lines(r) if "numprocess" in l]
    assert len(warn) == 1, r.stderr
    assert "did you mean 'numprocesses'?" in warn[0]
    assert "[process:web]" in warn[0]
    assert names(r.config) == ["web"]
    assert "numprocess" not in definition(r.config, "web")


def test_plugin_sections_are_accepted(tmp_path):
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
    assert names(r.config) == ["web"]
    assert r.config.parser.get("myplugin", "anything") == "goes here"


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


def bad_config(tmp_path, case_id):
    """Write the BAD case ``case_id``; its (path, section, key, fragments,
    file name expected in the line).  test_config_daemon.py uses it too."""
    _id, text, extra, section, key, fragments = [c for c in BAD if c[0] == case_id][0]
    for name, content in extra.items():
        write(tmp_path / name, sub(content, DIR=tmp_path))
    path = write(tmp_path / "gaffer.ini", sub(text, DIR=tmp_path))
    return path, section, key, fragments, "extra.ini" if extra else "gaffer.ini"


@pytest.mark.parametrize("case_id", [c[0] for c in BAD])
def test_bad_config(tmp_path, case_id):
    path, section, key, fragments, fname = bad_config(tmp_path, case_id)
    line = single_error_line(check(path, cwd=str(tmp_path)))
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
    line = single_error_line(check(missing))
    assert "nope.ini" in line


def test_default_section_values_apply_to_every_process(tmp_path):
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
    cfg = load(path)
    assert definition(cfg, "inherits")["numprocesses"] == 2
    assert definition(cfg, "overrides")["numprocesses"] == 1


# -- unknown keys ----------------------------------------------------------------

DID_YOU_MEAN = "numproceses: unknown key, ignored; did you mean 'numprocesses'?"


def test_a_misspelt_key_is_a_warning_and_leaves_the_template_unchanged(tmp_path):
    # what a reload compares: the misspelt key is neither stored nor compared
    path = write(tmp_path / "gaffer.ini", sub("""
        [process:web]
        cmd = @SLEEP@ 60
        """))
    before = spec_of(load(path), "web")
    with open(path, "a") as f:
        f.write("numproceses = 3\n")
    cfg = load(path)
    after = spec_of(cfg, "web")
    line = [w for w in cfg.warnings if w.endswith(DID_YOU_MEAN)]
    assert len(line) == 1 and "[process:web]" in line[0], cfg.warnings
    assert after.key() == before.key()
    assert "numproceses" not in definition(cfg, "web")


def test_a_refused_file_still_reports_its_warnings(tmp_path):
    path = write(tmp_path / "gaffer.ini", sub("""
        [process:web]
        cmd = @SLEEP@ 60
        numproceses = 3
        numprocesses = many
        """))
    with pytest.raises(gafferd.ConfigErrors) as info:
        gafferd.read_config(path)
    assert [w for w in info.value.warnings if w.endswith(DID_YOU_MEAN)], info.value.warnings
    assert any("many" in str(e) for e in info.value.errors), info.value.errors


def test_api_templates_warn_about_unknown_keys_without_the_file_part(tmp_path):
    warnings = []
    spec = gafferd.build_spec("api", SLEEP, {"args": ["60"], "numproceses": 3, "colour": "red"},
                              base_dir=str(tmp_path), origin="api", warnings=warnings)
    assert warnings == [DID_YOU_MEAN, "colour: unknown key, ignored"]
    assert set(spec.definition()) == {"name", "cmd", "args"}
    warnings = []
    gafferd.build_spec("b", SLEEP, {"args": ["60"]}, base_dir=str(tmp_path), origin="api",
                       warnings=warnings)
    assert warnings == []


# -- a log file captures its stream ---------------------------------------------------

def test_stdout_and_stderr_logfile_without_redirect_output(tmp_path):
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
    spec = spec_of(r.config, "p")
    assert spec.labels == ["stdout", "stderr"]
    assert (spec.logfile_for(0), spec.logfile_for(1)) == \
        (str(tmp_path / "out.log"), str(tmp_path / "err.log"))


def test_logfile_alone_captures_both_streams(tmp_path):
    path = write(tmp_path / "gaffer.ini", sub("""
        [process:p]
        cmd = @PY@
        args = printer.py
        logfile = all.log
        """))
    spec = spec_of(load(path), "p")
    both = str(tmp_path / "all.log")
    assert spec.labels == ["stdout", "stderr"]
    assert (spec.logfile_for(0), spec.logfile_for(1)) == (both, both)


def test_a_logfile_for_the_second_stream_adds_only_that_label(tmp_path):
    path = write(tmp_path / "gaffer.ini", sub("""
        [process:p]
        cmd = @PY@
        args = printer.py
        redirect_output = out
        stderr_logfile = err.log
        """))
    spec = spec_of(load(path), "p")
    assert spec.labels == ["out", "stderr"]
    assert (spec.logfile_for(0), spec.logfile_for(1)) == (None, str(tmp_path / "err.log"))


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


def test_help_describes_the_program():
    text = gafferd.build_arg_parser().format_help()
    assert "watchers" not in text
    assert "process supervisor" in text


# -- template names -----------------------------------------------------------------------

BAD_NAMES = [".", "..", "x" * 201, "..:web", "grp:..", ".:x"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=["dot", "dotdot", "201-chars", "dotdot-group",
                                                 "dotdot-in-group", "dot-group"])
def test_bad_template_names_are_refused_in_the_config(tmp_path, name):
    path = write(tmp_path / "gaffer.ini", sub("[process:%s]\ncmd = @SLEEP@ 60\n" % name))
    line = single_error_line(check(path))
    assert "invalid template name" in line, line
    assert "at most 200" in line or "'.' and '..'" in line, line


def test_bad_template_names_are_refused_by_the_spec_builder(tmp_path):
    for name in BAD_NAMES:
        with pytest.raises(gafferd.ConfigError) as info:
            gafferd.build_spec(name, SLEEP, {"args": ["60"]}, base_dir=str(tmp_path),
                               origin="api")
        assert "invalid template name" in gafferd.api_config_message(info.value)
    ok = "x" * 200
    assert gafferd.build_spec(ok, SLEEP, {"args": ["60"]}, base_dir=str(tmp_path),
                              origin="api").name == ok


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
