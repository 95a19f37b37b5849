"""The API's tables and contracts: the action tables against the docs and
a daemon, the one feed helper (``open_feed``), the static file server of
the HTTP server (``serve_file``), the plugin contract version, and the
/metrics per-process samples read through the manager's accessors.

In-process tests build real requests with the §6 parser and real files,
FIFOs and symlinks in ``tmp_path``; the rest drive the real daemon.
"""
import os
import re
import sys
import textwrap

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gafferd  # noqa: E402

from conftest import PY, ROOT, Daemon, run_loop_until, wait_for  # noqa: E402

HTTP_API_DOC = os.path.join(ROOT, "docs", "http-api.md")


def doc_row(prefix):
    """The first table row of docs/http-api.md whose route starts with ``prefix``."""
    with open(HTTP_API_DOC, encoding="utf-8") as f:
        for line in f:
            if line.startswith("| `" + prefix):
                return line
    raise AssertionError("no row for %s in docs/http-api.md" % prefix)


def actions_in(text):
    return set(re.findall(r"`(?:/[^`]*?)?(_[a-z]+)", text))


# ---------------------------------------------------------------------------
# the action tables
# ---------------------------------------------------------------------------

def test_template_action_table_is_the_documented_list():
    row = doc_row("/processes/NAME/_ACTION")
    assert actions_in(row.split("|")[3]) == set(gafferd.Api.TEMPLATE_ACTIONS)


def test_process_action_table_is_the_documented_list():
    row = doc_row("/processes/ID/_stop")
    assert actions_in(row.split("|")[1]) == set(gafferd.Api.PROCESS_ACTIONS)


def test_group_action_table_is_the_documented_list():
    row = doc_row("/groups/GROUP/_ACTION")
    assert actions_in(row.split("|")[3]) == set(gafferd.Api.GROUP_ACTIONS)


def test_every_table_row_takes_the_same_arguments():
    for table in (gafferd.Api.TEMPLATE_ACTIONS, gafferd.Api.PROCESS_ACTIONS,
                  gafferd.Api.GROUP_ACTIONS):
        for action, do in table.items():
            assert action.startswith("_")
            assert do.__code__.co_argcount == 4, action


SLEEP = "%s -c 'import time; time.sleep(300)'" % PY


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tables")
    d = Daemon(tmp, textwrap.dedent("""
        [process:web:a]
        cmd = %s
        [process:web:b]
        cmd = %s
        numprocesses = 2
    """ % (SLEEP, SLEEP)))
    d.start()
    d.wait_running("web:a", 1)
    d.wait_running("web:b", 2)
    yield d
    d.close()


def test_template_actions_through_the_table(daemon):
    assert daemon.json("POST", "/processes/web:a/_add/2") == {"ok": True, "numprocesses": 3}
    assert daemon.json("POST", "/processes/web:a/_sub/2") == {"ok": True, "numprocesses": 1}
    assert daemon.json("POST", "/processes/web:a/_sub") == {"ok": True, "numprocesses": 0}
    assert daemon.json("POST", "/processes/web:a/_add") == {"ok": True, "numprocesses": 1}
    daemon.wait_running("web:a", 1)
    assert daemon.json("POST", "/processes/web:a/_signal/CONT") == {"ok": True}
    r = daemon.post("/processes/web:a/_add/99999999")
    assert r.status == 400 and r.json()["error"] == "bad_value"
    r = daemon.post("/processes/web:a/_nope")
    assert r.status == 404 and r.json() == {"error": "resource_not_found",
                                            "message": "unknown action '_nope'"}
    r = daemon.post("/processes/nosuch/_nope")          # the template is looked up first
    assert r.status == 404 and r.json()["error"] == "not_found"
    r = daemon.post("/processes/web:a/_signal")
    assert r.status == 400 and r.json()["error"] == "no_signal_number"


def test_process_actions_through_the_table(daemon):
    pid = daemon.pids("web:b")[0]
    assert daemon.json("POST", "/processes/%d/_signal/CONT" % pid) == {"ok": True}
    r = daemon.post("/processes/%d/_start" % pid)
    assert r.status == 404 and r.json() == {"error": "resource_not_found",
                                            "message": "unknown action '_start'"}
    assert daemon.json("POST", "/processes/%d/_stop" % pid) == {"ok": True}
    wait_for(lambda: pid not in daemon.pids("web:b"), message="process %d stopped" % pid)
    r = daemon.post("/processes/%d/_stop" % pid)
    assert r.status == 404 and r.json()["error"] == "not_found"


