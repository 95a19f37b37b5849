"""Black-box tests of gafferd's hand-written HTTP/1.1 server.

Raw sockets throughout: keep-alive, pipelining, HTTP/1.0, HEAD,
``Expect: 100-continue``, chunked request bodies, every request limit,
IPv6 / unix socket / TLS endpoints, many slow clients and a fuzz run.
Responses are parsed by the strict ``parse_http_response`` of conftest.
"""
import email.utils
import http.client
import json
import os
import random
import re
import socket
import ssl
import stat
import statistics
import subprocess
import threading
import time
from datetime import datetime, timezone

import pytest

from conftest import (GAFFERD, PY, Daemon, MalformedResponse, RawClient, http_request_bytes,
                      open_fds, parse_http_response, wait_for)


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    """A daemon with default limits and no templates, shared by the module."""
    d = Daemon(tmp_path_factory.mktemp("http"))
    try:
        d.start()
        yield d
    finally:
        d.close()


def req(method, path, port, headers=(), body=None, version="HTTP/1.1"):
    return http_request_bytes(method, path, host="127.0.0.1:%d" % port,
                              headers=headers, body=body, version=version)


def json_error(resp, status):
    assert resp.status == status, resp
    assert resp.header("content-type", "").startswith("application/json"), resp.headers
    body = resp.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str), body
    return body


def listening(d, scheme="http"):
    """(host, port) of every ``listening on scheme://...`` line."""
    out = []
    for url in d.urls:
        m = re.match(r"%s://(\[[^\]]+\]|[^:/]+):(\d+)$" % scheme, url)
        if m:
            out.append((m.group(1).strip("[]"), int(m.group(2))))
    return out


# -- connection handling ----------------------------------------------------------

