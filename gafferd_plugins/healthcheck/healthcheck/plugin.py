"""Active health checks for gafferd templates.

A template whose processes are alive is not always a template that works:
a web server can hang with its pid still there. This plugin probes each
configured template on the daemon's event loop and restarts it (or just
logs) after a number of consecutive failed probes.

Configuration
=============

One ``[healthcheck:NAME]`` section per checked template, in the daemon's
config file; ``NAME`` is the template name (``[process:NAME]``, or a
template created over HTTP later)::

    [healthcheck:web]
    http = http://127.0.0.1:8000/health
    expect_status = 200, 204
    interval = 10
    timeout = 5
    failures = 3
    action = restart
    start_period = 5

Exactly one check type per section:

``http = URL``
    A ``GET`` of an ``http://`` or ``https://`` URL, through
    ``gafferd.http_request`` (non-blocking). Passes when the reply status
    is in ``expect_status`` (a comma- or space-separated list such as
    ``200, 204``; default: any 2xx). Use an IP address or ``localhost``
    in the URL: a name has to be resolved, and name resolution is left
    to ``gafferd.http_request``.
``tcp = HOST:PORT``
    A non-blocking TCP connect (``[::1]:PORT`` for IPv6). Passes when
    the connection is established; it is closed at once. ``HOST`` may be
    an IP address, ``localhost`` (127.0.0.1) or a name, which is resolved
    in a short-lived helper thread so that the loop never blocks.
``command = CMD``
    ``CMD`` is split like a shell would (``shlex.split``, no shell runs)
    and started as a child process in a session of its own, with stdin,
    stdout and stderr on ``/dev/null``. Passes when it exits with status
    0. Whatever is left of its process group when it exits or times out
    is killed.

Common keys:

================ =========== =============================================
key              default     meaning
================ =========== =============================================
``interval``     ``10``      seconds between the starts of two checks
``timeout``      ``5``       seconds before a check that has not answered
                             counts as failed (the connection is closed,
                             the command's process group is killed)
``failures``     ``3``       consecutive failures before the action
``action``       ``restart`` ``restart``: restart the template, then count
                             again from zero; ``log``: log a warning when
                             the threshold is reached, nothing else
``start_period`` ``0``       seconds after a process of the template is
                             spawned during which failures do not count
                             (successes do); ``grace`` is an alias
``expect_status`` any 2xx    ``http`` only: accepted reply statuses
================ =========== =============================================

Durations are decimal seconds (ASCII digits and a decimal point) up to
one week (604800); ``failures`` is a whole number up to 1000000.

Checks run only while the template has running processes; a stopped or
unknown template is not probed and its consecutive-failure count starts
again from zero.

On SIGHUP the plugin's ``restart()`` stops every check and starts them
again from the ``[healthcheck:*]`` sections (the counters of
``/metrics`` are kept). gafferd gives plugins its configuration only
once, through ``Plugin.app(cfg)``; if the manager offers the reloaded
parser as ``manager.cfg``, the new sections are used, otherwise the ones
read at start-up.

A section with an error (no check type, two check types, a number that
does not parse, an unknown action, ...) is logged with a line naming the
section and the key, and that check is skipped; the daemon and the other
checks carry on.

Results
=======

* Every result is published on the manager's event bus as
  ``healthcheck.NAME.ok`` or ``healthcheck.NAME.fail``, with the payload
  ``{"name", "check", "detail", "failures"}`` (``failures`` = consecutive
  failures so far), so ``/watch/healthcheck/NAME`` and webhooks see them.
* ``GET /_plugin/healthcheck/api/status`` returns ``{NAME: {"check",
  "target", "healthy", "consecutive_failures", "last_checked",
  "last_error", "restarts"}}`` (``healthy`` is ``null`` before the first
  result; ``last_checked`` is a Unix time).
* ``/metrics`` gets ``gafferd_healthcheck_up``,
  ``gafferd_healthcheck_consecutive_failures``,
  ``gafferd_healthcheck_failures_total`` and
  ``gafferd_healthcheck_restarts_total``, labelled ``name="NAME"``.
"""
from __future__ import annotations