def test_group_actions_through_the_table(daemon):
    assert daemon.json("POST", "/groups/web/_stop") == {"ok": True}
    wait_for(lambda: not daemon.pids("web:a") and not daemon.pids("web:b"),
             message="group stopped")
    assert daemon.json("POST", "/groups/web/_start") == {"ok": True}
    daemon.wait_running("web:a", 1)
    r = daemon.post("/groups/web/_nope")
    assert r.status == 404 and r.json()["message"] == "unknown group action '_nope'"
    # an unknown action is reported before an unknown group
    r = daemon.post("/groups/nosuch/_nope")
    assert r.status == 404 and r.json()["error"] == "resource_not_found"
    r = daemon.post("/groups/nosuch/_start")
    assert r.status == 404 and r.json()["error"] == "not_found"


def test_metrics_samples_come_from_the_manager(daemon):
    daemon.wait_running("web:b", 2)
    text = daemon.get("/metrics").body.decode("utf-8")
    for proc_id in daemon.pids("web:b"):
        labels = '{name="web:b",id="%d"}' % proc_id
        cpu = re.search(r"^gafferd_process_cpu_seconds_total%s (\S+)$" % re.escape(labels),
                        text, re.M)
        rss = re.search(r"^gafferd_process_resident_memory_bytes%s (\d+)$" % re.escape(labels),
                        text, re.M)
        fds = re.search(r"^gafferd_process_open_fds%s (\d+)$" % re.escape(labels), text, re.M)
        assert cpu and rss and fds, text
        assert float(cpu.group(1)) >= 0 and int(rss.group(1)) > 0 and int(fds.group(1)) >= 3
    children = re.search(r"^gafferd_children (\d+)$", text, re.M)
    assert children and int(children.group(1)) >= 2


# ---------------------------------------------------------------------------
# open_feed: the one wiring of every feed
# ---------------------------------------------------------------------------

class Sink:
    """A sink with the surface ``Feed`` documents (no I/O behind it)."""

    def __init__(self):
        self.closed, self.data, self.ended, self._callbacks = False, [], 0, []
        self.producer = "unset"

    def write(self, data):
        assert not self.closed
        self.data.append(data)

    def end(self):
        self.ended += 1
        self.close()

    def on_close(self, callback):
        if self.closed:
            callback()
        else:
            self._callbacks.append(callback)

    def close(self):
        if not self.closed:
            self.closed = True
            for callback in self._callbacks:
                callback()


class Source:
    """Something with the exit-callback surface of a Process."""

    def __init__(self):
        self.exit_callbacks = []

    def on_exit(self, callback):
        self.exit_callbacks.append(callback)

    def remove_exit_callback(self, callback):
        self.exit_callbacks.remove(callback)

    def exit(self):
        for callback in list(self.exit_callbacks):
            callback(self)


def test_open_feed_undoes_everything_once_when_the_sink_closes():
    loop = gafferd.Loop()
    sink, calls = Sink(), []
    procs = [Source(), Source()]
    subs = [(lambda *a: calls.append(("sub",) + a), lambda *a: calls.append(("unsub",) + a),
             (n, "listener")) for n in (1, 2)]
    gafferd.open_feed(loop, sink, subs, processes=procs, mode="eventsource", heartbeat=0.05,
                      producer="proc")
    assert calls == [("sub", 1, "listener"), ("sub", 2, "listener")]
    assert sink.producer == "proc" and all(p.exit_callbacks for p in procs)
    run_loop_until(loop, lambda: len(sink.data) >= 2, message="two heartbeats")
    assert set(sink.data) == {b":\n"}
    procs[0].exit()
    assert not sink.closed                      # one process left
    procs[1].exit()
    assert sink.closed and sink.ended == 1
    assert calls[2:] == [("unsub", 1, "listener"), ("unsub", 2, "listener")]
    assert not any(p.exit_callbacks for p in procs)
    beats = len(sink.data)
    deadline = loop.time() + 0.15
    run_loop_until(loop, lambda: loop.time() >= deadline, message="heartbeat cancelled")
    assert len(sink.data) == beats              # no heartbeat after the close


