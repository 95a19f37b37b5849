"""Child output log files and console copies (``-vv``).

Keys of ``[process:NAME]``: stdout_logfile, stderr_logfile, logfile,
logfile_maxbytes (bytes or KB/MB/GB), logfile_backups, log_timestamps;
``-`` is the daemon's own stdout; SIGUSR1 reopens the files. ``-vv``
copies child output lines to the daemon's stdout.
"""
import datetime
import os
import re
import signal
import statistics
import subprocess
import threading
import time


from conftest import script, section, GAFFERD, PY, run_gafferd, wait_for

MiB = 1024 * 1024

# talker.py: obeys commands on stdin, one write(2) each:
#   say TEXT -> TEXT\n on stdout     err TEXT -> TEXT\n on stderr
TALKER = r'''
import os, sys
while True:
    line = sys.stdin.buffer.readline()
    if not line:
        break
    cmd, _, arg = line.rstrip(b"\n").partition(b" ")
    if cmd == b"say":
        os.write(1, arg + b"\n")
    elif cmd == b"err":
        os.write(2, arg + b"\n")
'''

# lines.py COUNT: writes COUNT numbered 100-byte lines in writes of 64 KB
# or so, then sleeps (so it never writes them twice).
LINES = r'''
import os, sys, time
FILL = b"y" * 89
count = int(sys.argv[1])
for start in range(0, count, 650):
    os.write(1, b"".join(b"%09d %s\n" % (n, FILL) for n in range(start, min(count, start + 650))))
time.sleep(3600)
'''
LINE_RE = re.compile(rb"(\d{9}) y{89}\Z")


def talker(tmp_path, name="talk", **keys):
    keys.setdefault("redirect_output", "stdout, stderr")
    keys.setdefault("redirect_input", "true")
    return section(name, PY, "-u " + script(tmp_path, "talker.py", TALKER), **keys)


def first_id(d, name):
    return wait_for(lambda: d.pids(name), message="a live %s process" % name)[0]


def say(d, pid, text):
    r = d.post("/streams/%d/stdin" % pid, body=text.encode())
    assert r.status == 200, r


def read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


def check_contiguous_tail(data, last):
    """``data`` is whole numbered lines, consecutive, ending with ``last``."""
    assert data.endswith(b"\n"), data[-200:]
    lines = data[:-1].split(b"\n")
    numbers = []
    for line in lines:
        m = LINE_RE.match(line)
        assert m, "damaged line %r" % line[:120]
        numbers.append(int(m.group(1)))
    assert numbers == list(range(numbers[0], last + 1)), "lines missing or out of order"
    return numbers


def test_stdout_and_stderr_logfiles_relative_to_the_config(gafferd, tmp_path):
    (tmp_path / "logs").mkdir()
    d = gafferd(talker(tmp_path, stdout_logfile="logs/out.log", stderr_logfile="logs/err.log"))
    pid = first_id(d, "talk")
    say(d, pid, "say to stdout\n")
    say(d, pid, "err to stderr\n")
    say(d, pid, "say again\n")
    out, err = tmp_path / "logs" / "out.log", tmp_path / "logs" / "err.log"
    wait_for(lambda: read(out) == b"to stdout\nagain\n", 5.0, message="out.log")
    wait_for(lambda: read(err) == b"to stderr\n", 5.0, message="err.log")


def test_logfile_takes_every_label(gafferd, tmp_path):
    d = gafferd(talker(tmp_path, logfile=str(tmp_path / "all.log")))
    pid = first_id(d, "talk")
    say(d, pid, "say one\n")
    wait_for(lambda: read(tmp_path / "all.log") == b"one\n", 5.0, message="stdout line")
    say(d, pid, "err two\n")
    wait_for(lambda: read(tmp_path / "all.log") == b"one\ntwo\n", 5.0, message="stderr line")


def rotated(tmp_path, name):
    return sorted(f for f in os.listdir(str(tmp_path)) if f.startswith(name))


def test_rotation_3mb_through_1mb_keeps_2_backups_and_whole_lines(gafferd, tmp_path):
    count = 36000  # 3.6 MB of 100-byte lines
    gafferd(section("lines", PY, "-u %s %d" % (script(tmp_path, "lines.py", LINES), count),
                        redirect_output="stdout", stdout_logfile="out.log",
                        logfile_maxbytes="1MB", logfile_backups="2"))
    log = tmp_path / "out.log"
    last = b"%09d %s\n" % (count - 1, b"y" * 89)
    wait_for(lambda: read(log).endswith(last), 20.0, message="the last line in out.log")
    assert rotated(tmp_path, "out.log") == ["out.log", "out.log.1", "out.log.2"]
    parts = [read(tmp_path / n) for n in ("out.log.2", "out.log.1", "out.log")]
    for part in parts:
        assert len(part) <= MiB, len(part)
        check_contiguous_tail(part, int(part[-100:-91]))  # whole lines in each file
    for part in parts[:2]:
        assert len(part) > MiB // 2, "rotated long before the limit: %d bytes" % len(part)
    numbers = check_contiguous_tail(b"".join(parts), count - 1)
    assert numbers[0] > 0, "nothing was rotated away"


