"""§6 HTTP/1.1 protocol: the request parser fed whole, byte by byte and
pipelined (as h11's tests do), response helpers and websocket frames."""
from __future__ import annotations

import os
import struct
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gafferd  # noqa: E402

GET = b"GET /processes?running=true&x=1 HTTP/1.1\r\nHost: a\r\nX-Y: 1\r\nX-Y: 2\r\n\r\n"
POST = b"POST /processes HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED = (b"PUT /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nTrailer: x\r\n\r\n")


def feed_all(data, step=None, max_body=1 << 20):
    parser = gafferd.RequestParser(max_body)
    out = []
    if step is None:
        parser.feed(data)
    for i in range(0, len(data), step or len(data) or 1):
        if step:
            parser.feed(data[i:i + step])
        while True:
            req = parser.next()
            if req is None:
                break
            out.append(req)
    while True:
        req = parser.next()
        if req is None:
            break
        out.append(req)
    return out, parser


@pytest.mark.parametrize("step", [None, 1, 7])
def test_get_whole_and_in_pieces(step):
    [req], parser = feed_all(GET, step)
    assert req.method == "GET"
    assert req.path == "/processes"
    assert req.query == {"running": "true", "x": "1"}
    assert req.headers["x-y"] == "1, 2"
    assert req.keep_alive
    assert parser.idle


@pytest.mark.parametrize("step", [None, 1, 3])
def test_body_by_content_length(step):
    [req], _ = feed_all(POST, step)
    assert req.body == b"hello"


@pytest.mark.parametrize("step", [None, 1, 5])
def test_chunked_body(step):
    [req], parser = feed_all(CHUNKED, step)
    assert req.method == "PUT"
    assert req.body == b"abcde"
    assert parser.idle


def test_pipelined_requests_come_out_in_order():
    reqs, parser = feed_all(GET + POST + CHUNKED + GET)
    assert [r.method for r in reqs] == ["GET", "POST", "PUT", "GET"]
    assert reqs[1].body == b"hello" and reqs[2].body == b"abcde"
    assert parser.idle


def test_partial_then_rest_waits_for_body():
    parser = gafferd.RequestParser()
    parser.feed(POST[:-2])
    assert parser.next() is None
    assert parser.waiting_body is not None and parser.waiting_body.path == "/processes"
    parser.feed(POST[-2:])
    assert parser.next().body == b"hello"


def test_http10_closes_unless_keep_alive():
    [req], _ = feed_all(b"GET / HTTP/1.0\r\n\r\n")
    assert not req.keep_alive
    [req], _ = feed_all(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert req.keep_alive
    [req], _ = feed_all(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert not req.keep_alive


MALFORMED = [
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
    (b"GET /" + b"a" * 9000, 414),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"b" * 17000 + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: y\r\n" * 4000, 431),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2000000\r\n\r\n", 413),
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nNoColon\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    (b"GET / FTP/1.0\r\n\r\n", 400),
    (b"GET nopath HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nfffffff\r\n", 413),
]


@pytest.mark.parametrize("data,status", MALFORMED, ids=[str(i) for i in range(len(MALFORMED))])
def test_malformed_requests_raise_with_their_status(data, status):
    parser = gafferd.RequestParser()
    with pytest.raises(gafferd.HttpError) as info:
        parser.feed(data)
        while parser.next() is not None:
            pass
    assert info.value.status == status


def test_leading_blank_lines_are_ignored():
    [req], _ = feed_all(b"\r\n\r\n" + GET)
    assert req.path == "/processes"


def test_render_head_and_chunk_and_sse():
    head = gafferd.render_head(404, [("Content-Length", 2)])
    assert head == b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n"
    assert gafferd.chunk(b"abc") == b"3\r\nabc\r\n"
    assert gafferd.chunk(b"") == b""
    event = gafferd.sse_event("stdout", ["a", "b"], 7)
    assert event == b"id: 7\r\nevent: stdout\r\ndata: a\r\ndata: b\r\n\r\n"


def mask(payload, key=b"\x01\x02\x03\x04"):
    return bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def client_frame(opcode, payload, fin=True):
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    return head + b"\x01\x02\x03\x04" + mask(payload)


def test_websocket_accept_key_matches_rfc_example():
    # RFC 6455 section 1.3
    assert gafferd.ws_accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize("size", [0, 5, 125, 126, 70000])
def test_websocket_frames_round_trip(size):
    payload = bytes(range(256)) * (size // 256 + 1)
    payload = payload[:size]
    parser = gafferd.WebSocketParser()
    data = client_frame(gafferd.WS_BINARY, payload)
    out = []
    for i in range(0, len(data), 1000):
        out += parser.feed(data[i:i + 1000])
    assert out == [(gafferd.WS_BINARY, payload)]
    frame = gafferd.ws_frame(gafferd.WS_TEXT, payload)
    assert frame[0] == 0x81 and not frame[1] & 0x80


def test_websocket_fragments_and_interleaved_ping():
    parser = gafferd.WebSocketParser()
    data = (client_frame(gafferd.WS_TEXT, b"EC", fin=False)
            + client_frame(gafferd.WS_PING, b"p")
            + client_frame(gafferd.WS_CONT, b"HO\n"))
    assert parser.feed(data) == [(gafferd.WS_PING, b"p"), (gafferd.WS_TEXT, b"ECHO\n")]


@pytest.mark.parametrize("data", [
    b"\x81\x05hello",                                   # unmasked
    b"\xf1\x80\x00\x00\x00\x00",                        # reserved bits
    client_frame(gafferd.WS_CONT, b"x"),                # continuation first
    client_frame(3, b"x"),                              # unknown opcode
    client_frame(gafferd.WS_PING, b"x" * 126),          # control frame too long
])
def test_websocket_protocol_errors(data):
    with pytest.raises(gafferd.WebSocketError):
        gafferd.WebSocketParser().feed(data)


# Numbers in framing are ASCII digits only (RFC 9110 8.6 1*DIGIT, RFC 9112
# 7.1 1*HEXDIG).  str.isdigit() took '\xb2' (a latin-1 superscript two),
# then int() refused it: a ValueError, a 500, and a connection whose
# framing nobody knew any more.
BAD_NUMBERS = [b"\xb2", b"\xb9\xb2", b"\xd9\xa1\xd9\xa2", b"1_0", b"+5", b"0x5", b"5e0",
               b"1 2", b"-0", b"\xef\xbc\x95"]


@pytest.mark.parametrize("number", BAD_NUMBERS, ids=repr)
@pytest.mark.parametrize("step", [None, 1])
def test_content_length_is_ascii_digits_only(number, step):
    data = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: " + number + b"\r\n\r\n12345"
    with pytest.raises(gafferd.HttpError) as info:
        feed_all(data, step)
    assert info.value.status == 400


@pytest.mark.parametrize("number", [n for n in BAD_NUMBERS if n != b"5e0"] + [b"g"], ids=repr)
@pytest.mark.parametrize("step", [None, 1])
def test_chunk_size_is_ascii_hex_only(number, step):
    data = (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            + number + b"\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n")
    with pytest.raises(gafferd.HttpError) as info:
        feed_all(data, step)
    assert info.value.status == 400


def test_content_length_with_surrounding_blanks_still_frames_the_body():
    # RFC 9110 5.5: optional whitespace around a field value is not part of it
    [req, nxt], _ = feed_all(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: \t5 \r\n\r\n"
                             b"helloGET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert req.body == b"hello" and nxt.method == "GET"
