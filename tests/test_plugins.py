"""Plugins: discovery, the Plugin class, applications, sites and the shipped examples.

Every test runs the real ``gafferd.py`` with plugin directories written into
``tmp_path``. The test plugins append lines to a marker file, so that what the
daemon did with them (import, instantiate, app(), start(), stop(), restart())
can be read back; waits poll the file with a deadline.
"""
import email.utils
import mimetypes
import os
import re
import shutil
import signal
import textwrap
import urllib.parse

import pytest

from conftest import (EXAMPLES, PY, ROOT, Daemon, RawClient, http_request_bytes,
                      pid_alive, run_gafferd, wait_for)

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

# A configurable plugin module. The @X@ place-holders are replaced by
# plugin_source(). Every hook appends "TAG hook ..." to the marker file.
PLUGIN_MODULE = r'''
import os
import sys
from @BASE@ import Plugin

__all__ = ["@CLS@"]

MARKER = @MARKER@
TAG = @TAG@
FAIL = @FAIL@


def note(*words):
    with open(MARKER, "a") as f:
        f.write(" ".join([TAG] + [str(w) for w in words]) + "\n")


class App(object):
    def __init__(self):
        self.spawned = []
        self.manager = None

    def start(self, loop, manager):
        self.manager = manager
        note("start", callable(getattr(loop, "call_later", None)),
             callable(getattr(manager, "subscribe", None)))
        if FAIL == "start":
            raise RuntimeError("boom in start of " + TAG)
        manager.subscribe("spawn", self.on_spawn)
        loop.call_later(0.01, note, "timer")

    def on_spawn(self, event, payload):
        self.spawned.append(payload["os_pid"])
        note("spawn", payload["name"], payload["os_pid"])

    def stop(self):
        alive = []
        for pid in self.spawned:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            alive.append(str(pid))
        note("stop", "running=%d" % len(self.manager.running), "alive=" + ",".join(alive))
        if FAIL == "stop":
            raise RuntimeError("boom in stop of " + TAG)

    def restart(self):
        note("restart")
        if FAIL == "restart":
            raise RuntimeError("boom in restart of " + TAG)


class @CLS@(Plugin):
    name = @NAME@
    version = "1.0"
    description = "test plugin " + TAG
    mandatory = @MANDATORY@

    def app(self, cfg):
        note("app", cfg is not None)
        if FAIL == "app":
            raise RuntimeError("boom in app of " + TAG)
        return App()
'''


def plugin_source(marker, tag, name=None, base="gafferd", cls="TestPlugin",
                  fail=None, mandatory=()):
    src = PLUGIN_MODULE
    for key, value in (("@BASE@", base), ("@CLS@", cls), ("@MARKER@", repr(str(marker))),
                       ("@TAG@", repr(tag)), ("@FAIL@", repr(fail)),
                       ("@NAME@", repr(name or tag)), ("@MANDATORY@", repr(list(mandatory)))):
        src = src.replace(key, value)
    return src


def write(path, text, mode="w"):
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, mode) as f:
        f.write(textwrap.dedent(text) if isinstance(text, str) else text)
    return path


def add_plugin(root, plugdir, marker, tag, package=None, module="main", **kw):
    """A plugin directory ``root/plugdir`` holding package ``package``
    (default: same name as the directory) with one plugin module."""
    package = package or plugdir
    base = os.path.join(str(root), plugdir, package)
    write(os.path.join(base, "__init__.py"), "")
    write(os.path.join(base, module + ".py"), plugin_source(marker, tag, **kw))
    return os.path.join(str(root), plugdir)


def lines_of(marker):
    try:
        with open(str(marker)) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def wait_line(marker, line, timeout=10.0):
    return wait_for(lambda: line in lines_of(marker), timeout,
                    message="marker line %r (have %r)" % (line, lines_of(marker)))


def tags_started(marker):
    return sorted(l.split()[0] for l in lines_of(marker) if l.split()[1:2] == ["start"])


def error_lines(daemon, *needles):
    """Log lines at ERROR level (or above) that contain one of ``needles``."""
    return [l for l in daemon.log().splitlines()
            if re.search(r"\b(ERROR|CRITICAL)\b", l) and any(n in l for n in needles)]


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "marker.txt"


@pytest.fixture
def root(tmp_path):
    path = tmp_path / "plugins"
    path.mkdir()
    return path


def start_daemon(tmp_path, config=None, args=(), **kw):
    d = Daemon(tmp_path, config, args=args, **kw)
    started.append(d)
    d.start()
    return d