class TestConnections:
    def test_keep_alive_by_default(self, srv):
        conn = srv.connection()
        try:
            socks = []
            for path in ("/ping", "/", "/processes"):
                conn.request("GET", path)
                resp = conn.getresponse()
                resp.read()
                assert resp.status == 200
                assert (resp.getheader("connection") or "").lower() != "close"
                socks.append(conn.sock)
            assert socks[0] is socks[1] is socks[2] and socks[0] is not None
        finally:
            conn.close()

    def test_connection_close(self, srv):
        with RawClient(srv.port) as c:
            r = c.request(req("GET", "/ping", srv.port, [("Connection", "close")]))
            assert (r.status, r.body) == (200, b"OK")
            assert c.wait_closed(3.0), "daemon kept the connection open"
            assert c.buf == b""

    def test_pipelining(self, srv):
        p = srv.port
        data = b"".join([
            req("GET", "/ping", p),
            req("GET", "/nope", p),
            req("POST", "/processes", p, body=b"{not json"),
            req("HEAD", "/processes/nosuch", p),
            req("GET", "/", p),
            req("GET", "/status/nosuch", p),
            req("POST", "/processes", p, body=b""),
            req("GET", "/ping", p, [("Connection", "close")]),
        ])
        with RawClient(p) as c:
            c.send(data)
            got = []
            for i in range(8):
                r = c.read_response(head=(i == 3))
                got.append(r.status)
                if i == 0:
                    assert r.body == b"OK"
                if i == 2:
                    assert r.json()["error"] == "invalid_json"
                if i == 4:
                    assert r.json()["welcome"] == "gaffer"
            assert got == [200, 404, 400, 404, 200, 404, 400, 200]
            assert c.wait_closed(3.0)

    def test_many_pipelined_requests(self, srv):
        paths = ["/ping", "/nope", "/"] * 100
        with RawClient(srv.port) as c:
            c.send(b"".join(req("GET", p, srv.port) for p in paths))
            got = [c.read_response().status for _ in paths]
        assert got == [200, 404, 200] * 100

    def test_pipelined_requests_one_byte_at_a_time(self, srv):
        p = srv.port
        data = req("POST", "/processes", p, body=b'{"cmd": "x"}') + req("GET", "/ping", p)
        with RawClient(p) as c:
            c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(len(data)):
                c.send(data[i:i + 1])
            r1, r2 = c.read_response(), c.read_response()
        assert json_error(r1, 400)["error"] == "invalid_process_info"
        assert (r2.status, r2.body) == (200, b"OK")

    def test_absolute_form_target(self, srv):
        # RFC 9112 3.2.2: a server MUST accept the absolute-form
        with RawClient(srv.port) as c:
            r = c.request(b"GET http://127.0.0.1:%d/ping HTTP/1.1\r\n"
                          b"Host: 127.0.0.1:%d\r\n\r\n" % (srv.port, srv.port))
            assert (r.status, r.body) == (200, b"OK")

    def test_http10_closes(self, srv):
        with RawClient(srv.port) as c:
            r = c.request(b"GET /ping HTTP/1.0\r\n\r\n")
            assert (r.status, r.body) == (200, b"OK")
            assert c.wait_closed(3.0), "HTTP/1.0 connection was not closed"

    def test_http10_keep_alive(self, srv):
        with RawClient(srv.port) as c:
            r = c.request(b"GET /ping HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            assert (r.status, r.body) == (200, b"OK")
            assert (r.header("connection") or "").lower() == "keep-alive"
            assert r.header("content-length") == "2"
            r = c.request(b"GET / HTTP/1.0\r\n\r\n")
            assert r.status == 200 and r.json()["welcome"] == "gaffer"
            assert c.wait_closed(3.0)

    def test_head(self, srv):
        assert srv.post("/processes", {"name": "headme", "cmd": "sleep 300",
                                       "start": False}).status == 200
        get = srv.get("/processes/headme")
        with RawClient(srv.port) as c:
            r = c.request(req("HEAD", "/processes/headme", srv.port), head=True)
            assert (r.status, r.body) == (200, b"")
            assert r.header("content-length") in (None, "0", str(len(get.body)))
            r = c.request(req("HEAD", "/nope", srv.port), head=True)
            assert (r.status, r.body) == (404, b"")
            r = c.request(req("HEAD", "/ping", srv.port), head=True)
            assert r.status in (200, 405) and r.body == b""
            if r.status == 200:
                assert r.header("content-length") == "2"
            # nothing stray on the wire: the next reply parses cleanly
            r = c.request(req("GET", "/ping", srv.port))
            assert (r.status, r.body) == (200, b"OK")
        srv.request("DELETE", "/processes/headme")

    def test_expect_100_continue(self, srv):
        body = b'{"name": "expect1", "cmd": "sleep 300", "start": false}'
        head = req("POST", "/processes", srv.port,
                   [("Expect", "100-continue"), ("Content-Length", str(len(body)))])
        with RawClient(srv.port) as c:
            c.send(head)
            r = c.read_response(timeout=5)
            assert r.status == 100, r
            c.send(body)
            r = c.read_response()
            assert r.status == 200 and r.json() == {"ok": True}
            r = c.request(req("GET", "/processes/expect1", srv.port))
            assert r.status == 200 and r.json()["cmd"] == "sleep 300"
        srv.request("DELETE", "/processes/expect1")

    def test_expect_100_continue_body_sent_anyway(self, srv):
        body = b'{"name": "x"}'
        data = req("POST", "/processes", srv.port, [("Expect", "100-continue")], body=body)
        with RawClient(srv.port) as c:
            c.send(data + req("GET", "/ping", srv.port))
            r = c.read_response()
            if r.status == 100:
                r = c.read_response()
            assert json_error(r, 400)["error"] == "invalid_process_info"
            assert c.read_response().body == b"OK"

    def test_expect_100_continue_too_large(self, srv):
        head = req("POST", "/processes", srv.port,
                   [("Expect", "100-continue"), ("Content-Length", str(2 * 1024 * 1024))])
        with RawClient(srv.port) as c:
            c.send(head)
            r = c.read_response(timeout=5)
            while r.status == 100:
                r = c.read_response(timeout=5)
            json_error(r, 413)

    def test_chunked_request_body(self, srv):
        chunks = [b'{"name": "chu', b'nked1", "cmd": "sleep 300", ', b'"start": false}']
        body = b"".join(b"%x\r\n%s\r\n" % (len(ch), ch) for ch in chunks[:2])
        body += b"%x;ext=1\r\n%s\r\n" % (len(chunks[2]), chunks[2])
        body += b"0\r\nX-Trailer: yes\r\n\r\n"
        data = req("POST", "/processes", srv.port, [("Transfer-Encoding", "chunked")]) + body
        with RawClient(srv.port) as c:
            r = c.request(data)
            assert r.status == 200 and r.json() == {"ok": True}, r
            r = c.request(req("GET", "/processes/chunked1", srv.port))   # still in sync
            assert r.status == 200 and r.json()["name"] == "chunked1"
        srv.request("DELETE", "/processes/chunked1")

    def test_date_and_length_headers(self, srv):
        with RawClient(srv.port) as c:
            for path in ("/ping", "/processes", "/nope"):
                r = c.request(req("GET", path, srv.port))
                date = r.header("date")
                assert date and re.match(r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d "
                                         r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) "
                                         r"\d{4} \d\d:\d\d:\d\d GMT$", date), date
                when = email.utils.parsedate_to_datetime(date)
                assert abs((datetime.now(timezone.utc) - when).total_seconds()) < 5
                assert r.header("content-length") == str(len(r.body))