import errno
import logging
import os
import shlex
import signal
import socket
import subprocess
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import gafferd
from gafferd import Plugin

__all__ = ["HealthcheckPlugin"]

log = logging.getLogger("gafferd.healthcheck")

SECTION_PREFIX = "healthcheck:"
CHECK_TYPES = ("http", "tcp", "command")
ACTIONS = ("restart", "log")
DEFAULTS = {"interval": 10.0, "timeout": 5.0, "failures": 3,
            "action": "restart", "start_period": 0.0}
KNOWN_KEYS = set(CHECK_TYPES) | {"interval", "timeout", "failures", "action",
                                 "start_period", "grace", "expect_status"}


# ---------------------------------------------------------------------------
# Configuration (pure): a [healthcheck:NAME] section -> CheckSpec
# ---------------------------------------------------------------------------

class CheckConfigError(ValueError):
    """A [healthcheck:*] section that cannot be used; the message names it."""


class CheckSpec:
    """What to check, how often, and what to do about failures."""

    def __init__(self, name: str, kind: str, target: str, interval: float,
                 timeout: float, failures: int, action: str,
                 start_period: float, expect_status: Optional[frozenset],
                 address: Optional[Tuple[str, int]] = None,
                 argv: Optional[List[str]] = None) -> None:
        self.name = name
        self.kind = kind
        self.target = target
        self.interval = interval
        self.timeout = timeout
        self.failures = failures
        self.action = action
        self.start_period = start_period
        self.expect_status = expect_status
        self.address = address      # tcp: (host, port)
        self.argv = argv            # command: argument vector


# (minimum, maximum) of each numeric key; durations follow the daemon's
# own limit (gafferd.MAX_DURATION, one week), so no timer ever overflows.
RANGES = {"interval": (0.0, gafferd.MAX_DURATION), "timeout": (0.0, gafferd.MAX_DURATION),
          "start_period": (0.0, gafferd.MAX_DURATION), "failures": (1, gafferd.MAX_COUNT)}


def _parse_number(where: str, key: str, raw: str, integer: bool,
                  minimum: float, strict: bool) -> Any:
    """``raw`` as gafferd reads numbers (ASCII digits, a decimal point for
    durations, finite), at least ``minimum`` (more than it if ``strict``)
    and at most RANGES[key]'s maximum."""
    text = raw.strip()
    maximum = RANGES[key][1]
    try:
        value = (gafferd.parse_int if integer else gafferd.parse_float)(text, None, maximum)
    except ValueError as exc:
        raise CheckConfigError("%s %s: %s" % (where, key, exc))
    if value < minimum or (strict and value == minimum):
        raise CheckConfigError("%s %s: %r must be %s %s" % (
            where, key, raw, "greater than" if strict else "at least", minimum))
    return value


def _parse_tcp(where: str, raw: str) -> Tuple[str, int]:
    text = raw.strip()
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise CheckConfigError("%s tcp: %r is not HOST:PORT" % (where, raw))
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not gafferd.is_ascii_digits(port):
        raise CheckConfigError("%s tcp: port %r is not an integer" % (where, port))
    number = int(port)
    if not 0 < number < 65536:
        raise CheckConfigError("%s tcp: port %d is out of range" % (where, number))
    return host, number


def _parse_statuses(where: str, raw: str) -> frozenset:
    codes = set()
    for word in raw.replace(",", " ").split():
        if not gafferd.is_ascii_digits(word):
            raise CheckConfigError("%s expect_status: %r is not an HTTP status" % (where, word))
        code = int(word)
        if not 100 <= code <= 599:
            raise CheckConfigError("%s expect_status: %d is not an HTTP status" % (where, code))
        codes.add(code)
    if not codes:
        raise CheckConfigError("%s expect_status: empty list" % where)
    return frozenset(codes)