started = []


@pytest.fixture(autouse=True)
def _cleanup_daemons():
    yield
    while started:
        started.pop().close()


IDLE = "import time\nwhile True:\n    time.sleep(1000)\n"


# ---------------------------------------------------------------------------
# discovery
# ---------------------------------------------------------------------------

def test_package_of_any_name_is_imported(tmp_path, root, marker):
    # 0.4.4 only found packages named like their plugin directory.
    add_plugin(root, "alpha", marker, "zeta", package="zeta_pkg")
    add_plugin(root, "same", marker, "same")
    start_daemon(tmp_path, args=["-p", str(root)])
    wait_line(marker, "zeta start True True")
    wait_line(marker, "same start True True")
    # app() runs before start(), and gets None without a config file
    lines = lines_of(marker)
    assert lines.index("zeta app False") < lines.index("zeta start True True")


def test_every_top_level_module_is_scanned_but_not_subpackages(tmp_path, root, marker):
    base = root / "multi" / "pkg"
    write(base / "__init__.py", "")
    write(base / "one.py", plugin_source(marker, "one", cls="One"))
    write(base / "two.py", plugin_source(marker, "two", cls="Two"))
    # a module without __all__ contributes nothing, even with a Plugin subclass
    write(base / "three.py", plugin_source(marker, "three", cls="Three")
          .replace('__all__ = ["Three"]', '__plugins__ = ["Three"]'))
    # sub-packages are not scanned: importing deep.py would write a line
    write(base / "sub" / "__init__.py", "")
    write(base / "sub" / "deep.py", "open(%r, 'a').write('deep imported\\n')\n" % str(marker)
          + plugin_source(marker, "deep", cls="Deep"))
    start_daemon(tmp_path, args=["-p", str(root)])
    wait_line(marker, "one start True True")
    wait_line(marker, "two start True True")
    d_lines = lines_of(marker)
    assert not [l for l in d_lines if l.startswith(("three", "deep"))], d_lines


def test_all_entries_plugin_subclasses_instantiated_others_skipped(tmp_path, root, marker):
    base = root / "mixed" / "mixedpkg"
    write(base / "__init__.py", "")
    write(base / "plugins.py", plugin_source(marker, "first", cls="First") + r'''

__all__ = ["helper", "CONST", "NotAPlugin", "First", "Second", "an_instance", "NUMBERS"]

def helper():
    note("helper called")

CONST = "just a string"
NUMBERS = [1, 2, 3]

class NotAPlugin(object):
    def __init__(self):
        note("NotAPlugin instantiated")

_first_init = First.__init__

def _counting_init(self):
    note("instantiated", type(self).__name__)

First.__init__ = _counting_init

class Second(First):
    name = "second"

    def app(self, cfg):
        note("second-app")
        return App()

an_instance = object.__new__(First)   # an instance, not a class: skipped
''')
    start_daemon(tmp_path, args=["-p", str(root)])
    wait_line(marker, "first start True True")
    wait_for(lambda: lines_of(marker).count("first start True True") == 2,
             message="two applications started (First and Second)")
    got = lines_of(marker)
    assert got.count("first instantiated First") == 1, got
    assert got.count("first instantiated Second") == 1, got
    assert "first second-app" in got
    assert not [l for l in got if "helper" in l or "NotAPlugin" in l], got


def test_module_without_all_is_ignored_and_its_site_is_served(tmp_path, root, marker):
    # examples/plugins/dummy1: __plugins__ instead of __all__
    base = root / "dummy1"
    write(base / "_site" / "index.html", "hello dummy1\n")
    write(base / "dummy1" / "__init__.py", "")
    write(base / "dummy1" / "main.py", plugin_source(marker, "dummy1")
          .replace("__all__ =", "__plugins__ ="))
    add_plugin(root, "other", marker, "other")
    d = start_daemon(tmp_path, args=["-p", str(root)])
    wait_line(marker, "other start True True")
    r = d.get("/_plugin/dummy1/")
    assert r.status == 200 and r.body == b"hello dummy1\n", r
    assert not [l for l in lines_of(marker) if l.startswith("dummy1")]


def test_several_plugin_directories_and_files_in_the_root_ignored(tmp_path, root, marker):
    for tag in ("aa", "bb", "cc"):
        add_plugin(root, tag, marker, tag)
    # a file in the root is not a plugin directory
    write(root / "stray.py", "open(%r, 'a').write('stray imported\\n')\n" % str(marker))
    write(root / "README", "not a plugin\n")
    start_daemon(tmp_path, args=["-p", str(root)])
    wait_for(lambda: tags_started(marker) == ["aa", "bb", "cc"], message="three plugins")
    assert "stray imported" not in lines_of(marker)


