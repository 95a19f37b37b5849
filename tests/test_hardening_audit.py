"""Hardening rules re-checked with inputs other than the first examples:
a log file named for stderr alone (no ``redirect_output``, no stdout
file) captures stderr into that file."""
from __future__ import annotations

from conftest import wait_for
from test_config import sub, write
from test_config_daemon import PRINTER, _log_has, check, start


def test_stderr_logfile_alone_writes_stderr_to_its_file(tmp_path, gafferd):
    write(tmp_path / "printer.py", PRINTER)
    path = write(tmp_path / "gaffer.ini", sub("""
        [process:p]
        cmd = @PY@
        args = printer.py
        stderr_logfile = err.log
        """))
    r = check(path)
    assert r.returncode == 0, r.stderr
    assert "# resolved: stderr -> label 'stderr', file %s" % (tmp_path / "err.log") in r.stdout
    d = start(gafferd, path)
    err = str(tmp_path / "err.log")
    wait_for(lambda: _log_has(err, "to-stderr"), message="err.log written")
    assert "to-stdout" not in open(err).read()
    wait_for(lambda: "to-stderr" in d.get("/processes/p/_log?label=stderr").body.decode(),
             message="stderr on its label")