def test_size_suffix_kb_and_one_backup(gafferd, tmp_path):
    count = 400  # 40 KB
    d = gafferd(section("lines", PY, "-u %s %d" % (script(tmp_path, "lines.py", LINES), count),
                        redirect_output="stdout", stdout_logfile="small.log",
                        logfile_maxbytes="10KB", logfile_backups="1"))
    last = b"%09d %s\n" % (count - 1, b"y" * 89)
    wait_for(lambda: read(tmp_path / "small.log").endswith(last), 10.0, message="the last line")
    assert rotated(tmp_path, "small.log") == ["small.log", "small.log.1"]
    parts = [read(tmp_path / "small.log.1"), read(tmp_path / "small.log")]
    assert all(len(p) <= 10 * 1024 for p in parts), [len(p) for p in parts]
    check_contiguous_tail(b"".join(parts), count - 1)
    assert d.get("/ping").status == 200


def test_log_timestamps_prefix_each_line_with_an_iso_time(gafferd, tmp_path):
    d = gafferd(talker(tmp_path, stdout_logfile="ts.log", log_timestamps="true"))
    pid = first_id(d, "talk")
    say(d, pid, "say first\n")
    say(d, pid, "say second\n")
    wait_for(lambda: read(tmp_path / "ts.log").count(b"\n") >= 2, 5.0, message="two lines")
    lines = read(tmp_path / "ts.log").decode().splitlines()
    assert len(lines) == 2, lines
    now = datetime.datetime.now()
    for line, text in zip(lines, ("first", "second")):
        m = re.match(r"(\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:?\d\d)? (.*)\Z", line)
        assert m, line
        assert m.group(4) == text, line
        stamp = datetime.datetime.strptime(m.group(1).replace("T", " "), "%Y-%m-%d %H:%M:%S")
        if not m.group(3):  # local time
            assert abs((now - stamp).total_seconds()) < 60, line


def test_dash_writes_to_the_daemons_stdout_when_it_is_a_pipe(daemon_factory, tmp_path):
    d = daemon_factory(talker(tmp_path, stdout_logfile="-"), start=False)
    d._log = open(d.log_path, "wb")
    d._out = None
    d.proc = subprocess.Popen([PY, GAFFERD] + d.args + [d.config_path], cwd=d.dir,
                              stdout=subprocess.PIPE, stderr=d._log,
                              stdin=subprocess.DEVNULL, env=d.env)
    chunks = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: d.proc.stdout.read1(65536), b"")),
                              daemon=True)
    reader.start()
    try:
        d.wait_ready()
        pid = first_id(d, "talk")
        say(d, pid, "say through the pipe\n")
        wait_for(lambda: re.search(rb"(^|\n)through the pipe\n", b"".join(chunks)), 5.0,
                 message="the line on the daemon's stdout")
        say(d, pid, "err not on stdout\n")
        say(d, pid, "say second line\n")
        wait_for(lambda: b"second line\n" in b"".join(chunks), 5.0, message="the second line")
        assert b"not on stdout" not in b"".join(chunks)
        assert "Illegal seek" not in d.log() and "Traceback" not in d.log()
        assert d.stop() == 0
    finally:
        d.close()
        reader.join(5)
        d.proc.stdout.close()


# big.py MARKER: writes 4 MB of lines to stdout, then creates MARKER and sleeps.
BIG = r'''
import os, sys, time
line = b"b" * 99 + b"\n"
for _ in range(40):
    os.write(1, line * 1000)
open(sys.argv[1], "w").close()
time.sleep(3600)
'''


def test_dash_never_blocks_the_loop_when_stdout_is_not_read(daemon_factory, tmp_path):
    # Writing child output never blocks the loop for long. Here nobody reads
    # the daemon's stdout pipe, which fills up after 64 KB.
    marker = tmp_path / "written"
    d = daemon_factory(section("big", PY, "-u %s %s" % (script(tmp_path, "big.py", BIG), marker),
                               redirect_output="stdout", stdout_logfile="-"), start=False)
    d._log = open(d.log_path, "wb")
    d._out = None
    d.proc = subprocess.Popen([PY, GAFFERD] + d.args + [d.config_path], cwd=d.dir,
                              stdout=subprocess.PIPE, stderr=d._log,
                              stdin=subprocess.DEVNULL, env=d.env)
    try:
        d.wait_ready()
        # the daemon keeps reading the child's pipe, so the child gets to the end
        wait_for(marker.exists, 10.0, message="the child to write its 4 MB")
        latencies = []                      # p90 of 50 pings, not each one
        for _ in range(50):
            t0 = time.monotonic()
            assert d.get("/ping", timeout=5.0).status == 200
            latencies.append(time.monotonic() - t0)
        assert statistics.quantiles(latencies, n=10, method="inclusive")[-1] < 0.5, sorted(latencies)
    finally:
        d.proc.stdout.close()  # unblocks a daemon stuck in write(2): EPIPE
        d.stop()


