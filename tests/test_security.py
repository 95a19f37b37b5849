"""Black-box tests of the API's defences (docs/security.md).

Cross-site request forgery (Origin), DNS rebinding (Host), token
authentication, per-endpoint settings over ``[gaffer]`` defaults, the
refusal to listen on a non-loopback address without a token, and the CORS
allow-list. Every request is a raw HTTP request so that the exact Origin,
Host and Authorization headers are under the test's control.
"""
import base64
import os
import re
import subprocess
import textwrap

import pytest

from conftest import GAFFERD, PY, Daemon, RawClient, http_request_bytes

EVIL = "https://evil.example"


@pytest.fixture(scope="module")
def open_daemon(tmp_path_factory):
    """Default security settings (no token, no CORS), loopback bind."""
    d = Daemon(tmp_path_factory.mktemp("sec"), "[process:victim]\ncmd = sleep 3600\n")
    try:
        d.start()
        d.wait_running("victim", 1)
        yield d
    finally:
        d.close()


def call(port, method, path, headers=(), body=None, host=None, addr="127.0.0.1"):
    """One raw request on a fresh connection; ``host`` defaults to addr:port."""
    if host is None:
        host = "%s:%d" % (addr, port)
    if body is None and method in ("POST", "PUT"):
        body = b""
    with RawClient(port, host=addr) as c:
        return c.request(http_request_bytes(method, path, host=host, headers=list(headers),
                                            body=body), head=(method == "HEAD"))


def error_code(resp, status):
    assert resp.status == status, resp
    assert resp.header("content-type", "").startswith("application/json"), resp.headers
    body = resp.json()
    assert isinstance(body.get("error"), str), body
    return body["error"]


def cors_headers(resp):
    return {k: v for k, v in resp.headers if k.startswith("access-control-")}


def listening_ports(d):
    return [int(m) for m in re.findall(r"listening on https?://[^ \n]*:(\d+)", d.log())]


def basic(user, password):
    return "Basic " + base64.b64encode(("%s:%s" % (user, password)).encode()).decode()


# -- cross-site request forgery -------------------------------------------------------

class TestOrigin:
    @pytest.mark.parametrize("origin", [EVIL, "null", "http://127.0.0.1:1",
                                        "http://localhost.evil.example"])
    def test_forged_post_is_refused(self, open_daemon, origin):
        d = open_daemon
        before = d.pids("victim")
        r = call(d.port, "POST", "/processes/victim/_stop", [("Origin", origin)])
        error_code(r, 403)
        r = call(d.port, "POST", "/processes", [("Origin", origin)],
                 body=b'{"name": "planted", "cmd": "sleep 300"}')
        error_code(r, 403)
        assert d.get("/processes/planted").status == 404
        assert d.pids("victim") == before and d.status("victim")["running"] == 1

    @pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
    def test_other_unsafe_methods_are_refused(self, open_daemon, method):
        d = open_daemon
        body = b'{"cmd": "sleep 1"}' if method != "DELETE" else None
        r = call(d.port, method, "/processes/victim", [("Origin", EVIL)], body=body)
        error_code(r, 403)
        assert d.json("GET", "/processes/victim")["cmd"] == "sleep 3600"

    def test_safe_methods_are_allowed(self, open_daemon):
        d = open_daemon
        r = call(d.port, "GET", "/processes", [("Origin", EVIL)])
        assert r.status == 200 and "victim" in r.json()
        assert not cors_headers(r)
        r = call(d.port, "HEAD", "/processes/victim", [("Origin", EVIL)])
        assert r.status == 200
        r = call(d.port, "OPTIONS", "/processes", [("Origin", EVIL)])
        assert r.status != 403 and not cors_headers(r)

    def test_own_origin_is_allowed(self, open_daemon):
        d = open_daemon
        own = "http://127.0.0.1:%d" % d.port
        r = call(d.port, "POST", "/processes/nosuch/_start", [("Origin", own)])
        assert error_code(r, 404) == "not_found"
        r = call(d.port, "POST", "/processes/victim/_signal/CONT", [("Origin", own)])
        assert r.status == 200 and r.json() == {"ok": True}
        r = call(d.port, "POST", "/processes/nosuch/_start",
                 [("Origin", "http://localhost:%d" % d.port)], host="localhost:%d" % d.port)
        assert error_code(r, 404) == "not_found"

    def test_without_origin_nothing_changes(self, open_daemon):
        r = call(open_daemon.port, "POST", "/processes/nosuch/_start")
        assert error_code(r, 404) == "not_found"

    def test_websocket_with_foreign_origin_is_refused(self, open_daemon):
        d = open_daemon
        r = d.post("/processes", {"name": "wscat", "cmd": "cat", "redirect_input": True,
                                  "redirect_output": ["stdout"]})
        assert r.status == 200
        try:
            d.wait_running("wscat", 1)
            pid = d.pids("wscat")[0]

            def handshake(origin):
                with RawClient(d.port) as c:
                    c.send(http_request_bytes(
                        "GET", "/wstreams/%d" % pid, host="127.0.0.1:%d" % d.port,
                        headers=[("Upgrade", "websocket"), ("Connection", "Upgrade"),
                                 ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                                 ("Sec-WebSocket-Version", "13"), ("Origin", origin)]))
                    return c.read_response(head=True)

            foreign = handshake(EVIL)
            assert foreign.status != 101, "websocket accepted from a foreign origin"
            own = handshake("http://127.0.0.1:%d" % d.port)
            if own.status == 101:                   # /wstreams is implemented
                assert foreign.status == 403
        finally:
            d.request("DELETE", "/processes/wscat")