def test_several_plugin_roots_in_plugins_dir(tmp_path, marker):
    add_plugin(tmp_path / "one", "p1", marker, "p1")
    add_plugin(tmp_path / "two", "p2", marker, "p2")
    start_daemon(tmp_path, "[gaffer]\nplugins_dir = one two\n")
    wait_for(lambda: tags_started(marker) == ["p1", "p2"], message="plugins of both roots")


def test_missing_plugin_root_is_not_an_error(tmp_path):
    d = start_daemon(tmp_path, args=["-p", str(tmp_path / "does-not-exist")])
    assert d.get("/").status == 200
    assert not error_lines(d, "plugin")


# -- choosing the plugin root ------------------------------------------------

def test_plugins_dir_in_config_wins_over_p(tmp_path, marker):
    add_plugin(tmp_path / "fromcfg", "c", marker, "cfg")
    add_plugin(tmp_path / "fromcli", "c", marker, "cli")
    start_daemon(tmp_path, "[gaffer]\nplugins_dir = fromcfg\n",
                 args=["-p", str(tmp_path / "fromcli")])
    wait_line(marker, "cfg start True True")
    assert tags_started(marker) == ["cfg"]


def test_plugin_dir_spelling_is_accepted(tmp_path, marker):
    add_plugin(tmp_path / "fromcfg", "c", marker, "cfg")
    add_plugin(tmp_path / "fromcli", "c", marker, "cli")
    start_daemon(tmp_path, "[gaffer]\nplugin_dir = fromcfg\n",
                 args=["-p", str(tmp_path / "fromcli")])
    wait_line(marker, "cfg start True True")
    assert tags_started(marker) == ["cfg"]


def test_p_is_used_when_the_config_names_no_plugin_dir(tmp_path, marker):
    home = tmp_path / "home"
    add_plugin(home / ".gafferd" / "plugins", "h", marker, "home")
    add_plugin(tmp_path / "fromcli", "c", marker, "cli")
    start_daemon(tmp_path, "[gaffer]\n", args=["-p", "fromcli"], env={"HOME": str(home)})
    wait_line(marker, "cli start True True")
    assert tags_started(marker) == ["cli"]


def test_default_plugin_dir_is_home_gafferd_plugins(tmp_path, marker):
    home = tmp_path / "home"
    add_plugin(home / ".gafferd" / "plugins", "h", marker, "home")
    start_daemon(tmp_path, env={"HOME": str(home)})
    wait_line(marker, "home start True True")


def test_tilde_in_plugins_dir_is_expanded(tmp_path, marker):
    home = tmp_path / "home"
    add_plugin(home / "myplugins", "h", marker, "tilde")
    start_daemon(tmp_path, "[gaffer]\nplugins_dir = ~/myplugins\n", env={"HOME": str(home)})
    wait_line(marker, "tilde start True True")


def test_relative_plugins_dir_is_relative_to_the_config_file(tmp_path, marker):
    conf_dir = tmp_path / "conf"
    add_plugin(conf_dir / "plugs", "p", marker, "confdir")
    add_plugin(tmp_path / "plugs", "p", marker, "cwd")   # the daemon's cwd: wrong one
    conf = write(conf_dir / "gaffer.ini", "[gaffer]\nplugins_dir = plugs\n")
    start_daemon(tmp_path, args=["-c", conf])
    wait_line(marker, "confdir start True True")
    assert tags_started(marker) == ["confdir"]


# ---------------------------------------------------------------------------
# import compatibility: one Plugin class for gafferd, gaffer and __main__
# ---------------------------------------------------------------------------

def test_gafferd_and_gaffer_imports_give_the_daemon_class(tmp_path, root, marker):
    add_plugin(root, "new", marker, "new", base="gafferd")
    add_plugin(root, "old", marker, "old", base="gaffer")
    write(root / "ident" / "identpkg" / "__init__.py", "")
    write(root / "ident" / "identpkg" / "check.py", r'''
        import sys
        import gaffer
        import gafferd
        with open(%r, "a") as f:
            f.write("identity %%s %%s\n" %% (
                gaffer.Plugin is gafferd.Plugin,
                getattr(sys.modules.get("__main__"), "Plugin", None) is gafferd.Plugin))
        ''' % str(marker))
    start_daemon(tmp_path, args=["-p", str(root)])
    wait_for(lambda: tags_started(marker) == ["new", "old"], message="both plugins")
    assert "identity True True" in lines_of(marker)


