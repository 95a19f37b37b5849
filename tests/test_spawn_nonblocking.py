"""The loop never waits for a child's exec.

Children are forked and execed by the spawner's starter thread; the loop
prepares them and registers them once the start is back.  These tests
hold a real child between its fork and its exec (a preexec step, added by
a test plugin, that reads a FIFO the test writes to) and check that the
daemon answers meanwhile, and that the races of an asynchronous start
keep every guarantee: a child that exits before the loop learns its pid
is reaped as ours (not as an orphan), a stop or a shutdown while a start
is in flight ends the child, and children get no fd of the daemon.
"""

import fcntl
import os
import signal
import struct
import termios
import textwrap

from conftest import EventWatcher, holds_for, pid_alive, wait_for

# The plugin adds a preexec step to the children of some templates:
#   held*:  wait for a byte on $HOLD_FIFO, then exec
#   ghost:  fork a grandchild that keeps subprocess' error pipe open until
#           a byte arrives on $HOLD_FIFO, and exit 7 at once (the child is
#           a zombie before its start is back: the reaper must wait for it)
#   late*:  the start's report to the loop is delayed by 1 s (the child
#           exits first: the reaper finds its pid on the starter's record)
PLUGIN = textwrap.dedent('''
    import os
    from gafferd import Plugin

    FIFO = os.environ["HOLD_FIFO"]

    def wait_fifo():                    # exactly one byte (no buffered read-ahead)
        fd = os.open(FIFO, os.O_RDONLY)
        try:
            os.read(fd, 1)
        finally:
            os.close(fd)

    def ghost():
        if os.fork() == 0:
            wait_fifo()
            os._exit(0)
        os._exit(7)

    STEPS = {"held": wait_fifo, "ghost": ghost}

    class App:
        def start(self, loop, manager):
            spawner = manager.spawner
            prepare, back = spawner._prepare, spawner._starter.on_back

            def held_prepare(proc):
                start = prepare(proc)
                step = STEPS.get(proc.name.rstrip("0123456789"))
                if step is not None:
                    first = start.kwargs.get("preexec_fn")

                    def preexec():
                        if first is not None:
                            first()
                        step()
                    start.kwargs["preexec_fn"] = preexec
                return start

            def late_back(start):
                if start.proc.name.startswith("late"):
                    loop.call_later(1.0, back, start)
                else:
                    back(start)
            spawner._prepare = held_prepare
            spawner._starter.on_back = late_back

        def stop(self):
            pass

        def restart(self):
            pass

    class Hold(Plugin):
        name = "hold"

        def app(self, cfg):
            return App()

    __all__ = ["Hold"]
''')


def start_daemon(tmp_path, gafferd, config):
    fifo = str(tmp_path / "hold.fifo")
    os.mkfifo(fifo)
    plugin = tmp_path / "plugins" / "hold" / "hold"
    plugin.mkdir(parents=True)
    (plugin / "__init__.py").write_text("")
    (plugin / "main.py").write_text(PLUGIN)
    d = gafferd(config, args=["-p", str(tmp_path / "plugins")], env={"HOLD_FIFO": fifo})
    return d, fifo


def release(fifo, count=1):
    """Let ``count`` held children go (each reads one byte).  The FIFO is
    opened read-write (no wait for a reader) and kept open until every
    byte is taken: a child that opens it late still finds its byte, and
    none sees an end of file for want of a writer."""
    fd = os.open(fifo, os.O_RDWR)
    try:
        os.write(fd, b"x" * count)
        wait_for(lambda: struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0] == 0,
                 message="the held children to take their bytes")
    finally:
        os.close(fd)


def daemon_children(d):
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == d.pid and fields[0] != "Z":
                out.append(int(entry))
    return out


def test_ping_is_answered_while_a_child_is_held_before_its_exec(tmp_path, gafferd):
    d, fifo = start_daemon(tmp_path, gafferd, """
        [process:held]
        cmd = sleep 1000
        startsecs = 0
    """)
    # the child is forked and blocked before its exec: the daemon answers
    wait_for(lambda: len(daemon_children(d)) == 1, message="the held child forked")
    for _ in range(20):
        r = d.get("/ping", timeout=2.0)
        assert r.status == 200
    status = d.status("held")
    assert status["running"] == 0                 # no pid is known yet
    assert d.status("held")["state"] == "starting"
    release(fifo)
    d.wait_running("held", 1)
    os_pid = d.os_pid(d.pids("held")[0])
    with open("/proc/%d/cmdline" % os_pid, "rb") as f:
        assert f.read().split(b"\0")[0] == b"sleep"