def test_sigusr1_reopens_log_files(gafferd, tmp_path):
    d = gafferd(talker(tmp_path, stdout_logfile="app.log"))
    pid = first_id(d, "talk")
    log, old = tmp_path / "app.log", tmp_path / "app.log.old"
    say(d, pid, "say before\n")
    wait_for(lambda: read(log) == b"before\n", 5.0, message="the first line")
    os.rename(str(log), str(old))  # what logrotate does
    d.signal(signal.SIGUSR1)
    n = [0]

    def after_in_new_file():
        n[0] += 1
        say(d, pid, "say after %d\n" % n[0])
        return re.search(rb"after \d+\n", read(log))
    wait_for(after_in_new_file, 5.0, interval=0.05, message="lines in the reopened app.log")
    new = read(log)
    assert re.fullmatch(rb"(after \d+\n)+", new), new
    assert read(old).startswith(b"before\n")
    assert d.proc.poll() is None and d.get("/ping").status == 200


def test_missing_log_directory_is_a_config_error(tmp_path):
    for key in ("stdout_logfile", "stderr_logfile", "logfile"):
        config = tmp_path / ("%s.ini" % key)
        config.write_text(section("talk", "sleep", "600", redirect_output="stdout, stderr",
                                  **{key: str(tmp_path / "no-such-dir" / "x.log")}))
        runs = [["--check", str(config)]]
        if key == "logfile":  # and a real start-up refuses it too
            runs.append([str(config), "--bind", "127.0.0.1:0"])
        for args in runs:
            r = run_gafferd(args, cwd=str(tmp_path), timeout=20)
            assert r.returncode == 2, (args, r.returncode, r.stderr)
            assert "Traceback" not in r.stderr
            assert re.search(r"\[process:talk\] %s: " % key, r.stderr), r.stderr


def test_bad_logfile_sizes_are_config_errors(tmp_path):
    for key, value in (("logfile_maxbytes", "10XB"), ("logfile_maxbytes", "big"),
                       ("logfile_backups", "-1"), ("logfile_backups", "two")):
        config = tmp_path / "bad.ini"
        config.write_text(section("talk", "sleep", "600", redirect_output="stdout",
                                  stdout_logfile="x.log", **{key: value}))
        r = run_gafferd(["--check", str(config)], cwd=str(tmp_path), timeout=20)
        assert r.returncode == 2, (key, value, r.stderr)
        assert re.search(r"\[process:talk\] %s: " % key, r.stderr), r.stderr
        assert "Traceback" not in r.stderr


def test_gb_suffix_is_accepted(gafferd, tmp_path):
    d = gafferd(talker(tmp_path, stdout_logfile="big.log", logfile_maxbytes="2GB",
                       logfile_backups="0"))
    say(d, first_id(d, "talk"), "say fine\n")
    wait_for(lambda: read(tmp_path / "big.log") == b"fine\n", 5.0, message="the line")


# -- console copies -----------------------------------------------------------

def test_vv_copies_child_output_lines_to_stdout(gafferd, tmp_path):
    d = gafferd(talker(tmp_path, name="chatty"), args=["-vv"])
    pid = first_id(d, "chatty")
    say(d, pid, "say hello from stdout\n")
    say(d, pid, "err hello from stderr\n")
    say(d, pid, "say \n")  # an empty line is skipped
    say(d, pid, "say   padded  \n")
    for text in ("hello from stdout", "hello from stderr", "padded"):
        wait_for(lambda: re.search(r"\d\d:\d\d:\d\d chatty \| %s(\x1b\[[0-9;]*m)*\n" % text,
                                   d.output()), 5.0, message="%r on stdout" % text)
    assert not re.search(r"chatty \| (\x1b\[[0-9;]*m)*\n", d.output()), d.output()


def say_and_wait(d, name, text):
    say(d, first_id(d, name), "say %s\n" % text)
    wait_for(lambda: text in d.get("/processes/%s/_log" % name).json()["lines"],
             5.0, message="the line in the ring buffer")


def test_v_prints_events_but_no_child_output(gafferd, tmp_path):
    d = gafferd(talker(tmp_path, name="chatty"), args=["-v"])
    say_and_wait(d, "chatty", "secret words")
    wait_for(lambda: re.search(r"\d\d:\d\d:\d\d chatty \| spawn ", d.output()), 5.0,
             message="the spawn line with -v")
    assert "secret words" not in d.output()