def parse_section(section: str, values: Dict[str, str]) -> Tuple[CheckSpec, List[str]]:
    """Turn one ``[healthcheck:NAME]`` section into a CheckSpec.

    Returns ``(spec, warnings)``; raises CheckConfigError with a message
    that starts with ``[section]``.
    """
    where = "[%s]" % section
    name = section[len(SECTION_PREFIX):].strip()
    if not name:
        raise CheckConfigError("%s: no template name after 'healthcheck:'" % where)
    warnings = ["%s %s: unknown key, ignored (known keys: %s)"
                % (where, key, ", ".join(sorted(KNOWN_KEYS)))
                for key in values if key not in KNOWN_KEYS]
    kinds = [k for k in CHECK_TYPES if (values.get(k) or "").strip()]
    if not kinds:
        raise CheckConfigError("%s: no check: set one of http, tcp or command" % where)
    if len(kinds) > 1:
        raise CheckConfigError("%s: %s: only one check type per section"
                               % (where, " and ".join(kinds)))
    kind = kinds[0]
    target = values[kind].strip()

    def number(key: str, integer: bool, minimum: float, strict: bool) -> Any:
        raw = values.get(key)
        if raw is None or not raw.strip():
            return DEFAULTS[key]
        return _parse_number(where, key, raw, integer, minimum, strict)

    interval = number("interval", False, 0.0, True)
    timeout = number("timeout", False, 0.0, True)
    failures = number("failures", True, 1, False)
    if values.get("start_period") is None and values.get("grace") is not None:
        values = dict(values, start_period=values["grace"])
    start_period = number("start_period", False, 0.0, False)
    action = (values.get("action") or DEFAULTS["action"]).strip().lower()
    if action not in ACTIONS:
        raise CheckConfigError("%s action: %r is not one of %s"
                               % (where, values.get("action"), ", ".join(ACTIONS)))

    expect_status = None
    address = None
    argv = None
    if kind == "http":
        if not target.lower().startswith(("http://", "https://")):
            raise CheckConfigError("%s http: %r is not an http:// or https:// URL"
                                   % (where, target))
        if (values.get("expect_status") or "").strip():
            expect_status = _parse_statuses(where, values["expect_status"])
    elif kind == "tcp":
        address = _parse_tcp(where, target)
    else:
        try:
            argv = shlex.split(target)
        except ValueError as exc:
            raise CheckConfigError("%s command: %r: %s" % (where, target, exc))
        if not argv:
            raise CheckConfigError("%s command: empty command" % where)
    if kind != "http" and (values.get("expect_status") or "").strip():
        warnings.append("%s expect_status: only used by http checks, ignored" % where)
    spec = CheckSpec(name, kind, target, interval, timeout, failures, action,
                     start_period, expect_status, address, argv)
    return spec, warnings


def parse_config(cfg: Any) -> Tuple[List[CheckSpec], List[str], List[str]]:
    """All ``[healthcheck:*]`` sections of ``cfg`` -> (specs, errors, warnings)."""
    specs: List[CheckSpec] = []
    errors: List[str] = []
    warnings: List[str] = []
    if cfg is None:
        return specs, errors, warnings
    seen = set()
    for section in cfg.sections():
        if not section.startswith(SECTION_PREFIX):
            continue
        try:
            values = {key: cfg.get(section, key, raw=True) for key in cfg.options(section)}
            spec, notes = parse_section(section, values)
        except CheckConfigError as exc:
            errors.append(str(exc))
            continue
        except Exception as exc:  # a config object we do not understand
            errors.append("[%s]: %s" % (section, exc))
            continue
        if spec.name in seen:
            errors.append("[%s]: template %r already has a health check"
                          % (section, spec.name))
            continue
        seen.add(spec.name)
        specs.append(spec)
        warnings.extend(notes)
    return specs, errors, warnings


# ---------------------------------------------------------------------------
# Probes (I/O on the loop): one object per check run, reports exactly once
# ---------------------------------------------------------------------------