def test_a_child_that_exits_before_its_start_is_back_is_reaped_as_ours(tmp_path, gafferd):
    d, fifo = start_daemon(tmp_path, gafferd, """
        [process:ghost]
        cmd = sleep 1000
        restart = never
        startsecs = 0
    """)
    # the child exited 7 in its preexec step; its grandchild holds the
    # start open, so the zombie waits for the start before it is reaped
    wait_for(lambda: len(daemon_children(d)) == 1, message="the grandchild")
    watcher = EventWatcher(d, "exit")
    try:
        holds_for(lambda: d.status("ghost")["last_exit"] is None,
                  0.3, message="no exit before the start is back")
        release(fifo)
        wait_for(lambda: d.status("ghost")["last_exit"] is not None,
                 message="the exit of the child")
        events = watcher.wait(lambda evs: len(evs) >= 1, message="its exit event")
        assert events[0]["exit_status"] == 7
    finally:
        watcher.close()
    info = d.status("ghost")
    assert info["last_exit"]["exit_status"] == 7
    child = info["last_exit"]["os_pid"]
    assert "orphan pid %d:" % child not in d.log()


def test_a_child_reaped_before_the_loop_hears_of_its_start(tmp_path, gafferd):
    d, _ = start_daemon(tmp_path, gafferd, """
        [process:late]
        cmd = sh -c "exit 5"
        restart = never
        startsecs = 0
    """)
    wait_for(lambda: d.status("late")["last_exit"] is not None,
             message="the exit of the child")
    assert d.status("late")["last_exit"]["exit_status"] == 5
    assert "adopted orphan pid" not in d.log()
    assert d.json("GET", "/orphans")["reaped_total"] == 0


def test_a_stop_while_the_start_is_in_flight_ends_the_child(tmp_path, gafferd):
    d, fifo = start_daemon(tmp_path, gafferd, """
        [process:held]
        cmd = sleep 1000
        startsecs = 0
    """)
    wait_for(lambda: len(daemon_children(d)) == 1, message="the held child forked")
    held = daemon_children(d)[0]
    assert d.post("/processes/held/_stop").status == 200
    assert d.status("held")["state"] == "stopped"
    release(fifo)
    # the child execs, its start comes back, and the stop signal follows it
    wait_for(lambda: not pid_alive(held), message="the child stopped")
    assert d.json("GET", "/orphans")["reaped_total"] == 0
    assert d.status("held")["running"] == 0
    assert daemon_children(d) == []
    assert "adopted orphan pid" not in d.log()


def test_a_shutdown_waits_for_a_start_in_flight_and_ends_its_child(tmp_path, gafferd):
    d, fifo = start_daemon(tmp_path, gafferd, """
        [process:held]
        cmd = sleep 1000
        startsecs = 0

        [process:other]
        cmd = sleep 1000
    """)
    d.wait_running("other", 1)
    wait_for(lambda: len(daemon_children(d)) == 2, message="the held child forked")
    held = [p for p in daemon_children(d) if p != d.os_pid(d.pids("other")[0])][0]
    d.signal(signal.SIGTERM)
    holds_for(lambda: d.proc.poll() is None, 0.5, message="the daemon waits for the start")
    release(fifo)
    assert d.proc.wait(15) == 0
    wait_for(lambda: not pid_alive(held), message="the held child ended")
    assert "adopted orphan pid" not in d.log()


def test_a_start_that_never_comes_back_does_not_hold_the_shutdown_up(tmp_path, gafferd):
    # an exec that hangs (a dead network mount, a preexec step that waits)
    # must not keep the daemon from exiting: it waits 10 s, says so, exits
    d, fifo = start_daemon(tmp_path, gafferd, """
        [process:held]
        cmd = sleep 1000
        startsecs = 0

        [process:other]
        cmd = sleep 1000
    """)
    d.wait_running("other", 1)
    other = d.os_pid(d.pids("other")[0])
    wait_for(lambda: len(daemon_children(d)) == 2, message="the held child forked")
    held = [p for p in daemon_children(d) if p != other][0]
    try:
        assert d.stop(timeout=30) == 0
        assert "1 start(s) did not come back (held)" in d.log()
        assert not pid_alive(other)               # the rest was stopped as always
    finally:
        os.kill(held, signal.SIGKILL)             # still blocked before its exec


def test_children_started_together_get_only_their_own_fds(tmp_path, gafferd):
    d, fifo = start_daemon(tmp_path, gafferd, """
        [process:held]
        cmd = sleep 1000
        numprocesses = 3
        startsecs = 0

        [process:free]
        cmd = sleep 1000
        numprocesses = 20
        redirect_output = stdout stderr
    """)
    # while three starts are held, the other template's children start
    d.wait_running("free", 20)
    before = len(os.listdir("/proc/%d/fd" % d.pid))
    release(fifo, 3)
    d.wait_running("held", 3)
    for name in ("free", "held"):
        for pid in d.pids(name):
            fds = sorted(int(fd) for fd in os.listdir("/proc/%d/fd" % d.os_pid(pid)))
            assert fds == [0, 1, 2], (name, fds)
    # the held starts' pipe ends were closed in the daemon once they were back
    after = len(os.listdir("/proc/%d/fd" % d.pid))
    assert after <= before + 2, (before, after)