# -- DNS rebinding ------------------------------------------------------------------------

class TestHost:
    @pytest.mark.parametrize("host", ["evil.example", "evil.example:%d",
                                      "localhost.evil.example:%d",
                                      "127.0.0.1.evil.example:%d", "0x7f.example"])
    def test_rebinding_host_is_refused(self, open_daemon, host):
        port = open_daemon.port
        host = host % port if "%d" in host else host
        error_code(call(port, "GET", "/processes", host=host), 403)
        error_code(call(port, "GET", "/", host=host), 403)

    @pytest.mark.parametrize("host", ["127.0.0.1:%d", "127.0.0.1", "localhost:%d",
                                      "localhost", "LOCALHOST:%d", "[::1]:%d", "127.0.0.2:%d"])
    def test_loopback_hosts_are_allowed(self, open_daemon, host):
        port = open_daemon.port
        host = host % port if "%d" in host else host
        r = call(port, "GET", "/processes", host=host)
        assert r.status == 200 and "victim" in r.json()

    def test_server_names(self, daemon_factory):
        d = daemon_factory("[gaffer]\nserver_names = app.example, ops.example\n")
        for host in ("app.example", "app.example:%d" % d.port, "ops.example:%d" % d.port,
                     "localhost:%d" % d.port):
            r = call(d.port, "GET", "/processes", host=host)
            assert r.status == 200, (host, r)
        error_code(call(d.port, "GET", "/processes", host="other.example:%d" % d.port), 403)


# -- token authentication -------------------------------------------------------------------

TOKEN = "s3cret-T0ken"