# ---------------------------------------------------------------------------
# application life cycle
# ---------------------------------------------------------------------------

def test_start_stop_restart_of_plugin_applications(tmp_path, root, marker):
    add_plugin(root, "life", marker, "life")
    write(tmp_path / "idle.py", IDLE)
    d = start_daemon(tmp_path, """
        [process:sleeper]
        cmd = %s idle.py
        """ % PY, args=["-p", str(root)])
    wait_line(marker, "life start True True")   # loop has call_later, manager subscribe
    wait_line(marker, "life timer")             # a timer set in start() fired
    d.wait_running("sleeper", 1)
    os_pid = d.os_pid(d.pids("sleeper")[0])
    # spawn events reach plugin subscribers (possibly already sent before start)
    d.post("/processes/sleeper/_restart")
    seen = []                     # the OS pids of one /status reply per probe

    def replaced():
        seen.append([p["os_pid"] for p in d.status("sleeper")["processes"] if p["os_pid"]])
        return seen[-1] and os_pid not in seen[-1]
    wait_for(replaced, message="sleeper restarted")
    (new_pid,) = seen[-1]
    wait_line(marker, "life spawn sleeper %d" % new_pid)

    d.signal(signal.SIGHUP)
    wait_line(marker, "life restart")
    assert d.get("/").status == 200

    assert d.stop() == 0
    got = lines_of(marker)
    # stop() is called once, after every process has gone
    stops = [l for l in got if l.startswith("life stop")]
    assert stops == ["life stop running=0 alive="], got
    assert not pid_alive(new_pid)
    assert got.index("life app True") < got.index("life start True True")


# ---------------------------------------------------------------------------
# failure modes: logged with the plugin's name and a traceback, others go on
# ---------------------------------------------------------------------------

def test_plugin_import_errors_are_logged_and_skipped(tmp_path, root, marker):
    write(root / "brokendir" / "brokenpkg" / "__init__.py", "")
    write(root / "brokendir" / "brokenpkg" / "main.py",
          "import nosuchmodule_for_gafferd_test\n")
    write(root / "syntaxdir" / "syntaxpkg" / "__init__.py", "")
    write(root / "syntaxdir" / "syntaxpkg" / "main.py", "def broken(:\n")
    write(root / "raisedir" / "raisepkg" / "__init__.py", "")
    write(root / "raisedir" / "raisepkg" / "main.py", "raise RuntimeError('boom at import')\n")
    add_plugin(root, "good", marker, "good")
    d = start_daemon(tmp_path, args=["-p", str(root)])
    wait_line(marker, "good start True True")
    assert d.get("/").status == 200
    log = d.log()
    assert "Traceback" in log
    for names, message in ((("brokendir", "brokenpkg"), "nosuchmodule_for_gafferd_test"),
                           (("syntaxdir", "syntaxpkg"), "SyntaxError"),
                           (("raisedir", "raisepkg"), "boom at import")):
        assert error_lines(d, *names), "no ERROR line naming %s:\n%s" % (names, log)
        assert message in log


@pytest.mark.parametrize("hook", ["app", "start", "stop", "restart"])
def test_plugin_hook_raising_is_logged_and_daemon_carries_on(tmp_path, root, marker, hook):
    add_plugin(root, "baddir", marker, "bad", name="badplug", fail=hook)
    add_plugin(root, "good", marker, "good")
    d = start_daemon(tmp_path, args=["-p", str(root)])
    wait_line(marker, "good start True True")
    wait_line(marker, "good timer")

    def logged():
        log = d.log()
        return (error_lines(d, "badplug", "baddir") and "Traceback" in log
                and "boom in %s of bad" % hook in log)

    if hook in ("app", "start"):
        wait_for(logged, message="the failing %s() to be logged" % hook)
        if hook == "app":
            assert not [l for l in lines_of(marker) if l.startswith("bad start")]
    d.signal(signal.SIGHUP)
    wait_line(marker, "good restart")
    if hook == "restart":
        wait_line(marker, "bad restart")
        wait_for(logged, message="the failing restart() to be logged")
    assert d.get("/").status == 200
    assert d.proc.poll() is None
    assert d.stop() == 0
    assert "good stop running=0 alive=" in lines_of(marker)
    if hook == "stop":
        assert "bad stop running=0 alive=" in lines_of(marker)
        assert logged(), d.log()