def test_without_v_stdout_stays_empty(gafferd, tmp_path):
    d = gafferd(talker(tmp_path, name="hush"))
    say_and_wait(d, "hush", "secret words")
    assert d.output() == ""


# -- the daemon's own log: --log-file, [gaffer] logfile -----------------------------

def read_pid(pidfile):
    text = read(pidfile).strip()
    return int(text) if text.isdigit() else None


def stop_pid(pid, timeout=20.0):
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not os.path.exists("/proc/%d" % pid) or
             open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()[0] == "Z",
             timeout, message="the daemon to exit")


def test_daemon_with_log_file_logs_there_and_reopens_on_sigusr1(tmp_path):
    log, pidfile = tmp_path / "gafferd.log", tmp_path / "g.pid"
    r = run_gafferd(["--daemon", "--log-file", str(log), "--pidfile", str(pidfile),
                     "--bind", "127.0.0.1:0"], cwd=str(tmp_path), timeout=20)
    assert r.returncode == 0, r.stderr
    assert "gafferd: running in the background; its log goes to %s" % log in r.stderr
    pid = wait_for(lambda: read_pid(pidfile), 10.0, message="the pidfile")
    try:
        wait_for(lambda: b"ready (pid %d)" % pid in read(log), 10.0, message="ready in the log")
        assert re.search(rb"listening on http://127\.0\.0\.1:\d+", read(log))
        os.rename(str(log), str(tmp_path / "gafferd.log.old"))
        os.kill(pid, signal.SIGUSR1)
        n = [0]

        def logged_in_new_file():   # SIGHUP logs a line: it lands in the reopened file
            n[0] += 1
            os.kill(pid, signal.SIGHUP)
            return b"SIGHUP" in read(log)
        wait_for(logged_in_new_file, 10.0, interval=0.1, message="a line in the reopened log")
        assert b"ready" not in read(log)
    finally:
        stop_pid(pid)
    assert b"shutting down" in read(log)


def test_daemon_without_log_file_says_where_its_log_goes(tmp_path):
    pidfile = tmp_path / "g.pid"
    r = run_gafferd(["--daemon", "--pidfile", str(pidfile), "--bind", "127.0.0.1:0"],
                    cwd=str(tmp_path), timeout=20)
    assert r.returncode == 0, r.stderr
    assert "its log is discarded" in r.stderr and "--log-file" in r.stderr, r.stderr
    stop_pid(wait_for(lambda: read_pid(pidfile), 10.0, message="the pidfile"))


def test_gaffer_logfile_rotates_like_program_logs(gafferd, tmp_path):
    (tmp_path / "logs").mkdir()
    d = gafferd("[gaffer]\nlogfile = logs/gafferd.log\nlogfile_maxbytes = 400\n"
                "logfile_backups = 2\n\n[DEFAULT]\nlogfile = ignored.log\n\n")
    log = tmp_path / "logs" / "gafferd.log"
    for n in range(1, 16):                    # each reload logs a line of ~150 bytes
        d.signal(signal.SIGHUP)
        wait_for(lambda: d.log().count("reloaded ") >= n, 10.0, message="reload %d" % n)
    wait_for(lambda: os.path.exists(str(log) + ".2"), 10.0, message="two rotations")
    assert sorted(os.listdir(str(tmp_path / "logs"))) == ["gafferd.log", "gafferd.log.1",
                                                         "gafferd.log.2"]
    for name in ("gafferd.log.1", "gafferd.log.2"):
        part = read(tmp_path / "logs" / name)
        assert 0 < len(part) <= 400 and part.endswith(b"\n"), part
    assert not (tmp_path / "ignored.log").exists()
    assert "unknown key" not in d.log()


def test_bad_daemon_log_file_is_refused_at_start(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(str(shared), 0o777)
    os.symlink(str(tmp_path / "elsewhere"), str(shared / "gafferd.log"))
    r = run_gafferd(["--log-file", str(shared / "gafferd.log"), "--bind", "127.0.0.1:0"],
                    cwd=str(tmp_path), timeout=20)
    assert r.returncode == 2, r.stderr
    assert "--log-file: refusing %s: " % (shared / "gafferd.log") in r.stderr, r.stderr
    assert not os.path.lexists(str(tmp_path / "elsewhere"))
    config = tmp_path / "bad.ini"
    config.write_text("[gaffer]\nlogfile = no-such-dir/g.log\nlogfile_backups = -1\n")
    r = run_gafferd(["--check", str(config)], cwd=str(tmp_path), timeout=20)
    assert r.returncode == 2, r.stderr
    assert "[gaffer] logfile: " in r.stderr and "[gaffer] logfile_backups: " in r.stderr
    assert "Traceback" not in r.stderr
