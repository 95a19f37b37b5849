"""Files the daemon writes as root: log files, their rotation, the pidfile.

A program that can write its own log directory (``uid = app``) must not
be able to make the daemon follow a link to another file, write through a
hard link, block on a FIFO, or rotate away a link such as /dev/stdout.
A path that is refused gets one log line naming it and the reason, and
the daemon goes on.  What a trusted link leads to (a root-owned link in a
directory only root can write, like /dev/stdout) is written to, but
never rotated when it is not a regular file.
"""
import os
import pwd
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import PY, GAFFERD, ROOT, run_gafferd, section, wait_for
from test_logfiles import first_id, read, say, talker

sys.path.insert(0, ROOT)
import gafferd  # noqa: E402  (the helper under test, called in-process)

NOBODY = pwd.getpwnam("nobody")
SECRET = b"root's file: must stay as it is\n"


@pytest.fixture
def shared_dir():
    """A root-owned 0755 directory outside pytest's 0700 tree, so that a
    child running as nobody can reach what is inside."""
    path = tempfile.mkdtemp(prefix="gafferd-files-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def victim(tmp_path):
    path = tmp_path / "victim"
    path.write_bytes(SECRET)
    return path


def open_dir(tmp_path, name="open"):
    """A directory anyone can write, like a program's own log directory."""
    path = tmp_path / name
    path.mkdir()
    os.chmod(str(path), 0o777)
    return path


def refused(d, path, reason):
    return wait_for(lambda: "refusing to write log file %s: " % path in d.log()
                    and reason in d.log(), 10.0, message="the refusal of %s in the log" % path)


# -- a program as nobody replaces its own log file ---------------------------------

def test_program_as_nobody_cannot_make_root_append_to_or_create_a_file(gafferd, tmp_path,
                                                                         shared_dir):
    logs = os.path.join(shared_dir, "logs")
    os.mkdir(logs)
    os.chown(logs, NOBODY.pw_uid, NOBODY.pw_gid)
    target = victim(tmp_path)
    cron = tmp_path / "cron-job"          # does not exist: a link to it would create it
    config = ""
    for name, link_to, text in (("append", target, "appended"),
                                ("create", cron, "* * * * * root evil")):
        config += section(name, "/bin/sh", "-c 'ln -s %s %s.log && echo \"%s\" && exec sleep 600'"
                          % (link_to, name, text), uid="nobody", cwd=logs,
                          redirect_output="stdout", stdout_logfile="%s/%s.log" % (logs, name))
    d = gafferd(config)
    for name in ("append", "create"):
        path = os.path.join(logs, name + ".log")
        refused(d, path, "is a symbolic link that another user could have made")
        assert os.path.islink(path)
    assert target.read_bytes() == SECRET
    assert not cron.exists() and not os.path.lexists(str(cron))
    assert d.get("/ping").status == 200
    assert d.log().count("refusing to write log file %s/append.log" % logs) == 1


def test_a_link_swapped_in_between_writes_is_not_followed_at_reopen(gafferd, tmp_path):
    logs = open_dir(tmp_path)
    target = victim(tmp_path)
    log = logs / "out.log"
    d = gafferd(talker(tmp_path, stdout_logfile=str(log)))
    pid = first_id(d, "talk")
    say(d, pid, "say first\n")
    wait_for(lambda: read(log) == b"first\n", 5.0, message="the first line")
    os.unlink(str(log))
    os.symlink(str(target), str(log))
    d.signal(signal.SIGUSR1)                       # logrotate's reopen
    say(d, pid, "say second\n")
    refused(d, log, "is a symbolic link")
    assert target.read_bytes() == SECRET
    # the program puts a regular file back: writing resumes
    os.unlink(str(log))
    log.write_bytes(b"")
    n = [0]

    def resumed():
        n[0] += 1
        say(d, pid, "say again %d\n" % n[0])
        return b"again" in read(log)
    wait_for(resumed, 5.0, interval=0.05, message="writing to resume")
    assert "log file %s: writing again" % log in d.log()
    assert target.read_bytes() == SECRET


def test_no_backups_never_truncates_through_a_swapped_path(gafferd, tmp_path):
    logs = open_dir(tmp_path)
    target = victim(tmp_path)
    log = logs / "out.log"
    d = gafferd(talker(tmp_path, stdout_logfile=str(log), logfile_maxbytes="64",
                       logfile_backups="0"))
    pid = first_id(d, "talk")
    say(d, pid, "say %s\n" % ("a" * 40))
    wait_for(lambda: read(log) == b"a" * 40 + b"\n", 5.0, message="the first line")
    os.unlink(str(log))
    os.symlink(str(target), str(log))
    say(d, pid, "say %s\n" % ("b" * 40))           # over 64 bytes: the file is emptied
    say(d, pid, "say %s\n" % ("c" * 40))
    d.signal(signal.SIGUSR1)
    say(d, pid, "say %s\n" % ("d" * 40))
    refused(d, log, "is a symbolic link")
    assert target.read_bytes() == SECRET
    assert os.path.islink(str(log)) and sorted(os.listdir(str(logs))) == ["out.log"]


def test_no_backups_empties_the_file_in_place(gafferd, tmp_path):
    log = tmp_path / "small.log"
    d = gafferd(talker(tmp_path, stdout_logfile=str(log), logfile_maxbytes="64",
                       logfile_backups="0"))
    pid = first_id(d, "talk")
    say(d, pid, "say %s\n" % ("a" * 40))
    wait_for(lambda: read(log) == b"a" * 40 + b"\n", 5.0, message="the first line")
    ino = os.stat(str(log)).st_ino
    say(d, pid, "say %s\n" % ("b" * 40))
    wait_for(lambda: read(log) == b"b" * 40 + b"\n", 5.0, message="the file emptied, then b")
    assert os.stat(str(log)).st_ino == ino
    assert not [f for f in os.listdir(str(tmp_path)) if f.startswith("small.log.")]


def test_a_hard_link_at_the_log_path_is_refused(gafferd, tmp_path):
    logs = open_dir(tmp_path)
    target = victim(tmp_path)
    log = logs / "out.log"
    os.link(str(target), str(log))
    d = gafferd(talker(tmp_path, stdout_logfile=str(log)))
    say(d, first_id(d, "talk"), "say through the hard link\n")
    refused(d, log, "has 2 hard links")
    assert target.read_bytes() == SECRET
    assert d.get("/ping").status == 200


def test_a_fifo_at_the_log_path_blocks_neither_start_nor_shutdown(gafferd, tmp_path):
    logs = open_dir(tmp_path)
    fifo = logs / "out.log"
    os.mkfifo(str(fifo))                           # nobody will ever read it
    d = gafferd(talker(tmp_path, stdout_logfile=str(fifo), logfile_maxbytes="64",
                       logfile_backups="2"))
    say(d, first_id(d, "talk"), "say %s\n" % ("x" * 100))
    refused(d, fifo, "is a FIFO in a place another user can write")
    latencies = []                          # p90 of 50 pings, not each one
    for _ in range(50):
        t0 = time.monotonic()
        assert d.get("/ping", timeout=5.0).status == 200
        latencies.append(time.monotonic() - t0)
    assert statistics.quantiles(latencies, n=10, method="inclusive")[-1] < 1.0, sorted(latencies)
    t0 = time.monotonic()
    assert d.stop() == 0
    assert time.monotonic() - t0 < 4.0, "shutdown waited for the log writer"
    assert stat.S_ISFIFO(os.lstat(str(fifo)).st_mode)
    assert sorted(os.listdir(str(logs))) == ["out.log"]


# -- links users rely on: /dev/stdout ----------------------------------------------

def test_a_trusted_link_to_a_fifo_or_device_is_written_but_never_rotated(gafferd, tmp_path):
    # what /dev/stdout is: a root-owned link in a directory only root writes
    dev = tmp_path / "dev"
    dev.mkdir()
    os.chmod(str(dev), 0o755)
    os.mkfifo(str(dev / "pipe"))
    os.symlink("pipe", str(dev / "stdout"))
    os.symlink("/dev/null", str(dev / "null"))
    reader = os.open(str(dev / "pipe"), os.O_RDONLY | os.O_NONBLOCK)
    got = bytearray()

    def drain():
        try:
            got.extend(os.read(reader, 65536))
        except BlockingIOError:
            pass
        return got
    try:
        d = gafferd(talker(tmp_path, stdout_logfile=str(dev / "stdout"),
                           stderr_logfile=str(dev / "null"), logfile_maxbytes="64",
                           logfile_backups="2"))
        pid = first_id(d, "talk")
        for i in range(5):                         # 5 x 50 bytes, each stream, over 64
            say(d, pid, "say %02d %s\n" % (i, "o" * 46))
            say(d, pid, "err %02d %s\n" % (i, "e" * 46))
        wait_for(lambda: drain().count(b"\n") >= 5, 10.0, message="5 lines through the FIFO")
        assert bytes(got) == b"".join(b"%02d %s\n" % (i, b"o" * 46) for i in range(5))
        wait_for(lambda: d.get("/ping").status == 200, 5.0)
        assert os.readlink(str(dev / "stdout")) == "pipe"
        assert os.readlink(str(dev / "null")) == "/dev/null"
        assert stat.S_ISFIFO(os.lstat(str(dev / "pipe")).st_mode)
        assert stat.S_ISCHR(os.lstat("/dev/null").st_mode)
        assert sorted(os.listdir(str(dev))) == ["null", "pipe", "stdout"]
        assert "refusing" not in d.log() and "cannot write" not in d.log()
    finally:
        os.close(reader)


def test_a_trusted_link_to_proc_self_fd_1_is_written_and_not_rotated(daemon_factory, tmp_path):
    # The very link /dev/stdout is (made here: a test must never risk the
    # machine's own /dev/stdout): rotation once renamed it away.
    dev = tmp_path / "dev"
    dev.mkdir()
    os.chmod(str(dev), 0o755)
    link = dev / "stdout"
    os.symlink("/proc/self/fd/1", str(link))
    d = daemon_factory(talker(tmp_path, stdout_logfile=str(link), logfile_maxbytes="64"),
                       start=False)
    d._log = open(d.log_path, "wb")
    d._out = None
    d.proc = subprocess.Popen([PY, GAFFERD] + d.args + [d.config_path], cwd=d.dir,
                              stdout=subprocess.PIPE, stderr=d._log,
                              stdin=subprocess.DEVNULL, env=d.env)
    os.set_blocking(d.proc.stdout.fileno(), False)
    got = bytearray()

    def drain():
        try:
            got.extend(os.read(d.proc.stdout.fileno(), 65536))
        except BlockingIOError:
            pass
        return got
    try:
        d.wait_ready()
        pid = first_id(d, "talk")
        for i in range(4):                          # 4 x 50 bytes, over 64
            say(d, pid, "say %02d %s\n" % (i, "s" * 46))
        wait_for(lambda: drain().count(b"\n") >= 4, 10.0, message="4 lines on stdout")
        assert bytes(got) == b"".join(b"%02d %s\n" % (i, b"s" * 46) for i in range(4))
        assert os.readlink(str(link)) == "/proc/self/fd/1"
        assert os.listdir(str(dev)) == ["stdout"]
        assert "refusing" not in d.log()
    finally:
        d.close()
        d.proc.stdout.close()


# -- the pidfile -------------------------------------------------------------------

def test_pidfile_temp_name_is_random_and_exclusive(tmp_path):
    # The old temporary name was .NAME.<pid>.tmp, opened with O_TRUNC: a
    # link planted there made root truncate and write any file.
    target = victim(tmp_path)
    run = open_dir(tmp_path, "run")
    pidfile = run / "g.pid"
    os.symlink(str(target), str(run / (".g.pid.%d.tmp" % os.getpid())))
    gafferd.write_pidfile(str(pidfile))
    assert target.read_bytes() == SECRET
    assert pidfile.read_text() == "%d\n" % os.getpid()
    assert not stat.S_ISLNK(os.lstat(str(pidfile)).st_mode)
    gafferd.remove_pidfile(str(pidfile))
    assert not pidfile.exists()


@pytest.mark.parametrize("kind", ["fifo", "symlink", "hardlink"])
def test_pidfile_that_is_not_a_plain_file_is_refused_without_blocking(tmp_path, kind):
    target = victim(tmp_path)
    pidfile = tmp_path / "g.pid"
    if kind == "fifo":
        os.mkfifo(str(pidfile))
    elif kind == "symlink":
        os.symlink(str(target), str(pidfile))
    else:
        os.link(str(target), str(pidfile))
    r = run_gafferd(["--pidfile", str(pidfile), "--bind", "127.0.0.1:0"], timeout=20)
    assert r.returncode == 1, r.stderr
    assert "refusing pid file %s: " % pidfile in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert target.read_bytes() == SECRET


# -- open_safely, in-process ---------------------------------------------------------

def test_open_safely_follows_only_trusted_links(tmp_path):
    safe = tmp_path / "safe"
    safe.mkdir()
    os.chmod(str(safe), 0o755)
    shared = open_dir(tmp_path)
    os.symlink(str(safe), str(shared / "sub"))          # a directory link anyone could make
    os.symlink(str(safe), str(safe / "sub"))            # one only root could
    with pytest.raises(gafferd.UnsafeFileError) as info:
        gafferd.open_safely(str(shared / "sub" / "x.log"))
    assert "'sub' is a symbolic link" in str(info.value)
    assert not (safe / "x.log").exists()
    f = gafferd.open_safely(str(safe / "sub" / "y.log"))
    try:
        assert (f.regular, f.rotatable, f.name) == (True, True, "y.log")
    finally:
        f.close()
    with pytest.raises(gafferd.UnsafeFileError) as info:
        gafferd.open_safely(str(safe))
    assert str(info.value) == "%s: is a directory" % safe
    f = gafferd.open_safely("/dev/null")
    try:
        assert (f.regular, f.rotatable) == (False, False)
    finally:
        f.close()


def test_the_daemons_own_log_swapped_for_a_link_is_refused_at_reopen(gafferd, tmp_path):
    logs = open_dir(tmp_path)
    target = victim(tmp_path)
    log = logs / "gafferd.log"
    d = gafferd(None, args=["--log-file", str(log)])
    wait_for(lambda: b"ready (pid" in read(log), 5.0, message="ready in the daemon log")
    os.unlink(str(log))
    os.symlink(str(target), str(log))
    d.signal(signal.SIGUSR1)
    d.signal(signal.SIGHUP)                        # logs a line: the file is opened again
    refused(d, log, "is a symbolic link")
    assert target.read_bytes() == SECRET
    assert d.get("/ping").status == 200
    assert d.stop() == 0
    assert target.read_bytes() == SECRET
