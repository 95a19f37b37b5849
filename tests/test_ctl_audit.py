"""``gafferd.py ctl`` as a tired operator and a hostile network meet it:
a server that is not gafferd (JSON of the wrong shape, an HTML page for a
feed), a token a header cannot carry, a password in the URL, a mistyped
command.  Each ends in one line on stderr and an exit status, never a
traceback, and never shows the token."""
from __future__ import annotations

import socket
import threading

import pytest

from test_ctl import ctl, no_traceback


class FakeServer:
    """Answers every request on a loopback port with the same raw reply."""

    def __init__(self, reply):
        self.reply = reply
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(32)
        self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                conn.settimeout(5)
                conn.recv(65536)
                conn.sendall(self.reply)
            except OSError:
                pass
            conn.close()

    def close(self):
        self.sock.close()


def reply(status, content_type, body):
    return ("HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
            "Connection: close\r\n\r\n" % (status, content_type, len(body))).encode() + body


@pytest.mark.parametrize("body", [b"[1, 2, 3]", b'"text"', b'{"a": 1}'])
def test_a_reply_of_the_wrong_shape_is_1_without_a_traceback(body):
    server = FakeServer(reply("200 OK", "application/json", body))
    try:
        for args in (["status"], ["status", "-p"], ["status", "web"], ["stop", "all"],
                     ["scale", "x", "3"], ["scale", "x", "+1"], ["reload"], ["version"],
                     ["logs", "x"], ["rm", "x"], ["wait", "--timeout", "2", "x"]):
            r = ctl(args, server.url)
            no_traceback(r)
            assert r.returncode in (0, 1), (args, body, r)
            if r.returncode == 1:
                assert len(r.stderr.splitlines()) == 1, (args, r)
    finally:
        server.close()


def test_events_from_a_server_that_sends_html_ends_with_1():
    server = FakeServer(reply("200 OK", "text/html", b"<html><body>hello</body></html>"))
    try:
        r = ctl(["events", "-n", "1"], server.url, timeout=20)
        assert r.returncode == 1, r
        assert "not an event stream" in r.stderr and len(r.stderr.splitlines()) == 1, r
        no_traceback(r)
    finally:
        server.close()


def test_a_server_speaking_garbage_is_one_line():
    server = FakeServer(b"\x01garbage, not HTTP\r\nmore garbage\r\n\r\n")
    try:
        r = ctl(["ping"], server.url)
        assert r.returncode == 4, r
        assert len(r.stderr.splitlines()) == 1, r
        no_traceback(r)
    finally:
        server.close()


@pytest.mark.parametrize("token", ["top\nsecret", "top\tsecret", "t\u00f6psecr\u20ac"])
def test_a_token_a_header_cannot_carry_is_2_and_never_shown(token, tmp_path):
    server = FakeServer(reply("200 OK", "text/plain", b"OK"))
    try:
        for args, env in ((["--token", token, "ping"], None), (["ping"], {"GAFFERD_TOKEN": token})):
            r = ctl(args, server.url, env=env)
            assert r.returncode == 2, r
            no_traceback(r)
            assert "secr" not in r.stderr + r.stdout, r
        (tmp_path / "token").write_text("top\rsecret\n")
        r = ctl(["--token-file", str(tmp_path / "token"), "ping"], server.url)
        assert r.returncode == 2 and "secret" not in r.stderr, r
    finally:
        server.close()


def test_a_password_in_the_url_is_not_repeated(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    r = ctl(["ping"], "http://admin:hunter2@127.0.0.1:%d" % port)
    assert r.returncode == 4, r
    assert "hunter2" not in r.stderr and "127.0.0.1:%d" % port in r.stderr, r


def test_an_unknown_command_suggests_the_nearest():
    r = ctl(["stauts"])
    assert r.returncode == 2, r
    assert "did you mean 'status'?" in r.stderr, r
    r = ctl(["xyzzy"])
    assert r.returncode == 2 and "unknown command 'xyzzy'" in r.stderr, r
    assert "did you mean" not in r.stderr
    no_traceback(r)


def test_add_shows_the_daemons_unknown_key_warnings(gafferd, tmp_path):
    d = gafferd("")
    (tmp_path / "new.ini").write_text("[process:extra]\ncmd = sleep 100\nnumproceses = 3\n")
    r = ctl(["add", str(tmp_path / "new.ini")], "http://127.0.0.1:%d" % d.port)
    assert r.returncode == 0, r
    assert "numproceses" in r.stderr and "did you mean 'numprocesses'" in r.stderr, r
    assert r.stdout == "extra: added\n"
    no_traceback(r)
