"""The web console (``gafferd_plugins/console``), served by the real daemon.

The first tests fetch the site over HTTP. The browser tests drive a headless
Chromium through the Chrome DevTools Protocol, spoken over a websocket client
written here with the standard library only (socket, RFC 6455 framing, json):
the console must list the configured templates, stop one through its own
button (checked through the API), follow process output, ask for the API
token when the endpoint has one, and leave a screenshot in
``tests/artifacts/``.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import time
import urllib.parse

import pytest

from conftest import PY, ROOT, wait_for

PLUGINS_DIR = os.path.join(ROOT, "gafferd_plugins")
SITE = os.path.join(PLUGINS_DIR, "console", "_site")
ARTIFACTS = os.path.join(ROOT, "tests", "artifacts")
CHROMIUM = "/usr/bin/chromium"

needs_chromium = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason="headless browser tests need %s (Debian package 'chromium'), "
           "which is not installed" % CHROMIUM)

TICKER = """\
import itertools, sys, time
for i in itertools.count():
    print("tick %d" % i, flush=True)
    time.sleep(0.2)
"""


def console_config(tmp_path, extra=""):
    """Three templates: a ticker, a group of two sleepers, one not started."""
    ticker = tmp_path / "ticker.py"
    ticker.write_text(TICKER)
    return """
        [gaffer]
        plugins_dir = {plugins}
        {extra}

        [process:dummy]
        cmd = {py}
        args = -u {ticker}
        numprocesses = 1
        redirect_output = stdout, stderr

        [process:grp:worker]
        cmd = {py}
        args = -c "import time; time.sleep(3600)"
        numprocesses = 2

        [process:idle]
        cmd = {py}
        args = -c "import time; time.sleep(3600)"
        start = false
        """.format(plugins=PLUGINS_DIR, py=PY, ticker=ticker, extra=extra)


TEMPLATES = ["dummy", "grp:worker", "idle"]


# ---------------------------------------------------------------------------
# The site over plain HTTP
# ---------------------------------------------------------------------------

def test_site_files_are_plain_static_files():
    """HTML, CSS and JavaScript only, nothing fetched from elsewhere."""
    names = sorted(os.listdir(SITE))
    assert names == ["console.css", "console.js", "index.html"]
    assert not os.path.exists(os.path.join(PLUGINS_DIR, "console", "__init__.py"))
    for name in names:
        with open(os.path.join(SITE, name), encoding="utf-8") as f:
            text = f.read()
        # works offline: no URL to any other host, no protocol-relative URL
        assert not re.search(r"https?://", text), name
        assert not re.search(r"""(?:src|href)\s*=\s*["']//""", text), name
        assert "@import" not in text, name


def test_console_served_with_content_types(daemon_factory, tmp_path):
    d = daemon_factory(console_config(tmp_path))
    r = d.get("/_plugin/console/")
    assert r.status == 200, r
    assert r.headers["content-type"].startswith("text/html"), r.headers
    page = r.body.decode("utf-8")
    assert 'href="console.css"' in page and 'src="console.js"' in page
    with open(os.path.join(SITE, "index.html"), "rb") as f:
        assert r.body == f.read()

    r = d.get("/_plugin/console/index.html")
    assert r.status == 200 and r.headers["content-type"].startswith("text/html"), r

    r = d.get("/_plugin/console/console.css")
    assert r.status == 200, r
    assert r.headers["content-type"].split(";")[0].strip() == "text/css", r.headers
    with open(os.path.join(SITE, "console.css"), "rb") as f:
        assert r.body == f.read()

    r = d.get("/_plugin/console/console.js")
    assert r.status == 200, r
    assert r.headers["content-type"].split(";")[0].strip() in (
        "text/javascript", "application/javascript", "application/x-javascript"), r.headers
    with open(os.path.join(SITE, "console.js"), "rb") as f:
        assert r.body == f.read()

    assert d.get("/_plugin/console/missing.js").status == 404


def test_console_site_obeys_auth_token(daemon_factory, tmp_path):
    d = daemon_factory(console_config(tmp_path, "auth_token = s3cret"))
    assert d.get("/_plugin/console/").status == 401
    r = d.get("/_plugin/console/", headers={"Authorization": "Bearer s3cret"})
    assert r.status == 200 and r.headers["content-type"].startswith("text/html"), r