class _Probe:
    """One run of a check. Calls ``report(ok, detail)`` exactly once.

    Subclasses implement ``begin()`` and ``cleanup()``; ``abort()`` (used
    at stop) releases everything without reporting.
    """

    def __init__(self, loop: Any, spec: CheckSpec,
                 report: Callable[[bool, str], None]) -> None:
        self.loop = loop
        self.spec = spec
        self._report = report
        self.finished = False
        self._deadline = None

    def start(self) -> None:
        self._deadline = self.loop.call_later(self.spec.timeout, self._on_timeout)
        try:
            self.begin()
        except Exception as exc:
            log.exception("healthcheck %s: %s check failed to run", self.spec.name,
                          self.spec.kind)
            self.done(False, "check failed to run: %s" % exc)

    def begin(self) -> None:
        raise NotImplementedError

    def cleanup(self) -> None:
        pass

    def _on_timeout(self) -> None:
        self._deadline = None
        self.done(False, "timed out after %gs" % self.spec.timeout)

    def done(self, ok: bool, detail: str) -> None:
        if self.finished:
            return
        self.finished = True
        self._release()
        self._report(ok, detail)

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self._release()

    def _release(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        try:
            self.cleanup()
        except Exception:
            log.exception("healthcheck %s: cleaning up a %s check", self.spec.name,
                          self.spec.kind)


class _HttpProbe(_Probe):
    """GET the URL with gafferd's non-blocking client."""

    _handle: Any = None

    def begin(self) -> None:
        self._handle = gafferd.http_request(self.loop, "GET", self.spec.target,
                                            timeout=self.spec.timeout,
                                            callback=self._on_reply)

    def _on_reply(self, status: int, body: bytes, error: Optional[str]) -> None:
        if error is not None or not status:
            self.done(False, "GET %s: %s" % (self.spec.target, error or "no reply"))
            return
        expected = self.spec.expect_status
        ok = status in expected if expected else 200 <= status < 300
        self.done(ok, "GET %s: HTTP %d" % (self.spec.target, status))

    def cleanup(self) -> None:
        # gafferd.http_request closes its socket after its own timeout;
        # if it hands back a handle we can close, close it now.
        handle, self._handle = self._handle, None
        if handle is None:
            return
        for method in ("close", "cancel", "abort"):
            fn = getattr(handle, method, None)
            if callable(fn):
                fn()
                break


def _numeric_address(host: str, port: int) -> Optional[Tuple[int, Any]]:
    """(family, sockaddr) for an IP literal or localhost, without DNS."""
    if host.lower() == "localhost":
        host = "127.0.0.1"
    try:
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0,
                                   socket.AI_NUMERICHOST | socket.AI_NUMERICSERV)
    except socket.gaierror:
        return None
    return infos[0][0], infos[0][4]


class _Resolver:
    """Resolve a host name in a helper thread; the result comes back through
    a pipe watched by the loop, so the loop never blocks on DNS.

    The thread owns (and closes) the pipe's write end; the loop side only
    closes the read end, so a late thread can never write to a reused fd.
    """

    def __init__(self, loop: Any, host: str, port: int,
                 callback: Callable[[bool, Any], None]) -> None:
        self.loop = loop
        self._callback = callback
        self._result: Tuple[bool, Any] = (False, "no answer")
        self._rfd, wfd = os.pipe()
        loop.add_reader(self._rfd, self._on_readable)
        thread = threading.Thread(target=self._resolve, args=(host, port, wfd),
                                  name="healthcheck-resolve %s" % host, daemon=True)
        thread.start()

    def _resolve(self, host: str, port: int, wfd: int) -> None:
        try:
            infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
            self._result = (True, (infos[0][0], infos[0][4]))
        except OSError as exc:
            self._result = (False, "cannot resolve %r: %s" % (host, exc))
        try:
            os.write(wfd, b"!")
        except OSError:
            pass  # the loop gave up on us (timeout or stop)
        finally:
            os.close(wfd)

    def _on_readable(self) -> None:
        self.close()
        self._callback(*self._result)

    def close(self) -> None:
        if self._rfd is not None:
            self.loop.remove_reader(self._rfd)
            os.close(self._rfd)
            self._rfd = None


