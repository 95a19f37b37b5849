"""A second review of files, children and descriptors, with inputs other
than the first one's: what a program (or what it leaves behind) can do to
the daemon, and what the daemon leaves behind when it stops.

Real daemons and processes, checked through /proc; every wait has a
deadline.
"""
import os
import random
import signal

from conftest import pid_alive, section, wait_for


def pids_of(words):
    """The pids whose command line is exactly ``words``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/cmdline" % entry, "rb") as f:
                    if f.read().split(b"\0")[:-1] == [w.encode() for w in words]:
                        found.append(int(entry))
            except OSError:
                pass
    return found


# -- nothing left behind after shutdown ----------------------------------------------

def test_the_children_of_an_orphan_are_not_left_behind_at_shutdown(gafferd, tmp_path):
    """A program starts a helper in a session of its own that ignores
    SIGTERM and has children of its own (which ignore it too).  When the
    program is stopped, the helper is an orphan of the daemon; its
    children are not the daemon's children until the helper dies.  After
    the shutdown none of them may be running."""
    marks = ["%d.%d" % (random.randrange(10 ** 6, 10 ** 7), n) for n in range(2)]
    helper = tmp_path / "helper.sh"
    helper.write_text("trap '' TERM\nsleep %s &\nsleep %s\n" % tuple(marks))
    d = gafferd(section("p", "/bin/sh", "-c 'setsid /bin/sh %s & exec sleep 1000'" % helper))
    try:
        wait_for(lambda: all(pids_of(["sleep", m]) for m in marks), 10.0,
                 message="the helper's children")
        assert d.stop() == 0
        left = [p for m in marks for p in pids_of(["sleep", m]) if pid_alive(p)]
        assert left == [], "left behind after shutdown: %s\n%s" % (left, d.log())
    finally:
        for m in marks:
            for pid in pids_of(["sleep", m]):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