class TestToken:
    def check_protected(self, d, token):
        port = d.port
        r = call(port, "GET", "/processes")
        error_code(r, 401)
        assert r.header("www-authenticate"), r.headers
        assert re.match(r"(?i)(bearer|basic)\b", r.header("www-authenticate"))
        for bad in ("Bearer wrong", "Bearer " + token + "x", "Bearer " + token[:-1],
                    basic("", "wrong"), "Basic !!!notbase64", "Token " + token,
                    "Bearer"):
            r = call(port, "GET", "/processes", [("Authorization", bad)])
            error_code(r, 401)
        for good in ("Bearer " + token, "bearer " + token, basic("", token),
                     basic("admin", token)):
            r = call(port, "GET", "/processes", [("Authorization", good)])
            assert r.status == 200 and r.json() == [], (good, r)
        r = call(port, "POST", "/processes", [("Authorization", "Bearer " + token)],
                 body=b'{"name": "authed", "cmd": "sleep 300", "start": false}')
        assert r.status == 200
        r = call(port, "POST", "/processes", [("Authorization", "Bearer nope")],
                 body=b'{"name": "sneaky", "cmd": "sleep 300", "start": false}')
        error_code(r, 401)
        r = call(port, "GET", "/processes", [("Authorization", "Bearer " + token)])
        assert r.json() == ["authed"]

    def test_auth_token(self, daemon_factory):
        d = daemon_factory("[gaffer]\nauth_token = %s\n" % TOKEN)
        self.check_protected(d, TOKEN)
        error_code(call(d.port, "GET", "/ping"), 401)

    def test_auth_token_file(self, daemon_factory, tmp_path):
        path = tmp_path / "token"
        path.write_text(TOKEN + "\n")
        os.chmod(str(path), 0o600)
        d = daemon_factory("[gaffer]\nauth_token_file = %s\n" % path)
        self.check_protected(d, TOKEN)

    def test_public_ping(self, daemon_factory):
        d = daemon_factory("[gaffer]\nauth_token = %s\npublic_ping = true\n" % TOKEN)
        r = call(d.port, "GET", "/ping")
        assert (r.status, r.body) == (200, b"OK")
        error_code(call(d.port, "GET", "/processes"), 401)
        error_code(call(d.port, "GET", "/"), 401)

    def test_endpoint_settings_override_gaffer_defaults(self, daemon_factory):
        d = daemon_factory("""\
            [gaffer]
            http_endpoints = one, two
            auth_token = default-token

            [endpoint:one]
            bind = 127.0.0.1:0

            [endpoint:two]
            bind = 127.0.0.1:0
            auth_token = endpoint-token
            public_ping = true
            """)
        ports = listening_ports(d)
        assert len(ports) == 2
        by_ping = {call(p, "GET", "/ping").status: p for p in ports}
        assert set(by_ping) == {200, 401}, by_ping
        one, two = by_ping[401], by_ping[200]
        for port, good, bad in ((one, "default-token", "endpoint-token"),
                                (two, "endpoint-token", "default-token")):
            r = call(port, "GET", "/processes", [("Authorization", "Bearer " + good)])
            assert r.status == 200
            error_code(call(port, "GET", "/processes", [("Authorization", "Bearer " + bad)]), 401)

    def test_origin_and_host_checks_still_apply_with_a_token(self, daemon_factory):
        d = daemon_factory("[gaffer]\nauth_token = %s\n" % TOKEN)
        auth = ("Authorization", "Bearer " + TOKEN)
        error_code(call(d.port, "POST", "/processes", [auth, ("Origin", EVIL)], body=b"{}"), 403)
        r = call(d.port, "GET", "/processes", [auth], host="evil.example")
        assert r.status in (401, 403) and r.status != 200


# -- non-loopback binds ----------------------------------------------------------------------

def run_briefly(args, cwd):
    """Run gafferd expecting it to refuse to start (exit quickly)."""
    try:
        return subprocess.run([PY, GAFFERD] + args, cwd=cwd, timeout=15,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, universal_newlines=True)
    except subprocess.TimeoutExpired:
        pytest.fail("gafferd started on a public address without a token")


class TestPublicBind:
    def test_refused_without_token(self, tmp_path):
        config = tmp_path / "gaffer.ini"
        config.write_text(textwrap.dedent("""\
            [gaffer]
            http_endpoints = pub

            [endpoint:pub]
            bind = 0.0.0.0:0
            """))
        out = run_briefly([str(config)], str(tmp_path))
        assert out.returncode == 2, out
        assert "auth_token" in out.stderr and "insecure" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr

    def test_refused_on_command_line_bind(self, tmp_path):
        out = run_briefly(["--bind", "0.0.0.0:0"], str(tmp_path))
        assert out.returncode == 2, out
        assert "auth_token" in out.stderr and "insecure" in out.stderr, out.stderr

    @pytest.mark.parametrize("where", ["endpoint", "gaffer"])
    def test_insecure_allows_it(self, daemon_factory, where):
        gaffer = "insecure = true\n" if where == "gaffer" else ""
        endpoint = "insecure = true\n" if where == "endpoint" else ""
        d = daemon_factory("[gaffer]\nhttp_endpoints = pub\n%s\n[endpoint:pub]\n"
                        "bind = 0.0.0.0:0\n%s" % (gaffer, endpoint))
        port, = listening_ports(d)
        r = call(port, "GET", "/processes")
        assert r.status == 200 and r.json() == []

    def test_token_allows_it(self, daemon_factory):
        d = daemon_factory("[gaffer]\nhttp_endpoints = pub\n\n[endpoint:pub]\n"
                        "bind = 0.0.0.0:0\nauth_token = %s\n" % TOKEN)
        port, = listening_ports(d)
        error_code(call(port, "GET", "/processes"), 401)
        r = call(port, "GET", "/processes", [("Authorization", "Bearer " + TOKEN)])
        assert r.status == 200