class _TcpProbe(_Probe):
    """Non-blocking connect; writable + SO_ERROR == 0 means it worked."""

    _sock: Optional[socket.socket] = None
    _watching = False
    _resolver: Optional[_Resolver] = None

    def begin(self) -> None:
        host, port = self.spec.address
        address = _numeric_address(host, port)
        if address is None:
            self._resolver = _Resolver(self.loop, host, port, self._on_resolved)
        else:
            self._connect(address)

    def _on_resolved(self, ok: bool, result: Any) -> None:
        self._resolver = None
        if self.finished:
            return
        if ok:
            self._connect(result)
        else:
            self.done(False, result)

    def _connect(self, address: Tuple[int, Any]) -> None:
        family, sockaddr = address
        self._sock = sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        err = sock.connect_ex(sockaddr)
        if err == 0:
            self.done(True, "connected to %s" % self.spec.target)
        elif err in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
            self.loop.add_writer(sock.fileno(), self._on_writable)
            self._watching = True
        else:
            self.done(False, "connect to %s: %s" % (self.spec.target, os.strerror(err)))

    def _on_writable(self) -> None:
        if self.finished or self._sock is None:
            return
        err = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err == 0:
            self.done(True, "connected to %s" % self.spec.target)
        else:
            self.done(False, "connect to %s: %s" % (self.spec.target, os.strerror(err)))

    def cleanup(self) -> None:
        if self._resolver is not None:
            self._resolver.close()
            self._resolver = None
        sock, self._sock = self._sock, None
        if sock is not None:
            if self._watching:
                self.loop.remove_writer(sock.fileno())
                self._watching = False
            sock.close()