def test_missing_mandatory_plugin_refuses_to_start(tmp_path, root, marker):
    add_plugin(root, "y", marker, "x", mandatory=["somedep"])
    add_plugin(root, "other", marker, "other")
    r = run_gafferd(["-p", str(root), "--bind", "127.0.0.1:0"], cwd=str(tmp_path), timeout=20)
    assert r.returncode == 2, (r.returncode, r.stderr)
    expected = "plugin 'x' (dir 'y') requires 'somedep', which is not installed"
    assert [l for l in r.stderr.splitlines() if l.endswith(expected)], r.stderr
    assert "Traceback" not in r.stderr
    assert "ready" not in r.stderr
    # refused before any application started
    assert not [l for l in lines_of(marker) if " start " in l + " "]


def test_mandatory_plugin_present_is_fine(tmp_path, root, marker):
    add_plugin(root, "y", marker, "x", mandatory=["somedep"])
    add_plugin(root, "z", marker, "dep", name="somedep")
    start_daemon(tmp_path, args=["-p", str(root)])
    wait_for(lambda: tags_started(marker) == ["dep", "x"], message="both plugins started")


# ---------------------------------------------------------------------------
# plugin HTTP routes under /_plugin/<dir>/api/
# ---------------------------------------------------------------------------

ROUTED = r'''
import json
from gafferd import Plugin

__all__ = ["RoutedPlugin"]


class RoutedApp(object):
    def __init__(self):
        self.items = []

    def start(self, loop, manager):
        pass

    def stop(self):
        pass

    def restart(self):
        pass

    def routes(self):
        return [
            ("GET", r"echo/(\w+)", self.echo),
            ("GET", "items", self.list_items),
            ("POST", "items", self.add_item),
            ("GET", "text", lambda request: (200, "plain text")),
            ("GET", "bytes", lambda request: (201, b"\x00\x01raw")),
            ("GET", "boom", self.boom),
        ]

    def echo(self, request, word):
        return 200, {"word": word, "query": request.query, "method": request.method,
                     "x_test": request.headers.get("x-test")}

    def list_items(self, request):
        return 200, self.items

    def add_item(self, request):
        self.items.append(json.loads(request.body.decode("utf-8")))
        return 201, {"ok": True, "count": len(self.items)}

    def boom(self, request):
        raise RuntimeError("boom in route")


class RoutedPlugin(Plugin):
    name = "routed"

    def app(self, cfg):
        return RoutedApp()
'''


def test_plugin_routes(tmp_path, root):
    write(root / "apidir" / "routedpkg" / "__init__.py", "")
    write(root / "apidir" / "routedpkg" / "main.py", ROUTED)
    d = start_daemon(tmp_path, args=["-p", str(root)])
    base = "/_plugin/apidir/api/"
    r = d.get(base + "echo/hello?a=1&a=2&b=x", headers={"X-Test": "yes"})
    assert r.status == 200, r
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == {"word": "hello", "query": {"a": "2", "b": "x"}, "method": "GET",
                        "x_test": "yes"}
    # the pattern must match the whole rest of the path
    assert d.get(base + "echo/hello/more").status == 404
    assert d.get(base + "echo/").status == 404
    assert d.get(base + "nothing").status == 404
    assert d.get("/_plugin/apidir/api").status == 404

    r = d.post(base + "items", body=b'{"n": 1}', headers={"Content-Type": "application/json"})
    assert r.status == 201 and r.json() == {"ok": True, "count": 1}, r
    assert d.json("GET", base + "items") == [{"n": 1}]
    assert d.request("DELETE", base + "items").status in (404, 405)

    r = d.get(base + "text")
    assert r.status == 200 and r.body == b"plain text", r
    r = d.get(base + "bytes")
    assert r.status == 201 and r.body == b"\x00\x01raw", r

    r = d.get(base + "boom")
    assert r.status == 500, r
    assert r.json()["error"] == "internal_error"
    assert "boom in route" in d.log() and "Traceback" in d.log()
    assert d.get(base + "text").status == 200   # still serving


# ---------------------------------------------------------------------------
# site plugins (static files under /_plugin/DIR/)
# ---------------------------------------------------------------------------

