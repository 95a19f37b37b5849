"""gafferd under systemd's ``Type=notify``: the sd_notify messages it sends.

With ``NOTIFY_SOCKET`` set, gafferd sends ``READY=1`` (with ``STATUS=`` and
``MAINPID=``) once its endpoints listen and its start-up templates are
launched, a rate-limited ``STATUS=`` line when templates change,
``STOPPING=1`` at shutdown and ``WATCHDOG=1`` every half ``WATCHDOG_USEC``.
Each test binds a real AF_UNIX datagram socket (a path, or an abstract
``@name``) and reads what the real daemon sends to it.
"""
import os
import signal
import socket
import time

from conftest import run_gafferd, section, wait_for, holds_for

SLEEPER = "python3 -c 'import os, time; open(\"env.txt\", \"w\").write(repr(sorted(os.environ))); time.sleep(600)'"


class NotifyListener:
    """A bound AF_UNIX datagram socket standing for systemd's."""

    def __init__(self, address):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)
        self.messages = []                       # (monotonic time, text)

    def poll(self):
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return self.messages
            self.messages.append((time.monotonic(), data.decode()))

    def texts(self):
        return [text for _, text in self.poll()]

    def wait(self, needle, timeout=10.0):
        return wait_for(lambda: [t for t in self.texts() if needle in t], timeout,
                        message="a notify message holding %r; got %r" % (needle, self.messages))

    def close(self):
        self.sock.close()


def sleeper_config(tmp_path, count=1):
    return section("sleeper", SLEEPER, numprocesses=count, cwd=str(tmp_path))


def fields(text):
    return dict(line.split("=", 1) for line in text.split("\n") if "=" in line)


def test_ready_status_and_stopping_in_order(gafferd, tmp_path):
    listener = NotifyListener(str(tmp_path / "notify.sock"))
    try:
        d = gafferd(sleeper_config(tmp_path),
                    env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
        ready = listener.wait("READY=1")[0]
        msg = fields(ready)
        assert msg["MAINPID"] == str(d.pid)
        assert msg["STATUS"].startswith("1 template(s)"), msg
        # READY came after the endpoint listened and the template was launched
        # (its process is running once its start, on a starter thread, is back).
        d.wait_running("sleeper", 1)
        assert "ready (pid" in d.log()
        # The program did not inherit systemd's variables.
        env = wait_for(lambda: (tmp_path / "env.txt").exists() and
                       (tmp_path / "env.txt").read_text(), message="env.txt")
        assert "NOTIFY_SOCKET" not in env and "WATCHDOG_USEC" not in env
        # A change updates STATUS=.
        assert d.post("/processes/sleeper/_add/2").status == 200
        d.wait_running("sleeper", 3)
        listener.wait("3 process(es)")
        assert not [t for t in listener.texts() if "STOPPING=1" in t]
        assert d.stop() == 0
        stopping = listener.wait("STOPPING=1")
        texts = listener.texts()
        assert texts.index(ready) < texts.index(stopping[0])
        assert sum("READY=1" in t for t in texts) == 1
        # No watchdog was asked for: no WATCHDOG=1, so no timer.
        assert not [t for t in texts if "WATCHDOG=1" in t]
    finally:
        listener.close()


def test_status_is_rate_limited(gafferd, tmp_path):
    listener = NotifyListener(str(tmp_path / "notify.sock"))
    try:
        d = gafferd(sleeper_config(tmp_path),
                    env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
        listener.wait("READY=1")
        start = time.monotonic()
        for _ in range(10):                     # 10 changes as fast as the API goes
            d.request("POST", "/processes/sleeper/_add/1")
        d.wait_running("sleeper", 11, timeout=30)
        listener.wait("11 process(es)", timeout=10)
        statuses = [(t, text) for t, text in listener.poll()
                    if text.startswith("STATUS=") and t >= start]
        span = statuses[-1][0] - start
        # At most one STATUS= a second (plus the first, sent at once).
        assert len(statuses) <= 2 + span, statuses
        gaps = [b[0] - a[0] for a, b in zip(statuses, statuses[1:])]
        assert all(g >= 0.9 for g in gaps), gaps
    finally:
        listener.close()


def test_watchdog_pings_at_half_the_interval(gafferd, tmp_path):
    listener = NotifyListener(str(tmp_path / "notify.sock"))
    try:
        gafferd(sleeper_config(tmp_path), env={
            "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "400000"})
        listener.wait("READY=1")
        wait_for(lambda: sum(t == "WATCHDOG=1" for t in listener.texts()) >= 8,
                 timeout=15, message="8 WATCHDOG=1 pings")
        pings = [t for t, text in listener.poll() if text == "WATCHDOG=1"]
        gaps = sorted(b - a for a, b in zip(pings, pings[1:]))
        median = gaps[len(gaps) // 2]
        assert 0.15 <= median <= 0.35, gaps          # 0.2 s: half of 400 ms
    finally:
        listener.close()


def test_watchdog_pid_of_another_process_is_not_ours(gafferd, tmp_path):
    listener = NotifyListener(str(tmp_path / "notify.sock"))
    try:
        gafferd(sleeper_config(tmp_path), env={
            "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "200000",
            "WATCHDOG_PID": "1"})
        listener.wait("READY=1")
        holds_for(lambda: "WATCHDOG=1" not in listener.texts(), 1.0,
                  message="no WATCHDOG=1 for a watchdog meant for pid 1")
    finally:
        listener.close()


def test_abstract_namespace_address(gafferd, tmp_path):
    name = "gafferd-test-%d-%d" % (os.getpid(), time.monotonic_ns() % 10 ** 9)
    listener = NotifyListener("\0" + name)
    try:
        d = gafferd(sleeper_config(tmp_path), env={"NOTIFY_SOCKET": "@" + name})
        listener.wait("READY=1")
        d.stop()
        listener.wait("STOPPING=1")
    finally:
        listener.close()


def test_check_never_notifies(tmp_path):
    listener = NotifyListener(str(tmp_path / "notify.sock"))
    try:
        config = tmp_path / "gaffer.ini"
        config.write_text(sleeper_config(tmp_path))
        result = run_gafferd(["--check", str(config)], cwd=str(tmp_path),
                             env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
                                  "WATCHDOG_USEC": "100000"})
        assert result.returncode == 0, result.stderr
        assert "config OK" in result.stdout
        assert listener.texts() == []
    finally:
        listener.close()


def test_a_missing_or_dead_socket_never_blocks(gafferd, tmp_path):
    # Nobody is bound at the path: every message fails at once, the daemon goes on.
    d = gafferd(sleeper_config(tmp_path), env={
        "NOTIFY_SOCKET": str(tmp_path / "nobody.sock"), "WATCHDOG_USEC": "20000"})
    start = time.monotonic()
    for _ in range(50):
        assert d.get("/ping").status == 200
    assert time.monotonic() - start < 10
    d.signal(signal.SIGTERM)
    assert d.proc.wait(20) == 0