# -- limits ---------------------------------------------------------------------------

BAD_REQUESTS = {
    "garbage": b"GARBAGE\r\n\r\n",
    "no-version": b"GET /ping\r\n\r\n",
    "extra-token": b"GET /ping HTTP/1.1 extra\r\nHost: 127.0.0.1\r\n\r\n",
    "bad-version": b"GET /ping HTTX/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "no-colon": b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\nNo colon here\r\n\r\n",
    "space-before-colon": b"GET /ping HTTP/1.1\r\nHost : 127.0.0.1\r\n\r\n",
    "empty-name": b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\n: value\r\n\r\n",
    "nul-in-name": b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\nX-\x00A: b\r\n\r\n",
    "cl-alpha": b"POST /processes HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n{}",
    "cl-negative": b"POST /processes HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -1\r\n\r\n{}",
    "cl-list": b"POST /processes HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1, 2\r\n\r\n{}",
    "cl-plus": b"POST /processes HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: +2\r\n\r\n{}",
    "cl-twice": (b"POST /processes HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n"
                 b"Content-Length: 3\r\n\r\n{}x"),
    "chunk-size-alpha": (b"POST /processes HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"),
    "chunk-size-negative": (b"POST /processes HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                            b"Transfer-Encoding: chunked\r\n\r\n-2\r\n{}\r\n0\r\n\r\n"),
    "chunk-too-long": (b"POST /processes HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}xx\r\n0\r\n\r\n"),
    "chunk-no-crlf": (b"POST /processes HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}0\r\n\r\n"),
}


class TestLimits:
    def test_request_line_too_long(self, srv):
        with RawClient(srv.port) as c:
            r = c.request(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            json_error(r, 414)

    def test_long_request_line_under_limit(self, srv):
        with RawClient(srv.port) as c:
            r = c.request(b"GET /" + b"a" * 7900 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert json_error(r, 404)["error"] == "not_found"

    def test_request_line_too_long_without_newline(self, srv):
        with RawClient(srv.port) as c:
            c.send(b"GET /" + b"a" * 20000)         # never ends the line
            json_error(c.read_response(timeout=5), 414)

    def test_headers_too_large(self, srv):
        headers = [("X-Filler-%d" % i, "v" * 1000) for i in range(20)]
        with RawClient(srv.port) as c:
            json_error(c.request(req("GET", "/ping", srv.port, headers)), 431)

    def test_headers_under_limit(self, srv):
        headers = [("X-Filler-%d" % i, "v" * 1000) for i in range(14)]
        with RawClient(srv.port) as c:
            r = c.request(req("GET", "/ping", srv.port, headers))
            assert (r.status, r.body) == (200, b"OK")

    def test_body_too_large_default(self, srv):
        with RawClient(srv.port) as c:
            c.send(req("POST", "/processes", srv.port, [("Content-Length", "1048577")]))
            json_error(c.read_response(timeout=5), 413)

    def test_body_at_default_limit(self, srv):
        with RawClient(srv.port) as c:
            r = c.request(req("POST", "/processes", srv.port, body=b" " * 1048576))
            assert json_error(r, 400)["error"] == "invalid_json"

    def test_configured_body_limit(self, daemon_factory):
        d = daemon_factory("[gaffer]\nmax_body_size = 1000\n")
        with RawClient(d.port) as c:
            r = c.request(req("POST", "/processes", d.port, body=b" " * 1000))
            assert json_error(r, 400)["error"] == "invalid_json"
        with RawClient(d.port) as c:
            json_error(c.request(req("POST", "/processes", d.port, body=b" " * 1001)), 413)
        chunked = b"".join(b"100\r\n" + b" " * 256 + b"\r\n" for _ in range(5)) + b"0\r\n\r\n"
        with RawClient(d.port) as c:
            r = c.request(req("POST", "/processes", d.port,
                              [("Transfer-Encoding", "chunked")]) + chunked)
            json_error(r, 413)

    @pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
    def test_bad_request_gives_400_and_close(self, srv, name):
        with RawClient(srv.port) as c:
            c.send(BAD_REQUESTS[name])
            json_error(c.read_response(timeout=5), 400)
            assert c.wait_closed(3.0), "connection left open after a 400"
            assert c.buf == b""

    @pytest.mark.parametrize("method", ["FOO", "BREW", "XYZZY"])
    def test_undefined_method_501(self, srv, method):
        with RawClient(srv.port) as c:
            json_error(c.request(req(method, "/ping", srv.port)), 501)

    @pytest.mark.parametrize("method", ["PATCH", "TRACE", "PUT", "DELETE"])
    def test_known_method_not_allowed_405(self, srv, method):
        with RawClient(srv.port) as c:
            r = c.request(req(method, "/ping", srv.port))
            assert json_error(r, 405)["error"] == "method_not_allowed"
            assert r.header("allow")
            r = c.request(req("GET", "/ping", srv.port))      # connection still usable
            assert r.body == b"OK"

    def test_keepalive_timeout(self, daemon_factory):
        d = daemon_factory("[gaffer]\nkeepalive_timeout = 1\n")
        with RawClient(d.port) as used, RawClient(d.port) as fresh:
            t0 = time.monotonic()
            assert used.request(req("GET", "/ping", d.port)).body == b"OK"
            assert used.wait_closed(5.0), "idle keep-alive connection not closed"
            assert fresh.wait_closed(5.0), "idle fresh connection not closed"
            elapsed = time.monotonic() - t0
            assert 0.7 < elapsed < 5.0, elapsed
        with RawClient(d.port) as c:                 # the daemon still serves
            assert c.request(req("GET", "/ping", d.port)).body == b"OK"

    def test_keepalive_timeout_spares_busy_connections(self, daemon_factory):
        d = daemon_factory("[gaffer]\nkeepalive_timeout = 1\n")
        with RawClient(d.port) as c:
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:      # a request every ~0.1 s
                assert c.request(req("GET", "/ping", d.port)).body == b"OK"
                assert not c.wait_closed(0.1)

    def test_max_connections(self, daemon_factory):
        d = daemon_factory("[gaffer]\nmax_connections = 5\n")
        clients = [RawClient(d.port) for _ in range(5)]
        try:
            for c in clients:
                assert c.request(req("GET", "/ping", d.port)).body == b"OK"
            extra = RawClient(d.port, timeout=3)
            try:
                try:
                    r = extra.request(req("GET", "/ping", d.port), timeout=3)
                    refused = r.status == 503
                except (EOFError, ConnectionError):
                    refused = True
                assert refused, "a connection beyond max_connections was served"
            finally:
                extra.close()
            for c in clients:                        # the existing ones are unharmed
                assert c.request(req("GET", "/ping", d.port)).body == b"OK"
            clients.pop().close()

            def accepted_again():
                try:
                    with RawClient(d.port, timeout=2) as c:
                        return c.request(req("GET", "/ping", d.port), timeout=2).body == b"OK"
                except (EOFError, ConnectionError, socket.timeout):
                    return False
            wait_for(accepted_again, timeout=5, interval=0.1, message="a free slot")
        finally:
            for c in clients:
                c.close()


    def test_max_connections_is_per_endpoint(self, daemon_factory):
        d = daemon_factory("""\
            [gaffer]
            http_endpoints = one, two

            [endpoint:one]
            bind = 127.0.0.1:0
            max_connections = 3

            [endpoint:two]
            bind = 127.0.0.1:0
            """)
        ports = [p for _, p in listening(d)]
        assert len(ports) == 2
        for port, other in (ports, ports[::-1]):
            busy = [RawClient(other) for _ in range(3)]
            try:
                for c in busy:
                    assert c.request(req("GET", "/ping", other)).body == b"OK"
                with RawClient(port) as c:
                    r = c.request(req("GET", "/ping", port))
                    assert (r.status, r.body) == (200, b"OK"), \
                        "connections to another endpoint counted against this one's cap"
            finally:
                for c in busy:
                    c.close()


# -- endpoints ------------------------------------------------------------------------

def has_ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


class TestEndpoints:
    def test_ipv6(self, daemon_factory):
        if not has_ipv6_loopback():
            pytest.skip("this machine has no IPv6 loopback")
        d = daemon_factory("[gaffer]\nhttp_endpoints = v6\n\n[endpoint:v6]\nbind = [::1]:0\n")
        (host, port), = listening(d)
        assert host == "::1"
        sock = socket.create_connection(("::1", port), timeout=5)
        with RawClient(sock=sock) as c:
            r = c.request(http_request_bytes("GET", "/ping", host="[::1]:%d" % port))
            assert (r.status, r.body) == (200, b"OK")
        with pytest.raises(OSError):                 # bound to ::1 only
            socket.create_connection(("127.0.0.1", port), timeout=2).close()

    def test_localhost_binds_both_loopbacks(self, daemon_factory):
        # one family left free would let another local user listen on it
        # with the same port and answer the clients that try it first
        d = daemon_factory("[gaffer]\nhttp_endpoints = lo\n\n[endpoint:lo]\nbind = localhost:0\n")
        found = listening(d)
        port = found[0][1]
        want = [("127.0.0.1", port)] + ([("::1", port)] if has_ipv6_loopback() else [])
        assert found == want, d.urls
        for host, _ in found:
            with RawClient(sock=socket.create_connection((host, port), timeout=5)) as c:
                r = c.request(http_request_bytes("GET", "/ping", host="localhost:%d" % port))
                assert (r.status, r.body) == (200, b"OK")

    def test_localhost_with_one_family_taken_is_refused(self, tmp_path):
        squatter = socket.socket(socket.AF_INET6 if has_ipv6_loopback() else socket.AF_INET)
        squatter.bind(("::1", 0) if has_ipv6_loopback() else ("127.0.0.1", 0))
        squatter.listen(1)
        port = squatter.getsockname()[1]
        try:
            out = subprocess.run([PY, GAFFERD, "--bind", "localhost:%d" % port],
                                 cwd=str(tmp_path), timeout=20, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                 universal_newlines=True)
        finally:
            squatter.close()
        assert out.returncode == 2, out
        assert "localhost:%d" % port in out.stderr and "Traceback" not in out.stderr
        if has_ipv6_loopback():
            assert "[::1]:%d is already taken" % port in out.stderr, out.stderr

    def test_unix_socket(self, daemon_factory, tmp_path):
        path = str(tmp_path / "gafferd.sock")
        d = daemon_factory("[gaffer]\nhttp_endpoints = local\n\n[endpoint:local]\n"
                        "bind = unix:%s\n" % path)
        assert "unix:" + path in d.urls
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        for _ in range(2):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
            with RawClient(sock=sock) as c:
                r = c.request(http_request_bytes("GET", "/ping", host="localhost"))
                assert (r.status, r.body) == (200, b"OK")
                r = c.request(http_request_bytes("GET", "/processes", host="localhost"))
                assert r.status == 200 and r.json() == []
        assert d.stop() == 0
        assert not os.path.exists(path), "unix socket file left behind at shutdown"

    def test_unix_socket_replaces_stale_socket(self, daemon_factory, tmp_path):
        path = str(tmp_path / "stale.sock")
        old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old.bind(path)
        old.close()
        daemon_factory("[gaffer]\nhttp_endpoints = local\n\n[endpoint:local]\n"
                    "bind = unix:%s\n" % path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        with RawClient(sock=sock) as c:
            assert c.request(http_request_bytes("GET", "/ping", host="localhost")).body == b"OK"

    def test_several_endpoints_and_binds(self, daemon_factory):
        d = daemon_factory("""\
            [gaffer]
            http_endpoints = one, two

            [endpoint:one]
            bind = 127.0.0.1:0, 127.0.0.2:0

            [endpoint:two]
            bind = 127.0.0.1:0
            max_body_size = 10
            backlog = 16
            """)
        addrs = listening(d)
        assert len(addrs) == 3 and len({p for _, p in addrs}) == 3, d.urls
        assert sorted(h for h, _ in addrs) == ["127.0.0.1", "127.0.0.1", "127.0.0.2"]
        small = []
        for host, port in addrs:
            with RawClient(port, host=host) as c:
                hosthdr = "%s:%d" % (host, port)
                r = c.request(http_request_bytes("GET", "/ping", host=hosthdr))
                assert (r.status, r.body) == (200, b"OK")
                r = c.request(http_request_bytes("POST", "/processes", host=hosthdr,
                                                 body=b"x" * 11))
                assert r.status in (400, 413), r
                if r.status == 413:
                    small.append((host, port))
        assert len(small) == 1 and small[0][0] == "127.0.0.1"
        # every endpoint serves the same application
        host, port = [a for a in addrs if a != small[0]][0]
        with RawClient(port, host=host) as c:
            r = c.request(http_request_bytes(
                "POST", "/processes", host="%s:%d" % (host, port),
                body=b'{"name": "shared", "cmd": "sleep 300", "start": false}'))
            assert r.status == 200
        host, port = small[0]
        with RawClient(port, host=host) as c:
            r = c.request(http_request_bytes("GET", "/processes", host="%s:%d" % (host, port)))
            assert r.json() == ["shared"]


def tls_context(certfile):
    ctx = ssl.create_default_context(cafile=certfile)
    ctx.check_hostname = True
    return ctx


class TestTLS:
    def https_port(self, d):
        (host, port), = listening(d, "https")
        assert host == "127.0.0.1"
        assert not listening(d, "http")
        return port

    def test_tls_endpoint(self, daemon_factory, cert):
        certfile, keyfile = cert
        d = daemon_factory("""\
            [gaffer]
            http_endpoints = secure

            [endpoint:secure]
            bind = 127.0.0.1:0
            certfile = %s
            keyfile = %s
            """ % cert)
        port = self.https_port(d)
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10,
                                           context=tls_context(certfile))
        try:
            for path, check in (("/ping", lambda b: b == b"OK"),
                                ("/", lambda b: json.loads(b)["welcome"] == "gaffer")):
                conn.request("GET", path)
                resp = conn.getresponse()
                assert resp.status == 200 and check(resp.read())
            first = conn.sock
            conn.request("GET", "/processes")
            resp = conn.getresponse()
            assert json.loads(resp.read()) == [] and conn.sock is first   # keep-alive
        finally:
            conn.close()

    def test_stalled_handshake_blocks_nobody(self, daemon_factory, cert):
        certfile, keyfile = cert
        d = daemon_factory(args=["--certfile", certfile, "--keyfile", keyfile])
        port = self.https_port(d)
        stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        plain = RawClient(port)
        try:
            plain.send(b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")   # not TLS
            context, latencies = tls_context(certfile), []
            for _ in range(20):             # the p90 of 20 handshakes, not one
                t0 = time.monotonic()
                conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5,
                                                   context=context)
                conn.request("GET", "/ping")
                resp = conn.getresponse()
                assert (resp.status, resp.read()) == (200, b"OK")
                conn.close()
                latencies.append(time.monotonic() - t0)
            assert statistics.quantiles(latencies, n=10, method="inclusive")[-1] < 1.0, \
                sorted(latencies)
            assert plain.wait_closed(5.0) and b"OK" not in plain.buf
        finally:
            for s in stalled:
                s.close()
            plain.close()
        assert d.proc.poll() is None


# -- many idle and slow clients ------------------------------------------------------------

def test_slow_and_idle_clients_do_not_delay_the_api(srv):
    idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(200)]
    slow = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(5)]
    request = req("GET", "/ping", srv.port)
    stop = threading.Event()
    sent = [0] * len(slow)

    def dribble(i):
        while not stop.is_set() and sent[i] < len(request) - 1:
            slow[i].sendall(request[sent[i]:sent[i] + 1])
            sent[i] += 1
            stop.wait(1.0)

    threads = [threading.Thread(target=dribble, args=(i,), daemon=True) for i in range(5)]
    for t in threads:
        t.start()
    try:
        latencies = []
        deadline = time.monotonic() + 3.5
        while time.monotonic() < deadline or len(latencies) < 50:
            t0 = time.monotonic()
            r = srv.get("/ping")
            latencies.append(time.monotonic() - t0)
            assert (r.status, r.body) == (200, b"OK")
            stop.wait(0.05)
        p90 = statistics.quantiles(latencies, n=10, method="inclusive")[-1]
        assert p90 < 0.1, "p90 of %d /ping: %.3fs with 200 idle and 5 slow clients" % (
            len(latencies), p90)
        assert min(sent) >= 3
        stop.set()
        for t in threads:
            t.join(5)
        with RawClient(sock=slow[0]) as c:           # the partial request was kept
            c.send(request[sent[0]:])
            assert c.read_response().body == b"OK"
    finally:
        stop.set()
        for s in idle + slow:
            s.close()


# -- fuzz ------------------------------------------------------------------------------------

SAFE_REQUESTS = [
    b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    b"GET /processes?running=true HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/json\r\n\r\n",
    b'POST /processes HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 15\r\n\r\n{"name": "fzz"}',
    b'PUT /processes/nosuch HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 12\r\n\r\n{"cmd": "x"}',
    b"POST /processes/nosuch/_signal/15 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n",
    (b"POST /processes HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
     b'5\r\n{"nam\r\n9\r\ne": "fz"}\r\n0\r\n\r\n'),
    b"GET /stats HTTP/1.0\r\n\r\n",
    b"HEAD /processes/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    b"DELETE /groups/nosuch HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n\r\n",
    b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 100-continue\r\n\r\n",
    b"OPTIONS /processes HTTP/1.1\r\nHost: localhost\r\nOrigin: http://x.example\r\n\r\n",
]

METHODS = [b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"TRACE",
           b"CONNECT", b"FOO", b"G ET", b"", b"\x00", b"get", b"GET" * 50, b"\xff\xfe"]


def mutate(rng, base):
    data = bytearray(base)
    op = rng.randrange(14)
    if op == 0:                                     # truncate
        return bytes(data[:rng.randrange(len(data))])
    if op == 1:                                     # overwrite bytes
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    if op == 2:                                     # insert bytes
        pos = rng.randrange(len(data) + 1)
        return bytes(data[:pos]) + bytes(rng.randrange(256) for _ in range(rng.randint(1, 20))) \
            + bytes(data[pos:])
    if op == 3:                                     # delete a slice
        a = rng.randrange(len(data))
        return bytes(data[:a] + data[a + rng.randint(1, 30):])
    if op == 4:                                     # duplicate a slice
        a = rng.randrange(len(data))
        b = min(len(data), a + rng.randint(1, 40))
        return bytes(data[:b] + data[a:b] * rng.randint(1, 50) + data[b:])
    if op == 5:                                     # another method
        rest = base.split(b" ", 1)[1] if b" " in base else base
        return rng.choice(METHODS) + b" " + rest
    if op == 6:                                     # a huge line somewhere
        huge = b"A" * rng.choice([9000, 17000, 70000])
        pos = rng.choice([5, base.find(b"\r\n") + 2 if b"\r\n" in base else 0])
        return base[:pos] + huge + base[pos:]
    if op == 7:                                     # bad chunk framing
        size = rng.choice([b"zz", b"-1", b"f" * 20, b"1", b"10", b"", b"0x5", b"5 5"])
        tail = rng.choice([b"\r\nhello\r\n0\r\n\r\n", b"\r\nhello", b"\r\n", b"\r\nhello\r\n",
                           b"\r\nhelloworld\r\n0\r\n\r\n"])
        return (b"POST /processes HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n" + size + tail)
    if op == 8:                                     # random bytes
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))
    if op == 9:                                     # many headers
        n = rng.choice([50, 200, 1000])
        return b"GET /ping HTTP/1.1\r\n" + b"X-H: v\r\n" * n + b"\r\n"
    if op == 10:                                    # odd Content-Length
        cl = rng.choice([b"-5", b"1e3", b"9" * 30, b"", b"0x10", b"5, 6", b" 5", b"5\x00"])
        return b"POST /processes HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: " + cl + \
            b"\r\n\r\n{}"
    if op == 11:                                    # other line endings
        return base.replace(b"\r\n", rng.choice([b"\n", b"\r", b"\r\r\n", b"\n\r"]))
    if op == 12:                                    # valid request + garbage
        return base + mutate(rng, rng.choice(SAFE_REQUESTS))
    # odd versions and targets
    return rng.choice([b"GET / HTTP/2.0\r\n\r\n", b"GET * HTTP/1.1\r\n\r\n",
                       b"GET http://x/ping HTTP/1.1\r\nHost: x\r\n\r\n",
                       b"GET /%zz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                       b"GET /processes/%ff%fe HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                       b"GET /ping HTTP/1.1000\r\n\r\n", b"GET /ping HTTP/0.9\r\n\r\n",
                       b"\r\n\r\n\r\nGET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"])


