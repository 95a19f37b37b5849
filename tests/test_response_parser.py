"""§6 HTTP/1.1 protocol: the client's ResponseParser fed each message
whole, one byte at a time and followed by pipelined data (as h11's
tests do); malformed input raises a ResponseError naming the problem."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gafferd  # noqa: E402

LENGTH = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nX-A: 2\r\n\r\nhello"
CHUNKED = (b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nTrailer: x\r\n\r\n")
INTERIM = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
           b"HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\nok")
NO_CONTENT = b"HTTP/1.1 204 No Content\r\n\r\n"
NOT_MODIFIED = b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n"
CLOSE = b"HTTP/1.0 200\r\nServer: old\r\n\r\nuntil the end"

# (message, method, status, body) for every message that knows its own end
FRAMED = [
    (LENGTH, "GET", 200, b"hello"),
    (CHUNKED, "POST", 201, b"abcde"),
    (INTERIM, "POST", 202, b"ok"),
    (NO_CONTENT, "DELETE", 204, b""),
    (NOT_MODIFIED, "GET", 304, b""),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n", "HEAD", 200, b""),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", "GET", 200, b""),
]
PIPELINED = b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nnoHTTP/1.1 2"


def feed(data, step=None, method="GET", eof=False, **limits):
    """Every response the parser gives for ``data`` fed in ``step``-byte
    pieces (whole when None), calling next() after each piece."""
    parser = gafferd.ResponseParser(method, **limits)
    out = []
    step = step or len(data) or 1
    for i in range(0, len(data), step):
        parser.feed(data[i:i + step])
        response = parser.next()
        while response is not None:
            out.append(response)
            response = parser.next()
    if eof:
        parser.feed_eof()
        response = parser.next()
        while response is not None:
            out.append(response)
            response = parser.next()
    return out, parser


@pytest.mark.parametrize("step", [None, 1, 4])
@pytest.mark.parametrize("message,method,status,body", FRAMED)
def test_framed_whole_and_byte_by_byte(message, method, status, body, step):
    [response], parser = feed(message, step, method)
    assert (response.status, response.body) == (status, body)
    assert parser.buf == b""


@pytest.mark.parametrize("step", [None, 1, 4])
@pytest.mark.parametrize("message,method,status,body", FRAMED)
def test_framed_with_pipelined_trailing_data(message, method, status, body, step):
    responses, parser = feed(message + PIPELINED, step, method)
    if method == "HEAD":            # the 404 answers a HEAD too: no body
        assert [(r.status, r.body) for r in responses] == [(status, body), (404, b"")]
        assert parser.buf == b"noHTTP/1.1 2"
    else:
        assert [(r.status, r.body) for r in responses] == [(status, body), (404, b"no")]
        assert parser.buf == b"HTTP/1.1 2"       # the start of a third, kept for later


def test_head_fields():
    [response], _ = feed(LENGTH)
    assert (response.version, response.reason) == ("HTTP/1.1", "OK")
    assert response.headers == {"content-length": "5", "x-a": "1, 2"}
    [response], _ = feed(CLOSE, eof=True)
    assert (response.version, response.reason) == ("HTTP/1.0", "")


def test_interim_responses_are_skipped():
    [response], _ = feed(INTERIM, 1, "POST")
    assert response.status == 202 and "link" not in response.headers


@pytest.mark.parametrize("step", [None, 1, 3])
def test_close_delimited_body_ends_at_eof(step):
    responses, parser = feed(CLOSE, step)
    assert responses == []                       # no length: it may go on
    parser.feed_eof()
    response = parser.next()
    assert (response.status, response.body) == (200, b"until the end")
    assert parser.next() is None


def test_unknown_final_coding_is_close_delimited():
    message = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nzzz"
    [response], _ = feed(message, 1, eof=True)
    assert response.body == b"zzz"


def test_head_response_to_a_close_delimited_get_has_no_body():
    [response], parser = feed(b"HTTP/1.1 200 OK\r\n\r\n", method="head")
    assert response.body == b"" and parser.buf == b""


def test_eof_with_nothing_is_no_response():
    assert feed(b"", eof=True)[0] == []


@pytest.mark.parametrize("data,problem", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
     "connection closed after 3 of 10 body bytes"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
     "connection closed in a chunked body"),
    (b"HTTP/1.1 200 OK\r\nContent-Le", "connection closed in the response head"),
])
@pytest.mark.parametrize("step", [None, 1])
def test_cut_short(data, problem, step):
    with pytest.raises(gafferd.ResponseError, match=problem):
        feed(data, step, eof=True)


@pytest.mark.parametrize("data,problem", [
    (b"HTTP/2 200 OK\r\n\r\n", "malformed status line"),
    (b"HTTP/1.1 20 OK\r\n\r\n", "malformed status line"),
    (b"HTTP/1.1 200OK\r\n\r\n", "malformed status line"),
    (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "malformed status line"),
    (b"HTTP/1.1 200 OK\r\nNo colon\r\n\r\n", "malformed header line"),
    (b"HTTP/1.1 200 OK\r\n folded: x\r\n\r\n", "malformed header line"),
    (b"HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n", "malformed header line"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
     "conflicting content-length headers"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n", "bad Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
     "both Transfer-Encoding and Content-Length"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n",
     "chunk data not followed by CRLF"),
    (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "unexpected 101"),
])
@pytest.mark.parametrize("step", [None, 1])
def test_malformed(data, problem, step):
    with pytest.raises(gafferd.ResponseError, match=problem):
        feed(data, step)


@pytest.mark.parametrize("step", [None, 1000])
def test_body_limits(step):
    big = b"x" * 101
    for message in (b"HTTP/1.1 200 OK\r\nContent-Length: 101\r\n\r\n" + big,
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n65\r\n" + big,
                    b"HTTP/1.1 200 OK\r\n\r\n" + big):
        with pytest.raises(gafferd.ResponseError, match="response body over 100 bytes"):
            feed(message, step, max_body=100)
    [response], _ = feed(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + big[:100],
                         step, max_body=100)
    assert len(response.body) == 100


def test_head_limit():
    with pytest.raises(gafferd.ResponseError, match="response head over 64 bytes"):
        feed(b"HTTP/1.1 200 OK\r\nX: " + b"y" * 100, 1, max_head=64)
    with pytest.raises(gafferd.ResponseError, match="response head over 64 bytes"):
        feed(b"HTTP/1.1 200 OK\r\nX: " + b"y" * 100 + b"\r\n\r\n", max_head=64)
    with pytest.raises(gafferd.ResponseError, match="bad chunk size line"):
        feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1" * 2000)


def test_data_after_eof_is_refused():
    parser = gafferd.ResponseParser()
    parser.feed_eof()
    with pytest.raises(gafferd.ResponseError, match="data after the end of input"):
        parser.feed(b"x")


def test_request_parser_shares_the_chunked_decoder():
    """One decoder for both directions: the same body, the same errors
    (a request's carries the status it is answered with)."""
    parser = gafferd.RequestParser(4)
    parser.feed(b"PUT / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    with pytest.raises(gafferd.HttpError) as info:
        parser.next()
    assert (info.value.status, info.value.message) == (413, "request body over 4 bytes")


# -- the client reads through the parser: real sockets, raw replies --------------------------

def raw_server(reply, hold_open=False):
    """A one-shot TCP server on 127.0.0.1 that reads the request head and
    sends ``reply`` in small pieces; returns (port, thread)."""
    import socket
    import threading
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(10)

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(4096)
            for i in range(0, len(reply), 7):
                conn.sendall(reply[i:i + 7])
            if hold_open:
                conn.recv(1)                   # until the client closes
        listener.close()
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread


@pytest.mark.parametrize("reply,expected", [
    (INTERIM, (202, b"ok", None)),
    (CHUNKED, (201, b"abcde", None)),
    (CLOSE, (200, b"until the end", None)),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc",
     (0, b"", "connection closed after 3 of 9 body bytes")),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 9999\r\n\r\n",
     (0, b"", "response body over 100 bytes")),
    (b"garbage\r\n\r\n", (0, b"", "malformed status line")),
])
def test_http_request_reads_through_the_parser(reply, expected):
    from conftest import run_loop_until
    port, thread = raw_server(reply, hold_open=expected[2] == "response body over 100 bytes")
    loop = gafferd.Loop()
    got = []
    gafferd.http_request(loop, "POST", "http://127.0.0.1:%d/hook" % port, b"{}",
                         callback=lambda *args: got.append(args), timeout=10, max_response=100)
    run_loop_until(loop, lambda: got, timeout=10, message="the client's callback")
    status, body, error = got[0]
    assert (status, body) == expected[:2]
    assert (error is None) if expected[2] is None else expected[2] in error, error
    thread.join(10)
    loop.close()
