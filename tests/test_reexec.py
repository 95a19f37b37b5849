"""Start-up from cached bytecode (§14 ``reexec_from_bytecode``).

Started as ``python3 gafferd.py``, the daemon execs itself again as
``python3 [flags] __pycache__/gafferd.*.pyc ARGS`` to skip the compiler's
memory.  That second start must import nothing from the directory it was
started in, keep the interpreter's flags, show a readable command line,
and never run bytecode that does not match the source.
"""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import GAFFERD, PY, Daemon, proc_cmdline, wait_for

# Modules the daemon (or a re-exec through ``-c``/runpy) imports after
# start-up: a copy of any of them in the current directory must not run.
SHADOWED = ("configparser", "json", "argparse", "runpy", "py_compile", "selectors",
            "struct", "shlex", "ipaddress", "urllib", "difflib", "ctypes", "ssl")


class FlagDaemon(Daemon):
    """A Daemon started as ``PY FLAGS SCRIPT ARGS``."""

    def __init__(self, tmp_path, script=GAFFERD, flags=(), **kw):
        super().__init__(tmp_path, **kw)
        self.script, self.flags = script, list(flags)
        # The re-exec writes the cache only where Python may write bytecode.
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)

    def start(self, wait_ready=True, timeout=15.0):
        self._log = open(self.log_path, "wb")
        self._out = open(self.out_path, "wb")
        self.proc = subprocess.Popen([PY] + self.flags + [self.script] + self.args,
                                     cwd=self.dir, stdout=self._out, stderr=self._log,
                                     stdin=subprocess.DEVNULL, env=self.env)
        if wait_ready:
            self.wait_ready(timeout)
        return self


def hostile_cwd(path):
    """Fill ``path`` with modules that leave a marker file when imported."""
    os.makedirs(path, exist_ok=True)
    for name in SHADOWED:
        with open(os.path.join(path, name + ".py"), "w") as f:
            f.write("open(%r, 'w').write('imported from the cwd')\n"
                    % os.path.join(path, "MARKER-" + name))
    return path


def markers(path):
    return sorted(n for n in os.listdir(path) if n.startswith("MARKER-"))


@pytest.fixture
def source(tmp_path):
    """A private copy of gafferd.py, so the test owns its bytecode cache."""
    directory = tmp_path / "src"
    directory.mkdir()
    path = str(directory / "gafferd.py")
    shutil.copy(GAFFERD, path)
    return path


def start(tmp_path, script, flags=()):
    d = FlagDaemon(hostile_cwd(str(tmp_path / "run")), script=script, flags=flags)
    try:
        d.start()
    except BaseException:
        d.close()
        raise
    return d


def test_nothing_is_imported_from_the_current_directory(tmp_path, source):
    # First start compiles the cache, second one finds it: both re-exec.
    for attempt in (1, 2):
        d = start(tmp_path, source)
        try:
            argv = proc_cmdline(d.pid)
            assert d.get("/ping").status == 200
            assert markers(d.dir) == [], (attempt, argv)
            assert argv[1:2] == [os.path.join(os.path.dirname(source), "__pycache__",
                                              "gafferd.%s.pyc" % sys.implementation.cache_tag)]
            assert argv[2:] == ["--bind", "127.0.0.1:0"]
        finally:
            d.close()


def test_the_command_line_is_readable(tmp_path, source):
    d = start(tmp_path, source)
    try:
        argv = proc_cmdline(d.pid)
        assert "-c" not in argv, argv
        assert os.path.basename(argv[1]).startswith("gafferd."), argv
        assert all(len(a) < 300 and "import" not in a for a in argv), argv
    finally:
        d.close()


FLAG_SETS = [["-I"], ["-E", "-s"], ["-O"]]
if sys.version_info >= (3, 11):
    FLAG_SETS.append(["-P"])


@pytest.mark.parametrize("flags", FLAG_SETS, ids=" ".join)
def test_interpreter_flags_are_kept(tmp_path, source, flags):
    d = start(tmp_path, source, flags)
    try:
        argv = proc_cmdline(d.pid)
        script = [i for i, a in enumerate(argv) if a.endswith(".pyc")]
        assert script, argv                             # the re-exec did happen
        assert set(flags) <= set(argv[1:script[0]]), argv
        assert markers(d.dir) == []
        assert d.get("/ping").status == 200
    finally:
        d.close()


def test_stale_bytecode_is_never_run(tmp_path, source):
    d = start(tmp_path, source)
    d.close()
    # Same mtime, other content: the bytecode no longer matches the source.
    st = os.stat(source)
    with open(source) as f:
        text = f.read()
    with open(source, "w") as f:
        f.write(text.replace('GAFFERD_VERSION = "1.0.0"', 'GAFFERD_VERSION = "1.0.0-new"', 1))
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns))
    d = start(tmp_path, source)
    try:
        assert d.json("GET", "/")["gafferd"] == "1.0.0-new"
        assert proc_cmdline(d.pid)[1].endswith(".pyc")
        assert d.get("/ping").status == 200
    finally:
        d.close()


def test_without_a_writable_cache_it_runs_from_source(tmp_path, source):
    # -B: Python may not write bytecode, so nothing is cached and no re-exec.
    d = start(tmp_path, source, ["-B"])
    try:
        assert proc_cmdline(d.pid)[1:3] == ["-B", source]
        assert not os.path.exists(os.path.join(os.path.dirname(source), "__pycache__"))
        assert markers(d.dir) == []
        wait_for(lambda: d.get("/ping").status == 200, message="ping")
    finally:
        d.close()