def check_replies(buf):
    """Every byte the daemon sent must be a sequence of well-formed responses."""
    statuses = []
    while buf:
        try:
            parsed = parse_http_response(buf, eof=True)
        except MalformedResponse:
            parsed = parse_http_response(buf, eof=True, head=True)   # a HEAD reply
        resp, used = parsed
        statuses.append(resp.status)
        buf = buf[used:]
    return statuses


def fuzz_one(port, data):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        buf = b""
        deadline = time.monotonic() + 8
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            except socket.timeout:
                raise AssertionError("daemon neither answered nor closed: %r" % data[:200])
            if not chunk:
                break
            buf += chunk
        try:
            return check_replies(buf)
        except MalformedResponse as exc:
            raise AssertionError("malformed reply %s to %r: %r" % (exc, data[:200], buf[:300]))
    finally:
        sock.close()


def test_fuzz(daemon_factory):
    d = daemon_factory()
    for _ in range(3):
        assert d.get("/ping").status == 200
    baseline = open_fds(d.pid)
    cases = []
    for seed in (1, 2, 3, 4, 5):
        rng = random.Random(seed)
        cases += [mutate(rng, rng.choice(SAFE_REQUESTS)) for _ in range(1000)]
    assert len(cases) >= 5000
    statuses, errors, done = [], [], []
    lock = threading.Lock()
    it = iter(enumerate(cases))
    t0 = time.monotonic()

    def worker():
        while True:
            with lock:
                item = next(it, None)
            if item is None or errors or time.monotonic() - t0 > 60:
                return
            try:
                got = fuzz_one(d.port, item[1])
            except AssertionError as exc:
                errors.append("case %d: %s" % (item[0], exc))
                return
            with lock:
                statuses.extend(got)
                done.append(item[0])

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]
    assert len(done) == len(cases), "only %d cases ran in 60 s" % len(done)
    assert d.proc.poll() is None, "daemon died:\n" + d.log()[-3000:]
    assert len(statuses) > 1000
    assert 500 not in statuses, "a fuzz request caused an internal error:\n" + d.log()[-3000:]
    assert {400, 200, 404} <= set(statuses)
    assert d.get("/ping").body == b"OK"
    assert d.json("GET", "/processes") == []
    wait_for(lambda: open_fds(d.pid) <= baseline, timeout=10, interval=0.1,
             message="fd count back to %d (now %d)" % (baseline, open_fds(d.pid)))