# -- CORS allow-list ----------------------------------------------------------------------------

ALLOWED = ["https://a.example", "https://b.example:8443"]


@pytest.fixture(scope="module")
def cors(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("cors"),
               "[gaffer]\ncors_origins = %s\n\n[process:victim]\ncmd = sleep 300\n"
               % ", ".join(ALLOWED))
    try:
        d.start()
        yield d
    finally:
        d.close()


class TestCors:
    def check_allowed_headers(self, r, origin):
        h = cors_headers(r)
        assert h.get("access-control-allow-origin") == origin, r.headers
        if "access-control-allow-credentials" in h:
            assert h["access-control-allow-credentials"] == "true"

    def test_allowed_origins(self, cors):
        for origin in ALLOWED:
            r = call(cors.port, "GET", "/processes", [("Origin", origin)])
            assert r.status == 200 and r.json() == ["victim"]
            self.check_allowed_headers(r, origin)
            r = call(cors.port, "POST", "/processes/nosuch/_start", [("Origin", origin)])
            assert error_code(r, 404) == "not_found"            # not refused as forged
            self.check_allowed_headers(r, origin)
            r = call(cors.port, "POST", "/processes/victim/_signal/CONT", [("Origin", origin)])
            assert r.status == 200 and r.json() == {"ok": True}

    def test_preflight(self, cors):
        r = call(cors.port, "OPTIONS", "/processes/victim/_stop",
                 [("Origin", ALLOWED[0]), ("Access-Control-Request-Method", "POST"),
                  ("Access-Control-Request-Headers", "content-type, authorization")])
        assert r.status in (200, 204) and r.body == b""
        self.check_allowed_headers(r, ALLOWED[0])
        methods = r.header("access-control-allow-methods", "").upper()
        assert "POST" in methods and "DELETE" in methods, methods
        allowed_headers = r.header("access-control-allow-headers", "").lower()
        assert "content-type" in allowed_headers and "authorization" in allowed_headers
        assert cors.status("victim")["running"] == 1           # preflight did nothing

    def test_preflight_needs_no_token(self, daemon_factory):
        # browsers never send credentials on a preflight
        d = daemon_factory("[gaffer]\ncors_origins = %s\nauth_token = %s\n"
                           % (ALLOWED[0], TOKEN))
        r = call(d.port, "OPTIONS", "/processes",
                 [("Origin", ALLOWED[0]), ("Access-Control-Request-Method", "POST"),
                  ("Access-Control-Request-Headers", "authorization, content-type")])
        assert r.status in (200, 204)
        self.check_allowed_headers(r, ALLOWED[0])
        assert "authorization" in r.header("access-control-allow-headers", "").lower()
        r = call(d.port, "GET", "/processes", [("Origin", ALLOWED[0])])
        error_code(r, 401)
        self.check_allowed_headers(r, ALLOWED[0])          # the page can read the 401
        r = call(d.port, "GET", "/processes",
                 [("Origin", ALLOWED[0]), ("Authorization", "Bearer " + TOKEN)])
        assert r.status == 200
        self.check_allowed_headers(r, ALLOWED[0])

    @pytest.mark.parametrize("origin", [EVIL, "http://a.example", "https://a.example.evil.com",
                                        "https://b.example", "null"])
    def test_other_origins_get_no_cors(self, cors, origin):
        r = call(cors.port, "GET", "/processes", [("Origin", origin)])
        assert r.status == 200 and not cors_headers(r), r.headers
        r = call(cors.port, "OPTIONS", "/processes",
                 [("Origin", origin), ("Access-Control-Request-Method", "POST")])
        assert not cors_headers(r), r.headers
        r = call(cors.port, "POST", "/processes/victim/_stop", [("Origin", origin)])
        error_code(r, 403)
        assert not cors_headers(r)
        assert cors.status("victim")["running"] == 1

    def test_never_wildcard_with_credentials(self, cors, open_daemon):
        replies = []
        for d in (cors, open_daemon):
            for origin in ALLOWED + [EVIL, None]:
                headers = [("Origin", origin)] if origin else []
                replies.append(call(d.port, "GET", "/processes", headers))
                replies.append(call(d.port, "OPTIONS", "/processes",
                                    headers + [("Access-Control-Request-Method", "PUT")]))
                replies.append(call(d.port, "GET", "/nope", headers))
        for r in replies:
            h = cors_headers(r)
            if h.get("access-control-allow-credentials", "").lower() == "true":
                assert h.get("access-control-allow-origin") not in (None, "*", "null"), r.headers
            assert h.get("access-control-allow-origin") in (None,) + tuple(ALLOWED), r.headers

    def test_wildcard_never_with_credentials(self, daemon_factory):
        d = daemon_factory("[gaffer]\ncors_origins = *\n")
        for origin in (EVIL, ALLOWED[0], "null"):
            for method in ("GET", "OPTIONS"):
                r = call(d.port, method, "/processes",
                         [("Origin", origin), ("Access-Control-Request-Method", "POST")])
                h = cors_headers(r)
                # any origin is allowed: "*", or the origin reflected, but never
                # together with credentials
                assert h.get("access-control-allow-origin") in ("*", origin), r.headers
                assert h.get("access-control-allow-credentials", "false") != "true", r.headers

    def test_endpoint_cors_overrides_gaffer(self, daemon_factory):
        d = daemon_factory("""\
            [gaffer]
            http_endpoints = one, two
            cors_origins = https://a.example

            [endpoint:one]
            bind = 127.0.0.1:0

            [endpoint:two]
            bind = 127.0.0.1:0
            cors_origins = https://c.example
            """)
        results = {}
        for port in listening_ports(d):
            results[port] = tuple(
                cors_headers(call(port, "GET", "/processes", [("Origin", o)]))
                .get("access-control-allow-origin")
                for o in ("https://a.example", "https://c.example"))
        assert sorted(results.values(), key=str) == sorted(
            [("https://a.example", None), (None, "https://c.example")], key=str)