def test_open_feed_on_a_closed_sink_cleans_up_at_once_and_beats_newline():
    loop = gafferd.Loop()
    sink, calls = Sink(), []
    gafferd.open_feed(loop, sink, [(lambda: calls.append("sub"), lambda: calls.append("unsub"),
                                    ())], mode="continuous", heartbeat=0.05)
    run_loop_until(loop, lambda: sink.data, message="a heartbeat")
    assert sink.data[0] == b"\n" and sink.producer is None
    sink.close()
    assert calls == ["sub", "unsub"]
    late = Sink()
    late.close()
    proc = Source()
    gafferd.open_feed(loop, late, [(lambda: calls.append("sub2"), lambda: calls.append("unsub2"),
                                    ())], processes=[proc], end=lambda: calls.append("end"))
    assert calls[2:] == ["sub2", "unsub2"] and not proc.exit_callbacks


def test_feed_message_ends_a_long_poll_feed_only():
    for mode, ended in (("longpoll", 1), ("normal", 1), ("continuous", 0), ("eventsource", 0)):
        sink = Sink()
        gafferd.feed_message(sink, mode, b"x")
        assert sink.data == [b"x"] and sink.ended == ended, mode


# ---------------------------------------------------------------------------
# serve_file: the static file server of §12
# ---------------------------------------------------------------------------

def request(path, headers=""):
    parser = gafferd.RequestParser()
    parser.feed(("GET %s HTTP/1.1\r\nHost: x\r\n%s\r\n" % (path, headers)).encode("latin-1"))
    req = parser.next()
    assert req is not None
    return req


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "site"
    (root / "sub").mkdir(parents=True)
    (root / "index.html").write_text("<p>index</p>\n")
    (root / "sub" / "index.html").write_text("sub\n")
    (root / "a.css").write_text("p {}\n")
    (tmp_path / "secret.txt").write_text("SECRET\n")
    (tmp_path / "outdir").mkdir()
    (tmp_path / "outdir" / "index.html").write_text("SECRET index\n")
    os.symlink(str(tmp_path / "secret.txt"), str(root / "out-link"))
    os.symlink(str(tmp_path / "outdir"), str(root / "out-dir"))
    os.symlink(str(root / "a.css"), str(root / "in-link.css"))
    os.symlink(str(tmp_path / "outdir" / "index.html"), str(root / "sub2-index"))
    (root / "sub2").mkdir()
    os.symlink(str(tmp_path / "outdir" / "index.html"), str(root / "sub2" / "index.html"))
    os.mkfifo(str(root / "fifo"))
    return root


@pytest.mark.parametrize("rest", ["/../secret.txt", "/sub/../../secret.txt", "/out-link",
                                  "/out-dir/index.html", "/out-dir/", "/sub2/",
                                  "/a\\..\\..\\secret.txt", "/a\0b", "/fifo"])
def test_serve_file_refuses_escapes(tree, rest):
    with pytest.raises(gafferd.ApiError) as info:
        gafferd.serve_file(request("/_plugin/x/"), str(tree), rest)
    assert info.value.status == 403


def test_serve_file_serves_inside_the_tree(tree):
    reply = gafferd.serve_file(request("/_plugin/x/a.css"), str(tree), "/a.css")
    assert (reply.status, reply.body, reply.content_type) == (200, b"p {}\n",
                                                              "text/css; charset=UTF-8")
    etag = dict(reply.headers)["ETag"]
    reply = gafferd.serve_file(request("/_plugin/x/in-link.css"), str(tree), "/in-link.css")
    assert reply.status == 200 and reply.body == b"p {}\n"         # a link inside is fine
    reply = gafferd.serve_file(request("/_plugin/x/"), str(tree), "/")
    assert reply.status == 200 and reply.body == b"<p>index</p>\n"
    reply = gafferd.serve_file(request("/_plugin/x/sub?q=1"), str(tree), "/sub")
    assert reply.status == 302 and dict(reply.headers)["Location"] == "/_plugin/x/sub/?q=1"
    reply = gafferd.serve_file(request("/_plugin/x/a.css", "If-None-Match: %s\r\n" % etag),
                               str(tree), "/a.css")
    assert reply.status == 304 and reply.body == b""
    with pytest.raises(gafferd.ApiError) as info:
        gafferd.serve_file(request("/_plugin/x/none"), str(tree), "/none")
    assert info.value.status == 404