SECRET = "TOPSECRET-4f1c9"
PRIVATE = "PRIVATE-77a2e"


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    """One daemon serving a few sites, with secrets just outside them."""
    tmp = tmp_path_factory.mktemp("sites")
    root = tmp / "plugins"
    site = root / "site" / "_site"
    write(tmp / "secret.txt", SECRET + "\n")
    write(tmp / "outside" / "secret.txt", SECRET + " in dir\n")
    write(root / "site" / "private.txt", PRIVATE + "\n")   # plugin dir, outside _site
    write(site / "index.html", "<h1>site index</h1>\n")
    write(site / "style.css", "h1 { color: red }\n")
    write(site / "app.js", "console.log('hi');\n")
    write(site / "data.json", '{"a": 1}\n')
    write(site / "notes.txt", "plain notes\n")
    write(site / "logo.svg", "<svg xmlns='http://www.w3.org/2000/svg'/>\n")
    write(site / "pixel.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)), mode="wb")
    write(site / "sub" / "index.html", "sub index\n")
    write(site / "sub" / "ok.txt", "ok text\n")
    write(site / "cache.txt", "version one\n")
    os.symlink(str(tmp / "secret.txt"), str(site / "link"))
    os.symlink(str(tmp / "outside"), str(site / "linkdir"))
    write(root / "hello" / "index.html", "hello world\n")       # only index.html
    # a directory with a plugin class and index.html but no _site: not a site
    write(root / "withclass" / "index.html", "should not be served\n")
    write(root / "withclass" / "wcpkg" / "__init__.py", "")
    write(root / "withclass" / "wcpkg" / "main.py", plugin_source(tmp / "marker", "wc"))
    d = Daemon(tmp, args=["-p", str(root)])
    d.start()
    d.tmp = tmp
    d.root = root
    d.site = site
    yield d
    d.close()


def test_site_index_and_files(sites):
    r = sites.get("/_plugin/site/")
    assert r.status == 200 and r.body == b"<h1>site index</h1>\n", r
    assert r.headers["content-type"].startswith("text/html")
    r = sites.get("/_plugin/site/index.html")
    assert r.status == 200 and r.body == b"<h1>site index</h1>\n", r
    r = sites.get("/_plugin/site/sub/")
    assert r.status == 200 and r.body == b"sub index\n", r
    r = sites.get("/_plugin/site/sub/ok.txt")
    assert r.status == 200 and r.body == b"ok text\n", r
    r = sites.get("/_plugin/site/pixel.png")
    assert r.status == 200 and r.body == b"\x89PNG\r\n\x1a\n" + bytes(range(256))
    assert r.headers["content-length"] == str(len(r.body))


def test_site_directory_without_slash_redirects(sites):
    r = sites.get("/_plugin/site/sub")
    assert r.status == 302, r
    assert urllib.parse.urlsplit(r.headers["location"]).path == "/_plugin/site/sub/"
    # the plugin root itself without its slash does not match the route
    assert sites.get("/_plugin/site").status == 404


def test_site_not_found(sites):
    assert sites.get("/_plugin/site/nope.html").status == 404
    assert sites.get("/_plugin/site/sub/nope/").status == 404
    assert sites.get("/_plugin/nosuchplugin/").status == 404


def test_site_plugin_with_only_index_html(sites):
    r = sites.get("/_plugin/hello/")
    assert r.status == 200 and r.body == b"hello world\n", r
    assert r.headers["content-type"].startswith("text/html")


def test_index_html_is_not_a_site_when_the_directory_has_a_plugin_class(sites):
    r = sites.get("/_plugin/withclass/")
    assert r.status == 404, r
    assert b"should not be served" not in r.body


@pytest.mark.parametrize("filename", ["index.html", "style.css", "app.js", "data.json",
                                      "notes.txt", "logo.svg", "pixel.png"])
def test_site_content_type(sites, filename):
    r = sites.get("/_plugin/site/" + filename)
    assert r.status == 200, r
    expected = mimetypes.guess_type(filename)[0]
    assert expected
    assert r.headers["content-type"].split(";")[0].strip() == expected


def test_site_head(sites):
    r = sites.request("HEAD", "/_plugin/site/style.css")
    assert r.status == 200 and r.body == b""
    assert r.headers["content-length"] == str(len(b"h1 { color: red }\n"))
    assert r.headers["content-type"].startswith("text/css")


def test_site_caching_headers(sites):
    path = sites.site / "cache.txt"
    os.utime(str(path), (1500000000, 1500000000))
    r = sites.get("/_plugin/site/cache.txt")
    assert r.status == 200 and r.body == b"version one\n"
    assert r.headers["last-modified"] == email.utils.formatdate(1500000000, usegmt=True)
    etag = r.headers["etag"]
    assert etag

    r = sites.get("/_plugin/site/cache.txt", headers={"If-None-Match": etag})
    assert r.status == 304 and r.body == b"", r
    r = sites.get("/_plugin/site/cache.txt",
                  headers={"If-Modified-Since": email.utils.formatdate(1500000000, usegmt=True)})
    assert r.status == 304 and r.body == b"", r
    r = sites.get("/_plugin/site/cache.txt",
                  headers={"If-Modified-Since": email.utils.formatdate(1400000000, usegmt=True)})
    assert r.status == 200 and r.body == b"version one\n", r
    r = sites.get("/_plugin/site/cache.txt", headers={"If-None-Match": '"not-the-etag"'})
    assert r.status == 200, r

    # files are read on every request: a change is served at once, with a new ETag
    write(path, "version two, longer\n")
    os.utime(str(path), (1600000000, 1600000000))
    r = sites.get("/_plugin/site/cache.txt", headers={"If-None-Match": etag})
    assert r.status == 200 and r.body == b"version two, longer\n", r
    assert r.headers["etag"] != etag
    assert r.headers["last-modified"] == email.utils.formatdate(1600000000, usegmt=True)


def test_site_added_while_the_daemon_runs(sites):
    assert sites.get("/_plugin/late/").status == 404
    write(sites.root / "late" / "_site" / "index.html", "late site\n")
    write(sites.root / "latehello" / "index.html", "late hello\n")
    r = wait_for(lambda: (lambda r: r if r.status == 200 else None)(sites.get("/_plugin/late/")),
                 message="the new site to be served")
    assert r.body == b"late site\n"
    r = sites.get("/_plugin/latehello/")
    assert r.status == 200 and r.body == b"late hello\n", r


# Path-traversal attempts; {secret} is the absolute path of the secret file.
TRAVERSALS = [
    "/_plugin/site/../secret.txt",
    "/_plugin/site/../../secret.txt",
    "/_plugin/site/../private.txt",
    "/_plugin/site/sub/../../private.txt",
    "/_plugin/site/sub/../../../secret.txt",
    "/_plugin/site/%2e%2e/private.txt",
    "/_plugin/site/%2e%2e/%2e%2e/secret.txt",
    "/_plugin/site/%2E%2E%2Fprivate.txt",
    "/_plugin/site/%2E%2E%2F%2E%2E%2Fsecret.txt",
    "/_plugin/site/..%2fprivate.txt",
    "/_plugin/site/..%2f..%2fsecret.txt",
    "/_plugin/site/.%2e/private.txt",
    "/_plugin/site/%2e./%2e./secret.txt",
    "/_plugin/site/%252e%252e/private.txt",
    "/_plugin/site/%252e%252e%252fprivate.txt",
    "/_plugin/site/sub/%2e%2e/%2e%2e/%2e%2e/secret.txt",
    "/_plugin/site/..\\private.txt",
    "/_plugin/site/..%5cprivate.txt",
    "/_plugin/site/..%5c..%5csecret.txt",
    "/_plugin/site/index.html%00../../secret.txt",
    "/_plugin/site/%00",
    "/_plugin/site/..%00/private.txt",
    "/_plugin/site//etc/passwd",
    "/_plugin/site/%2fetc%2fpasswd",
    "/_plugin/site/{secret}",
    "/_plugin/site/%2F{secret_q}",
    "/_plugin/site/....//private.txt",
    "/_plugin/site/link",
    "/_plugin/site/linkdir/secret.txt",
    "/_plugin/site/linkdir/",
    "/_plugin/%2e%2e/secret.txt",
    "/_plugin/..%2fsecret.txt/",
    "/_plugin/site/sub/..%2f..%2f..%2fsecret.txt",
]


# Paths that are not valid UTF-8 once decoded (overlong encodings of "."):
# a 400 is a fine answer too, as long as nothing is served.
MALFORMED = [
    "/_plugin/site/%c0%ae%c0%ae/private.txt",
    "/_plugin/site/%c0%ae%c0%ae/%c0%ae%c0%ae/secret.txt",
    "/_plugin/site/%e0%80%ae%e0%80%ae/private.txt",
]


@pytest.mark.parametrize("path", TRAVERSALS + MALFORMED)
def test_site_path_traversal_is_refused(sites, path):
    allowed = (400, 403, 404) if path in MALFORMED else (403, 404)
    secret = str(sites.tmp / "secret.txt")
    path = path.format(secret=secret, secret_q=urllib.parse.quote(secret.lstrip("/"), safe=""))
    with RawClient(sites.port) as c:
        c.send(http_request_bytes("GET", path, host="127.0.0.1:%d" % sites.port,
                                  headers=[("Connection", "close")]))
        try:
            r = c.read_response()
        except EOFError:
            r = None
        data = c.buf + (r.raw if r is not None else b"")
    assert r is not None, "no response to %r" % path
    assert r.status in allowed, (path, r)
    for forbidden in (SECRET, PRIVATE, "root:"):
        assert forbidden.encode() not in data, (path, data[:300])


def test_site_traversal_positive_control(sites):
    # the same raw client gets ordinary nested files: the table above is not
    # passing merely because everything under the site is refused
    with RawClient(sites.port) as c:
        r = c.request(http_request_bytes("GET", "/_plugin/site/sub/ok.txt",
                                         host="127.0.0.1:%d" % sites.port))
    assert r.status == 200 and r.body == b"ok text\n", r


# ---------------------------------------------------------------------------
# authentication applies to sites and plugin routes
# ---------------------------------------------------------------------------

def test_sites_and_plugin_routes_obey_token_auth(tmp_path, root):
    import base64
    write(root / "hello" / "index.html", "hello world\n")
    write(root / "apidir" / "routedpkg" / "__init__.py", "")
    write(root / "apidir" / "routedpkg" / "main.py", ROUTED)
    d = start_daemon(tmp_path, "[gaffer]\nauth_token = s3cret-token\n", args=["-p", str(root)])
    for path in ("/_plugin/hello/", "/_plugin/hello/index.html", "/_plugin/apidir/api/text"):
        r = d.get(path)
        assert r.status == 401, (path, r)
        assert "www-authenticate" in r.headers
        assert b"hello world" not in r.body and b"plain text" not in r.body
        r = d.get(path, headers={"Authorization": "Bearer wrong"})
        assert r.status == 401, (path, r)
        r = d.get(path, headers={"Authorization": "Bearer s3cret-token"})
        assert r.status == 200, (path, r)
        basic = base64.b64encode(b":s3cret-token").decode()
        r = d.get(path, headers={"Authorization": "Basic " + basic})
        assert r.status == 200, (path, r)
    r = d.get("/_plugin/hello/", headers={"Authorization": "Bearer s3cret-token"})
    assert r.body == b"hello world\n"


# ---------------------------------------------------------------------------
# the shipped examples: cd examples && gafferd.py -c gaffer.ini -p plugins/
# ---------------------------------------------------------------------------

def test_example_plugins(tmp_path):
    work = tmp_path / "tree"
    shutil.copytree(EXAMPLES, str(work / "examples"), symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    if os.path.isdir(os.path.join(ROOT, "gafferd_plugins")):
        # examples/gaffer.ini may load ../gafferd_plugins too
        shutil.copytree(os.path.join(ROOT, "gafferd_plugins"), str(work / "gafferd_plugins"),
                        ignore=shutil.ignore_patterns("__pycache__"))
    ini = work / "examples" / "gaffer.ini"
    text = ini.read_text()
    assert re.search(r"(?m)^\s*bind\s*=", text)
    ini.write_text(re.sub(r"(?m)^(\s*bind\s*=\s*)\S+", r"\g<1>127.0.0.1:0", text))
    d = Daemon(work / "examples", args=["-c", "gaffer.ini", "-p", "plugins/"], bind=False)
    started.append(d)
    d.start()
    for path, text in (("/_plugin/dummy/", b"hello dummy"),
                       ("/_plugin/dummy1/", b"hello dummy1"),
                       ("/_plugin/hello/", b"hello world")):
        r = d.get(path)
        assert r.status == 200, (path, r)
        assert r.body.strip() == text, (path, r.body)
    wait_for(lambda: "start dummy app" in d.output(), message="the dummy app to start")
    # the documented example plugin with a route of its own
    r = d.get("/_plugin/ticker/api/count")
    assert r.status == 200 and isinstance(r.json()["events"], int), r
    # the shipped plugins are loaded too (plugins_dir names ../gafferd_plugins)
    r = d.get("/_plugin/healthcheck/api/status")
    assert r.status == 200 and r.json() == {}, r
    d.signal(signal.SIGHUP)
    wait_for(lambda: "restart dummy" in d.output(), message="the dummy app to restart")
    assert d.stop() == 0
    assert "stop dummy" in d.output()