class _CommandProbe(_Probe):
    """Run the command in its own session; the daemon reaps it and tells us
    through ``loop.watch_child`` (never ``Popen.wait()``: the daemon's
    reaper would race it)."""

    _popen: Optional[subprocess.Popen] = None
    _exited = False

    def begin(self) -> None:
        try:
            self._popen = subprocess.Popen(
                self.spec.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True)
        except OSError as exc:
            self.done(False, "cannot run %r: %s" % (self.spec.target, exc))
            return
        # The watcher keeps this probe, and so the Popen object, alive until
        # the child is reaped (a collected Popen of a live child would be
        # waited for by subprocess's own clean-up).
        self.loop.watch_child(self._popen.pid, _ChildWatcher(self))

    def before_reap(self, pid: int) -> None:
        # Called by the daemon while the child is a zombie, so its process
        # group id cannot have been reused: kill what the command left
        # behind (background jobs).
        self._kill_group()

    def on_child_exit(self, pid: int, exit_status: int, term_signal: int) -> None:
        self._exited = True
        if self._popen is not None:
            self._popen.returncode = -term_signal if term_signal else exit_status
        if term_signal:
            self.done(False, "%s: killed by signal %d" % (self.spec.target, term_signal))
        elif exit_status:
            self.done(False, "%s: exit status %d" % (self.spec.target, exit_status))
        else:
            self.done(True, "%s: exit status 0" % self.spec.target)

    def _kill_group(self) -> None:
        # The child leads its own session, so its pgid is its pid; until the
        # child is reaped that id cannot name anything else.
        if self._popen is None:
            return
        try:
            os.killpg(self._popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def cleanup(self) -> None:
        if not self._exited:
            self._kill_group()


class _ChildWatcher:
    """The ``loop.watch_child`` callback of a command check, with the
    optional ``before_reap`` hook the daemon calls on the zombie."""

    def __init__(self, probe: _CommandProbe) -> None:
        self.probe = probe

    def before_reap(self, pid: int) -> None:
        self.probe.before_reap(pid)

    def __call__(self, pid: int, exit_status: int, term_signal: int) -> None:
        self.probe.on_child_exit(pid, exit_status, term_signal)


PROBES = {"http": _HttpProbe, "tcp": _TcpProbe, "command": _CommandProbe}


# ---------------------------------------------------------------------------
# One configured check: schedule, results, action
# ---------------------------------------------------------------------------

class Check:
    """Runs one CheckSpec every ``interval`` while its template runs."""

    def __init__(self, app: "HealthcheckApp", spec: CheckSpec) -> None:
        self.app = app
        self.spec = spec
        self.healthy: Optional[bool] = None
        self.consecutive = 0
        self.failures_total = 0
        self.restarts = 0
        self.last_checked: Optional[float] = None
        self.last_error: Optional[str] = None
        self.last_spawn: Optional[float] = None
        self._timer = None
        self._probe: Optional[_Probe] = None
        self._started = 0.0

    # -- life cycle -----------------------------------------------------------
    def start(self) -> None:
        if self.app.running_count(self.spec.name):
            # Already running when we start: the grace period counts from now.
            self.last_spawn = self.app.loop.time()
        self._schedule(self.spec.interval)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.abort()

    def _schedule(self, delay: float) -> None:
        self._timer = self.app.loop.call_later(max(0.0, delay), self._run_check)

    # -- one round --------------------------------------------------------------
    def _run_check(self) -> None:
        self._timer = None
        if not self.app.running_count(self.spec.name):
            self.consecutive = 0
            self._schedule(self.spec.interval)
            return
        self._started = self.app.loop.time()
        probe = PROBES[self.spec.kind](self.app.loop, self.spec, self._on_result)
        self._probe = probe
        probe.start()

    def _in_grace(self) -> bool:
        return (self.spec.start_period > 0 and self.last_spawn is not None
                and self.app.loop.time() - self.last_spawn < self.spec.start_period)

    def _on_result(self, ok: bool, detail: str) -> None:
        self._probe = None
        self.last_checked = time.time()  # shown to people: wall clock
        name = self.spec.name
        if ok:
            if self.healthy is False:
                log.info("healthcheck %s: healthy again (%s)", name, detail)
            self.healthy = True
            self.consecutive = 0
            self._publish("ok", detail)
        elif self._in_grace():
            self.last_error = detail
            log.debug("healthcheck %s: failed during start_period, not counted: %s",
                      name, detail)
        else:
            self.healthy = False
            self.consecutive += 1
            self.failures_total += 1
            self.last_error = detail
            log.info("healthcheck %s: %s check failed (%d/%d): %s", name,
                     self.spec.kind, self.consecutive, self.spec.failures, detail)
            self._publish("fail", detail)
            if self.consecutive >= self.spec.failures:
                self._act(detail)
        self._schedule(self._started + self.spec.interval - self.app.loop.time())

    def _publish(self, outcome: str, detail: str) -> None:
        payload = {"name": self.spec.name, "check": self.spec.kind,
                   "detail": detail, "failures": self.consecutive}
        try:
            self.app.manager.publish("healthcheck.%s.%s" % (self.spec.name, outcome),
                                     payload)
        except Exception:
            log.exception("healthcheck %s: publishing the result", self.spec.name)

    def _act(self, detail: str) -> None:
        name = self.spec.name
        if self.spec.action == "log":
            if self.consecutive == self.spec.failures:
                log.warning("healthcheck %s: %d consecutive failures (last: %s); "
                            "action = log, not restarting", name, self.consecutive, detail)
            return
        log.warning("healthcheck %s: %d consecutive failures (last: %s); "
                    "restarting template %s", name, self.consecutive, detail, name)
        self.consecutive = 0
        try:
            self.app.manager.restart_process(name)
        except Exception:
            log.exception("healthcheck %s: restarting the template failed", name)
        else:
            self.restarts += 1
            # The new processes get their start_period too.
            self.last_spawn = self.app.loop.time()

    def status(self) -> Dict[str, Any]:
        return {"check": self.spec.kind, "target": self.spec.target,
                "healthy": self.healthy, "consecutive_failures": self.consecutive,
                "last_checked": self.last_checked, "last_error": self.last_error,
                "restarts": self.restarts}


# ---------------------------------------------------------------------------
# The application and the plugin class the daemon discovers
# ---------------------------------------------------------------------------

def _label(value: str) -> str:
    """Escape a Prometheus label value."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


METRICS = (
    ("gafferd_healthcheck_up", "gauge",
     "1 if the last health check of the template passed, 0 if it failed.",
     lambda c: None if c.healthy is None else int(c.healthy)),
    ("gafferd_healthcheck_consecutive_failures", "gauge",
     "Consecutive failed health checks of the template.",
     lambda c: c.consecutive),
    ("gafferd_healthcheck_failures_total", "counter",
     "Failed health checks of the template.",
     lambda c: c.failures_total),
    ("gafferd_healthcheck_restarts_total", "counter",
     "Restarts of the template ordered by its health check.",
     lambda c: c.restarts),
)


class HealthcheckApp:
    """The application object: start/stop/restart, routes() and metrics()."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.loop: Any = None
        self.manager: Any = None
        self.checks: Dict[str, Check] = {}

    # -- gafferd application API ------------------------------------------------
    def start(self, loop: Any, manager: Any) -> None:
        self.loop = loop
        self.manager = manager
        specs, errors, warnings = parse_config(self.cfg)
        for message in errors:
            log.error("healthcheck: %s; check skipped", message)
        for message in warnings:
            log.warning("healthcheck: %s", message)
        previous, self.checks = self.checks, {}
        for spec in specs:
            check = Check(self, spec)
            old = previous.get(spec.name)
            if old is not None:  # keep the counters across a SIGHUP
                check.failures_total, check.restarts = old.failures_total, old.restarts
            self.checks[spec.name] = check
        manager.subscribe("spawn", self._on_spawn)
        for check in self.checks.values():
            check.start()
        if self.checks:
            log.info("healthcheck: checking %s", ", ".join(
                "%s (%s %s)" % (c.spec.name, c.spec.kind, c.spec.target)
                for c in self.checks.values()))

    def stop(self) -> None:
        if self.manager is not None:
            self.manager.unsubscribe("spawn", self._on_spawn)
        for check in self.checks.values():
            check.stop()

    def restart(self) -> None:
        """SIGHUP: stop every check and start again (see the module docstring
        about which configuration is used)."""
        self.stop()
        cfg = self._current_config()
        if cfg is not None:
            self.cfg = cfg
        self.start(self.loop, self.manager)

    def _current_config(self) -> Any:
        # The daemon re-reads its config file on SIGHUP; if it exposes the
        # new parser, use it, else keep the one given to Plugin.app().
        for owner in (self.manager,):
            for attr in ("cfg", "config_parser"):
                value = getattr(owner, attr, None)
                if value is not None and hasattr(value, "sections"):
                    return value
        return None

    def routes(self) -> List[Tuple[str, str, Callable]]:
        return [("GET", "status", self._on_status_request)]

    def metrics(self) -> List[str]:
        lines: List[str] = []
        for metric, kind, help_text, value_of in METRICS:
            samples = []
            for name, check in self.checks.items():
                value = value_of(check)
                if value is not None:
                    samples.append('%s{name="%s"} %d' % (metric, _label(name), value))
            if samples:
                lines.append("# HELP %s %s" % (metric, help_text))
                lines.append("# TYPE %s %s" % (metric, kind))
                lines.extend(samples)
        return lines

    # -- helpers -----------------------------------------------------------------
    def running_count(self, name: str) -> int:
        """How many live processes template ``name`` has (0 if unknown)."""
        running = getattr(self.manager, "running", None)
        if running is not None:
            return sum(1 for proc in list(running.values())
                       if getattr(proc, "name", None) == name)
        try:
            return int(self.manager.get_process_status(name).get("running", 0))
        except Exception:
            return 0

    def _on_spawn(self, event: str, payload: Dict[str, Any]) -> None:
        check = self.checks.get(payload.get("name"))
        if check is not None:
            check.last_spawn = self.loop.time()

    def _on_status_request(self, request: Any) -> Tuple[int, Dict[str, Any]]:
        return 200, {name: check.status() for name, check in self.checks.items()}


class HealthcheckPlugin(Plugin):
    name = "healthcheck"
    version = "1.0"
    description = "HTTP, TCP and command health checks that restart templates"

    def app(self, cfg: Any) -> HealthcheckApp:
        return HealthcheckApp(cfg)