def test_plugin_site_replies_carry_nosniff(tmp_path):
    root = tmp_path / "plugins"
    (root / "s" / "_site").mkdir(parents=True)
    (root / "s" / "_site" / "x.txt").write_text("hello\n")
    d = Daemon(tmp_path, args=["-p", str(root)])
    d.start()
    try:
        r = d.get("/_plugin/s/x.txt")
        assert r.status == 200 and r.body == b"hello\n"
        assert r.headers["x-content-type-options"] == "nosniff"
        r = d.get("/_plugin/s/../../etc/passwd")
        assert r.status in (400, 403, 404) and b"root:" not in r.body
    finally:
        d.close()


# ---------------------------------------------------------------------------
# the plugin contract version
# ---------------------------------------------------------------------------

PLUGIN = '''
from gafferd import Plugin

__all__ = ["P"]


class App:
    def start(self, loop, manager):
        with open(%(marker)r, "a") as f:
            f.write("%(name)s started\\n")


class P(Plugin):
    name = %(name)r
    %(api)s

    def app(self, cfg):
        return App()
'''


def add_plugin(root, name, api_line):
    pkg = root / name / (name + "pkg")
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "main.py").write_text(PLUGIN % {"marker": str(root.parent / "marker"),
                                           "name": name, "api": api_line})


def test_plugin_api_version_is_declared():
    assert gafferd.PLUGIN_API_VERSION in gafferd.PLUGIN_API_VERSIONS
    assert gafferd.Plugin.api == 1
    with open(os.path.join(ROOT, "docs", "plugins.md"), encoding="utf-8") as f:
        doc = f.read()
    assert "PLUGIN_API_VERSION" in doc and "api = " in doc


def test_plugin_with_an_unsupported_api_is_refused_and_the_daemon_serves(tmp_path):
    root = tmp_path / "plugins"
    add_plugin(root, "future", "api = 99")
    add_plugin(root, "weird", 'api = "1"')
    add_plugin(root, "current", "api = %d" % gafferd.PLUGIN_API_VERSION)
    add_plugin(root, "old", "")                 # gaffer 0.4.4 style: no api attribute
    (root / "future" / "index.html").write_text("the plugin's own directory\n")
    d = Daemon(tmp_path, args=["-p", str(root)])
    d.start()
    try:
        marker = tmp_path / "marker"
        wait_for(lambda: marker.exists() and {"current started", "old started"} <=
                 set(marker.read_text().splitlines()), message="supported plugins started")
        assert d.get("/ping").status == 200
        log = wait_for(lambda: "'future'" in d.log() and d.log(), message="refusal logged")
        line = [l for l in log.splitlines() if "'future'" in l][0]
        assert "plugin API version 99" in line and "supports version 1" in line \
            and "dir 'future'" in line, line
        assert any("'weird'" in l and "version '1'" in l for l in log.splitlines()), log
        assert "future started" not in marker.read_text()
        assert "weird started" not in marker.read_text()
        # a refused plugin's directory does not become a site
        assert d.get("/_plugin/future/").status == 404
        assert d.get("/status").status == 200
    finally:
        d.close()


class _Summary:
    def __init__(self, summary):
        self.value = summary

    def summary(self, loop):
        return dict(self.value)


def test_status_body_is_sent_again_only_while_the_status_is_equal():
    # GET /status keeps its last body and sends it again while the status
    # it was made from is equal; any change, the order of the templates
    # included, makes a new one
    templates = {"a": _Summary({"state": "running", "running": 2}),
                 "b": _Summary({"state": "stopped", "running": 0})}
    manager = type("M", (), {"loop": None, "templates": templates})()
    api = gafferd.Api(manager)
    first = api.status_all(None)
    assert first.status == 200 and first.content_type == "application/json; charset=UTF-8"
    again = api.status_all(None)
    assert again.body is first.body
    templates["b"].value = {"state": "stopped", "running": 0, "restarts": 1}
    changed = api.status_all(None).body
    assert b'"restarts": 1' in changed and changed != first.body
    templates["a"] = templates.pop("a")
    assert list(gafferd.json.loads(api.status_all(None).body)) == ["b", "a"]


def test_status_summary_copies_last_exit():
    # the kept body is compared with a new summary: a shared last_exit dict
    # changed in place would look equal and keep an old body
    spec = gafferd.build_spec("t", "sleep 1", {}, base_dir="/")
    t = gafferd.Template(spec, 0.0)
    t.last_exit = {"exit_status": 1}
    summary = t.summary(None)
    assert summary["last_exit"] == {"exit_status": 1}
    assert summary["last_exit"] is not t.last_exit
