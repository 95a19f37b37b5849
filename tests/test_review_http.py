"""An independent review of what a network client can send: each test is
an attack that once hurt the daemon (a 500, or a loop wedged for tens of
seconds), now answered at once while the daemon keeps serving others."""
import base64
import os
import struct
import sys
import time

from conftest import RawClient, http_request_bytes, wait_for

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gafferd as gd  # noqa: E402  (the fixture is called gafferd)


def ws_frame(opcode, payload=b"", fin=True):
    """A masked client frame (mask 0: the payload goes as it is)."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    if n < 126:
        head = struct.pack("!BB", b0, 0x80 | n)
    else:
        head = struct.pack("!BBH", b0, 0x80 | 126, n)
    return head + b"\0\0\0\0" + payload


def open_websocket(port, path):
    c = RawClient(port)
    key = base64.b64encode(os.urandom(16)).decode()
    c.send(http_request_bytes("GET", path, host="127.0.0.1:%d" % port, headers=[
        ("Upgrade", "websocket"), ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", key), ("Sec-WebSocket-Version", "13")]))
    head = c.read_response(head=True)
    assert head.status == 101, head
    return c


def ping_time(port):
    """Seconds the daemon takes to answer GET /ping on a new connection."""
    started = time.monotonic()
    with RawClient(port, timeout=30) as c:
        resp = c.request(http_request_bytes("GET", "/ping", host="127.0.0.1:%d" % port))
    assert resp.status == 200, resp
    return time.monotonic() - started


def test_head_of_a_process_id_beyond_int_digit_limit_is_400(gafferd):
    """``HEAD /processes/<5000 digits>`` went straight to int(), which
    Python 3.11+ refuses beyond 4300 digits: a 500 and a traceback."""
    d = gafferd()
    for method in ("HEAD", "GET"):
        with RawClient(d.port) as c:
            resp = c.request(http_request_bytes(method, "/processes/" + "9" * 5000,
                                                host="127.0.0.1:%d" % d.port),
                             head=(method == "HEAD"))
        assert resp.status == 400, (method, resp)
    assert "Traceback" not in d.log()


def test_endless_empty_fragments_do_not_wedge_the_loop(gafferd, tmp_path):
    """A websocket message begun and continued by 50,000 empty fragments
    (300 kB): the parser summed every fragment so far on each frame, a
    quadratic cost that kept the whole daemon from answering for ~20 s."""
    d = gafferd("[process:cat]\ncmd = cat\nredirect_input = true\n"
                "redirect_output = stdout\n")
    d.wait_running("cat", 1)
    pid = d.pids("cat")[0]
    ws = open_websocket(d.port, "/wstreams/%d" % pid)
    try:
        ws.send(ws_frame(gd.WS_TEXT, b"a", fin=False))
        ws.send(ws_frame(0, b"", fin=False) * 50000)
        ws.send(ws_frame(0, b"b", fin=True))
        # the whole message reaches the child, and the loop was never held up
        assert ping_time(d.port) < 2.0
        wait_for(lambda: "ab" in "".join(d.get("/processes/cat/_log").json()["lines"]),
                 message="the message written to the child")
    finally:
        ws.close()


def test_fragments_beyond_the_message_limit_close_with_1009():
    """Fragments add up to WS_MAX_MESSAGE at most, however small each is."""
    parser = gd.WebSocketParser()
    piece = b"x" * 60000
    data = ws_frame(gd.WS_BINARY, piece, fin=False)
    data += ws_frame(0, piece, fin=False) * (gd.WS_MAX_MESSAGE // len(piece) + 1)
    try:
        parser.feed(data)
    except gd.WebSocketError as exc:
        assert exc.code == 1009
    else:
        raise AssertionError("a message over WS_MAX_MESSAGE was accepted")
    parser = gd.WebSocketParser()
    messages = parser.feed(ws_frame(gd.WS_TEXT, b"a", fin=False) +
                           ws_frame(0, b"", fin=False) * 1000 + ws_frame(0, b"b"))
    assert messages == [(gd.WS_TEXT, b"ab")]