# ---------------------------------------------------------------------------
# A websocket client (RFC 6455) and a Chrome DevTools Protocol client
# ---------------------------------------------------------------------------

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class WebSocket:
    """Just enough of a client: text frames out (masked), messages in."""

    def __init__(self, url, timeout=30.0):
        u = urllib.parse.urlsplit(url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        path = u.path + ("?" + u.query if u.query else "")
        request = ("GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\n"
                   "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                   "Sec-WebSocket-Version: 13\r\n\r\n" % (path, u.hostname, u.port, key))
        self.sock.sendall(request.encode("ascii"))
        self.buf = b""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._recv(deadline)
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0].split()[1] == "101", lines[0]
        fields = {k.strip().lower(): v.strip()
                  for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        assert fields.get("sec-websocket-accept") == accept, fields

    def _recv(self, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("websocket read timed out")
        self.sock.settimeout(remaining)
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("websocket closed by peer")
        return data

    def _read(self, n, deadline):
        while len(self.buf) < n:
            self.buf += self._recv(deadline)
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def _send_frame(self, opcode, payload):
        header = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)
        keystream = (mask * (n // 4 + 1))[:n]
        masked = (int.from_bytes(payload, "big")
                  ^ int.from_bytes(keystream, "big")).to_bytes(n, "big")
        self.sock.sendall(header + mask + masked)

    def send_text(self, text):
        self._send_frame(0x1, text.encode("utf-8"))

    def recv_text(self, timeout):
        deadline = time.monotonic() + timeout
        parts = []
        while True:
            b0, b1 = self._read(2, deadline)
            fin, opcode, n = b0 & 0x80, b0 & 0x0F, b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._read(2, deadline))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._read(8, deadline))[0]
            mask = self._read(4, deadline) if b1 & 0x80 else None
            payload = self._read(n, deadline)
            if mask:
                payload = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
            if opcode == 0x9:                      # ping
                self._send_frame(0xA, payload)
                continue
            if opcode == 0xA:                      # pong
                continue
            if opcode == 0x8:
                raise ConnectionError("websocket closed by peer")
            parts.append(payload)
            if fin:
                return b"".join(parts).decode("utf-8")

    def close(self):
        try:
            self._send_frame(0x8, struct.pack("!H", 1000))
        except OSError:
            pass
        self.sock.close()


class CDPError(Exception):
    pass


class CDP:
    """Chrome DevTools Protocol over one browser websocket (flat sessions)."""

    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0
        self.handlers = {}        # event method -> callable(params, session)
        self.exceptions = []      # uncaught page exceptions (Runtime.exceptionThrown)
        self.handlers["Runtime.exceptionThrown"] = \
            lambda params, session: self.exceptions.append(params.get("exceptionDetails"))

    def post(self, method, params=None, session=None):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self.ws.send_text(json.dumps(msg))
        return self.next_id

    def call(self, method, params=None, session=None, timeout=30.0):
        mid = self.post(method, params, session)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no reply to %s within %.0fs" % (method, timeout))
            msg = json.loads(self.ws.recv_text(remaining))
            if msg.get("id") == mid:
                if "error" in msg:
                    raise CDPError("%s: %s" % (method, msg["error"]))
                return msg.get("result", {})
            handler = self.handlers.get(msg.get("method"))
            if handler:
                handler(msg.get("params", {}), msg.get("sessionId"))


class Page:
    """One browser tab, attached as a flat session."""

    def __init__(self, cdp, width=1360, height=1000):
        self.cdp = cdp
        target = cdp.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = cdp.call("Target.attachToTarget",
                                {"targetId": target, "flatten": True})["sessionId"]
        self.call("Page.enable")
        self.call("Runtime.enable")
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def call(self, method, params=None, timeout=30.0):
        return self.cdp.call(method, params, self.session, timeout)

    def navigate(self, url):
        result = self.call("Page.navigate", {"url": url})
        assert not result.get("errorText"), result

    def js(self, expression):
        """Evaluate in the page (promises awaited); return the value."""
        result = self.call("Runtime.evaluate", {"expression": expression,
                                                "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise CDPError("%s -> %s" % (expression, result["exceptionDetails"]))
        return result["result"].get("value")

    def wait_js(self, expression, timeout=15.0, message=None):
        """Poll ``expression`` until truthy; errors (page still loading) count as false."""
        guarded = "(() => { try { return (%s); } catch (e) { return false; } })()" % expression
        return wait_for(lambda: self.js(guarded), timeout, interval=0.1,
                        message=message or expression)

    def screenshot(self, name):
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        os.makedirs(ARTIFACTS, exist_ok=True)
        path = os.path.join(ARTIFACTS, name)
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
        return path


@pytest.fixture
def browser(tmp_path_factory):
    """A headless Chromium and a CDP connection to it."""
    if not os.path.exists(CHROMIUM):
        pytest.skip("%s not installed (Debian package 'chromium')" % CHROMIUM)
    profile = str(tmp_path_factory.mktemp("chromium-profile"))
    errlog_path = os.path.join(profile, "..", os.path.basename(profile) + ".stderr")
    errlog = open(errlog_path, "wb")
    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-extensions", "--hide-scrollbars",
         "--window-size=1360,1000", "--user-data-dir=" + profile,
         "--remote-debugging-port=0", "about:blank"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errlog,
        start_new_session=True)

    def devtools_url():
        if proc.poll() is not None:
            with open(errlog_path, "rb") as f:
                pytest.fail("chromium exited with %s:\n%s" % (proc.returncode, f.read().decode()))
        with open(errlog_path, "rb") as f:
            m = re.search(rb"DevTools listening on (ws://\S+)", f.read())
        return m and m.group(1).decode()

    ws = None
    try:
        url = wait_for(devtools_url, 30.0, interval=0.05, message="chromium's DevTools URL")
        ws = WebSocket(url)
        yield CDP(ws)
    finally:
        if ws is not None:
            try:
                ws.send_text(json.dumps({"id": 0, "method": "Browser.close"}))
            except OSError:
                pass
            ws.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        # chromium's own helpers (zygote, renderers) share its process group
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if proc.poll() is None:
            proc.wait()
        errlog.close()


def row_js(name):
    """JS expression: the table row of template ``name`` (or null)."""
    return "document.querySelector(%s)" % json.dumps('tr.template[data-name="%s"]' % name)


def row_state(name):
    return "((r) => r ? r.dataset.state : null)(%s)" % row_js(name)


def lists_exactly(names):
    """JS expression: the table lists exactly the templates ``names``."""
    listed = "Array.from(document.querySelectorAll('tr.template')).map((r) => r.dataset.name)"
    expected = json.dumps(sorted(names), separators=(",", ":"))
    return "JSON.stringify(%s.sort()) === %s" % (listed, json.dumps(expected))


def click_js(action, name):
    selector = 'button[data-action="%s"][data-name="%s"]' % (action, name)
    return ("(() => { const b = document.querySelector(%s); if (!b || b.disabled) return false;"
            " b.click(); return true; })()" % json.dumps(selector))


def cell_js(name, field):
    return ("((r) => r ? r.querySelector('[data-field=\"%s\"]').textContent : null)(%s)"
            % (field, row_js(name)))


# ---------------------------------------------------------------------------
# Browser tests
# ---------------------------------------------------------------------------

@needs_chromium
def test_console_lists_templates_and_stops_one(daemon_factory, tmp_path, browser):
    d = daemon_factory(console_config(tmp_path))
    d.wait_running("dummy", 1)
    d.wait_running("grp:worker", 2)
    page = Page(browser)
    page.navigate("http://127.0.0.1:%d/_plugin/console/" % d.port)

    # every template of the config is listed, with its live state
    page.wait_js("document.body.dataset.ready === '1'", message="the console to load")
    page.wait_js(lists_exactly(TEMPLATES),
                 message="the templates of the config to be listed")
    page.wait_js("%s === 'running'" % row_state("dummy"), message="dummy shown running")
    assert page.js(row_state("idle")) == "stopped"
    assert page.js(cell_js("grp:worker", "group")) == "grp"
    page.wait_js("%s === '2 / 2'" % cell_js("grp:worker", "running"))
    # the internal ids and OS pids of the processes are shown
    ids = d.pids("dummy")
    assert len(ids) == 1
    os_pid = d.os_pid(ids[0])
    page.wait_js("%s.includes('#%d') && %s.includes('%d')"
                 % (cell_js("dummy", "procs"), ids[0], cell_js("dummy", "procs"), os_pid),
                 message="dummy's ids and pids in the table")
    # the live event feed is connected, and the output pane follows dummy
    page.wait_js("document.getElementById('watch-state').dataset.state === 'live'",
                 message="the /watch feed to be live")
    page.wait_js("/tick \\d+/.test(document.getElementById('log').textContent)",
                 message="dummy's output in the log pane")
    page.wait_js("document.getElementById('log').textContent.includes('live stdout of #%d')"
                 % ids[0], message="the log pane to follow /streams/%d/stdout" % ids[0])

    # stop dummy with the page's own button; the API agrees, and so does the page
    assert page.js(click_js("stop", "dummy")) is True
    wait_for(lambda: (lambda s: s["state"] == "stopped" and s["running"] == 0)(
             d.status("dummy")),
             10.0, message="dummy to be stopped through the console's button")
    page.wait_js("%s === 'stopped'" % row_state("dummy"), message="the page to show dummy stopped")
    page.wait_js("%s === '0 / 1'" % cell_js("dummy", "running"))
    # the others were not touched
    assert d.status("grp:worker")["running"] == 2
    assert page.js(row_state("grp:worker")) == "running"

    # +1 on the group: the target grows, through the API and on the page
    assert page.js(click_js("add", "grp:worker")) is True
    d.wait_running("grp:worker", 3)
    assert d.status("grp:worker")["max_processes"] == 3
    page.wait_js("%s === '3 / 3'" % cell_js("grp:worker", "running"),
                 message="the page to show 3 workers")
    page.wait_js("document.getElementById('statusbar').dataset.kind === 'info'")

    page.js("document.getElementById('statusbar').hidden = true")
    path = page.screenshot("console.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert browser.exceptions == []


@needs_chromium
def test_console_adds_a_template_and_shows_api_errors(daemon_factory, tmp_path, browser):
    d = daemon_factory(console_config(tmp_path))
    page = Page(browser)
    page.navigate("http://127.0.0.1:%d/_plugin/console/" % d.port)
    page.wait_js("document.body.dataset.ready === '1'", message="the console to load")

    fill = """(() => {
        const f = document.getElementById('add-form');
        f.name.value = 'added'; f.cmd.value = %s;
        f.args.value = '-c "import time; time.sleep(3600)"';
        f.numprocesses.value = '2'; f.start.checked = true;
        f.requestSubmit(); return true; })()""" % json.dumps(PY)
    assert page.js(fill) is True
    wait_for(lambda: d.get("/status/added").status == 200, 10.0,
             message="the form to create the template")
    d.wait_running("added", 2)
    assert d.json("GET", "/processes/added")["cmd"] == PY
    page.wait_js("%s === 'running'" % row_state("added"),
                 message="the new template to appear (create event)")
    page.wait_js("%s === '2 / 2'" % cell_js("added", "running"))

    # a conflict: the JSON error of the API is shown in the status bar
    assert page.js(fill) is True
    page.wait_js("document.getElementById('statusbar').dataset.kind === 'error' && "
                 "!document.getElementById('statusbar').hidden",
                 message="the error to be shown")
    text = page.js("document.getElementById('statusbar-text').textContent")
    assert "409" in text and "conflict" in text, text

    # a signal, asked for in the page's own dialog: TERM kills dummy's process,
    # which the daemon replaces (an exit nobody asked for: one restart)
    ids = d.pids("dummy")
    assert len(ids) == 1
    assert page.js(click_js("signal", "dummy")) is True
    page.wait_js("document.getElementById('dialog').open")
    page.js("document.getElementById('dialog-input').value = 'TERM';"
            "document.getElementById('dialog-ok').click()")
    wait_for(lambda: (lambda p: len(p) == 1 and p != ids)(d.pids("dummy")), 10.0,
             message="dummy's process to be replaced after the signal")
    new_id = d.pids("dummy")[0]
    page.wait_js("%s.includes('#%d')" % (cell_js("dummy", "procs"), new_id),
                 message="the page to show the new process")
    page.wait_js("%s === '1'" % cell_js("dummy", "restarts"), message="one restart shown")

    # remove, confirmed in the page's own dialog
    assert page.js(click_js("remove", "added")) is True
    page.wait_js("document.getElementById('dialog').open")
    page.js("document.getElementById('dialog-ok').click()")
    wait_for(lambda: d.get("/status/added").status == 404, 10.0,
             message="the template to be removed")
    page.wait_js("%s === null" % row_state("added"), message="the row to go away")
    assert browser.exceptions == []


@needs_chromium
def test_console_asks_for_the_token(daemon_factory, tmp_path, browser):
    d = daemon_factory(console_config(tmp_path, "auth_token = s3cret"))
    page = Page(browser)
    # The site obeys the endpoint's auth like every route, so give the page
    # itself the token (as a proxy or a browser login would); the page's own
    # API calls carry no credentials until the user types the token.
    site = "http://127.0.0.1:%d/_plugin/console/" % d.port

    def on_paused(params, session):
        headers = dict(params["request"]["headers"])
        if params["request"]["url"].startswith(site):
            headers["Authorization"] = "Bearer s3cret"
        browser.post("Fetch.continueRequest",
                     {"requestId": params["requestId"],
                      "headers": [{"name": k, "value": v} for k, v in headers.items()]},
                     session)

    browser.handlers["Fetch.requestPaused"] = on_paused
    page.call("Fetch.enable", {"patterns": [{"urlPattern": site + "*", "requestStage": "Request"}]})
    page.navigate(site)

    page.wait_js("document.body.dataset.auth === 'required' && "
                 "!document.getElementById('auth').hidden", message="the token form")
    assert page.js("document.querySelectorAll('tr.template').length") == 0
    page.screenshot("console-auth.png")

    # a wrong token is refused, and the form says so
    submit = ("(() => { document.getElementById('auth-token').value = %s;"
              " document.getElementById('auth-form').requestSubmit(); return true; })()")
    assert page.js(submit % json.dumps("wrong")) is True
    page.wait_js("document.body.dataset.auth === 'required' && "
                 "document.getElementById('auth-error').textContent.includes('refused')",
                 message="the wrong token to be refused")

    assert page.js(submit % json.dumps("s3cret")) is True
    page.wait_js("document.body.dataset.ready === '1'", message="the console to load")
    page.wait_js(lists_exactly(TEMPLATES),
                 message="the templates after signing in")
    assert page.js("sessionStorage.getItem('gafferd.console.token')") == "s3cret"
    assert page.js("document.getElementById('auth').hidden") is True

    # the event feed and actions carry the token too
    page.wait_js("document.getElementById('watch-state').dataset.state === 'live'",
                 message="the /watch feed to be live with the token")
    page.wait_js("%s === 'running'" % row_state("dummy"))
    assert page.js(click_js("stop", "dummy")) is True
    wait_for(lambda: d.request("GET", "/status/dummy", headers={
        "Authorization": "Bearer s3cret"}).json()["running"] == 0,
        10.0, message="dummy to be stopped")
    page.wait_js("%s === 'stopped'" % row_state("dummy"), message="the page to show dummy stopped")
    assert browser.exceptions == []


@needs_chromium
def test_console_misses_no_change_made_while_it_loads_and_does_not_scroll(
        daemon_factory, tmp_path, browser):
    """The daemon answers the page's GET /status, then a template is created,
    then the page gets that (now stale) answer: the template must still be
    shown. The browser holds the answer back (CDP Fetch, response stage)
    until the page has seen the create event and re-read the new template,
    so the stale answer lands last. Loading also leaves the view where it
    was (no focus moved to the output pane, no scrolling)."""
    d = daemon_factory(console_config(tmp_path))
    d.wait_running("dummy", 1)
    page = Page(browser, height=500)          # the output pane is below the fold
    base = "http://127.0.0.1:%d" % d.port
    held, late_reads = [], []

    def on_paused(params, session):
        url = params["request"]["url"]
        if url == base + "/status" and "responseStatusCode" in params:
            held.append(params["requestId"])  # the daemon answered; keep it here
            return
        if url == base + "/status/late":
            late_reads.append(url)
        browser.post("Fetch.continueRequest", {"requestId": params["requestId"]}, session)

    browser.handlers["Fetch.requestPaused"] = on_paused
    page.call("Fetch.enable", {"patterns": [
        {"urlPattern": base + "/status", "requestStage": "Response"},
        {"urlPattern": base + "/status/late", "requestStage": "Request"}]})
    page.navigate(base + "/_plugin/console/")
    page.wait_js("true")
    wait_for(lambda: page.js("1") and held, 15.0, message="the page's GET /status answered")
    # the answer is in the browser; now the change it cannot contain
    r = d.post("/processes", body=json.dumps(
        {"name": "late", "cmd": PY, "args": ["-c", "import time; time.sleep(3600)"]}).encode())
    assert r.status == 200, r
    d.wait_running("late", 1)
    wait_for(lambda: page.js("1") and late_reads, 10.0,
             message="the page to re-read 'late' on its create event (feed open before the read)")
    page.wait_js("%s === 'running'" % row_state("late"), message="the row of 'late'")
    page.call("Fetch.continueRequest", {"requestId": held[0]})   # the stale answer, last
    page.wait_js("document.body.dataset.ready === '1'", message="the console to load")
    page.wait_js(lists_exactly(TEMPLATES + ["late"]) + " && %s === 'running'" % row_state("late"),
                 message="'late' listed after the stale /status was applied")
    page.call("Fetch.disable")
    page.wait_js("document.getElementById('log').textContent.includes('live stdout of')",
                 message="the log pane to follow a process")
    assert page.js("document.documentElement.scrollHeight > window.innerHeight") is True
    assert page.js("window.scrollY") == 0
    assert page.js("document.activeElement === document.getElementById('log')") is False
    assert browser.exceptions == []


@needs_chromium
def test_console_shows_lifecycle_columns_and_follows_a_crash(daemon_factory, tmp_path, browser):
    """Each template's state, ready count, restarts and last exit are shown,
    and follow a crash live: kill -9 one of the two workers, the row goes
    through `starting` (the replacement is not ready before startsecs) back
    to `running`, restarts shows 1 and the last exit the signal."""
    d = daemon_factory(console_config(tmp_path))
    d.wait_running("grp:worker", 2)
    wait_for(lambda: d.status("grp:worker")["ready"] == 2, 10.0,
             message="both workers ready (up startsecs)")
    page = Page(browser)
    page.navigate("http://127.0.0.1:%d/_plugin/console/" % d.port)
    page.wait_js("document.body.dataset.ready === '1'", message="the console to load")
    page.wait_js("document.getElementById('watch-state').dataset.state === 'live'",
                 message="the /watch feed to be live")
    heads = page.js("Array.from(document.querySelectorAll('.templates thead th'))"
                    ".map((th) => th.textContent)")
    assert "Ready" in heads and "Restarts" in heads and "Last exit" in heads, heads
    page.wait_js("%s === 'running' && %s === '2' && %s === '0'"
                 % (row_state("grp:worker"), cell_js("grp:worker", "ready"),
                    cell_js("grp:worker", "restarts")),
                 message="grp:worker running, 2 ready, no restart")
    assert page.js(cell_js("grp:worker", "last_exit")) == "—"
    assert page.js(cell_js("idle", "ready")) == "0"
    assert page.js(row_state("idle")) == "stopped"

    # every state the row shows from now on
    page.js("""(() => { window.seenStates = [];
        new MutationObserver(() => {
            const r = %s; const s = r && r.dataset.state;
            if (s && window.seenStates[window.seenStates.length - 1] !== s) window.seenStates.push(s);
        }).observe(document.getElementById('templates-body'),
                   {subtree: true, attributes: true, attributeFilter: ['data-state']});
        return true; })()""" % row_js("grp:worker"))
    ids = d.pids("grp:worker")
    victim = d.os_pid(ids[0])
    os.kill(victim, signal.SIGKILL)
    page.wait_js("%s === '1'" % cell_js("grp:worker", "restarts"), message="one restart shown")
    page.wait_js("%s.startsWith('SIGKILL · ')" % cell_js("grp:worker", "last_exit"),
                 message="the last exit shown as SIGKILL")
    cell = "%s.querySelector('[data-field=\"last_exit\"]')" % row_js("grp:worker")
    assert page.js("%s.dataset.signal" % cell) == "9"
    title = page.js("%s.title" % cell)
    assert "killed by SIGKILL" in title and ("pid %d" % victim) in title, title
    # the replacement becomes ready after startsecs: the row is running again
    wait_for(lambda: d.status("grp:worker")["ready"] == 2, 10.0,
             message="the replacement ready")
    page.wait_js("%s === 'running' && %s === '2'"
                 % (row_state("grp:worker"), cell_js("grp:worker", "ready")),
                 message="the row running again with 2 ready")
    seen = page.js("window.seenStates")
    assert "starting" in seen and seen[-1] == "running", seen
    st = d.status("grp:worker")
    assert st["restarts"] == 1 and st["last_exit"]["term_signal"] == signal.SIGKILL, st
    assert page.js(cell_js("grp:worker", "restarts")) == "1"
    # the other templates were not touched
    assert page.js(cell_js("dummy", "restarts")) == "0"
    assert page.js(cell_js("dummy", "last_exit")) == "—"
    page.js("document.getElementById('statusbar').hidden = true")
    page.screenshot("console-lifecycle.png")
    assert browser.exceptions == []
