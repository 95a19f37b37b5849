"""Every connection's memory and lifetime are bounded.

A client that pipelines requests and never reads the replies, that keeps
sending into an open feed, that never finishes its TLS handshake, or that
starts a request and never ends it holds at most a bounded amount of the
daemon's memory, and its slot in ``max_connections`` only until the
deadline of the state it is in.  Real daemons, real sockets.
"""
import errno
import http.client
import socket
import ssl
import time

import pytest

from conftest import RawClient, http_request_bytes, open_fds, vm_rss, wait_for

MB = 1024 * 1024
TOKEN = "bounds-T0ken"


def flood(sock, payload, limit, stall=1.5):
    """Send ``payload`` over and over without reading until ``limit`` bytes
    are sent or the daemon stops taking them for ``stall`` seconds (its
    input is no longer read: the kernel buffers are full).  Returns the
    bytes sent and whether the daemon closed the connection."""
    sock.setblocking(False)
    sent, stuck_since = 0, None
    view = memoryview(payload)
    while sent < limit:
        try:
            n = sock.send(view)
        except BlockingIOError:
            now = time.monotonic()
            stuck_since = stuck_since or now
            if now - stuck_since > stall:
                return sent, False
            time.sleep(0.005)
            continue
        except (BrokenPipeError, ConnectionResetError):
            return sent, True
        stuck_since = None
        sent += n
    return sent, False


def small_rcvbuf_socket(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    return s


def closed_by_daemon(sock):
    """True once the daemon closed (or reset) ``sock``, read from the TCP
    state: reading would make progress for the daemon and move its
    deadline."""
    state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    return state != 1                     # TCP_ESTABLISHED


def ping(port):
    with RawClient(port, timeout=5) as c:
        r = c.request(http_request_bytes("GET", "/ping", host="127.0.0.1:%d" % port))
    return r.status


# -- memory: item by item ---------------------------------------------------------------

PIPELINED = b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 2000


@pytest.mark.parametrize("token", [False, True], ids=["answered", "401"])
def test_pipelining_without_reading_is_bounded(daemon_factory, token):
    d = daemon_factory("[gaffer]\nauth_token = %s\n" % TOKEN if token else None)
    before = vm_rss(d.pid)
    with RawClient(d.port) as c:
        sent, closed = flood(c.sock, PIPELINED, 120 * MB)
        grown = vm_rss(d.pid) - before
        assert sent < 40 * MB, "the daemon took %.0f MB of requests whose replies " \
            "nobody reads" % (sent / MB)
        assert grown < 20 * MB, "RSS grew by %.0f MB" % (grown / MB)
    assert ping(d.port) == (401 if token else 200)


def test_input_after_an_error_is_not_kept(daemon_factory):
    # the replies are not read, then a bad request: the daemon is closing
    # the connection and takes nothing more
    d = daemon_factory()
    before = vm_rss(d.pid)
    s = small_rcvbuf_socket(d.port)
    try:
        s.sendall(b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 40000 + b"BAD\r\n\r\n")
        sent, closed = flood(s, b"x" * 65536, 100 * MB)
        assert closed or sent < 40 * MB, "%.0f MB taken after a 400" % (sent / MB)
        assert vm_rss(d.pid) - before < 20 * MB
    finally:
        s.close()


@pytest.mark.parametrize("path", ["/watch?feed=continuous&heartbeat=0",
                                  "/watch?feed=eventsource&heartbeat=0"])
def test_input_into_an_open_feed_is_bounded(daemon_factory, path):
    d = daemon_factory()
    before = vm_rss(d.pid)
    with RawClient(d.port) as c:
        c.send(http_request_bytes("GET", path, host="127.0.0.1:%d" % d.port))
        assert c.read_response(head=True).status == 200
        sent, closed = flood(c.sock, b"y" * 65536, 100 * MB, stall=3.0)
        assert sent < 20 * MB, "%.0f MB taken while a feed is open" % (sent / MB)
        assert vm_rss(d.pid) - before < 20 * MB
        wait_for(lambda: closed or closed_by_daemon(c.sock), 5,
                 message="the daemon to drop the client that floods its feed")
    assert ping(d.port) == 200


def test_a_feed_still_sees_its_client_leave(daemon_factory):
    d = daemon_factory()
    base = open_fds(d.pid)
    for _ in range(5):
        c = RawClient(d.port)
        c.send(http_request_bytes("GET", "/watch?feed=continuous&heartbeat=0",
                                  host="127.0.0.1:%d" % d.port))
        assert c.read_response(head=True).status == 200
        c.close()
    wait_for(lambda: open_fds(d.pid) <= base, 5, message="the feeds' sockets to be closed")


# -- deadlines ------------------------------------------------------------------------------

def test_request_timeout_falls_due_on_time(daemon_factory):
    # keepalive_timeout is far away: the 408 must not wait for its check
    d = daemon_factory("[gaffer]\nkeepalive_timeout = 60\nrequest_timeout = 1.5\n")
    with RawClient(d.port) as c:
        t0 = time.monotonic()
        c.send(b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        r = c.read_response(timeout=10)
        took = time.monotonic() - t0
        assert r.status == 408 and r.header("connection") == "close"
        assert 1.2 < took < 4.0, took
        assert c.wait_closed(2)


def test_unread_replies_free_the_slot(daemon_factory):
    d = daemon_factory("[gaffer]\nkeepalive_timeout = 60\nrequest_timeout = 2\n"
                       "max_connections = 2\n")
    hogs = [small_rcvbuf_socket(d.port) for _ in range(2)]
    try:
        for s in hogs:
            flood(s, PIPELINED, 50 * MB, stall=0.3)
        # both slots are taken ...
        with RawClient(d.port) as c:
            assert c.request(http_request_bytes("GET", "/ping", host="127.0.0.1")).status == 503
        # ... until the send deadline: request_timeout without progress
        t0 = time.monotonic()
        wait_for(lambda: all(closed_by_daemon(s) for s in hogs), 10,
                 message="the daemon to close connections that never read")
        assert time.monotonic() - t0 < 6
        assert ping(d.port) == 200
    finally:
        for s in hogs:
            s.close()


def test_tls_handshake_has_a_deadline(daemon_factory, cert):
    certfile, keyfile = cert
    d = daemon_factory("""\
        [gaffer]
        http_endpoints = secure

        [endpoint:secure]
        bind = 127.0.0.1:0
        certfile = %s
        keyfile = %s
        keepalive_timeout = 1
        request_timeout = 1
        max_connections = 3
        """ % (certfile, keyfile))
    port = int(d.urls[0].rsplit(":", 1)[1])
    base = open_fds(d.pid)
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    try:
        t0 = time.monotonic()
        wait_for(lambda: all(closed_by_daemon(s) for s in silent), 8,
                 message="the daemon to drop clients that never handshake")
        assert time.monotonic() - t0 < 5
        wait_for(lambda: open_fds(d.pid) <= base, 5, message="their fds to be closed")
        ctx = ssl.create_default_context(cafile=certfile)
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=ctx)
        conn.request("GET", "/ping")
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, b"OK")
        conn.close()
    finally:
        for s in silent:
            s.close()