# -- cross-origin writes: "*" reads only, credentials a browser adds never count -------------

FORM = [("Content-Type", "text/plain")]          # a cross-site <form> needs no preflight


@pytest.fixture(scope="module")
def star(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("star"),
               "[gaffer]\ncors_origins = *\n\n[process:victim]\ncmd = sleep 300\n")
    try:
        d.start()
        yield d
    finally:
        d.close()


class TestWildcardReadsOnly:
    @pytest.mark.parametrize("origin", [EVIL, "null", "http://127.0.0.1:1"])
    def test_form_post_creates_nothing(self, star, origin):
        r = call(star.port, "POST", "/processes", [("Origin", origin)] + FORM,
                 body=b'{"name": "planted", "cmd": "sleep 300"}')
        assert error_code(r, 403) == "forbidden_origin"
        assert star.get("/processes/planted").status == 404
        for method, path in (("POST", "/processes/victim/_stop"), ("DELETE", "/processes/victim"),
                             ("PUT", "/processes/victim"), ("POST", "/reload")):
            body = b'{"cmd": "sleep 1"}' if method == "PUT" else None
            error_code(call(star.port, method, path, [("Origin", origin)] + FORM, body=body), 403)
        assert star.status("victim")["running"] == 1

    def test_reads_are_shared_with_any_origin(self, star):
        r = call(star.port, "GET", "/processes", [("Origin", EVIL)])
        assert r.status == 200 and r.json() == ["victim"]
        h = cors_headers(r)
        assert h["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in h
        r = call(star.port, "OPTIONS", "/processes/victim/_stop",
                 [("Origin", EVIL), ("Access-Control-Request-Method", "POST")])
        methods = {m.strip() for m in r.header("access-control-allow-methods", "").split(",")}
        assert methods <= {"GET", "HEAD"}, r.headers

    def test_websocket_is_a_write(self, star):
        with RawClient(star.port) as c:
            c.send(http_request_bytes(
                "GET", "/wstreams/1", host="127.0.0.1:%d" % star.port,
                headers=[("Upgrade", "websocket"), ("Connection", "Upgrade"),
                         ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                         ("Sec-WebSocket-Version", "13"), ("Origin", EVIL)]))
            assert c.read_response(head=True).status == 403

    def test_a_listed_origin_may_still_write(self, daemon_factory):
        d = daemon_factory("[gaffer]\ncors_origins = *, %s\n" % ALLOWED[0])
        r = call(d.port, "POST", "/processes", [("Origin", ALLOWED[0])],
                 body=b'{"name": "listed", "cmd": "sleep 300", "start": false}')
        assert r.status == 200, r
        assert cors_headers(r)["access-control-allow-origin"] == ALLOWED[0]


class TestFetchMetadata:
    @pytest.mark.parametrize("site", ["cross-site", "same-site"])
    def test_cross_site_without_origin_is_refused(self, open_daemon, site):
        r = call(open_daemon.port, "POST", "/processes/victim/_stop",
                 [("Sec-Fetch-Site", site)] + FORM)
        error_code(r, 403)
        assert open_daemon.status("victim")["running"] == 1
        r = call(open_daemon.port, "GET", "/processes", [("Sec-Fetch-Site", site)])
        assert r.status == 200

    @pytest.mark.parametrize("site", ["same-origin", "none"])
    def test_own_pages_and_typed_urls_pass(self, open_daemon, site):
        r = call(open_daemon.port, "POST", "/processes/nosuch/_start", [("Sec-Fetch-Site", site)])
        assert error_code(r, 404) == "not_found"


@pytest.fixture(scope="class")
def guarded(tmp_path_factory):
    """A daemon with a token and one allowed origin, shared by a class."""
    d = Daemon(tmp_path_factory.mktemp("creds"),
               "[gaffer]\nauth_token = %s\ncors_origins = %s\n\n"
               "[process:victim]\ncmd = sleep 300\n" % (TOKEN, ALLOWED[0]))
    try:
        d.start()
        yield d
    finally:
        d.close()


class TestBrowserCredentials:
    """A browser resends cached Basic credentials by itself, also on a
    cross-origin form post: for a foreign origin's change only a Bearer
    token, which the page must set itself, counts."""

    def authed(self, d, method, path, credentials, origin=None, body=None):
        headers = [("Authorization", credentials)] + ([("Origin", origin)] if origin else [])
        return call(d.port, method, path, headers + FORM, body=body)

    def test_cached_basic_never_authorizes_a_cross_origin_change(self, guarded):
        d = guarded
        for origin in (ALLOWED[0], EVIL):
            r = self.authed(d, "POST", "/processes/victim/_stop", basic("", TOKEN), origin)
            assert r.status in (401, 403), r
        r = self.authed(d, "POST", "/processes", basic("admin", TOKEN), ALLOWED[0],
                        body=b'{"name": "planted", "cmd": "sleep 300"}')
        assert error_code(r, 401) == "unauthorized" and "Bearer" in r.json()["message"]
        r = self.authed(d, "GET", "/processes/planted", "Bearer " + TOKEN)
        assert r.status == 404
        r = self.authed(d, "GET", "/status/victim", "Bearer " + TOKEN)
        assert r.json()["running"] == 1

    def test_basic_still_reads_cross_origin(self, guarded):
        r = self.authed(guarded, "GET", "/processes", basic("", TOKEN), ALLOWED[0])
        assert r.status == 200 and r.json() == ["victim"]

    def test_bearer_from_a_listed_origin_writes(self, guarded):
        r = self.authed(guarded, "POST", "/processes/victim/_signal/CONT", "Bearer " + TOKEN,
                        ALLOWED[0])
        assert r.status == 200 and r.json() == {"ok": True}

    def test_basic_without_origin_or_from_its_own_pages_writes(self, guarded):
        d = guarded
        for origin in (None, "http://127.0.0.1:%d" % d.port):
            r = self.authed(d, "POST", "/processes/victim/_signal/CONT", basic("", TOKEN), origin)
            assert r.status == 200 and r.json() == {"ok": True}, (origin, r)


# -- headers on every response -----------------------------------------------------------

SAFETY = {"x-content-type-options": "nosniff", "x-frame-options": "SAMEORIGIN"}


def check_safety_headers(resp):
    for name, value in SAFETY.items():
        assert resp.header(name) == value, (name, resp.status, resp.headers)
    assert "frame-ancestors 'self'" in resp.header("content-security-policy", ""), resp.headers


class TestSafetyHeaders:
    def test_every_kind_of_reply(self, daemon_factory):
        d = daemon_factory("[gaffer]\nauth_token = %s\npublic_ping = true\nrequest_timeout = 1\n"
                           "max_connections = 3\nplugins_dir = %s\n"
                           % (TOKEN, os.path.join(os.path.dirname(GAFFERD), "gafferd_plugins")))
        auth = [("Authorization", "Bearer " + TOKEN)]
        replies = [call(d.port, "GET", "/ping"),                            # 200
                   call(d.port, "GET", "/processes"),                       # 401
                   call(d.port, "GET", "/nope", auth),                      # 404
                   call(d.port, "POST", "/processes", auth + [("Origin", EVIL)]),   # 403
                   call(d.port, "GET", "/_plugin/console/", auth),          # the console
                   call(d.port, "GET", "/_plugin/console/console.js", auth)]
        with RawClient(d.port) as c:                                       # 400
            replies.append(c.request(b"NOT HTTP\r\n\r\n"))
        with RawClient(d.port) as c:                                       # 408
            c.send(b"GET /ping HTTP/1.1\r\n")
            replies.append(c.read_response())
        with RawClient(d.port) as c:                                       # a stream's head
            c.send(http_request_bytes("GET", "/watch?feed=continuous&heartbeat=0",
                                      host="127.0.0.1:%d" % d.port, headers=auth))
            replies.append(c.read_response(head=True))
            with RawClient(d.port) as c2, RawClient(d.port) as c3:          # 503
                c2.send(b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                c3.send(b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                with RawClient(d.port) as c4:
                    replies.append(c4.read_response())
        assert sorted(r.status for r in replies) == [200, 200, 200, 200, 400, 401, 403, 404,
                                                     408, 503], replies
        for r in replies:
            check_safety_headers(r)


# -- what counts as loopback, and the token file ------------------------------------------

class TestLoopbackNames:
    def test_a_localhost_subdomain_is_looked_up(self, tmp_path):
        # "*.localhost" is only loopback if it resolves there; a name that
        # resolves elsewhere, or not at all, needs a token like any other
        config = tmp_path / "gaffer.ini"
        config.write_text("[gaffer]\nhttp_endpoints = web\n\n[endpoint:web]\n"
                          "bind = nosuch-gafferd-test.localhost:0\n")
        out = run_briefly(["--check", str(config)], str(tmp_path))
        assert out.returncode == 2, out
        assert "auth_token" in out.stderr and "Traceback" not in out.stderr, out.stderr


class TestTokenFileMode:
    @pytest.mark.parametrize("mode", [0o640, 0o604, 0o666])
    def test_readable_by_others_warns(self, tmp_path, mode):
        path = tmp_path / "token"
        path.write_text(TOKEN + "\n")
        os.chmod(str(path), mode)
        config = tmp_path / "gaffer.ini"
        config.write_text("[gaffer]\nauth_token_file = %s\n" % path)
        out = run_briefly(["--check", str(config)], str(tmp_path))
        assert out.returncode == 0, out
        line, = [l for l in out.stderr.splitlines() if "auth_token_file" in l]
        assert str(path) in line and "chmod 600" in line, line

    def test_private_file_is_quiet(self, tmp_path):
        path = tmp_path / "token"
        path.write_text(TOKEN + "\n")
        os.chmod(str(path), 0o600)
        config = tmp_path / "gaffer.ini"
        config.write_text("[gaffer]\nauth_token_file = %s\n" % path)
        out = run_briefly(["--check", str(config)], str(tmp_path))
        assert out.returncode == 0 and "auth_token_file" not in out.stderr, out

    def test_warned_at_start_up_and_reload(self, daemon_factory, tmp_path):
        path = tmp_path / "token"
        path.write_text(TOKEN + "\n")
        os.chmod(str(path), 0o644)
        d = daemon_factory("[gaffer]\nauth_token_file = %s\n" % path)
        assert d.log().count("chmod 600") == 1
        r = call(d.port, "POST", "/reload", [("Authorization", "Bearer " + TOKEN)])
        assert r.status == 200, r
        assert d.log().count("chmod 600") == 2
