#!/usr/bin/env python3
"""gafferd: a process supervisor in one file, controlled over HTTP/JSON.

Usage::

    python3 gafferd.py ctl [-c CONFIG | --url URL] COMMAND [ARGS]   (the client, §14)
    python3 gafferd.py [-c CONFIG] [-p PLUGINS_DIR] [-v | -vv] [--daemon]
                       [--pidfile FILE] [--log-file FILE] [--bind ADDR] [--certfile F]
                       [--keyfile F] [--backlog N] [--check] [--version]
                       [config]

gafferd starts the programs named in an INI file, keeps them running,
and lets you start, stop, scale and watch them with curl.  It speaks
the HTTP API of gaffer 0.4.4 (``GET /`` still says ``"version":
"0.4.4"``), with that version's known defects fixed, and needs nothing
but the Python standard library (CPython 3.8 and newer).

Contents (``grep -n '^# §' gafferd.py`` prints this outline)
    § 1  constants and small helpers    limits, sizes, JSON, time formats
    § 2  errors                         ConfigError, ApiError, HttpError
    § 3  configuration (pure)           INI -> TemplateSpec / EndpointSpec / SocketSpec, schedules
    § 4  process policy (pure)          lifecycle table, restart policy, rings, /proc
    § 5  events (pure)                  pattern matching and the event bus
    § 6  HTTP/1.1 protocol (pure)       request parser, responses, websocket
    § 7  event loop (I/O)               selector, timers, signals, children
    § 8  processes (I/O)                spawning, pipes, log files, readiness, rollouts,
                                        the manager
    § 9  HTTP client and webhooks (I/O) non-blocking client, DNS, tcp:/http: checks, webhooks
    § 10 plugins                        Plugin, discovery, sites, routes
    § 11 HTTP API                       the route table and its handlers
    § 12 HTTP server (I/O)              listeners, connections, streaming, held sockets
    § 13 console output                 -v and -vv
    § 14 command-line client (ctl)      gafferd.py ctl: commands, feeds, top
    § 15 daemon and command line        signals, reload, pidfile, sd_notify, main()

Architecture
    One thread runs one ``Loop`` (§7): a ``selectors`` selector over child
    pipes, HTTP sockets and a socketpair that ``signal.set_wakeup_fd``
    writes signal numbers to.  The loop sleeps until the next timer or
    I/O event; it never polls on a tick.  Signal handlers do nothing but
    wake the loop; the signal number read from the socketpair is looked
    up in a table (§15).  SIGCHLD reaps every child with
    ``waitpid(-1, WNOHANG)``.  The ``Manager`` (§8) owns templates and
    processes; each process fills a slot whose lifecycle is the pure
    table of §4 (the manager feeds it events and performs its actions).
    The manager publishes events on an ``EventBus`` (§5), which
    delivers them on a later loop iteration, never re-entrantly.  The
    HTTP server (§12) parses requests with the sans-IO parser of §6 and
    dispatches them through the route table of §11, whose handlers are
    thin calls into the manager.  Webhooks (§9), console output (§13)
    and plugins (§10) are "applications": objects with
    ``start(loop, manager)``, ``stop()`` and ``restart()``.  Besides the
    loop's thread there are only helpers that hand results back through
    ``loop.call_soon_threadsafe``: the log file writer, and the starter
    threads that fork children and wait for their exec (§8).

Error boundaries (everywhere else exceptions travel)
    * a loop callback (§7): logged with its traceback, the loop goes on;
    * a loop iteration (§7): an error in the loop's own code is logged and
      the loop goes on; only a loop failing 100 iterations in a row stops;
    * an HTTP dispatch (§12): a client mistake is an ``ApiError`` and a
      JSON reply, a bug is a logged traceback and a 500;
    * a plugin call (§10): logged with the plugin's name, plugin skipped;
    * ``main()`` (§15): a ``ConfigError`` is one line on stderr, exit 2;
      an internal error that ends the loop stops every child, then exit 1.

Loop API offered to plugins (``start(loop, manager)``)
    loop.time()                          monotonic clock, seconds
    loop.wall_time()                     Unix time (for dates, not intervals)
    loop.call_soon(cb, *args)            run cb on the next iteration
    loop.call_later(delay, cb, *args)    -> handle with .cancel(); delay
                                         at most MAX_DURATION (a week),
                                         else ValueError
    loop.call_at(when, cb, *args)        -> handle with .cancel()
    loop.cancel(handle)                  same as handle.cancel()
    loop.add_reader(fd, cb, *args)       cb(*args) when fd is readable
    loop.remove_reader(fd)
    loop.add_writer(fd, cb, *args)       cb(*args) when fd is writable
    loop.remove_writer(fd)
    loop.watch_child(pid, cb)            cb(pid, exit_status, term_signal)
                                         when a child you started exits;
                                         the daemon reaps every child, so
                                         never call Popen.wait() yourself.
    http_request(loop, method, url, body=b"", headers=None, timeout=20.0,
                 callback=None, max_response=None)
                                         non-blocking HTTP(S) client;
                                         callback(status, body, error);
                                         -> request with .cancel()

Manager API: see ``Manager`` (§8) and docs/plugins.md; plugin API:
see ``Plugin`` (§10).
"""
from __future__ import annotations

import argparse
import base64
import collections
import configparser
import contextlib
import errno
import fcntl
import grp
import heapq
import http
import importlib
import importlib.util
import ipaddress
import itertools
import json
import logging
import os
import pwd
import re
import selectors
import shlex
import signal
import socket
import stat
import string
import struct
import subprocess
import sys
import threading
import time
import types
import urllib.parse

# Heavy modules (ssl, hashlib, hmac, ctypes, difflib, mimetypes, email) are
# imported where they are used, so an idle daemon stays small (bench/README.md, S5).

__version__ = "0.4.4"        # the API contract version that clients compare
GAFFERD_VERSION = "1.0.0"    # this implementation's own version

log = logging.getLogger("gafferd")


# § 1 constants and small helpers ------------------------------------------
# Owns the numbers that bound every buffer and the tiny pure helpers used
# by all later sections.  Uses nothing but the standard library.

DEFAULT_BIND = "127.0.0.1:5000"
DEFAULT_PORT = 8000                  # "host" without a port listens here, as in gaffer 0.4.4
DEFAULT_BACKLOG = 128
DEFAULT_GRACEFUL_TIMEOUT = 10.0
DEFAULT_OUTPUT_BUFFER = 64 * 1024    # ring buffer per output label
DEFAULT_MAX_BODY = 1 << 20
DEFAULT_KEEPALIVE = 60.0
DEFAULT_MAX_CONNECTIONS = 1024
MAX_REQUEST_LINE = 8 * 1024
MAX_HEADER_BYTES = 16 * 1024
REQUEST_TIMEOUT = 30.0               # default request_timeout: handshake, request, reply progress
READ_CHUNK = 256 * 1024              # child pipes and sockets read size
UTF8_HOLD = 0.05                     # the start of a character cut by a read waits this for its end
STREAM_BUFFER_LIMIT = 1 << 20        # unsent bytes per streaming client
LOG_LINE_LIMIT = 64 * 1024           # a longer line is logged (json, syslog) in pieces
STALL_TIMEOUT = 1.0                  # a throttled client with no progress is dropped
STDIN_QUEUE_LIMIT = 1 << 20          # unwritten bytes per child stdin
LOG_QUEUE_LIMIT = 4 << 20            # log bytes queued for the disk before children wait
STORM_LINES = 10                     # exit lines per template and second before a summary
SPAWN_BATCH = 64                     # spawns per restart step
SPAWN_BUDGET = 0.003                 # seconds of spawning per loop iteration
LAND_BUDGET = 0.002                  # seconds of registering started children per iteration
REAP_BUDGET = 0.003                  # seconds of reaping per iteration (the rest on the next)
GIL_SWITCH_INTERVAL = 0.0005         # a starter thread holds the loop up at most this long
SPAWN_IN_FLIGHT = 32                 # starts handed to the starter threads, not back yet
STARTER_THREADS = 4                  # threads that fork and wait for execs
START_ORDER_WAIT = 0.05              # seconds a start back early waits for those before it
START_DEFER_LIMIT = 5.0              # seconds an unknown zombie waits for a start that is out
SHUTDOWN_START_WAIT = 10.0           # seconds a shutdown waits for starts that are out
ROLLOUT_HEARTBEAT = 15.0             # seconds between the blanks a rolling restart's reply sends
SESSION_SCAN_DELAY = 0.25            # stopped sessions' leftovers: one /proc scan per this
MAX_NUMPROCESSES = 10000             # per template
SAMPLE_INTERVAL = 0.1                # stats feeds sample this often, as gaffer 0.4.4 did
HEARTBEAT_DEFAULT = 60.0             # heartbeat=true
WEBHOOK_TIMEOUT = 20.0
WEBHOOK_ATTEMPTS = 3
WEBHOOK_QUEUE = 1000
SHUTDOWN_DRAIN = 3.0                 # webhooks get this long at shutdown
RECENT_PROCESSES = 10                # exited processes kept for _log
READY_LINE_MAX = 4096                # bytes of a line a log: readiness check looks at
READY_ATTEMPT_MIN = 5.0              # seconds a tcp:/http:/cmd: check gets, at least
READY_HTTP_MAX = 64 * 1024           # bytes of an http: readiness answer
NOTIFY_DATAGRAM = 4096               # bytes of one sd_notify message (systemd's limit too)
NOTIFY_BURST = 64                    # sd_notify messages read per wake-up of one socket
STATUS_TEXT_MAX = 512                # characters of a STATUS= text kept
EVENT_HISTORY = 1000                 # events kept for /watch resumes (Last-Event-ID)
RECENT_ORPHANS = 50                  # reaped adopted orphans kept for GET /orphans
ORPHAN_SCAN_DELAY = 0.5              # after exits, one look for new orphans per this
ORPHAN_KILL_INTERVAL = 0.05          # shutdown: looks again for what the SIGKILL of orphans left
ORPHAN_KILL_ROUNDS = 20              # ... at most this many times (1 s)
MAX_CMDLINE = 1024                   # characters of an orphan's command line kept
ENV_FILE_MAX = 1 << 20               # bytes of one env_file
LIMIT_SAMPLE_INTERVAL = 1.0          # max_memory / max_cpu: one sample per process per this
LIMIT_SAMPLE_BUDGET = 0.005          # seconds of limit sampling per loop iteration
LIMIT_TREE_MAX = 1000                # processes of one tree a limit sample reads at most
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

_TRUE = {"1", "yes", "true", "on"}
_FALSE = {"0", "no", "false", "off"}
_SIZE_UNITS = {"": 1, "B": 1, "K": 1024, "KB": 1024, "M": 1024 ** 2,
               "MB": 1024 ** 2, "G": 1024 ** 3, "GB": 1024 ** 3}


def parse_bool(value) -> bool:
    """configparser's boolean words (1/yes/true/on, 0/no/false/off), or a JSON bool/0/1."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE:
        return True
    if isinstance(value, str) and value.strip().lower() in _FALSE:
        return False
    raise ValueError("%r is not a boolean (use true/false, yes/no, on/off, 1/0)"
                     % (value,))


# Every number a config file, a request or a plugin can give has a range
# here; a value outside it is a config error naming file, section and
# key, or a 400 naming the parameter.  Nothing larger reaches a timer
# (epoll refuses timeouts beyond 2**31 ms, select() raises on them) or
# sizes a buffer.  docs/configuration.md and docs/http-api.md quote this table.
MAX_DURATION = 7 * 24 * 3600.0       # one week: every timeout, interval and delay
MAX_COUNT = 1000000                  # retries, attempts, lines, connections
MAX_BUFFER = 1 << 30                 # bytes held in memory (ring, request body)
MAX_FILE_SIZE = 1 << 40              # bytes written to a log file before rotation
MAX_ID = (1 << 63) - 1               # process ids, stream offsets, priorities
RANGES = {
    # config keys: [process:*]
    "numprocesses": (0, MAX_NUMPROCESSES),
    "priority": (-MAX_ID, MAX_ID),
    "graceful_timeout": (0.0, MAX_DURATION),
    "flapping.attempts": (1, MAX_COUNT),
    "flapping.window": (0.0, MAX_DURATION),
    "flapping.retry_in": (0.0, MAX_DURATION),
    "flapping.max_retry": (0, MAX_COUNT),
    "startsecs": (0.0, MAX_DURATION),
    "restart_delay": (0.0, MAX_DURATION),
    "backoff.initial": (0.0, MAX_DURATION),
    "backoff.factor": (1.0, 1000.0),
    "backoff.max": (0.0, MAX_DURATION),
    "start_retries": (0, MAX_COUNT),
    "success_exit_codes": (0, 255),
    "stop_signal": (1, signal.NSIG - 1),
    "ready_timeout": (0.0, MAX_DURATION),
    "ready_interval": (0.01, MAX_DURATION),
    "depends_on": (0, 1000),             # names in one depends_on
    "watchdog_sec": (0.0, MAX_DURATION),
    "logfile_maxbytes": (0, MAX_FILE_SIZE),
    "logfile_backups": (0, 1000),
    "output_buffer": (0, MAX_BUFFER),
    "rolling_max_surge": (1, MAX_NUMPROCESSES),
    "sockets": (0, 64),                  # names in one sockets list
    "nice": (-20, 19),                   # setpriority(2)
    "umask": (0, 0o777),
    "oom_score_adj": (-1000, 1000),      # proc(5)
    "rlimit": (0, MAX_ID),               # each rlimit_* value but "unlimited"
    "max_memory": (0, MAX_FILE_SIZE),
    "max_cpu": (0.0, 100000.0),          # percent of one core
    "limit_for": (0.0, MAX_DURATION),
    # config keys: [gaffer] and [endpoint:*]
    "backlog": (0, 65535),
    "max_body_size": (0, MAX_BUFFER),
    "keepalive_timeout": (0.0, MAX_DURATION),
    "request_timeout": (0.001, MAX_DURATION),
    "max_connections": (1, MAX_COUNT),
    # query parameters and numbers in paths
    "heartbeat": (0.0, MAX_DURATION),
    "lines": (0, MAX_COUNT),
    "tail": (0, MAX_BUFFER),
    "id": (0, MAX_ID),
    "last_event_id": (0, MAX_ID),
    "count": (0, MAX_NUMPROCESSES),
    # plugin calls: loop.call_later(delay), http_request(timeout=...)
    "delay": (0.0, MAX_DURATION),
}

# ASCII only: str.isdigit() and int() also take '\u0661\u0662', '\xb2',
# '1_0', '+5' and ' 12 ', none of which a config file or HTTP allows.
_INT_RE = re.compile(r"-?[0-9]{1,19}", re.ASCII)
_DECIMAL_RE = re.compile(r"-?(?:[0-9]{1,19}(?:\.[0-9]*)?|\.[0-9]+)", re.ASCII)


def is_ascii_digits(text) -> bool:
    """``text`` is 1 to 19 ASCII digits 0-9 and nothing else (an id, a
    Content-Length, a count in a path)."""
    return isinstance(text, str) and _INT_RE.fullmatch(text) is not None and text[0] != "-"


def _check_range(value, number, minimum, maximum, unit=""):
    def show(limit):
        return "%g" % limit if isinstance(limit, float) else str(limit)
    if minimum is not None and number < minimum:
        raise ValueError("%r must be at least %s%s" % (value, show(minimum), unit))
    if maximum is not None and number > maximum:
        raise ValueError("%r must be at most %s%s" % (value, show(maximum), unit))
    return number


def parse_int(value, minimum=None, maximum=None) -> int:
    """A JSON integer or a string of ASCII digits with an optional ``-``,
    within [minimum, maximum]; ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError("%r is not an integer" % (value,))
    if isinstance(value, str) and not _INT_RE.fullmatch(value):
        raise ValueError("%r is not an integer (ASCII digits 0-9%s)" % (
            value, "; too many digits" if re.fullmatch(r"-?[0-9]+", value, re.ASCII) else ""))
    return _check_range(value, int(value), minimum, maximum)


def parse_float(value, minimum=None, maximum=None) -> float:
    """A JSON number or a decimal such as ``2``, ``2.5``, ``2.`` or ``.5``
    (ASCII, no exponent, no ``+``), finite, within [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("%r is not a number" % (value,))
    if isinstance(value, str) and not _DECIMAL_RE.fullmatch(value):
        raise ValueError("%r is not a number (ASCII digits and a decimal point)" % (value,))
    try:
        number = float(value)
    except OverflowError:                   # a JSON integer beyond any float
        raise ValueError("%r is too large" % (value,)) from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError("%r is not a finite number" % (value,))
    return _check_range(value, number, minimum, maximum)


def parse_size(value, maximum=None) -> int:
    """Bytes, or a number with a K/KB/M/MB/G/GB suffix (powers of 1024),
    at most ``maximum``."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return _check_range(value, value, None, maximum, " bytes")
    m = re.match(r"([0-9]{1,19})(?:[ \t]*([A-Za-z]+))?\Z", str(value), re.ASCII)
    unit = m and (m.group(2) or "").upper()
    if not m or unit not in _SIZE_UNITS:
        raise ValueError("%r is not a size (bytes, or with KB, MB or GB)" % (value,))
    return _check_range(value, int(m.group(1)) * _SIZE_UNITS[unit], None, maximum, " bytes")


def parse_list(value) -> list:
    """A comma-separated INI value, or a JSON list, as a list of strings."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [part.strip() for part in str(value).split(",") if part.strip()]


def human_size(n: int) -> str:
    """gaffer 0.4.4's sizes: the largest power-of-1024 unit <= n, floored (4534272 -> 4M)."""
    for power, letter in reversed(list(enumerate("KMGTPEZY", 1))):
        unit = 1024 ** power
        if n >= unit:
            return "%d%s" % (n // unit, letter)
    return "%dB" % n


def format_ctime(seconds: float) -> str:
    """Total CPU time as M:SS.cc, gaffer 0.4.4's look without its hour and centisecond bugs."""
    centis = int(round(seconds * 100))
    return "%d:%02d.%02d" % (centis // 6000, centis // 100 % 60, centis % 100)


def json_dumps(obj) -> bytes:
    return json.dumps(obj, default=_json_default).encode("utf-8")


def _json_default(obj):
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "replace")
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError("not JSON serialisable: %r" % (obj,))


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date(epoch=None) -> str:
    """RFC 9110 IMF-fixdate, e.g. ``Sun, 06 Nov 1994 08:49:37 GMT`` (now,
    when ``epoch`` is None)."""
    t = time.gmtime(epoch)
    return "%s, %02d %s %04d %02d:%02d:%02d GMT" % (
        _DAYS[t.tm_wday], t.tm_mday, _MONTHS[t.tm_mon - 1], t.tm_year,
        t.tm_hour, t.tm_min, t.tm_sec)


def lazy_import(name):
    """Import ``name`` when first needed (see the note on heavy modules)."""
    return importlib.import_module(name)


def typo_of(word: str, known, strict=False):
    """The name in ``known`` that ``word`` is probably a misspelling of,
    or None: the most similar by difflib's ratio, if at least 0.6.
    ``strict`` also asks that the lengths differ by one letter at most
    (a slip of the keyboard, not another word), for the places where a
    wrong guess would reject a name that is meant (a plugin's section)."""
    known = list(known)
    for close in lazy_import("difflib").get_close_matches(word.lower(), known, 3, 0.6):
        if not strict or abs(len(close) - len(word)) <= 1:
            return close
    return None


def loopback_literal(host: str):
    """Whether ``host`` names this machine without a lookup: True for
    ``localhost`` and a loopback IP address (an IPv6 zone ``%lo``
    allowed), False for any other IP address, None for any other name
    (only a lookup, or a policy of the caller, can tell)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return None


class _SSLNotLoaded:
    """Stands for the ssl module until TLS is first used: its exception
    classes can appear in ``except`` clauses and are never raised."""

    class SSLError(OSError):
        pass

    class SSLWantReadError(SSLError):
        pass

    class SSLWantWriteError(SSLError):
        pass


ssl = _SSLNotLoaded


def load_ssl():
    """The real ssl module, imported on first use."""
    global ssl
    if ssl is _SSLNotLoaded:
        ssl = importlib.import_module("ssl")
    return ssl


def read_nonblocking(read, *args):
    """``read(*args)`` on a non-blocking pipe or socket (``os.read``,
    ``sock.recv``): the bytes; b"" at the end, an error included (the
    peer is gone either way); None when nothing is there yet (a TLS
    socket waiting for its record, a signal)."""
    try:
        return read(*args)
    except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return None
    except OSError:
        return b""


def close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


# § 2 errors ---------------------------------------------------------------
# Each error carries what its boundary needs to report it: a ConfigError
# knows its file, section and key; an ApiError and an HttpError know the
# HTTP status and JSON error code they become.


def _config_where(path, section, key):
    text = path or "<config>"
    if section is not None:
        text += ": [%s]" % section
        if key:
            text += " " + key
    elif key:
        text += ": " + key
    return text


class ConfigError(Exception):
    """A mistake in a config file, reported as one line (exit status 2).

    ``str()`` gives ``gaffer.ini: [process:web] numprocesses: 'two' is not
    an integer``.
    """

    def __init__(self, path, section, key, message):
        super().__init__(message)
        self.path, self.section, self.key, self.message = path, section, key, message

    def __str__(self):
        return "%s: %s" % (_config_where(self.path, self.section, self.key), self.message)


class ConfigErrors(Exception):
    """Several ConfigErrors found in one pass, each reported on its line;
    ``warnings`` are the lines that would have been warnings had the file
    been valid (they are shown too: one run shows every mistake)."""

    def __init__(self, errors, warnings=()):
        super().__init__("\n".join(str(e) for e in errors))
        self.errors = list(errors)
        self.warnings = list(warnings)


def api_config_message(exc) -> str:
    """A ConfigError or ConfigErrors about a JSON template, as one line
    without the file part: ``numprocesses: 'x' is not an integer; ...``."""
    errors = exc.errors if isinstance(exc, ConfigErrors) else [exc]
    return "; ".join(e.message if e.key is None else "%s: %s" % (e.key, e.message)
                     for e in errors)


class ApiError(Exception):
    """A client mistake: becomes ``{"error": code, "message": ...}``."""

    def __init__(self, status, code, message=None, headers=None):
        super().__init__(message or code)
        self.status, self.code = status, code
        self.message = message or code.replace("_", " ")
        self.headers = headers or []


class HttpError(Exception):
    """A protocol error: the reply is sent and the connection closed."""

    def __init__(self, status, code, message=None):
        super().__init__(message or code)
        self.status, self.code, self.message = status, code, message or code


class ResponseError(Exception):
    """A response the client cannot read; ``str()`` names the problem
    (``malformed status line``, ``response body over 4194304 bytes``,
    ``connection closed after 3 of 10 body bytes``...)."""

    def __init__(self, message):
        super().__init__(message)
        self.message = message


class SpawnError(Exception):
    """A template that cannot be started (bad user, variable, cwd, exec)."""

    fd_short = False                    # it failed for want of file descriptors


# § 3 configuration (pure) ---------------------------------------------------
# Owns: the INI format (docs/configuration.md) and the JSON template format
# of POST /processes, turned into validated, read-only ``TemplateSpec`` and
# ``EndpointSpec`` objects inside a ``Config``.  Every key of every section
# is in a table below with its type, default and help text.  Uses §1-§2;
# reads files and the user database but starts nothing.  Used by the
# manager (§8), the HTTP API (§11) and main() (§15).


class Flapping:
    """Flapping limits (gaffer 0.4.4's ``flapping``): ``attempts`` exits within ``window``
    seconds stop the template; it is retried after ``retry_in`` seconds,
    at most ``max_retry`` times, then it stays stopped ("failed")."""

    __slots__ = ("attempts", "window", "retry_in", "max_retry")
    FIELDS = (("attempts", int, 2), ("window", float, 1.0),
              ("retry_in", float, 7.0), ("max_retry", int, 5))

    def __init__(self, attempts=2, window=1.0, retry_in=7.0, max_retry=5):
        self.attempts, self.window = attempts, window
        self.retry_in, self.max_retry = retry_in, max_retry

    def to_dict(self) -> dict:
        return {f: getattr(self, f) for f, _, _ in self.FIELDS}

    def __eq__(self, other):
        return isinstance(other, Flapping) and self.to_dict() == other.to_dict()

    @classmethod
    def parse(cls, value):
        """``off``, ``2, 1., 7., 5`` (commas and/or spaces, trailing values
        defaulted), a JSON object with any of the four keys, or a bool."""
        if value is None or value is True:
            return cls()
        if value is False:
            return None
        if isinstance(value, dict):
            unknown = set(value) - {f for f, _, _ in cls.FIELDS}
            if unknown:
                raise ValueError("unknown flapping key(s): %s" % ", ".join(sorted(unknown)))
            values = [value.get(f, d) for f, _, d in cls.FIELDS]
        else:
            text = str(value).strip()
            if text.lower() in ("off", "no", "false", "none", "0", "disabled"):
                return None
            if text.lower() in ("on", "yes", "true", "default", ""):
                return cls()
            values = [v for v in re.split(r"[\s,]+", text) if v]
            if len(values) > 4:
                raise ValueError("%r has more than 4 values (attempts window "
                                 "retry_in max_retry)" % text)
            values += [d for _, _, d in cls.FIELDS[len(values):]]
        out = []
        for (field, kind, _), v in zip(cls.FIELDS, values):
            minimum, maximum = RANGES["flapping." + field]
            if kind is int and isinstance(v, float) and v == v and v == int(v):
                v = int(v)                         # JSON 3.0 is 3
            try:
                out.append((parse_int if kind is int else parse_float)(v, minimum, maximum))
            except ValueError as exc:
                raise ValueError("%s %s" % (field, exc)) from None
        return cls(*out)


RESTART_POLICIES = ("always", "on-failure", "never")
UNLIMITED = None                     # start_retries without a limit


class Backoff:
    """Delays after failed starts: ``initial``, times ``factor`` after each
    further failed start, at most ``max`` seconds."""

    __slots__ = ("initial", "factor", "max")
    FIELDS = ("initial", "factor", "max")

    def __init__(self, initial=1.0, factor=2.0, max=60.0):
        self.initial, self.factor, self.max = initial, factor, max

    def delay(self, failed_starts: int) -> float:
        """Seconds to wait after the ``failed_starts``-th failed start in a row."""
        if failed_starts <= 0:
            return 0.0
        exponent = min(failed_starts - 1, 64)        # factor**64 already passes any max
        return min(self.max, self.initial * self.factor ** exponent)

    def to_list(self) -> list:
        return [self.initial, self.factor, self.max]

    def __eq__(self, other):
        return isinstance(other, Backoff) and self.to_list() == other.to_list()

    def __repr__(self):
        return "Backoff(%g, %g, %g)" % tuple(self.to_list())

    @classmethod
    def parse(cls, value):
        """``1, 2, 60`` (commas and/or spaces; trailing values defaulted),
        a JSON list, or a JSON object with ``initial``, ``factor``, ``max``."""
        defaults = cls().to_list()
        if isinstance(value, dict):
            unknown = set(value) - set(cls.FIELDS)
            if unknown:
                raise ValueError("unknown backoff key(s): %s" % ", ".join(sorted(unknown)))
            values = [value.get(f, d) for f, d in zip(cls.FIELDS, defaults)]
        else:
            values = list(value) if isinstance(value, (list, tuple)) else \
                [v for v in re.split(r"[\s,]+", str(value).strip()) if v]
            if not values or len(values) > 3:
                raise ValueError("%r: give initial, factor, max (1 to 3 numbers)" % (value,))
            values += defaults[len(values):]
        out = []
        for field, v in zip(cls.FIELDS, values):
            minimum, maximum = RANGES["backoff." + field]
            try:
                out.append(parse_float(v, minimum, maximum))
            except ValueError as exc:
                raise ValueError("%s %s" % (field, exc)) from None
        return cls(*out)


class ReadySpec:
    """When a process counts as ready (the ``ready`` key): ``kind`` is one
    of READY_KINDS, ``arg`` its validated argument (a compiled regex, a
    ``(host, port)``, a URL, an argv list, or None)."""

    __slots__ = ("kind", "arg", "text")

    def __init__(self, kind, arg=None, text=None):
        self.kind, self.arg, self.text = kind, arg, text or kind

    def __eq__(self, other):
        return isinstance(other, ReadySpec) and self.text == other.text

    def __repr__(self):
        return "ReadySpec(%r)" % self.text


def _ready_plain(arg):
    if arg:
        raise ValueError("takes no argument")


def _ready_log(arg):
    if not arg:
        raise ValueError("log: needs a regular expression")
    try:
        return re.compile(arg.encode("utf-8"))
    except re.error as exc:
        raise ValueError("log:%s is not a regular expression: %s" % (arg, exc)) from None


def _ready_tcp(arg):
    host, _, port = arg.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    return host, parse_int(port, 1, 65535)


def _ready_http(arg):
    url = urllib.parse.urlsplit(arg)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError("http: needs an http:// or https:// URL with a host")
    return arg


def _ready_cmd(arg):
    try:
        argv = shlex.split(arg)
    except ValueError as exc:
        raise ValueError("cmd:%s cannot be split: %s" % (arg, exc)) from None
    if not argv:
        raise ValueError("cmd: needs a command")
    return argv


# kind -> validate(argument text) -> the argument the probe uses.  The
# manager (§8) has a probe for each kind in ``Manager.READY_PROBES``.
READY_KINDS = collections.OrderedDict([
    ("startsecs", _ready_plain), ("spawn", _ready_plain), ("notify", _ready_plain),
    ("log", _ready_log), ("tcp", _ready_tcp), ("http", _ready_http), ("cmd", _ready_cmd),
])


def parse_ready(value) -> ReadySpec:
    """``startsecs``, ``spawn``, ``notify``, ``log:REGEX``, ``tcp:PORT``,
    ``tcp:HOST:PORT``, ``http:URL`` or ``cmd:COMMAND``."""
    if isinstance(value, ReadySpec):
        return value
    if not isinstance(value, str) or not value.strip():
        raise ValueError("%r: use startsecs, spawn, notify, log:REGEX, tcp:PORT, "
                         "http:URL or cmd:COMMAND" % (value,))
    text = value.strip()
    kind, _, arg = text.partition(":")
    kind = kind.strip().lower()
    if kind not in READY_KINDS:
        raise ValueError("unknown kind %r: use %s" % (kind, ", ".join(READY_KINDS)))
    return ReadySpec(kind, READY_KINDS[kind](arg.strip() if kind != "log" else arg), text)


def _c_str(value, ctx):
    if not isinstance(value, str):
        raise ValueError("%r is not a string" % (value,))
    return value


def _c_cmd(value, ctx):
    value = _c_str(value, ctx)
    if not value.strip():
        raise ValueError("is empty")
    return value


def _c_args(value, ctx):
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    try:
        return shlex.split(str(value))
    except ValueError as exc:
        raise ValueError("%r cannot be split: %s" % (value, exc)) from None


def _c_env(value, ctx):
    if not isinstance(value, dict):
        raise ValueError("must be an object of NAME: value")
    return {str(k): str(v) for k, v in value.items()}


def _lookup_id(value, by_id, by_name, what):
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif is_ascii_digits(value):
        number = int(value)
    elif isinstance(value, str) and value.strip():
        try:
            return by_name(value.strip())
        except KeyError:
            raise ValueError("unknown %s %r" % (what, value)) from None
    else:
        raise ValueError("%r is not a %s name or id" % (value, what))
    try:
        if not 0 <= number < 1 << 32:               # uid_t and gid_t are 32 bits
            raise KeyError(number)
        by_id(number)
    except KeyError:
        raise ValueError("unknown %s id %d" % (what, number)) from None
    return number


def _c_uid(value, ctx):
    if value is None:
        return None
    return _lookup_id(value, pwd.getpwuid, lambda n: pwd.getpwnam(n).pw_uid, "user")


def _c_gid(value, ctx):
    if value is None:
        return None
    return _lookup_id(value, grp.getgrgid, lambda n: grp.getgrnam(n).gr_gid, "group")


def _c_cwd(value, ctx):
    if value is None:
        return None
    path = os.path.normpath(os.path.join(ctx["base_dir"], os.path.expanduser(str(value))))
    if not os.path.isdir(path):
        raise ValueError("directory %r does not exist" % path)
    return path


def _c_logfile(value, ctx):
    if value is None or str(value).strip() == "":
        return None
    value = str(value).strip()
    if value == "-":
        return value
    path = os.path.normpath(os.path.join(ctx["base_dir"], os.path.expanduser(value)))
    if not os.path.isdir(os.path.dirname(path)):
        raise ValueError("directory of %r does not exist" % path)
    return path


def _c_bool(value, ctx):
    return parse_bool(value)


# -- log formats and syslog (pure) -------------------------------------------------
LOG_FORMATS = ("raw", "json")

# RFC 3164 facility names -> numbers (the priority is facility * 8 + severity).
SYSLOG_FACILITIES = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6,
    "news": 7, "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11,
    "local0": 16, "local1": 17, "local2": 18, "local3": 19,
    "local4": 20, "local5": 21, "local6": 22, "local7": 23,
}
SYSLOG_INFO, SYSLOG_ERR = 6, 3            # severities of stdout and stderr lines
MAX_SYSLOG_TAG = 48                       # characters; rsyslog reads up to 32 by default
_SYSLOG_TAG_RE = re.compile(r"[!-~]{1,%d}" % MAX_SYSLOG_TAG, re.ASCII)


def parse_syslog_address(value):
    """``/dev/log``, ``unix:PATH`` or ``udp:HOST:PORT`` (``udp:[V6]:PORT``)
    -> ``(AF_UNIX, path)`` or ``(AF_INET or AF_INET6, (host, port))``.

    HOST must be a literal IP address (or ``localhost``, read as
    127.0.0.1): the daemon never resolves a name synchronously, and a
    syslog line cannot wait for an asynchronous lookup.  ValueError."""
    text = str(value).strip() if isinstance(value, str) else ""
    if text.startswith("/"):
        return socket.AF_UNIX, text
    kind, colon, rest = text.partition(":")
    if kind == "unix" and rest.startswith("/"):
        return socket.AF_UNIX, rest
    if kind == "udp" and rest:
        host, colon, port = rest.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        host = "127.0.0.1" if host == "localhost" else host
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError("%r: the host of udp:HOST:PORT must be a literal IP address "
                             "(names are not resolved)" % (value,)) from None
        port_number = int(port) if colon and is_ascii_digits(port) and len(port) <= 5 else 0
        if not 1 <= port_number <= 65535:
            raise ValueError("%r: udp:HOST:PORT needs a port 1-65535" % (value,))
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        return family, (str(address), port_number)
    raise ValueError("%r: use /dev/log, unix:/PATH or udp:HOST:PORT" % (value,))


def _c_log_format(value, ctx):
    text = str(value).strip().lower() if isinstance(value, str) else value
    if text not in LOG_FORMATS:
        raise ValueError("%r: use %s" % (value, " or ".join(LOG_FORMATS)))
    return text


def _c_syslog_address(value, ctx):
    parse_syslog_address(value)
    return str(value).strip()


def _c_syslog_facility(value, ctx):
    text = str(value).strip().lower() if isinstance(value, str) else None
    if text not in SYSLOG_FACILITIES:
        raise ValueError("%r: use one of %s" % (value, ", ".join(SYSLOG_FACILITIES)))
    return text


def _c_syslog_tag(value, ctx):
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not _SYSLOG_TAG_RE.fullmatch(value) or \
            any(c in value for c in ":[]"):
        raise ValueError("%r: 1-%d printable ASCII characters, no blanks, ':', '[' or ']'"
                         % (value, MAX_SYSLOG_TAG))
    return value


_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
SYSLOG_LINE_LIMIT = 8192                  # bytes of one message; rsyslog's default maximum


def rfc3339(unix_time: float) -> str:
    """``unix_time`` as local RFC 3339 with milliseconds and the offset
    (``2026-12-07T06:48:04.123+01:00``)."""
    moment = lazy_import("datetime").datetime.fromtimestamp(unix_time).astimezone()
    return moment.isoformat(timespec="milliseconds")


def syslog_header(priority, tag, pid, unix_time, hostname=None) -> bytes:
    """The head of an RFC 3164 message: ``<PRI>Mmm dd hh:mm:ss [HOSTNAME ]TAG[PID]: ``.
    Local daemons (rsyslog, syslog-ng, journald on /dev/log) take it
    without a HOSTNAME, as glibc's syslog() sends it; a relay over UDP
    gets one.  The message follows, cut at SYSLOG_LINE_LIMIT bytes."""
    t = time.localtime(unix_time)
    head = "<%d>%s %2d %02d:%02d:%02d %s%s%s: " % (
        priority, _MONTHS[t.tm_mon - 1], t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec,
        hostname + " " if hostname else "", tag, "[%d]" % pid if pid else "")
    return head.encode("ascii", "replace")


def json_log_line(time_text, name, internal_id, os_pid, stream, line: bytes) -> bytes:
    """A ``log_format = json`` record: one object and a newline.
    ``time_text`` is ``rfc3339(unix time)``; ``line`` the output line
    without its newline, decoded as UTF-8 (a byte that is not UTF-8
    becomes U+FFFD)."""
    return (json.dumps({"time": time_text, "name": name, "id": internal_id,
                        "pid": os_pid, "stream": stream,
                        "line": line.decode("utf-8", "replace")},
                       ensure_ascii=False) + "\n").encode("utf-8", "replace")


def default_syslog_tag(name: str) -> str:
    """The tag of a template's syslog lines when ``syslog_tag`` is unset:
    its name, ':' (a group) as '.', cut to MAX_SYSLOG_TAG."""
    tag = re.sub(r"[^!-~]|[:\[\]]", ".", name.replace(":", "."))
    return tag[:MAX_SYSLOG_TAG] or "gafferd"


def _c_ranged(parse, key):
    """A coerce function: ``parse`` (parse_int, parse_float or parse_size)
    within ``RANGES[key]``."""
    minimum, maximum = RANGES[key]
    if parse is parse_size:
        return lambda value, ctx: parse_size(value, maximum)
    return lambda value, ctx: parse(value, minimum, maximum)


def _c_labels(value, ctx):
    return parse_list(value)


def _c_flapping(value, ctx):
    return Flapping.parse(value)


def _c_restart(value, ctx):
    text = str(value).strip().lower() if isinstance(value, str) else value
    if text not in RESTART_POLICIES:
        raise ValueError("%r: use %s" % (value, ", ".join(RESTART_POLICIES)))
    return text


def _c_exit_codes(value, ctx):
    """An exit status, a JSON list of them or ``0, 2`` (blanks only
    around commas)."""
    if isinstance(value, (list, tuple)):
        items = list(value)
    elif isinstance(value, str) and "," in value:
        items = [item.strip() for item in value.split(",")]
    else:
        items = [value]
    minimum, maximum = RANGES["success_exit_codes"]
    return sorted({parse_int(item, minimum, maximum) for item in items})


def _c_start_retries(value, ctx):
    if value is None or (isinstance(value, str) and value.lower() == "unlimited"):
        return UNLIMITED
    minimum, maximum = RANGES["start_retries"]
    return parse_int(value, minimum, maximum)


def _c_backoff(value, ctx):
    return Backoff.parse(value)


def _c_signal(value, ctx):
    """A signal name (TERM, SIGTERM) or number."""
    text = str(value).upper() if isinstance(value, (str, int)) and \
        not isinstance(value, bool) else ""
    if is_ascii_digits(text):
        number = int(text)
    else:
        name = text if text.startswith("SIG") else "SIG" + text
        number = getattr(signal.Signals, name, None) if name.isidentifier() else None
    minimum, maximum = RANGES["stop_signal"]
    if number is None or not minimum <= int(number) <= maximum:
        raise ValueError("%r is not a signal (use a name such as TERM, INT, QUIT)" % (value,))
    return int(number)


def _c_ready(value, ctx):
    return parse_ready(value)


# What a dependency must reach before its dependent starts, ``ready`` when
# the item names none.  Evaluated by §4 ``dependency_status``.
DEPENDENCY_CONDITIONS = ("started", "ready", "completed", "completed_successfully")


def _c_depends_on(value, ctx):
    """``NAME[:CONDITION], ...`` or a JSON list of such strings -> a tuple
    of ``(name, condition)``.  A name may hold a colon (``web:api``, a
    template of group ``web``): only a last part that is a condition is
    read as one, so ``web:api:ready`` names template ``web:api``.  Whether
    the names exist is checked with the other templates
    (``dependency_problems``)."""
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ValueError("%r: use NAME[:CONDITION], ..." % (value,))
    minimum, maximum = RANGES["depends_on"]
    if len(items) > maximum:
        raise ValueError("%d names: at most %d" % (len(items), maximum))
    out = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError("%r is not a NAME[:CONDITION] string" % (item,))
        item = item.strip()
        if not item and isinstance(value, str):
            continue                            # "a, b," : a trailing comma
        head, colon, tail = item.rpartition(":")
        name, condition = (head, tail) if colon and tail in DEPENDENCY_CONDITIONS \
            else (item, "ready")
        if not name or "/" in name or any(c.isspace() or ord(c) < 32 for c in name):
            raise ValueError("%r is not NAME[:CONDITION] (conditions: %s)"
                             % (item, ", ".join(DEPENDENCY_CONDITIONS)))
        if (name, condition) not in out:
            out.append((name, condition))
    return tuple(out)


RESTART_MODES = ("restart", "rolling")


def _c_restart_mode(value, ctx):
    text = str(value).strip().lower() if isinstance(value, str) else value
    if text not in RESTART_MODES:
        raise ValueError("%r: use %s" % (value, ", ".join(RESTART_MODES)))
    return text


def _c_sockets(value, ctx):
    """``web, admin`` or a JSON list: names of [socket:NAME] sections, in
    the order their fds are passed (3, 4, ...).  Whether each exists is
    checked with the sockets (``socket_problems``)."""
    items = parse_list(value) if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or \
            not all(isinstance(i, str) and i.strip() for i in items):
        raise ValueError("%r: use NAME, NAME, ... ([socket:NAME] sections)" % (value,))
    items = [i.strip() for i in items]
    minimum, maximum = RANGES["sockets"]
    if len(items) > maximum:
        raise ValueError("%d names: at most %d" % (len(items), maximum))
    if len(set(items)) != len(items):
        raise ValueError("%r names a socket twice" % (value,))
    for item in items:
        if _socket_name_problem(item):
            raise ValueError(_socket_name_problem(item))
    return items


# -- production controls: environment files, exec controls, limits ----------------
# ``env_file`` names files in systemd's EnvironmentFile format (systemd.exec(5)),
# read again at every spawn; the exec controls (umask, nice, oom_score_adj,
# rlimit_*, groups) are applied by the child between fork and exec (§8
# ``exec_controls``); the limits are sampled by §8 ``ResourceWatch``.

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z", re.ASCII)


def parse_env_file(text: str) -> dict:
    """``NAME=VALUE`` lines as systemd's EnvironmentFile reads them: blank
    lines and lines starting with ``#`` or ``;`` are comments; an optional
    ``export `` prefix; a value in single quotes is literal, in double
    quotes ``\\"``, ``\\\\``, ``\\$`` and ``\\``` are escapes; a quoted
    value may span lines; unquoted, a backslash takes the next character
    literally and at the end of a line joins the next one, and blanks
    around the value go.  Nothing is expanded (no ``$VAR``, no command
    substitution).  Later lines win.  ValueError naming the line number."""
    lines = text.replace("\r\n", "\n").split("\n")
    out, i = {}, 0
    while i < len(lines):
        lineno, line = i + 1, lines[i].lstrip(" \t")
        i += 1
        if not line.strip() or line[0] in "#;":
            continue
        if line.startswith(("export ", "export\t")):
            line = line[7:].lstrip(" \t")
        name, eq, rest = line.partition("=")
        name = name.strip(" \t")
        if not eq or not _ENV_NAME.match(name):
            # the line itself is not quoted: an error message must not show values
            raise ValueError("line %d is not NAME=VALUE (a NAME is letters, digits and _)"
                             % lineno)
        # ``kept``: characters up to a closing quote or an escape, which
        # the trimming of trailing blanks must not touch
        buf, quote, kept, text_, pos = [], None, 0, rest.lstrip(" \t"), 0
        while True:
            if pos >= len(text_):
                if quote is None:
                    break
                if i >= len(lines):
                    raise ValueError("line %d: the %s quote of %s is never closed"
                                     % (lineno, quote, name))
                buf.append("\n")
                text_, pos, i = lines[i], 0, i + 1
                continue
            c, pos = text_[pos], pos + 1
            if quote == "'":
                if c == "'":
                    quote, kept = None, len(buf)
                else:
                    buf.append(c)
            elif c == "\\":
                if pos >= len(text_):                   # a line continuation
                    if i >= len(lines):
                        break
                    text_, pos, i = lines[i], 0, i + 1
                    continue
                c, pos = text_[pos], pos + 1
                if quote == '"' and c not in '"\\`$':
                    buf.append("\\")
                buf.append(c)
                kept = len(buf)
            elif c == quote:
                quote, kept = None, len(buf)
            elif quote is None and c in "'\"":
                quote = c
            else:
                buf.append(c)
        out[name] = "".join(buf[:kept]) + "".join(buf[kept:]).rstrip(" \t")
    return out


def read_env_files(entries) -> dict:
    """The variables of ``entries`` (``(path, optional)`` pairs), later
    files winning.  A missing optional file is skipped; a missing required
    file, an unreadable one, one over ENV_FILE_MAX bytes or one that does
    not parse is a ValueError naming it."""
    env = {}
    for path, optional in entries:
        try:
            with open(path, "rb") as f:
                data = f.read(ENV_FILE_MAX + 1)
        except FileNotFoundError:
            if optional:
                continue
            raise ValueError("%r does not exist (a leading '-' makes a file optional)"
                             % path) from None
        except OSError as exc:
            raise ValueError("cannot read %r: %s" % (path, exc.strerror or exc)) from None
        if len(data) > ENV_FILE_MAX:
            raise ValueError("%r is larger than %d bytes" % (path, ENV_FILE_MAX))
        try:
            env.update(parse_env_file(data.decode("utf-8")))
        except UnicodeDecodeError as exc:
            raise ValueError("%r is not UTF-8 text (%s)" % (path, exc.reason)) from None
        except ValueError as exc:
            raise ValueError("%r %s" % (path, exc)) from None
    return env


def _c_env_file(value, ctx):
    """``PATH, -PATH2`` (or a JSON list) -> ``((absolute path, optional), ...)``;
    relative paths start from the config file's directory, as ``cwd`` and
    log files do.  Read once here, so a mistake is a config error."""
    entries = []
    for item in parse_list(value):
        optional = item.startswith("-")
        path = item[1:].strip() if optional else item
        if not path:
            raise ValueError("%r names no file" % item)
        entries.append((os.path.normpath(os.path.join(
            ctx["base_dir"], os.path.expanduser(path))), optional))
    read_env_files(entries)
    return tuple(entries)


def _c_umask(value, ctx):
    """Octal digits (``027``, ``0o027``); a JSON number is read the same way."""
    text = str(value) if isinstance(value, (str, int)) and \
        not isinstance(value, bool) else ""         # an INI value comes stripped
    digits = text[2:] if text[:2].lower() == "0o" else text
    if not re.fullmatch(r"[0-7]{1,4}", digits, re.ASCII) or int(digits, 8) > RANGES["umask"][1]:
        raise ValueError("%r is not an octal umask from 000 to 777" % (value,))
    return int(digits, 8)


def _c_optional_int(key):
    """A coerce function: None, or an integer within ``RANGES[key]``."""
    minimum, maximum = RANGES[key]
    return lambda value, ctx: None if value is None else parse_int(value, minimum, maximum)


# key -> (resource name, the value is bytes, what it limits); setrlimit(2)
RLIMIT_KEYS = collections.OrderedDict([
    ("rlimit_nofile", ("RLIMIT_NOFILE", False, "open files")),
    ("rlimit_core", ("RLIMIT_CORE", True, "bytes of a core dump")),
    ("rlimit_as", ("RLIMIT_AS", True, "bytes of address space")),
    ("rlimit_nproc", ("RLIMIT_NPROC", False, "processes of the user")),
    ("rlimit_memlock", ("RLIMIT_MEMLOCK", True, "bytes of locked memory")),
    ("rlimit_stack", ("RLIMIT_STACK", True, "bytes of stack")),
    ("rlimit_cpu", ("RLIMIT_CPU", False, "seconds of CPU")),
    ("rlimit_fsize", ("RLIMIT_FSIZE", True, "bytes of a file written")),
])


def _rlimit_value(text, in_bytes):
    """One limit: ``unlimited`` (None), a number, or a size for a byte limit."""
    if isinstance(text, str) and text.lower() in ("unlimited", "infinity"):
        return None
    minimum, maximum = RANGES["rlimit"]
    return parse_size(text, maximum) if in_bytes else parse_int(text, minimum, maximum)


def _c_rlimit(key):
    """A coerce function for ``key``: ``N``, ``unlimited`` or ``SOFT:HARD``
    -> ``(soft, hard)``, None standing for unlimited."""
    in_bytes = RLIMIT_KEYS[key][1]

    def coerce(value, ctx):
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError("%r: use a number%s, unlimited or SOFT:HARD"
                             % (value, " (or a size such as 64MB)" if in_bytes else ""))
        parts = value.split(":") if isinstance(value, str) else [value]
        if len(parts) > 2:
            raise ValueError("%r: use a number, unlimited or SOFT:HARD" % (value,))
        soft, hard = _rlimit_value(parts[0], in_bytes), _rlimit_value(parts[-1], in_bytes)
        if hard is not None and (soft is None or soft > hard):
            raise ValueError("%r: the soft limit is above the hard one" % (value,))
        return (soft, hard)
    return coerce


def _c_groups(value, ctx):
    """Group names or ids -> a tuple of gids (the supplementary groups)."""
    return tuple(_lookup_id(item, grp.getgrgid, lambda n: grp.getgrnam(n).gr_gid, "group")
                 for item in parse_list(value))


LIMIT_ACTIONS = ("restart", "stop", "log", "signal")


def _c_limit_action(value, ctx):
    """``restart``, ``stop``, ``log`` or ``signal:NAME`` -> ``(action, signum)``."""
    text = value.strip() if isinstance(value, str) else ""
    action, colon, sig = text.partition(":")
    action = action.strip().lower()
    if action not in LIMIT_ACTIONS or bool(colon) != (action == "signal"):
        raise ValueError("%r: use restart, stop, log or signal:NAME" % (value,))
    return (action, _c_signal(sig.strip(), ctx) if colon else None)


# -- schedules ------------------------------------------------------------------
# ``schedule = CRON`` (five fields, as crontab(5)) or ``schedule = every
# DURATION``: when a scheduled template runs (the ``Scheduler`` of §8
# starts the runs).  Pure: a next time is computed from ``now`` (Unix time,
# an argument), in UTC or in the local time zone through time.localtime
# and time.mktime only.
#
# Rules, those of Vixie cron where crontab(5) leaves a choice:
# * day of month and day of week: when both fields are restricted (neither
#   starts with ``*``), a day matches if EITHER matches ("1 * mon": the 1st
#   and every Monday); otherwise both must (an unrestricted field matches
#   every day).
# * a local time that does not exist (the hour skipped when summer time
#   begins) runs once, at the end of the gap (02:30 -> 03:00 in Berlin);
# * a local time that occurs twice (the hour repeated when summer time
#   ends) runs once, at its first occurrence, unless the hour field starts
#   with ``*`` (a job running every hour or more often also runs in the
#   repeated hour, on real time).
# * nothing is caught up: the next run is the first one after now.

CRON_FIELDS = (      # name, lowest, highest, names (of lowest, lowest + 1, ...)
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day of month", 1, 31, ()),
    ("month", 1, 12, ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep",
                      "oct", "nov", "dec")),
    ("day of week", 0, 7, ("sun", "mon", "tue", "wed", "thu", "fri", "sat")),
)
CRON_MACROS = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
               "@weekly": "0 0 * * 0", "@monthly": "0 0 1 * *", "@yearly": "0 0 1 1 *",
               "@annually": "0 0 1 1 *"}
CRON_SEARCH_DAYS = 8 * 366 + 1       # 29 February can be 8 years away (2096 -> 2104)
EVERY_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_EVERY_RE = re.compile(r"([0-9]{1,9})([smhd]?)", re.ASCII)
DAY = 86400


def _cron_number(text, index) -> int:
    name, lowest, highest, names = CRON_FIELDS[index]
    if text.lower() in names:
        return lowest + names.index(text.lower())
    if not is_ascii_digits(text) or not lowest <= int(text) <= highest:
        raise ValueError("%s field: %r is not %d-%d%s" % (
            name, text, lowest, highest, " or a name (%s)" % ", ".join(names) if names else ""))
    return int(text)


def _cron_field(text, index) -> frozenset:
    """One field (``*``, ``5``, ``1-5``, ``mon-fri``, ``*/15``, ``10-50/20``,
    ``5/10`` = ``5-max/10``, lists of them) -> the set of values."""
    name, lowest, highest, _ = CRON_FIELDS[index]
    values = set()
    for item in text.split(","):
        span, slash, step_text = item.partition("/")
        step = 1
        if slash:
            if not is_ascii_digits(step_text) or not 1 <= int(step_text) <= highest:
                raise ValueError("%s field: step %r in %r is not 1-%d"
                                 % (name, step_text, item, highest))
            step = int(step_text)
        if span == "*":
            first, last = lowest, highest
        elif "-" in span:
            first, last = (_cron_number(v, index) for v in span.split("-", 1))
            if first > last:
                raise ValueError("%s field: range %r runs backwards" % (name, span))
        else:
            first = _cron_number(span, index)
            last = highest if slash else first
        values.update(range(first, last + 1, step))
    if index == 4 and 7 in values:
        values.discard(7)
        values.add(0)                    # 7 is Sunday too
    return frozenset(values)


class Schedule:
    """A parsed ``schedule``: ``every`` (seconds) or the five cron fields
    as sets (``weekdays`` 0 = Sunday); ``day_or``: day of month and day
    of week both restricted, so either matches; ``hour_star``: the hour
    field starts with ``*`` (runs again in a repeated local hour)."""

    __slots__ = ("text", "every", "minutes", "hours", "days", "months", "weekdays",
                 "day_or", "hour_star")

    def __init__(self, text, every=None, fields=None, day_or=False, hour_star=False):
        self.text, self.every, self.day_or, self.hour_star = text, every, day_or, hour_star
        self.minutes, self.hours, self.days, self.months, self.weekdays = \
            fields or (None,) * 5

    def __eq__(self, other):
        return isinstance(other, Schedule) and self.text == other.text

    def __repr__(self):
        return "Schedule(%r)" % self.text

    @classmethod
    def parse(cls, value) -> "Schedule":
        if isinstance(value, Schedule):
            return value
        if not isinstance(value, str) or not value.strip():
            raise ValueError("%r: give five cron fields, @hourly, @daily, @weekly, "
                             "@monthly or every DURATION (30s, 15m, 2h)" % (value,))
        text = " ".join(value.split())
        head, _, rest = text.partition(" ")
        if head.lower() == "every":
            return cls(text, every=parse_every(rest))
        if head.startswith("@"):
            if head.lower() not in CRON_MACROS or rest:
                raise ValueError("%r: use %s" % (text, ", ".join(sorted(CRON_MACROS))))
            fields_text = CRON_MACROS[head.lower()].split()
        else:
            fields_text = text.split()
        if len(fields_text) != 5:
            raise ValueError("%r has %d fields: use minute hour day-of-month month "
                             "day-of-week, @daily or every DURATION" % (text, len(fields_text)))
        fields = tuple(_cron_field(f, i) for i, f in enumerate(fields_text))
        day_or = not fields_text[2].startswith("*") and not fields_text[4].startswith("*")
        schedule = cls(text, fields=fields, day_or=day_or,
                       hour_star=fields_text[1].startswith("*"))
        if schedule.next_after(946684800.0, utc=True) is None:       # from 2000-01-01
            raise ValueError("%r never runs (no month has that day)" % text)
        return schedule

    def day_matches(self, year, month, mday, weekday) -> bool:
        """``weekday``: 0 = Sunday."""
        if month not in self.months:
            return False
        dom, dow = mday in self.days, weekday in self.weekdays
        return dom or dow if self.day_or else dom and dow

    def next_after(self, now: float, utc: bool = True):
        """The first run strictly after Unix time ``now`` (a float), or
        None if there is none within CRON_SEARCH_DAYS (never, for a
        schedule that passed ``parse``).  ``every`` schedules: now +
        every."""
        if self.every is not None:
            return now + self.every
        if utc:
            day = int(now // DAY)
        else:
            day = int((now + time.localtime(now).tm_gmtoff) // DAY)
        for day in range(day, day + CRON_SEARCH_DAYS):
            g = time.gmtime(day * DAY)
            if not self.day_matches(g.tm_year, g.tm_mon, g.tm_mday, (g.tm_wday + 1) % 7):
                continue
            for hour in sorted(self.hours):
                for minute in sorted(self.minutes):
                    if utc:
                        instants = (float(day * DAY + hour * 3600 + minute * 60),)
                    else:
                        instants = local_instants(g.tm_year, g.tm_mon, g.tm_mday, hour, minute)
                        instants = instants if self.hour_star else instants[:1]
                    for when in instants:
                        if when > now:
                            return when
        return None


def parse_every(text) -> float:
    """``30s``, ``15m``, ``2h``, ``1d``, ``1h30m``, ``90`` (seconds): from 1
    second to MAX_DURATION (a week)."""
    text = text.strip().lower()
    parts = _EVERY_RE.findall(text)
    if not text or "".join(n + u for n, u in parts) != text or \
            any(not unit for _, unit in parts[:-1]):
        raise ValueError("every %r: use a duration such as 30s, 15m, 2h or 1h30m" % text)
    seconds = sum(int(n) * EVERY_UNITS[u or "s"] for n, u in parts)
    if not 1 <= seconds <= MAX_DURATION:
        raise ValueError("every %s: %d seconds is not 1 second to %d (a week)"
                         % (text, seconds, MAX_DURATION))
    return float(seconds)


def local_instants(year, month, mday, hour, minute) -> tuple:
    """The Unix times at which the local clock reads this minute, earliest
    first: one, two in a repeated hour, and for a minute skipped by a
    change to summer time the end of the gap (its one instant)."""
    wall = (year, month, mday, hour, minute)
    found = set()
    for isdst in (0, 1):
        try:
            when = time.mktime(wall + (0, 0, 0, isdst))
        except (OverflowError, ValueError):
            continue
        if time.localtime(when)[:5] == wall:
            found.add(when)
    if found:
        return tuple(sorted(found))
    return (_gap_end(wall + (0,)),)


def _gap_end(wall) -> float:
    """The first instant whose local time is after ``wall``, a time that
    does not exist: a binary search over the day around it (local time
    only goes forward across a gap)."""
    guess = int(time.mktime(wall + (0, 0, -1)))
    low, high = guess - DAY, guess + DAY
    while high - low > 1:
        middle = (low + high) // 2
        if tuple(time.localtime(middle)[:6]) >= wall:
            high = middle
        else:
            low = middle
    return float(high)


SCHEDULE_TIMEZONES = ("local", "utc")
OVERLAP_MODES = ("skip", "allow", "restart")


def _c_schedule(value, ctx):
    return Schedule.parse(value)


def _c_choice(choices):
    def coerce(value, ctx):
        text = value.strip().lower() if isinstance(value, str) else value
        if text not in choices:
            raise ValueError("%r: use %s" % (value, " or ".join(choices)))
        return text
    return coerce


# name -> (coerce(value, ctx), default, help).  The default is what the
# daemon uses when the key is absent; ``cwd`` None means the config file's
# directory (or the daemon's cwd for templates made over HTTP).
PROCESS_KEYS = collections.OrderedDict([
    ("cmd", (_c_cmd, None, "program to run; may hold a whole command line")),
    ("args", (_c_args, None, "arguments (shell-quoted); if set, cmd is not split")),
    ("env", (_c_env, {}, "explicit environment (JSON only; INI uses [env:NAME])")),
    ("uid", (_c_uid, None, "user name or numeric id to run as")),
    ("gid", (_c_gid, None, "group name or numeric id to run as")),
    ("cwd", (_c_cwd, None, "working directory (default: the config file's)")),
    ("detach", (_c_bool, False, "reported as 'detached' in spawn events")),
    ("shell", (_c_bool, False, "run as: sh -c 'cmd args'")),
    ("os_env", (_c_bool, True, "start from the daemon's environment")),
    ("numprocesses", (_c_ranged(parse_int, "numprocesses"), 1,
                      "how many processes to keep running")),
    ("start", (_c_bool, True, "start when loaded")),
    ("priority", (_c_ranged(parse_int, "priority"), sys.maxsize, "start-up order, lowest first")),
    ("flapping", (_c_flapping, None, "gaffer 0.4.4: attempts, window, retry_in, max_retry, "
                  "or off; mapped onto startsecs, backoff and start_retries")),
    ("restart", (_c_restart, "always", "always, on-failure or never")),
    ("success_exit_codes", (_c_exit_codes, [0], "exit statuses that count as success")),
    ("startsecs", (_c_ranged(parse_float, "startsecs"), 1.0,
                   "an exit before this many seconds up is a failed start")),
    ("restart_delay", (_c_ranged(parse_float, "restart_delay"), 0.0,
                       "seconds before restarting a process that was up startsecs")),
    ("backoff", (_c_backoff, Backoff(), "initial, factor, max: delays after failed starts")),
    ("start_retries", (_c_start_retries, UNLIMITED,
                       "failed starts in a row retried before the process is failed")),
    ("stop_signal", (_c_signal, int(signal.SIGTERM), "sent to the group by a stop")),
    ("critical", (_c_bool, False, "a failure of this template stops gafferd (exit 1)")),
    ("ready", (_c_ready, ReadySpec("startsecs"), "startsecs, spawn, notify, log:REGEX, "
               "tcp:[HOST:]PORT, http:URL or cmd:COMMAND")),
    ("ready_timeout", (_c_ranged(parse_float, "ready_timeout"), 60.0,
                       "a process not ready by then is a failed start")),
    ("ready_interval", (_c_ranged(parse_float, "ready_interval"), 1.0,
                        "seconds between readiness probes")),
    ("depends_on", (_c_depends_on, (), "NAME[:CONDITION], ...: templates or groups that "
                    "must be started, ready, completed or completed_successfully first")),
    ("watchdog_sec", (_c_ranged(parse_float, "watchdog_sec"), 0.0,
                      "a ready process silent (no WATCHDOG=1) this long is killed; 0: off")),
    ("redirect_output", (_c_labels, [], "labels for stdout and stderr")),
    ("redirect_input", (_c_bool, False, "give the process a stdin pipe")),
    ("graceful_timeout", (_c_ranged(parse_float, "graceful_timeout"),
                          DEFAULT_GRACEFUL_TIMEOUT, "seconds from SIGTERM to SIGKILL")),
    ("custom_streams", (_c_labels, [], "extra two-way pipes on the fds after the sockets "
                        "(3, 4, ... without sockets)")),
    ("sockets", (_c_sockets, [], "[socket:NAME] sockets passed as fds 3, 4, ... with "
                 "LISTEN_FDS, LISTEN_PID and LISTEN_FDNAMES")),
    ("restart_mode", (_c_restart_mode, "restart", "restart: new processes, then the old "
                      "stop; rolling: one at a time, each new one ready first")),
    ("rolling_max_surge", (_c_ranged(parse_int, "rolling_max_surge"), 1,
                           "new processes a rolling restart starts at once")),
    ("stdout_logfile", (_c_logfile, None, "file for the first output label ('-' = stdout)")),
    ("stderr_logfile", (_c_logfile, None, "file for the second output label")),
    ("logfile", (_c_logfile, None, "file for every output label")),
    ("logfile_maxbytes", (_c_ranged(parse_size, "logfile_maxbytes"), 50 * 1024 ** 2,
                          "rotate log files at this size")),
    ("logfile_backups", (_c_ranged(parse_int, "logfile_backups"), 10,
                         "rotated log files kept (FILE.1 newest)")),
    ("log_timestamps", (_c_bool, False, "prefix each logged line with an ISO time")),
    ("log_format", (_c_log_format, "raw", "raw, or json: one object per line with time, "
                    "name, id, pid, stream and line")),
    ("log_events", (_c_bool, False, "also write gafferd's spawn, ready, exit and restart "
                    "lines for this template into its log files")),
    ("syslog", (_c_bool, False, "send each output line to syslog (stdout at INFO, stderr at "
                "ERR)")),
    ("syslog_address", (_c_syslog_address, "/dev/log", "/dev/log, unix:PATH or "
                        "udp:IP:PORT")),
    ("syslog_facility", (_c_syslog_facility, "user", "syslog facility: user, daemon, "
                         "local0-local7...")),
    ("syslog_tag", (_c_syslog_tag, None, "syslog tag (default: the template name)")),
    ("output_buffer", (_c_ranged(parse_size, "output_buffer"),
                       DEFAULT_OUTPUT_BUFFER, "bytes of recent output kept per label")),
    ("env_file", (_c_env_file, (), "PATH, -PATH2: files of NAME=VALUE lines ('-': optional), "
                  "read at every spawn; [env:NAME] wins over them")),
    ("umask", (_c_umask, None, "octal umask of the process (027)")),
    ("nice", (_c_optional_int("nice"), None, "scheduling priority, -20 to 19")),
    ("oom_score_adj", (_c_optional_int("oom_score_adj"), None,
                       "the kernel OOM killer's bias, -1000 to 1000")),
] + [(key, (_c_rlimit(key), None, "limit of %s: N, unlimited or SOFT:HARD" % what))
     for key, (_, _, what) in RLIMIT_KEYS.items()] + [
    ("groups", (_c_groups, (), "supplementary groups, added to the user's")),
    ("max_memory", (_c_ranged(parse_size, "max_memory"), 0,
                    "resident memory of the process and its descendants; 0: no limit")),
    ("max_cpu", (_c_ranged(parse_float, "max_cpu"), 0.0,
                 "percent of one core used by the process tree; 0: no limit")),
    ("limit_for", (_c_ranged(parse_float, "limit_for"), 30.0,
                   "seconds a limit must be exceeded before limit_action")),
    ("limit_action", (_c_limit_action, ("restart", None),
                      "restart, stop, log or signal:NAME when a limit is exceeded")),
    ("schedule", (_c_schedule, None, "CRON (five fields or @daily...) or every DURATION: "
                  "run to completion at these times (restart then defaults to never)")),
    ("schedule_timezone", (_c_choice(SCHEDULE_TIMEZONES), "local",
                           "local or utc: the clock the cron fields read")),
    ("overlap", (_c_choice(OVERLAP_MODES), "skip",
                 "skip, allow or restart: a run due while the last one still runs")),
    ("run_on_start", (_c_bool, False, "a scheduled template also runs when loaded")),
])

# Keys echoed as written (a user name stays a name, a path stays relative).
_ECHO_RAW = ("args", "uid", "gid", "cwd", "stdout_logfile", "stderr_logfile", "logfile",
             "syslog_address",
             "logfile_maxbytes", "output_buffer", "stop_signal", "ready", "start_retries", "depends_on",
             "env_file", "umask", "groups", "max_memory", "limit_action") + tuple(RLIMIT_KEYS)

# Keys every INI template reports in GET /processes/NAME, given or not, as gaffer 0.4.4 did.
_INI_ALWAYS = ("args", "env", "uid", "gid", "cwd", "detach", "shell", "os_env",
               "numprocesses", "start", "priority")


class TemplateSpec:
    """A validated template definition; read-only once built.

    ``settings`` is what ``GET /processes/NAME`` echoes (the keys as given,
    typed); the attributes are the normalised values the manager uses.
    """

    def __init__(self, name, cmd, settings, values, base_dir, source, origin):
        self.name, self.cmd, self.settings = name, cmd, settings
        self.base_dir, self.source, self.origin = base_dir, source, origin
        self.group = name.split(":", 1)[0] if ":" in name else None
        for key, (_, default, _) in PROCESS_KEYS.items():
            setattr(self, key, values.get(key, default))
        self.labels = _output_labels(self.redirect_output, (
            self.stdout_logfile or self.logfile, self.stderr_logfile or self.logfile),
            both=self.syslog)

    def definition(self) -> dict:
        out = {"name": self.name, "cmd": self.cmd}
        out.update(self.settings)
        out.pop("start", None)
        return {k: _echo(v) for k, v in out.items()}

    def key(self, ignore=()) -> tuple:
        """What must be equal for a reload to leave the template alone
        (but for ``numprocesses`` and the keys in ``ignore``)."""
        d = self.definition()
        for name in ("numprocesses",) + tuple(ignore):
            d.pop(name, None)
        return (json.dumps(d, sort_keys=True, default=str), self.base_dir)

    def logfile_for(self, index: int):
        own = self.stdout_logfile if index == 0 else self.stderr_logfile if index == 1 else None
        return own or self.logfile


def _echo(value):
    """A typed setting as ``GET /processes/NAME`` shows it."""
    if isinstance(value, Flapping):
        return value.to_dict()
    if isinstance(value, Backoff):
        return value.to_list()
    if isinstance(value, (ReadySpec, Schedule)):
        return value.text
    return value


def _map_flapping(values) -> None:
    """The gaffer 0.4.4 key ``flapping = attempts, window, retry_in,
    max_retry`` in the per-process terms of today, for the keys the
    template does not set itself: ``startsecs = window`` (an exit within
    ``window`` of the start is a failed start), ``backoff = retry_in, 1,
    retry_in`` and ``start_retries = max_retry``.  ``attempts`` has no
    equivalent: one failed start of a process counts, never its siblings'.
    ``flapping = off`` changes nothing: the backoff stays."""
    flapping = values.get("flapping")
    if flapping is None:
        return
    values.setdefault("startsecs", flapping.window)
    values.setdefault("backoff", Backoff(flapping.retry_in, 1.0, flapping.retry_in))
    values.setdefault("start_retries", flapping.max_retry)


def _output_labels(redirect_output, logfiles, both=False) -> list:
    """The labels of stdout and stderr: ``redirect_output``'s first two,
    and a default label (``stdout``, ``stderr``) for a stream that has a
    log file but no label, since naming a file for a stream asks for it
    to be captured.  Labels are positional: a log file for stderr alone
    captures stdout too (into its ring, with no file), which the child
    would otherwise write to /dev/null.  ``both`` (syslog) captures both
    streams, files or not."""
    labels = list(redirect_output[:2])
    wanted = 2 if logfiles[1] or both else 1 if logfiles[0] else 0
    while len(labels) < wanted:
        default = ("stdout", "stderr")[len(labels)]
        labels.append(default if default not in labels else default + "2")
    return labels


MAX_TEMPLATE_NAME = 200      # characters; a name is a URL path segment and a log prefix


def _template_name_problem(name):
    """Why ``name`` cannot name a template, or None."""
    if not isinstance(name, str) or not name or "/" in name or \
            any(c.isspace() or ord(c) < 32 for c in name):
        return "invalid template name %r (no '/', spaces or control characters)" % (name,)
    if len(name) > MAX_TEMPLATE_NAME:
        return "invalid template name %r...: %d characters, at most %d" % (
            name[:20], len(name), MAX_TEMPLATE_NAME)
    if any(part in (".", "..") for part in name.split(":", 1)):
        return "invalid template name %r ('.' and '..' name directories, not templates)" % name
    return None


def unknown_key_message(key, known) -> str:
    """The warning for a key no table knows, with the closest known key."""
    close = typo_of(key, known)
    return "unknown key, ignored" + ("; did you mean %r?" % close if close else "")


def build_spec(name, cmd, raw, *, base_dir, source=None, section=None,
               origin="config", environ=None, warnings=None) -> TemplateSpec:
    """Validate one template; raise ConfigError naming the bad key, or
    ConfigErrors when several keys are bad (every one is reported).

    ``raw`` holds INI strings or JSON values.  Everything that can be
    checked before a spawn is checked here, not at spawn time: the name, numbers,
    users, groups, the working directory, ``$VAR`` references and that
    the executable exists.  A key no table knows is neither stored nor
    compared by ``TemplateSpec.key()``; it is reported as a line added
    to ``warnings`` (when a list is given), with a did-you-mean.
    """
    environ = os.environ if environ is None else environ
    ctx = {"base_dir": base_dir}

    def fail(key, message):
        return ConfigError(source, section, key, message)

    problem = _template_name_problem(name)
    if problem:
        raise fail(None, problem)
    problems = []
    if cmd is None:
        problems.append(fail("cmd", "missing (every template needs a cmd)"))
    values = {}
    settings = {}
    for key, value in raw.items():
        if key in ("name", "cmd") or (key == "group" and origin != "config"):
            continue                     # group: checked against the name below
        if key not in PROCESS_KEYS:
            if warnings is not None:
                warning = fail(key, unknown_key_message(key, PROCESS_KEYS))
                warnings.append(str(warning) if origin == "config"
                                else "%s: %s" % (key, warning.message))
            continue
        try:
            values[key] = PROCESS_KEYS[key][0](value, ctx)
        except ValueError as exc:
            problems.append(fail(key, str(exc)))
            continue
        settings[key] = values[key] if origin == "config" and key not in _ECHO_RAW else value
    if cmd is not None:
        try:
            values["cmd"] = _c_cmd(cmd, ctx)
        except ValueError as exc:
            problems.append(fail("cmd", str(exc)))
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise ConfigErrors(problems)
    if origin == "config":
        for key in _INI_ALWAYS:
            settings.setdefault(key, PROCESS_KEYS[key][1])
        settings["group"] = name.split(":", 1)[0] if ":" in name else None
        if "env" in values:
            settings["env"] = values["env"]
        settings = {k: _echo(v) for k, v in settings.items()}
    elif ":" in name:
        settings["group"] = name.split(":", 1)[0]
    if "group" in raw and origin != "config" and raw["group"] != settings.get("group"):
        raise fail("group", "is derived from the name (group:name)")
    clash = set(values.get("sockets", ())) & set(values.get("custom_streams", ()))
    if clash:
        raise fail("custom_streams", "%s is also in sockets: LISTEN_FDNAMES and the custom "
                   "stream labels would name two fds alike" % ", ".join(sorted(clash)))
    if "schedule" in values:
        values.setdefault("restart", "never")      # a run ends; retries only when asked
    else:
        for key in ("schedule_timezone", "overlap", "run_on_start"):
            if key in values:
                problems.append(fail(key, "applies only to a template with a schedule"))
        if len(problems) == 1:
            raise problems[0]
        if problems:
            raise ConfigErrors(problems)
    _map_flapping(values)
    spec = TemplateSpec(name, values["cmd"], settings, values, base_dir, source, origin)
    spec.cwd = spec.cwd or base_dir
    try:
        env = checked_environment(spec, environ)
    except ValueError as exc:            # an env_file changed since its key was read
        raise fail("env_file", str(exc)) from None
    try:
        resolve_command(spec, env)
    except CommandError as exc:
        raise fail(exc.key, str(exc)) from None
    return spec


def checked_environment(spec: TemplateSpec, environ) -> dict:
    """``child_environment`` with the GAFFERD_NAME, GAFFERD_ID and
    GAFFERD_SLOT every process gets at its start (id and slot 0 here), so
    a check of ``cmd`` and ``args`` knows the variables will be there."""
    env = child_environment(spec, environ)
    env.update(GAFFERD_NAME=spec.name, GAFFERD_ID="0", GAFFERD_SLOT="0")
    return env


def child_environment(spec: TemplateSpec, environ) -> dict:
    """Not gaffer 0.4.4's in-place merge: the daemon's environment (if os_env)
    overlaid with the ``env_file`` files in order, then the explicit env,
    a new dict every time.

    With a ``uid``, HOME, USER, LOGNAME and SHELL are those of that user
    (from the password database, as ``su -`` and supervisord set them),
    so a program run as ``nobody`` does not write into root's home; a
    variable the template's env files or own env set wins over them.
    The files are read on every call: ValueError when a required one is
    gone or no longer parses (``read_env_files``)."""
    env = dict(environ) if spec.os_env else {}
    if spec.uid is not None:
        env.update(_user_environment(spec.uid))
    if spec.env_file:
        env.update(read_env_files(spec.env_file))
    env.update(spec.env)
    return env


def _user_environment(uid: int) -> dict:
    """HOME, USER, LOGNAME and SHELL of ``uid``; {} if it has no entry."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return {}
    return {"HOME": entry.pw_dir, "USER": entry.pw_name, "LOGNAME": entry.pw_name,
            "SHELL": entry.pw_shell or "/bin/sh"}


def command_line(spec: TemplateSpec, env) -> list:
    """argv for a spawn (``shell``: cmd unsplit under sh -c; $VAR also in argv[0]).

    Raises KeyError for an unknown ``$VAR`` and ValueError for bad quoting.
    """
    if spec.shell:
        text = spec.cmd
        if spec.args:
            text += " " + " ".join(shlex.quote(a) for a in spec.args)
        return ["sh", "-c", text]
    if spec.args is not None:
        exe, args = spec.cmd, list(spec.args)
    else:
        try:
            tokens = shlex.split(spec.cmd)
        except ValueError as exc:
            raise ValueError("%r cannot be split: %s" % (spec.cmd, exc)) from None
        exe, args = (tokens[0], tokens[1:]) if len(tokens) > 1 else (spec.cmd, [])
    return [string.Template(exe).substitute(env)] + \
        [string.Template(a).substitute(env) for a in args]


class CommandError(ValueError):
    """Why a template's command cannot run; ``key`` is the config key to
    blame (``cmd`` or ``args``)."""

    def __init__(self, key, message):
        super().__init__(message)
        self.key = key


def resolve_command(spec: TemplateSpec, env, cache=None):
    """``(argv, executable)`` that a spawn of ``spec`` in ``env`` execs:
    the one place that turns ``cmd``/``args`` into both, for the config
    check, the spawn and ``--check``.  Raises CommandError for an
    unknown ``$VAR``, bad quoting and an executable that is not there.
    A spawn passes the spec's ``_SpawnCache``: what does not change
    between its starts is not worked out again."""
    key = "args" if spec.args is not None else "cmd"
    try:
        argv = list(cache.argv) if cache is not None and cache.argv is not None \
            else command_line(spec, env)
    except KeyError as exc:
        raise CommandError(key, "unknown variable $%s (not in the environment)"
                           % exc.args[0]) from None
    except ValueError as exc:
        raise CommandError(key, str(exc)) from None
    executable = cache.executable(argv[0], spec, env) if cache is not None \
        else find_executable(argv[0], spec, env)
    if executable is None:
        raise CommandError("cmd", "executable %r not found%s" % (
            argv[0], "" if "/" in argv[0] else " in PATH"))
    return argv, executable


def find_executable(exe, spec, env):
    """The absolute path a spawn of ``exe`` would exec, or None.  ``./x``
    and ``../x`` are relative to the config file's directory, other
    relative paths with a slash to the working directory, bare names to
    PATH (whose relative entries, like the exec, start from the working
    directory)."""
    if "/" in exe:
        if os.path.isabs(exe):
            path = exe
        elif exe.startswith(("./", "../")) and spec.base_dir:
            path = os.path.join(spec.base_dir, exe)
        else:
            path = os.path.join(spec.cwd or os.getcwd(), exe)
        path = os.path.normpath(path)
        return path if os.path.isfile(path) and os.access(path, os.X_OK) else None
    for directory in env.get("PATH", os.defpath).split(os.pathsep):
        path = os.path.normpath(os.path.join(spec.cwd or os.getcwd(), directory or ".", exe))
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


class Address:
    """One listening address: ``unix:/path``, ``[v6]:port``, ``host:port``."""

    def __init__(self, text, kind, host=None, port=None, path=None):
        self.text, self.kind, self.host, self.port, self.path = text, kind, host, port, path

    @classmethod
    def parse(cls, text: str) -> "Address":
        text = text.strip()
        if text.startswith("unix:"):
            path = text[5:]
            if not path:
                raise ValueError("unix: needs a path")
            return cls(text, "unix", path=os.path.abspath(path))
        m = re.match(r"^\[([0-9A-Fa-f:.%a-zA-Z]+)\](?::(\S*))?$", text)
        if m:
            host, port = m.group(1), m.group(2)
        elif text.count(":") == 1:
            host, port = text.split(":")
        elif ":" in text:
            raise ValueError("%r: write IPv6 addresses as [addr]:port" % text)
        else:
            host, port = text, None
        if port is None or port == "":
            port = DEFAULT_PORT
        elif not is_ascii_digits(port) or int(port) > 65535:
            raise ValueError("%r: port %r is not a number from 0 to 65535" % (text, port))
        return cls(text, "tcp", host=host or "0.0.0.0", port=int(port))

    def is_loopback(self, resolve=True) -> bool:
        """True if only this machine can connect.  ``localhost`` itself
        is (the server binds 127.0.0.1 and ::1 for it, never a lookup);
        any other name, ``*.localhost`` included, is looked up and every
        address it resolves to must be a loopback one (an /etc/hosts line
        can point ``app.localhost`` anywhere).  ``resolve=False``: a name
        other than ``localhost`` counts as not loopback."""
        if self.kind == "unix":
            return True
        known = loopback_literal(self.host)
        if known is not None:
            return known
        if not resolve:
            return False
        try:
            infos = socket.getaddrinfo(self.host, self.port, 0, socket.SOCK_STREAM)
        except OSError:
            return False
        return all(loopback_literal(i[4][0]) for i in infos)


def _c_addresses(value, ctx):
    addresses = []
    for text in str(value).split(","):
        if text.strip():
            text = text.strip()
            if text.startswith("unix:") and not text[5:].startswith("/") and text[5:]:
                text = "unix:" + os.path.join(ctx["base_dir"], text[5:])
            addresses.append(Address.parse(text))
    return addresses or [Address.parse("")]


def _c_path(value, ctx):
    return os.path.normpath(os.path.join(ctx["base_dir"], os.path.expanduser(str(value).strip())))


def _c_list(value, ctx):
    return parse_list(value)


def _c_origins(value, ctx):
    origins = [o.rstrip("/") for o in parse_list(value)]
    for origin in origins:
        if origin != "*" and not re.match(r"^https?://[^/\s]+$", origin):
            raise ValueError("%r is not an origin like https://example.com[:port]" % origin)
    return origins


def _c_secret(value, ctx):
    return str(value).strip() or None


# [gaffer] keys and the endpoint keys they give defaults for; the same
# format as PROCESS_KEYS: name -> (coerce(value, ctx), default, help).
ENDPOINT_KEYS = collections.OrderedDict([
    ("bind", (_c_addresses, None, "comma-separated addresses to listen on")),
    ("certfile", (_c_path, None, "TLS certificate (turns on HTTPS)")),
    ("keyfile", (_c_path, None, "TLS private key")),
    ("backlog", (_c_ranged(parse_int, "backlog"), DEFAULT_BACKLOG, "listen() backlog")),
    ("cors_origins", (_c_origins, [], "origins allowed to make cross-site calls")),
    ("server_names", (_c_list, [], "extra Host names accepted on loopback binds")),
    ("auth_token", (_c_secret, None, "require this token (Bearer or Basic password)")),
    ("auth_token_file", (_c_path, None, "read auth_token from this file")),
    ("public_ping", (_c_bool, False, "let /ping and /ready through without the token")),
    ("insecure", (_c_bool, False, "allow a non-loopback bind without a token")),
    ("max_body_size", (_c_ranged(parse_size, "max_body_size"), DEFAULT_MAX_BODY,
                       "largest request body")),
    ("keepalive_timeout", (_c_ranged(parse_float, "keepalive_timeout"), DEFAULT_KEEPALIVE,
                           "close idle connections after")),
    ("request_timeout", (_c_ranged(parse_float, "request_timeout"), REQUEST_TIMEOUT,
                         "a TLS handshake, a request, or each step of a reply must take less")),
    ("max_connections", (_c_ranged(parse_int, "max_connections"), DEFAULT_MAX_CONNECTIONS,
                         "open connections at most")),
])
GAFFER_KEYS = ("http_endpoints", "plugins_dir", "plugin_dir", "include", "include_dir",
               "logfile", "logfile_maxbytes", "logfile_backups",
               "syslog", "syslog_address", "syslog_facility", "syslog_tag")


class EndpointSpec:
    """One HTTP endpoint: its addresses, TLS files, limits and security."""

    def __init__(self, name, values, source=None):
        self.name, self.source = name, source
        for key, (_, default, _) in ENDPOINT_KEYS.items():
            setattr(self, key, values.get(key, default))
        self.addresses = self.bind

    @property
    def tls(self) -> bool:
        return bool(self.certfile or self.keyfile)


def build_endpoint(name, items, defaults, source, section, base_dir, resolve=True):
    """Validate an endpoint; ``items`` override ``defaults`` ([gaffer])."""
    values, problems = {}, collections.OrderedDict()
    ctx = {"base_dir": base_dir}
    for key, value in itertools.chain(defaults.items(), items.items()):
        if key not in ENDPOINT_KEYS:
            continue
        try:
            values[key] = ENDPOINT_KEYS[key][0](value, ctx)
            problems.pop(key, None)
        except ValueError as exc:          # a bad [gaffer] default is reported there
            problems[key] = ConfigError(source, section, key, str(exc))
            if key not in items:
                del problems[key]
    if len(problems) > 1:
        raise ConfigErrors(list(problems.values()))
    for problem in problems.values():
        raise problem
    if not values.get("backlog"):
        values["backlog"] = DEFAULT_BACKLOG       # 0 means unset, as in gaffer 0.4.4
    spec = EndpointSpec(name, values, source)
    if spec.auth_token_file and not spec.auth_token:
        try:
            with open(spec.auth_token_file) as f:
                spec.auth_token = f.read().strip() or None
        except OSError as exc:
            raise ConfigError(source, section, "auth_token_file",
                              "cannot read %r: %s" % (spec.auth_token_file, exc.strerror)) from None
        if not spec.auth_token:
            raise ConfigError(source, section, "auth_token_file",
                              "%r is empty" % spec.auth_token_file)
    for path_key in ("certfile", "keyfile"):
        path = getattr(spec, path_key)
        if path and not os.path.isfile(path):
            raise ConfigError(source, section, path_key, "file %r does not exist" % path)
    if spec.keyfile and not spec.certfile:
        raise ConfigError(source, section, "certfile", "keyfile is set but certfile is not")
    if resolve and not spec.auth_token and not spec.insecure:
        for address in spec.bind:
            if not address.is_loopback():
                raise ConfigError(source, section, "bind", (
                    "%r is not a loopback address and no auth_token is set: anyone "
                    "who reaches it can run commands; set auth_token (or "
                    "auth_token_file), or insecure = true to accept the risk")
                    % address.text)
    return spec


def token_file_warning(spec: EndpointSpec):
    """A warning (str) if the endpoint's auth_token_file is open to its
    group or others, else None.  The token is the whole of the API's
    authentication: whoever reads it can run commands as the daemon."""
    if not spec.auth_token_file:
        return None
    try:
        mode = os.stat(spec.auth_token_file).st_mode
    except OSError:
        return None
    if not mode & 0o077:
        return None
    return ("[endpoint:%s] auth_token_file %r is open to its group or others (mode %04o): "
            "whoever can read it can run commands through the API; chmod 600 it"
            % (spec.name, spec.auth_token_file, stat.S_IMODE(mode)))


# -- sockets held for the programs ---------------------------------------------
# A [socket:NAME] section is a listening socket the daemon binds itself and
# passes to the templates that name it in ``sockets`` (the systemd
# socket-activation protocol).  Parsed here; bound by ``HeldSockets`` (§12).

SOCKET_KEYS = collections.OrderedDict([
    ("bind", (None, "HOST:PORT, [V6]:PORT or unix:PATH")),
    ("backlog", (DEFAULT_BACKLOG, "listen() backlog")),
    ("mode", (0o600, "permissions of a unix socket file (octal)")),
    ("reuseport", (False, "set SO_REUSEPORT before bind()")),
])


def _socket_name_problem(name):
    if not name or not re.match(r"^[A-Za-z0-9_.-]{1,64}$", name):
        return ("invalid socket name %r (letters, digits, '_', '.', '-'; LISTEN_FDNAMES "
                "separates names with ':')" % (name,))
    return None


class SocketSpec:
    """One [socket:NAME]: ``address`` (an Address with an explicit port,
    or a unix path), ``backlog``, ``mode`` (unix only), ``reuseport``."""

    def __init__(self, name, address, backlog, mode, reuseport, source=None):
        self.name, self.address, self.backlog = name, address, backlog
        self.mode, self.reuseport, self.source = mode, reuseport, source

    def key(self) -> tuple:
        """What must be equal for a reload to keep the bound socket."""
        return (self.address.text, self.address.kind, self.address.path, self.mode,
                self.reuseport)

    def to_dict(self) -> dict:
        out = {"name": self.name, "bind": self.address.text, "backlog": self.backlog}
        if self.address.kind == "unix":
            out["mode"] = "%04o" % self.mode
        if self.reuseport:
            out["reuseport"] = True
        return out


def build_socket(name, items, source=None, section=None, base_dir=None) -> SocketSpec:
    """Validate one [socket:NAME]; ConfigError naming the bad key."""
    def fail(key, message):
        return ConfigError(source, section, key, message)
    problem = _socket_name_problem(name)
    if problem:
        raise fail(None, problem)
    for key in items:
        if key not in SOCKET_KEYS:
            raise fail(key, unknown_key_message(key, SOCKET_KEYS).replace(
                "unknown key, ignored", "unknown socket key"))
    text = str(items.get("bind", "")).strip()
    if not text:
        raise fail("bind", "missing: HOST:PORT, [V6]:PORT or unix:PATH")
    if text.startswith("unix:") and text[5:] and not text[5:].startswith("/"):
        text = "unix:" + os.path.join(base_dir or os.getcwd(), text[5:])
    if text.startswith("unix:"):
        pass
    elif not re.search(r":[0-9]+$", text):
        raise fail("bind", "%r has no port: write HOST:PORT, [V6]:PORT or unix:PATH" % text)
    try:
        address = Address.parse(text)
    except ValueError as exc:
        raise fail("bind", str(exc)) from None
    values = {}
    for key, convert in (("backlog", lambda v: parse_int(v, *RANGES["backlog"])),
                         ("mode", lambda v: _parse_mode(v)),
                         ("reuseport", parse_bool)):
        if key in items:
            try:
                values[key] = convert(items[key])
            except ValueError as exc:
                raise fail(key, str(exc)) from None
    if "mode" in values and address.kind != "unix":
        raise fail("mode", "only a unix: socket has a mode")
    return SocketSpec(name, address, values.get("backlog") or DEFAULT_BACKLOG,
                      values.get("mode", SOCKET_KEYS["mode"][0]),
                      values.get("reuseport", False), source)


def _parse_mode(value) -> int:
    text = str(value).strip()
    if not re.match(r"^0?[0-7]{3}$", text):
        raise ValueError("%r is not an octal mode such as 660" % (value,))
    return int(text, 8)


def socket_problems(specs, sockets) -> list:
    """``(template name, message)`` for each ``sockets`` entry of
    ``specs`` that names no [socket:NAME] of ``sockets`` (names)."""
    return [(spec.name, "names %r, which is no [socket:NAME] section%s" % (
        name, " (sockets: %s)" % ", ".join(sorted(sockets)) if sockets else ""))
        for spec in specs for name in spec.sockets if name not in sockets]


# -- dependencies between templates ------------------------------------------
# ``depends_on`` makes a directed graph over templates (a group name stands
# for every template of the group).  It must name only templates or groups
# that exist, never the template itself, and have no cycle: checked for the
# whole set of templates that will exist together (a config file, a reload
# with the templates made over HTTP, a template added or changed over HTTP).

def dependency_targets(name, templates, groups) -> list:
    """The templates ``name`` stands for in a ``depends_on``: the template
    of that name if there is one, else every template of the group of that
    name, else []."""
    if name in templates:
        return [name]
    return list(groups.get(name, ()))


def dependency_problems(specs) -> list:
    """``(template name, message)`` for each mistake in the ``depends_on``
    of ``specs`` (every TemplateSpec that will exist together): an unknown
    name, a template that depends on itself (or on its own group), and each
    cycle, with its path (``a -> b -> c -> a``).  [] when the graph is
    sound.  Pure; iterative, so a long chain never hits the recursion
    limit."""
    templates = collections.OrderedDict((s.name, s) for s in specs)
    groups = {}
    for spec in specs:
        if spec.group:
            groups.setdefault(spec.group, []).append(spec.name)
    problems, edges = [], {}
    for spec in specs:
        targets = []
        for name, _ in spec.depends_on:
            members = dependency_targets(name, templates, groups)
            if not members:
                hint = " (conditions: %s)" % ", ".join(DEPENDENCY_CONDITIONS) \
                    if ":" in name else ""
                problems.append((spec.name, "depends on %r, which is neither a template "
                                            "nor a group%s" % (name, hint)))
            elif spec.name in members:
                problems.append((spec.name, "depends on itself%s" % (
                    "" if name == spec.name else " (through its group %r)" % name)))
            else:
                targets.extend(m for m in members if m not in targets)
        edges[spec.name] = targets
    done, reported = set(), set()
    for root in templates:
        if root in done:
            continue
        path, on_path, stack = [root], {root: 0}, [iter(edges[root])]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                stack.pop()
                node = path.pop()
                del on_path[node]
                done.add(node)
                continue
            if nxt in on_path:
                cycle = path[on_path[nxt]:] + [nxt]
                key = frozenset(cycle)
                if key not in reported:
                    reported.add(key)
                    problems.append((nxt, "dependency cycle: %s" % " -> ".join(cycle)))
            elif nxt not in done:
                on_path[nxt] = len(path)
                path.append(nxt)
                stack.append(iter(edges[nxt]))
    return problems


class Config:
    """Everything one config file (and its includes) says."""

    def __init__(self, path=None):
        self.path = path
        self.base_dir = os.path.dirname(os.path.abspath(path)) if path else os.getcwd()
        self.parser = None                 # configparser given to plugins
        self.templates = []                # TemplateSpec, in start-up order
        self.endpoints = []                # EndpointSpec
        self.sockets = collections.OrderedDict()   # name -> SocketSpec
        self.webhooks = []                 # (event, url)
        self.plugins_dirs = []
        self.defaults = {}                 # [gaffer] endpoint defaults
        self.warnings = []
        self.logfile = None                # [gaffer] logfile: the daemon's own log
        self.logfile_maxbytes = 50 * 1024 ** 2
        self.logfile_backups = 10
        self.syslog = False                # [gaffer] syslog: the daemon's log lines to syslog
        self.syslog_address = "/dev/log"
        self.syslog_facility = "daemon"
        self.syslog_tag = "gafferd"


_SECTION_TYPES = ("gaffer", "webhooks", "process", "env", "endpoint", "socket")


def _parse_ini_file(path, label):
    """One INI file with case kept and no [DEFAULT] magic (merged later)."""
    parser = configparser.ConfigParser(interpolation=None, default_section="\0default",
                                       strict=True)
    parser.optionxform = str
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f, source=label)
    except FileNotFoundError:
        raise ConfigError(label, None, None, "no such file") from None
    except IsADirectoryError:
        raise ConfigError(label, None, None, "is a directory, not a config file") from None
    except PermissionError:
        raise ConfigError(label, None, None, "permission denied") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(label, None, None, "not UTF-8 text (%s)" % exc.reason) from None
    except configparser.MissingSectionHeaderError as exc:
        raise ConfigError(label, None, None, "line %d: %r comes before any [section]"
                          % (exc.lineno, exc.line.strip())) from None
    except configparser.DuplicateSectionError as exc:
        raise ConfigError(label, exc.section, None, "line %s: section defined twice"
                          % exc.lineno) from None
    except configparser.DuplicateOptionError as exc:
        raise ConfigError(label, exc.section, exc.option, "line %s: key defined twice "
                          "in this section" % exc.lineno) from None
    except configparser.ParsingError as exc:
        raise ConfigErrors([ConfigError(label, None, None, "line %d: cannot parse %s (expected "
                                        "'key = value')" % (lineno, line.strip()))
                            for lineno, line in exc.errors]) from None
    except configparser.Error as exc:
        raise ConfigError(label, None, None, str(exc).splitlines()[0]) from None
    return parser


def _include_paths(values, base_dir, recursive_dirs):
    paths = []
    for item in shlex.split(values or ""):
        item = os.path.join(base_dir, os.path.expanduser(item))
        if recursive_dirs:
            for root, dirs, files in sorted(os.walk(item)):
                dirs.sort()
                paths.extend(os.path.join(root, f) for f in sorted(files) if f.endswith(".ini"))
        elif any(c in item for c in "*?["):
            import glob
            paths.extend(sorted(glob.glob(item)))
        else:
            paths.append(item)
    return paths


_DAEMON_LOG_KEYS = (("logfile", _c_logfile),
                    ("logfile_maxbytes", PROCESS_KEYS["logfile_maxbytes"][0]),
                    ("logfile_backups", PROCESS_KEYS["logfile_backups"][0]),
                    ("syslog", _c_bool), ("syslog_address", _c_syslog_address),
                    ("syslog_facility", _c_syslog_facility),
                    ("syslog_tag", lambda value, ctx: _c_syslog_tag(value, ctx) or "gafferd"))


def _daemon_logfile(cfg, files, label, base_dir, errors):
    """[gaffer] logfile, logfile_maxbytes, logfile_backups and the syslog
    keys: the daemon's own log.  Only keys written in a [gaffer] section
    count ([DEFAULT] values are meant for the programs' log files)."""
    for key, convert in _DAEMON_LOG_KEYS:
        values = [p.get("gaffer", key) for _, p, _ in files if p.has_option("gaffer", key)]
        if values:
            try:
                setattr(cfg, key, convert(values[-1], {"base_dir": base_dir}))
            except ValueError as exc:
                errors.append(ConfigError(label, "gaffer", key, str(exc)))


def read_config(path, plugins_dir=None, resolve=True, environ=None) -> Config:
    """Read ``path`` and its includes; raise ConfigErrors listing every
    mistake, one line each."""
    cfg = Config(path)
    errors = []
    label = path
    main = _parse_ini_file(path, label)
    files = [(label, main, cfg.base_dir)]
    if main.has_section("gaffer"):
        g = {k.lower(): v for k, v in main.items("gaffer")}
        for key, recursive in (("include", False), ("include_dir", True)):
            for inc in _include_paths(g.get(key), cfg.base_dir, recursive):
                if not os.path.isfile(inc):
                    cfg.warnings.append("%s: [gaffer] %s: %r not found, skipped" % (label, key, inc))
                    continue
                try:
                    files.append((inc, _parse_ini_file(inc, inc), os.path.dirname(inc)))
                except ConfigError as exc:
                    errors.append(exc)
                except ConfigErrors as exc:
                    errors.extend(exc.errors)
    # Merge: later files win, new sections are appended, as gaffer 0.4.4 did.
    combined = configparser.ConfigParser(interpolation=None)
    origin = {}            # section -> (file label, base dir)
    webhooks = collections.OrderedDict()
    for flabel, parser, fdir in files:
        for section in parser.sections():
            if section == "DEFAULT":
                for k, v in parser.items(section):
                    combined.set("DEFAULT", k, v)
                continue
            if not combined.has_section(section):
                combined.add_section(section)
            origin[section] = (flabel, fdir)
            for k, v in parser.items(section):
                combined.set(section, k, v)
                if section == "webhooks":
                    webhooks[k] = (v, flabel)
    cfg.parser = combined
    g = dict(combined.items("gaffer")) if combined.has_section("gaffer") else {}
    g_label, g_dir = origin.get("gaffer", (label, cfg.base_dir))
    for key in g:
        if key not in GAFFER_KEYS and key not in ENDPOINT_KEYS and key not in combined.defaults():
            cfg.warnings.append(str(ConfigError(g_label, "gaffer", key, unknown_key_message(
                key, list(GAFFER_KEYS) + list(ENDPOINT_KEYS)))))
    cfg.defaults = {k: v for k, v in g.items() if k in ENDPOINT_KEYS and k != "bind"}
    for key, value in cfg.defaults.items():
        try:
            ENDPOINT_KEYS[key][0](value, {"base_dir": g_dir})
        except ValueError as exc:
            errors.append(ConfigError(g_label, "gaffer", key, str(exc)))
    pdirs = g.get("plugins_dir") or g.get("plugin_dir")
    if pdirs:
        cfg.plugins_dirs = [os.path.normpath(os.path.join(g_dir, os.path.expanduser(p)))
                            for p in shlex.split(pdirs)]
    elif plugins_dir:
        cfg.plugins_dirs = [os.path.abspath(os.path.expanduser(plugins_dir))]
    _daemon_logfile(cfg, files, g_label, g_dir, errors)
    env_sections = {}
    process_sections = []
    for section in combined.sections():
        flabel, fdir = origin.get(section, (label, cfg.base_dir))
        kind, colon, rest = section.partition(":")
        if kind not in _SECTION_TYPES:
            close = typo_of(kind, _SECTION_TYPES, strict=True)
            if close:
                errors.append(ConfigError(flabel, section, None, "unknown section type "
                              "%r; did you mean [%s]?" % (kind, close + colon + rest)))
            continue                     # a plugin's section
        if kind in ("process", "env", "endpoint", "socket") and not rest:
            errors.append(ConfigError(flabel, section, None, "needs a name: [%s:NAME]" % kind))
        elif kind in ("gaffer", "webhooks") and colon:
            errors.append(ConfigError(flabel, section, None, "did you mean [%s]?" % kind))
        elif kind == "env":
            env_sections[rest] = {k.upper(): v for k, v in combined.items(section)}
        elif kind == "process":
            process_sections.append((section, rest, flabel, fdir))
        elif kind == "socket":
            try:
                items = {k: v for k, v in combined.items(section)     # [DEFAULT] is not theirs
                         if k in SOCKET_KEYS or k not in combined.defaults()}
                cfg.sockets[rest] = build_socket(rest, items, flabel, section, fdir)
            except ConfigError as exc:
                errors.append(exc)
    for name in env_sections:
        if not combined.has_section("process:" + name):
            cfg.warnings.append("%s: [env:%s] no [process:%s] section, ignored" % (label, name, name))
    for section, name, flabel, fdir in process_sections:
        raw = dict(combined.items(section))
        if name in env_sections:
            raw["env"] = env_sections[name]
        try:
            cfg.templates.append(build_spec(name, raw.get("cmd"), raw, base_dir=fdir,
                                            source=flabel, section=section,
                                            environ=environ, warnings=cfg.warnings))
        except ConfigError as exc:
            errors.append(exc)
        except ConfigErrors as exc:
            errors.extend(exc.errors)
    cfg.templates.sort(key=lambda t: t.priority)            # stable: ties keep file order
    by_name = {spec.name: spec for spec in cfg.templates}
    for name, message in dependency_problems(cfg.templates):
        errors.append(ConfigError(by_name[name].source, "process:" + name, "depends_on", message))
    for name, message in socket_problems(cfg.templates, cfg.sockets):
        errors.append(ConfigError(by_name[name].source, "process:" + name, "sockets", message))
    names = [n.strip() for n in g.get("http_endpoints", "").split(",") if n.strip()]
    for name in names:
        section = "endpoint:" + name
        if not combined.has_section(section):
            cfg.warnings.append(str(ConfigError(g_label, "gaffer", "http_endpoints",
                                                "no [%s] section, skipped" % section)))
            continue
        items = dict(combined.items(section))
        flabel, fdir = origin[section]
        # An endpoint holds the API's defences (auth_token, cors_origins...):
        # a misspelt key would leave it open without a word, so it is an
        # error here, where a [process:*] typo is only a warning.
        for key in combined.options(section):
            if key not in ENDPOINT_KEYS and key not in combined.defaults():
                errors.append(ConfigError(flabel, section, key, unknown_key_message(
                    key, ENDPOINT_KEYS).replace("unknown key, ignored",
                                                "unknown endpoint key")))
        if not items.get("bind", "").strip() and "bind" not in items:
            cfg.warnings.append("%s: [%s] has no bind, skipped" % (flabel, section))
            continue
        try:
            cfg.endpoints.append(build_endpoint(name, items, cfg.defaults, flabel, section,
                                                fdir, resolve))
        except ConfigError as exc:
            errors.append(exc)
        except ConfigErrors as exc:
            errors.extend(exc.errors)
    for section in combined.sections():
        kind, _, name = section.partition(":")
        if kind == "endpoint" and name and name not in names:
            cfg.warnings.append("%s: [%s] is not in [gaffer] http_endpoints, so it is not "
                                "opened" % (origin.get(section, (label,))[0], section))
    for event, (value, flabel) in webhooks.items():
        for url in value.split():
            if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
                errors.append(ConfigError(flabel, "webhooks", event,
                                          "%r is not an http:// or https:// URL" % url))
            else:
                cfg.webhooks.append((event, url))
    if errors:
        raise ConfigErrors(errors, cfg.warnings)
    return cfg


# § 4 process policy and stats (pure) -----------------------------------------
# Owns: the lifecycle of a process slot (its state table, the restart
# policy, exit classification, backoff delays) and the state of a template
# derived from its slots, the ring buffer that keeps recent output, and
# reading process facts from /proc (for GET /stats).  The clock is always
# an argument.  Uses §1, §3 (RANGES for the backoff).  Used by §8.

# -- the process lifecycle --------------------------------------------------
# Every process slot of a template (slot 0 to numprocesses-1) runs one
# small state machine: ``(state, event) -> (new state, actions)``, written
# as one table, ``TRANSITIONS``, in the manner of h11's ``_state.py``.  The
# manager (§8) feeds events and performs the actions; nothing here touches
# a process, a timer or the clock (``now`` is an argument).  An event the
# table has no row for raises ``LifecycleError``: the manager logs it as
# the bug it is, never drops it silently.
#
#   stopped/exited/failed --start--> starting --ready--> running
#   starting/running --exit, up >= startsecs, restarted--> backoff (restart_delay)
#   starting/running --exit, up <  startsecs--> backoff (backoff delay) | failed
#   starting/running --exit, not restarted by policy--> exited
#   backoff --backoff_elapsed--> starting
#   starting --ready_timeout--> stopping;  starting/running --watchdog_timeout--> stopping
#   starting/running --stop--> stopping --stopped--> stopped
#   backoff/exited/failed --stop--> stopped

STARTING, RUNNING, BACKOFF, STOPPING = "starting", "running", "backoff", "stopping"
STOPPED, EXITED, FAILED = "stopped", "exited", "failed"
PROCESS_STATES = (STARTING, RUNNING, BACKOFF, STOPPING, STOPPED, EXITED, FAILED)

# Events.  An exit is classified by ``classify_exit`` into one of the
# ``EXIT_*`` events before it reaches the table, so every outcome of an
# exit is a row of its own.
START, SPAWNED, READY, STOP, STOPPED_EVENT = "start", "spawned", "ready", "stop", "stopped"
BACKOFF_ELAPSED, READY_TIMEOUT, WATCHDOG_TIMEOUT = \
    "backoff_elapsed", "ready_timeout", "watchdog_timeout"
EXIT_RESTART = "exit_restart"       # up >= startsecs, restarted after restart_delay
EXIT_RETRY = "exit_retry"           # a failed start, restarted after the backoff delay
EXIT_GIVE_UP = "exit_give_up"       # a failed start beyond start_retries
EXIT_DONE = "exit_done"             # not restarted by the policy (success or never)
SLOT_EVENTS = (START, SPAWNED, READY, STOP, STOPPED_EVENT, BACKOFF_ELAPSED, READY_TIMEOUT,
               WATCHDOG_TIMEOUT, EXIT_RESTART, EXIT_RETRY, EXIT_GIVE_UP, EXIT_DONE)

# Actions for the manager, in the order given.
A_SPAWN = "spawn"                   # queue an exec for this slot
A_WATCH_READY = "watch_ready"       # start the readiness check and ready_timeout
A_UNWATCH = "unwatch"               # cancel readiness checks, watchdog and timers
A_KILL = "kill"                     # stop_signal to the group, SIGKILL after graceful_timeout
A_SCHEDULE = "schedule"             # backoff_elapsed in ``slot.delay`` seconds
A_CANCEL = "cancel"                 # cancel the pending backoff_elapsed
A_GIVE_UP = "give_up"               # log that the slot gave up; ``critical`` applies
A_DONE = "done"                     # the process ended for good (``slot.ok`` tells how)

_UP = (STARTING, RUNNING)
_EXIT_ROWS = {EXIT_RESTART: (BACKOFF, (A_SCHEDULE,)), EXIT_RETRY: (BACKOFF, (A_SCHEDULE,)),
              EXIT_GIVE_UP: (FAILED, (A_GIVE_UP,)), EXIT_DONE: (EXITED, (A_DONE,))}

# (state, event) -> (new state, actions).  Every transition is here.
TRANSITIONS = {
    (STOPPED, START): (STARTING, (A_SPAWN,)),
    (EXITED, START): (STARTING, (A_SPAWN,)),
    (FAILED, START): (STARTING, (A_SPAWN,)),
    (BACKOFF, START): (STARTING, (A_CANCEL, A_SPAWN)),
    (STARTING, START): (STARTING, ()),              # already on its way up
    (RUNNING, START): (RUNNING, ()),
    (STARTING, SPAWNED): (STARTING, (A_WATCH_READY,)),
    (STARTING, READY): (RUNNING, ()),
    (RUNNING, READY): (RUNNING, ()),                # a second READY=1, a probe answering again
    (STOPPING, READY): (STOPPING, ()),              # a probe answer that raced the stop
    (STARTING, READY_TIMEOUT): (STOPPING, (A_UNWATCH, A_KILL)),
    (STARTING, WATCHDOG_TIMEOUT): (STOPPING, (A_UNWATCH, A_KILL)),
    (RUNNING, WATCHDOG_TIMEOUT): (STOPPING, (A_UNWATCH, A_KILL)),
    (BACKOFF, BACKOFF_ELAPSED): (STARTING, (A_SPAWN,)),
    (STARTING, STOP): (STOPPING, (A_UNWATCH, A_KILL)),
    (RUNNING, STOP): (STOPPING, (A_UNWATCH, A_KILL)),
    (STOPPING, STOP): (STOPPING, ()),
    (BACKOFF, STOP): (STOPPED, (A_CANCEL,)),
    (EXITED, STOP): (STOPPED, ()),
    (FAILED, STOP): (STOPPED, ()),
    (STOPPED, STOP): (STOPPED, ()),
    (STOPPING, STOPPED_EVENT): (STOPPED, ()),
}
for _state in _UP:
    for _event, (_new, _actions) in _EXIT_ROWS.items():
        TRANSITIONS[(_state, _event)] = (_new, (A_UNWATCH,) + _actions)
# a process killed for a missed ready_timeout or watchdog: a failed start
for _event in (EXIT_RETRY, EXIT_GIVE_UP, EXIT_DONE):
    TRANSITIONS[(STOPPING, _event)] = _EXIT_ROWS[_event]
del _state, _event, _new, _actions


class LifecycleError(Exception):
    """An event the lifecycle table has no row for: a bug in the caller."""

    def __init__(self, state, event):
        super().__init__("no transition from %r on %r" % (state, event))
        self.state, self.event = state, event


class RestartPolicy:
    """What happens when a process of a template exits: the ``restart``,
    ``success_exit_codes``, ``startsecs``, ``restart_delay``, ``backoff``
    and ``start_retries`` keys of a template, read-only."""

    __slots__ = ("restart", "success_exit_codes", "startsecs", "restart_delay",
                 "backoff", "start_retries")

    def __init__(self, restart="always", success_exit_codes=(0,), startsecs=1.0,
                 restart_delay=0.0, backoff=None, start_retries=UNLIMITED):
        self.restart, self.success_exit_codes = restart, frozenset(success_exit_codes)
        self.startsecs, self.restart_delay = startsecs, restart_delay
        self.backoff = backoff or Backoff()
        self.start_retries = start_retries

    @classmethod
    def of(cls, spec) -> "RestartPolicy":
        """The policy of ``spec``; a scheduled run ends with a success, so
        its ``always`` retries failed runs only, as ``on-failure`` does."""
        restart = spec.restart
        if getattr(spec, "schedule", None) is not None and restart == "always":
            restart = "on-failure"
        return cls(restart, spec.success_exit_codes, spec.startsecs, spec.restart_delay,
                   spec.backoff, spec.start_retries)

    def success(self, exit_status, term_signal) -> bool:
        """The exit counts as a success: no signal, a status in the list."""
        return not term_signal and exit_status in self.success_exit_codes


def classify_exit(policy: RestartPolicy, slot, exit_status, term_signal, uptime,
                  asked: bool) -> str:
    """The table event for an exit of ``slot``'s process.

    ``asked``: the exit followed a stop somebody asked for (not a kill for
    a missed ready_timeout or watchdog, which the slot remembers in
    ``failing``).  A failed exec is an exit with status 127 and uptime 0.
    """
    if asked and not slot.failing:
        return STOPPED_EVENT
    success = policy.success(exit_status, term_signal) and not slot.failing
    if policy.restart == "never" or (policy.restart == "on-failure" and success):
        return EXIT_DONE
    if slot.failing or uptime < policy.startsecs:
        if policy.start_retries is not UNLIMITED and slot.failed_starts >= policy.start_retries:
            return EXIT_GIVE_UP
        return EXIT_RETRY
    return EXIT_RESTART


class Slot:
    """The lifecycle of one process slot; pure (the manager's ``Process``
    objects point at it, it never points at them).

    Attributes the manager reads: ``index`` (the slot number, which a
    replacement keeps), ``state``, ``since`` (clock time of the last
    change), ``failed_starts`` (in a row), ``restarts`` (exits nobody
    asked for), ``delay`` (of the last ``schedule`` action), ``ok`` (the
    last exit was a success by the policy), ``failing`` (the process is
    being killed for a missed ready_timeout or watchdog).
    """

    __slots__ = ("index", "state", "since", "failed_starts", "restarts", "delay", "ok",
                 "failing", "status_text", "proc", "timer", "member")

    def __init__(self, index: int, now: float):
        self.index, self.state, self.since = index, STOPPED, now
        self.failed_starts = self.restarts = 0
        self.delay, self.ok, self.failing, self.status_text = 0.0, None, False, ""
        self.proc = self.timer = None          # owned by the manager
        self.member = False                    # in its template's slots (manager)

    def feed(self, event: str, now: float, policy: RestartPolicy = None) -> tuple:
        """Apply ``event``; return the actions.  LifecycleError (state
        unchanged) when the table has no row for it."""
        try:
            new, actions = TRANSITIONS[(self.state, event)]
        except KeyError:
            raise LifecycleError(self.state, event) from None
        if event in (EXIT_RETRY, EXIT_GIVE_UP):
            self.failed_starts += 1
        elif event == EXIT_RESTART:
            self.failed_starts = 0
        if event in (EXIT_RESTART, EXIT_RETRY, EXIT_GIVE_UP, EXIT_DONE):
            self.restarts += event != EXIT_DONE or self.ok is False
        if A_SCHEDULE in actions:
            policy = policy or RestartPolicy()
            self.delay = policy.restart_delay if event == EXIT_RESTART else \
                policy.backoff.delay(self.failed_starts)
        if event in (READY_TIMEOUT, WATCHDOG_TIMEOUT):
            self.failing = True
        elif event == STOP:
            self.failing = False               # a stop asked for overrides a failure kill
        elif event == START and self.state == FAILED:
            self.failed_starts = 0
        if new != STOPPING:
            self.failing = False
        if new != self.state:
            self.state, self.since = new, now
        return actions

    def exit(self, policy: RestartPolicy, exit_status, term_signal, uptime, asked, now):
        """Classify an exit and feed it: ``(event, actions)``."""
        event = classify_exit(policy, self, exit_status, term_signal, uptime, asked)
        if event != STOPPED_EVENT:
            self.ok = policy.success(exit_status, term_signal) and not self.failing
        return event, self.feed(event, now, policy)

    @property
    def bucket(self) -> str:
        """The state as ``template_state`` counts it (an unsuccessful
        ``exited`` counts apart)."""
        return "exited_failed" if self.state == EXITED and not self.ok else self.state


def exit_text(exit_status, term_signal, core_dumped=False) -> str:
    """``exit status 3`` or ``killed by SIGSEGV (core dumped)``."""
    if term_signal:
        try:
            name = signal.Signals(term_signal).name
        except ValueError:
            name = "signal %d" % term_signal
        return "killed by %s%s" % (name, " (core dumped)" if core_dumped else "")
    return "exit status %s" % exit_status


TEMPLATE_STATES = ("stopped", "waiting", "starting", "running", "degraded", "backoff",
                   "failed", "completed", "scheduled")


def template_state(wanted: bool, waiting: bool, counts, blocked: bool = False,
                   scheduled: bool = False) -> str:
    """A template's state from how many of its slots are in each bucket
    (``Slot.bucket``); ``wanted`` is false when it was stopped on purpose,
    ``waiting`` true while its dependencies do not hold, ``blocked`` true
    once one of them never can (the template is then ``failed``).

    stopped: not wanted; waiting: dependencies not met; completed: every
    slot exited with a success; failed: nothing up or retrying and some
    slot failed (or exited unsuccessfully); degraded: some up, some in
    backoff or failed; backoff: nothing up, a restart scheduled; starting:
    some slot not yet ready; running: every slot ready (or none wanted);
    scheduled: not wanted between two runs of an active ``schedule``.
    """
    if not wanted:
        return "scheduled" if scheduled else "stopped"
    if blocked:
        return "failed"
    if waiting:
        return "waiting"
    get = counts.get
    up = get(STARTING, 0) + get(RUNNING, 0)
    broken = get(FAILED, 0) + get("exited_failed", 0)
    retrying = get(BACKOFF, 0) + get(STOPPING, 0)     # stopping: killed for a missed deadline
    total = up + broken + retrying + get(EXITED, 0)
    if total == 0:
        return "running"
    if get(EXITED, 0) == total:
        return "completed"
    if up and (broken or retrying):
        return "degraded"
    if retrying:
        return "backoff"
    if broken:
        return "failed"
    if get(STARTING, 0):
        return "starting"
    return "running"


# A dependency's condition, from the dependency's template state: it
# ``holds``, the dependent ``waits``, or it can ``never`` hold until the
# dependency is started again.  ``completed`` asks for every process to
# have exited, by success or not; a ``failed`` template whose processes all
# exited is such a one.
_CONDITION_HOLDS = {
    "started": ("starting", "running", "degraded", "backoff", "completed"),
    "ready": ("running", "completed"),
    "completed": ("completed",),
    "completed_successfully": ("completed",),
}


def dependency_status(condition: str, state: str, counts) -> str:
    """``holds``, ``waits`` or ``never``: whether a dependency in template
    state ``state`` (with ``counts`` as for ``template_state``) meets
    ``condition`` (one of DEPENDENCY_CONDITIONS)."""
    if state in _CONDITION_HOLDS[condition]:
        return "holds"
    if state != "failed":
        return "waits"
    if condition == "completed":
        get = counts.get
        if get(EXITED, 0) + get("exited_failed", 0) == sum(
                n for bucket, n in counts.items() if bucket != STOPPED) > 0:
            return "holds"
    return "never"


def utf8_partial_tail(data) -> int:
    """How many bytes (0-3) at the end of ``data`` begin a UTF-8 character
    whose last bytes have not come yet (RFC 3629 section 3: a lead byte
    says how long its sequence is).  ASCII, a complete character and
    bytes that can never be UTF-8 give 0: only a real beginning waits."""
    for back in (1, 2, 3):
        if back > len(data):
            return 0
        byte = data[-back]
        if 0x80 <= byte < 0xC0:             # a continuation byte: find its lead
            continue
        length = 2 if 0xC2 <= byte < 0xE0 else 3 if 0xE0 <= byte < 0xF0 else \
            4 if 0xF0 <= byte < 0xF5 else 0
        return back if length > back else 0
    return 0


def _utf8_boundary(data, pos: int) -> int:
    """``pos``, moved past at most 3 continuation bytes: the start of the
    next character, so a slice taken from there never begins mid-character."""
    end = min(pos + 3, len(data))
    while pos < end and 0x80 <= data[pos] < 0xC0:
        pos += 1
    return pos


class OutputRing:
    """The last ``capacity`` bytes of one output stream.

    ``total`` counts every byte ever appended, so a byte offset names a
    position in the whole stream: it is the SSE event id of /streams and
    what ``Last-Event-ID`` resumes from.  The ring is fed whole characters
    (see ``Process``) and, when it drops old bytes, drops the rest of a
    character cut in two as well (up to 3 bytes more), so the oldest byte
    kept, like every offset it hands out, starts a character.
    """

    __slots__ = ("capacity", "buf", "total")

    def __init__(self, capacity=DEFAULT_OUTPUT_BUFFER):
        self.capacity, self.buf, self.total = capacity, bytearray(), 0

    @property
    def start(self) -> int:
        return self.total - len(self.buf)

    def append(self, data: bytes) -> None:
        self.total += len(data)
        if len(data) >= self.capacity:
            self.buf[:] = data[-self.capacity:] if self.capacity else b""
            del self.buf[:_utf8_boundary(self.buf, 0)]
            return
        self.buf += data
        excess = len(self.buf) - self.capacity
        if excess > 0:
            del self.buf[:_utf8_boundary(self.buf, excess)]

    def since(self, offset: int):
        """Bytes from stream offset ``offset`` on, or None if overwritten.
        An offset inside a character (no id ever handed out is one) starts
        at the next character."""
        if offset < self.start or offset > self.total:
            return None
        return bytes(self.buf[_utf8_boundary(self.buf, offset - self.start):])

    def tail(self, lines: int) -> bytes:
        """The last ``lines`` lines (a trailing partial line counts)."""
        if lines <= 0:
            return b""
        data = bytes(self.buf)
        end = len(data) - 1 if data.endswith(b"\n") else len(data)
        pos = end
        for _ in range(lines):
            pos = data.rfind(b"\n", 0, pos)
            if pos < 0:
                return data
        return data[pos + 1:]


_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def split_lines(data: bytes) -> list:
    """Lines of decoded output, without their line ends (CR, LF or CRLF:
    a bare CR inside an SSE ``data:`` line would end it, WHATWG 9.2.5)."""
    text = data.decode("utf-8", "replace")
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith(("\n", "\r")):
        text = text[:-1]
    return _LINE_BREAK.split(text) if text else []


_MEM_TOTAL = []


def mem_total() -> int:
    if not _MEM_TOTAL:
        total = 0
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemTotal:"):
                        total = int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
        _MEM_TOTAL.append(total or 1)
    return _MEM_TOTAL[0]


def read_proc_stat(pid: int):
    """Fields of /proc/PID/stat after the command name, or None if gone."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2:].split()


def cpu_seconds(fields) -> float:
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def session_ids():
    """(pid, session id) of every process, from one scan of /proc.  getsid()
    is one system call where reading /proc/PID/stat is three and a parse:
    with a few thousand processes that is 4 ms instead of 50."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            pid = int(entry)
            try:
                out.append((pid, os.getsid(pid)))
            except OSError:
                pass
    return out


def children_map() -> dict:
    """ppid -> [pid] for every process, from one scan of /proc."""
    kids = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = read_proc_stat(int(entry))
            if fields:
                kids[int(fields[1])].append(int(entry))
    return kids


def child_pids(pid: int) -> list:
    """Direct children of ``pid`` (zombies included), read from
    /proc/PID/task/*/children (Linux 3.5+, CONFIG_PROC_CHILDREN; a
    child belongs to the thread that forked it, or that adopted it), or
    from one scan of /proc where the kernel lacks those files."""
    try:
        tasks = os.listdir("/proc/%d/task" % pid)
        out = []
        for tid in tasks:
            with open("/proc/%d/task/%s/children" % (pid, tid), "rb") as f:
                out.extend(int(n) for n in f.read().split())
        return out
    except FileNotFoundError:
        return list(children_map().get(pid, ()))
    except OSError:
        return []


_CONTROL_CHARS = re.compile("[\x00-\x1f\x7f-\x9f]")


def read_cmdline(pid: int, limit: int = MAX_CMDLINE):
    """The command line of ``pid`` as one line (arguments joined by
    spaces, cut at ``limit`` characters), ``[comm]`` for a process with
    none (a zombie, a kernel thread), None once it is gone."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            raw = f.read(limit * 4)
        if not raw:
            with open("/proc/%d/stat" % pid, "rb") as f:
                stat = f.read()
            raw = b"[" + stat[stat.index(b"(") + 1:stat.rindex(b")")] + b"]"
    except (OSError, ValueError):
        return None
    text = " ".join(raw.rstrip(b"\0").decode("utf-8", "replace").split("\0"))
    # a newline or an escape sequence in an argument must not forge log lines
    text = _CONTROL_CHARS.sub(lambda m: "\\x%02x" % ord(m.group()), text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def process_stats(pid: int, previous, now: float, kids=None, depth=0):
    """gaffer 0.4.4's stats dict for ``pid``; ``previous`` is (time, cpu seconds)
    of the last sample, for the CPU percentage.  None if the process is
    gone.  Returns (stats, sample)."""
    fields = read_proc_stat(pid)
    if fields is None:
        return None, None
    cpu_total = cpu_seconds(fields)
    cpu = 0.0
    if previous and now > previous[0]:
        cpu = round(max(0.0, cpu_total - previous[1]) / (now - previous[0]) * 100, 1)
    rss = int(fields[21]) * PAGE_SIZE
    try:
        username = pwd.getpwuid(os.stat("/proc/%d" % pid).st_uid).pw_name
    except (OSError, KeyError):
        username = "N/A"
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            argv = f.read().split(b"\0")
        cmdline = os.path.basename(argv[0].decode("utf-8", "replace").split(" ")[0]) \
            if argv and argv[0] else "N/A"
    except OSError:
        cmdline = "N/A"
    stats = {"pid": pid, "cpu": cpu, "mem": round(rss * 100.0 / mem_total(), 1),
             "mem_info1": human_size(rss), "mem_info2": human_size(int(fields[20])),
             "ctime": format_ctime(cpu_total), "username": username,
             "nice": int(fields[16]), "cmdline": cmdline, "children": []}
    if kids is not None and depth < 16:
        for child in kids.get(pid, ()):
            child_stats, _ = process_stats(child, None, now, kids, depth + 1)
            if child_stats:
                stats["children"].append(child_stats)
    return stats, (now, cpu_total)


def tree_usage(pid: int, limit: int = LIMIT_TREE_MAX):
    """``(resident bytes, CPU seconds)`` of ``pid`` and its descendants (at
    most ``limit`` processes read), or None once ``pid`` is gone.  The CPU
    time of each process includes that of the children it reaped, so a
    child that ends does not take its time out of the sum."""
    rss, cpu, todo, read = 0, 0.0, [pid], 0
    while todo and read < limit:
        current = todo.pop()
        fields = read_proc_stat(current)
        read += 1
        if fields is None:
            if current == pid:
                return None
            continue
        rss += int(fields[21]) * PAGE_SIZE
        cpu += sum(int(f) for f in fields[11:15]) / CLK_TCK     # utime stime cutime cstime
        todo.extend(child_pids(current))
    return rss, cpu


def summarize_stats(name: str, stats: list) -> dict:
    """GET /stats/NAME's object: sums, max and min (``"N/A"`` when nothing is live)."""
    out = {"name": name, "stats": stats}
    for key in ("mem", "cpu"):
        values = [s[key] for s in stats if isinstance(s.get(key), (int, float))]
        if not stats or len(values) != len(stats):
            out[key] = out["max_" + key] = out["min_" + key] = "N/A"
        else:
            out[key] = round(sum(values), 1)
            out["max_" + key], out["min_" + key] = max(values), min(values)
    return out


# § 5 events (pure) --------------------------------------------------------
# Owns: event names and dotted-prefix patterns and the queued bus that
# delivers them.  The bus is given a ``call_soon`` so it never calls a
# listener from inside ``publish``.  Used by the manager (§8), webhooks
# (§9), the HTTP feeds (§11), console output (§13) and plugins.

# The names of the events the manager publishes (bare, for every
# listener) and of those also published as ``proc.NAME.EVENT``: the
# registry that docs/streams-and-events.md is checked against
# (tests/test_docs.py), so a new event is added here and there.
MANAGER_EVENTS = ("create", "start", "stop", "update", "delete", "spawn", "reap",
                  "stop_pid", "exit", "flap", "restart", "state", "ready", "limit",
                  "rollout.start", "rollout.step", "rollout.done", "rollout.failed")
PROCESS_EVENTS = ("start", "stop", "spawn", "reap", "stop_pid", "exit", "flap", "restart",
                  "state", "ready", "limit", "rollout.start", "rollout.step", "rollout.done",
                  "rollout.failed")


def normalize_pattern(pattern: str) -> str:
    if not pattern or pattern == ".":
        return "."
    return pattern.rstrip(".") or "."


def event_patterns(name: str):
    """Every pattern that matches event ``name``: ``.``, then each dotted
    prefix (``proc``, ``proc.web``, ``proc.web.exit``)."""
    yield "."
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        yield ".".join(parts[:i])


class EventBus:
    """Publish/subscribe with asynchronous, ordered, at-most-once delivery.

    ``subscribe(pattern, listener)``: ``listener(event_name, payload)`` is
    called for every later event matching ``pattern`` (``.`` or a dotted prefix).  The
    same listener under the same pattern is kept once.  ``publish`` only
    queues; delivery runs from ``call_soon``.  A listener that raises is
    logged and the others still run.

    Each event gets an id when it is delivered: 1, 2, 3... in delivery
    order, ``last_id`` being the latest.  While a listener runs,
    ``current_id`` is the id of the event it was given.  The last
    ``history_size`` events delivered are kept for ``since``, so a client
    that lost its feed can resume where it stopped.
    """

    def __init__(self, call_soon, history_size=EVENT_HISTORY):
        self._call_soon = call_soon
        self._subs = {}                     # pattern -> [(listener, once)]
        self._queue = collections.deque()
        self._scheduled = False
        self.last_id = 0
        self.current_id = None
        self._history = collections.deque(maxlen=history_size)   # (id, name, payload)

    def since(self, event_id: int):
        """``(missed, events)``: the ``(id, name, payload)`` delivered after
        ``event_id``, oldest first, and how many events after it are no
        longer kept (0: none lost).  An id this bus never handed out (one
        from an earlier run of the daemon) gives ``missed = None`` and every
        event kept, since what it lost cannot be told."""
        history = self._history
        oldest = history[0][0] if history else self.last_id + 1
        if event_id > self.last_id:
            return None, list(history)
        if event_id + 1 >= oldest:
            return 0, list(itertools.islice(history, event_id + 1 - oldest, None))
        return oldest - event_id - 1, list(history)

    def subscribe(self, pattern, listener, once=False):
        pattern = normalize_pattern(pattern)
        subs = self._subs.setdefault(pattern, [])
        if all(l is not listener and l != listener for l, _ in subs):
            subs.append((listener, once))

    def subscribe_once(self, pattern, listener):
        self.subscribe(pattern, listener, once=True)

    def unsubscribe(self, pattern, listener):
        pattern = normalize_pattern(pattern)
        subs = self._subs.get(pattern)
        if subs:
            subs[:] = [(l, o) for l, o in subs if not (l is listener or l == listener)]
            if not subs:
                del self._subs[pattern]

    def publish(self, name, payload=None):
        event = dict(payload or {})
        event["event"] = name
        self._queue.append((name, event))
        if not self._scheduled:
            self._scheduled = True
            self._call_soon(self._deliver)

    def _deliver(self):
        self._scheduled = False
        while self._queue:
            name, event = self._queue.popleft()
            self.last_id += 1
            self.current_id = self.last_id
            self._history.append((self.last_id, name, event))
            for pattern in event_patterns(name):
                subs = self._subs.get(pattern)
                if not subs:
                    continue
                for listener, once in list(subs):
                    if once:
                        self.unsubscribe(pattern, listener)
                    try:
                        listener(name, event)
                    except Exception:
                        log.exception("event listener %r failed on %s", listener, name)
        self.current_id = None


# § 6 HTTP/1.1 protocol (pure) ---------------------------------------------
# Owns: turning bytes into ``Request`` objects (RFC 9112 framing with
# this server's limits) and, for the client (§9), into ``Response``
# objects, with one chunked-body decoder for both; rendering response
# heads, chunked and SSE framing, and RFC 6455 websocket frames.  Never touches a socket: the
# server (§12) feeds bytes in and writes bytes out.  Uses §1-§2.

KNOWN_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH",
                 "TRACE", "CONNECT"}
_TOKEN_RE = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_HEADER_VALUE_RE = re.compile(rb"^[\t\x20-\x7e\x80-\xff]*$")


class Request:
    """One parsed request.  ``headers`` maps lower-case names to values
    (repeated headers joined with ", "); ``query`` maps each parameter to
    its last value."""

    __slots__ = ("method", "target", "path", "query", "version", "headers",
                 "body", "remote", "endpoint", "scheme")

    def __init__(self, method, target, version, headers):
        self.method, self.target, self.version, self.headers = method, target, version, headers
        path, _, qs = target.partition("?")
        self.path = path
        self.query = dict(urllib.parse.parse_qsl(qs, keep_blank_values=True))
        self.body = b""
        self.remote = self.endpoint = None
        self.scheme = "http"

    @property
    def keep_alive(self) -> bool:
        tokens = {t.strip().lower() for t in self.headers.get("connection", "").split(",")}
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens

    def json(self):
        """The body as JSON; ApiError 400 invalid_json otherwise."""
        try:
            return json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise ApiError(400, "invalid_json", "the request body is not valid JSON") from None


def parse_header_lines(lines, error) -> dict:
    """Header field lines (bytes, without CRLF) -> {lower-case name:
    value}, repeated fields joined with ", " (RFC 9110 5.3); a malformed
    line, or two Content-Length or Host fields that disagree, raise
    ``error(400, "bad_request", message)``."""
    headers = {}
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN_RE.match(name) or not _HEADER_VALUE_RE.match(value):
            raise error(400, "bad_request", "malformed header line")
        key = name.decode("ascii").lower()
        value = value.strip(b" \t").decode("latin-1")
        if key in headers:
            if key in ("content-length", "host"):
                if headers[key] != value:
                    raise error(400, "bad_request", "conflicting %s headers" % key)
                continue
            headers[key] = headers[key] + ", " + value
        else:
            headers[key] = value
    return headers


class ChunkedDecoder:
    """Decodes one chunked body (RFC 9112 7.1) from the front of a buffer
    that its owner keeps filling; shared by the request and the response
    parsers.

    ``decode(buf)`` consumes what it can from the bytearray ``buf`` and
    returns True once the last chunk and the trailer section (ignored)
    are in, leaving whatever follows in ``buf``; ``body`` is the decoded
    bytearray.  A malformed body raises ``error(status, code, message)``
    with a message that names the problem; a body over ``max_body`` bytes
    is one (``"<what> body over N bytes"``), as are a chunk-size line over
    1 KiB and a trailer line over MAX_HEADER_BYTES.
    """

    def __init__(self, max_body: int, what: str, error):
        self.max_body, self.what, self.error = max_body, what, error
        self.body = bytearray()
        self._state = "size"          # size -> data -> size ... -> trailer
        self._left = 0                # bytes of the current chunk not yet in

    def decode(self, buf: bytearray) -> bool:
        while True:
            if self._state == "size":
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > 1024:
                        raise self.error(400, "bad_request", "bad chunk size line")
                    return False
                size_text = bytes(buf[:end]).split(b";")[0].strip()
                del buf[:end + 2]
                if not size_text or not re.match(rb"^[0-9A-Fa-f]{1,8}$", size_text):
                    raise self.error(400, "bad_request", "bad chunk size")
                self._left = int(size_text, 16)
                if len(self.body) + self._left > self.max_body:
                    raise self.error(413, "body_too_large",
                                     "%s body over %d bytes" % (self.what, self.max_body))
                self._state = "data" if self._left else "trailer"
            elif self._state == "data":
                if len(buf) < self._left + 2:
                    return False
                if buf[self._left:self._left + 2] != b"\r\n":
                    raise self.error(400, "bad_request", "chunk data not followed by CRLF")
                self.body += buf[:self._left]
                del buf[:self._left + 2]
                self._state = "size"
            else:                                  # trailer section, ignored
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > MAX_HEADER_BYTES:
                        raise self.error(431, "headers_too_large", "trailer too large")
                    return False
                line = bytes(buf[:end])
                del buf[:end + 2]
                if not line:
                    return True


class RequestParser:
    """Incremental request parser: ``feed(bytes)``, then ``next()`` returns
    a complete Request or None (more bytes needed) and raises HttpError.

    ``waiting_body`` is the request whose head has arrived while its body
    has not, so that the server can answer ``Expect: 100-continue``.
    """

    def __init__(self, max_body=DEFAULT_MAX_BODY):
        self.max_body = max_body
        self.buf = bytearray()
        self.waiting_body = None
        self._length = None          # remaining Content-Length, or None for chunked
        self._chunked = None         # the ChunkedDecoder of a chunked body, while it lasts

    @property
    def idle(self) -> bool:
        return not self.buf and self.waiting_body is None

    def feed(self, data: bytes) -> None:
        self.buf += data

    def next(self):
        if self.waiting_body is None:
            request = self._parse_head()
            if request is None:
                return None
            self.waiting_body = request
        request = self.waiting_body
        if self._chunked is not None:
            if not self._chunked.decode(self.buf):
                return None
            request.body = bytes(self._chunked.body)
            self._chunked = None
        elif self._length:
            if len(self.buf) < self._length:
                return None
            request.body = bytes(self.buf[:self._length])
            del self.buf[:self._length]
        self.waiting_body = None
        self._length = None
        return request

    def _parse_head(self):
        while self.buf[:2] == b"\r\n":          # RFC 9112 2.2: ignore leading CRLFs
            del self.buf[:2]
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            line_end = self.buf.find(b"\n")
            if line_end < 0 and len(self.buf) > MAX_REQUEST_LINE:
                raise HttpError(414, "uri_too_long", "request line over %d bytes" % MAX_REQUEST_LINE)
            if line_end >= 0 and len(self.buf) - line_end > MAX_HEADER_BYTES:
                raise HttpError(431, "headers_too_large",
                                "header section over %d bytes" % MAX_HEADER_BYTES)
            return None
        head = bytes(self.buf[:end])
        del self.buf[:end + 4]
        lines = head.split(b"\r\n")
        if len(lines[0]) > MAX_REQUEST_LINE:
            raise HttpError(414, "uri_too_long", "request line over %d bytes" % MAX_REQUEST_LINE)
        if len(head) - len(lines[0]) > MAX_HEADER_BYTES:
            raise HttpError(431, "headers_too_large", "header section over %d bytes" % MAX_HEADER_BYTES)
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[1] or not _TOKEN_RE.match(parts[0]):
            raise HttpError(400, "bad_request", "malformed request line")
        method, target, version = parts
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):
            if re.match(rb"^HTTP/\d\.\d$", version):
                raise HttpError(505, "http_version_not_supported", "only HTTP/1.0 and 1.1")
            raise HttpError(400, "bad_request", "malformed HTTP version")
        if re.match(rb"^https?://[^/?#]+", target):       # absolute-form, RFC 9112 3.2.2
            target = re.sub(rb"^https?://[^/?#]+", b"", target) or b"/"
            if not target.startswith(b"/"):
                target = b"/" + target
        if not (target.startswith(b"/") or target == b"*") or \
                any(c < 0x21 or c == 0x7f for c in target):
            raise HttpError(400, "bad_request", "malformed request target")
        headers = parse_header_lines(lines[1:], HttpError)
        request = Request(method.decode("ascii"), target.decode("latin-1"),
                          version.decode("ascii"), headers)
        if request.version == "HTTP/1.1" and "host" not in headers:
            raise HttpError(400, "bad_request", "HTTP/1.1 request without Host")
        te = headers.get("transfer-encoding")
        if te is not None:
            if te.strip().lower() != "chunked" or "content-length" in headers:
                raise HttpError(400, "bad_request", "unsupported Transfer-Encoding")
            self._chunked = ChunkedDecoder(self.max_body, "request", HttpError)
        elif "content-length" in headers:
            # RFC 9110 8.6: 1*DIGIT, ASCII only (str.isdigit() takes '\xb2',
            # which int() then refuses, and a 500 would desynchronize).
            length = headers["content-length"].strip(" \t")
            if not is_ascii_digits(length) or len(length) > 15:
                raise HttpError(400, "bad_request", "bad Content-Length")
            self._length = int(length)
            if self._length > self.max_body:
                raise HttpError(413, "body_too_large",
                                "request body over %d bytes" % self.max_body)
        return request


def _response_error(status, code, message):
    """The ``error`` of the shared helpers, for a response: the request
    status they carry means nothing here."""
    return ResponseError(message)


class Response:
    """One parsed response: ``status`` (int), ``reason``, ``version``,
    ``headers`` (lower-case names, repeats joined with ", ") and
    ``body`` (bytes, de-chunked)."""

    __slots__ = ("version", "status", "reason", "headers", "body")

    def __init__(self, version, status, reason, headers):
        self.version, self.status, self.reason, self.headers = version, status, reason, headers
        self.body = b""


_STATUS_LINE_RE = re.compile(rb"^HTTP/(1\.[01]) ([1-9][0-9][0-9])(?: ([\t\x20-\x7e\x80-\xff]*))?$")


class ResponseParser:
    """Incremental response parser, the client's counterpart of
    ``RequestParser``: ``feed(bytes)`` as bytes arrive, ``feed_eof()``
    when the peer has closed, and ``next()`` returns the next complete
    Response or None (more bytes needed); the bytes after it stay in
    ``buf`` for the next call (pipelined responses).

    Framing follows RFC 9112 6.3: interim 1xx responses are skipped
    (101 is an error: this client never asks to switch protocols); a
    response to HEAD, a 204 and a 304 have no body; then
    ``Transfer-Encoding: chunked``, then ``Content-Length``, and else the
    body runs until the connection closes.  ``method`` is the method of
    the request(s) answered.

    Limits: a head over ``max_head`` bytes and a body over ``max_body``
    bytes raise ResponseError, as does every malformed input, with a
    message that names the problem; so does ``next()`` after
    ``feed_eof()`` when a response was cut short.
    """

    def __init__(self, method="GET", max_body=4 << 20, max_head=MAX_HEADER_BYTES):
        self.method = method.upper()
        self.max_body, self.max_head = max_body, max_head
        self.buf = bytearray()
        self.eof = False
        self._response = None        # head parsed, body still arriving
        self._length = None          # Content-Length of that body, or None
        self._chunked = None         # its ChunkedDecoder, or None

    def feed(self, data: bytes) -> None:
        if self.eof:
            raise ResponseError("data after the end of input")
        self.buf += data

    def feed_eof(self) -> None:
        self.eof = True

    def next(self):
        while self._response is None:
            response = self._parse_head()
            if response is None:
                return None
            if response.status == 101:
                raise ResponseError("unexpected 101 Switching Protocols")
            if response.status >= 200:
                self._response = response
        response = self._response
        if self._chunked is not None:
            if not self._chunked.decode(self.buf):
                if self.eof:
                    raise ResponseError("connection closed in a chunked body")
                return None
            response.body = bytes(self._chunked.body)
        elif self._length is not None:
            if len(self.buf) < self._length:
                if self.eof:
                    raise ResponseError("connection closed after %d of %d body bytes"
                                        % (len(self.buf), self._length))
                return None
            response.body = bytes(self.buf[:self._length])
            del self.buf[:self._length]
        elif self._has_body(response):                 # delimited by the close
            if len(self.buf) > self.max_body:
                raise ResponseError("response body over %d bytes" % self.max_body)
            if not self.eof:
                return None
            response.body = bytes(self.buf)
            self.buf.clear()
        self._response = self._length = self._chunked = None
        return response

    def _has_body(self, response) -> bool:
        return self.method != "HEAD" and response.status not in (204, 304)

    def _parse_head(self):
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > self.max_head:
                raise ResponseError("response head over %d bytes" % self.max_head)
            if self.eof and self.buf:
                raise ResponseError("connection closed in the response head")
            return None
        if end > self.max_head:
            raise ResponseError("response head over %d bytes" % self.max_head)
        lines = bytes(self.buf[:end]).split(b"\r\n")
        del self.buf[:end + 4]
        m = _STATUS_LINE_RE.match(lines[0])
        if not m:
            raise ResponseError("malformed status line %r" % lines[0][:80])
        headers = parse_header_lines(lines[1:], _response_error)
        response = Response("HTTP/" + m.group(1).decode("ascii"), int(m.group(2)),
                            (m.group(3) or b"").decode("latin-1"), headers)
        if response.status < 200 or not self._has_body(response):
            return response
        te = headers.get("transfer-encoding")
        if te is not None:
            if "content-length" in headers:
                raise ResponseError("both Transfer-Encoding and Content-Length")
            if te.split(",")[-1].strip().lower() == "chunked":
                self._chunked = ChunkedDecoder(self.max_body, "response", _response_error)
            # another final coding: the body runs until the close
        elif "content-length" in headers:
            length = headers["content-length"].strip(" \t")
            if not is_ascii_digits(length) or len(length) > 15:
                raise ResponseError("bad Content-Length %r" % length[:20])
            self._length = int(length)
            if self._length > self.max_body:
                raise ResponseError("response body over %d bytes" % self.max_body)
        return response


def reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def render_head(status: int, headers) -> bytes:
    lines = ["HTTP/1.1 %d %s" % (status, reason(status))]
    lines.extend("%s: %s" % kv for kv in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data) if data else b""


def sse_event(event: str, data_lines, event_id=None) -> bytes:
    """One server-sent event: optional ``id:``, ``event:``, one ``data:``
    per line, and the blank line that dispatches it (WHATWG HTML 9.2)."""
    out = []
    if event_id is not None:
        out.append("id: %s" % event_id)
    out.append("event: %s" % event)
    out.extend("data: %s" % line for line in (data_lines or [""]))
    return ("\r\n".join(out) + "\r\n\r\n").encode("utf-8")


WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
WS_CONT, WS_TEXT, WS_BINARY, WS_CLOSE, WS_PING, WS_PONG = 0, 1, 2, 8, 9, 10
WS_MAX_MESSAGE = 1 << 20


def ws_accept_key(key: str) -> str:
    return base64.b64encode(lazy_import("hashlib").sha1((key + WS_GUID).encode("ascii")).digest()).decode()


def ws_frame(opcode: int, payload: bytes = b"") -> bytes:
    """A final, unmasked server frame (RFC 6455 5.2)."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return head + payload


class WebSocketError(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


class WebSocketParser:
    """Client frames in, messages out: ``feed(bytes)`` returns a list of
    ``(opcode, payload)`` with fragments joined and control frames
    passed through.  Raises WebSocketError with the close code to send."""

    def __init__(self):
        self.buf = bytearray()
        self._message = bytearray()   # the fragments so far: one buffer, so that
        self._opcode = None           # neither its size nor its cost grows per frame

    def feed(self, data: bytes) -> list:
        self.buf += data
        out = []
        while True:
            frame = self._frame()
            if frame is None:
                return out
            fin, opcode, payload = frame
            if opcode >= 8:
                if not fin or len(payload) > 125:
                    raise WebSocketError(1002, "bad control frame")
                out.append((opcode, payload))
            elif opcode == WS_CONT:
                if self._opcode is None:
                    raise WebSocketError(1002, "continuation without a message")
                if len(self._message) + len(payload) > WS_MAX_MESSAGE:
                    raise WebSocketError(1009, "message too big")
                self._message += payload
                if fin:
                    out.append((self._opcode, bytes(self._message)))
                    self._opcode, self._message = None, bytearray()
            elif opcode in (WS_TEXT, WS_BINARY):
                if self._opcode is not None:
                    raise WebSocketError(1002, "new message inside a fragmented one")
                if fin:
                    out.append((opcode, payload))
                else:
                    self._opcode, self._message = opcode, bytearray(payload)
            else:
                raise WebSocketError(1002, "unknown opcode %d" % opcode)

    def _frame(self):
        buf = self.buf
        if len(buf) < 2:
            return None
        b0, b1 = buf[0], buf[1]
        if b0 & 0x70:
            raise WebSocketError(1002, "reserved bits set")
        if not b1 & 0x80:
            raise WebSocketError(1002, "client frames must be masked")
        n, pos = b1 & 0x7F, 2
        if n == 126:
            if len(buf) < 4:
                return None
            n, pos = struct.unpack("!H", buf[2:4])[0], 4
        elif n == 127:
            if len(buf) < 10:
                return None
            n, pos = struct.unpack("!Q", buf[2:10])[0], 10
        if n > WS_MAX_MESSAGE:
            raise WebSocketError(1009, "frame too big")
        if len(buf) < pos + 4 + n:
            return None
        mask = buf[pos:pos + 4]
        data = bytes(buf[pos + 4:pos + 4 + n])
        del buf[:pos + 4 + n]
        if n:
            key = (bytes(mask) * (n // 4 + 1))[:n]
            data = (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
        return bool(b0 & 0x80), b0 & 0x0F, data


# § 7 event loop (I/O) -----------------------------------------------------
# Owns: the one selector, the timer heap, signal delivery and child
# reaping.  One iteration (as in tornado's IOLoop): run the ready
# callbacks, wait in select() until the next timer or I/O event, dispatch
# I/O, move due timers to the ready queue.  There is no polling tick.
# Signals arrive through ``signal.set_wakeup_fd`` on a socketpair that the
# selector watches (a Python-level handler alone would not wake select(),
# PEP 475).  Uses §1.  Used by everything below; it is the loop API that
# plugins get (see the module docstring).


class Handle:
    """A scheduled callback; ``cancel()`` stops it from running."""

    __slots__ = ("when", "seq", "callback", "args", "cancelled")

    def __init__(self, when, seq, callback, args):
        self.when, self.seq, self.callback, self.args = when, seq, callback, args
        self.cancelled = False

    def cancel(self):
        """Never run; drop the callback and its arguments at once (a
        cancelled timer can sit in the heap until its time comes)."""
        self.cancelled = True
        self.callback = self.args = None

    def __lt__(self, other):
        return (self.when, self.seq) < (other.when, other.seq)

    def _run(self):
        try:
            self.callback(*self.args)
        except Exception:
            log.exception("error in loop callback %r", self.callback)


def _no_op_handler(signum, frame):
    """The real work happens when the loop reads the wakeup byte."""


# epoll_wait() takes an int of milliseconds (beyond 2**31 ms Python raises
# OverflowError) and select() has its own limits; a later timer simply
# costs one extra wake-up a day.
SELECT_TIMEOUT_MAX = 24 * 3600.0


def _is_real(number) -> bool:
    """An int or a float that is finite (and fits in a float)."""
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        return False
    try:
        number = float(number)
    except OverflowError:
        return False
    return number - number == 0              # False for nan and the infinities


class Loop:
    """Single-threaded event loop: ready callbacks, timers, fd watchers,
    signals and child exits, over one ``selectors`` selector.

    Loop(time_func=time.monotonic, wall_func=time.time): ``time_func`` is
    its clock (monotonic seconds) and ``wall_func`` the Unix time used
    only for dates (``unix_time`` for reports, ``wall_time`` for
    schedules); tests pass their own instead of patching the module.

    One iteration (``run_once``): select() until the first live timer is
    due (at once when callbacks are ready; never a fixed tick, at most
    SELECT_TIMEOUT_MAX), run the watchers of the ready fds, move the due
    timers to the ready queue, then run the callbacks that were ready.

    Methods for the caller (plugins get the first group; see the module
    docstring):
        time() -> float                        the clock, monotonic seconds
        call_soon(cb, *args) -> Handle         run on the next iteration
        call_later(delay, cb, *args) -> Handle ValueError for a delay that
                                               is not a finite number up
                                               to MAX_DELAY (a week)
        call_at(when, cb, *args) -> Handle     the same, in loop time
        cancel(handle)                         also accepts None
        add_reader(fd, cb, *args), remove_reader(fd)
        add_writer(fd, cb, *args), remove_writer(fd)
        watch_child(pid, cb)                   cb(pid, exit_status, term_signal)
        add_signal_handler(signum, cb)         cb(signum) on the loop
        run(), run_once(), stop(), close()     for main() and tests
        call_soon_threadsafe(cb, *args)        the one thread-safe method

    What a caller may rely on:
      * Every callback runs on the loop's thread, one at a time, never
        re-entrantly: one scheduled while the loop runs callbacks waits
        for the next iteration.  call_soon callbacks run in the order
        they were queued; timers due together run in ``when`` order,
        ties in the order they were scheduled.
      * An exception a callback raises is logged with its traceback and
        goes no further (``Handle._run`` is that error boundary).
      * A cancelled handle never runs; cancelling twice, or a handle
        that already ran, does nothing.
      * One reader and one writer per fd: adding replaces the previous
        one; removing one that is not there (or of an fd already closed)
        does nothing.  A watcher removed or replaced by an earlier
        callback of the same iteration is not run, even if the fd number
        was reused meanwhile.
      * A signal handler runs as a callback, never inside the Python
        signal handler, so it may do anything a callback may.  SIGCHLD is
        the loop's own: it reaps every child (``reap_children``) and hands
        each exit to its ``watch_child`` callback, once, after the child's
        pid was reaped; nobody else may wait for children.
      * Nothing here blocks but select() itself.

    Instance variables others read: ``iteration`` (run_once calls, for
    per-iteration budgets), ``trimmer`` (the MemoryTrimmer),
    ``unwatched_child`` (watcher of children nobody watches, set by the
    manager), ``core_dumped`` (of the exit being reported).
    """

    MAX_DELAY = RANGES["delay"][1]       # call_later / call_at, one week

    def __init__(self, time_func=time.monotonic, wall_func=time.time):
        self._time_func, self._wall_func = time_func, wall_func
        self._selector = selectors.DefaultSelector()
        self._ready = collections.deque()
        self._timers = []
        self._timer_check = 512
        self._seq = itertools.count()
        self._stopping = False
        self.iteration = 0                 # run_once calls, for per-iteration budgets
        self._signal_handlers = {}
        self._child_watchers = {}
        self.unwatched_child = None        # watcher of children nobody watches
        self.child_starting = None         # pid -> True: a start not reported yet (leave it)
        self.reap_deferred = False         # a pass stopped at such a child
        self._reap_scheduled = False       # the rest of an exit burst, next iteration
        self.core_dumped = False           # of the exit a child watcher is being told about
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.add_reader(self._wake_r.fileno(), self._on_wakeup)
        self.trimmer = MemoryTrimmer(self)

    # -- time and callbacks -------------------------------------------------
    def time(self) -> float:
        return self._time_func()

    def unix_time(self, when: float) -> float:
        """Loop time ``when`` as Unix time (seconds), for reports."""
        return round(self._wall_func() - (self._time_func() - when), 3)

    def wall_time(self) -> float:
        """Unix time now (the injectable wall clock): for what runs at
        dates (schedules), never to measure an interval."""
        return self._wall_func()

    def call_soon(self, callback, *args) -> Handle:
        handle = Handle(0, 0, callback, args)
        self._ready.append(handle)
        return handle

    def call_soon_threadsafe(self, callback, *args) -> Handle:
        """call_soon from another thread: queue, then wake select() (a zero
        byte on the wakeup socket, which no signal handler claims)."""
        handle = Handle(0, 0, callback, args)
        self._ready.append(handle)              # deque.append is atomic
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass
        return handle

    def call_at(self, when, callback, *args) -> Handle:
        """Run ``callback(*args)`` at loop time ``when``: a finite number
        at most MAX_DURATION (one week) ahead, ValueError otherwise (a nan
        would corrupt the heap's order, an infinity the select timeout)."""
        if not _is_real(when) or when - self.time() > self.MAX_DELAY:
            raise ValueError("call_at(%r): not a time within %g s from now"
                             % (when, self.MAX_DELAY))
        handle = Handle(when, next(self._seq), callback, args)
        heapq.heappush(self._timers, handle)
        return handle

    def call_later(self, delay, callback, *args) -> Handle:
        """Run ``callback(*args)`` in ``delay`` seconds: a negative delay
        means now; nan, infinities and more than MAX_DURATION (one week)
        are a ValueError."""
        if not _is_real(delay) or delay > self.MAX_DELAY:
            raise ValueError("call_later(%r): the delay must be a number of seconds "
                             "up to %g" % (delay, self.MAX_DELAY))
        return self.call_at(self.time() + max(0.0, delay), callback, *args)

    @staticmethod
    def cancel(handle) -> None:
        if handle is not None:
            handle.cancel()

    # -- file descriptors -----------------------------------------------------
    def _update(self, fd, index, handle):
        fd = fd if isinstance(fd, int) else fd.fileno()
        try:
            key = self._selector.get_key(fd)
            callbacks = list(key.data)
        except KeyError:
            key, callbacks = None, [None, None]
        callbacks[index] = handle
        mask = (selectors.EVENT_READ if callbacks[0] else 0) | \
               (selectors.EVENT_WRITE if callbacks[1] else 0)
        if key is None:
            if mask:
                self._selector.register(fd, mask, callbacks)
        elif mask:
            self._selector.modify(fd, mask, callbacks)
        else:
            self._selector.unregister(fd)

    def add_reader(self, fd, callback, *args):
        self._update(fd, 0, Handle(0, 0, callback, args))

    def remove_reader(self, fd):
        self._forget(fd, 0)

    def add_writer(self, fd, callback, *args):
        self._update(fd, 1, Handle(0, 0, callback, args))

    def remove_writer(self, fd):
        self._forget(fd, 1)

    def _forget(self, fd, index):
        """Drop the reader (0) or writer (1) of ``fd``; an fd already
        closed (ValueError, OSError from the selector) has none left."""
        try:
            self._update(fd, index, None)
        except (ValueError, OSError):
            pass

    # -- signals and children --------------------------------------------------
    def add_signal_handler(self, signum, callback):
        """Run ``callback(signum)`` on the loop whenever ``signum`` arrives."""
        if not self._signal_handlers:
            signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        self._signal_handlers[signum] = callback
        signal.signal(signum, _no_op_handler)
        signal.siginterrupt(signum, False)

    def _on_wakeup(self):
        try:
            data = self._wake_r.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        for signum in dict.fromkeys(data):           # each signal once, in order
            if signum == signal.SIGCHLD:
                self.reap_children()
            handler = self._signal_handlers.get(signum)
            if handler and signum != signal.SIGCHLD:
                self.call_soon(handler, signum)

    def watch_child(self, pid, callback):
        """``callback(pid, exit_status, term_signal)`` when child ``pid``
        exits.  A callback may also have ``before_reap(pid)``, called
        while the child is still a zombie (its pid and process group
        cannot be reused yet).  A child nobody watches (an orphan the
        daemon adopted as subreaper) goes to ``unwatched_child``, a
        watcher of the same shape, when one is set.

        A child started off the loop can exit before its starter learns
        its pid: ``child_starting(pid)``, when set, is asked about a child
        nobody watches; it may register the watcher at once, or answer
        True, and then the zombie is left (with everything the kernel
        lists after it) until the starter calls ``reap_children`` again."""
        self._child_watchers[pid] = callback

    def watches_child(self, pid) -> bool:
        return pid in self._child_watchers

    def reap_children(self):
        """Reap every child that has exited (SIGCHLD, gunicorn style).

        Each zombie is first looked at with WNOWAIT so that its watcher
        can signal what is left of its process group while the group id
        still cannot be reused, then reaped.  After REAP_BUDGET seconds the
        rest waits for the next iteration (an exit storm must not hold up
        the API)."""
        end = self.time() + REAP_BUDGET
        while True:
            if self.time() >= end:
                if not self._reap_scheduled:
                    self._reap_scheduled = True
                    self.call_soon(self._reap_later)
                return
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if info is None or info.si_pid == 0:
                return
            pid = info.si_pid
            watcher = self._child_watchers.pop(pid, None)
            if watcher is None and self.child_starting is not None:
                if self.child_starting(pid):
                    self.reap_deferred = True
                    return
                watcher = self._child_watchers.pop(pid, None)
            if watcher is None:
                watcher = self.unwatched_child
            before = getattr(watcher, "before_reap", None)
            if before is not None:
                try:
                    before(pid)
                except Exception:
                    log.exception("error before reaping %d", pid)
            try:
                _, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            self.core_dumped = os.WIFSIGNALED(status) and os.WCOREDUMP(status)
            if os.WIFSIGNALED(status):
                exit_status, term_signal = 0, os.WTERMSIG(status)
            else:
                exit_status, term_signal = os.WEXITSTATUS(status), 0
            if watcher is not None:
                try:
                    watcher(pid, exit_status, term_signal)
                except Exception:
                    log.exception("error in child watcher for %d", pid)

    def _reap_later(self):
        self._reap_scheduled = False
        self.reap_children()

    # -- running ---------------------------------------------------------------
    def stop(self):
        self._stopping = True

    # Consecutive iterations that may fail inside the loop's own code
    # before run() gives up; each failure is logged and the loop goes on.
    MAX_FAILED_ITERATIONS = 100

    def run(self):
        """Run iterations until stop().  An exception in the loop's own
        code (callbacks have their own boundary in Handle._run) is logged
        and the loop goes on: supervising children matters more than one
        iteration.  Only MAX_FAILED_ITERATIONS failures in a row, a loop
        that cannot make progress at all, raise to the caller, which must
        then stop the children itself."""
        self._stopping = False
        failures = 0
        reap = True
        while not self._stopping:
            try:
                if reap:
                    reap = False
                    self.reap_children()
                self.run_once()
                failures = 0
            except Exception:
                failures += 1
                if failures >= self.MAX_FAILED_ITERATIONS:
                    raise
                if failures == 1:
                    log.exception("error in the event loop itself; going on")

    def _select_timeout(self):
        """Seconds select() may wait: 0 with callbacks ready, else until
        the first live timer (cancelled ones at the head of the heap are
        dropped, they must not decide), at most SELECT_TIMEOUT_MAX; None
        with no timers."""
        if self._ready:
            return 0
        timers = self._timers
        while timers and timers[0].cancelled:
            heapq.heappop(timers)
        if not timers:
            return None
        return min(max(0.0, timers[0].when - self.time()), SELECT_TIMEOUT_MAX)

    def run_once(self):
        self.iteration += 1
        timeout = self._select_timeout()
        get_key = self._selector.get_key
        for key, mask in self._selector.select(timeout):
            # An earlier callback of this batch may have removed this fd's
            # watcher, closed the fd, and even reused its number (a child's
            # pipe closed on its exit, then accept() returns the same
            # number): only the watcher registered now may run, or a stale
            # one reads a request off a new connection.
            reader, writer = key.data
            if mask & selectors.EVENT_READ and reader is not None:
                if self._current(get_key, key.fd, 0) is reader:
                    reader._run()
            if mask & selectors.EVENT_WRITE and writer is not None:
                if self._current(get_key, key.fd, 1) is writer:
                    writer._run()
        now = self.time()
        timers = self._timers
        while timers and timers[0].when <= now:
            handle = heapq.heappop(timers)
            if not handle.cancelled:
                self._ready.append(handle)
        if len(timers) > self._timer_check:      # drop cancelled timers, amortised
            self._timers = [h for h in timers if not h.cancelled]
            heapq.heapify(self._timers)
            self._timer_check = max(512, 2 * len(self._timers))
        for _ in range(len(self._ready)):
            handle = self._ready.popleft()
            if not handle.cancelled:
                handle._run()

    @staticmethod
    def _current(get_key, fd, index):
        try:
            return get_key(fd).data[index]
        except (KeyError, ValueError):
            return None

    def close(self):
        signal.set_wakeup_fd(-1)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()


_MALLOC_TRIM = []


def malloc_trim() -> None:
    """glibc's ``malloc_trim(0)``: free heap pages go back to the kernel
    (nothing happens with another libc)."""
    if not _MALLOC_TRIM:
        try:
            _MALLOC_TRIM.append(lazy_import("ctypes").CDLL("libc.so.6").malloc_trim)
        except (OSError, AttributeError):
            _MALLOC_TRIM.append(None)
    if _MALLOC_TRIM[0] is not None:
        _MALLOC_TRIM[0](0)


class MemoryTrimmer:
    """Gives the memory a burst freed (exited processes' rings, closed
    connections' buffers) back to the kernel once the daemon has been
    quiet for ``quiet`` seconds (QUIET unless given); glibc keeps it
    otherwise, and RSS stayed 15 % up after soak scenario 8.  One timer
    while there is activity, none when idle.  ``trim`` is what gives the
    memory back (``malloc_trim``; tests pass a recorder).

    Methods for the caller: ``touch()`` after freeing something big (a
    process's rings, a connection's buffers).  It is cheap enough to call
    on every such event: it only notes the time, and arms a timer when
    none is armed.  ``trim`` runs on the loop once nothing has been
    touched for ``quiet`` seconds, never more than once per quiet spell,
    and never while a burst goes on (it costs a walk of the heap).
    """

    QUIET = 1.0

    def __init__(self, loop, trim=malloc_trim, quiet=QUIET):
        self.loop = loop
        self.trim, self.quiet = trim, quiet
        self._handle = None
        self._last = 0.0

    def touch(self) -> None:
        """Something big was freed."""
        self._last = self.loop.time()
        if self._handle is None:
            self._handle = self.loop.call_later(self.quiet, self._fire)

    def _fire(self):
        wait = self._last + self.quiet - self.loop.time()
        if wait > 0:
            self._handle = self.loop.call_later(wait, self._fire)
            return
        self._handle = None
        self.trim()


# § 8 processes (I/O) ------------------------------------------------------
# Owns: spawning children (argv, environment, fds, user), their pipes, ring buffers,
# log files (raw or json lines; and the safe opening of every file the daemon writes)
# and syslog datagrams, stopping them (SIGTERM to the process group, SIGKILL after
# graceful_timeout), reacting to exits (respawn, flapping), the readiness
# checks that need no network client (log:, cmd:, the sd_notify socket and
# its watchdog), and the ``Manager`` that holds templates, processes and
# groups.  The Manager keeps the API and the template operations and hands
# the rest to collaborators it owns, one home each: ``Lifecycle`` (slot
# states and the table's actions), ``Dependencies`` (``depends_on``),
# ``Scheduler`` (``schedule``: when a periodic template runs),
# ``Spawner`` (spawn queue, budget, exec; the fork and the wait for the
# exec run on its ``_Starter`` threads), ``Rollout`` (a rolling restart),
# ``Shutdown`` (the way down),
# ``Reaper`` (exits) and ``GroupCleaner`` (what an exit leaves behind).
# Uses §1-§7.
# The HTTP API (§11), plugins (§10) and main() (§15) drive it through the
# Manager methods listed in its docstring.


# -- files the daemon writes ---------------------------------------------------
# The daemon runs as root and writes files in directories its children may
# be able to write (a program under ``uid = app`` owns its log directory).
# Whatever such a user puts at a path -- a symbolic link to /etc/shadow, a
# hard link, a FIFO that never gets a reader, a device -- must never make
# root write, truncate or create a file elsewhere, nor block.  So every
# file the daemon writes (log files, their rotation, the pidfile, its own
# log) is opened by ``open_safely``:
#
# * the path is walked one component at a time from ``/`` with O_NOFOLLOW,
#   each directory held by its fd, so nothing can be swapped in behind the
#   walk;
# * a symbolic link (in the middle or at the end) is followed only when it
#   is *trusted*: owned by root or the daemon's user, and every directory
#   on the way to it is owned by root or the daemon's user and not
#   writable by group or others (a sticky directory such as /tmp counts
#   when the entry passed through it is owned by root or the daemon's
#   user, as nobody else may rename or remove that entry).  /dev/stdout
#   qualifies; a link in a program's own log directory does not.  A
#   trusted link is resolved by the walk itself, hop by hop, so its target
#   obeys the same rule; a /proc link (/proc/self/fd/1) names an object
#   the kernel already holds and is followed by the kernel;
# * the file itself is opened with O_NOFOLLOW | O_NONBLOCK | O_NOCTTY |
#   O_CLOEXEC (a FIFO without a reader fails with ENXIO instead of
#   blocking), then checked with fstat: a regular file must have exactly
#   one link; anything else (FIFO, tty, device, socket) is accepted only
#   when it is owned by root or the daemon's user in a trusted directory,
#   or reached through a /proc link, and is then written to but never
#   rotated, renamed or truncated;
# * a refusal is an ``UnsafeFileError`` naming the path and the reason.

_SYMLOOP_MAX = 40                    # as the kernel's limit on links in a path
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_FILE_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class UnsafeFileError(OSError):
    """A path the daemon must not write; ``str()`` is one clear line."""

    def __init__(self, path, reason):
        super().__init__(errno.EPERM, reason, path)
        self.path, self.reason = path, reason

    def __str__(self):
        return "%s: %s" % (self.path, self.reason)


class SafeFile:
    """What ``open_safely`` opened.

    ``fd`` the open file; ``dir_fd`` the directory that holds it (the
    caller closes both, ``close()`` does); ``name`` its entry in
    ``dir_fd``; ``regular`` is it a regular file; ``rotatable`` may it be
    renamed or truncated: a regular file reached without following a link
    at its own name."""

    def __init__(self, fd, dir_fd, name, regular, rotatable):
        self.fd, self.dir_fd, self.name = fd, dir_fd, name
        self.regular, self.rotatable = regular, rotatable

    def close(self):
        for fd in (self.fd, self.dir_fd):
            if fd is not None:
                close_quietly(fd)
        self.fd = self.dir_fd = None


def _owned_by_us(st) -> bool:
    return st.st_uid in (0, os.geteuid())


def _safe_step(dir_st, entry_st) -> bool:
    """May nobody but root or us replace ``entry`` in this directory?"""
    if not _owned_by_us(dir_st):
        return False
    if not dir_st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return True
    return bool(dir_st.st_mode & stat.S_ISVTX) and _owned_by_us(entry_st)


def _is_procfs(dir_fd) -> bool:
    try:
        return os.fstat(dir_fd).st_dev == os.stat("/proc").st_dev
    except OSError:
        return False


class _Walk:
    """The directory walk of ``open_safely``: ``fd`` is the directory
    reached, ``trusted`` says whether every step to it was safe."""

    def __init__(self, path):
        self.path, self.hops = path, 0
        self.fd = None
        self._restart()

    def _restart(self):
        if self.fd is not None:
            close_quietly(self.fd)
        self.fd = os.open("/", _DIR_FLAGS)
        self.trusted = _owned_by_us(os.fstat(self.fd))

    def close(self):
        if self.fd is not None:
            close_quietly(self.fd)
        self.fd = None

    def follow(self, name) -> str:
        """The target of the link ``name`` in the current directory, if it
        is trusted; None for a /proc link (for the kernel to follow)."""
        link_st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        if not (self.trusted and _owned_by_us(link_st)
                and _safe_step(os.fstat(self.fd), link_st)):
            raise UnsafeFileError(self.path, "%r is a symbolic link that another user could "
                                  "have made or changed; not followed" % name)
        self.hops += 1
        if self.hops > _SYMLOOP_MAX:
            raise UnsafeFileError(self.path, "too many levels of symbolic links")
        if _is_procfs(self.fd):
            return None
        return os.readlink(name, dir_fd=self.fd)

    def walk(self, parts) -> str:
        """Walk the directory components of ``parts``; return the last."""
        parts = [p for p in parts if p not in ("", ".")]
        if not parts:
            raise UnsafeFileError(self.path, "is a directory")
        pending = list(reversed(parts))
        while len(pending) > 1:
            name = pending.pop()
            try:
                fd = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=self.fd)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                if not stat.S_ISLNK(os.stat(name, dir_fd=self.fd, follow_symlinks=False).st_mode):
                    raise
                target = self.follow(name)
                if target is None:
                    fd = os.open(name, _DIR_FLAGS, dir_fd=self.fd)
                else:
                    if target.startswith("/"):
                        self._restart()
                    pending.extend(reversed([p for p in target.split("/") if p not in ("", ".")]))
                    continue
            # ".." leads to a directory whose own ancestors were not checked
            self.trusted = (self.trusted and name != ".."
                            and _safe_step(os.fstat(self.fd), os.fstat(fd)))
            close_quietly(self.fd)
            self.fd = fd
        return pending[0]


def _file_kind(mode) -> str:
    for test, kind in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return kind
    return "special file"


def _refuse_special(walk, name, exc):
    """Say why ``name`` could not be opened: a directory, or a FIFO (or
    socket) nobody reads, refused outright when another user could have
    put it there."""
    st = os.stat(name, dir_fd=walk.fd, follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode):
        raise UnsafeFileError(walk.path, "is a directory")
    if not (walk.trusted and _owned_by_us(st) and _safe_step(os.fstat(walk.fd), st)):
        raise UnsafeFileError(walk.path, "is a %s in a place another user can write"
                              % _file_kind(st.st_mode))
    raise OSError(exc.errno, "is a %s that nobody reads" % _file_kind(st.st_mode), walk.path)


def open_directory_of(path):
    """Open the directory that holds ``path``'s last component, walking
    it under the rules above; return ``(dir_fd, name)``.  Raises
    UnsafeFileError or OSError."""
    walk = _Walk(os.path.abspath(path))
    try:
        name = walk.walk(walk.path.split("/"))
    except BaseException:
        walk.close()
        raise
    return walk.fd, name


def open_safely(path, flags=os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode=0o644,
                follow=True) -> SafeFile:
    """Open ``path`` under the rules above and return a SafeFile.

    ``flags`` are added to O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC;
    ``follow=False`` refuses a link at the last component even when it is
    trusted.  Never blocks.  Raises UnsafeFileError for a refusal, OSError
    for any other failure (ENXIO: a FIFO nobody reads)."""
    walk = _Walk(os.path.abspath(path))
    fd, via_link, via_proc = None, False, False
    try:
        parts = walk.path.split("/")
        while fd is None:
            name = walk.walk(parts)
            try:
                fd = os.open(name, flags | _FILE_FLAGS, mode, dir_fd=walk.fd)
            except OSError as exc:
                if exc.errno in (errno.ENXIO, errno.EISDIR):
                    _refuse_special(walk, name, exc)
                if exc.errno != errno.ELOOP:
                    raise
                if not follow:
                    raise UnsafeFileError(walk.path, "is a symbolic link; not followed")
                via_link = True
                target = walk.follow(name)
                if target is None:
                    via_proc = True
                    fd = os.open(name, (flags & ~os.O_CREAT) | (_FILE_FLAGS & ~os.O_NOFOLLOW),
                                 dir_fd=walk.fd)   # the kernel's own link: no path to walk
                    break
                if target.startswith("/"):
                    walk._restart()
                parts = target.split("/")
        st = os.fstat(fd)
        regular = stat.S_ISREG(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            raise UnsafeFileError(walk.path, "is a directory")
        if regular and st.st_nlink != 1 and not via_proc:
            raise UnsafeFileError(walk.path, "has %d hard links (another name could point at "
                                  "any file)" % st.st_nlink)
        if not regular and not via_proc and not (
                walk.trusted and _owned_by_us(st) and _safe_step(os.fstat(walk.fd), st)):
            raise UnsafeFileError(walk.path, "is a %s in a place another user can write"
                                  % _file_kind(st.st_mode))
    except BaseException:
        if fd is not None:
            close_quietly(fd)
        walk.close()
        raise
    return SafeFile(fd, walk.fd, name, regular, regular and not via_link)


class LogLine(bytes):
    """A whole line of the daemon's own for a program's log file (``log_events``)."""


class LogFile:
    """An append-only log file with size-based rotation (FILE.1 newest).

    Rotation happens at a line boundary when one fits, so lines stay
    whole.  The file is opened with ``open_safely``: a path that is
    refused (a link another user could have made, a hard link, a FIFO in
    a program's directory...) is logged once, with the reason, and its
    output dropped until it is fixed; it is tried again at the next write.
    Rotation renames entries of the directory held since the open, never
    through a path; ``backups = 0`` empties the file through the fd held.
    What is not a regular file once opened (a pipe, a tty, /dev/null, a
    file reached through a link) is written to but never rotated.  A write
    error (a full disk) is logged at most once a minute and the data is
    dropped; the next write tries again.  ``-`` is the daemon's own stdout
    (written with os.write, no seeking).  Writes to what is not a regular
    file never block: what it does not take is tried again by the writer
    thread (``LogWriter.STREAM_RETRY``) until it does, or up to
    STREAM_BUFFER_LIMIT (then the oldest is dropped).
    """

    def __init__(self, path, maxbytes, backups, timestamps=False):
        self.path, self.maxbytes, self.backups = path, maxbytes, backups
        self.timestamps = timestamps
        self._fd = None
        self._file = None                # SafeFile while open (not for '-')
        self._stream = path == "-"       # written without blocking, never rotated
        self._size = 0
        self._line_start = True
        self._last_error = None
        self._refused = None             # the refusal last logged
        self._pending = bytearray()      # streams: what the reader did not take yet
        self.dropped = 0

    def _open(self):
        if self.path == "-":
            # A description of our own, non-blocking, so an unread pipe on
            # stdout never blocks the loop (and the shared fd 1 keeps its flags).
            try:
                self._fd = os.open("/proc/self/fd/1", os.O_WRONLY | os.O_APPEND |
                                   os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                self._fd = os.dup(1)
            return
        self._file = open_safely(self.path)
        self._fd = self._file.fd
        self._stream = not self._file.rotatable
        self._size = os.fstat(self._fd).st_size
        if self._refused is not None:
            log.info("log file %s: writing again", self.path)
            self._refused = None

    def open_now(self):
        """Open at once (the daemon's own log at start-up); OSError."""
        if self._fd is None:
            self._open()

    def close(self):
        if self._file is not None:
            self._file.close()
        elif self._fd is not None:
            close_quietly(self._fd)
        self._fd = self._file = None

    def _stamp(self, data: bytes) -> bytes:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z ").encode()
        out = bytearray()
        for line in data.splitlines(True):
            if self._line_start:
                out += stamp
            out += line
            self._line_start = line.endswith(b"\n")
        return bytes(out)

    def write_now(self, data: bytes) -> bool:
        """Write (LogWriter's thread only).  A ``LogLine`` starts on a line
        of its own even when the output before it ended mid-line.  Returns
        True while a pipe holds back some of it (``b""`` tries again)."""
        if isinstance(data, LogLine) and not self._line_start:
            data = b"\n" + data
        if self.timestamps:
            data = self._stamp(data)
        elif data:
            self._line_start = data.endswith(b"\n")
        try:
            if self._fd is None:
                self._open()
            if not data and self._pending:
                self._write_stream(b"")
            while data:
                if not self._stream and self.maxbytes and self._size + len(data) > self.maxbytes:
                    room = self.maxbytes - self._size
                    cut = data.rfind(b"\n", 0, room) + 1
                    if cut <= 0 and self._size == 0:
                        cut = room
                    if cut > 0:
                        self._write_all(data[:cut])
                        data = data[cut:]
                    self._rotate()
                    continue
                self._write_all(data)
                data = b""
            self._last_error = None
        except UnsafeFileError as exc:
            self.close()
            if self._refused != exc.reason:
                self._refused = exc.reason       # first: the daemon's own log comes back here
                log.error("refusing to write log file %s: %s (output dropped until that "
                          "changes)", self.path, exc.reason)
        except OSError as exc:
            self.close()
            self._pending.clear()                # EPIPE: nobody reads that pipe any more
            now = time.monotonic()
            if self._last_error is None or now - self._last_error > 60:
                self._last_error = now
                log.error("cannot write log file %s: %s (output dropped until it works)",
                          self.path, exc.strerror or exc)
        return bool(self._pending)

    def _write_all(self, data):
        if self._stream:
            self._write_stream(data)
            return
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
            self._size += n

    def _write_stream(self, data):
        """Never blocks: what the pipe does not take waits (up to
        STREAM_BUFFER_LIMIT, then the oldest is dropped) for the next write."""
        self._pending += data
        while self._pending:
            try:
                n = os.write(self._fd, self._pending)
            except BlockingIOError:
                break
            del self._pending[:n]
        excess = len(self._pending) - STREAM_BUFFER_LIMIT
        if excess > 0:
            del self._pending[:excess]
            self.dropped += excess
            now = time.monotonic()
            if self._last_error is None or now - self._last_error > 60:
                self._last_error = now
                log.warning("%s is not being read: %d bytes of output dropped",
                            "stdout" if self.path == "-" else self.path, self.dropped)

    def _rotate(self):
        """Rename FILE.N-1 .. FILE to FILE.N .. FILE.1 inside the directory
        held since the open (rename(2) moves a link, never what it points
        to), then open FILE afresh.  With no backups the file is emptied
        through its fd, after checking it is still a regular file."""
        held = self._file
        if self.backups <= 0:
            if not stat.S_ISREG(os.fstat(held.fd).st_mode):
                raise UnsafeFileError(self.path, "is no longer a regular file")
            os.ftruncate(held.fd, 0)
            self._size = 0
            return
        dir_fd, name = held.dir_fd, held.name
        for i in range(self.backups, 0, -1):
            src = "%s.%d" % (name, i - 1) if i > 1 else name
            try:
                os.replace(src, "%s.%d" % (name, i), src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except FileNotFoundError:
                pass
        self.close()
        self._open()


class LogWriter:
    """The one thread that writes log files.

    A write() to a file can sleep in the kernel for up to 200 ms when dirty
    pages pile up (Linux balance_dirty_pages), which would stall the whole
    loop.  So the loop only queues (file, bytes) here; this thread writes.
    When more than LOG_QUEUE_LIMIT bytes wait, the processes that produce
    them are paused (their pipes are not read, so they block on write)
    until the disk catches up.  Reopen and close requests travel through
    the same queue, so they keep their order with the data.
    """

    def __init__(self, loop):
        self.loop = loop
        self.queue = collections.deque()
        self.cond = threading.Condition()
        self.queued = 0
        self.paused = set()                    # processes waiting for the disk
        self.thread = None

    def submit(self, logfile, data, proc=None):
        with self.cond:
            if not self.queue:
                self.cond.notify()              # (it waits only on an empty queue)
            self.queue.append((logfile, data))
            self.queued += len(data or b"")
            full = self.queued > LOG_QUEUE_LIMIT
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="gafferd-logs", daemon=True)
            self.thread.start()
        if full and proc is not None and proc not in self.paused:
            self.paused.add(proc)
            proc.pause_output(self)

    def close_file(self, logfile):
        """Close ``logfile`` once what is queued before is written; the
        next write opens it again (how SIGUSR1 reopens rotated files)."""
        self.submit(logfile, None)

    def stop(self, timeout=5.0):
        """Write what is queued, close every file, end the thread."""
        if self.thread is not None:
            self.submit(None, None)
            self.thread.join(timeout)

    # While a pipe (``-``, a FIFO) has not taken all it was given, the
    # thread tries again this often; with nothing waiting it just sleeps.
    STREAM_RETRY = 0.05
    # Chunks of one file that follow each other in the queue are written
    # with one write() of up to this many bytes.
    BATCH = 1 << 20

    def _run(self):
        cond, queue = self.cond, self.queue
        waiting = set()                        # streams holding what a pipe did not take
        while True:
            with cond:
                if waiting and not queue:
                    cond.wait(self.STREAM_RETRY)
                while not queue and not waiting:
                    cond.wait()
                batch = list(queue)             # everything queued: one lock round trip
                queue.clear()
            if not batch:
                for logfile in list(waiting):
                    if not logfile.write_now(b""):
                        waiting.discard(logfile)
                continue
            written = 0
            index = 0
            while index < len(batch):
                logfile, data = batch[index]
                index += 1
                if logfile is None:
                    return
                if data is None:
                    logfile.close()
                    continue
                parts, size = [data], len(data)
                while index < len(batch) and batch[index][0] is logfile and \
                        batch[index][1] is not None and size < self.BATCH:
                    parts.append(batch[index][1])
                    size += len(batch[index][1])
                    index += 1
                if logfile.write_now(parts[0] if len(parts) == 1 else b"".join(parts)):
                    waiting.add(logfile)
                written += size
            with cond:
                self.queued -= written
                drained = self.paused and self.queued < LOG_QUEUE_LIMIT // 2
            if drained:
                self.loop.call_soon_threadsafe(self._resume)

    def _resume(self):
        with self.cond:
            if self.queued >= LOG_QUEUE_LIMIT // 2:
                return
        paused, self.paused = self.paused, set()
        for proc in paused:
            proc.resume_output(self)


class SyslogSender:
    """Datagrams to one syslog address (``parse_syslog_address``), never blocking.

    The socket is a non-blocking datagram socket, opened at the first
    send; each message is one ``sendto``.  A missing socket (ENOENT,
    ECONNREFUSED: no daemon), a full one (EAGAIN, ENOBUFS) or any other
    error drops that message and counts it in ``dropped`` (shown in
    /metrics); nothing is queued or retried, so a dead syslog never
    stalls the loop nor grows memory.  ``on_drop(error)``, when given, is
    called at most once a minute per sender (``clock`` seconds), for a
    log line."""

    def __init__(self, address, clock=time.monotonic, on_drop=None):
        self.address = address
        self.family, self.target = parse_syslog_address(address)
        self.hostname = None if self.family == socket.AF_UNIX else \
            (socket.gethostname().split(".")[0] or "-")
        self.clock, self.on_drop = clock, on_drop
        self.sock = None
        self.sent = self.dropped = 0
        self._last_report = None
        self._dead_until = None               # clock time: no syslog there until then

    def send(self, priority, tag, pid, messages, unix_time) -> int:
        """Send each of ``messages`` (bytes, one line each) with one header;
        returns how many were sent.  After a failure the rest of the batch
        is dropped without trying (a full queue does not drain in
        microseconds), and for a second after a missing socket every
        message is dropped at once (no system call per line while nobody
        listens)."""
        now = self.clock()
        if self._dead_until is not None and now < self._dead_until:
            self.dropped += len(messages)
            return 0
        head = syslog_header(priority, tag, pid, unix_time, self.hostname)
        sent = 0
        try:
            if self.sock is None:
                self.sock = socket.socket(self.family, socket.SOCK_DGRAM)
                self.sock.setblocking(False)          # and close-on-exec, as every socket
            for message in messages:
                self.sock.sendto(head + message[:SYSLOG_LINE_LIMIT], self.target)
                sent += 1
        except OSError as exc:
            self.dropped += len(messages) - sent
            if exc.errno not in (errno.EAGAIN, errno.ENOBUFS):
                self._dead_until = now + 1.0
            if self.on_drop is not None and (self._last_report is None or
                                             now - self._last_report >= 60):
                self._last_report = now
                self.on_drop(exc)
        self.sent += sent
        return sent

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


# Labels of stdout and stderr when they are read only for a ``log:``
# readiness check (not redirected): nothing outside the process sees them.
_UNREDIRECTED = ("\0stdout", "\0stderr")


class Process:
    """One OS process of a template.

    Public: ``id`` (internal id), ``pid`` (OS pid), ``name``,
    ``redirect_output``, ``redirect_input``, ``detach``, ``started`` (loop
    time), ``monitor_io(label, listener)``, ``unmonitor_io(label,
    listener)``, ``on_exit(callback)``, ``write(bytes)``,
    ``writelines(list)``, ``kill(signum)``, ``info`` (stats dict),
    ``rings`` (label -> OutputRing), ``alive``, ``resources()``.
    """

    def __init__(self, manager, template, internal_id):
        self.manager, self.template, self.id = manager, template, internal_id
        self.spec = template.spec
        self.name = template.name
        self.pid = None
        self.popen = None
        self.redirect_output = list(self.spec.labels)
        self.redirect_input = self.spec.redirect_input
        self.detach = self.spec.detach
        self.custom_streams = list(self.spec.custom_streams)
        self.rings = {label: OutputRing(self.spec.output_buffer) for label in self.redirect_output}
        self.started = manager.loop.time()
        self.requested = False          # the exit was asked for (stop, reap)
        self.slot = None                # the Slot (§4) this process fills
        self.watch = []                 # readiness timers and probes, cancelled at the stop
        self.ready = False
        self.line_watch = None          # callable(label, data) of a log: readiness check
        self.notify = None              # its NotifySocket (ready = notify, watchdog_sec)
        self.core_dumped = False
        self.exit_status = None         # set at the reap: the process is gone
        self.kill_handle = None
        self.kill_deadline = None       # when SIGKILL follows the SIGTERM of a stop
        self.sample = None              # (time, cpu seconds) for cpu%
        self._fds = {}                  # our read fd -> label (or custom label)
        self._held = {}                 # read fd -> (start of a cut character, release timer)
        self._listeners = {}            # label -> [listener]
        self._exit_callbacks = []
        self._paused = set()            # clients that asked for back-pressure
        self._logs = {}                 # label -> LogFile
        self._partial = {}              # label -> the start of a line (json, syslog)
        self._by_lines = self.spec.log_format == "json" or self.spec.syslog
        self.stdin_fd = None
        self._stdin = collections.deque()
        self.stdin_queued = 0
        self.custom_fds = {}            # custom label -> our socket end
        self.start = None               # its _Start while the starter thread has it
        self.pending_signals = ()       # signals sent before the start came back

    @property
    def alive(self) -> bool:
        return self.exit_status is None

    def resources(self):
        """``(cpu_seconds, rss_bytes, open_fds)`` read from /proc now, or
        None when the process is gone; ``open_fds`` is None when its fd
        table cannot be listed (another user's process)."""
        fields = read_proc_stat(self.pid) if self.pid is not None else None
        if fields is None:
            return None
        try:
            fds = len(os.listdir("/proc/%d/fd" % self.pid))
        except OSError:
            fds = None
        return cpu_seconds(fields), int(fields[21]) * PAGE_SIZE, fds

    # -- output -----------------------------------------------------------------
    def monitor_io(self, label, listener):
        """``listener(label, {"event", "name", "pid", "data"})`` per chunk."""
        subs = self._listeners.setdefault(label, [])
        if listener not in subs:
            subs.append(listener)

    def unmonitor_io(self, label, listener):
        subs = self._listeners.get(label)
        if subs and listener in subs:
            subs.remove(listener)

    def on_exit(self, callback):
        """``callback(process)`` once, after the exit and the last output."""
        if self.alive:
            self._exit_callbacks.append(callback)
        else:
            self.manager.loop.call_soon(callback, self)

    def remove_exit_callback(self, callback):
        if callback in self._exit_callbacks:
            self._exit_callbacks.remove(callback)

    def _dispatch(self, label, data):
        if self.line_watch is not None:
            self.line_watch(label, data)
        if label in _UNREDIRECTED:
            return                      # read only for a log: readiness check
        ring = self.rings.get(label)
        if ring is not None:
            ring.append(data)
        if self._by_lines and label in self.redirect_output:
            self._log_lines(label, data)
        else:
            logfile = self._logs.get(label)
            if logfile is not None:
                self.manager.log_writer.submit(logfile, data, self)
        subs = self._listeners.get(label)
        if subs:
            payload = {"event": label if ring is not None else "READ",
                       "name": self.name, "pid": self.id, "data": data}
            for listener in list(subs):
                try:
                    listener(payload["event"], payload)
                except Exception:
                    log.exception("output listener of %s failed", self.name)

    def _log_lines(self, label, data, final=False):
        """Whole lines to the log file (as json records, or raw) and to
        syslog.  The start of a line waits for its end, for the end of the
        stream (``final``), or until it reaches LOG_LINE_LIMIT bytes."""
        data = self._partial.pop(label, b"") + data
        lines = data.split(b"\n")
        rest = lines.pop()
        if rest and (final or len(rest) >= LOG_LINE_LIMIT):
            lines.append(rest)
        elif rest:
            self._partial[label] = rest
        if not lines:
            return
        spec, manager = self.spec, self.manager
        index = self.redirect_output.index(label) if label in self.redirect_output[:2] else 0
        stream = ("stdout", "stderr")[index]
        now = manager.loop.unix_time(manager.loop.time())
        logfile = self._logs.get(label)
        if logfile is not None:
            if spec.log_format == "json":
                stamp = rfc3339(now)
                out = b"".join(json_log_line(stamp, self.name, self.id, self.pid, stream, line)
                               for line in lines)
            else:
                out = b"\n".join(lines) + b"\n"
            manager.log_writer.submit(logfile, out, self)
        if spec.syslog:
            sender = manager.syslog_sender(spec.syslog_address)
            priority = SYSLOG_FACILITIES[spec.syslog_facility] * 8 + \
                (SYSLOG_INFO, SYSLOG_ERR)[index]
            tag = spec.syslog_tag or default_syslog_tag(self.name)
            sender.send(priority, tag, self.pid, lines, now)

    def _on_output(self, fd):
        label = self._fds.get(fd)
        data = read_nonblocking(os.read, fd, READ_CHUNK)
        if data is None:
            return
        if not data:
            self._close_fd(fd)
            return
        data = self._whole_characters(fd, data)
        if data:
            self._dispatch(label, data)

    def _whole_characters(self, fd, data):
        """``data`` with the start of a UTF-8 character cut by this read
        held back, and the start held from the previous read put in front.
        So what rings, logs and listeners get never splits a character: an
        HTTP chunk, an SSE event or a websocket frame decodes on its own.
        Bytes that are not UTF-8 pass through as they are; at most 3 bytes
        wait, for at most UTF8_HOLD seconds (then they go out alone: the
        child stopped in the middle of a character), or until the end."""
        held = self._held.pop(fd, None)
        if held is not None:
            held[1].cancel()
            data = held[0] + data
        cut = utf8_partial_tail(data)
        if cut:
            timer = self.manager.loop.call_later(UTF8_HOLD, self._release_held, fd)
            self._held[fd] = (data[-cut:], timer)
            data = data[:-cut]
        return data

    def _release_held(self, fd, final=False):
        """Dispatch what ``_whole_characters`` holds for ``fd``; while a
        client's back-pressure stops the reads the rest may be in the pipe,
        so wait again (unless the stream is ending)."""
        held = self._held.pop(fd, None)
        if held is None:
            return
        held[1].cancel()
        if self._paused and not final:
            self._held[fd] = (held[0], self.manager.loop.call_later(
                UTF8_HOLD, self._release_held, fd))
        elif fd in self._fds:
            self._dispatch(self._fds[fd], held[0])

    def pause_output(self, who):
        """Stop reading the pipes while ``who`` (a slow client) catches up;
        the child then blocks on write, which is the back-pressure."""
        if not self._paused:
            for fd in self._fds:
                self.manager.loop.remove_reader(fd)
        self._paused.add(who)

    def resume_output(self, who):
        if who in self._paused:
            self._paused.discard(who)
            if not self._paused:
                for fd in self._fds:
                    self.manager.loop.add_reader(fd, self._on_output, fd)

    def _drain(self):
        """Read what is left in the pipes (the last words of a crash)."""
        for fd in list(self._fds):
            for _ in range(64):
                data = read_nonblocking(os.read, fd, READ_CHUNK)
                if not data:                     # nothing more now, or the end
                    break
                data = self._whole_characters(fd, data)
                if data:
                    self._dispatch(self._fds[fd], data)
            self._close_fd(fd)

    def _close_fd(self, fd):
        """Stop reading ``fd``; close it unless a custom stream's socket
        object owns it.  That socket stays open (the child may only have
        shut down its writing half and still read what we send) and is
        closed once, by ``close_custom_streams`` at the exit: closing its
        number here too would leave the object to write to, and later
        close, whatever reused that number (another client's socket)."""
        self._release_held(fd, final=True)
        label = self._fds.pop(fd, None)
        if label is None:
            return
        if label in self._partial:
            self._log_lines(label, b"", final=True)     # a last line without its newline
        self.manager.loop.remove_reader(fd)
        sock = self.custom_fds.get(label)
        if sock is None or sock.fileno() != fd:
            close_quietly(fd)

    def close_custom_streams(self):
        """Close our end of every custom stream, exactly once."""
        for label, sock in list(self.custom_fds.items()):
            fd = sock.fileno()
            if fd in self._fds:
                self._fds.pop(fd)
                self.manager.loop.remove_reader(fd)
            sock.close()
        self.custom_fds.clear()

    # -- input ------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        """Queue ``data`` for stdin.  ApiError 403 without redirect_input,
        503 when more than STDIN_QUEUE_LIMIT bytes are waiting."""
        if self.stdin_fd is None:
            raise ApiError(403, "forbidden_write", "process %d has no stdin pipe "
                           "(redirect_input is off, or stdin was closed)" % self.id)
        if self.stdin_queued + len(data) > STDIN_QUEUE_LIMIT:
            raise ApiError(503, "stdin_full", "process %d is not reading its stdin: "
                           "%d bytes already queued" % (self.id, self.stdin_queued))
        if not data:
            return
        self._stdin.append(bytes(data))
        self.stdin_queued += len(data)
        self.manager.loop.add_writer(self.stdin_fd, self._on_stdin_writable)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def _on_stdin_writable(self):
        while self._stdin:
            data = self._stdin[0]
            try:
                n = os.write(self.stdin_fd, data)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:                     # EPIPE: the child closed stdin
                self._close_stdin()
                return
            self.stdin_queued -= n
            if n < len(data):
                self._stdin[0] = data[n:]
                return
            self._stdin.popleft()
        self.manager.loop.remove_writer(self.stdin_fd)

    def _close_stdin(self):
        if self.stdin_fd is not None:
            self.manager.loop.remove_writer(self.stdin_fd)
            close_quietly(self.stdin_fd)
            self.stdin_fd = None
        self._stdin.clear()
        self.stdin_queued = 0

    # -- signals ------------------------------------------------------------------
    def kill(self, signum) -> None:
        """Send ``signum`` to the process group, or to the process alone
        if it left its group."""
        if not self.alive:
            return
        if self.pid is None:
            if self.start is not None:       # being started: the signal follows the start
                self.pending_signals += (signum,)
            return
        try:
            os.killpg(self.pid, signum)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(self.pid, signum)
            except (ProcessLookupError, PermissionError):
                pass

    @property
    def info(self) -> dict:
        stats = self.manager.process_stats(self)
        return stats if stats is not None else {"pid": self.pid, "id": self.id, "name": self.name}


class Template:
    """A named process definition, its process slots and its state.

    ``slots``: the Slots (§4) that make up the template, one per wanted
    process; a slot that was stopped or reaped has left it.  ``running``:
    the live processes not being stopped, oldest first (the gaffer 0.4.4
    ``running`` count).  ``wanted``: false once stopped on purpose.
    ``waiting`` / ``waiting_for``: set by whoever checks dependencies; the
    template state is ``waiting`` while it is true, and no slot starts.
    ``blocked``: the reason a dependency can never hold (state ``failed``).
    ``state``: the template state of §4 ``template_state``, updated by the
    manager after every slot transition (a ``state`` event on change).
    """

    def __init__(self, spec: TemplateSpec, now: float):
        self.spec = spec
        self.name = spec.name
        self.numprocesses = spec.numprocesses
        self.policy = RestartPolicy.of(spec)
        self.running = []                      # Process, oldest first
        self.slots = []                        # Slot, wanted ones
        self.unspawned = collections.deque()   # slots waiting for their exec
        self.replacing = False                 # a restart is replacing the slots
        self.counts = collections.Counter()    # Slot.bucket -> slots in it
        self.wanted = False
        self.never_started = True
        self.waiting = False
        self.waiting_for = []
        self.blocked = None                    # why a dependency can never hold, or None
        self.state = "stopped"
        self.restarts = 0                      # exits nobody asked for since the start
        self.give_ups = 0
        self.exits = collections.Counter()     # exit reason -> count, for /metrics
        self.last_exit = None
        self.recent = collections.deque(maxlen=RECENT_PROCESSES)
        self.storm = [0.0, 0, 0, None]         # window start, lines in it, lines held, timer
        self.sched = None                      # ScheduleState when it has a schedule
        self.spawn_cache = None                # the Spawner's _SpawnCache of this spec

    @property
    def group(self):
        return self.spec.group

    @property
    def stopped(self) -> bool:
        return not self.wanted

    def take_spec(self, spec: TemplateSpec):
        """Use ``spec`` from now on (reload, update)."""
        self.spec, self.numprocesses = spec, spec.numprocesses
        self.policy = RestartPolicy.of(spec)

    def summary(self, loop) -> dict:
        """The gaffer 0.4.4 status keys and the lifecycle summary (and
        ``schedule`` for a template that has one)."""
        out = {"active": bool(self.running), "running": len(self.running),
               "max_processes": self.numprocesses, "state": self.state,
               "ready": self.counts[RUNNING], "restarts": self.restarts,
               "last_exit": dict(self.last_exit) if self.last_exit else None,
               "waiting_for": list(self.waiting_for)}
        if self.sched is not None:
            out["schedule"] = self.sched.report(self.spec, loop)
        return out

    def status(self, loop=None) -> dict:
        out = self.summary(loop)
        if loop is not None:
            out["processes"] = [{
                "id": s.proc.id if s.proc else None,
                "os_pid": s.proc.pid if s.proc else None,
                "slot": s.index, "state": s.state, "since": loop.unix_time(s.since),
                "restarts": s.restarts, "status_text": s.status_text,
            } for s in sorted(self.slots, key=lambda s: s.index)]
        return out


# -- readiness checks ---------------------------------------------------------------
# What ``Manager.READY_PROBES`` starts for a new process (the ``ready``
# key, docs/lifecycle.md "Readiness").  Each is an object with ``cancel()`` kept in
# ``Process.watch`` and cancelled when the process stops or exits; none
# ever blocks the loop: output is looked at as it is read, sockets are
# non-blocking, a ``cmd:`` check is a child reaped like any other.

class LineWatch:
    """The ``log:REGEX`` check: ``on_match()`` once a line of the process's
    stdout or stderr (one line buffer each) matches ``regex``.

    Bounded work: a line is looked at up to READY_LINE_MAX bytes; a longer
    one is matched on those first bytes and the rest of it, up to the next
    newline, is skipped without being kept or scanned by the regex.  So a
    child printing 100 MB without a newline costs one newline search per
    read and one regex run.  The regex itself comes from the config: one
    with catastrophic backtracking still runs on the loop, on lines of at
    most READY_LINE_MAX bytes (the config's problem, as docs/lifecycle.md says).
    """

    def __init__(self, regex, on_match):
        self.regex, self.on_match = regex, on_match
        self.partial = {}               # label -> start of a line; None while skipping one
        self.done = False

    def __call__(self, label, data):
        if self.done:
            return
        held, start = self.partial.get(label, b""), 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            if held is not None:
                room = READY_LINE_MAX - len(held)
                if self._match(held + data[start:min(end, start + room)]):
                    return
            held, start = b"", end + 1
        if held is not None and start < len(data):
            room = READY_LINE_MAX - len(held)
            held += data[start:start + room]
            if len(data) - start >= room:       # longer than a line may be
                if self._match(held):
                    return
                held = None
        self.partial[label] = held

    def _match(self, line) -> bool:
        if self.regex.search(line[:-1] if line.endswith(b"\r") else line) is None:
            return False
        self.cancel()
        self.on_match()
        return True

    def cancel(self):
        self.done = True
        self.partial.clear()


class NotifySocket:
    """The sd_notify(3) socket of one process (``ready = notify``, or any
    ``watchdog_sec``): an AF_UNIX datagram socket in the abstract
    namespace (no file to clean up), given to the process as
    ``NOTIFY_SOCKET=@gafferd-notify/...``; one per process, so a flood
    fills only the sender's own queue.

    Messages are ``KEY=VALUE`` lines (systemd's protocol): ``READY=1``
    marks the process ready (``ready = notify`` only), ``STATUS=TEXT``
    becomes its ``status_text``, ``WATCHDOG=1`` feeds the watchdog; other
    keys (MAINPID, STOPPING, RELOADING, WATCHDOG=trigger ...) are ignored.

    Who may speak: SO_PASSCRED makes the kernel attach the sender's
    credentials to each datagram (an unprivileged sender cannot forge its
    pid); a datagram counts only if that pid is the process or a process
    of its session (every process is started in a session of its own),
    so no process can mark another ready, and a helper the process forked
    can.  A datagram larger than NOTIFY_DATAGRAM is dropped whole, and at
    most NOTIFY_BURST are read per wake-up.
    """

    def __init__(self, manager, proc):
        self.manager, self.proc, self.loop = manager, proc, manager.loop
        name = "gafferd-notify/%d/%d/%s" % (os.getpid(), proc.id, os.urandom(6).hex())
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            self.sock.bind("\0" + name)
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise
        self.address = "@" + name
        self.closed = self.reading = False
        self.last_ping = self.timer = None
        self.refused = 0

    def start(self):
        self.reading = True
        self.loop.add_reader(self.sock.fileno(), self._on_message)

    def _on_message(self):
        for _ in range(NOTIFY_BURST):
            try:
                data, ancillary, flags, _ = self.sock.recvmsg(
                    NOTIFY_DATAGRAM, socket.CMSG_SPACE(struct.calcsize("3i")))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or self.closed:
                continue
            sender = self._sender(ancillary)
            if sender is None or not self._ours(sender):
                self.refused += 1
                if self.refused == 1:
                    log.warning("%s[%d]: refused an sd_notify message from pid %s, which is "
                                "not in the process's session", self.proc.name, self.proc.id,
                                sender)
                continue
            self._handle(data)

    @staticmethod
    def _sender(ancillary):
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and \
                    len(payload) >= struct.calcsize("3i"):
                return struct.unpack("3i", payload[:struct.calcsize("3i")])[0]
        return None

    def _ours(self, sender) -> bool:
        if sender == self.proc.pid:
            return True
        try:
            return os.getsid(sender) == self.proc.pid
        except OSError:                 # gone already: nothing to trust
            return False

    def _handle(self, data):
        proc = self.proc
        for line in data.split(b"\n"):
            key, _, value = line.partition(b"=")
            if key == b"READY" and value == b"1":
                if proc.spec.ready.kind == "notify":
                    self.manager.mark_ready(proc)
            elif key == b"STATUS":
                slot = proc.slot
                if slot is not None and slot.proc is proc:
                    slot.status_text = value.decode("utf-8", "replace")[:STATUS_TEXT_MAX]
            elif key == b"WATCHDOG" and value == b"1":
                self.last_ping = self.loop.time()

    def arm_watchdog(self):
        """Start the watchdog (once the process is ready, as systemd does):
        no ``WATCHDOG=1`` for ``watchdog_sec`` seconds and the process is
        killed, a failed start."""
        period = self.proc.spec.watchdog_sec
        if period and not self.closed and self.timer is None:
            self.last_ping = self.loop.time()
            self.timer = self.loop.call_later(period, self._check_watchdog)

    def _check_watchdog(self):
        self.timer = None
        period = self.proc.spec.watchdog_sec
        due = self.last_ping + period
        if self.loop.time() < due:
            self.timer = self.loop.call_at(due, self._check_watchdog)
            return
        self.manager.process_failed(self.proc, "no WATCHDOG=1 for %ss (watchdog_sec)" % period)

    def cancel(self):
        if self.closed:
            return
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.reading:
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


class ReadyPoller:
    """Repeats a readiness check (``tcp:``, ``http:``, ``cmd:``) until it
    passes, then calls ``manager.mark_ready(proc)``.

    One attempt at a time: ``attempt(done)`` starts one and returns an
    object with ``cancel()``; it calls ``done(ok, why=None)`` once (``why``:
    the check could not even run, logged once).  An attempt still running
    after ``max(ready_interval, READY_ATTEMPT_MIN)`` seconds is cancelled
    and failed; the next starts ``ready_interval`` seconds after the last
    one ended, so slow answers never pile up.
    """

    def __init__(self, manager, proc, attempt):
        self.manager, self.proc, self.attempt = manager, proc, attempt
        self.loop = manager.loop
        self.interval = proc.spec.ready_interval
        self.limit = max(self.interval, READY_ATTEMPT_MIN)
        self.current = self.timer = None
        self.number = 0                 # of the attempt running; 0 between attempts
        self.warned = self.over = False
        self._start()

    def _start(self):
        self.number += 1
        number = self.number
        self.timer = self.loop.call_later(self.limit, self._finished, number, False)
        current = self.attempt(lambda ok, why=None: self._finished(number, ok, why))
        if self.number == number and not self.over:
            self.current = current      # (unless it finished at once)

    def _finished(self, number, ok, why=None):
        if self.over or number != self.number:
            return
        self.number = 0
        current, self.current = self.current, None
        if current is not None:
            current.cancel()
        self.timer.cancel()
        if ok:
            self.over = True
            self.manager.mark_ready(self.proc)
            return
        if why and not self.warned:
            self.warned = True
            log.warning("%s[%d]: readiness check %s: %s", self.proc.name, self.proc.id,
                        self.proc.spec.ready.text, why)
        self.timer = self.loop.call_later(self.interval, self._start)

    def cancel(self):
        self.over = True
        if self.timer is not None:
            self.timer.cancel()
        if self.current is not None:
            self.current.cancel()
            self.current = None


class _CmdAttempt:
    """One run of a ``cmd:COMMAND`` check: the command as the template's
    user, in its environment and working directory, in a session of its
    own; ``done(exit status 0)``.  Cancelled (a timeout, the process
    stopped), it gets SIGKILL with its process group; whatever of the group
    is left when it is reaped gets SIGKILL too, so no check outlives its
    run.  The loop reaps it like any child (``before_reap`` and
    ``__call__`` are its watcher)."""

    def __init__(self, manager, proc, done):
        self.done, self.over, self.reaped, self.pid = done, False, False, None
        spec, loop = proc.spec, manager.loop
        argv = spec.ready.arg
        try:
            env = manager.process_environment(proc)
        except SpawnError as exc:          # an env_file gone since the process started
            loop.call_soon(self._finish, False, str(exc))
            return
        executable = find_executable(argv[0], spec, env)
        if executable is None:
            loop.call_soon(self._finish, False, "executable %r not found" % argv[0])
            return
        try:
            popen = subprocess.Popen(
                argv, executable=executable, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=spec.cwd, env=env,
                start_new_session=True, restore_signals=True, close_fds=True,
                **manager.spawner.identity(spec))
        except (OSError, subprocess.SubprocessError, SpawnError) as exc:
            loop.call_soon(self._finish, False, "cannot run %s: %s" % (argv[0], exc))
            return
        popen.returncode = 0            # reaped by the loop, never by subprocess
        self.pid = popen.pid
        loop.watch_child(self.pid, self)

    def _finish(self, ok, why=None):
        if not self.over:
            self.over = True
            self.done(ok, why)

    def before_reap(self, pid):
        self._kill_group()

    def __call__(self, pid, exit_status, term_signal):
        self.reaped = True
        self._finish(exit_status == 0 and not term_signal)

    def _kill_group(self):
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def cancel(self):
        self.over = True
        if self.pid is not None and not self.reaped:
            self._kill_group()


def _parse_target(name_or_id):
    """The manager API takes a str for a template, an int for a process."""
    if isinstance(name_or_id, int) and not isinstance(name_or_id, bool):
        return None, name_or_id
    return str(name_or_id), None


def _exit_line(p):
    status = exit_text(p.get("exit_status"), p.get("term_signal"))
    then = "; restarting in %.1fs" % p["restart_in"] if p.get("restart_in") is not None else ""
    return "%s[%s] (pid %s) %s after %.1fs up%s" % (p["name"], p.get("pid"), p.get("os_pid"),
                                                   status, p.get("uptime") or 0.0, then)


# What ``log_events`` writes into a template's log files: event -> text(payload).
_EVENT_LINES = {
    "spawn": lambda p: "%s[%s] spawned (pid %s)" % (p["name"], p.get("pid"), p.get("os_pid")),
    "ready": lambda p: "%s[%s] ready (pid %s)" % (p["name"], p.get("pid"), p.get("os_pid")),
    "exit": _exit_line,
    "restart": lambda p: "%s: restart asked" % p["name"],
    "start": lambda p: "%s: start asked" % p["name"],
    "stop": lambda p: "%s: stop asked" % p["name"],
}


class Manager:
    """Owns templates, processes, groups and the event bus.

    The API applications and plugins use (gaffer 0.4.4's names):
        subscribe(pattern, cb) / unsubscribe / subscribe_once / publish
        add_process(name, cmd, **settings) (KeyError on conflict, ValueError
            when invalid), update_process(name, cmd, **settings),
        remove_process(name), start_process(name, deps=True) (its stopped
            or failed dependencies first), check_dependencies(spec)
            (ValueError), dependents_of(names),
        stop_process(name_or_id), restart_process(name, rolling=None,
            watcher=None) (a ``Rollout`` when rolling), rollout(names,
            watcher=None), check_sockets(spec) (ValueError),
        ttin(name, n=1), ttou(name, n=1), send_signal(name_or_id, signum),
        get_process_info(name), get_process_status(name),
        get_process_stats(name_or_id), processes_stats(),
        live_processes() (stopping ones too), resource_samples() ->
            [(process, (cpu_seconds, rss_bytes, open_fds) or None)],
        get_groups(), get_group(name), start_group / stop_group /
            restart_group (name, rolling=None, watcher=None) / remove_group (name),
        templates (name -> Template; ``processes`` is the same map under
            the name of plugin API 1), running (id -> Process),
        get_process(name_or_id), monitor(name_or_id, cb), unmonitor(...),
        stop(callback=None), restart(callback=None), loop.
    The lifecycle hooks (readiness checks, dependencies):
        mark_ready(proc), process_failed(proc, why), READY_PROBES (kind ->
        probe(manager, t, slot, proc)), set_waiting(name, waiting_for),
        on_critical (callback(name)), reload_templates(specs, dry_run).
    Template names are str, internal process ids int.  Unknown names raise
    KeyError.

    What is not the API's lives with collaborators the manager owns (each
    with its contract): ``lifecycle`` (``Lifecycle``), ``dependencies``,
    ``scheduler``, ``spawner``, ``reaper``, ``shutdown``, ``groups_left``
    (``GroupCleaner``) and ``limits`` (``ResourceWatch``).  Applications and plugins do not call them.
    """

    def __init__(self, loop: Loop, environ=None, spawn_budget=SPAWN_BUDGET,
                 session_ids=session_ids):
        # spawn_budget: seconds of spawning per loop iteration (Spawner);
        # session_ids: the /proc scan GroupCleaner uses (tests count it).
        self.loop = loop
        self.bus = EventBus(loop.call_soon)
        self.environ = os.environ if environ is None else environ
        self.templates = collections.OrderedDict()     # name -> Template
        self.running = collections.OrderedDict()       # id -> Process (live, not stopping)
        self.groups = collections.OrderedDict()        # group -> [template names]
        self.apps = []
        self.cfg = None                                # the configparser plugins read
        self._by_pid = {}                              # os pid -> Process (every live one)
        self.log_writer = LogWriter(loop)
        self.spawner = Spawner(self, spawn_budget)
        self.reaper = Reaper(self)
        self.lifecycle = Lifecycle(self)
        self._monitors = {}                            # process id -> (handle, [listeners])
        self.stopping = False
        self.started = loop.time()
        self.spawned_total = 0
        self.spawn_failures = 0
        self.orphans = Orphans(loop, self._is_ours)
        loop.unwatched_child = self.orphans
        loop.child_starting = self.spawner.child_starting
        self.groups_left = GroupCleaner(loop, self._by_pid, session_ids)
        self.limits = ResourceWatch(self)               # max_memory, max_cpu
        self.on_critical = None                        # callback(name): a critical template failed
        self.sockets = None                            # HeldSockets (§12), given by the daemon
        self.rollouts = {}                             # template name -> its Rollout
        self.dependencies = Dependencies(self)
        self.scheduler = Scheduler(self)
        self.shutdown = Shutdown(self)
        self.syslog_senders = {}                       # address -> SyslogSender (metrics)
        self.daemon_syslog = None                      # the daemon's own (metrics)


    @property
    def processes(self):
        """``templates`` under its first name (it maps names to templates,
        not to processes); kept so that plugins written for it work."""
        return self.templates

    def _is_ours(self, os_pid) -> bool:
        """A child the daemon started (a process, or one a plugin watches)."""
        if os_pid in self._by_pid or self.loop.watches_child(os_pid):
            return True
        # a start not back yet, or back just now (then registered by the call)
        return self.spawner.child_starting(os_pid) or os_pid in self._by_pid

    # -- events ----------------------------------------------------------------
    def subscribe(self, pattern, listener):
        self.bus.subscribe(pattern, listener)

    def subscribe_once(self, pattern, listener):
        self.bus.subscribe_once(pattern, listener)

    def unsubscribe(self, pattern, listener):
        self.bus.unsubscribe(pattern, listener)

    def publish(self, event, payload=None):
        self.bus.publish(event, payload)

    def _emit(self, event, name, per_process=True, **fields):
        payload = dict(fields, name=name)
        self.bus.publish(event, payload)
        if per_process:
            self.bus.publish("proc.%s.%s" % (name, event), payload)
        if event in _EVENT_LINES:
            t = self.templates.get(name)
            if t is not None and t.spec.log_events:
                self._log_event(t, event, payload)

    def _log_event(self, t, event, payload):
        """``log_events``: the event as one line in each log file of the
        template (raw: ``gafferd: TEXT``; json: a record of stream ``gafferd``)."""
        text = "gafferd: " + _EVENT_LINES[event](payload)
        unix_now = self.loop.unix_time(self.loop.time())
        paths = {t.spec.logfile_for(i) for i in range(len(t.spec.labels))} - {None}
        for path in sorted(paths):
            logfile = self.spawner._logfile(path, t.spec)
            if t.spec.log_format == "json":
                data = json_log_line(rfc3339(unix_now), t.name, payload.get("pid"),
                                     payload.get("os_pid"), "gafferd", text.encode("utf-8"))
            else:
                data = (text + "\n").encode("utf-8", "replace")
            self.log_writer.submit(logfile, LogLine(data))

    def syslog_sender(self, address) -> SyslogSender:
        """The one sender of ``address`` (made at its first use)."""
        sender = self.syslog_senders.get(address)
        if sender is None:
            sender = self.syslog_senders[address] = SyslogSender(
                address, self.loop.time, lambda exc, a=address: log.warning(
                    "syslog %s: %s; lines dropped (counted in /metrics)", a,
                    exc.strerror or exc))
        return sender

    # -- lookups -----------------------------------------------------------------
    def get_template(self, name) -> Template:
        try:
            return self.templates[name]
        except KeyError:
            raise KeyError(name) from None

    def get_process(self, name_or_id):
        name, pid = _parse_target(name_or_id)
        if pid is not None:
            return self.running[pid]
        return self.get_template(name)

    def find_process(self, internal_id):
        """A live process by internal id, stopping ones included, or None."""
        proc = self.running.get(internal_id)
        if proc is None:
            for p in self._by_pid.values():
                if p.id == internal_id:
                    return p
        return proc

    # -- templates ------------------------------------------------------------------
    def add_template(self, spec: TemplateSpec, start=None) -> Template:
        """Register ``spec`` and start it unless ``start`` is false."""
        if spec.name in self.templates:
            raise KeyError(spec.name)
        t = Template(spec, self.loop.time())
        self.templates[spec.name] = t
        if spec.group:
            self.groups.setdefault(spec.group, []).append(spec.name)
        self._emit("create", spec.name, per_process=False)
        start = spec.start if start is None else start
        if spec.schedule is not None:
            self.scheduler.attach(t, paused=not start)   # runs at its times, not now
        elif start:
            self._start(t)
        return t

    def _spec_from_api(self, name, cmd, settings, base_dir=None) -> TemplateSpec:
        warnings = []
        try:
            spec = build_spec(name, cmd, dict(settings), base_dir=base_dir or os.getcwd(),
                              origin="api", environ=self.environ, warnings=warnings)
        except (ConfigError, ConfigErrors) as exc:
            raise ValueError(api_config_message(exc)) from None
        self.check_sockets(spec)
        for warning in warnings:
            log.warning("template %s: %s", name, warning)
        return spec

    def add_process(self, name, cmd, **settings) -> Template:
        if name in self.templates:
            raise KeyError(name)
        start = settings.pop("start", True)
        spec = self._spec_from_api(name, cmd, settings)
        self.check_dependencies(spec)
        return self.add_template(spec, start)

    def update_process(self, name, cmd, **settings):
        t = self.get_template(name)
        start = settings.pop("start", True)
        spec = self._spec_from_api(name, cmd, settings)
        self.check_dependencies(spec)
        self.update_template(t, spec, start)

    def update_template(self, t: Template, spec: TemplateSpec, start=None):
        """Update: stop the old processes, take the new definition
        in place (group kept), start again unless ``start`` is false."""
        self._stop(t)
        t.take_spec(spec)
        self._emit("update", t.name, per_process=False)
        start = spec.start if start is None else start
        if spec.schedule is not None:
            self.scheduler.attach(t, paused=not start)
            return
        self.scheduler.detach(t)
        if start:
            self._start(t, events=False)

    def reload_templates(self, specs, dry_run=False) -> dict:
        """Make the templates of the config file those of ``specs``:
        remove the ones no longer there, update the changed ones (only
        scaled when nothing but ``numprocesses`` changed), add the new
        ones.  Templates made over HTTP are left alone.  Returns the names
        ``added``, ``removed``, ``changed`` and ``unchanged``; with
        ``dry_run`` nothing changes.  ConfigErrors, and nothing changes,
        when the ``depends_on`` of the result (with the templates made
        over HTTP) would name an unknown template or close a cycle; a
        change of nothing but ``depends_on`` restarts nothing (a waiting
        template waits for the new list)."""
        wanted = collections.OrderedDict((s.name, s) for s in specs)
        kept = [t.spec for n, t in self.templates.items()
                if t.spec.origin != "config" and n not in wanted]
        problems = dependency_problems(list(specs) + kept)
        if problems:
            by_name = {spec.name: spec for spec in list(specs) + kept}
            raise ConfigErrors([ConfigError(by_name[n].source or "(made over HTTP)",
                                            "process:" + n, "depends_on", message)
                                for n, message in problems])
        added = [n for n in wanted if n not in self.templates]
        removed = [n for n, t in self.templates.items()
                   if t.spec.origin == "config" and n not in wanted]
        changed, unchanged = [], []
        for name, spec in wanted.items():
            t = self.templates.get(name)
            if t is None:
                continue
            if t.spec.key() == spec.key() and t.spec.numprocesses == spec.numprocesses:
                unchanged.append(name)
            else:
                changed.append(name)
        result = {"added": added, "removed": removed, "changed": changed,
                  "unchanged": unchanged}
        if dry_run:
            return result
        for name in removed:
            self.remove_process(name)
        for name in changed:
            t, spec = self.templates[name], wanted[name]
            if t.spec.key() == spec.key():
                t.take_spec(spec)
                self.scale_to(name, spec.numprocesses)
            elif t.spec.key(ignore=("depends_on",)) == spec.key(ignore=("depends_on",)):
                t.take_spec(spec)
                self.scale_to(name, spec.numprocesses)
                if t.waiting and not t.spec.depends_on:
                    self.set_waiting(name, [])
                self.dependencies.changed()
            elif spec.restart_mode == "rolling" and t.wanted and name not in self.rollouts \
                    and any(s.proc is not None for s in t.slots):
                t.take_spec(spec)                       # new processes get the new spec
                self._emit("update", t.name, per_process=False)
                self.rollout([name])
            else:
                self.update_template(t, spec)
        for name in added:
            self.add_template(wanted[name])
        return result

    def remove_process(self, name):
        t = self.get_template(name)
        self._stop(t)
        self.scheduler.detach(t)
        del self.templates[name]
        if t.group and name in self.groups.get(t.group, []):
            self.groups[t.group].remove(name)
        self._emit("delete", name, per_process=False)

    def start_process(self, name, deps=True):
        """Start ``name``; with ``deps``, first the dependencies it would
        otherwise wait for in vain (``Dependencies.to_start``).  A
        scheduled template runs now, and its schedule resumes."""
        t = self.get_template(name)
        if t.sched is not None:
            self.scheduler.resume(t)
        if deps:
            for d in self.dependencies.to_start(t):
                self._start(d)
        self._start(t)

    def stop_process(self, name_or_id):
        name, pid = _parse_target(name_or_id)
        if pid is not None:
            self._stop_one(self.running[pid], "stop_pid")
            return
        t = self.get_template(name)
        if t.sched is not None:
            self.scheduler.pause(t)             # until the next start
        self._stop(t)

    def restart_process(self, name, rolling=None, watcher=None):
        """Restart ``name``: all new processes first, then the old ones
        stop; or, with ``rolling`` (None: the template's restart_mode), a
        ``Rollout``, which is returned (ValueError if one is running).
        A plain restart ends a rollout in progress."""
        t = self.get_template(name)
        if rolling is None:
            rolling = t.spec.restart_mode == "rolling"
        if rolling:
            return self.rollout([name], watcher)
        current = self.rollouts.get(name)
        if current is not None:
            current.abort("superseded by a restart")
        self._emit("restart", t.name)
        if not t.wanted or t.waiting or t.blocked:
            self._start(t, events=False)    # nothing to replace; through its dependencies
            return
        if t.sched is not None:
            self.scheduler.starting(t, again=True)
        old = [s for s in t.slots if s.proc is not None]
        for slot in [s for s in t.slots if s.proc is None]:
            self.lifecycle.feed(t, slot, START)            # backoff, failed, exited: again now
        self._replace(t, [], old)

    def rollout(self, names, watcher=None):
        """Start a rolling restart of the templates ``names``, one after
        the other (``Rollout``); ValueError if one of them is being rolled
        already.  ``watcher(event, payload)`` gets its events as they are
        published."""
        busy = [n for n in names if n in self.rollouts]
        if busy:
            raise ValueError("a rolling restart of %s is in progress" % ", ".join(busy))
        for name in names:
            self.get_template(name)
        return Rollout(self, names, watcher).begin()

    def _replace(self, t, pairs, rest):
        """Restart step, new before old as in gaffer 0.4.4: a replacement slot (same slot
        number) for each of up to SPAWN_BATCH old slots, then, once every
        replacement has had its exec (over as many iterations as the spawn
        budget needs), the old slots are reaped: n spawns, then n reaps.
        ``pairs``: (old slot, replacement) of this batch; ``rest``: old
        slots still to replace."""
        t.replacing = bool(pairs or rest)
        if not self._eligible(t):
            t.replacing = False
            return

        def waiting(started):       # replacements not handed over / not back yet
            return any(new.member and new.state == STARTING and
                       (new.proc is None if not started else
                        new.proc is not None and new.proc.pid is None) for _, new in pairs)
        while waiting(False) and self.spawner.budget_left() and self.spawner.has_unspawned(t):
            self._spawn(t)
        if waiting(False) and not self.spawner.full():
            self.loop.call_soon(self._replace, t, pairs, rest)     # budget spent
            return
        if waiting(False) or waiting(True):
            self.spawner.when_free(self._replace, t, pairs, rest)  # when a start is back
            return
        for old, _ in pairs:
            if old.member:
                self._stop_slot(t, old, "reap")
        if rest:
            batch, rest = rest[:SPAWN_BATCH], rest[SPAWN_BATCH:]
            pairs = [(old, self._add_slot(t, old.index)) for old in batch]
            self.loop.call_soon(self._replace, t, pairs, rest)
        else:
            t.replacing = False
            self._manage(t)

    def ttin(self, name, n=1) -> int:
        t = self.get_template(name)
        if t.numprocesses + n > MAX_NUMPROCESSES:
            raise ValueError("at most %d processes per template" % MAX_NUMPROCESSES)
        t.numprocesses += n
        self._emit("update", name, per_process=False)
        if t.never_started:
            self._want(t)
            if self.dependencies.held_back(t):
                return t.numprocesses
        self._manage(t)
        return t.numprocesses

    def ttou(self, name, n=1) -> int:
        t = self.get_template(name)
        t.numprocesses = max(0, t.numprocesses - n)
        self._emit("update", name, per_process=False)
        self._manage(t)
        return t.numprocesses

    def scale_to(self, name, n) -> int:
        t = self.get_template(name)
        return self.ttin(name, n - t.numprocesses) if n >= t.numprocesses \
            else self.ttou(name, t.numprocesses - n)

    def send_signal(self, name_or_id, signum):
        name, pid = _parse_target(name_or_id)
        targets = [self.running[pid]] if pid is not None else list(self.get_template(name).running)
        for proc in targets:
            proc.kill(signum)

    # -- groups ---------------------------------------------------------------------
    def get_groups(self):
        return list(self.groups)

    def get_group(self, name):
        return list(self.groups[name])

    def start_group(self, name):
        for member in self.get_group(name):
            self.start_process(member)

    def stop_group(self, name):
        for member in self.get_group(name):
            self.stop_process(member)

    def restart_group(self, name, rolling=None, watcher=None):
        """Restart each template of group ``name``; the rolled ones (by
        ``rolling``, or each one's restart_mode when None) one after the
        other in one Rollout, which is returned (or None)."""
        members = self.get_group(name)
        rolled = [m for m in members if (rolling if rolling is not None
                                         else self.templates[m].spec.restart_mode == "rolling")]
        if rolled and any(m in self.rollouts for m in rolled):
            self.rollout(rolled)                         # the ValueError
        for member in members:
            if member not in rolled:
                self.restart_process(member, rolling=False)
        return self.rollout(rolled, watcher) if rolled else None

    def remove_group(self, name):
        for member in self.get_group(name):
            if member in self.templates:
                self.remove_process(member)
        del self.groups[name]

    # -- information ---------------------------------------------------------------
    def live_processes(self):
        """Every live process, the ones being stopped included."""
        return list(self._by_pid.values())

    def resource_samples(self):
        """``[(process, resources)]`` for each running process (not the
        ones being stopped), where ``resources`` is what
        ``Process.resources()`` read: (cpu_seconds, rss_bytes, open_fds),
        or None for a process that has just exited."""
        return [(proc, proc.resources()) for proc in list(self.running.values())]

    def get_process_info(self, name) -> dict:
        return self.get_template(name).spec.definition()

    def get_process_status(self, name) -> dict:
        return self.get_template(name).status(self.loop)

    def process_stats(self, proc, kids=None):
        """The stats dict of one process, plus ``id`` and ``name``; None if
        it vanished."""
        now = self.loop.time()
        stats, sample = process_stats(proc.pid, proc.sample, now,
                                      children_map() if kids is None else kids)
        if stats is None:
            return None
        proc.sample = sample
        stats["id"], stats["name"] = proc.id, proc.name
        return stats

    def get_process_stats(self, name_or_id):
        name, pid = _parse_target(name_or_id)
        if pid is not None:
            return self.process_stats(self.running[pid])
        t = self.get_template(name)
        kids = children_map() if t.running else {}
        stats = [s for s in (self.process_stats(p, kids) for p in t.running) if s]
        return summarize_stats(t.name, stats)

    def processes_stats(self):
        kids = children_map() if self.running else {}
        out = []
        for t in self.templates.values():
            stats = [s for s in (self.process_stats(p, kids) for p in t.running) if s]
            out.append(summarize_stats(t.name, stats))
        return out

    def monitor(self, name_or_id, listener):
        """``listener("stat", stats)`` every SAMPLE_INTERVAL for a process,
        or for each process live now of a template (later ones are not added)."""
        name, pid = _parse_target(name_or_id)
        procs = [self.running[pid]] if pid is not None else list(self.get_template(name).running)
        for proc in procs:
            entry = self._monitors.get(proc.id)
            if entry is None:
                entry = self._monitors[proc.id] = [None, []]
                entry[0] = self.loop.call_later(SAMPLE_INTERVAL, self._sample, proc)
            if listener not in entry[1]:
                entry[1].append(listener)
        return procs

    def unmonitor(self, name_or_id, listener):
        name, pid = _parse_target(name_or_id)
        ids = [pid] if pid is not None else [p.id for p in self._by_pid.values() if p.name == name]
        for proc_id in ids:
            entry = self._monitors.get(proc_id)
            if entry and listener in entry[1]:
                entry[1].remove(listener)
                if not entry[1]:
                    entry[0].cancel()
                    del self._monitors[proc_id]

    def _sample(self, proc):
        entry = self._monitors.get(proc.id)
        if entry is None:
            return
        if not proc.alive:
            del self._monitors[proc.id]
            return
        stats = self.process_stats(proc)
        entry[0] = self.loop.call_later(SAMPLE_INTERVAL, self._sample, proc)
        if stats is not None:
            for listener in list(entry[1]):
                try:
                    listener("stat", stats)
                except Exception:
                    log.exception("stats listener failed")

    # -- lifecycle policy ------------------------------------------------------------
    # Contract: a slot's state changes only in ``Lifecycle`` (below), which
    # applies the table of §4 and performs the actions it returns; the
    # methods here decide which slots a template has and what each is fed.
    # A template runs while ``t.wanted`` (not stopped on purpose) and not
    # ``t.waiting``.

    def _want(self, t):
        t.wanted, t.never_started = True, False
        t.last_error = None

    def _start(self, t, events=True):
        """Run ``t``: slots that ended (backoff, failed, exited) start
        again now, missing ones are added; unless its dependencies do not
        hold yet (it is ``waiting``) or never can (``failed``)."""
        self._want(t)
        if t.sched is not None:
            self.scheduler.starting(t)
        if events:
            self._emit("start", t.name)
        if self.dependencies.held_back(t):
            return
        self._run(t)

    def _run(self, t):
        for slot in list(t.slots):
            self.lifecycle.feed(t, slot, START)
        self._manage(t)

    def _stop(self, t):
        """Stop every slot of ``t``; no events if it was already stopped."""
        if t.name in self.rollouts:
            self.rollouts[t.name].abort("the template was stopped")
        was_wanted = t.wanted or t.never_started
        t.wanted, t.never_started = False, False
        t.waiting, t.waiting_for, t.blocked = False, [], None   # judged again at the next start
        if t.sched is not None:
            self.scheduler.stopped(t)
        if was_wanted or t.slots:
            self._emit("stop", t.name)
            for slot in list(t.slots):
                self._stop_slot(t, slot, "stop_pid")
        self.lifecycle.update_state(t)

    def set_waiting(self, name, waiting_for) -> None:
        """Hold ``name`` in state ``waiting`` while ``waiting_for`` (what it
        waits for, a list of strings) is not empty; an empty list lets it
        start.  For whoever checks dependencies."""
        t = self.get_template(name)
        was_waiting = t.waiting
        t.waiting, t.waiting_for = bool(waiting_for), list(waiting_for)
        self.lifecycle.update_state(t)
        if was_waiting and not t.waiting and t.wanted:
            self._run(t)                    # what the start held back
        else:
            self._manage(t)

    def _add_slot(self, t, index) -> Slot:
        slot = Slot(index, self.loop.time())
        slot.member = True
        t.slots.append(slot)
        t.counts[slot.bucket] += 1
        self.lifecycle.feed(t, slot, START)
        return slot

    def _stop_slot(self, t, slot, event):
        """Take ``slot`` out of ``t``: its process gets ``event``
        (stop_pid, reap) and its stop signal; a slot with no process is
        stopped at once."""
        if slot.member:
            slot.member = False
            t.slots.remove(slot)
            t.counts[slot.bucket] -= 1
        proc = slot.proc
        if proc is not None and proc.alive:
            if proc in t.running:
                t.running.remove(proc)
            self.running.pop(proc.id, None)
            proc.requested = True
            self._emit(event, proc.name, pid=proc.id, os_pid=proc.pid)
        self.lifecycle.feed(t, slot, STOP)

    # -- readiness ----------------------------------------------------------------------
    # ``READY_PROBES``: kind of the ``ready`` key -> probe(manager, t, slot,
    # proc), called once the exec succeeded.  A probe puts what it starts
    # (objects with ``cancel()``) in ``proc.watch``, which is cancelled when
    # the process stops or exits, and calls ``mark_ready(proc)`` once the
    # process is ready.  ``ready_timeout`` is armed by
    # ``Lifecycle._watch_ready`` for every kind but startsecs and spawn.

    def _ready_after_startsecs(self, t, slot, proc):
        proc.watch.append(self.loop.call_later(t.spec.startsecs, self.mark_ready, proc))

    def _ready_at_spawn(self, t, slot, proc):
        self.loop.call_soon(self.mark_ready, proc)

    def _ready_on_log(self, t, slot, proc):
        proc.line_watch = LineWatch(t.spec.ready.arg, lambda: self._line_matched(proc))
        proc.watch.append(proc.line_watch)

    def _line_matched(self, proc):
        proc.line_watch = None          # no more regex work for this process
        self.mark_ready(proc)

    def _ready_on_notify(self, t, slot, proc):
        pass                            # _prepare gave it its NotifySocket, already listening

    def _ready_on_cmd(self, t, slot, proc):
        proc.watch.append(ReadyPoller(self, proc, lambda done: _CmdAttempt(self, proc, done)))

    # tcp: and http: are added by §9, which has the resolver and the client
    READY_PROBES = {"startsecs": _ready_after_startsecs, "spawn": _ready_at_spawn,
                    "log": _ready_on_log, "notify": _ready_on_notify, "cmd": _ready_on_cmd}

    def mark_ready(self, proc) -> None:
        """``proc`` is ready; publishes ``ready`` the first time.  A
        process that is no longer its slot's (it exited, was replaced) is
        ignored."""
        slot = proc.slot
        if slot is None or slot.proc is not proc or slot.state not in (STARTING, RUNNING):
            return
        self.lifecycle.feed(proc.template, slot, READY)
        if slot.state == RUNNING and not proc.ready:
            proc.ready = True
            self._emit("ready", proc.name, pid=proc.id, os_pid=proc.pid, slot=slot.index)
            if proc.notify is not None:
                proc.notify.arm_watchdog()

    def process_failed(self, proc, why) -> None:
        """Kill ``proc`` with its stop signal; its exit counts as a failed
        start (a missed watchdog, a probe that judged it broken)."""
        slot = proc.slot
        if slot is None or slot.proc is not proc or slot.state not in (STARTING, RUNNING):
            return
        log.warning("%s[%d] (pid %s): %s; stopping it as a failed start", proc.name, proc.id,
                    proc.pid, why)
        if proc in proc.template.running:
            proc.template.running.remove(proc)
        self.lifecycle.feed(proc.template, slot, WATCHDOG_TIMEOUT)

    # -- spawning and stopping processes ----------------------------------------------
    # Contract: a slot's ``spawn`` action hands it to ``Spawner.queue``
    # (below), which execs in template (priority) order within
    # SPAWN_BUDGET per loop iteration; every exec passes ``_spawn``, which
    # feeds ``spawned`` or, on a failed exec, an exit with status 127.
    # ``Lifecycle._signal_stop`` sends the template's stop_signal to the
    # process group, SIGKILL after graceful_timeout.
    def _spawn(self, t) -> bool:
        """``Spawner.spawn``: exec the next slot of ``t`` waiting for one."""
        return self.spawner.spawn(t)

    def process_environment(self, proc) -> dict:
        """The environment ``proc`` is started with (a new dict), which
        its ``cmd:`` readiness check gets too."""
        return self.spawner.process_environment(proc)

    def reopen_logs(self) -> int:
        """Reopen every program log file (SIGUSR1); returns how many."""
        return self.spawner.reopen_logs()

    def _stop_one(self, proc, event):
        """Take one process out of service (its slot leaves the template)."""
        self._stop_slot(proc.template, proc.slot, event)

    def _manage(self, t):
        """Bring ``t`` to ``numprocesses`` slots: add the missing ones
        (lowest free slot numbers), reap the surplus: slots without a
        process first, then the oldest processes, as gaffer 0.4.4 did."""
        if not self._eligible(t):
            self.lifecycle.update_state(t)
            return
        if len(t.slots) < t.numprocesses:
            used, index = {s.index for s in t.slots}, 0
            while len(t.slots) < t.numprocesses:
                while index in used:
                    index += 1
                used.add(index)
                self._add_slot(t, index)
        surplus = len(t.slots) - t.numprocesses
        if surplus > 0 and not t.replacing:
            idle = sorted((s for s in t.slots if s.proc is None), key=lambda s: -s.index)
            live = sorted((s for s in t.slots if s.proc is not None), key=lambda s: s.proc.id)
            for slot in (idle + live)[:surplus]:
                self._stop_slot(t, slot, "reap")
        self.lifecycle.update_state(t)

    def _eligible(self, t) -> bool:
        return t.wanted and not t.waiting and not self.stopping and \
            self.templates.get(t.name) is t

    # -- reaping -------------------------------------------------------------------------
    # Contract: the loop reaps (§7) and calls ``_ChildWatcher``: first
    # ``GroupCleaner.before_reap`` while the leader is a zombie, then
    # ``Reaper.on_exit`` (below), which frees the process's resources,
    # feeds the exit to its slot and replaces a process stopped alone.

    # -- dependencies ----------------------------------------------------------------------
    # Contract: ``depends_on`` gates a start; ``Dependencies`` (below) owns
    # the judgement.  The manager API keeps its two entry points.
    def check_dependencies(self, spec) -> None:
        """ValueError naming the problem if ``spec``, added or put in place
        of the template of its name, would make ``depends_on`` name an
        unknown template or group, the template itself, or a cycle."""
        self.dependencies.check(spec)

    def check_sockets(self, spec) -> None:
        """ValueError if ``spec`` names a socket the daemon does not hold."""
        for _, message in socket_problems([spec], self.sockets.names() if self.sockets else []):
            raise ValueError("sockets: " + message)

    def dependents_of(self, names) -> list:
        """The templates, outside ``names``, with a dependency that only
        templates of ``names`` stand for."""
        return self.dependencies.dependents_of(names)

    # -- whole-manager operations and shutdown ------------------------------------------
    # Contract: ``stop`` is the only way down; ``Shutdown`` (below) owns it.
    def start(self):
        """Start the applications in list order; one that raises is disabled."""
        for app in list(self.apps):
            try:
                app.start(self.loop, self)
            except Exception:
                log.exception("application %r failed to start; it is disabled", app)
                self.apps.remove(app)

    def restart(self, callback=None):
        """SIGHUP without a config: restart every running template and call
        each application's restart()."""
        for app in self.apps:
            try:
                app.restart()
            except Exception:
                log.exception("application %r failed to restart", app)
        for t in list(self.templates.values()):
            if t.wanted and t.name not in self.rollouts:    # a rollout goes on
                self.restart_process(t.name)
        if callback:
            self.loop.call_soon(callback)

    def stop(self, callback=None):
        """Graceful shutdown (``Shutdown.begin``): templates, then
        applications.  A second call skips the rest of every grace period."""
        self.shutdown.begin(callback)


class Lifecycle:
    """The lifecycle policy of a Manager's process slots: the one place a
    slot's state changes, and what each change makes happen.

    Owns the application of the table of §4 to a slot (``feed``; the
    ``Reaper`` classifies an exit first and hands the result to
    ``transitioned``), the actions the table returns (``_ACTIONS``: spawn,
    readiness watches, kill, backoff timers, giving up, done), the stop
    signal with its SIGKILL deadline, the template state and its
    ``state`` event, and the ``critical`` exit.

    Callers may rely on: after ``feed`` or ``transitioned`` the slot's
    actions have been performed, ``t.counts`` matches the slots' buckets,
    ``t.state`` is ``template_state`` of the template and a change of it
    has been published (and the waiting templates scheduled for a
    re-check; a scheduled template's run ended once nothing of it is
    left going: ``Scheduler.observe``).  An impossible transition is logged as a bug and changes
    nothing.  A backoff timer feeds ``backoff_elapsed`` only while the
    template is eligible to run.

    Called by the manager's template operations (start, stop, scale,
    restart, readiness), by ``Spawner`` (``spawned``), ``Reaper`` (exits)
    and ``Dependencies`` (``update_state``).
    """

    def __init__(self, manager):
        self.manager, self.loop = manager, manager.loop
        self._unprobed = set()                         # templates warned about their ready kind
        self._critical_asked = False                   # on_critical is called once

    def feed(self, t, slot, event) -> tuple:
        """Feed ``event`` to ``slot`` and perform the actions."""
        before = slot.bucket
        try:
            actions = slot.feed(event, self.loop.time(), t.policy)
        except LifecycleError as exc:
            log.error("%s slot %d: %s; event ignored (a bug in gafferd)", t.name, slot.index, exc)
            return ()
        self.transitioned(t, slot, before, actions)
        return actions

    def transitioned(self, t, slot, before, actions):
        if slot.member and slot.bucket != before:
            t.counts[before] -= 1
            t.counts[slot.bucket] += 1
        for action in actions:
            self._ACTIONS[action](self, t, slot)
        if slot.state == STOPPING and (slot.proc is None or not slot.proc.alive):
            self.feed(t, slot, STOPPED_EVENT)          # never spawned: nothing to wait for
        self.update_state(t)

    def update_state(self, t):
        if t.sched is not None:
            self.manager.scheduler.observe(t)          # may end a run (t.wanted false)
        scheduled = t.sched is not None and not t.sched.paused and not self.manager.stopping
        state = template_state(t.wanted, t.waiting, t.counts, bool(t.blocked), scheduled)
        if state == t.state:
            return
        previous, t.state = t.state, state
        extra = {"reason": t.blocked} if t.blocked and state == "failed" else {}
        self.manager._emit("state", t.name, state=state, previous=previous, **extra)
        self.manager.dependencies.changed()
        if state == "failed" and t.spec.critical:
            self._critical(t, "failed")

    def _critical(self, t, why):
        if self.manager.stopping or self.manager.on_critical is None or self._critical_asked:
            return
        self._critical_asked = True
        log.error("%s is critical and %s: stopping every process; gafferd exits with "
                  "status 1", t.name, why)
        self.loop.call_soon(self.manager.on_critical, t.name)

    def _backoff_elapsed(self, t, slot):
        slot.timer = None
        if slot.member and self.manager._eligible(t):
            self.feed(t, slot, BACKOFF_ELAPSED)

    def _on_ready_timeout(self, t, slot, proc):
        if slot.proc is proc and slot.state == STARTING:
            log.warning("%s[%d] (pid %s) not ready within %ss; stopping it as a failed start",
                        t.name, proc.id, proc.pid, t.spec.ready_timeout)
            if proc in t.running:
                t.running.remove(proc)
            self.feed(t, slot, READY_TIMEOUT)

    def _signal_stop(self, proc):
        """The process's stop signal now (to its group), SIGKILL after its
        graceful_timeout (at once when a second shutdown request hurries)."""
        proc.kill(proc.spec.stop_signal)
        timeout = proc.spec.graceful_timeout
        if self.manager.stopping and self.manager.shutdown.hurry:
            timeout = 0
        proc.kill_deadline = self.loop.time() + timeout
        proc.kill_handle = self.loop.call_at(proc.kill_deadline, self._kill_now, proc)

    def _kill_now(self, proc):
        if proc.alive:
            log.warning("%s[%d] (pid %s) did not exit within %ss of %s; sending SIGKILL",
                        proc.name, proc.id, proc.pid, proc.spec.graceful_timeout,
                        _signal_name(proc.spec.stop_signal))
            proc.kill(signal.SIGKILL)

    # actions of the table (§4 A_*)
    def _queue_spawn(self, t, slot):
        self.manager.spawner.queue(t, slot)

    def _watch_ready(self, t, slot):
        """Arm the readiness check of ``t.spec.ready`` for the new process
        and, for a probe, its ``ready_timeout``."""
        proc, kind = slot.proc, t.spec.ready.kind
        probe = self.manager.READY_PROBES.get(kind)
        if probe is None:
            if t.name not in self._unprobed:
                self._unprobed.add(t.name)
                log.warning("%s: ready = %s is not checked by this gafferd; using startsecs",
                            t.name, kind)
            probe = self.manager.READY_PROBES["startsecs"]
        elif kind not in ("startsecs", "spawn") and t.spec.ready_timeout > 0:
            proc.watch.append(self.loop.call_later(t.spec.ready_timeout, self._on_ready_timeout,
                                                   t, slot, proc))
        probe(self.manager, t, slot, proc)

    def unwatch(self, t, slot):
        proc = slot.proc
        if proc is not None:
            for handle in proc.watch:
                handle.cancel()
            proc.watch = []

    def _kill_action(self, t, slot):
        if slot.proc is not None and slot.proc.alive:
            self._signal_stop(slot.proc)

    def _schedule(self, t, slot):
        slot.timer = self.loop.call_later(slot.delay, self._backoff_elapsed, t, slot)

    def _cancel(self, t, slot):
        if slot.timer is not None:
            slot.timer.cancel()
            slot.timer = None

    def _gave_up(self, t, slot):
        t.give_ups += 1
        self.manager._emit("flap", t.name)          # what gaffer 0.4.4 listeners wait for

    def _done(self, t, slot):
        if t.spec.critical and not slot.ok and t.policy.restart == "never":
            self._critical(t, "a process of it exited unsuccessfully")

    _ACTIONS = {A_SPAWN: _queue_spawn, A_WATCH_READY: _watch_ready, A_UNWATCH: unwatch,
                A_KILL: _kill_action, A_SCHEDULE: _schedule, A_CANCEL: _cancel,
                A_GIVE_UP: _gave_up, A_DONE: _done}


class Dependencies:
    """The ``depends_on`` gate of a Manager's templates.

    Owns the judgement of a template's dependencies (met, waited for,
    never to be met) and the one pending re-check of the waiting
    templates.  The template fields it writes are ``waiting``,
    ``waiting_for``, ``blocked`` and ``last_error``.

    Callers may rely on: at a start ``held_back`` puts the template in
    ``waiting`` (through the manager's state update) or ``failed`` (a
    dependency can never meet its condition: ``blocked``) and says so;
    after ``changed`` one ``_check_waiting`` runs on a later iteration,
    which releases (``Manager.set_waiting``), updates or blocks the
    waiting ones.  Once a template has started, its dependencies' later
    failures do not stop it.  ``check`` refuses (ValueError) a template
    that would name an unknown template, itself, or close a cycle;
    ``dependents_of`` tells a removal who still needs what it removes;
    ``to_start`` lists what a start must start first.

    Called by the manager: its starts (``held_back``, ``to_start``), every
    template state change and reload (``changed``), and the API's
    ``check_dependencies`` / ``dependents_of``.  The stop order at
    shutdown is ``Shutdown``'s.
    """

    def __init__(self, manager):
        self.manager, self.loop = manager, manager.loop
        self._check_scheduled = False


    def held_back(self, t) -> bool:
        """At a start of ``t``: ``waiting`` while its dependencies do not
        hold, ``failed`` if one never can; True in both cases.  A template
        with live processes has started already and is never held back."""
        t.blocked = None
        if not t.spec.depends_on or t.running:
            t.waiting, t.waiting_for = False, []
            return False
        missing, never = self._report(t)
        if never:
            self._block(t, never)
            return True
        t.waiting, t.waiting_for = bool(missing), missing
        self.manager.lifecycle.update_state(t)
        return t.waiting

    def to_start(self, t) -> list:
        """The dependencies of ``t``, transitively, dependencies first,
        that a start of ``t`` starts: stopped ones and ones whose condition
        can never hold as they are (failed, completed unsuccessfully)."""
        out, seen, stack = [], {t.name}, [(t, iter(t.spec.depends_on))]
        while stack:
            item = next(stack[-1][1], None)
            if item is None:
                node = stack.pop()[0]
                if node is not t:
                    out.append(node)
                continue
            name, condition = item
            for member in dependency_targets(name, self.manager.templates, self.manager.groups):
                d = self.manager.templates[member]
                if member in seen:
                    continue
                seen.add(member)
                if not d.wanted or d.blocked or \
                        dependency_status(condition, d.state, d.counts) == "never":
                    stack.append((d, iter(d.spec.depends_on)))
                else:
                    stack.append((None, iter(d.spec.depends_on)))
        return [d for d in out if d is not None]

    def changed(self):
        if not self._check_scheduled and not self.manager.stopping:
            self._check_scheduled = True
            self.loop.call_soon(self._check_waiting)

    def check(self, spec) -> None:
        """ValueError naming the problem if ``spec``, added or put in place
        of the template of its name, would make ``depends_on`` name an
        unknown template or group, the template itself, or a cycle."""
        specs = [spec] + [t.spec for name, t in self.manager.templates.items() if name != spec.name]
        problems = ["%s: %s" % (name, message) for name, message in dependency_problems(specs)]
        if problems:
            raise ValueError("depends_on: " + "; ".join(problems))

    def dependents_of(self, names) -> list:
        """The templates, outside ``names``, with a dependency that only
        templates of ``names`` stand for: what removing them would leave
        depending on nothing."""
        names, out = set(names), []
        for t in self.manager.templates.values():
            if t.name not in names and any(
                    set(members) <= names for members in (
                        dependency_targets(dep, self.manager.templates, self.manager.groups)
                        for dep, _ in t.spec.depends_on) if members):
                out.append(t.name)
        return out

    def _report(self, t) -> tuple:
        """``(missing, never)``: the ``NAME:CONDITION`` items of ``t`` that
        do not hold yet, and why one never can (or None)."""
        missing = []
        for name, condition in t.spec.depends_on:
            members = dependency_targets(name, self.manager.templates, self.manager.groups)
            if not members:                     # start-up: not added yet
                missing.append("%s:%s" % (name, condition))
            for member in members:
                d = self.manager.templates[member]
                status = dependency_status(condition, d.state, d.counts)
                if status == "never":
                    return missing, "dependency %s is %s, so %s:%s can never hold%s" % (
                        member, d.state, member, condition,
                        " (%s)" % d.blocked if d.blocked else "")
                if status == "waits":
                    missing.append("%s:%s" % (member, condition))
        return missing, None

    def _block(self, t, reason):
        t.blocked, t.last_error = reason, reason
        t.waiting, t.waiting_for = False, []
        log.error("%s cannot start: %s", t.name, reason)
        previous = t.state
        self.manager.lifecycle.update_state(t)
        if t.state == previous:                 # failed already: say why it still is
            self.manager._emit("state", t.name, state=t.state, previous=previous, reason=reason)

    def _check_waiting(self):
        """Release, update or block every waiting template."""
        self._check_scheduled = False
        if self.manager.stopping:
            return
        for t in list(self.manager.templates.values()):
            if t.waiting and t.wanted and self.manager.templates.get(t.name) is t:
                missing, never = self._report(t)
                if never:
                    self._block(t, never)
                elif missing != t.waiting_for:
                    self.manager.set_waiting(t.name, missing)


# -- exec controls ------------------------------------------------------------------
# umask, nice, oom_score_adj and the rlimit_* keys are applied by the child
# between fork and exec, then the identity switch (groups, gid, uid), so a
# limit can be raised and a priority lowered while the child is still
# privileged, as systemd.exec(5) orders it.  The daemon itself is never
# changed.  A template that sets none of them gets no preexec step at all.

def _set_oom_score_adj(value):
    fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, b"%d" % value)
    finally:
        os.close(fd)


def _control_steps(spec) -> list:
    """``(key, apply, argument)`` for each control ``spec`` sets, in the
    order the child applies them; cached on the spec (it is read-only)."""
    steps = spec.__dict__.get("_control_steps")
    if steps is not None:
        return steps
    steps = []
    rlimits = [key for key in RLIMIT_KEYS if getattr(spec, key) is not None]
    if rlimits:
        resource = lazy_import("resource")
        for key in rlimits:
            soft, hard = getattr(spec, key)
            infinity = resource.RLIM_INFINITY
            # prlimit, not setrlimit: setrlimit turns EPERM into a ValueError
            steps.append((key, lambda a: a[0].prlimit(0, *a[1:]), (
                resource, getattr(resource, RLIMIT_KEYS[key][0]),
                (infinity if soft is None else soft, infinity if hard is None else hard))))
    if spec.nice is not None:
        steps.append(("nice", lambda n: os.setpriority(os.PRIO_PROCESS, 0, n), spec.nice))
    if spec.oom_score_adj is not None:
        steps.append(("oom_score_adj", _set_oom_score_adj, spec.oom_score_adj))
    if spec.umask is not None:
        steps.append(("umask", os.umask, spec.umask))
    spec._control_steps = steps
    return steps


def exec_controls(spec):
    """An ``ExecControls`` for one spawn of ``spec``, or None when the
    template sets no exec control (the spawn keeps its fast path)."""
    steps = _control_steps(spec)
    return ExecControls(spec, steps) if steps else None


class ExecControls:
    """The exec controls of one spawn.

    ``arm(popen_kwargs)`` returns Popen arguments whose ``preexec_fn``
    applies the controls, then the identity the arguments asked for
    (``extra_groups``, ``group``, ``user`` or the ``preexec_fn`` of Python
    3.8), in the child.  subprocess reports an exception in
    ``preexec_fn`` without its detail, so the child first writes the
    failed key and errno to a close-on-exec pipe: after a failed Popen,
    ``failure()`` is the message naming both (None if no control failed).
    ``close()`` releases the pipe; call it after every ``arm``."""

    def __init__(self, spec, steps):
        self.spec, self.steps = spec, steps
        self._report = None                    # (read end, write end)

    def arm(self, kwargs) -> dict:
        kwargs = dict(kwargs)
        groups, gid, uid = (kwargs.pop(k, None) for k in ("extra_groups", "group", "user"))
        then = kwargs.pop("preexec_fn", None)
        self._report = os.pipe2(os.O_CLOEXEC)
        steps, report = self.steps, self._report[1]

        def apply_controls():                  # in the child: no allocation-heavy work
            key = None
            try:
                for key, apply, argument in steps:
                    apply(argument)
                key = "groups"
                if groups is not None:
                    os.setgroups(groups)
                key = "gid"
                if gid is not None:
                    os.setregid(gid, gid)
                key = "uid"
                if uid is not None:
                    os.setreuid(uid, uid)
                if then is not None:
                    then()                     # Python 3.8's identity switch
            except (OSError, ValueError) as exc:     # resource's ValueError is EINVAL
                number = getattr(exc, "errno", None) or errno.EINVAL
                os.write(report, b"%s %d" % (key.encode(), number))
                raise
        kwargs["preexec_fn"] = apply_controls
        return kwargs

    def failure(self):
        if self._report is None:
            return None
        try:
            os.set_blocking(self._report[0], False)
            data = os.read(self._report[0], 256).decode("ascii", "replace")
        except OSError:
            return None
        key, _, number = data.partition(" ")
        if not is_ascii_digits(number):
            return None
        number = int(number)
        shown = self.spec.settings.get(key, getattr(self.spec, key, ""))
        return "cannot apply %s = %s in the child: %s (%s)" % (
            key, shown, errno.errorcode.get(number, "errno %d" % number), os.strerror(number))

    def close(self):
        if self._report is not None:
            for fd in self._report:
                close_quietly(fd)
            self._report = None


class ScheduleState:
    """The schedule side of one scheduled template (``Template.sched``):
    ``paused`` (by a stop, until a start), ``due`` (the next run: loop
    time for ``every``, Unix time for cron; None when paused or never),
    ``timer``, the run in progress (``run_started``, loop time, None
    between runs) and what the last finished run left: ``last_run`` (its
    start, Unix time), ``last_exit`` (exit status of its last process,
    128 + N when killed by signal N), ``last_duration`` (seconds),
    ``last_success`` (Unix time the last successful run ended), ``runs``,
    ``failures`` and ``skipped`` (runs not started, ``overlap = skip``)."""

    __slots__ = ("paused", "due", "timer", "run_started", "busy_seen", "last_run",
                 "last_exit", "last_duration", "last_success", "runs", "failures", "skipped")

    def __init__(self):
        self.paused, self.due, self.timer = False, None, None
        self.run_started, self.busy_seen = None, False
        self.last_run = self.last_exit = self.last_duration = self.last_success = None
        self.runs = self.failures = self.skipped = 0

    def next_run(self, spec, loop):
        """The next run as Unix time (seconds), or None."""
        if self.due is None or loop is None:
            return None
        if spec.schedule.every is not None:
            return loop.unix_time(self.due)
        return round(self.due, 3)

    def report(self, spec, loop) -> dict:
        return {"schedule": spec.schedule.text, "timezone": spec.schedule_timezone,
                "overlap": spec.overlap, "paused": self.paused,
                "running": self.run_started is not None,
                "next_run": self.next_run(spec, loop), "last_run": self.last_run,
                "last_exit": self.last_exit, "last_duration": self.last_duration,
                "last_success": self.last_success, "runs": self.runs,
                "failures": self.failures, "skipped": self.skipped}


class Scheduler:
    """The ``schedule`` of a Manager's templates: one timer per scheduled
    template, armed for its next run; nothing wakes in between.

    Owns ``t.sched`` (a ``ScheduleState``) of every template with a
    schedule: its pause, next due time, the run in progress and the facts
    /status and /metrics report.  A run is the template started as any
    other (``Manager._start``, through its dependencies); it ends when no
    slot is starting, running, in backoff or stopping any more, and the
    template then waits in state ``scheduled`` (not wanted, its slots left
    as they ended) for the next run.  A run still going when the next is
    due: ``overlap = skip`` skips the new one, ``allow`` adds
    ``numprocesses`` more slots to the run (the runs are reported as one,
    from the first start to the last exit), ``restart`` replaces the
    processes (the run starts again).

    Time: ``every`` counts loop (monotonic) time, in phase with the
    arming, so a change of the wall clock moves nothing.  A cron schedule
    is due at a Unix time: its timer is armed for the difference to the
    loop's wall clock, and when it fires the wall clock is read again:
    early (the clock was set back, or the wait was longer than a timer
    may be) arms it again; late (the clock jumped forward) runs once now.
    The next run is always the first one after now: runs missed while the
    daemon was down or the clock jumped are not caught up.

    Called by the manager: ``attach`` when a template with a schedule is
    added or updated (``detach`` when removed or no longer scheduled),
    ``resume`` before a start asked for (``_start`` runs it now),
    ``pause`` at a stop asked for, ``starting`` at every template start,
    ``stopped`` at every template stop; and by ``Lifecycle.update_state``
    (``observe``) after each slot change, which ends the run.
    """

    BUSY = (STARTING, RUNNING, BACKOFF, STOPPING)

    def __init__(self, manager):
        self.manager, self.loop = manager, manager.loop

    def attach(self, t, paused: bool) -> None:
        """Schedule ``t`` (a new template, or one whose definition
        changed: its record is kept); ``run_on_start`` runs a new one now."""
        first = t.sched is None
        s = t.sched = t.sched or ScheduleState()
        s.paused, s.due, s.run_started, s.busy_seen = paused, None, None, False
        self._arm(t)
        if first and not paused and t.spec.run_on_start:
            self._run(t)
        self.manager.lifecycle.update_state(t)

    def detach(self, t) -> None:
        if t.sched is not None:
            self._cancel(t.sched)
            t.sched = None

    def resume(self, t) -> None:
        s = t.sched
        s.paused = False
        if s.timer is None:
            self._arm(t)

    def pause(self, t) -> None:
        s = t.sched
        s.paused = True
        self._cancel(s)

    def starting(self, t, again=False) -> None:
        """``t`` is being started: the start of a run, unless one is going
        (``again``: a restart starts it anew)."""
        s = t.sched
        if s.run_started is None or again:
            s.run_started, s.busy_seen = self.loop.time(), False
            s.last_run = round(self.loop.wall_time(), 3)

    def stopped(self, t) -> None:
        """``t`` was stopped: a run in progress ends unrecorded."""
        t.sched.run_started, t.sched.busy_seen = None, False

    def observe(self, t) -> None:
        """After a slot change: end the run once nothing is left going."""
        s = t.sched
        if s.run_started is None or not t.wanted or t.waiting:
            return
        if any(t.counts[state] for state in self.BUSY):
            s.busy_seen = True
        elif s.busy_seen:
            self._finish(t)

    # -- timers ------------------------------------------------------------------------
    @staticmethod
    def _cancel(s):
        if s.timer is not None:
            s.timer.cancel()
        s.timer, s.due = None, None

    def _arm(self, t, fired=None) -> None:
        """Arm the timer of the next run after now (after ``fired``, the due
        time just run, for ``every`` to keep its phase)."""
        s, schedule = t.sched, t.spec.schedule
        self._cancel(s)
        if s.paused or self.manager.stopping:
            return
        now = self.loop.time()
        if schedule.every is not None:
            due = now + schedule.every if fired is None else fired + schedule.every
            if due <= now:                                  # not caught up
                due += ((now - due) // schedule.every + 1) * schedule.every
            s.due = due
            s.timer = self.loop.call_at(due, self._fire, t)
            return
        wall = self.loop.wall_time()
        s.due = schedule.next_after(max(wall, fired or wall),
                                    utc=t.spec.schedule_timezone == "utc")
        if s.due is not None:
            self._set_timer(t, wall)

    def _set_timer(self, t, wall):
        s = t.sched
        delay = min(max(0.0, s.due - wall), self.loop.MAX_DELAY)
        s.timer = self.loop.call_later(delay, self._fire, t)

    def _fire(self, t) -> None:
        s = t.sched
        if s is None or s.timer is None or self.manager.templates.get(t.name) is not t:
            return
        s.timer = None
        if self.manager.stopping or s.paused:
            return
        if t.spec.schedule.every is None:
            wall = self.loop.wall_time()
            if wall < s.due:                 # the clock was set back, or a long wait
                self._set_timer(t, wall)
                return
        fired = s.due
        self._run(t)
        self._arm(t, fired)

    # -- runs --------------------------------------------------------------------------
    def _run(self, t) -> None:
        """A run is due now."""
        s, m = t.sched, self.manager
        if s.run_started is None:
            if t.numprocesses:                  # numprocesses = 0: nothing to run
                m._start(t)
            return
        mode = t.spec.overlap
        if mode == "skip":
            s.skipped += 1
            log.info("%s: a run is due while the last one still runs; skipped "
                     "(overlap = skip)", t.name)
        elif mode == "restart":
            log.info("%s: a run is due while the last one still runs; restarting it "
                     "(overlap = restart)", t.name)
            m.restart_process(t.name)
        else:
            t.numprocesses = min(t.numprocesses + t.spec.numprocesses,
                                 RANGES["numprocesses"][1])
            s.last_run = round(self.loop.wall_time(), 3)
            m._manage(t)

    def _finish(self, t) -> None:
        """Every process of the run ended: record it, go back to waiting."""
        s, m = t.sched, self.manager
        duration = self.loop.time() - s.run_started
        s.run_started, s.busy_seen = None, False
        s.runs += 1
        s.last_duration = round(duration, 3)
        last = t.last_exit or {}
        s.last_exit = 128 + last["term_signal"] if last.get("term_signal") else \
            last.get("exit_status")
        ok = all(slot.state == EXITED and slot.ok for slot in t.slots)
        if ok:
            s.last_success = round(self.loop.wall_time(), 3)
        else:
            s.failures += 1
        t.wanted = False
        if t.numprocesses != t.spec.numprocesses:          # the extra slots of overlap = allow
            t.numprocesses = t.spec.numprocesses
            for slot in sorted(t.slots, key=lambda slot: slot.index)[t.numprocesses:]:
                m._stop_slot(t, slot, "reap")
        log.log(logging.INFO if ok else logging.WARNING, "%s: scheduled run %s after %.1fs "
                "(last exit status %s)", t.name, "succeeded" if ok else "failed", duration,
                s.last_exit)


class _SpawnCache:
    """What the starts of one template spec share: the environment before
    the per-process variables, argv when nothing in it is substituted,
    and the executables found (a PATH search is a dozen stat calls; a
    found file is checked to be still executable at every start, and
    searched for again when it is not).  A new spec (reload, update)
    gets a new cache."""

    __slots__ = ("spec", "environment", "argv", "_found")

    def __init__(self, spec, environ):
        self.spec = spec
        # an env_file is read again at every start (Spawner.process_environment)
        self.environment = None if spec.env_file else child_environment(spec, environ)
        self.argv = None
        self._found = {}
        if "$" not in spec.cmd and not any("$" in a for a in spec.args or ()):
            try:
                self.argv = command_line(spec, {})
            except (KeyError, ValueError):
                pass                    # the start reports it

    def executable(self, exe, spec, env):
        key = (exe, env.get("PATH"))
        path = self._found.get(key)
        if path is not None and os.access(path, os.X_OK):
            return path
        path = find_executable(exe, spec, env)
        if path is not None:
            if len(self._found) >= 64:      # (exe comes from substitutions: bounded)
                self._found.clear()
            self._found[key] = path
        return path


def _insert_by_id(running, by_id, proc):
    """Add ``proc`` to a template's ``running`` list and the manager's
    ``running`` map keeping both in id (spawn) order, which the API shows
    and the oldest-first choices rely on: starts come back from several
    threads, now and then out of order."""
    index = len(running)
    while index and running[index - 1].id > proc.id:
        index -= 1
    running.insert(index, proc)
    later = []
    for pid in reversed(by_id):         # an OrderedDict in id order: stop at the first older
        if pid < proc.id:
            break
        later.append(pid)
    by_id[proc.id] = proc
    for pid in reversed(later):
        by_id.move_to_end(pid)


# Starts that place fds on 3.. hold the low fd numbers during their fork;
# they take turns, so that one start's release cannot hand a number to
# another's subprocess error pipe.
_LOW_FDS = threading.Lock()
_NO_LOCK = contextlib.nullcontext()


class _Start:
    """One child being started off the loop: what ``Spawner._prepare``
    decided (argv, Popen arguments, pipe ends), and what came back
    (``popen``, or ``error``).  A start is never called off: a process
    stopped while it is being started still gets its ``spawn`` and
    ``exit``, as it did when starts were synchronous.

    The loop fills it and reads it back only after the starter reported
    it; the starter thread touches ``run`` and nothing else."""

    __slots__ = ("proc", "argv", "kwargs", "controls", "ours", "theirs", "hold_below",
                 "popen", "error", "fd_short", "seq", "done", "landed")

    def __init__(self, proc, argv):
        self.proc, self.argv, self.kwargs = proc, argv, None
        self.controls = None                    # ExecControls, when the spec sets any
        self.ours, self.theirs = [], []         # pipe ends to keep / to close once started
        self.hold_below = 0                     # fd numbers to occupy during the fork
        self.popen = self.error = None
        self.fd_short = False                   # it failed for want of file descriptors
        self.seq = 0                            # its place among the spawner's starts
        self.done = False                       # the starter is through with it
        self.landed = False                     # the loop has taken it back

    def run(self):
        """On the starter thread: fork and wait for the exec (Popen blocks
        reading its error pipe, with the GIL released), then close the
        child's pipe ends."""
        held = []
        lock = _LOW_FDS if self.hold_below else _NO_LOCK
        try:
            with lock:                      # no other start frees a low number meanwhile
                if self.hold_below:
                    held = _hold_fd_numbers(self.hold_below)
                self.popen = subprocess.Popen(self.argv, **self.kwargs)
                for fd in held:
                    close_quietly(fd)
                held = []
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            why = self.controls.failure() if self.controls is not None else None
            self.error = why or "%s: %s" % (self.argv[0], getattr(exc, "strerror", None) or exc)
            self.fd_short = getattr(exc, "errno", None) in (errno.EMFILE, errno.ENFILE)
        except Exception as exc:            # keep the thread alive; the slot gets a failed start
            self.error = "%s: %r" % (self.argv[0], exc)
        finally:
            for fd in self.theirs + held:
                close_quietly(fd)
            self.theirs = []
            if self.controls is not None:
                self.controls.close()

    def release(self, failed):
        """On the loop: close what no child got (every end when ``failed``)."""
        for fd in self.theirs:
            close_quietly(fd)
        self.theirs = []
        if failed:
            proc = self.proc
            for fd in self.ours:
                close_quietly(fd)
            self.ours = []
            proc.close_custom_streams()
            proc._fds.clear()
            proc.stdin_fd = None
            if proc.notify is not None:
                proc.notify.cancel()
                proc.notify = None


class _Starter:
    """The threads that fork and exec children for a Spawner, so that the
    loop never waits for an exec (about 1 ms, far more on a busy machine).

    Starts are taken in the order submitted by up to STARTER_THREADS
    threads (another thread is started only when every one is busy, so
    an exec that hangs holds up one thread, not every spawn).  After each
    start its thread records the child's pid in ``landed``, then marks
    the start ``done`` (in that order: the reaper relies on it), and
    hands it back to the loop through ``call_soon_threadsafe``: one
    wake-up for as many starts as are back by then.  The loop takes them
    in the order they were submitted (so ``spawn`` events and ids agree,
    as when starts were synchronous); a start back early waits for the
    ones before it at most START_ORDER_WAIT seconds, so an exec that hangs
    holds up no other.  Idle threads sleep on a condition.  Popen's own Python code runs on these threads with
    the GIL: the daemon lowers the switch interval to GIL_SWITCH_INTERVAL
    (from 5 ms) so that the loop gets it back soon."""

    def __init__(self, loop, on_back):
        self.loop, self.on_back = loop, on_back
        self.landed = {}                    # child pid -> _Start, until the loop registers it
        self._jobs = collections.deque()
        self._back = collections.deque()
        self._cond = threading.Condition()
        self._threads = 0
        self._idle = 0
        self._wake_pending = False
        self._held = []                     # heap of (seq, start): back, waiting for its turn
        self._next = 1                      # the seq whose turn it is
        self._order_timer = None

    def submit(self, start):
        with self._cond:
            self._jobs.append(start)
            self._cond.notify()
            more = self._idle < len(self._jobs) and self._threads < STARTER_THREADS
            if more:
                self._threads += 1
        if more:
            try:
                threading.Thread(target=self._run, name="gafferd-starter", daemon=True).start()
            except RuntimeError as exc:     # RLIMIT_NPROC counts threads too
                with self._cond:
                    self._threads -= 1
                    orphaned = not self._threads and self._jobs
                    jobs = list(self._jobs) if orphaned else []
                    if orphaned:
                        self._jobs.clear()
                for job in jobs:             # no thread at all: these fail now
                    job.error = "cannot start a starter thread: %s" % exc
                    if job.controls is not None:
                        job.controls.close()
                    job.done = True
                    self._back.append(job)
                if jobs:
                    self.loop.call_soon(self._deliver)

    def _run(self):
        cond, jobs = self._cond, self._jobs
        while True:
            with cond:
                self._idle += 1
                while not jobs:
                    cond.wait()
                self._idle -= 1
                start = jobs.popleft()
            start.run()
            if start.popen is not None:
                self.landed[start.popen.pid] = start
            start.done = True
            self._back.append(start)
            if not self._wake_pending:
                self._wake_pending = True
                self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self):
        """Take the starts that are back, in submission order, for at most
        LAND_BUDGET seconds (the rest on the next iteration: a burst must
        not hold up the API)."""
        self._wake_pending = False          # first: a start back from now wakes us again
        back, held = self._back, self._held
        while back:
            start = back.popleft()
            heapq.heappush(held, (start.seq, start))
        end = self.loop.time() + LAND_BUDGET
        while held and held[0][0] <= self._next:
            seq, start = heapq.heappop(held)
            self._next = max(self._next, seq + 1)
            self.on_back(start)
            if held and held[0][0] <= self._next and self.loop.time() >= end:
                self._wake_pending = True
                self.loop.call_soon(self._deliver)
                return
        if not held:
            if self._order_timer is not None:
                self._order_timer.cancel()
                self._order_timer = None
        elif self._order_timer is None:
            self._order_timer = self.loop.call_later(START_ORDER_WAIT, self._overdue)

    def _overdue(self):
        """The start whose turn it is has been out START_ORDER_WAIT seconds
        while later ones are back: they go first (it lands when back)."""
        self._order_timer = None
        if self._held:
            self._next = self._held[0][0]
            self._deliver()


class Spawner:
    """Starts the processes of a Manager: the spawn queue, the spawn
    budget, the exec with its pipes, sockets and identity, and the
    program log files.

    Owns the templates waiting for spawns (in priority order), the
    per-iteration budget, the internal process ids and the LogFile of
    each path (shared by the templates that name it).

    Callers may rely on: a slot given to ``queue`` is started at the
    latest on a later loop iteration while its template is eligible, in
    template (priority) order, within ``budget`` seconds (SPAWN_BUDGET
    unless given) of each loop (the first spawn of an iteration always goes) and with at
    most SPAWN_IN_FLIGHT starts out at a time.  The loop never waits for
    an exec: ``spawn`` prepares the child on the loop (``_prepare``), the
    ``_Starter`` thread forks and waits for the exec, and the start comes
    back to the loop (``_land``), which feeds ``spawned`` to the slot,
    or on a failed exec an exit with status 127 (a failed start).  From
    ``spawn`` to ``_land`` the slot's process is alive with no pid: a
    signal sent to it then reaches the child once back (``Process.kill``); ``in_flight`` lists such processes, and
    ``child_starting`` tells the reaper and the orphan scans whether an
    unknown child may be one of them.  ``identity`` and
    ``process_environment`` give what a child (or its ``cmd:`` check)
    runs as and with.

    Called by the manager's ``spawn`` action (``queue``), by its restart
    step (``budget_left``, ``has_unspawned``, ``full``, ``when_free``,
    through ``Manager._spawn``), by the loop's reaper and the orphan
    scans (``child_starting``), by ``_CmdAttempt`` (``identity``) and at
    shutdown (``in_flight``, ``close_logs``).
    """

    def __init__(self, manager, budget=SPAWN_BUDGET):
        self.manager, self.loop = manager, manager.loop
        self.budget = budget                           # seconds per loop iteration
        self._ids = itertools.count(1)
        self._logfiles = {}                            # path -> LogFile (shared)
        self._spawn_queue = collections.deque()        # templates waiting for spawns
        self._spawn_wanted = set()
        self._pump_scheduled = False
        self._budget_iteration = -1
        self._budget_end = 0.0
        self._in_flight = {}                           # Process -> _Start, until back
        self._submitted = 0                            # starts handed to the starter
        self._unknown = {}                             # unwatched child pid -> (_submitted, time) then
        self._when_free = []
        self._fd_short = False                         # the last start lacked fds
        self._starter = _Starter(self.loop, self._land)

    def queue(self, t, slot):
        """``slot`` of ``t`` wants a process: queue it and spawn what the
        budget allows now."""
        t.unspawned.append(slot)
        queue = self._spawn_queue
        if t in self._spawn_wanted:
            if len(queue) > 1 and queue[0] is t:
                # refilled while at the head (a respawn storm), it would keep
                # the head for ever: the templates queued behind it go first
                queue.rotate(-1)
        elif self.manager._eligible(t):
            self._spawn_wanted.add(t)
            queue.append(t)
            self.pump()

    def budget_left(self) -> bool:
        """Spawning may use ``budget`` seconds of each loop iteration, so
        that a crash storm or a mass start never starves the API.  The
        first spawn of an iteration is always allowed (progress).  At most
        SPAWN_IN_FLIGHT starts wait for the starter thread (each holds
        its pipes open)."""
        if self.full():
            return False
        if self._budget_iteration != self.loop.iteration:
            self._budget_iteration = self.loop.iteration
            self._budget_end = self.loop.time() + self.budget
            return True
        return self.loop.time() < self._budget_end

    def pump(self):
        """Spawn the slots templates are waiting for, in queue (priority)
        order, within this iteration's budget; the rest on the next one."""
        queue = self._spawn_queue
        while queue and self.budget_left():
            t = queue[0]
            if not self.manager._eligible(t) or not self.has_unspawned(t):
                queue.popleft()
                self._spawn_wanted.discard(t)
                continue
            self.manager._spawn(t)        # the manager's seam: every spawn passes it
        if queue and not self._pump_scheduled and not self.full():
            self._pump_scheduled = True     # (at the limit, the next start back pumps)
            self.loop.call_soon(self._pump_later)

    def _pump_later(self):
        self._pump_scheduled = False
        self.pump()

    @staticmethod
    def has_unspawned(t) -> bool:
        """Drop the slots that were stopped before their exec; any left?"""
        queue = t.unspawned
        while queue and not (queue[0].member and queue[0].state == STARTING
                             and queue[0].proc is None):
            queue.popleft()
        return bool(queue)

    def spawn(self, t) -> bool:
        """Start the process of the next slot of ``t`` waiting for one: its
        pipes, sockets, environment and arguments are prepared here, the
        fork and the wait for the exec happen on the starter thread
        (``_Starter``), and ``_land`` finishes on a later iteration.  False
        when nothing was started (the preparation failed: a failed start
        for that slot)."""
        if not self.has_unspawned(t):
            return False
        slot = t.unspawned.popleft()
        proc = Process(self.manager, t, next(self._ids))
        proc.slot = slot
        try:
            start = self._prepare(proc)
        except SpawnError as exc:
            self._fd_short = exc.fd_short
            self._failed(proc, str(exc))
            return False
        slot.proc = proc                    # in flight: alive, no pid yet
        proc.start = start
        self._in_flight[proc] = start
        self._submitted += 1
        start.seq = self._submitted
        self._starter.submit(start)
        return True

    def _failed(self, proc, error, asked=False):
        """A start that produced no process: counts as an exit with status
        127 after no time up (respawn and backoff apply)."""
        t, slot = proc.template, proc.slot
        if error is not None:
            self.manager.spawn_failures += 1
            t.last_error = error
            log.error("cannot start %s (slot %d): %s", t.name, slot.index, error)
        self.manager.reaper.after_exit(t, slot, proc, 127, 0, 0.0, asked)

    def _cache(self, t) -> "_SpawnCache":
        """What every start of ``t`` shares while its spec stays the same."""
        cache = t.spawn_cache
        if cache is None or cache.spec is not t.spec:
            cache = t.spawn_cache = _SpawnCache(t.spec, self.manager.environ)
        return cache

    def process_environment(self, proc) -> dict:
        """The environment ``proc`` is started with (a new dict), which
        its ``cmd:`` readiness check gets too."""
        spec = proc.spec
        if spec.env_file:                  # read again at every start
            try:
                env = child_environment(spec, self.manager.environ)
            except ValueError as exc:    # an env_file gone or broken since the config was read
                raise SpawnError("env_file: %s" % exc) from None
        elif proc.template.spec is spec:
            env = dict(self._cache(proc.template).environment)
        else:                              # an old process's check, after a reload
            env = child_environment(spec, self.manager.environ)
        env.update(GAFFERD_NAME=proc.name, GAFFERD_ID=str(proc.id),
                   GAFFERD_SLOT=str(proc.slot.index if proc.slot else 0))
        return env

    # -- preparation (on the loop): argv, environment, fds, Popen arguments ------
    def _prepare(self, proc) -> "_Start":
        """Everything the child needs, decided and opened on the loop: a
        ``_Start`` with argv and the Popen keyword arguments, the pipe ends
        to keep and those to close once the child has them.  Options that
        change the child (identity, fds on 3.., environment, preexec
        steps) are added here.  SpawnError with nothing left open."""
        spec = proc.spec
        cache = self._cache(proc.template)
        env = self.process_environment(proc)
        if not os.path.isdir(spec.cwd):
            raise SpawnError("working directory %r does not exist" % spec.cwd)
        try:
            argv, executable = resolve_command(spec, env, cache)
        except CommandError as exc:
            raise SpawnError(str(exc)) from None
        kwargs = self.identity(spec)        # SpawnError before any fd is opened
        start = _Start(proc, argv)
        start.controls = controls = exec_controls(spec)   # None: no preexec step for them
        ours, theirs = start.ours, start.theirs
        stdio = [subprocess.DEVNULL] * 3
        try:
            if controls is not None:
                kwargs = controls.arm(kwargs)
            if proc.redirect_input:
                r, w = os.pipe()
                theirs.append(r)
                ours.append(w)
                stdio[0] = r
                proc.stdin_fd = w
            pipes = {}
            for index, label in enumerate(proc.redirect_output):
                if label not in pipes:
                    r, w = os.pipe()
                    ours.append(r)
                    theirs.append(w)
                    pipes[label] = w
                    proc._fds[r] = label
                stdio[1 + index] = pipes[label]
            if spec.ready.kind == "log":
                for index in (0, 1):    # read for the check even when not redirected
                    if stdio[1 + index] is subprocess.DEVNULL:
                        r, w = os.pipe()
                        ours.append(r)
                        theirs.append(w)
                        stdio[1 + index] = w
                        proc._fds[r] = _UNREDIRECTED[index]
            if spec.ready.kind == "notify" or spec.watchdog_sec:
                if proc.slot is not None:
                    proc.slot.status_text = ""      # the last process's words are not its
                proc.notify = NotifySocket(self.manager, proc)
                env["NOTIFY_SOCKET"] = proc.notify.address
                if spec.watchdog_sec:
                    env["WATCHDOG_USEC"] = str(int(spec.watchdog_sec * 1e6))
            custom = []
            for label in proc.custom_streams:
                mine, child = socket.socketpair()
                proc.custom_fds[label] = mine
                theirs.append(child.detach())
                custom.append(theirs[-1])
            if spec.sockets:                 # first, on 3..: the systemd protocol's place
                argv, executable, listen = socket_activation(self.manager.sockets, spec.sockets,
                                                             argv, executable, env)
                # copies the start owns: a reload may close the held socket
                # (and its number be reused) before the starter thread forks
                listen = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3) for fd in listen]
                theirs.extend(listen)
                custom = listen + custom
            if custom:
                # close_fds stays on: the child gets 0-2, the sockets and
                # custom streams on 3.. (kept through pass_fds once
                # preexec_fn put them there) and nothing else the daemon
                # holds or inherited
                kwargs["pass_fds"] = range(3, 3 + len(custom))
                kwargs["preexec_fn"] = _chain_preexec(kwargs.get("preexec_fn"), custom)
                start.hold_below = 3 + len(custom)
        except SpawnError:
            start.release(failed=True)
            if controls is not None:
                controls.close()
            raise
        except (OSError, ValueError) as exc:
            start.release(failed=True)
            if controls is not None:
                controls.close()
            error = SpawnError("%s: %s" % (argv[0], getattr(exc, "strerror", None) or exc))
            error.fd_short = getattr(exc, "errno", None) in (errno.EMFILE, errno.ENFILE)
            raise error from None
        kwargs.update(executable=executable, stdin=stdio[0], stdout=stdio[1], stderr=stdio[2],
                      cwd=spec.cwd, env=env, start_new_session=True, restore_signals=True,
                      close_fds=True)
        start.argv, start.kwargs = argv, kwargs
        return start

    # -- the start's return (on the loop) -----------------------------------------
    def _land(self, start):
        """The starter is done with ``start`` (a child or a failed exec):
        register the child and feed
        ``spawned`` to its slot, or count the failure.  Runs once per start,
        from the starter's report or earlier from the reaper."""
        if start.landed:
            return
        start.landed = True
        proc = start.proc
        self._in_flight.pop(proc, None)
        proc.start = None
        t, slot, m = proc.template, proc.slot, self.manager
        self._fd_short = start.fd_short
        if start.popen is None:
            start.release(failed=True)
            proc.exit_status = 127          # never ran: no SIGKILL for it later
            if proc.kill_handle is not None:
                proc.kill_handle.cancel()
            self._failed(proc, start.error, asked=proc.requested)
            if m.stopping:
                m.shutdown.child_exited()
        else:
            self._register(proc, start)
            if slot.proc is proc and slot.state == STARTING:
                m.lifecycle.feed(t, slot, SPAWNED)
            else:                           # stopped while it was being started
                for signum in proc.pending_signals:
                    proc.kill(signum)
        proc.pending_signals = ()
        if not self._in_flight:
            self._unknown.clear()
        if self.loop.reap_deferred:         # a zombie waited for this start (never re-entrant)
            self.loop.reap_deferred = False
            self.loop.call_soon(self.loop.reap_children)
        waiting, self._when_free = self._when_free, []
        for callback, args in waiting:
            self.loop.call_soon(callback, *args)
        if self._spawn_queue:
            self.pump()

    def _register(self, proc, start):
        spec, m = proc.spec, self.manager
        proc.popen = start.popen
        proc.pid = start.popen.pid
        proc.started = self.loop.time()
        self._unknown.pop(proc.pid, None)
        self._starter.landed.pop(proc.pid, None)
        for fd in start.ours:
            os.set_blocking(fd, False)
        for fd in proc._fds:
            self.loop.add_reader(fd, proc._on_output, fd)
        for label, sock in proc.custom_fds.items():
            sock.setblocking(False)
            proc._fds[sock.fileno()] = label
            self.loop.add_reader(sock.fileno(), proc._on_output, sock.fileno())
        for index, label in enumerate(proc.redirect_output):
            path = spec.logfile_for(index)
            if path and label not in proc._logs:
                proc._logs[label] = self._logfile(path, spec)
        if proc.notify is not None:
            proc.notify.start()
            proc.watch.append(proc.notify)
        self.loop.watch_child(proc.pid, _ChildWatcher(m, proc))
        proc.sample = (self.loop.time(), 0.0)
        m.spawned_total += 1
        m._by_pid[proc.pid] = proc
        if not proc.requested:
            _insert_by_id(proc.template.running, m.running, proc)
        m._emit("spawn", proc.name, pid=proc.id, detached=spec.detach, os_pid=proc.pid)
        m.limits.watch(proc)

    def child_starting(self, pid) -> bool:
        """The reaper (or an orphan scan) met child ``pid`` that nobody
        watches.  A child of a start that is back is registered now
        (False: the caller looks up its watcher again).  True while it
        may still be the child of a start handed over before it was
        first seen and not back yet, for at most START_DEFER_LIMIT seconds
        (a start that hangs must not stop the reaping of every other
        child); after that it is not ours."""
        first, seen = self._unknown.setdefault(pid, (self._submitted, self.loop.time()))
        pending = any(not s.done and s.seq <= first for s in self._in_flight.values())
        if pending and self.loop.time() - seen > START_DEFER_LIMIT:
            log.warning("child %d is taken as not ours: a start older than it has been out "
                        "over %gs (an exec that hangs?)", pid, START_DEFER_LIMIT)
            pending = False
        start = self._starter.landed.get(pid)     # read after ``done``: see _Starter
        if start is not None:
            self._land(start)
            return False
        if pending:
            return True
        del self._unknown[pid]
        return False

    @property
    def in_flight(self) -> list:
        """Processes handed to the starter and not back yet."""
        return list(self._in_flight)

    def full(self) -> bool:
        """SPAWN_IN_FLIGHT starts are out: the next waits for one back.
        After a start failed for want of file descriptors, one at a time
        until a start succeeds (a start holds its pipes while it is out;
        several would leave none for accepting the API's connections)."""
        return len(self._in_flight) >= (1 if self._fd_short else SPAWN_IN_FLIGHT)

    def when_free(self, callback, *args):
        """``callback(*args)`` on the iteration after the next start comes
        back (for a caller the in-flight limit held up)."""
        self._when_free.append((callback, args))

    def identity(self, spec):
        """Popen arguments that switch group, groups and user in the child.
        The supplementary groups are the user's (with ``uid``), or ``gid``,
        then the template's ``groups``."""
        if spec.uid is None and spec.gid is None and not spec.groups:
            return {}
        uid, gid = spec.uid, spec.gid
        user = None
        if uid is not None:
            try:
                entry = pwd.getpwuid(uid)
            except KeyError:                 # the user was deleted since the config was read
                raise SpawnError("unknown user id %d" % uid) from None
            user = entry.pw_name
            gid = entry.pw_gid if gid is None else gid
        groups = os.getgrouplist(user, gid) if user else [gid] if gid is not None else []
        groups += [g for g in spec.groups if g not in groups]
        if sys.version_info >= (3, 9):
            out = {"extra_groups": groups}
            if gid is not None:
                out["group"] = gid
            if uid is not None:
                out["user"] = uid
            return out

        def switch():                   # Python 3.8: no user=/group= in Popen
            os.setgroups(groups)
            if gid is not None:
                os.setgid(gid)
            if uid is not None:
                os.setuid(uid)
        return {"preexec_fn": switch}

    def _logfile(self, path, spec):
        logfile = self._logfiles.get(path)
        if logfile is None:
            logfile = self._logfiles[path] = LogFile(
                path, spec.logfile_maxbytes, spec.logfile_backups,
                spec.log_timestamps and spec.log_format == "raw")   # json records have a time
        return logfile

    def reopen_logs(self) -> int:
        """Reopen every program log file (SIGUSR1): each is closed and
        opened again at its next write; returns how many."""
        for logfile in self._logfiles.values():
            self.manager.log_writer.close_file(logfile)
        return len(self._logfiles)

    def close_logs(self):
        """Close every program log file; nothing is written after."""
        for logfile in self._logfiles.values():
            self.manager.log_writer.close_file(logfile)



class Rollout:
    """A rolling restart of templates, one template after the other.

    For each template: start ``rolling_max_surge`` new processes (each in
    a new slot with the slot number of the old one it replaces), wait
    until every one is *ready* (its slot ``running``: the ``ready`` key),
    then stop as many old ones, and repeat until every process that was
    live at the start has been replaced.  A new process that exits before
    it is ready, misses ``ready_timeout`` or cannot be execed ends the
    rollout: the new processes of that step are stopped, the old ones
    keep serving, the templates not reached yet are not restarted, and
    ``rollout.failed`` says why.  Slots without a process (backoff,
    failed) are started again at once, as a plain restart does.

    Events (payload ``name`` and ``replaced`` / ``total`` processes):
    ``rollout.start`` (with ``max_surge``), ``rollout.step`` (``old`` and
    ``new`` internal ids), ``rollout.done``, ``rollout.failed``
    (``reason``).  ``watcher(event, payload)`` gets each as it happens,
    then ``(None, rollout)`` once ``outcome`` is ``"done"`` or ``"failed"``.

    Owned by the manager (``Manager.rollouts``: template name -> the
    rollout of it) while it runs; ``abort`` ends it (a stop, a plain
    restart).  It only uses the manager's slot operations, so the slot
    states stay the lifecycle's: it never blocks, it is woken by the
    template's events and by its own deadline.
    """

    def __init__(self, manager, names, watcher=None):
        self.manager, self.loop = manager, manager.loop
        self.names = list(names)
        self.watcher = watcher
        self.t = None
        self.old = []                  # old slots still to replace
        self.batch = []                # (old slot, new slot) of the step
        self.replaced = self.total = 0
        self.timer = None
        self.outcome = None            # "done" or "failed" once over
        self.reason = None
        self.rolled = list(names)

    def begin(self):
        self._next_template()
        return self

    def _emit(self, event, **fields):
        fields.update(replaced=self.replaced, total=self.total)
        self.manager._emit(event, self.t.name, **fields)
        payload = dict(fields, name=self.t.name)
        if self.watcher is not None:
            try:
                self.watcher(event, dict(payload))
            except Exception:
                log.exception("rollout watcher failed")

    def _next_template(self):
        m = self.manager
        while self.names:
            t = m.templates.get(self.names.pop(0))
            if t is None:
                continue
            self.t = t
            self.batch, self.replaced = [], 0
            m._emit("restart", t.name)
            if not t.wanted or t.waiting or t.blocked:
                self.total = 0
                self._emit("rollout.start", max_surge=t.spec.rolling_max_surge)
                m._start(t, events=False)       # nothing to replace: it just starts
                self._emit("rollout.done")
                continue
            for slot in [s for s in t.slots if s.proc is None]:
                m.lifecycle.feed(t, slot, START)
            self.old = sorted((s for s in t.slots if s.proc is not None), key=lambda s: s.index)
            self.total = len(self.old)
            m.rollouts[t.name] = self
            t.replacing = True
            m.subscribe("proc." + t.name, self._on_event)
            self._emit("rollout.start", max_surge=t.spec.rolling_max_surge)
            self._step()
            return
        self._over("done")

    def _over(self, outcome):
        """The rollout has ended: the watcher gets ``(None, self)``."""
        self.outcome = outcome
        if self.watcher is not None:
            try:
                self.watcher(None, self)
            except Exception:
                log.exception("rollout watcher failed")

    def _step(self):
        t, m = self.t, self.manager
        self.batch = []
        while self.old and not self.batch:
            batch, self.old = self.old[:t.spec.rolling_max_surge], \
                self.old[t.spec.rolling_max_surge:]
            self.batch = [(old, m._add_slot(t, old.index)) for old in batch if old.member]
        if not self.batch:
            self._end("rollout.done")
            return
        kind, wait = t.spec.ready.kind, None
        if kind in ("startsecs", "spawn"):
            wait = t.spec.startsecs
        elif t.spec.ready_timeout > 0:
            wait = t.spec.ready_timeout
        if wait is not None:           # the lifecycle's own timeout acts first
            self.timer = self.loop.call_later(min(wait + 2.0, MAX_DURATION), self.check, True)
        self.check()

    def _on_event(self, event, payload):
        if not event.startswith("proc.%s.rollout." % self.t.name):
            self.check()

    def check(self, deadline=False):
        """Judge the step: go on when every new process is ready, fail
        when one cannot be."""
        if self.outcome is not None or self.manager.rollouts.get(self.t.name) is not self:
            return
        t, m = self.t, self.manager
        if not m._eligible(t):
            self.abort("the template was stopped")
            return
        for _, new in self.batch:
            why = None
            if not new.member:
                why = "its new process in slot %d was stopped" % new.index
            elif new.failing:
                why = "the new process in slot %d was not ready within ready_timeout " \
                      "(%gs)" % (new.index, t.spec.ready_timeout)
            elif new.failed_starts or new.state not in (STARTING, RUNNING):
                why = "the new process in slot %d exited before it was ready%s" % (
                    new.index, " (%s)" % t.last_error if t.last_error else
                    " (exit status %s)" % t.last_exit if t.last_exit is not None else "")
            elif deadline and new.state != RUNNING:
                why = "the new process in slot %d was not ready in time" % new.index
            if why:
                self.abort(why)
                return
        if any(new.state != RUNNING for _, new in self.batch):
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        old_ids = [old.proc.id for old, _ in self.batch if old.proc is not None]
        for old, _ in self.batch:
            if old.member:
                m._stop_slot(t, old, "reap")
        self.replaced += len(self.batch)
        self._emit("rollout.step", old=old_ids,
                   new=[new.proc.id for _, new in self.batch if new.proc is not None])
        self._step()

    def abort(self, reason):
        """End the rollout as failed: the new processes of the step stop,
        the old ones stay."""
        if self.outcome is not None or self.manager.rollouts.get(self.t.name) is not self:
            return
        for _, new in self.batch:
            if new.member:
                self.manager._stop_slot(self.t, new, "reap")
        self.names = []
        self.reason = reason
        log.warning("rolling restart of %s stopped after %d of %d process(es): %s",
                    self.t.name, self.replaced, self.total, reason)
        self._end("rollout.failed", reason=reason)

    def _end(self, event, **fields):
        t, m = self.t, self.manager
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.batch = []
        m.unsubscribe("proc." + t.name, self._on_event)
        m.rollouts.pop(t.name, None)
        t.replacing = False
        self._emit(event, **fields)
        m._manage(t)
        if event == "rollout.failed":
            self._over("failed")
        else:
            self._next_template()


class Shutdown:
    """How a Manager goes down: the only way is ``begin``.

    Owns the order of the stop (the templates still to stop, who depends
    on whom), the hurry flag, the deadline of adopted orphans and the
    callbacks to run once everything is down.  The manager's
    ``stopping`` flag is set here and never cleared.

    Callers may rely on: every template is stopped (its slots fed
    ``stop``), dependents before what they depend on; adopted orphans get
    the same grace, then SIGKILL; once no child of ours is left the
    applications stop and the callbacks run, exactly once.  A second
    ``begin`` hurries: what is left gets SIGKILL now.

    Called by ``Manager.stop`` (``begin``), by ``Reaper.on_exit``
    (``child_exited``), by the spawner (``hurry``) and by the daemon's
    last-resort exit path (``kill_orphans``).
    """

    def __init__(self, manager):
        self.manager, self.loop = manager, manager.loop
        self.hurry = False                  # a second stop request: no grace left
        self._started = None
        self._callbacks = []
        self._orphan_deadline = None
        self._to_stop = []                  # templates not stopped yet
        self._needed_by = {}                # template -> its dependents
        self._starts_given_up = False       # starts still out no longer hold the shutdown up

    def begin(self, callback=None):
        """Graceful shutdown: templates, then applications.  A second call
        skips the rest of every grace period."""
        m = self.manager
        if callback:
            self._callbacks.append(callback)
        if m.stopping:
            log.warning("second stop request: killing what is left now")
            self.hurry = m.groups_left.hurry = True
            for t in self._to_stop:
                m._stop(t)
            self._to_stop = []
            for proc in list(m._by_pid.values()) + m.spawner.in_flight:
                proc.kill(signal.SIGKILL)
            self.kill_orphans(signal.SIGKILL)
            self._give_up_starts()
            return
        m.stopping = True
        self._started = self.loop.time()
        self.loop.call_later(SHUTDOWN_START_WAIT, self._give_up_starts)
        self.kill_orphans(signal.SIGTERM)       # adopted orphans: same grace as the rest
        self._to_stop = list(m.templates.values())
        self._needed_by = self._dependents_map()
        self._stop_in_order()                   # dependents first
        self._check_stopped()

    def child_exited(self):
        """A child of ours was reaped during the shutdown: stop what no
        longer waits for a dependent, finish once none is left."""
        self._stop_in_order()
        self._check_stopped()

    def _stop_in_order(self):
        """Stop each template that no template still to stop or with a
        process left depends on, until every one is stopped.  Each waits
        for its dependents' exits (each within its own graceful_timeout,
        then SIGKILL), so the chain ends; if nothing can be stopped and
        only processes of templates still to stop are left (a cycle, made
        around the checks), the rest stop together."""
        m = self.manager
        while self._to_stop:
            pending = set(self._to_stop)
            live = {p.template for p in m._by_pid.values()}
            ready = [t for t in self._to_stop
                     if not any(d in pending or d in live for d in self._needed_by.get(t, ()))]
            if not ready:
                if live - pending:
                    return                              # wait for their exits
                ready = list(self._to_stop)
            for t in ready:
                self._to_stop.remove(t)
                m._stop(t)

    def _dependents_map(self) -> dict:
        """Template -> the templates that depend on it (directly or by its
        group)."""
        m = self.manager
        out = {t: [] for t in m.templates.values()}
        for d in m.templates.values():
            for dep, _ in d.spec.depends_on:
                for member in dependency_targets(dep, m.templates, m.groups):
                    t = m.templates[member]
                    if t is not d and d not in out[t]:
                        out[t].append(d)
        return out

    def _give_up_starts(self):
        """Starts still out (an exec that hangs: a dead network mount, a
        preexec step) no longer hold the shutdown up; their children, if
        they ever exec, are not stopped."""
        out = self.manager.spawner.in_flight
        if out and not self._starts_given_up:
            log.warning("shutdown: %d start(s) did not come back (%s); not waiting for them",
                        len(out), ", ".join(sorted({p.name for p in out})))
        self._starts_given_up = True
        if self.manager.stopping and self._orphan_deadline is None:
            self._check_stopped()

    def _check_stopped(self):
        if self.manager._by_pid or (self.manager.spawner.in_flight and
                                    not self._starts_given_up):
            return                  # (a start coming back during the stop calls child_exited)
        if self._orphan_deadline is None:
            # orphaned descendants adopted by us as subreaper had SIGTERM at
            # the start; they get at least 1 s, then SIGKILL
            if self.kill_orphans(signal.SIGTERM):
                when = self.loop.time() if self.hurry else max(
                    self.loop.time(), self._started + 1.0)
                self._orphan_deadline = self.loop.call_at(when, self._finish_orphans)
                return
        self._orphan_deadline = True
        self.loop.call_soon(self._stopped)

    def _finish_orphans(self, rounds=0):
        """SIGKILL what is left below the daemon, and look again until
        nothing is: a process forked between a look and the kill becomes
        ours only once its killed parent is gone."""
        if self.kill_orphans(signal.SIGKILL) and rounds < ORPHAN_KILL_ROUNDS:
            self._orphan_deadline = self.loop.call_later(
                ORPHAN_KILL_INTERVAL, self._finish_orphans, rounds + 1)
            return
        self._orphan_deadline = True
        self.loop.call_soon(self._stopped)

    def kill_orphans(self, signum) -> int:
        """Send ``signum`` to every adopted orphan and to everything below
        it (its children are not ours until it dies, and would be left
        running if it died last); returns how many live ones got it."""
        me = os.getpid()
        kids = children_map()
        todo = [pid for pid in kids.get(me, ()) if not self.manager._is_ours(pid)]
        seen, count = set(), 0
        while todo:
            pid = todo.pop()
            if pid in seen or pid == me:
                continue
            seen.add(pid)
            todo.extend(kids.get(pid, ()))
            fields = read_proc_stat(pid)
            if fields is None or fields[0] == b"Z":
                continue
            try:
                os.kill(pid, signum)
                count += 1
            except OSError:
                pass
        return count

    def _stopped(self):
        m = self.manager
        try:
            for app in m.apps:
                try:
                    app.stop()
                except Exception:
                    log.exception("application %r failed to stop", app)
            m.spawner.close_logs()
            m.log_writer.stop()
        finally:                                         # the daemon must exit, whatever failed
            callbacks, self._callbacks = self._callbacks, []
            for callback in callbacks:
                callback()


class Reaper:
    """What happens when a process of a Manager ends: its exit, or a
    failed exec that counts as one.

    Owns the accounting of exits (``t.exits``, ``t.restarts``,
    ``t.last_exit``, ``t.recent``), the crash lines in the log and their
    once-a-second summary in a storm (``t.storm``).

    Callers may rely on: ``on_exit`` frees the process's resources (pipes,
    stdin, custom streams, kill timer, readiness watches), feeds the exit
    to its slot, publishes ``exit``, runs the process's exit callbacks on
    a later iteration, has the orphans looked at, and during a shutdown
    tells ``Shutdown``; a process stopped alone is replaced.  The rest of
    its process group is ``GroupCleaner``'s, which the loop calls first,
    while the leader is still a zombie.  ``after_exit`` returns the table
    event the exit was classified as.

    Called by ``_ChildWatcher`` (``on_exit``, for the loop's reaper) and
    by ``Spawner.spawn`` (``after_exit`` with status 127 for a failed
    exec).
    """

    def __init__(self, manager):
        self.manager, self.loop = manager, manager.loop


    def on_exit(self, proc, exit_status, term_signal):
        self.loop.trimmer.touch()
        proc.exit_status = exit_status
        proc.core_dumped = bool(self.loop.core_dumped)
        self.manager._by_pid.pop(proc.pid, None)
        if proc.kill_handle is not None:
            proc.kill_handle.cancel()
        proc._drain()
        proc._close_stdin()
        proc.close_custom_streams()
        if proc.popen is not None:
            proc.popen.returncode = exit_status or -term_signal
        t = proc.template
        if proc in t.running:
            t.running.remove(proc)
        self.manager.running.pop(proc.id, None)
        t.recent.append(proc)
        uptime = self.loop.time() - proc.started
        event = self.after_exit(t, proc.slot, proc, exit_status, term_signal, uptime,
                                 proc.requested)
        for callback in proc._exit_callbacks:
            self.loop.call_soon(callback, proc)
        proc._exit_callbacks = []
        self.manager.orphans.scan_soon()        # what it left running is ours now
        if self.manager.stopping:
            self.manager.shutdown.child_exited()
        elif event == STOPPED_EVENT and self.manager._eligible(t):
            self.loop.call_soon(self.manager._manage, t)    # a process stopped alone is replaced

    _EXIT_REASONS = {STOPPED_EVENT: "stopped", EXIT_RESTART: "crashed",
                     EXIT_RETRY: "failed_start", EXIT_GIVE_UP: "gave_up"}

    def after_exit(self, t, slot, proc, exit_status, term_signal, uptime, asked) -> str:
        """Feed the exit (or failed exec) of ``proc`` to its slot; log it,
        count it and publish ``exit``.  Returns the table event."""
        before = slot.bucket
        try:
            event, actions = slot.exit(t.policy, exit_status, term_signal, uptime, asked,
                                       self.loop.time())
        except LifecycleError as exc:
            log.error("%s slot %d: %s; exit ignored (a bug in gafferd)", t.name, slot.index, exc)
            event, actions = None, ()
        if proc.watch:
            self.manager.lifecycle.unwatch(t, slot)
        if slot.proc is proc:
            slot.proc = None
        restart_in = slot.delay if A_SCHEDULE in actions else None
        reason = self._EXIT_REASONS.get(event) or ("succeeded" if slot.ok else "failed")
        t.exits[reason] += 1
        if event != STOPPED_EVENT:
            if reason != "succeeded":
                t.restarts += 1
            t.last_exit = {"id": proc.id, "os_pid": proc.pid, "exit_status": exit_status,
                           "term_signal": term_signal, "uptime": round(uptime, 3),
                           "time": self.loop.unix_time(self.loop.time())}
            self._log_exit(t, slot, proc, event, exit_status, term_signal, uptime, restart_in)
        if proc.pid is not None:
            self.manager._emit("exit", proc.name, pid=proc.id, exit_status=exit_status,
                       term_signal=term_signal, os_pid=proc.pid,
                       uptime=round(uptime, 3), restart_in=restart_in)
        if event is not None:
            self.manager.lifecycle.transitioned(t, slot, before, actions)
        return event

    def _log_exit(self, t, slot, proc, event, exit_status, term_signal, uptime, restart_in):
        """One line per exit nobody asked for (WARNING; INFO when the
        policy expected it), summarised once a second in a storm."""
        if event == EXIT_RESTART:
            next_step = "restarting in %.1fs" % restart_in
        elif event == EXIT_RETRY:
            next_step = "failed start %d, restarting in %.1fs" % (slot.failed_starts, restart_in)
        elif event == EXIT_GIVE_UP:
            next_step = "gave up after %d failed start%s" % (
                slot.failed_starts, "" if slot.failed_starts == 1 else "s")
        else:
            next_step = "not restarted (restart = %s)" % t.policy.restart
        level = logging.INFO if event == EXIT_DONE and slot.ok else logging.WARNING
        storm = t.storm
        now = self.loop.time()
        if now - storm[0] >= 1.0:
            storm[0], storm[1] = now, 0
        storm[1] += 1
        if storm[1] > STORM_LINES:
            storm[2] += 1
            if storm[3] is None:
                storm[3] = self.loop.call_later(1.0, self._summarize_storm, t)
            return
        if proc.pid is None:
            status = "exec failed"
        else:
            status = exit_text(exit_status, term_signal, getattr(proc, "core_dumped", False))
        log.log(level, "%s[%d] (pid %s, slot %d) %s after %.1fs up; %s", t.name, proc.id,
                proc.pid, slot.index, status, uptime, next_step)

    def _summarize_storm(self, t):
        storm = t.storm
        storm[3] = None
        if storm[2]:
            log.warning("%s: %d more exits in the last second", t.name, storm[2])
            storm[2] = 0


class ResourceWatch:
    """The ``max_memory`` / ``max_cpu`` watchdog of a Manager's processes.

    Owns the processes of templates with a limit, each with its last
    sample, and the one timer that samples them all every
    LIMIT_SAMPLE_INTERVAL: no template with a limit, no timer.  A sample
    reads the process tree (the process and its descendants, §4
    ``tree_usage``).  ``max_memory`` is exceeded when every sample for
    ``limit_for`` seconds is over it; ``max_cpu`` when the CPU used since
    the first sample over it, averaged over that window of at least
    ``limit_for`` seconds, stays over it.  Then ``limit_action`` runs
    (``LIMIT_ACTIONS``): ``restart`` replaces that process alone (its
    siblings are untouched), ``stop`` stops the template, ``log`` only
    logs, ``signal:NAME`` sends NAME to the process group; after ``log``
    and ``signal`` the limit must be exceeded for ``limit_for`` again.
    Each trip publishes ``limit`` (and ``proc.NAME.limit``) and is
    counted in ``trips`` (template name, limit) -> n, for /metrics.

    Called by ``Spawner.spawn`` (``watch``) and by the /metrics handler
    (``trips``)."""

    def __init__(self, manager):
        self.manager, self.loop = manager, manager.loop
        self.trips = collections.Counter()
        self._watched = {}          # Process -> [(time, cpu) last, memory over since, cpu window]
        self._round = []            # processes still to sample in this round
        self._timer = None          # the next round, or the rest of this one

    def watch(self, proc) -> None:
        """Sample ``proc`` from now on if its template sets a limit."""
        if not (proc.spec.max_memory or proc.spec.max_cpu):
            return
        self._watched[proc] = [(self.loop.time(), 0.0), None, None]
        if self._timer is None:
            self._timer = self.loop.call_later(LIMIT_SAMPLE_INTERVAL, self.sample)

    def sample(self) -> None:
        """Start a round: sample every watched process once, acting on the
        ones over a limit, LIMIT_SAMPLE_BUDGET seconds of it per loop
        iteration (a thousand trees take longer than the API may wait).
        The next round starts LIMIT_SAMPLE_INTERVAL after this one ends,
        so no process is read twice within that interval."""
        self._round = list(self._watched)
        self._go_on()

    def _go_on(self) -> None:
        self._timer = None
        end, running = self.loop.time() + LIMIT_SAMPLE_BUDGET, self.manager.running
        while self._round and self.loop.time() < end:
            proc = self._round.pop()
            state = self._watched.get(proc)
            if state is None:
                continue
            usage = tree_usage(proc.pid) if running.get(proc.id) is proc else None
            if usage is None:                      # gone, or being stopped
                del self._watched[proc]
                continue
            trip = self._judge(proc.spec, state, self.loop.time(), *usage)
            if trip is not None:
                self._trip(proc, state, *trip)
        if self._round:
            self._timer = self.loop.call_soon(self._go_on)
        elif self._watched:
            self._timer = self.loop.call_later(LIMIT_SAMPLE_INTERVAL, self.sample)

    @staticmethod
    def _judge(spec, state, now, rss, cpu):
        """``(limit key, measured value)`` if a limit is exceeded long
        enough, else None; updates ``state``."""
        (then, cpu_then), memory_since, window = state
        state[0] = (now, cpu)
        if spec.max_memory and rss > spec.max_memory:
            state[1] = memory_since = now if memory_since is None else memory_since
            if now - memory_since >= spec.limit_for:
                return "max_memory", rss
        else:
            state[1] = None
        if spec.max_cpu and now > then:
            if window is None and (cpu - cpu_then) * 100.0 / (now - then) > spec.max_cpu:
                state[2] = window = (then, cpu_then)        # the window opens at the last sample
            if window is not None:
                percent = (cpu - window[1]) * 100.0 / (now - window[0])
                if percent <= spec.max_cpu:
                    state[2] = None
                elif now - window[0] >= spec.limit_for:
                    return "max_cpu", round(percent, 1)
        return None

    def _trip(self, proc, state, limit, value):
        spec, t = proc.spec, proc.template
        action, signum = spec.limit_action
        self.trips[(t.name, limit)] += 1
        shown = human_size(value) if limit == "max_memory" else "%g%%" % value
        log.warning("%s[%d] (pid %s): %s %s over %s for %gs (limit_for); %s", proc.name,
                    proc.id, proc.pid, "memory" if limit == "max_memory" else "CPU", shown,
                    spec.settings.get(limit, getattr(spec, limit)), spec.limit_for,
                    spec.settings.get("limit_action", action))
        self.manager._emit("limit", proc.name, pid=proc.id, os_pid=proc.pid, limit=limit,
                           value=value, max=getattr(spec, limit), limit_for=spec.limit_for,
                           action=spec.settings.get("limit_action", action))
        state[1] = state[2] = None                 # log, signal: a full limit_for again
        if action == "restart":
            del self._watched[proc]
            self.manager._stop_one(proc, "stop_pid")     # replaced once it has exited
        elif action == "stop":
            del self._watched[proc]
            self.manager.stop_process(t.name)
        elif action == "signal":
            proc.kill(signum)


class GroupCleaner:
    """What a process leaves behind when it exits: the rest of its process
    group and, after a stop that was asked for, of its session.

    ``before_reap(proc, hurry)`` is called while the leader is a zombie
    (its group id cannot be reused yet); what is left gets SIGTERM and the
    rest of the grace period, then SIGKILL, as systemd does for the
    processes of a unit.  ``leaders`` (os pid -> Process, the manager's)
    tells a group of a live process of ours, never killed.
    ``session_ids`` lists (os pid, session id) of every process on the
    machine (``session_ids``; tests pass a counting one).
    """

    def __init__(self, loop, leaders, session_ids=session_ids):
        self.loop, self.leaders = loop, leaders
        self.session_ids = session_ids
        self.hurry = False                   # a second stop request: no grace left
        self._doomed_sessions = set()        # sessions to kill at the next scan

    def before_reap(self, proc):
        if proc.requested:
            deadline = proc.kill_deadline if not self.hurry else self.loop.time()
        else:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                return
            deadline = self.loop.time() + proc.spec.graceful_timeout
        self.loop.call_at(deadline, self._kill_group, proc.pid, proc.requested)

    def _kill_group(self, pgid, stopped):
        """SIGKILL what is left of a finished leader's process group and,
        after a stop that was asked for, of its session too (a grandchild
        may have moved to a group of its own)."""
        if pgid in self.leaders:
            return            # the number now leads a group of a new process of ours
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if stopped:
            if not self._doomed_sessions:
                # the deadlines of a stop of many processes are spread over
                # the time it took: one scan serves all that fall due soon
                self.loop.call_later(0 if self.hurry else SESSION_SCAN_DELAY,
                                     self._kill_sessions)
            self._doomed_sessions.add(pgid)

    def _kill_sessions(self):
        """One scan of /proc for every session whose deadline fell due in
        the last SESSION_SCAN_DELAY (a stop of many processes scans a few
        times, not N times)."""
        doomed, self._doomed_sessions = self._doomed_sessions, set()
        for pid, sid in self.session_ids():
            if sid in doomed and sid not in self.leaders:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass


class _ChildWatcher:
    """Bridges the loop's reaper to the manager for one process."""

    __slots__ = ("manager", "proc")

    def __init__(self, manager, proc):
        self.manager, self.proc = manager, proc

    def before_reap(self, pid):
        self.manager.groups_left.before_reap(self.proc)

    def __call__(self, pid, exit_status, term_signal):
        self.manager.reaper.on_exit(self.proc, exit_status, term_signal)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return "signal %d" % signum


class Orphans:
    """Processes the daemon adopted without starting them.

    gafferd is a child subreaper (PR_SET_CHILD_SUBREAPER; in a PID
    namespace it is init), so a descendant whose parent dies (the
    grandchild of a program that double-forked, a daemon it left behind)
    becomes the daemon's child.  The kernel says nothing when that
    happens, so the children are looked at after exits (coalesced, one
    look per ORPHAN_SCAN_DELAY) and whenever the API asks; each orphan
    found is logged with its command line, and each one reaped is logged
    with its exit status and counted.  A child a plugin started without
    ``loop.watch_child`` is indistinguishable from an orphan and is
    treated as one.

    Public: ``live`` (os pid -> {"os_pid", "cmdline", "seen"}, "seen" in
    loop time), ``reaped_total``, ``recent`` (the last RECENT_ORPHANS
    reaped, oldest first), ``scan()``, ``scan_soon()``.  The loop calls
    ``before_reap(pid)`` and ``__call__(pid, exit_status, term_signal)``
    for every child nobody watches.
    """

    def __init__(self, loop, is_ours):
        self.loop, self._is_ours = loop, is_ours
        self.live = collections.OrderedDict()
        self.reaped_total = 0
        self.recent = collections.deque(maxlen=RECENT_ORPHANS)
        self._scan_handle = None

    def scan(self) -> dict:
        """Record (and log) children that are not ours; returns ``live``."""
        for pid in child_pids(os.getpid()):
            if pid in self.live or self._is_ours(pid):
                continue
            fields = read_proc_stat(pid)
            if fields is None or fields[0] == b"Z":
                continue                  # about to be reaped: before_reap records it
            self._adopt(pid, read_cmdline(pid))
        return self.live

    def scan_soon(self):
        """One scan after ORPHAN_SCAN_DELAY, however many exits ask for it."""
        if self._scan_handle is None:
            self._scan_handle = self.loop.call_later(ORPHAN_SCAN_DELAY, self._scan_later)

    def _scan_later(self):
        self._scan_handle = None
        self.scan()

    def _adopt(self, pid, cmdline):
        entry = {"os_pid": pid, "cmdline": cmdline or "?", "seen": self.loop.time()}
        self.live[pid] = entry
        log.info("adopted orphan pid %d: %s", pid, entry["cmdline"])
        return entry

    def before_reap(self, pid):
        if pid not in self.live:          # it came and went between two looks
            self._adopt(pid, read_cmdline(pid))

    def __call__(self, pid, exit_status, term_signal):
        entry = self.live.pop(pid, None) or {"os_pid": pid, "cmdline": "?",
                                             "seen": self.loop.time()}
        self.reaped_total += 1
        self.recent.append(dict(entry, exit_status=exit_status, term_signal=term_signal,
                                reaped=self.loop.time()))
        log.info("reaped adopted orphan pid %d (%s): %s", pid, entry["cmdline"],
                 "killed by %s" % _signal_name(term_signal) if term_signal
                 else "exit status %d" % exit_status)
        self.scan_soon()                  # its own children are ours now


# LISTEN_PID must be the child's own pid, which exists only after the
# fork, and subprocess builds execve's environment before it: so the
# child runs /bin/sh, which sets it to its own pid ($$) and execs the
# program in the same process (argv[0] becomes the program's path).
_LISTEN_PID_TRAMPOLINE = 'LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@"'


def socket_activation(held, names, argv, executable, env):
    """The systemd socket-activation protocol for the sockets ``names``
    (held by ``held``, a HeldSockets): sets LISTEN_FDS and
    LISTEN_FDNAMES in ``env`` and returns ``(argv, executable, fds)``,
    the fds to put on 3, 4, ... in ``names`` order and the argv that sets
    LISTEN_PID.  SpawnError for a socket that is not held (any more)."""
    try:
        fds = held.fds(names) if held is not None else None
    except KeyError as exc:
        fds, names = None, [exc.args[0]]
    if fds is None:
        raise SpawnError("socket %s is not held by the daemon (no [socket:%s])"
                         % (names[0], names[0]))
    env.pop("LISTEN_PID", None)
    env.update(LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=":".join(names))
    return (["/bin/sh", "-c", _LISTEN_PID_TRAMPOLINE, executable] + list(argv[1:]),
            "/bin/sh", fds)


def _chain_preexec(first, custom_fds):
    """preexec_fn that puts custom stream fds on 3, 4, ... in label order.

    It runs in the child after the fork and before subprocess closes the
    fds not in ``pass_fds``; ``pass_fds`` must be exactly 3, 4, ... so
    that what survives is the stdio and the custom streams.  The fds are
    first moved above the target range, since one of them may already
    sit on a target number."""
    def preexec():
        if first is not None:
            first()
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 3 + len(custom_fds)) for fd in custom_fds]
        for index, fd in enumerate(high):
            os.dup2(fd, 3 + index)
            os.close(fd)
    return preexec


def _hold_fd_numbers(below: int) -> list:
    """Occupy every free fd number under ``below`` with /dev/null
    (close-on-exec); the caller closes the returned fds.

    Held during a spawn with custom streams, so that the pipe subprocess
    uses to report a failed exec cannot be given a number that
    ``_chain_preexec`` then overwrites in the child."""
    held = []
    try:
        while True:
            fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            if fd >= below:
                os.close(fd)
                return held
            held.append(fd)
    except OSError:                      # EMFILE: give the numbers back
        for fd in held:
            os.close(fd)
        raise


# § 9 HTTP client and webhooks (I/O) -------------------------------------------
# Owns: a small non-blocking HTTP/1.1 client (plain or TLS) with its own
# DNS lookup (IP literals, /etc/hosts, then a UDP query to the servers of
# /etc/resolv.conf), so that no getaddrinfo() ever blocks the loop; the
# ``tcp:`` and ``http:`` readiness checks, which it adds to
# ``Manager.READY_PROBES``; and
# the webhooks application: exact event names
# and ".", in-order delivery per URL, 3 attempts with back-off, a bounded
# queue.  Uses §1, §5, §7, §8 (ReadyPoller).  Plugins use ``http_request``.


def _hosts_lookup(host):
    try:
        with open("/etc/hosts") as f:
            for line in f:
                fields = line.split("#", 1)[0].split()
                if len(fields) > 1 and host.lower() in (h.lower() for h in fields[1:]):
                    return fields[0]
    except OSError:
        pass
    return None


def _nameservers():
    servers = []
    try:
        with open("/etc/resolv.conf") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 1 and fields[0] == "nameserver":
                    servers.append(fields[1])
    except OSError:
        pass
    return servers or ["127.0.0.1"]


def dns_query(host: str, qid: int) -> bytes:
    """An RFC 1035 query for the A record of ``host``."""
    question = b"".join(bytes([len(label)]) + label.encode("idna")
                        for label in host.rstrip(".").split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + question + struct.pack("!HH", 1, 1)


def dns_answer(data: bytes, qid: int):
    """IPv4 addresses in an RFC 1035 reply to query ``qid``."""
    if len(data) < 12:
        return []
    rid, flags, qd, an, _, _ = struct.unpack("!HHHHHH", data[:12])
    if rid != qid or flags & 0x000F:
        return []
    pos = 12

    def skip_name(pos):
        while pos < len(data):
            n = data[pos]
            if n & 0xC0 == 0xC0:
                return pos + 2
            if n == 0:
                return pos + 1
            pos += n + 1
        return pos
    for _ in range(qd):
        pos = skip_name(pos) + 4
    out = []
    for _ in range(an):
        pos = skip_name(pos)
        if pos + 10 > len(data):
            break
        rtype, _, _, length = struct.unpack("!HHIH", data[pos:pos + 10])
        pos += 10
        if rtype == 1 and length == 4:
            out.append(socket.inet_ntoa(data[pos:pos + 4]))
        pos += length
    return out


def resolve(loop, host, callback, timeout=5.0):
    """``callback(address or None, error)`` without blocking the loop."""
    try:
        ipaddress.ip_address(host)
        loop.call_soon(callback, host, None)
        return
    except ValueError:
        pass
    if host.lower() == "localhost":
        loop.call_soon(callback, "127.0.0.1", None)
        return
    address = _hosts_lookup(host)
    if address:
        loop.call_soon(callback, address, None)
        return
    _DnsLookup(loop, host, callback, timeout)


class _DnsLookup:
    def __init__(self, loop, host, callback, timeout):
        self.loop, self.host, self.callback = loop, host, callback
        self.qid = int.from_bytes(os.urandom(2), "big")
        self.sock = None
        self.servers = _nameservers()
        self.done = False
        try:
            self.sock = socket.socket(socket.AF_INET6 if ":" in self.servers[0] else socket.AF_INET,
                                      socket.SOCK_DGRAM)
            self.sock.setblocking(False)
            query = dns_query(host, self.qid)
            for server in self.servers[:3]:
                try:
                    self.sock.sendto(query, (server, 53))
                except OSError:
                    pass
        except (OSError, UnicodeError) as exc:
            self._finish(None, "cannot resolve %s: %s" % (host, exc))
            return
        loop.add_reader(self.sock.fileno(), self._on_reply)
        self.timer = loop.call_later(timeout, self._finish, None, "cannot resolve %s: timed out" % host)

    def _on_reply(self):
        try:
            data = self.sock.recv(4096)
        except OSError:
            return
        addresses = dns_answer(data, self.qid)
        self._finish(addresses[0] if addresses else None,
                     None if addresses else "cannot resolve %s" % self.host)

    def _finish(self, address, error):
        if self.done:
            return
        self.done = True
        if self.sock is not None:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.timer.cancel()
        self.callback(address, error)


class TcpConnect:
    """Resolve ``host`` without blocking, then connect to ``port`` without
    blocking: ``callback(sock, None)`` once connected (the non-blocking
    socket is the callback's, with no reader or writer left on it), or
    ``callback(None, error)``.  ``cancel()`` drops the attempt and closes
    its socket; the callback is not called then.  Serves the HTTP client
    and the ``tcp:`` readiness check."""

    def __init__(self, loop, host, port, callback, timeout=5.0):
        self.loop, self.host, self.port, self.callback = loop, host, port, callback
        self.sock, self.over = None, False
        resolve(loop, host, self._on_resolved, timeout)

    def _on_resolved(self, address, error):
        if self.over:
            return
        if address is None:
            self._finish(None, error)
            return
        try:
            self.sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET,
                                      socket.SOCK_STREAM)
            self.sock.setblocking(False)
            err = self.sock.connect_ex((address, self.port))
        except OSError as exc:
            self._finish(None, str(exc))
            return
        if err == errno.EINPROGRESS:
            self.loop.add_writer(self.sock.fileno(), self._on_connected)
        else:
            self._connected(err)

    def _on_connected(self):
        self._connected(self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))

    def _connected(self, err):
        if err:
            self._finish(None, "cannot connect to %s:%d: %s" % (self.host, self.port,
                                                                 os.strerror(err)))
            return
        self.loop.remove_writer(self.sock.fileno())
        sock, self.sock = self.sock, None
        self._finish(sock, None)

    def _finish(self, sock, error):
        if not self.over:
            self.cancel()
            self.callback(sock, error)

    def cancel(self):
        self.over = True
        if self.sock is not None:
            self.loop.remove_writer(self.sock.fileno())
            self.sock.close()
            self.sock = None


class _ClientRequest:
    """One HTTP request on the loop; see ``http_request``.  The socket
    callbacks only move bytes: the ResponseParser of §6 reads them."""

    MAX_RESPONSE = 4 << 20

    def __init__(self, loop, method, url, body, headers, timeout, callback, max_response=None):
        self.loop, self.callback = loop, callback
        self.parser = ResponseParser(method, self.MAX_RESPONSE if max_response is None
                                     else max_response)
        parts = urllib.parse.urlsplit(url)
        self.tls = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.tls else 80)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        body = body.encode("utf-8") if isinstance(body, str) else (body or b"")
        head = ["%s %s HTTP/1.1" % (method, path),
                "Host: %s" % (parts.netloc.rsplit("@", 1)[-1]),
                "Connection: close", "Content-Length: %d" % len(body),
                "User-Agent: gafferd/%s" % GAFFERD_VERSION]
        head.extend("%s: %s" % kv for kv in (headers or {}).items())
        self.out = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        self.sock = self.connect = None
        self.done = False
        self.timer = loop.call_later(timeout, self._fail, "timed out after %ss" % timeout)
        if parts.scheme not in ("http", "https") or not self.host:
            loop.call_soon(self._fail, "unsupported URL %r" % url)
        else:
            self.connect = TcpConnect(loop, self.host, self.port, self._on_connected)

    def _on_connected(self, sock, error):
        if sock is None:
            self._fail(error)
            return
        self.sock = sock
        if self.tls:
            try:
                context = load_ssl().create_default_context()
                self.sock = context.wrap_socket(self.sock, server_hostname=self.host,
                                                do_handshake_on_connect=False)
            except (ssl.SSLError, OSError) as exc:
                self._fail(str(exc))
                return
            self._watch(self._handshake, write=True)
        else:
            self._watch(self._send, write=True)

    def _watch(self, callback, write):
        fd = self.sock.fileno()
        self.loop.remove_reader(fd)
        self.loop.remove_writer(fd)
        (self.loop.add_writer if write else self.loop.add_reader)(fd, callback)

    def _handshake(self):
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._watch(self._handshake, write=False)
            return
        except ssl.SSLWantWriteError:
            self._watch(self._handshake, write=True)
            return
        except (ssl.SSLError, OSError) as exc:
            self._fail("TLS handshake with %s failed: %s" % (self.host, exc))
            return
        self._watch(self._send, write=True)

    def _send(self):
        try:
            n = self.sock.send(self.out)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return
        except OSError as exc:
            self._fail(str(exc))
            return
        self.out = self.out[n:]
        if not self.out:
            self._watch(self._recv, write=False)

    def _recv(self):
        while True:
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except OSError as exc:
                self._fail(str(exc))
                return
            try:
                if data:
                    self.parser.feed(data)
                else:
                    self.parser.feed_eof()
                response = self.parser.next()
            except ResponseError as exc:
                self._fail(exc.message)
                return
            if response is not None:
                self._close()
                self.callback(response.status, response.body, None)
                return
            if not data:
                self._fail("connection closed before a response")
                return

    def _fail(self, error):
        if self.done:
            return
        self._close()
        self.callback(0, b"", error)

    def cancel(self):
        """Drop the request; the callback is not called."""
        if not self.done:
            self._close()

    def _close(self):
        self.done = True
        self.timer.cancel()
        if self.connect is not None:
            self.connect.cancel()
        if self.sock is not None:
            fd = self.sock.fileno()
            if fd >= 0:
                self.loop.remove_reader(fd)
                self.loop.remove_writer(fd)
            self.sock.close()
            self.sock = None


def http_request(loop, method, url, body=b"", headers=None, timeout=20.0, callback=None,
                 max_response=None):
    """Send one HTTP(S) request without blocking; ``callback(status,
    body, error)`` gets status 0 and an error string on failure (a
    response body over ``max_response`` bytes, 4 MB by default, a head
    over 16 KB and a response cut short are failures).
    Returns the request, whose ``cancel()`` drops it."""
    return _ClientRequest(loop, method, url, body, headers, timeout,
                          callback or (lambda status, body, error: None), max_response)


# -- readiness checks that need the resolver or the client -------------------
class _TcpAttempt:
    """One ``tcp:[HOST:]PORT`` check: ``done(connected)``, the socket
    closed at once either way (the ReadyPoller bounds how long it may
    take)."""

    def __init__(self, loop, host, port, limit, done):
        self.done = done
        self.connect = TcpConnect(loop, host, port, self._on_connected, limit)

    def _on_connected(self, sock, error):
        if sock is not None:
            sock.close()
        self.done(sock is not None)

    def cancel(self):
        self.connect.cancel()


def _ready_on_tcp(manager, t, slot, proc):
    host, port = t.spec.ready.arg
    proc.watch.append(ReadyPoller(manager, proc, lambda done: _TcpAttempt(
        manager.loop, host, port, max(t.spec.ready_interval, READY_ATTEMPT_MIN), done)))


def _ready_on_http(manager, t, slot, proc):
    """A GET that answers 2xx; at most READY_HTTP_MAX bytes of answer and
    the ReadyPoller's time limit, so a server that trickles bytes for ever
    costs one bounded attempt after another."""
    url, limit = t.spec.ready.arg, max(t.spec.ready_interval, READY_ATTEMPT_MIN)
    proc.watch.append(ReadyPoller(manager, proc, lambda done: http_request(
        manager.loop, "GET", url, timeout=limit, max_response=READY_HTTP_MAX,
        callback=lambda status, body, error: done(200 <= status < 300))))


Manager.READY_PROBES.update(tcp=_ready_on_tcp, http=_ready_on_http)


class EventApplication:
    """An application (``start(loop, manager)``, ``stop()``,
    ``restart()``) that is fed every event: ``start`` subscribes
    ``self._on_event(event, payload)`` to ".", ``stop`` unsubscribes it,
    ``restart`` has nothing to do.  Webhooks and the console output."""

    loop = manager = None

    def start(self, loop, manager):
        self.loop, self.manager = loop, manager
        manager.subscribe(".", self._on_event)

    def restart(self):
        pass

    def stop(self):
        if self.manager is not None:
            self.manager.unsubscribe(".", self._on_event)


class Webhooks(EventApplication):
    """POST each matching manager event, as JSON, to its URLs.

    A hook fires on an exact event name or on ".".  Each URL has its own
    FIFO queue and at most one request in flight, so deliveries to one
    URL keep their order.  A failed delivery is retried twice, after 1 s
    and 2 s, then dropped with an error line.  A queue keeps at most
    WEBHOOK_QUEUE events (the oldest is dropped with a warning).
    """

    def __init__(self, hooks):
        self.loop = self.manager = None
        self.configure(hooks)
        self.queues = collections.OrderedDict()        # url -> deque of [body, attempts]
        self.busy = set()
        self.delivered = self.failed = self.dropped = 0
        self._on_idle = None

    def configure(self, hooks):
        self.hooks = collections.defaultdict(list)
        for event, url in hooks:
            if url not in self.hooks[event]:
                self.hooks[event].append(url)

    def drain(self, callback):
        """Call ``callback`` once every queue is empty, or after
        SHUTDOWN_DRAIN seconds, whichever comes first."""
        if not any(self.queues.values()) or self.loop is None:
            callback()
            return
        self._on_idle = callback
        self.loop.call_later(SHUTDOWN_DRAIN, self._idle)

    def _idle(self):
        callback, self._on_idle = self._on_idle, None
        if callback:
            pending = sum(len(q) for q in self.queues.values())
            if pending:
                log.warning("shutdown: %d webhook deliveries dropped", pending)
            callback()

    def _on_event(self, name, payload):
        urls = self.hooks.get(name, []) + [u for u in self.hooks.get(".", [])
                                           if u not in self.hooks.get(name, [])]
        if not urls:
            return
        body = json_dumps(payload)
        for url in urls:
            queue = self.queues.setdefault(url, collections.deque())
            if len(queue) >= WEBHOOK_QUEUE:
                queue.popleft()
                self.dropped += 1
                log.warning("webhook %s: queue full, oldest event dropped", url)
            queue.append([body, 0])
            if url not in self.busy:
                self._send(url)

    def _send(self, url):
        queue = self.queues.get(url)
        if not queue:
            self.busy.discard(url)
            if self._on_idle and not any(self.queues.values()):
                self._idle()
            return
        self.busy.add(url)
        http_request(self.loop, "POST", url, queue[0][0],
                     {"Content-Type": "application/json"}, WEBHOOK_TIMEOUT,
                     lambda status, body, error: self._done(url, status, error))

    def _done(self, url, status, error):
        queue = self.queues[url]
        if 200 <= status < 300:
            queue.popleft()
            self.delivered += 1
            self._send(url)
            return
        entry = queue[0]
        entry[1] += 1
        reason_text = error or "HTTP %d" % status
        if entry[1] >= WEBHOOK_ATTEMPTS:
            queue.popleft()
            self.failed += 1
            log.error("webhook %s: giving up after %d attempts (%s)", url, entry[1], reason_text)
            self._send(url)
        else:
            log.warning("webhook %s: attempt %d failed (%s); retrying in %ds",
                        url, entry[1], reason_text, 2 ** (entry[1] - 1))
            self.loop.call_later(2 ** (entry[1] - 1), self._send, url)


# § 10 plugins ---------------------------------------------------------------
# Owns: the ``Plugin`` base class, discovery of plugin directories (see
# docs/plugins.md), mandatory dependencies, the wrapper that keeps a
# failing plugin from hurting the daemon, and finding a plugin's static
# site.  Uses §1-§8.  Used by the HTTP API (§11) and main() (§15).
#
# The plugin API, all in one place (its version is PLUGIN_API_VERSION):
#   class Plugin: name, api, version, description, mandatory, app(cfg)
#   the application app(cfg) returns: start(loop, manager), stop(),
#       restart(); optional routes() -> [(method, regex, handler)] served
#       under /_plugin/<dir>/api/<regex>, handler(request, *groups) ->
#       (status, body); optional metrics() -> [Prometheus text lines].
#   loop: see the module docstring; manager: see ``Manager``.


# The version of the contract between the daemon and its plugins: the
# Plugin attributes, the application's methods, the routes' handler
# signature, and the loop and manager APIs they are given.  A change a
# plugin written for an older version could trip on gets a new number;
# the daemon keeps serving the old numbers it still can, listed in
# PLUGIN_API_VERSIONS, and refuses (logs and skips) a plugin that asks
# for any other.
PLUGIN_API_VERSION = 1
PLUGIN_API_VERSIONS = (1,)


class Plugin:
    """Base class of plugins: list subclasses in a module's ``__all__``.

    ``name`` must be set (it is what ``mandatory`` lists refer to).
    ``api`` is the plugin contract version the plugin was written for
    (PLUGIN_API_VERSION when it was written; gaffer 0.4.4 plugins, which
    do not set it, get 1).  A version not in PLUGIN_API_VERSIONS makes
    discovery log one error naming the plugin and the versions supported,
    and skip the plugin; the daemon goes on.
    ``app(cfg)`` returns an application object or None; ``cfg`` is the
    daemon's configparser (plugins read their own sections from it), or
    None when the daemon runs without a config file.
    """

    name = ""
    api = 1
    version = "?"
    description = ""
    mandatory = []

    def app(self, cfg):
        return None


def install_import_aliases():
    """Make ``from gafferd import Plugin`` and ``from gaffer import Plugin``
    give this very module's class, also when it runs as a script or under
    a wrapper such as ``python -m cProfile`` (else a plugin's subclass check fails)."""
    module = sys.modules.get(__name__)
    if getattr(module, "Plugin", None) is not Plugin:
        module = types.ModuleType("gafferd", __doc__)
        module.__dict__.update(globals())
    if getattr(sys.modules.get("gafferd"), "Plugin", None) is not Plugin:
        sys.modules["gafferd"] = module
    if getattr(sys.modules.get("gaffer"), "Plugin", None) is not Plugin:
        shim = types.ModuleType("gaffer", "compatibility alias for gaffer 0.4.4 plugins")
        shim.Plugin = Plugin
        shim.__version__ = __version__
        sys.modules["gaffer"] = shim


class PluginDir:
    """One directory under a plugins root, with the plugins found in it."""

    def __init__(self, root, dirname):
        self.root, self.dirname = root, dirname
        self.path = os.path.join(root, dirname)
        self.plugins = []
        self.refused = []          # plugins skipped for their contract version

    def site_root(self):
        """``_site/``, or the directory itself when it has an index.html
        and no plugin class, as gaffer 0.4.4 chose; looked up on every request,
        so sites added while the daemon runs are served."""
        site = os.path.join(self.path, "_site")
        if os.path.isdir(site):
            return site
        if not self.plugins and not self.refused and \
                os.path.isfile(os.path.join(self.path, "index.html")):
            return self.path
        return None


class PluginApp:
    """Wraps a plugin's application so its failures are logged with the
    plugin's name and never reach the daemon."""

    def __init__(self, plugin, pdir, app):
        self.plugin, self.pdir, self.app = plugin, pdir, app
        self.routes = []
        self.failed = False

    def __repr__(self):
        return "plugin %r (dir %r)" % (self.plugin.name, self.pdir.dirname)

    def _call(self, what, *args):
        method = getattr(self.app, what, None)
        if method is None:
            return None
        try:
            return method(*args)
        except Exception:
            log.exception("%r: %s() failed", self, what)
            if what == "start":
                self.failed = True
            return None

    def start(self, loop, manager):
        self._call("start", loop, manager)
        if self.failed:
            return
        routes = self._call("routes") or []
        for route in routes:
            try:
                method, pattern, handler = route
                self.routes.append((method.upper(), re.compile(pattern), handler))
            except (TypeError, ValueError, re.error) as exc:
                log.error("%r: bad route %r: %s", self, route, exc)

    def stop(self):
        if not self.failed:
            self._call("stop")

    def restart(self):
        if not self.failed:
            self._call("restart")

    def metrics(self):
        if self.failed:
            return []
        return self._call("metrics") or []


class Plugins:
    """Discovery and bookkeeping of every plugin directory."""

    def __init__(self, roots):
        self.roots = [r for r in roots if r]
        self.dirs = collections.OrderedDict()          # dirname -> PluginDir
        self.apps = []                                 # PluginApp

    def discover(self):
        for root in self.roots:
            if not os.path.isdir(root):
                continue
            for dirname in sorted(os.listdir(root)):
                path = os.path.join(root, dirname)
                if dirname.startswith((".", "_")) or not os.path.isdir(path):
                    continue
                if dirname in self.dirs:
                    log.warning("plugin directory %s shadowed by %s", path, self.dirs[dirname].path)
                    continue
                pdir = self.dirs[dirname] = PluginDir(root, dirname)
                self._scan(pdir)

    def find_dir(self, dirname):
        """The PluginDir for ``dirname``, also one created after start-up."""
        pdir = self.dirs.get(dirname)
        if pdir is None and dirname and not dirname.startswith((".", "_")) and "/" not in dirname:
            for root in self.roots:
                if os.path.isdir(os.path.join(root, dirname)):
                    return PluginDir(root, dirname)
        return pdir

    def _scan(self, pdir):
        for package in sorted(os.listdir(pdir.path)):
            pkg_path = os.path.join(pdir.path, package)
            if package.startswith((".", "_")) or \
                    not os.path.isfile(os.path.join(pkg_path, "__init__.py")):
                continue
            for module in self._import_package(pdir, package, pkg_path):
                for attr in getattr(module, "__all__", ()):
                    obj = getattr(module, attr, None)
                    if not (isinstance(obj, type) and issubclass(obj, Plugin)) or obj is Plugin:
                        continue
                    try:
                        plugin = obj()
                    except Exception:
                        log.exception("plugin class %s.%s (dir %r) failed to instantiate; "
                                      "skipped", module.__name__, attr, pdir.dirname)
                        continue
                    if not getattr(plugin, "name", ""):
                        log.error("plugin class %s.%s (dir %r) has no name; skipped",
                                  module.__name__, attr, pdir.dirname)
                        continue
                    if not self._supported(plugin, pdir):
                        pdir.refused.append(plugin)
                        continue
                    if all(type(p) is not obj for p in pdir.plugins):
                        pdir.plugins.append(plugin)

    @staticmethod
    def _supported(plugin, pdir) -> bool:
        """Whether the plugin's ``api`` is a contract version this daemon
        serves; if not, say so in one line (the plugin is then skipped)."""
        api = getattr(plugin, "api", 1)
        if type(api) is int and api in PLUGIN_API_VERSIONS:
            return True
        log.error("plugin %r (dir %r) is written for plugin API version %r; this gafferd "
                  "supports version%s %s; plugin skipped", plugin.name, pdir.dirname, api,
                  "" if len(PLUGIN_API_VERSIONS) == 1 else "s",
                  ", ".join(str(v) for v in PLUGIN_API_VERSIONS))
        return False

    def _import_package(self, pdir, package, pkg_path):
        """Import ``package`` and its top-level modules; a package name
        already taken by another directory gets a private name."""
        modname = package
        existing = sys.modules.get(package)
        if existing is not None and os.path.dirname(os.path.abspath(
                getattr(existing, "__file__", "") or "")) != os.path.abspath(pkg_path):
            modname = "gafferd_plugin_%s_%s" % (re.sub(r"\W", "_", pdir.dirname), package)
        modules = []
        try:
            if modname not in sys.modules:
                spec = importlib.util.spec_from_file_location(
                    modname, os.path.join(pkg_path, "__init__.py"),
                    submodule_search_locations=[pkg_path])
                mod = importlib.util.module_from_spec(spec)
                sys.modules[modname] = mod
                try:
                    spec.loader.exec_module(mod)
                except BaseException:
                    del sys.modules[modname]
                    raise
            modules.append(sys.modules[modname])
        except Exception:
            log.exception("plugin package %s (dir %r) failed to import; skipped",
                          pkg_path, pdir.dirname)
            return []
        for filename in sorted(os.listdir(pkg_path)):
            if not filename.endswith(".py") or filename == "__init__.py":
                continue
            name = "%s.%s" % (modname, filename[:-3])
            try:
                modules.append(importlib.import_module(name))
            except Exception:
                log.exception("plugin module %s (dir %r) failed to import; skipped",
                              os.path.join(pkg_path, filename), pdir.dirname)
        return modules

    def installed(self):
        return {p.name for pdir in self.dirs.values() for p in pdir.plugins}

    def missing_mandatory(self):
        """One line per unmet dependency."""
        installed = self.installed()
        out = []
        for pdir in self.dirs.values():
            for plugin in pdir.plugins:
                for dep in getattr(plugin, "mandatory", None) or ():
                    if dep not in installed:
                        out.append("plugin %r (dir %r) requires %r, which is not installed"
                                   % (plugin.name, pdir.dirname, dep))
        return out

    def make_apps(self, cfg):
        for pdir in self.dirs.values():
            for plugin in pdir.plugins:
                try:
                    app = plugin.app(cfg)
                except Exception:
                    log.exception("plugin %r (dir %r): app() failed; skipped",
                                  plugin.name, pdir.dirname)
                    continue
                if app is not None:
                    self.apps.append(PluginApp(plugin, pdir, app))
        return self.apps

    def routes_for(self, dirname):
        for app in self.apps:
            if app.pdir.dirname == dirname and not app.failed:
                for route in app.routes:
                    yield route


# § 11 HTTP API -----------------------------------------------------------------
# Owns: the route table (gaffer 0.4.4's routes plus /status, /metrics, /reload and
# _log) and one handler per route.  A handler gets the Request and the
# percent-decoded path parameters and returns a ``Reply`` (status, body),
# a ``Feed`` (a streaming reply the server opens with a sink; ``open_feed``
# wires every one), an ``Upgrade`` (a websocket), or a ``StaticFile`` (the
# server reads it).  Client mistakes raise ApiError.  Handlers are
# thin: every decision lives in the Manager (§8).  Uses §1-§10.  Used by
# the HTTP server (§12), which adds framing, security and error replies.


class Reply:
    """A whole response: status, body bytes, content type, extra headers."""

    __slots__ = ("status", "body", "content_type", "headers")

    def __init__(self, status, body=b"", content_type=None, headers=None):
        self.status, self.body = status, body
        self.content_type, self.headers = content_type, list(headers or [])


def json_reply(status, obj, headers=None) -> Reply:
    """Dict replies say charset=UTF-8, list replies do not, as in gaffer 0.4.4."""
    ctype = "application/json" if isinstance(obj, list) else "application/json; charset=UTF-8"
    return Reply(status, json_dumps(obj), ctype, headers)


OK = {"ok": True}


class Feed:
    """A streaming reply.  The server sends the head, then calls
    ``opener(sink)`` once, at once, on the loop.  The sink offers:

        write(bytes)       queue bytes (framed as a chunk on HTTP/1.1);
                           ignored once closed
        end()              the last chunk; the connection goes on with
                           pipelined requests or closes
        closed             True once ended or the client went away
        on_close(cb)       cb() once when the sink closes, whoever closes
                           it (at once if it is closed already)
        producer           a Process to pause while the client lags
                           (None: a lagging client is dropped)

    ``open_feed`` wires a sink to its sources; an exception the opener
    raises is logged and ends the feed.
    """

    def __init__(self, content_type, opener, headers=None):
        self.status = 200
        self.content_type, self.opener = content_type, opener
        self.headers = [("Cache-Control", "no-cache")] + list(headers or [])


class StaticFile:
    """A file to serve from a directory tree: ``path`` (the URL path
    after the tree's prefix, percent-decoded) under ``root``.  The server
    (§12, ``serve_file``) resolves and reads it, so the rules that keep a
    reply inside ``root`` live in one place."""

    __slots__ = ("root", "path")

    def __init__(self, root, path):
        self.root, self.path = root, path


class Upgrade:
    """A websocket reply: after the handshake the server calls
    ``opener(ws)``; ``ws`` offers ``send_text(str)``, ``send_binary(bytes)``,
    ``close(code=1000, reason="")``, ``on_message(cb(opcode, payload))``,
    ``on_close(cb)``, ``closed`` and ``producer``, as a Feed's sink does.
    Messages reach ``on_message`` whole, text ones checked to be UTF-8;
    pings are answered by the server.  An exception the opener raises is
    logged and closes the websocket with 1011."""

    def __init__(self, opener):
        self.opener = opener


_FEED_TYPES = {"eventsource": "text/event-stream"}

# (path regex, {method: handler name}); first match wins: digits-only ids before names.
ROUTES = [
    (r"/", {"GET": "welcome"}),
    (r"/ping", {"GET": "ping"}),
    (r"/ready", {"GET": "ready"}),
    (r"/ready/([^/]+)", {"GET": "ready_template"}),
    (r"/status", {"GET": "status_all"}),
    (r"/metrics", {"GET": "metrics"}),
    (r"/reload", {"POST": "reload"}),
    (r"/orphans", {"GET": "orphans"}),
    (r"/processes", {"GET": "list_templates", "POST": "create_template"}),
    (r"/processes/(\d+)", {"HEAD": "head_process", "GET": "get_process",
                           "DELETE": "delete_process"}),
    (r"/processes/([^/]+)", {"HEAD": "head_template", "GET": "get_template",
                             "PUT": "update_template", "POST": "update_template",
                             "DELETE": "delete_template"}),
    (r"/processes/(\d+)/(_[^/]+)(?:/(.*))?", {"POST": "process_action"}),
    (r"/processes/([^/]+)/(_[^/]+)(?:/(.*))?", {"GET": "template_query",
                                               "POST": "template_action"}),
    (r"/status/([^/]+)", {"GET": "status"}),
    (r"/watch(?:/([^/]+))?(?:/([^/]+))?(?:/([^/]+))?", {"GET": "watch"}),
    (r"/stats", {"GET": "stats_all"}),
    (r"/stats/([^/]+)", {"GET": "stats_template"}),
    (r"/stats/([^/]+)/([^/]+)", {"GET": "stats_process"}),
    (r"/streams/([^/]+)/([^/]+)", {"GET": "stream", "POST": "write_stream"}),
    (r"/wstreams/([^/]+)", {"GET": "wstream"}),
    (r"/groups", {"GET": "list_groups"}),
    (r"/groups/([^/]+)", {"GET": "group", "POST": "group_no_action",
                          "DELETE": "delete_group"}),
    (r"/groups/([^/]+)/([^/]+)", {"GET": "group_action", "POST": "group_action",
                                  "DELETE": "group_action"}),
    (r"/_plugin/([^/]+)/api/(.*)", {"*": "plugin_api"}),
    (r"/_plugin/([^/]+)(/.*)", {"GET": "plugin_site"}),
]
NO_OPTIONS = {"wstream", "plugin_site", "plugin_api"}


def _asked_by(req) -> str:
    """Who made a request, for the log: the API and the client's address."""
    remote = req.remote
    if isinstance(remote, tuple) and len(remote) >= 2:
        where = ("[%s]:%s" if ":" in str(remote[0]) else "%s:%s") % (remote[0], remote[1])
    else:
        where = "a unix socket"
    return "the API (%s %s from %s)" % (req.method, req.path, where)


def parse_signal(text) -> int:
    """A signal number, or a name such as HUP or SIGHUP."""
    if text is None or not str(text).strip():
        raise ApiError(400, "no_signal_number", "give a signal: _signal/15 or _signal/TERM")
    text = str(text)
    if is_ascii_digits(text):
        number = int(text)
    else:
        name = text.upper() if text.upper().startswith("SIG") else "SIG" + text.upper()
        number = getattr(signal.Signals, name, None) if name.isidentifier() else None
        if number is None:
            raise ApiError(400, "bad_value", "%r is not a signal" % text)
        number = int(number)
    if not 1 <= number < signal.NSIG:
        raise ApiError(400, "bad_value", "%r is not a valid signal number" % text)
    return number


def parse_number(name, text, parse=parse_int, range_name=None):
    """A number from a query parameter or a path: ``parse`` (parse_int or
    parse_float: ASCII digits only) within ``RANGES[range_name or name]``.
    Anything else is ApiError 400 bad_value naming ``name`` and the range."""
    minimum, maximum = RANGES[range_name or name]
    try:
        return parse(text, minimum, maximum)
    except ValueError:
        raise ApiError(400, "bad_value", "%s must be %s from %s to %s, not %r" % (
            name, "a whole number" if parse is parse_int else "a number of seconds",
            *("%g" % n if isinstance(n, float) else n for n in (minimum, maximum)),
            text)) from None


def parse_heartbeat(value):
    """``true`` = 60 s; ``false``/``0``/empty = none (gaffer 0.4.4 gave 500 on empty);
    otherwise seconds within RANGES["heartbeat"] (at least 0.05)."""
    if value is None:
        return HEARTBEAT_DEFAULT
    text = value.lower()
    if text in ("true", "yes", "on"):
        return HEARTBEAT_DEFAULT
    if text in ("", "false", "no", "off"):
        return None
    seconds = parse_number("heartbeat", text, parse_float)
    return max(seconds, 0.05) if seconds else None


def _metric_labels(**labels) -> str:
    if not labels:
        return ""
    return "{%s}" % ",".join('%s="%s"' % (k, str(v).replace("\\", "\\\\").replace(
        '"', '\\"').replace("\n", "\\n")) for k, v in labels.items())


_EVENT_CACHE = [None, None, b""]      # (payload, mode, bytes) of the last event


def format_event(name, payload, mode, event_id=None) -> bytes:
    """A watch event as sent on ``mode`` (with its bus id as the SSE
    ``id:``); the bus hands the same payload to every subscriber in turn,
    so each event is encoded once, not once per client."""
    if _EVENT_CACHE[0] is payload and _EVENT_CACHE[1] == (mode, event_id):
        return _EVENT_CACHE[2]
    data = json_dumps(payload)
    out = sse_event(name, [data.decode("utf-8")], event_id) if mode == "eventsource" \
        else data + b"\r\n"
    _EVENT_CACHE[:] = [payload, (mode, event_id), out]
    return out


def parse_last_event_id(req):
    """The ``Last-Event-ID`` header (or ``last_event_id`` query parameter)
    as a whole number, None when absent or empty (an EventSource sends none
    before its first id); anything but ASCII digits within
    RANGES["last_event_id"] is a 400 naming ``last_event_id``."""
    value = req.headers.get("last-event-id") or req.query.get("last_event_id") or ""
    if not value:
        return None
    return parse_number("last_event_id", value)


def watch_backlog(bus, pattern, last_id) -> bytes:
    """The events of ``pattern`` delivered after ``last_id``, as SSE.  When
    some are no longer kept, a ``missed`` event comes first: its data is
    ``{"event": "missed", "missed": N}`` (N counts the events lost, of every
    pattern; null for an id from an earlier run of the daemon)."""
    missed, events = bus.since(last_id)
    out = []
    if missed != 0:
        before = events[0][0] - 1 if events else bus.last_id
        out.append(sse_event("missed", [json_dumps({"event": "missed", "missed": missed})
                                        .decode("utf-8")], before))
    wanted = normalize_pattern(pattern)
    for event_id, name, payload in events:
        if wanted in event_patterns(name):
            out.append(format_event(name, payload, "eventsource", event_id))
    return b"".join(out)


class _Heartbeat:
    """Writes ``beat`` to a sink every ``interval`` seconds."""

    def __init__(self, loop, sink, interval, beat):
        self.loop, self.sink, self.interval, self.beat = loop, sink, interval, beat
        self.handle = loop.call_later(interval, self._tick) if interval else None

    def _tick(self):
        if not self.sink.closed:
            self.sink.write(self.beat)
            self.handle = self.loop.call_later(self.interval, self._tick)

    def cancel(self):
        if self.handle is not None:
            self.handle.cancel()


def feed_message(sink, mode, data):
    """Write one message of a feed in ``mode``: a long-poll feed (any
    mode but ``eventsource`` and ``continuous``) ends after its first."""
    sink.write(data)
    if mode not in ("eventsource", "continuous"):
        sink.end()


def open_feed(loop, sink, subscriptions=(), processes=(), end=None, mode=None,
              heartbeat=None, producer=None):
    """Wire an opened feed or websocket to its sources, with one clean-up.

    sink           a Feed's sink or an Upgrade's websocket (see ``Feed``,
                   ``Upgrade``): anything with ``on_close(cb)``, and with
                   ``write`` and ``closed`` when ``heartbeat`` is given.
    subscriptions  (subscribe, unsubscribe, args) triples: ``subscribe(*args)``
                   is called now, in order, ``unsubscribe(*args)`` once the
                   sink closes.
    processes      the processes the feed follows: when the last of them has
                   exited (after its last output), ``end()`` is called.
    end            how the feed ends; default ``sink.end``.
    mode, heartbeat
                   every ``heartbeat`` seconds (None: never) a keep-alive is
                   written: an SSE comment (``:``) in ``eventsource`` mode,
                   a bare newline otherwise.
    producer       the Process whose output is paused while the client
                   lags (see ``Connection._throttle``); None: a lagging
                   client is dropped instead.

    A caller may rely on this: whoever closes the sink (the client, the
    feed's own end, the daemon), every subscription, exit callback and
    timer made here is undone exactly once, and nothing is written to
    the sink after it closed.  A sink already closed is cleaned up at
    once.  Returns nothing; exceptions from ``subscribe`` travel (the
    server ends the feed and logs them).
    """
    sink.producer = producer
    for subscribe, _, args in subscriptions:
        subscribe(*args)
    end = sink.end if end is None else end
    remaining = {id(proc) for proc in processes}

    def gone(proc):
        remaining.discard(id(proc))
        if not remaining:
            end()
    for proc in processes:
        proc.on_exit(gone)
    beat = _Heartbeat(loop, sink, heartbeat, b":\n" if mode == "eventsource" else b"\n") \
        if heartbeat else None

    def cleanup():
        if beat is not None:
            beat.cancel()
        for _, unsubscribe, args in subscriptions:
            unsubscribe(*args)
        for proc in processes:
            proc.remove_exit_callback(gone)
    sink.on_close(cleanup)


class Api:
    """The route handlers: one method per handler name in ROUTES.

    Api(manager, plugins=None, reload=None): ``plugins`` is the Plugins
    registry (§10) or None; ``reload(dry_run, who) -> dict`` re-reads the
    config (main(), §15), None when the daemon has no config file.

    Methods for the caller (the HTTP server, §12):
        dispatch(req) -> Reply | Feed | Upgrade | StaticFile
            ``req`` is a parsed Request (§6) whose ``remote`` and
            ``endpoint`` the server has set.  HEAD is routed as GET (the
            server drops the body); OPTIONS is answered with 204 and
            ``Allow`` except on the NO_OPTIONS routes.  Raises ApiError
            for a client's mistake (404 no such route, 405 with ``Allow``,
            400 a bad parameter, 409 a conflict, ...), which the server
            turns into a JSON error reply; any other exception is a bug,
            logged by the server and answered with a 500.
        match(path) -> (methods, params)
            the first ROUTES row whose regex matches the whole path; the
            params are percent-decoded (strict UTF-8), None for an
            optional group that did not match.

    What a caller may rely on:
      * A handler never touches a socket: it returns what to send.  It
        runs on the loop's thread and never waits for the network or a
        child; a StaticFile is read by the server, not here.
      * Every change of state goes through the Manager's public methods
        (§8); a handler keeps no state of its own between requests, but
        for ``status_all``'s last body, sent again while the status it
        was made from is equal to the new one (encoding it was a sixth
        of a ``GET /status``'s Python).
      * A Feed's or an Upgrade's opener is called once, right after the
        head went out; everything it subscribes to is undone when the
        client goes (``open_feed``).

    Instance variables: ``manager``, ``plugins``, ``loop`` (the manager's),
    ``reload_config``, and ``server``, the HttpServer (set by it; None
    until then), whose request counters /metrics reports.
    """

    def __init__(self, manager, plugins=None, reload=None):
        self.manager, self.plugins, self.reload_config = manager, plugins, reload
        self.loop = manager.loop
        self.server = None
        self.routes = [(re.compile(pattern), methods) for pattern, methods in ROUTES]
        self._status_body = (None, b"")         # (status dict, its JSON)

    # -- dispatch -------------------------------------------------------------------
    def match(self, path):
        """(handler name or None, methods, params) for ``path``."""
        for regex, methods in self.routes:
            m = regex.fullmatch(path)
            if m:
                try:
                    params = [urllib.parse.unquote(g, errors="strict") if g is not None else None
                              for g in m.groups()]
                except UnicodeDecodeError:
                    if path.startswith("/_plugin/"):
                        raise ApiError(404, "not_found", "no such file") from None
                    raise ApiError(400, "bad_request", "path is not UTF-8") from None
                return methods, params
        raise ApiError(404, "not_found", "no such resource: %s" % path)

    def dispatch(self, req):
        methods, params = self.match(req.path)
        if "*" in methods:
            return getattr(self, methods["*"])(req, *params)
        allowed = sorted(set(methods) | ({"HEAD"} if "GET" in methods else set()) |
                         (set() if NO_OPTIONS & set(methods.values()) else {"OPTIONS"}))
        if req.method == "OPTIONS" and "OPTIONS" in allowed:
            return Reply(204, headers=[("Allow", ", ".join(allowed))])
        name = methods.get(req.method) or (methods.get("GET") if req.method == "HEAD" else None)
        if name is None:
            raise ApiError(405, "method_not_allowed", "%s is not allowed on %s"
                           % (req.method, req.path), headers=[("Allow", ", ".join(allowed))])
        return getattr(self, name)(req, *params)

    # -- lookups ----------------------------------------------------------------------
    def _template(self, name) -> Template:
        t = self.manager.templates.get(name)
        if t is None:
            raise ApiError(404, "not_found", "no template named %r" % name)
        return t

    @staticmethod
    def _id(text) -> int:
        if not is_ascii_digits(text):
            raise ApiError(400, "bad_value", "%r is not a process id (ASCII digits)" % (text,))
        return int(text)

    def _live(self, text, stopping_too=False) -> Process:
        pid = self._id(text)
        proc = self.manager.find_process(pid) if stopping_too else self.manager.running.get(pid)
        if proc is None:
            raise ApiError(404, "not_found", "no live process with id %d" % pid)
        return proc

    # -- misc ---------------------------------------------------------------------------
    def welcome(self, req):
        return json_reply(200, {"welcome": "gaffer", "version": __version__,
                                "gafferd": GAFFERD_VERSION})

    def ping(self, req):
        return Reply(200, b"OK", "text/plain; charset=UTF-8")

    # A template is ready when all its processes are (``running``) or it
    # is a task that completed; one stopped on purpose is left out of
    # GET /ready, and not ready for GET /ready/NAME.
    _READY_STATES = ("running", "completed")

    def ready(self, req):
        """200 ``{"ready": true}`` when every template that should be
        running is ready, else 503 with ``not_ready``: {name: state}."""
        stopping = self.manager.stopping
        return self._readiness({name: "stopping" if stopping else t.state
                                for name, t in self.manager.templates.items()
                                if t.wanted and (stopping or t.state not in self._READY_STATES)})

    def ready_template(self, req, name):
        t = self._template(name)
        ready = t.wanted and not self.manager.stopping and t.state in self._READY_STATES
        return self._readiness({} if ready else {t.name: t.state})

    @staticmethod
    def _readiness(not_ready):
        if not_ready:
            return json_reply(503, {"ready": False, "not_ready": not_ready})
        return json_reply(200, {"ready": True})

    def status(self, req, name):
        t = self._template(name)
        out = t.status(self.loop)
        held = self.manager.sockets
        if t.spec.sockets:
            out["sockets"] = [held.describe(n) if held is not None and n in held else {"name": n}
                              for n in t.spec.sockets]
        rollout = self.manager.rollouts.get(t.name)
        if rollout is not None:
            out["rollout"] = {"replaced": rollout.replaced, "total": rollout.total}
        return json_reply(200, out)

    def status_all(self, req):
        status = {name: t.summary(self.loop) for name, t in self.manager.templates.items()}
        last, body = self._status_body
        if status != last or list(status) != list(last):       # the order shows too
            body = json_dumps(status)
            self._status_body = (status, body)
        return Reply(200, body, "application/json; charset=UTF-8")

    def reload(self, req):
        if self.reload_config is None:
            raise ApiError(400, "no_config", "the daemon was started without a config file")
        dry_run = req.query.get("dry_run", "0").strip().lower() in _TRUE
        try:
            return json_reply(200, self.reload_config(dry_run, _asked_by(req)))
        except ConfigErrors as exc:
            return json_reply(400, {"error": "invalid_config", "message": str(exc),
                                    "errors": [str(e) for e in exc.errors],
                                    "warnings": exc.warnings})
        except ConfigError as exc:
            return json_reply(400, {"error": "invalid_config", "message": str(exc),
                                    "errors": [str(exc)]})

    def orphans(self, req):
        """Adopted orphans alive now, and the last RECENT_ORPHANS reaped."""
        now, orphans = self.loop.time(), self.manager.orphans
        live = [{"os_pid": e["os_pid"], "cmdline": e["cmdline"],
                 "seen_ago": round(now - e["seen"], 3)} for e in orphans.scan().values()]
        reaped = [{"os_pid": e["os_pid"], "cmdline": e["cmdline"],
                   "exit_status": e["exit_status"], "term_signal": e["term_signal"],
                   "reaped_ago": round(now - e["reaped"], 3)} for e in orphans.recent]
        return json_reply(200, {"orphans": live, "reaped_total": orphans.reaped_total,
                                "reaped": reaped})

    # -- templates ------------------------------------------------------------------------
    def list_templates(self, req):
        if req.query.get("running", "").strip() in ("1", "true"):
            return json_reply(200, list(self.manager.running))
        return json_reply(200, list(self.manager.templates))

    def _body_spec(self, req, name=None):
        obj = req.json()
        if not isinstance(obj, dict):
            raise ApiError(400, "invalid_process_info", "the body must be a JSON object")
        name = obj.get("name") if name is None else name
        if not name or not isinstance(name, str):
            raise ApiError(400, "invalid_process_info", "name is required")
        if not obj.get("cmd"):
            raise ApiError(400, "invalid_process_info", "cmd is required")
        settings = {k: v for k, v in obj.items() if k not in ("name", "cmd", "start")}
        try:
            start = parse_bool(obj.get("start", True))
        except ValueError as exc:
            raise ApiError(400, "invalid_process_info", "start: %s" % exc) from None
        if name in self.manager.templates and req.method == "POST" and req.path == "/processes":
            raise ApiError(409, "conflict", "a template named %r exists" % name)
        warnings = []
        try:
            spec = build_spec(name, obj["cmd"], settings, base_dir=os.getcwd(), origin="api",
                              environ=self.manager.environ, warnings=warnings)
        except (ConfigError, ConfigErrors) as exc:
            raise ApiError(400, "invalid_process_info", api_config_message(exc)) from None
        try:
            self.manager.check_dependencies(spec)
            self.manager.check_sockets(spec)
        except ValueError as exc:
            raise ApiError(400, "invalid_process_info", str(exc)) from None
        for warning in warnings:
            log.warning("%s %s: template %s: %s", req.method, req.path, name, warning)
        return spec, start, warnings

    @staticmethod
    def _ok(warnings):
        """``{"ok": true}``, plus ``"warnings"`` (unknown keys) when any."""
        return json_reply(200, dict(OK, warnings=warnings) if warnings else OK)

    def create_template(self, req):
        spec, start, warnings = self._body_spec(req)
        self.manager.add_template(spec, start)
        return self._ok(warnings)

    def head_template(self, req, name):
        return Reply(200 if name in self.manager.templates else 404)

    def get_template(self, req, name):
        return json_reply(200, self._template(name).spec.definition())

    def update_template(self, req, name):
        t = self._template(name)
        spec, start, warnings = self._body_spec(req, name)
        self.manager.update_template(t, spec, start)
        return self._ok(warnings)

    def _refuse_needed(self, names, what):
        """409 while another template depends on what a DELETE removes."""
        users = self.manager.dependents_of(names)
        if users:
            raise ApiError(409, "conflict", "%s: %s depend%s on it (depends_on); change or "
                           "delete %s first" % (what, ", ".join(users),
                                                "s" if len(users) == 1 else "",
                                                "it" if len(users) == 1 else "them"))

    def delete_template(self, req, name):
        self._template(name)
        self._refuse_needed([name], name)
        self.manager.remove_process(name)
        return json_reply(200, OK)

    def template_query(self, req, name, action, rest):
        t = self._template(name)
        if action == "_pids":
            return json_reply(200, {"ok": True, "pids": [p.id for p in t.running]})
        if action == "_log":
            return self._log(req, t)
        raise ApiError(404, "resource_not_found", "unknown action %r" % action)

    def _count(self, rest) -> int:
        if rest is None or rest == "":
            return 1
        return parse_number("count", rest)

    def _scale_up(self, t, rest) -> int:
        try:
            return self.manager.ttin(t.name, self._count(rest))
        except ValueError as exc:                   # above MAX_NUMPROCESSES
            raise ApiError(400, "bad_value", str(exc)) from None

    # The POST actions are tables: action -> do(api, req, target, arg), whose
    # result is None (the reply is {"ok": true}) or the fields added to it.
    # ``arg`` is the path after the action (``_add/2``, ``_signal/HUP``), or
    # None.  docs/http-api.md lists every row; tests/test_api_tables.py checks.
    TEMPLATE_ACTIONS = {
        "_start": lambda api, req, t, arg: api.manager.start_process(
            t.name, deps=req.query.get("no_deps", "0").strip().lower() not in _TRUE),
        "_stop": lambda api, req, t, arg: api.manager.stop_process(t.name),
        "_restart": lambda api, req, t, arg: api._restart(req, t.name),
        "_add": lambda api, req, t, arg: {"numprocesses": api._scale_up(t, arg)},
        "_sub": lambda api, req, t, arg: {
            "numprocesses": api.manager.ttou(t.name, api._count(arg))},
        "_signal": lambda api, req, t, arg: api.manager.send_signal(t.name, parse_signal(arg)),
    }
    PROCESS_ACTIONS = {
        "_stop": lambda api, req, proc, arg: api.manager.stop_process(proc.id),
        "_signal": lambda api, req, proc, arg: proc.kill(parse_signal(arg)),
    }
    GROUP_ACTIONS = {
        "_start": lambda api, req, group, arg: api.manager.start_group(group),
        "_stop": lambda api, req, group, arg: api.manager.stop_group(group),
        "_restart": lambda api, req, group, arg: api._restart(req, group, group=True),
    }

    def _act(self, table, what, action, req, target, arg=None):
        """Run row ``action`` of ``table`` on ``target()`` (a thunk, so that
        an unknown action is a 404 before the target is looked up, where
        the handler wants that order) and reply ``{"ok": true, ...}``."""
        do = table.get(action)
        if do is None:
            raise ApiError(404, "resource_not_found", "unknown %s %r" % (what, action))
        extra = do(self, req, target(), arg)
        if isinstance(extra, (Reply, Feed)):     # a row that makes its own reply
            return extra
        return json_reply(200, dict(OK, **extra) if extra else OK)

    def template_action(self, req, name, action, rest):
        t = self._template(name)
        return self._act(self.TEMPLATE_ACTIONS, "action", action, req, lambda: t, rest)

    def _restart(self, req, name, group=False):
        """``_restart`` of a template or group.  ``rolling=1`` (or the
        template's ``restart_mode = rolling``, unless ``rolling=0``) makes
        it a rolling restart, whose reply is one JSON object streamed as
        the rollout goes: ``{"rolling": [names], "events": [...], "ok":
        true|false, "result": "done"|"failed", "reason": ...}``, sent to
        its end when the rollout ends (``wait=0``: 202 at once, the
        events tell the rest); while a step waits, a blank every
        ROLLOUT_HEARTBEAT seconds shows the client the daemon is there.
        409 while the template is being rolled."""
        text = req.query.get("rolling")
        rolling = None if text is None else text.strip().lower() in _TRUE
        wait = req.query.get("wait", "1").strip().lower() in _TRUE
        m = self.manager
        start = (lambda watcher: m.restart_group(name, rolling, watcher)) if group else \
            (lambda watcher: m.restart_process(name, rolling, watcher))
        members = m.get_group(name) if group else [name]
        if not any(rolling if rolling is not None else
                   m.templates[n].spec.restart_mode == "rolling" for n in members):
            start(None)
            return json_reply(200, OK)
        busy = [n for n in members if n in m.rollouts]
        if busy:
            raise ApiError(409, "conflict", "a rolling restart of %s is in progress"
                           % ", ".join(busy))
        if not wait:
            rollout = start(None)
            return json_reply(202, {"ok": True, "rolling": rollout.rolled})

        def opener(sink):
            first = [True]

            beat = [None]

            def heartbeat():               # JSON allows blanks between tokens
                beat[0] = None
                if not sink.closed:
                    sink.write(b" ")
                    beat[0] = self.loop.call_later(ROLLOUT_HEARTBEAT, heartbeat)

            def watcher(event, payload):
                if sink.closed:
                    return
                if event is None:
                    finish(payload)
                    return
                sink.write(b"%s\n  %s" % (b"" if first[0] else b",",
                                          json_dumps(dict(payload, event=event)).strip()))
                first[0] = False

            def finish(rollout):
                if beat[0] is not None:
                    beat[0].cancel()
                tail = {"ok": rollout.outcome == "done", "result": rollout.outcome}
                if rollout.reason:
                    tail["reason"] = rollout.reason
                sink.write(b"\n], " + json_dumps(tail).strip()[1:] + b"\n")
                sink.end()
            rolled = [n for n in members if (rolling if rolling is not None else
                                             m.templates[n].spec.restart_mode == "rolling")]
            sink.write(b'{"rolling": %s, "events": [' % json_dumps(rolled).strip())
            beat[0] = self.loop.call_later(ROLLOUT_HEARTBEAT, heartbeat)
            start(watcher)
        return Feed("application/json; charset=UTF-8", opener)

    # -- processes by id ----------------------------------------------------------------------
    def head_process(self, req, pid):
        return Reply(200 if self._id(pid) in self.manager.running else 404)

    def get_process(self, req, pid):
        proc = self._live(pid)
        info = proc.spec.definition()
        info.update(id=proc.id, os_pid=proc.pid)
        return json_reply(200, info)

    def delete_process(self, req, pid):
        self.manager.stop_process(self._live(pid).id)
        return json_reply(200, OK)

    def process_action(self, req, pid, action, rest):
        proc = self._live(pid)
        return self._act(self.PROCESS_ACTIONS, "action", action, req, lambda: proc, rest)

    def _log(self, req, t):
        labels = t.spec.labels
        if not labels:
            raise ApiError(400, "io_not_redirected", "%s does not redirect its output" % t.name)
        label = req.query.get("label") or labels[0]
        if label not in labels:
            raise ApiError(404, "io_not_found", "%s has no output label %r" % (t.name, label))
        count = parse_number("lines", req.query.get("lines", "100"))
        procs = {p.id: p for p in itertools.chain(
            t.recent, t.running, (p for p in self.manager.live_processes() if p.template is t))}
        if "pid" in req.query:
            wanted = parse_number("pid", req.query["pid"], range_name="id")
            procs = {k: v for k, v in procs.items() if k == wanted}
        lines = []
        for proc_id in sorted(procs):
            ring = procs[proc_id].rings.get(label)
            if ring is not None:
                lines.extend(split_lines(ring.tail(max(count, 0))))
        return json_reply(200, {"name": t.name, "label": label,
                                "lines": lines[-count:] if count > 0 else []})

    # -- feeds ------------------------------------------------------------------------------
    def _feed_args(self, req, default):
        mode = req.query.get("feed", default) or default
        return mode, parse_heartbeat(req.query.get("heartbeat"))

    def watch(self, req, *parts):
        parts = [p for p in parts if p]
        pattern = ".".join(parts) if parts else "."
        mode, heartbeat = self._feed_args(req, "longpoll")
        manager = self.manager
        last_id = parse_last_event_id(req) if mode == "eventsource" else None

        def opener(sink):
            def listener(name, payload):
                if not sink.closed:
                    event_id = manager.bus.current_id if mode == "eventsource" else None
                    feed_message(sink, mode, format_event(name, payload, mode, event_id))
            if last_id is not None:         # the history, then live: no gap, no repeat
                sink.write(watch_backlog(manager.bus, pattern, last_id))
            open_feed(self.loop, sink, [(manager.subscribe, manager.unsubscribe,
                                         (pattern, listener))], mode=mode, heartbeat=heartbeat)
        return Feed(_FEED_TYPES.get(mode, "application/json"), opener)

    def stats_all(self, req):
        return json_reply(200, self.manager.processes_stats())

    def stats_template(self, req, name):
        t = self._template(name)
        mode = req.query.get("feed", "normal") or "normal"
        if mode == "normal":
            return json_reply(200, self.manager.get_process_stats(t.name))
        return self._stats_feed(req, t.name, list(t.running))

    def stats_process(self, req, name, pid):
        proc = self._live(pid)
        mode = req.query.get("feed", "normal") or "normal"
        if mode == "normal":
            stats = self.manager.process_stats(proc)
            if stats is None:
                raise ApiError(404, "not_found", "process %d has just exited" % proc.id)
            return json_reply(200, stats)
        return self._stats_feed(req, proc.id, [proc])

    def _stats_feed(self, req, target, procs):
        mode, heartbeat = self._feed_args(req, "normal")
        manager = self.manager

        def opener(sink):
            def listener(event, stats):
                if not sink.closed:
                    data = json_dumps(stats)
                    feed_message(sink, mode, sse_event("stat", [data.decode("utf-8")])
                                 if mode == "eventsource" else data + b"\r\n")
            if not procs:
                sink.end()
                return
            open_feed(self.loop, sink, [(manager.monitor, manager.unmonitor, (proc.id, listener))
                                        for proc in procs],
                      processes=procs, mode=mode, heartbeat=heartbeat)
        return Feed(_FEED_TYPES.get(mode, "application/json"), opener)

    def _stream_target(self, pid, label):
        proc = self._live(pid, stopping_too=True)
        if label in proc.custom_streams:
            return proc
        if not proc.redirect_output:
            raise ApiError(400, "io_not_redirected", "process %d does not redirect its output"
                           % proc.id)
        if label not in proc.redirect_output:
            raise ApiError(404, "io_not_found", "process %d has no output label %r"
                           % (proc.id, label))
        return proc

    def stream(self, req, pid, label):
        proc = self._stream_target(pid, label)
        mode, heartbeat = self._feed_args(req, "longpoll")
        ring = proc.rings.get(label)
        backlog = b""
        last_id = parse_last_event_id(req)
        if "tail" in req.query:
            tail = parse_number("tail", req.query["tail"])
        if ring is not None and last_id is not None:
            offset = last_id
            backlog = ring.since(offset)
            if backlog is None:                   # overwritten (or a bogus id)
                backlog = bytes(ring.buf) if offset < ring.start else b""
        elif ring is not None and "tail" in req.query:
            backlog = ring.tail(tail)

        def send(sink, data):
            # an SSE event's id is the stream offset just after its data
            feed_message(sink, mode, sse_event(label, split_lines(data) or [""],
                                               ring.total if ring is not None else None)
                         if mode == "eventsource" else data)

        def opener(sink):
            def listener(event, payload):
                if not sink.closed:
                    send(sink, payload["data"])
            if backlog:
                send(sink, backlog)
                if sink.closed:
                    return
            if not proc.alive:
                sink.end()
                return
            open_feed(self.loop, sink, [(proc.monitor_io, proc.unmonitor_io, (label, listener))],
                      processes=[proc], mode=mode, heartbeat=heartbeat, producer=proc)
        ctype = _FEED_TYPES.get(mode, "application/octet-stream")
        # Where the first byte sent sits in the stream: with it, a client
        # can tell whether each chunk ends a line (see the event ids).
        headers = [("Gafferd-Stream-Offset", "%d" % (ring.total - len(backlog)))] \
            if ring is not None else []
        return Feed(ctype, opener, headers)

    def write_stream(self, req, pid, label):
        proc = self._live(pid, stopping_too=True)
        if label == "stdin":
            proc.write(req.body)
        elif label in proc.custom_fds:
            sock = proc.custom_fds[label]
            try:
                sent = sock.send(req.body)
            except OSError as exc:               # EPIPE: the child closed its end
                raise ApiError(503, "write_failed", str(exc)) from None
            if sent < len(req.body):
                raise ApiError(503, "write_failed", "process %d is not reading custom "
                               "stream %r: %d of %d bytes written"
                               % (proc.id, label, sent, len(req.body)))
        else:
            raise ApiError(404, "not_found", "write to 'stdin' (or a custom stream)")
        return json_reply(200, OK)

    def wstream(self, req, pid):
        proc = self.manager.find_process(int(pid)) if is_ascii_digits(pid) else None

        def opener(ws):
            if proc is None or not proc.alive:
                ws.send_text('{"error": "not_found"}')
                ws.close(1000)
                return
            if not proc.redirect_input:
                ws.send_text('{"error": "forbidden_write"}')
                ws.close(1000)
                return

            def listener(event, payload):
                data = payload["data"]
                try:
                    ws.send_text(data.decode("utf-8"))
                except UnicodeDecodeError:
                    ws.send_binary(data)

            def on_message(opcode, payload):
                try:
                    proc.write(payload)
                except ApiError as exc:
                    ws.send_text(json.dumps({"error": exc.code}))
                    if exc.status == 403:
                        ws.close(1000)

            ws.on_message(on_message)
            open_feed(self.loop, ws, [(proc.monitor_io, proc.unmonitor_io, (label, listener))
                                      for label in dict.fromkeys(proc.redirect_output)],
                      processes=[proc], end=lambda: ws.close(1000, "process exited"),
                      producer=proc)
        return Upgrade(opener)

    # -- groups ------------------------------------------------------------------------------
    def list_groups(self, req):
        return json_reply(200, self.manager.get_groups())

    def _group(self, name):
        if name not in self.manager.groups:
            raise ApiError(404, "not_found", "no group named %r" % name)
        return name

    def group(self, req, name):
        return json_reply(200, self.manager.get_group(self._group(name)))

    def group_no_action(self, req, name):
        raise ApiError(404, "resource_not_found", "POST /groups/NAME/_start, _stop or _restart")

    def delete_group(self, req, name):
        group = self._group(name)
        self._refuse_needed(self.manager.get_group(group), "group " + group)
        self.manager.remove_group(group)
        return json_reply(200, OK)

    def group_action(self, req, name, action):
        if req.method == "GET":
            return self.group(req, name)
        if req.method == "DELETE":
            return self.delete_group(req, name)
        # the action is checked before the group: an unknown action is a
        # resource_not_found whether or not the group exists
        return self._act(self.GROUP_ACTIONS, "group action", action, req,
                         lambda: self._group(name))

    # -- metrics ------------------------------------------------------------------------------
    def metrics(self, req):
        now = self.loop.time()
        lines = []

        def metric(name, kind, help_text, samples):
            lines.append("# HELP %s %s" % (name, help_text))
            lines.append("# TYPE %s %s" % (name, kind))
            for labels, value in samples:
                lines.append("%s%s %s" % (name, _metric_labels(**labels), repr(float(value))
                                          if isinstance(value, float) else value))
        m = self.manager
        templates = list(m.templates.values())
        metric("gafferd_uptime_seconds", "gauge", "Seconds since the daemon started.",
               [({}, round(now - m.started, 3))])
        metric("gafferd_children", "gauge", "Live child processes.",
               [({}, len(m.live_processes()))])
        metric("gafferd_spawns_total", "counter", "Processes spawned.", [({}, m.spawned_total)])
        metric("gafferd_spawn_failures_total", "counter", "Spawns that failed.",
               [({}, m.spawn_failures)])
        metric("gafferd_orphans", "gauge", "Adopted orphans alive (children the daemon "
               "did not start; see GET /orphans).", [({}, len(m.orphans.scan()))])
        metric("gafferd_orphans_reaped_total", "counter", "Adopted orphans reaped.",
               [({}, m.orphans.reaped_total)])
        sent, dropped = collections.Counter(), collections.Counter()
        for sender in list(m.syslog_senders.values()) + [m.daemon_syslog]:
            if sender is not None:
                sent[sender.address] += sender.sent
                dropped[sender.address] += sender.dropped
        metric("gafferd_syslog_sent_total", "counter", "Syslog messages sent (program "
               "lines and the daemon's own), by address.",
               [({"address": a}, n) for a, n in sorted(sent.items())])
        metric("gafferd_syslog_dropped_total", "counter", "Syslog messages dropped (no "
               "syslog socket, or a full one), by address.",
               [({"address": a}, n) for a, n in sorted(dropped.items())])
        metric("gafferd_template_state", "gauge", "1 for the state each template is in.",
               [({"name": t.name, "state": s}, int(t.state == s)) for t in templates
                for s in TEMPLATE_STATES])
        metric("gafferd_template_ready", "gauge", "Ready processes per template.",
               [({"name": t.name}, t.counts[RUNNING]) for t in templates])
        metric("gafferd_template_exits_total", "counter", "Process exits by reason "
               "(stopped, crashed, failed_start, gave_up, succeeded, failed).",
               [({"name": t.name, "reason": r}, n) for t in templates
                for r, n in sorted(t.exits.items())])
        metric("gafferd_template_running", "gauge", "Running processes per template.",
               [({"name": t.name}, len(t.running)) for t in templates])
        metric("gafferd_template_target", "gauge", "Target process count per template.",
               [({"name": t.name}, t.numprocesses) for t in templates])
        metric("gafferd_template_restarts_total", "counter",
               "Exits nobody asked for (restarted or not).",
               [({"name": t.name}, t.restarts) for t in templates])
        metric("gafferd_template_flapping_giveups_total", "counter",
               "Processes that gave up after start_retries failed starts.", [({"name": t.name}, t.give_ups)
                                                      for t in templates])
        metric("gafferd_template_limit_trips_total", "counter", "Processes found over "
               "max_memory or max_cpu for limit_for seconds (limit_action ran).",
               [({"name": name, "limit": limit}, n)
                for (name, limit), n in sorted(m.limits.trips.items())])
        scheduled = [t for t in templates if t.sched is not None]
        metric("gafferd_schedule_last_success_timestamp_seconds", "gauge",
               "Unix time the last successful run of a scheduled template ended (0: none yet).",
               [({"name": t.name}, t.sched.last_success or 0) for t in scheduled])
        metric("gafferd_schedule_last_exit_status", "gauge", "Exit status of the last run of "
               "a scheduled template (128 + N: killed by signal N; -1: no run yet).",
               [({"name": t.name}, -1 if t.sched.last_exit is None else t.sched.last_exit)
                for t in scheduled])
        metric("gafferd_schedule_next_run_timestamp_seconds", "gauge",
               "Unix time of the next run of a scheduled template (0: paused or none).",
               [({"name": t.name}, t.sched.next_run(t.spec, self.loop) or 0)
                for t in scheduled])
        metric("gafferd_schedule_runs_total", "counter", "Finished runs of a scheduled "
               "template, by result (succeeded, failed).",
               [({"name": t.name, "result": r}, n) for t in scheduled
                for r, n in (("succeeded", t.sched.runs - t.sched.failures),
                             ("failed", t.sched.failures))])
        metric("gafferd_schedule_skipped_total", "counter",
               "Runs not started because the last one still ran (overlap = skip).",
               [({"name": t.name}, t.sched.skipped) for t in scheduled])
        uptime, cpu, rss, fds = [], [], [], []
        for p, sample in m.resource_samples():
            labels = {"name": p.name, "id": p.id}
            uptime.append((labels, round(now - p.started, 3)))
            if sample is None:
                continue
            cpu.append((labels, round(sample[0], 2)))
            rss.append((labels, sample[1]))
            if sample[2] is not None:
                fds.append((labels, sample[2]))
        metric("gafferd_process_uptime_seconds", "gauge", "Seconds since the process started.", uptime)
        metric("gafferd_process_cpu_seconds_total", "counter", "CPU time used.", cpu)
        metric("gafferd_process_resident_memory_bytes", "gauge", "Resident memory.", rss)
        metric("gafferd_process_open_fds", "gauge", "Open file descriptors.", fds)
        if self.server is not None:
            metric("gafferd_http_requests_total", "counter", "HTTP requests by status class.",
                   [({"code": code}, n) for code, n in sorted(self.server.requests.items())])
            metric("gafferd_http_connections", "gauge", "Open HTTP connections.",
                   [({}, len(self.server.connections))])
        for hooks in (a for a in m.apps if isinstance(a, Webhooks)):
            metric("gafferd_webhook_events_total", "counter", "Webhook events by outcome: "
                   "delivered, failed (every attempt), dropped (queue full).",
                   [({"result": r}, getattr(hooks, r)) for r in ("delivered", "failed", "dropped")])
        for app in (self.plugins.apps if self.plugins else ()):
            for line in app.metrics():
                lines.append(str(line).rstrip("\n"))
        return Reply(200, ("\n".join(lines) + "\n").encode("utf-8"),
                     "text/plain; version=0.0.4; charset=utf-8")

    # -- plugins -----------------------------------------------------------------------------
    def plugin_api(self, req, dirname, rest):
        if self.plugins is None:
            raise ApiError(404, "not_found", "no plugin %r" % dirname)
        allowed = set()
        for method, regex, handler in self.plugins.routes_for(dirname):
            m = regex.fullmatch(rest)
            if not m:
                continue
            allowed.add(method)
            if method == req.method or (method == "GET" and req.method == "HEAD"):
                result = handler(req, *m.groups())
                if result is None:
                    log.error("plugin route %s %s returned nothing", method, req.path)
                    raise ApiError(500, "internal_error", "the plugin route returned nothing")
                status, body = result if isinstance(result, tuple) else (200, result)
                if isinstance(body, (dict, list)):
                    return json_reply(status, body)
                if isinstance(body, str):
                    return Reply(status, body.encode("utf-8"), "text/plain; charset=UTF-8")
                return Reply(status, bytes(body or b""), "application/octet-stream")
        if allowed:
            raise ApiError(405, "method_not_allowed", "%s is not allowed here" % req.method,
                           headers=[("Allow", ", ".join(sorted(allowed)))])
        raise ApiError(404, "not_found", "no such plugin route: %s" % req.path)

    def plugin_site(self, req, dirname, rest):
        pdir = self.plugins.find_dir(dirname) if self.plugins else None
        root = pdir.site_root() if pdir else None
        if root is None:
            raise ApiError(404, "not_found", "no plugin site %r" % dirname)
        return StaticFile(root, rest)


# § 12 HTTP server (I/O) --------------------------------------------------------
# Owns: listening sockets (TCP, IPv6, unix, TLS), connections, and the
# security rules: Host checks against DNS rebinding on loopback binds,
# Origin checks against cross-site requests (cors_origins = * lets other
# origins read, never change), optional token authentication, headers
# against sniffing and framing.  A connection reads into the §6 parser,
# answers pipelined requests in order, streams Feeds with chunked
# encoding, switches to websocket framing for an Upgrade, and serves a
# StaticFile (``serve_file``, which never leaves its root).  A slow or
# hostile client only ever delays itself: every connection state has a
# deadline and every buffer a bound (see Connection).  Also the
# [socket:NAME] sockets held for the programs (``HeldSockets``), made
# like the listeners' and handed to the spawner through
# ``Manager.sockets``.  Uses §1-§11.

CORS_METHODS = "POST, GET, PUT, DELETE, OPTIONS"       # to an origin listed in cors_origins
CORS_READ_METHODS = "GET, HEAD"                         # to any origin, with cors_origins = *
CORS_HEADERS = "X-Requested-With, X-HTTP-Method-Override, Content-Type, Accept, Authorization"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")               # change nothing (RFC 9110 9.2.1)
# on every response: no MIME sniffing of a reply into HTML or script, and
# no page of another origin may frame the console (clickjacking)
SECURITY_HEADERS = [("X-Content-Type-Options", "nosniff"), ("X-Frame-Options", "SAMEORIGIN"),
                    ("Content-Security-Policy", "frame-ancestors 'self'")]
_SEND_HIGH_WATER = 16 * 1024      # stop answering (and reading) pipelined requests above this
_RECV_SIZE = 64 * 1024            # one read from a client
_FEED_INPUT_LIMIT = 64 * 1024     # what a client may send while its feed is open
_LINGER = 2.0                     # after the last reply, wait this long for the client's FIN
_PIPELINE_TURN = 2                # pipelined requests answered per loop iteration
# The kernel's send buffer of a connection (the kernel doubles it).
# Autotuning would let a client that never reads park megabytes of
# replies there, and make the daemon answer tens of thousands of its
# pipelined requests first.  A stream gets the larger one: its backlog is
# bounded by STREAM_BUFFER_LIMIT and the stall check, and it needs the
# room on a long round trip.
_SOCKET_SEND_BUFFER = 16 * 1024
_STREAM_SEND_BUFFER = 512 * 1024


class BindError(Exception):
    """A listening socket that cannot be made (fatal at start-up);
    ``errno`` is the OS error behind it, if any."""
    errno = None


def remove_socket_file(path, ident):
    """Unlink the unix socket the daemon made at ``path`` and only that:
    the directory is walked as ``open_safely`` walks it, and the entry
    must still be the socket whose (st_dev, st_ino) is ``ident`` -- not a
    file of the same name behind a directory swapped for a link."""
    try:
        dir_fd, name = open_directory_of(path)
    except OSError:
        return
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == ident:
            os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)



def bind_unix_socket(path, mode, refuse_live=False):
    """A unix stream socket bound at ``path`` with permissions ``mode``,
    and the ``(st_dev, st_ino)`` of its file (to remove that file and no
    other later).  A stale socket file is removed first; with
    ``refuse_live``, not one a program still accepts on.  Everything
    happens through the directory held open (walked like every file the
    daemon writes) and the mode comes from the umask, never from a chmod
    by path, which would follow whatever was swapped in after bind().
    Raises BindError (something else is at ``path``) or OSError."""
    dir_fd, name = open_directory_of(path)
    try:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISSOCK(st.st_mode):
                raise BindError("%s exists and is not a socket" % path)
            if refuse_live and _unix_socket_live(path):
                raise BindError("cannot listen on %s: a program is listening there already"
                                % path)
            os.unlink(name, dir_fd=dir_fd)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old = os.umask(0o777 & ~mode)
            try:
                sock.bind(path)
            finally:
                os.umask(old)
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except BaseException:
            sock.close()
            raise
        return sock, (st.st_dev, st.st_ino)
    finally:
        os.close(dir_fd)


def _unix_socket_live(path) -> bool:
    """Whether a program accepts on the unix socket ``path`` (a
    non-blocking connect: a listener's backlog answers at once)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.setblocking(False)
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


class Listener:
    """One listening socket of an endpoint.  ``bind = localhost`` makes
    two: this one on 127.0.0.1 and its ``twin`` on ::1 with the same port,
    so that no other local user can take the family left free and answer
    the clients that pick it (browsers try ::1 first)."""

    def __init__(self, endpoint, address):
        self.endpoint, self.address = endpoint, address
        self.sock = None
        self.url = None
        self.tls = None
        self.twin = None
        self.sock_file = None            # unix: (st_dev, st_ino) of the socket bind() made
        self.loopback_tcp = address.kind == "tcp" and address.is_loopback(resolve=False)

    def bind(self):
        """Listen; BindError.  For ``localhost``, ``twin`` is set too."""
        if self.address.kind == "tcp" and self.address.host.lower() == "localhost":
            self._bind_localhost()
        else:
            self._bind()

    def _bind_localhost(self):
        address = self.address
        for _ in range(8 if address.port == 0 else 1):
            self.address = Address(address.text, "tcp", host="127.0.0.1", port=address.port)
            try:
                self._bind()
            finally:
                self.address = address
            port = self.sock.getsockname()[1]
            twin = Listener(self.endpoint, Address(address.text, "tcp", host="::1", port=port))
            try:
                twin._bind()
            except BindError as exc:
                if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    return              # no IPv6 loopback here: nobody can take it either
                self.close()
                if exc.errno == errno.EADDRINUSE and address.port == 0:
                    continue            # that port is taken on ::1 only: another one
                raise BindError("cannot listen on %s: [::1]:%d is already taken (localhost "
                                "means both 127.0.0.1 and ::1; bind = 127.0.0.1:%d to use "
                                "IPv4 only)" % (address.text, port, port)) from None
            self.twin = twin
            return
        raise BindError("cannot listen on %s: no port free on both 127.0.0.1 and ::1"
                        % address.text)

    def _bind(self):
        address, ep = self.address, self.endpoint
        try:
            if address.kind == "unix":
                sock, self.sock_file = bind_unix_socket(address.path, 0o600)
                self.url = "unix:" + address.path
            else:
                host = address.host
                infos = socket.getaddrinfo(host, address.port, socket.AF_UNSPEC,
                                           socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
                family, _, _, _, sockaddr = infos[0]
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(sockaddr)
                bound = sock.getsockname()
                shown = "[%s]" % bound[0] if family == socket.AF_INET6 else bound[0]
                self.url = "%s://%s:%d" % ("https" if ep.tls else "http", shown, bound[1])
                self.loopback_tcp = bool(loopback_literal(bound[0]))
            sock.listen(ep.backlog or DEFAULT_BACKLOG)
            sock.setblocking(False)
        except BindError:
            raise
        except OSError as exc:
            error = BindError("cannot listen on %s: %s" % (address.text, exc.strerror or exc))
            error.errno = exc.errno
            raise error from None
        if address.kind == "tcp" and not self.loopback_tcp and not ep.auth_token and \
                not ep.insecure:
            # the name resolved to a loopback address when the config was
            # read, and to another one now
            sock.close()
            raise BindError("%s resolves to %s, not a loopback address, and no auth_token "
                            "is set" % (address.text, self.url.split("://")[1]))
        if ep.tls:
            try:
                self.tls = load_ssl().SSLContext(ssl.PROTOCOL_TLS_SERVER)
                self.tls.load_cert_chain(ep.certfile, ep.keyfile)
            except (ssl.SSLError, OSError) as exc:
                sock.close()
                raise BindError("cannot load TLS certificate for %s: %s" % (address.text, exc)) from None
        self.sock = sock

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            if self.sock_file is not None:
                remove_socket_file(self.address.path, self.sock_file)
                self.sock_file = None


class HeldSockets:
    """The [socket:NAME] listening sockets the daemon binds for its
    programs (with its own privileges) and passes to them on exec.

    The daemon never accepts on them: they stay in blocking mode, as a
    program started by systemd expects its fds.  ``bind_all`` at start-up
    may resolve a host name (like the HTTP endpoints); ``reload`` runs in
    the loop, so a changed address must be an IP address or a name of
    /etc/hosts (no DNS query ever blocks the loop).  Callers may rely on:
    ``fds(names)`` gives the held fds in the order of ``names`` (KeyError
    for an unknown one); a reload keeps the very socket (same fd) of a
    section whose address did not change, a new backlog is applied with
    a new listen(); ``close_all`` closes each and removes the unix socket
    files the daemon made, and only those.

    Used by the Spawner (§8, through ``Manager.sockets``), the HTTP API
    (§11, ``describe``) and the daemon (§15)."""

    def __init__(self):
        self.specs = collections.OrderedDict()      # name -> SocketSpec
        self._socks = {}                             # name -> socket.socket
        self._files = {}                             # name -> (st_dev, st_ino) of a unix file

    def __contains__(self, name):
        return name in self.specs

    def names(self):
        return list(self.specs)

    def fds(self, names) -> list:
        return [self._socks[name].fileno() for name in names]

    def describe(self, name) -> dict:
        """``{"name", "bind", "address", "fd"}`` (the address it is bound to)."""
        out = self.specs[name].to_dict()
        sock = self._socks.get(name)
        if sock is not None:
            out["fd"] = sock.fileno()
            out["address"] = self._bound(self.specs[name], sock)
        return out

    @staticmethod
    def _bound(spec, sock) -> str:
        if spec.address.kind == "unix":
            return "unix:" + spec.address.path
        host, port = sock.getsockname()[:2]
        return ("[%s]:%d" if sock.family == socket.AF_INET6 else "%s:%d") % (host, port)

    def bind_all(self, specs):
        """Bind every socket of ``specs`` (start-up); BindError (and none
        kept) if one cannot be."""
        made = {}
        try:
            for name, spec in specs.items():
                made[name] = self._bind(spec, resolve=True)
        except BindError:
            for name, (sock, ident) in made.items():
                self._close(specs[name], sock, ident)
            raise
        for name, (sock, ident) in made.items():
            self.specs[name], self._socks[name] = specs[name], sock
            if ident:
                self._files[name] = ident

    def reload(self, specs) -> list:
        """Make the held sockets those of ``specs``; returns the names
        rebound (address changed).  BindError, and nothing changes, if a
        new address cannot be bound.  A removed one is closed (its
        processes keep their own copy until they exit)."""
        fresh = {}
        try:
            for name, spec in specs.items():
                old = self.specs.get(name)
                if old is None or old.address.text != spec.address.text:
                    fresh[name] = self._bind(spec, resolve=False)
                elif old.key() != spec.key():
                    log.warning("[socket:%s]: a new mode or reuseport takes effect when its "
                                "address changes or the daemon starts again", name)
        except BindError:
            for name, (sock, ident) in fresh.items():
                self._close(specs[name], sock, ident)
            raise
        for name, spec in specs.items():
            if name in fresh:
                old_spec, old_sock = self.specs.get(name), self._socks.get(name)
                if old_sock is not None:
                    self._close(old_spec, old_sock, self._files.pop(name, None))
                self._socks[name], ident = fresh[name]
                if ident:
                    self._files[name] = ident
            elif spec.backlog != self.specs[name].backlog:
                self._socks[name].listen(spec.backlog)
        removed = {n: (self.specs[n], self._socks.pop(n), self._files.pop(n, None))
                   for n in self.specs if n not in specs}
        self.specs = collections.OrderedDict(specs)
        for spec, sock, ident in removed.values():
            self._close(spec, sock, ident)
        return list(fresh)

    def close_all(self):
        for name in list(self._socks):
            self._close(self.specs[name], self._socks.pop(name), self._files.pop(name, None))

    @staticmethod
    def _close(spec, sock, ident):
        sock.close()
        if ident is not None:
            remove_socket_file(spec.address.path, ident)

    @staticmethod
    def _sockaddr(spec, resolve):
        """(family, sockaddr) of a TCP bind; at run time without DNS."""
        host, port = spec.address.host, spec.address.port
        flags = socket.AI_PASSIVE | (0 if resolve else socket.AI_NUMERICHOST)
        try:
            infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, flags)
        except socket.gaierror as exc:
            if resolve:
                raise BindError("[socket:%s] cannot resolve %s: %s"
                                % (spec.name, spec.address.text, exc.strerror)) from None
            found = _hosts_lookup(host)
            if found is None:
                raise BindError("[socket:%s] %s: a host name is resolved at start-up only "
                                "(or from /etc/hosts); use an IP address, or restart the "
                                "daemon" % (spec.name, spec.address.text)) from None
            infos = socket.getaddrinfo(found, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0,
                                       socket.AI_PASSIVE | socket.AI_NUMERICHOST)
        return infos[0][0], infos[0][4]

    def _bind(self, spec, resolve):
        """A new listening socket for ``spec``: (socket, unix file ident)."""
        address, ident, sock = spec.address, None, None
        try:
            if address.kind == "unix":
                try:
                    sock, ident = bind_unix_socket(address.path, spec.mode, refuse_live=True)
                except BindError as exc:
                    raise BindError("[socket:%s] %s" % (spec.name, exc)) from None
            else:
                family, sockaddr = self._sockaddr(spec, resolve)
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if spec.reuseport:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(sockaddr)
            sock.listen(spec.backlog)
        except BindError:
            if sock is not None:
                sock.close()
            raise
        except OSError as exc:
            if sock is not None:
                sock.close()
            raise BindError("[socket:%s] cannot listen on %s: %s" % (
                spec.name, address.text, exc.strerror or exc)) from None
        return sock, ident


_TOO_MANY_BODY = b'{"error": "too_many_connections", "message": "try again later"}\n'
_TOO_MANY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
             b"Content-Length: %d\r\nConnection: close\r\n%s\r\n%s"
             % (len(_TOO_MANY_BODY), b"".join(b"%s: %s\r\n" % (k.encode(), v.encode())
                                            for k, v in SECURITY_HEADERS), _TOO_MANY_BODY))


class HttpServer:
    """The HTTP application: every endpoint's listeners and connections,
    answered through one Api.

    HttpServer(endpoints, api): ``endpoints`` are EndpointSpecs (§3), each
    with one or more addresses; sets ``api.server`` to itself.

    Methods for the caller (main(), §15; the server is an application):
        bind()               bind every listener now, before any child is
                             started, so a port taken fails the start-up
                             and not a running daemon.  Raises BindError,
                             having closed whatever it had bound.
        start(loop, manager) bind what bind() did not, and accept.
        stop()               stop accepting and close every connection
                             (a stream ends without its last chunk).
        restart()            nothing: listeners outlive a reload.
        date() -> str        the Date header, formatted once a second.

    What a caller may rely on:
      * Accepting never blocks and never starves the loop: at most 64
        connections per wake-up.  Out of fds, a spare fd is spent to
        accept and close one waiting client (the backlog drains instead
        of spinning); other accept errors pause that listener for 0.1 s.
      * Beyond an endpoint's max_connections a client gets a 503 and is
        closed; nothing about it is kept.
      * A slow or hostile client only ever delays itself (see
        Connection): every state has a deadline, every buffer a bound.

    Instance variables others read: ``connections`` (the open
    Connections), ``per_endpoint`` (endpoint name -> open connections)
    and ``requests`` (status class such as "2xx" -> replies sent), for
    /metrics.
    """

    def __init__(self, endpoints, api):
        self.endpoints, self.api = endpoints, api
        api.server = self
        self.listeners = [Listener(ep, a) for ep in endpoints for a in ep.addresses]
        self.connections = set()
        self.per_endpoint = collections.Counter()      # endpoint name -> connections
        self.requests = collections.Counter()
        self.loop = None
        self._date = (0, "")
        self._spare = None                              # a reserve fd for EMFILE
        self._emfile_logged = -100.0

    def bind(self):
        """Bind every listener now (before any child starts); BindError."""
        try:
            for listener in list(self.listeners):
                self._bind(listener)
        except BindError:
            for listener in self.listeners:
                listener.close()
            raise

    def _bind(self, listener):
        listener.bind()
        if listener.twin is not None:
            self.listeners.insert(self.listeners.index(listener) + 1, listener.twin)

    def start(self, loop, manager):
        self.loop = loop
        self._spare = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        for listener in list(self.listeners):
            if listener.sock is None:
                self._bind(listener)
        for listener in self.listeners:
            loop.add_reader(listener.sock.fileno(), self._on_accept, listener)
            log.info("listening on %s", listener.url)

    def restart(self):
        pass

    def stop(self):
        for listener in self.listeners:
            if listener.sock is not None and self.loop is not None:
                self.loop.remove_reader(listener.sock.fileno())
            listener.close()
        for conn in list(self.connections):
            conn.close()

    def date(self) -> str:
        """The Date header, formatted once a second (RFC 9110 6.6.1)."""
        now = time.gmtime()[:6]
        if self._date[0] != now:
            self._date = (now, http_date())
        return self._date[1]

    def _on_accept(self, listener):
        for _ in range(64):
            try:
                sock, remote = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE) and self._spare is not None:
                    # out of fds: use the spare one to accept and refuse, so
                    # the backlog drains instead of waiting (libev's trick)
                    if self._refuse_one(listener, exc):
                        continue
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("cannot accept connections on %s: %s; pausing 0.1s",
                              listener.url, exc.strerror)
                    self.loop.remove_reader(listener.sock.fileno())
                    self.loop.call_later(0.1, self._resume, listener)
                return
            sock.setblocking(False)
            endpoint = listener.endpoint
            if self.per_endpoint[endpoint.name] >= endpoint.max_connections:
                try:
                    sock.send(_TOO_MANY)
                except OSError:
                    pass
                sock.close()
                continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_SEND_BUFFER)
                if listener.address.kind == "tcp":
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            self.connections.add(Connection(self, listener, sock, remote))

    def _refuse_one(self, listener, exc) -> bool:
        now = self.loop.time()
        if now - self._emfile_logged > 10:
            log.error("out of file descriptors (%s): refusing connections on %s",
                      exc.strerror, listener.url)
            self._emfile_logged = now
        os.close(self._spare)
        self._spare = None
        try:
            sock, _ = listener.sock.accept()
            sock.close()
            refused = True
        except OSError:
            refused = False
        try:
            self._spare = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            pass
        return refused

    def _resume(self, listener):
        if listener.sock is not None:
            self.loop.add_reader(listener.sock.fileno(), self._on_accept, listener)


def _host_is_loopback(host: str, extra) -> bool:
    host = host.strip().lower()
    if host.startswith("["):
        name = host[1:host.find("]")] if "]" in host else host
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    # RFC 6761 6.3 reserves *.localhost for loopback and browsers resolve
    # it there themselves, so a rebinding page cannot claim such a name
    if name in extra or name.endswith(".localhost"):
        return True
    known = _LOOPBACK_NAMES.get(name)
    if known is None:
        known = bool(loopback_literal(name))
        if len(_LOOPBACK_NAMES) >= 256:      # names come from clients: bounded
            _LOOPBACK_NAMES.clear()
        _LOOPBACK_NAMES[name] = known
    return known


_LOOPBACK_NAMES = {}                         # Host name -> is a loopback address (parsed once)


def token_matches(header: str, token: str, basic=True) -> bool:
    """``Bearer <token>`` or (if ``basic``) Basic with the token as
    password, compared in constant time."""
    scheme, _, value = (header or "").strip().partition(" ")
    candidate = ""
    if scheme.lower() == "bearer":
        candidate = value.strip()
    elif scheme.lower() == "basic" and basic:
        try:
            candidate = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            candidate = ""
    return lazy_import("hmac").compare_digest(candidate.encode("utf-8"), token.encode("utf-8"))


class _ClosingStream:
    """What a _Sink and a _WebSocket share: ``on_close(callback)`` runs
    the callback once the stream has ended (at once if it has), and
    ``_close()`` ends it, running each callback once; one failing is
    logged and the others still run."""

    closed = False
    _what = "stream"

    def on_close(self, callback):
        if self.closed:
            callback()
        else:
            self._callbacks.append(callback)

    def _close(self):
        if self.closed:
            return
        self.closed = True
        for callback in self._callbacks:
            try:
                callback()
            except Exception:
                log.exception("%s clean-up failed", self._what)
        self._callbacks = []


class _Sink(_ClosingStream):
    """What a Feed writes to; see ``Feed``."""

    def __init__(self, conn, chunked):
        self.conn, self.chunked = conn, chunked
        self.closed = False
        self.producer = None      # a Process to pause when the client lags
        self._callbacks = []

    def write(self, data: bytes):
        if self.closed or not data:
            return
        self.conn.write(chunk(data) if self.chunked else data)

    def end(self):
        if self.closed:
            return
        conn = self.conn
        if self.chunked:
            conn.write(b"0\r\n\r\n")
        self._close()
        conn.feed_done()


class _WebSocket(_ClosingStream):
    """The server side of one websocket; see ``Upgrade``."""

    _what = "websocket"

    def __init__(self, conn):
        self.conn = conn
        self.producer = None
        self.parser = WebSocketParser()
        self.closed = False
        self.close_sent = False
        self._on_message = None
        self._callbacks = []

    def send_text(self, text):
        if not self.close_sent:
            self.conn.write(ws_frame(WS_TEXT, text.encode("utf-8")))

    def send_binary(self, data):
        if not self.close_sent:
            self.conn.write(ws_frame(WS_BINARY, bytes(data)))

    def close(self, code=1000, reason=""):
        if self.close_sent:
            return
        self.close_sent = True
        self.conn.write(ws_frame(WS_CLOSE, struct.pack("!H", code) + reason.encode("utf-8")[:120]))
        self.conn.closing = True             # close the TCP connection once sent
        self.conn.flush()

    def on_message(self, callback):
        self._on_message = callback

    def feed(self, data):
        try:
            messages = self.parser.feed(data)
        except WebSocketError as exc:
            self.close(exc.code, str(exc))
            return
        for opcode, payload in messages:
            if opcode == WS_PING:
                self.conn.write(ws_frame(WS_PONG, payload))
            elif opcode == WS_CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1000
                self.close(code if code in (1000, 1001) else 1000)
                return
            elif opcode in (WS_TEXT, WS_BINARY):
                if opcode == WS_TEXT:
                    try:
                        payload.decode("utf-8")
                    except UnicodeDecodeError:
                        self.close(1007, "text message is not UTF-8")
                        return
                if self._on_message is not None:
                    self._on_message(opcode, payload)


def serve_file(req, root, rest) -> Reply:
    """The reply to a GET or HEAD of ``rest`` (a percent-decoded URL path)
    in the directory tree ``root``.

    Returns a Reply: 200 with the file, 304 when ``If-None-Match`` or
    ``If-Modified-Since`` says the client has it, 302 to ``DIR/`` for a
    directory asked without its slash (a directory is its index.html).
    Raises ApiError: 404 for what does not exist, 403 for anything
    outside ``root`` or not a regular file.

    What a caller may rely on: no byte from outside ``root`` is ever
    served.  ``..``, backslashes and NULs are refused before any lookup;
    the real path (symlinks resolved) must lie under the real root; and
    the file is checked again after it is opened (what ``/proc/self/fd``
    says was opened, and that it is a regular file), so a file or link
    swapped in between the checks and the open is refused too.  The open
    never blocks the loop (O_NONBLOCK: a FIFO swapped in returns at
    once).  The reply's type says charset=UTF-8 for text, and the server
    adds ``X-Content-Type-Options: nosniff`` (SECURITY_HEADERS) to it, as
    to every reply.  ``?v=...`` in the URL marks a versioned asset:
    cached for ten years.
    """
    segments = [s for s in rest.split("/") if s not in ("", ".")]
    if any(s == ".." or "\\" in s or "\0" in s for s in segments):
        raise ApiError(403, "forbidden", "path outside the site")
    real_root = os.path.realpath(root)
    path = os.path.realpath(os.path.join(real_root, *segments))
    if path != real_root and not path.startswith(real_root + os.sep):
        raise ApiError(403, "forbidden", "path outside the site")
    if os.path.isdir(path):
        if not req.path.endswith("/"):
            location = req.path + "/" + ("?" + req.target.split("?", 1)[1]
                                         if "?" in req.target else "")
            return Reply(302, b"", "text/plain", [("Location", location)])
        path = os.path.join(path, "index.html")
        if os.path.realpath(path) != path and not os.path.realpath(path).startswith(
                real_root + os.sep):
            raise ApiError(403, "forbidden", "path outside the site")
    try:
        st = os.stat(path)
    except OSError:
        raise ApiError(404, "not_found", "no such file") from None
    if not stat.S_ISREG(st.st_mode):
        raise ApiError(403, "forbidden", "not a regular file")
    etag = '"%x-%x"' % (st.st_mtime_ns, st.st_size)
    headers = [("Last-Modified", http_date(st.st_mtime)), ("ETag", etag),
               ("Cache-Control", "public, max-age=315360000" if "v" in req.query else "public")]
    inm = req.headers.get("if-none-match")
    ims = req.headers.get("if-modified-since")
    if inm is not None:
        if etag in [t.strip() for t in inm.split(",")] or inm.strip() == "*":
            return Reply(304, b"", None, headers)
    elif ims:
        try:
            since = lazy_import("email.utils").parsedate_to_datetime(ims).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            since = None
        if since is not None and int(st.st_mtime) <= since:
            return Reply(304, b"", None, headers)
    ctype, encoding = lazy_import("mimetypes").guess_type(path)
    ctype = ctype or "application/octet-stream"
    if ctype.startswith("text/") or ctype in ("application/javascript", "application/json"):
        ctype += "; charset=UTF-8"
    try:
        # O_NONBLOCK: a FIFO swapped in since the checks never blocks
        # the loop; then what was really opened is checked again
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        raise ApiError(403, "forbidden", "cannot read file") from None
    try:
        try:
            opened = os.readlink("/proc/self/fd/%d" % fd)
        except OSError:
            opened = path                    # no /proc: the checks above stand
        if not stat.S_ISREG(os.fstat(fd).st_mode) or not opened.startswith(real_root + os.sep):
            raise ApiError(403, "forbidden", "path outside the site")
        with open(fd, "rb", closefd=False) as f:
            body = f.read()
    except OSError:
        raise ApiError(403, "forbidden", "cannot read file") from None
    finally:
        os.close(fd)
    return Reply(200, body, ctype, headers)


def _public_path(path) -> bool:
    """What ``public_ping = true`` lets through without the token: the
    liveness and readiness checks a load balancer or an orchestrator
    makes (``/ping``, ``/ready``, ``/ready/NAME``)."""
    return path in ("/ping", "/ready") or (path.startswith("/ready/") and
                                            "/" not in path[len("/ready/"):])


class Connection:
    """One client connection: HTTP/1.x requests, then maybe a stream.

    Every state has a deadline and a bound on what it buffers, so that a
    client holds its slot in ``max_connections`` and its memory only as
    long as it makes progress (``rt`` is the endpoint's request_timeout):

    ==========  =====================================  ========================================
    state       deadline                               reading
    ==========  =====================================  ========================================
    handshake   rt after the accept, then closed       by the TLS layer
    idle        keepalive_timeout after the last byte  yes
    request     rt after its first byte, then 408      yes, up to ``input_limit``, else closed
    replying    rt without a byte sent, then closed    not while ``out`` > _SEND_HIGH_WATER,
                                                       nor between turns of a long pipeline
    feed        the same while it has unsent bytes;    only to see the client leave; over
                a quiet feed lasts as long as its      _FEED_INPUT_LIMIT of input, closed
                client
    websocket   as a feed                              not while ``out`` > STREAM_BUFFER_LIMIT
    closing     rt without a byte sent, then closed    no
    lingering   _LINGER after the FIN, then closed     read and dropped (``_linger``)
    ==========  =====================================  ========================================

    Not reading leaves the bytes in the kernel's buffers: a client that
    sends without reading then blocks in its own send().

    Connection(server, listener, sock, remote) takes over an accepted
    non-blocking socket (TLS is set up here when the listener has it).
    Methods for the server and for the stream in progress (``busy``, a
    Feed's sink or a websocket):
        write(data)      queue bytes in order; while a stream is open, what
                         one loop iteration writes goes out in one send().
                         Ignored once closed.
        flush()          after the last write of a closing connection.
        feed_done()      a Feed ended: go on with pipelined requests, or
                         close when the feed had no keep-alive.
        close()          idempotent; the stream's on_close callbacks run.

    What a caller may rely on:
      * Replies leave in the order of the requests, one request answered
        at a time; a Feed or a websocket holds the connection until it
        ends.
      * A handler's error never reaches the connection: ApiError becomes
        its JSON reply, anything else a 500 and a logged traceback
        (``_handle`` is that error boundary).
      * Once closed, the connection is out of the selector and of
        ``server.connections``, its timer is cancelled and its buffers
        are released: nothing it held outlives it.
    """

    def __init__(self, server, listener, sock, remote):
        self.server, self.listener, self.sock = server, listener, sock
        self.endpoint = listener.endpoint
        server.per_endpoint[self.endpoint.name] += 1
        self.loop = server.loop
        self.remote = remote
        self.fd = sock.fileno()
        self.parser = RequestParser(self.endpoint.max_body_size)
        # a request in progress needs at most its head and body, plus one read
        self.input_limit = (self.endpoint.max_body_size + MAX_REQUEST_LINE + MAX_HEADER_BYTES
                            + _RECV_SIZE)
        self.out = bytearray()
        self.closing = False              # close once ``out`` is sent
        self.lingering = False            # FIN sent; input dropped until the client's FIN
        self.closed = False
        self.reading = False              # the reader is registered
        self.sent = 0                     # bytes written to the socket
        self.received = 0                 # bytes read from it
        self.throttled = None             # stall-check handle while throttled
        self.busy = None                  # the _Sink or _WebSocket in progress
        self.turn = None                  # the next turn of a long pipeline, scheduled
        self.handshaking = listener.tls is not None
        self.continue_sent = False
        self.accepted = self.last_activity = self.progress = self.loop.time()
        self.request_started = None
        if self.handshaking:
            self.sock = listener.tls.wrap_socket(sock, server_side=True,
                                                 do_handshake_on_connect=False)
        self._update_reading()
        self.timer = self.loop.call_at(min(self._deadline()[0], self.accepted
                                           + self.endpoint.request_timeout), self._on_timer)

    # -- I/O -------------------------------------------------------------------------
    def _handshake(self) -> bool:
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            self.loop.remove_writer(self.fd)
            return False
        except ssl.SSLWantWriteError:
            self.loop.add_writer(self.fd, self._on_writable)
            return False
        except (ssl.SSLError, OSError) as exc:
            log.debug("TLS handshake with %s failed: %s", self.remote, exc)
            self.close()
            return False
        self.handshaking = False
        self.loop.remove_writer(self.fd)
        return True

    def _update_reading(self):
        """Watch the socket for input only while what is read can be
        bounded (see the class docstring)."""
        if self.closed:
            return
        if self.lingering:
            want = True
        elif self.closing or self.turn is not None:
            want = False
        elif isinstance(self.busy, _WebSocket):
            want = len(self.out) <= STREAM_BUFFER_LIMIT
        elif self.busy is not None:
            want = True
        else:
            want = len(self.out) <= _SEND_HIGH_WATER
        if want == self.reading:
            return
        self.reading = want
        if not want:
            self.loop.remove_reader(self.fd)
            return
        self.loop.add_reader(self.fd, self._on_readable)
        if self.listener.tls and not self.handshaking and self.sock.pending():
            self.loop.call_soon(self._on_readable)     # decrypted already: no wake-up comes

    def _on_readable(self):
        if self.closed or not self.reading:
            return
        if self.lingering:
            self._discard_input()
            return
        if self.handshaking and not self._handshake():
            return
        chunks = []
        data = self._recv()
        while data is not None:
            chunks.append(data)
            if not (self.listener.tls and self.sock.pending()):
                break
            data = self._recv()
        if self.closed or not chunks:
            return
        data = b"".join(chunks)
        self.received += len(data)
        self.last_activity = self.loop.time()
        if isinstance(self.busy, _WebSocket):
            self.busy.feed(data)
            return
        if self.request_started is None:
            self.request_started = self.last_activity
        self.parser.feed(data)
        limit = self.input_limit if self.busy is None else _FEED_INPUT_LIMIT
        if len(self.parser.buf) > limit:
            log.debug("closing %s: %d bytes of input not taken", self.remote, len(self.parser.buf))
            self.close()
            return
        self.answer_requests()

    def write(self, data: bytes):
        if self.closed:
            return
        if not self.out:
            self.progress = self.loop.time()       # the send deadline counts from here
        if self.busy is not None:
            # a stream: gather what this iteration produces, send it once
            pending = bool(self.out)
            self.out += data
            if len(self.out) > STREAM_BUFFER_LIMIT:
                self._throttle()
                if self.closed:
                    return
            if not pending:
                self.loop.call_soon(self._flush)
            self._update_reading()
            return
        if not self.out:
            try:
                n = self.sock.send(data)
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                n = 0
            except OSError:
                self.close()
                return
            self.sent += n
            data = data[n:]
            if not data:
                if self.closing:
                    self._linger()
                else:
                    self._update_reading()
                return
        self.out += data
        if len(self.out) > STREAM_BUFFER_LIMIT and self.busy is not None:
            self._throttle()
            if self.closed:
                return
        self.loop.add_writer(self.fd, self._on_writable)
        self._update_reading()

    def _throttle(self):
        """The client reads slower than its stream is made.  A process's
        output is paused until the client catches up (it then runs at the
        client's pace); a client that makes no progress for STALL_TIMEOUT,
        or whose feed cannot be paused, is dropped."""
        producer = self.busy.producer
        if producer is None or not producer.alive:
            self._drop("%d bytes unsent" % len(self.out))
        elif self.throttled is None:
            producer.pause_output(self)
            self.throttled = self.loop.call_later(STALL_TIMEOUT, self._check_stall, self.sent)

    def _check_stall(self, sent_before):
        if self.sent == sent_before:
            self._drop("no progress for %ss" % STALL_TIMEOUT)
        else:
            self.throttled = self.loop.call_later(STALL_TIMEOUT, self._check_stall, self.sent)

    def _unthrottle(self):
        if self.throttled is not None:
            self.throttled.cancel()
            self.throttled = None
            producer = getattr(self.busy, "producer", None)
            if producer is not None:
                producer.resume_output(self)

    def _drop(self, why):
        log.warning("dropping slow stream client %s: %s", self.remote or "(unix socket)", why)
        self.close()

    def flush(self):
        if not self.out and self.closing:
            self._linger()
        else:
            self._update_reading()

    def _flush(self):
        """Send what a stream gathered during one loop iteration."""
        if self.closed or not self.out:
            return
        self._on_writable()
        if self.out and not self.closed:
            self.loop.add_writer(self.fd, self._on_writable)

    def _on_writable(self):
        if self.handshaking:
            if self._handshake():
                self._on_readable()
            return
        try:
            n = self.sock.send(self.out)
        except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return
        except OSError:
            self.close()
            return
        del self.out[:n]
        self.sent += n
        if n:
            self.progress = self.loop.time()
        if self.throttled is not None and len(self.out) < STREAM_BUFFER_LIMIT // 2:
            self._unthrottle()
        if self.out:
            self._update_reading()
            return
        self.loop.remove_writer(self.fd)
        if self.closing:
            self._linger()
            return
        if self.busy is None and self.parser.buf:
            self.answer_requests()              # pipelined requests waiting
        self._update_reading()

    def _linger(self):
        """All is sent: end the connection.  Closing a socket with input
        unread makes the kernel answer with a reset, which can destroy
        the reply still in flight to the client (RFC 9112 9.6): so send
        FIN, then read and discard whatever the client still sends until
        it closes too, for _LINGER seconds at most."""
        if self.lingering or self.listener.tls is not None or self.busy is not None:
            self.close()
            return
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close()
            return
        self.lingering = self.closing = True
        self.parser.buf.clear()
        self.progress = self.loop.time()
        self.timer.cancel()
        self.timer = self.loop.call_at(self.progress + _LINGER, self._on_timer)
        self._update_reading()

    def _discard_input(self):
        for _ in range(4):
            if self._recv() is None:
                return

    def _recv(self):
        """The bytes the socket has, or None: nothing yet, or the peer
        has gone (the connection is closed then)."""
        data = read_nonblocking(self.sock.recv, _RECV_SIZE)
        if data == b"":
            self.close()
        return data or None

    def close(self):
        if self.closed:
            return
        self.closed = True
        self.reading = False
        self.loop.remove_reader(self.fd)
        self.loop.remove_writer(self.fd)
        self.timer.cancel()
        Loop.cancel(self.turn)
        self._unthrottle()
        try:
            self.sock.close()
        except OSError:
            pass
        self.server.connections.discard(self)
        self.server.per_endpoint[self.endpoint.name] -= 1
        if self.sent + self.received >= _RECV_SIZE:    # buffers worth giving back
            self.loop.trimmer.touch()
        self.out = bytearray()
        self.parser.buf.clear()
        busy, self.busy = self.busy, None
        if busy is not None:
            busy._close()

    # -- deadlines ---------------------------------------------------------------------
    def _deadline(self):
        """(when, what to do then) for the state the connection is in;
        ``when`` is None for a quiet stream, which lasts as long as its
        client (its end is seen: the socket is still read)."""
        ep = self.endpoint
        if self.handshaking:
            return self.accepted + ep.request_timeout, self._time_out_handshake
        if self.lingering:
            return self.progress + _LINGER, self.close
        if self.out:
            return self.progress + ep.request_timeout, self._time_out_send
        if self.busy is not None:
            return None, None
        if self.closing:
            return self.progress, self.close
        if not self.parser.idle:
            return (self.request_started or self.last_activity) + ep.request_timeout, \
                self._time_out_request
        return self.last_activity + ep.keepalive_timeout, self.close

    def _on_timer(self):
        """Act on the deadline that fell due, then arm the next one.  The
        timer never sleeps longer than request_timeout: a state entered
        meanwhile (a request begun, a reply left unsent) has a deadline at
        least that far away, so it is kept to the second without
        re-arming the timer on every request."""
        if self.closed:
            return
        now = self.loop.time()
        when, expire = self._deadline()
        if when is not None and now >= when:
            expire()
            if self.closed:
                return
            when, _ = self._deadline()
            if when is not None and when <= now:
                self.close()                    # a state that did not move on
                return
        limit = now + self.endpoint.request_timeout
        self.timer = self.loop.call_at(limit if when is None else min(when, limit), self._on_timer)

    def _time_out_handshake(self):
        log.debug("closing %s: no TLS handshake within %ss", self.remote,
                  self.endpoint.request_timeout)
        self.close()

    def _time_out_send(self):
        if self.busy is not None:
            self._drop("no progress for %ss" % self.endpoint.request_timeout)
            return
        log.debug("closing %s: %d bytes of replies unread for %ss", self.remote, len(self.out),
                  self.endpoint.request_timeout)
        self.close()

    def _time_out_request(self):
        self._send_error(HttpError(408, "request_timeout", "the request took too long"))

    # -- requests ----------------------------------------------------------------------
    def answer_requests(self):
        """Parse and answer the complete requests in the buffer, in order:
        _PIPELINE_TURN of them per loop iteration (one client's pipeline
        never holds up the others), and none while ``out`` is above its
        high-water mark (resumed from ``_on_writable``)."""
        if self.turn is not None:
            return
        handled = 0
        while not self.closed and not self.closing and self.busy is None:
            if len(self.out) > _SEND_HIGH_WATER:
                return
            if handled == _PIPELINE_TURN:
                self.turn = self.loop.call_soon(self._next_turn)
                self._update_reading()
                return
            try:
                req = self.parser.next()
            except HttpError as exc:
                self._send_error(exc)
                return
            if req is None:
                waiting = self.parser.waiting_body
                if waiting is not None and not self.continue_sent and \
                        waiting.headers.get("expect", "").lower() == "100-continue" and \
                        waiting.version == "HTTP/1.1":
                    self.continue_sent = True
                    self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                if self.parser.idle:
                    self.request_started = None
                return
            self.continue_sent = False
            self.request_started = None if self.parser.idle else self.loop.time()
            handled += 1
            self._handle(req)

    def _next_turn(self):
        self.turn = None
        self.answer_requests()
        self._update_reading()

    def _send_error(self, exc: HttpError):
        self.server.requests["%dxx" % (exc.status // 100)] += 1
        body = json_dumps({"error": exc.code, "message": exc.message})
        self.closing = True
        self.write(render_head(exc.status, [
            ("Date", self.server.date()), ("Content-Type", "application/json; charset=UTF-8"),
            ("Content-Length", len(body)), ("Connection", "close")] + SECURITY_HEADERS) + body)

    def _foreign_origin(self, req, host):
        """The origin of a cross-origin request, or None for a request of
        the daemon's own pages or of a program (no Origin).  ``Origin:
        null`` (sandboxed frames, file: pages, redirects) is foreign; so is
        a request without Origin that a browser marks ``Sec-Fetch-Site:
        cross-site`` or ``same-site`` (another port is another origin)."""
        origin = req.headers.get("origin")
        if origin is None:
            site = req.headers.get("sec-fetch-site", "").strip().lower()
            return "(%s request)" % site if site in ("cross-site", "same-site") else None
        own = "%s://%s" % ("https" if self.listener.tls else "http", host or "")
        return None if origin.lower() == own.lower() else origin

    def _security(self, req):
        """(error Reply or None, CORS headers) for ``req``.

        * Host: on a loopback bind only loopback names and server_names,
          against DNS rebinding.
        * Origin: a foreign origin may only read (GET, HEAD, OPTIONS; no
          websocket, which can write to a process) unless it is listed in
          cors_origins.  ``*`` there lets every origin read, never change.
        * Token: Bearer, or Basic with the token as password; a browser
          resends cached Basic credentials on its own, so for a foreign
          origin's state change only Bearer (set by the page's script)
          counts.  OPTIONS needs none: preflights carry no credentials.
        """
        ep = self.endpoint
        host = req.headers.get("host")
        if self.listener.loopback_tcp and host is not None and \
                not _host_is_loopback(host, [n.lower() for n in ep.server_names]):
            return json_reply(403, {"error": "forbidden_host", "message":
                                    "Host %r is not a loopback name; add it to server_names "
                                    "if it is really yours" % host}), []
        cors = []
        origin = self._foreign_origin(req, host)
        safe = req.method in SAFE_METHODS and \
            "websocket" not in req.headers.get("upgrade", "").lower()
        if origin is not None:
            listed = origin in ep.cors_origins
            if listed:
                cors = [("Access-Control-Allow-Origin", origin),
                        ("Access-Control-Allow-Methods", CORS_METHODS),
                        ("Access-Control-Max-Age", "86400"),
                        ("Access-Control-Allow-Headers", CORS_HEADERS),
                        ("Access-Control-Allow-Credentials", "true"), ("Vary", "Origin")]
            elif "*" in ep.cors_origins:
                cors = [("Access-Control-Allow-Origin", "*"),
                        ("Access-Control-Allow-Methods", CORS_READ_METHODS),
                        ("Access-Control-Max-Age", "86400"),
                        ("Access-Control-Allow-Headers", CORS_HEADERS)]
            if not safe and not listed:
                return json_reply(403, {"error": "forbidden_origin", "message":
                                        "cross-origin %s from %r refused; list the origin in "
                                        "cors_origins to allow it (cors_origins = * only "
                                        "allows reading)" % (req.method, origin)}), []
        if ep.auth_token and req.method != "OPTIONS" and \
                not (ep.public_ping and _public_path(req.path)) and \
                not token_matches(req.headers.get("authorization", ""), ep.auth_token,
                                  basic=origin is None or safe):
            return json_reply(401, {"error": "unauthorized", "message":
                                    "send the token as 'Authorization: Bearer TOKEN'" +
                                    ("" if origin is None or safe else
                                     " (a cross-origin change needs Bearer, not Basic)")},
                              [("WWW-Authenticate", 'Bearer realm="gafferd"'),
                               ("WWW-Authenticate", 'Basic realm="gafferd"')]), cors
        return None, cors

    def _handle(self, req):
        req.remote, req.endpoint = self.remote, self.endpoint
        req.scheme = "https" if self.listener.tls else "http"
        denied, cors = self._security(req)
        if denied is not None:
            self._reply(req, denied, cors)
            return
        if req.method not in KNOWN_METHODS:
            self._reply(req, json_reply(501, {"error": "not_implemented",
                                              "message": "unknown method %s" % req.method}), cors)
            return
        try:
            result = self.server.api.dispatch(req)
            if isinstance(result, StaticFile):
                result = serve_file(req, result.root, result.path)
        except ApiError as exc:
            result = json_reply(exc.status, {"error": exc.code, "message": exc.message},
                                exc.headers)
        except Exception:
            log.exception("error while handling %s %s", req.method, req.path)
            result = json_reply(500, {"error": "internal_error",
                                      "message": "the daemon hit a bug; see its log"})
        if isinstance(result, Feed):
            self._start_feed(req, result, cors)
        elif isinstance(result, Upgrade):
            self._upgrade(req, result)
        else:
            self._reply(req, result, cors)

    def _reply(self, req, reply: Reply, extra=()):
        self.server.requests["%dxx" % (reply.status // 100)] += 1
        keep = req.keep_alive and not self.closing
        headers = [("Date", self.server.date()), ("Server", "gafferd/" + GAFFERD_VERSION)]
        # 1xx, 204 and 304 have no body and must not say they have one
        # (RFC 9110 8.6); a HEAD reply gives the GET's length
        if reply.status not in (204, 304) and not 100 <= reply.status < 200:
            headers.append(("Content-Length", len(reply.body)))
        if reply.content_type:
            headers.append(("Content-Type", reply.content_type))
        headers.extend(reply.headers)
        headers.extend(extra)
        headers.extend(SECURITY_HEADERS)
        if not keep:
            headers.append(("Connection", "close"))
            self.closing = True
        elif req.version == "HTTP/1.0":
            headers.append(("Connection", "keep-alive"))
        body = b"" if req.method == "HEAD" or reply.status in (204, 304) else reply.body
        self.write(render_head(reply.status, headers) + body)

    def _start_feed(self, req, feed: Feed, extra):
        self.server.requests["2xx"] += 1
        chunked = req.version == "HTTP/1.1"
        headers = [("Date", self.server.date()), ("Server", "gafferd/" + GAFFERD_VERSION),
                   ("Content-Type", feed.content_type)] + feed.headers + list(extra) + \
            SECURITY_HEADERS
        if req.method == "HEAD":
            # a stream has no length to announce: say 0, so that the
            # client does not wait for a body, and do not open the stream
            headers.append(("Content-Length", 0))
            self.write(render_head(feed.status, headers))
            return
        # HTTP/1.0 has no chunked encoding: the body ends with the connection
        if chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        if not chunked or not req.keep_alive:
            headers.append(("Connection", "close"))
        self.feed_keep_alive = chunked and req.keep_alive
        self._grow_send_buffer()
        self.write(render_head(feed.status, headers))
        if self.closed:
            return
        sink = self.busy = _Sink(self, chunked)
        try:
            feed.opener(sink)
        except Exception:
            log.exception("error while opening a stream for %s", req.path)
            sink.end()

    def _grow_send_buffer(self):
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _STREAM_SEND_BUFFER)
        except OSError:
            pass

    def feed_done(self):
        """A Feed ended: go on with pipelined requests, or close."""
        self.busy = None
        if not self.feed_keep_alive:
            self.closing = True
            self.flush()
            return
        if not self.out:
            self.loop.call_soon(self.process)
        self._update_reading()

    def _upgrade(self, req, upgrade: Upgrade):
        key = req.headers.get("sec-websocket-key", "")
        try:
            key_ok = len(base64.b64decode(key, validate=True)) == 16
        except ValueError:
            key_ok = False
        if "websocket" not in req.headers.get("upgrade", "").lower() or \
                "upgrade" not in req.headers.get("connection", "").lower() or \
                req.headers.get("sec-websocket-version", "").strip() != "13" or not key_ok:
            self._reply(req, json_reply(400, {"error": "bad_websocket_handshake", "message":
                                              "this URL takes an RFC 6455 websocket"}),
                        [("Sec-WebSocket-Version", "13")])
            return
        self.server.requests["1xx"] += 1
        self._grow_send_buffer()
        self.write(render_head(101, [("Upgrade", "websocket"), ("Connection", "Upgrade"),
                                     ("Sec-WebSocket-Accept", ws_accept_key(key))]
                               + SECURITY_HEADERS))
        ws = self.busy = _WebSocket(self)
        # a client may send its first frames right behind the handshake,
        # in the same read: they are in the HTTP parser's buffer
        leftover = bytes(self.parser.buf)
        self.parser.buf.clear()
        try:
            upgrade.opener(ws)
        except Exception:
            log.exception("error while opening a websocket for %s", req.path)
            ws.close(1011)
        if leftover and not ws.closed:
            ws.feed(leftover)


# § 13 console output ---------------------------------------------------------
# Owns: ``-v`` (one line per lifecycle event) and ``-vv`` (also every line
# the children print), each event once, unlike gaffer 0.4.4.  Lines
# are ``HH:MM:SS name | text``, coloured per template on a terminal.
# Uses §5, §8.

_COLOURS = ["\x1b[36m", "\x1b[33m", "\x1b[32m", "\x1b[35m", "\x1b[31m", "\x1b[34m"]
_COLOURS += ["\x1b[1m" + c for c in _COLOURS]

# Every C0 control but TAB, DEL and every C1 control (ECMA-48 section 5):
# a child's ESC sequences could move the cursor, rewrite lines already
# shown, set the window title or, on some terminals, make the terminal
# type an answer; \r and \b would overwrite what the operator reads.
# They are shown as \xNN instead.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def escape_controls(text: str) -> str:
    """``text`` safe for a terminal: each control character as ``\\xNN``."""
    return _CONTROL.sub(lambda m: "\\x%02x" % ord(m.group()), text)


class Console(EventApplication):
    """The console application of ``-v``/``-vv``."""

    def __init__(self, stream_output=False, out=None):
        self.stream_output = stream_output
        self.out = out or sys.stdout
        self.colour = self.out.isatty() if hasattr(self.out, "isatty") else False
        self.colours = {}
        self.manager = None

    def _on_event(self, event, payload):
        if event.startswith("proc."):
            return                          # each event once: the bare form
        name = payload.get("name", "gafferd")
        if event == "exit":
            self.write(name, "exit process with pid %s: %s after %ss up%s" % (
                payload.get("os_pid"), exit_text(payload.get("exit_status"),
                                                 payload.get("term_signal")),
                payload.get("uptime"), "" if payload.get("restart_in") is None else
                ", restarting in %ss" % payload["restart_in"]))
        elif event == "state":
            self.write(name, "state %s (was %s)" % (payload.get("state"), payload.get("previous")))
        elif event == "limit":
            self.write(name, "limit process with pid %s: %s %s over %s for %ss, %s" % (
                payload.get("os_pid"), payload.get("limit"), payload.get("value"),
                payload.get("max"), payload.get("limit_for"), payload.get("action")))
        elif "os_pid" in payload:
            self.write(name, "%s process with pid %s" % (event, payload["os_pid"]))
            if event == "spawn" and self.stream_output:
                proc = self.manager.find_process(payload.get("pid"))
                for label in dict.fromkeys(proc.redirect_output if proc else ()):
                    # what was read between the spawn and this event
                    self._on_output(label, {"name": proc.name,
                                            "data": bytes(proc.rings[label].buf)})
                    proc.monitor_io(label, self._on_output)
        else:
            self.write(name, "%s %s" % (event, name))

    def _on_output(self, label, payload):
        for line in payload["data"].decode("utf-8", "replace").splitlines():
            if line.strip():
                self.write(payload["name"], line.strip())

    def write(self, name, text):
        """One line; ``name`` and ``text`` (child or client controlled) are
        escaped, only our own colour codes reach the terminal."""
        line = "%s %s | %s\n" % (time.strftime("%H:%M:%S"), escape_controls(name),
                                  escape_controls(text))
        if self.colour:
            colour = self.colours.setdefault(name, _COLOURS[len(self.colours) % len(_COLOURS)])
            line = colour + line.rstrip("\n") + "\x1b[0m\n"
        try:
            self.out.write(line)
            self.out.flush()
        except (OSError, ValueError):
            pass


# § 14 command-line client (ctl) -----------------------------------------------
# Owns: ``gafferd.py ctl``, a client of the HTTP API above: where it
# connects (-c FILE, --url, the environment), one request at a time with
# http.client, the server-sent-event feeds it follows and resumes, its
# commands and their exit statuses, and the ``top`` view (curses).
# Uses §1-§3 (JSON, read_config, build_endpoint, Address, parse_size)
# and parse_signal (§11).  Used by main() (§15).  This is blocking code
# that runs in a process of its own, never inside the daemon's loop: it
# may wait on sockets and run a thread per followed feed.

CTL_OK, CTL_REFUSED, CTL_USAGE, CTL_TIMEOUT, CTL_UNREACHABLE = 0, 1, 2, 3, 4
CTL_ROLLOUT_SILENCE = 4 * ROLLOUT_HEARTBEAT   # seconds of silence `ctl restart` bears
CTL_FEED_HEARTBEAT = 10          # seconds between keep-alives asked of a feed
CTL_FEED_TIMEOUT = 45.0          # a feed silent this long is a dropped connection
CTL_RETRY_MAX = 2.0              # longest pause between two reconnections


class CtlExit(Exception):
    """Ends a ctl command: ``status`` is the exit status, ``message`` (one
    line, or None) goes to stderr."""

    def __init__(self, status, message=None):
        super().__init__(message)
        self.status, self.message = status, message


class _UnixHTTPConnection:
    """Made on first use: an ``http.client.HTTPConnection`` over a unix socket."""
    cls = None

    @classmethod
    def make(cls, path, timeout):
        if cls.cls is None:
            client = lazy_import("http.client")

            class UnixHTTPConnection(client.HTTPConnection):
                def __init__(self, path, timeout):
                    super().__init__("localhost", timeout=timeout)
                    self.unix_path = path

                def connect(self):
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    sock.settimeout(self.timeout)
                    try:
                        sock.connect(self.unix_path)
                    except OSError:
                        sock.close()
                        raise
                    self.sock = sock
            cls.cls = UnixHTTPConnection
        return cls.cls(path, timeout)


class CtlTarget:
    """Where the client talks to the daemon, and how.

    ``url`` is ``http://HOST:PORT``, ``https://HOST:PORT`` or
    ``unix:/path``; ``origin`` says where it came from (``--url``,
    ``GAFFERD_URL``, a config file's endpoint, the default), for the
    message when nothing answers there.  ``token`` is sent as a Bearer
    token.  TLS: ``cafile`` (else the system's CAs, plus ``extra_ca``,
    the daemon's own certificate when it came from its config) or
    ``insecure`` (no verification at all)."""

    def __init__(self, url, origin, token=None, cafile=None, insecure=False, extra_ca=None):
        self.url, self.origin, self.token = url, origin, token
        self.cafile, self.insecure, self.extra_ca = cafile, insecure, extra_ca
        if url.startswith("unix:"):
            self.kind, self.path = "unix", os.path.abspath(url[5:])
            if not url[5:]:
                raise CtlExit(CTL_USAGE, "gafferd ctl: unix: needs a path (unix:/run/gafferd.sock)")
            return
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CtlExit(CTL_USAGE, "gafferd ctl: %r is not a URL like http://127.0.0.1:5000, "
                          "https://HOST:PORT or unix:/path" % url)
        try:
            self.port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise CtlExit(CTL_USAGE, "gafferd ctl: %r has a bad port" % url) from None
        self.kind, self.host = ("tls" if parts.scheme == "https" else "tcp"), parts.hostname
        self.prefix = parts.path.rstrip("/")

    def connection(self, timeout):
        """A new, not yet connected, ``http.client`` connection."""
        if self.kind == "unix":
            return _UnixHTTPConnection.make(self.path, timeout)
        client = lazy_import("http.client")
        if self.kind == "tcp":
            return client.HTTPConnection(self.host, self.port, timeout=timeout)
        ssl_module = load_ssl()
        if self.insecure:
            context = ssl_module._create_unverified_context()
        else:
            context = ssl_module.create_default_context(cafile=self.cafile)
            if self.extra_ca and not self.cafile:
                try:
                    context.load_verify_locations(self.extra_ca)
                except (OSError, ssl_module.SSLError):
                    pass                        # unreadable here: the system's CAs only
        return client.HTTPSConnection(self.host, self.port, timeout=timeout, context=context)

    def headers(self, extra=None) -> dict:
        out = {"Accept": "application/json"}
        if self.token:
            out["Authorization"] = "Bearer " + self.token
        out.update(extra or {})
        return out

    def unreachable(self, exc) -> CtlExit:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc) \
            or type(exc).__name__
        hint = "point the client elsewhere with --url URL (http://, https://, unix:/path), " \
               "-c CONFIG (the daemon's INI file) or GAFFERD_URL"
        if "CERTIFICATE" in str(exc).upper():
            hint = "trust its certificate with --cafile FILE, or skip the check with --insecure"
        # one line, and a password written into the URL is not repeated
        url = re.sub(r"//[^/@]*@", "//***@", self.url)
        return CtlExit(CTL_UNREACHABLE, "gafferd ctl: cannot reach gafferd at %s (%s): %s; %s"
                       % (url, self.origin, " ".join(str(reason).split()), hint))


def _token_from_file(path, what) -> str:
    try:
        with open(path) as f:
            token = f.read().strip()
    except OSError as exc:
        raise CtlExit(CTL_USAGE, "gafferd ctl: %s: cannot read %r: %s"
                      % (what, path, exc.strerror or exc)) from None
    if not token:
        raise CtlExit(CTL_USAGE, "gafferd ctl: %s: %r is empty" % (what, path))
    return token


def _endpoint_url(address, tls):
    """The URL a client uses for a listening Address (None: port 0, unknowable)."""
    if address.kind == "unix":
        return "unix:" + address.path
    if not address.port:
        return None
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(address.host, address.host)
    if ":" in host:
        host = "[%s]" % host
    return "%s://%s:%d" % ("https" if tls else "http", host, address.port)


def ctl_target_from_config(path):
    """(url, origin, token, certfile) of the first usable endpoint of the
    daemon's config ``path`` (the default endpoint, with the [gaffer]
    endpoint keys, when it opens none); CtlExit(2) for a bad file."""
    try:
        config = read_config(path, resolve=False)
        endpoints = config.endpoints or [build_endpoint(
            "default", {"bind": DEFAULT_BIND}, config.defaults, path, None, config.base_dir,
            resolve=False)]
    except ConfigErrors as exc:
        raise CtlExit(CTL_USAGE, "\n".join(str(e) for e in exc.errors)) from None
    except ConfigError as exc:
        raise CtlExit(CTL_USAGE, str(exc)) from None
    for endpoint in endpoints:
        for address in endpoint.addresses:
            url = _endpoint_url(address, endpoint.tls)
            if url:
                return (url, "[endpoint:%s] of %s" % (endpoint.name, path), endpoint.auth_token,
                        endpoint.certfile)
    raise CtlExit(CTL_USAGE, "gafferd ctl: %s: no endpoint with a fixed address (port 0 "
                  "cannot be found from the file); use --url" % path)


def ctl_target(args, environ) -> CtlTarget:
    """--url / GAFFERD_URL, else -c FILE, else the default endpoint; the
    token from --token / --token-file / GAFFERD_TOKEN, else the file's."""
    url, origin, token, certfile = None, None, None, None
    if args.config:
        url, origin, token, certfile = ctl_target_from_config(args.config)
    if environ.get("GAFFERD_URL"):
        url, origin = environ["GAFFERD_URL"], "from GAFFERD_URL"
    if args.url:
        url, origin = args.url, "from --url"
    if url is None:
        url, origin = "http://" + DEFAULT_BIND, "the default; the daemon was not named"
    if environ.get("GAFFERD_TOKEN"):
        token = environ["GAFFERD_TOKEN"]
    if args.token_file:
        token = _token_from_file(args.token_file, "--token-file")
    if args.token:
        token = args.token
    if token is not None and not re.fullmatch(r"[ -~\xa0-\xff]+", token):
        # said without the token itself: an error message must never show it
        raise CtlExit(CTL_USAGE, "gafferd ctl: the token holds a control character or one "
                      "beyond Latin-1, which an HTTP header cannot carry")
    return CtlTarget(url, origin, token, args.cafile, args.insecure, certfile)


class CtlReply:
    """A whole reply: ``status``, ``headers`` (lower-case names), ``body``."""

    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        try:
            return json.loads(self.body.decode("utf-8"))
        except ValueError:
            raise CtlExit(CTL_REFUSED, "gafferd ctl: the daemon's reply is not JSON: %r"
                          % self.body[:200]) from None

    def server_time(self):
        """Unix time from the reply's Date header (the daemon's clock),
        or None; the client reads no clock of its own for ages."""
        email_utils = lazy_import("email.utils")
        try:
            return float(email_utils.mktime_tz(email_utils.parsedate_tz(self.headers["date"])))
        except (KeyError, TypeError, ValueError):
            return None


def _refusal(status, body) -> CtlExit:
    """The API's JSON error as one line (exit status 1)."""
    try:
        error = json.loads(body.decode("utf-8"))
        message = str(error.get("message") or error.get("error"))
    except (ValueError, AttributeError):
        message = "HTTP %d: %s" % (status, body[:200].decode("utf-8", "replace").strip())
    return CtlExit(CTL_REFUSED, "gafferd ctl: " + " ".join(message.split()))


def ctl_open(target, method, path, body=None, headers=None, timeout=30.0):
    """Send a request; (connection, response) with the headers read.

    CtlExit(4) when nothing answers; the caller reads and closes."""
    conn = target.connection(timeout)
    try:
        conn.request(method, getattr(target, "prefix", "") + path, body=body,
                     headers=target.headers(headers))
        return conn, conn.getresponse()
    except (OSError, lazy_import("http.client").HTTPException) as exc:
        conn.close()
        raise target.unreachable(exc) from None


def ctl_call(target, method, path, body=None, ok=(200,), timeout=30.0) -> CtlReply:
    """One request, its whole reply; a status not in ``ok`` is the API
    refusing: CtlExit(1) with its message."""
    if isinstance(body, (dict, list)):
        body = json_dumps(body)
    conn, resp = ctl_open(target, method, path, body, timeout=timeout)
    try:
        data = resp.read()
    except (OSError, lazy_import("http.client").HTTPException) as exc:
        raise target.unreachable(exc) from None
    finally:
        conn.close()
    if resp.status not in ok:
        raise _refusal(resp.status, data)
    return CtlReply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)


def sse_read(resp):
    """Yield (id, event, data lines) for each server-sent event of ``resp``
    (WHATWG HTML 9.2: ``:`` comments skipped, a blank line dispatches);
    returns at the end of the stream.  ``id`` is None when not sent."""
    event_id, event, data = None, None, []
    while True:
        line = resp.readline()
        if not line:
            return
        line = line.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if event is not None or data:
                yield event_id, event or "message", data
            event_id, event, data = None, None, []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "id":
            event_id = value
        elif field == "event":
            event = value
        elif field == "data":
            data.append(value)


class CtlFeed:
    """A server-sent-event feed that survives dropped connections.

    ``events()`` yields (id, event, data lines); when the connection ends
    early, it connects again, sending the last id seen as
    ``Last-Event-ID`` so the daemon replays what was missed.  ``on_connect``
    runs after each (re)connection, once the daemon has the feed (and so
    will report everything that happens from then on).  ``still_wanted``,
    if given, is asked before each reconnection: True goes on, False ends
    ``events()``, None (the daemon is away) asks again a little later.
    ``close()`` from another thread ends ``events()``."""

    def __init__(self, target, path, last_id=None, on_connect=None, still_wanted=None):
        self.target, self.path, self.last_id = target, path, last_id
        self.on_connect = on_connect
        self.still_wanted = still_wanted
        self.closed = False
        self._conn = None
        self.connections = 0            # counts (re)connections
        self.start_offset = None        # the last one's Gafferd-Stream-Offset

    def close(self):
        self.closed = True
        conn = self._conn
        if conn is not None and conn.sock is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def connect(self):
        """The first connection (CtlExit 4 / 1 when it fails)."""
        self._open()

    def _open(self):
        headers = {"Accept": "text/event-stream"}
        if self.last_id is not None:
            headers["Last-Event-ID"] = str(self.last_id)
        sep = "&" if "?" in self.path else "?"
        conn, resp = ctl_open(self.target, "GET", "%s%sfeed=eventsource&heartbeat=%d" % (
            self.path, sep, CTL_FEED_HEARTBEAT), headers=headers, timeout=CTL_FEED_TIMEOUT)
        if resp.status != 200:
            try:
                data = resp.read()
            except (OSError, lazy_import("http.client").HTTPException):
                data = b""
            conn.close()
            raise _refusal(resp.status, data)
        if not (resp.getheader("Content-Type") or "").startswith("text/event-stream"):
            conn.close()                    # not gafferd: reconnecting would never end
            raise CtlExit(CTL_REFUSED, "gafferd ctl: %s answered %s with %r, not an event "
                          "stream: is gafferd listening there?" % (
                              self.target.url, self.path, resp.getheader("Content-Type")))
        if self.on_connect is not None:
            try:
                self.on_connect()
            except BaseException:
                conn.close()
                raise
        offset = resp.getheader("Gafferd-Stream-Offset") or ""
        self.start_offset = int(offset) if is_ascii_digits(offset) else None
        self.connections += 1
        self._conn, self._resp = conn, resp

    def events(self):
        delay, again = 0.05, False
        client = lazy_import("http.client")
        pause = threading.Event()
        while not self.closed:
            if self._conn is None:
                verdict = self.still_wanted() if again and self.still_wanted else True
                if verdict is False:
                    return
                try:
                    if verdict is None:
                        raise CtlExit(CTL_UNREACHABLE)
                    self._open()
                    delay = 0.05
                except CtlExit as exc:
                    if exc.status != CTL_UNREACHABLE or self.closed:
                        raise
                    pause.wait(delay)              # the daemon restarting: try again
                    delay = min(delay * 2, CTL_RETRY_MAX)
                    continue
            try:
                for event_id, event, data in sse_read(self._resp):
                    if event_id is not None:
                        self.last_id = event_id
                    yield event_id, event, data
            except (OSError, client.HTTPException, ValueError):
                pass                               # dropped: resumed below
            self._conn.close()
            self._conn, again = None, True


# -- names -------------------------------------------------------------------

def ctl_matcher(names):
    """A predicate on template names: ``all`` (every template), ``web:``
    (the group web), or exact names."""
    names = list(names)
    if "all" in names:
        return lambda name: True
    groups = tuple(n for n in names if n.endswith(":"))
    exact = set(n for n in names if not n.endswith(":"))
    return lambda name: name in exact or name.startswith(groups)


def ctl_templates(target, names, refuse_unknown=True) -> list:
    """Template names that ``names`` (``all``, ``web:``, names) stand for,
    in the daemon's order; an unknown exact name or empty group is
    CtlExit(1)."""
    known = ctl_call(target, "GET", "/processes").json()
    matches = ctl_matcher(names)
    found = [n for n in known if matches(n)]
    if refuse_unknown:
        for name in names:
            if name == "all":
                continue
            if name.endswith(":") and not any(n.startswith(name) for n in known):
                raise CtlExit(CTL_REFUSED, "gafferd ctl: no template in group %r" % name[:-1])
            if not name.endswith(":") and name not in known:
                raise CtlExit(CTL_REFUSED, "gafferd ctl: no template named %r" % name)
    return found


def _quote(name) -> str:
    return urllib.parse.quote(name, safe=":")


# -- formatting --------------------------------------------------------------

_CTL_COLOURS = ("36", "33", "32", "35", "34", "91", "92", "93", "94", "95", "96")


def ctl_use_colour(stream, environ) -> bool:
    """Colour only on a terminal, and never with NO_COLOR set (no-color.org)."""
    return "NO_COLOR" not in environ and hasattr(stream, "isatty") and stream.isatty()


def ctl_duration(seconds) -> str:
    """``42s``, ``5m07s``, ``3h02m``, ``2d04h``."""
    if seconds is None:
        return "-"
    s = int(max(0, seconds))
    if s < 60:
        return "%ds" % s
    if s < 3600:
        return "%dm%02ds" % (s // 60, s % 60)
    if s < 86400:
        return "%dh%02dm" % (s // 3600, s // 60 % 60)
    return "%dd%02dh" % (s // 86400, s // 3600 % 24)


def ctl_exit_text(last_exit) -> str:
    """A last exit as ``0``, ``1`` or ``SIGKILL``; ``-`` before the first."""
    if not last_exit:
        return "-"
    if last_exit.get("term_signal"):
        try:
            return signal.Signals(last_exit["term_signal"]).name
        except ValueError:
            return "signal %s" % last_exit["term_signal"]
    return str(last_exit.get("exit_status"))


def ctl_table(rows, header) -> list:
    """Lines of a left-aligned table (the last column is not padded)."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    return ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
            for r in [header] + rows]


def _mem_bytes(stats) -> int:
    total = 0
    for entry in stats:
        try:
            total += parse_size(str(entry.get("mem_info1") or 0))
        except ValueError:
            pass
    return total


STATUS_HEADER = ("NAME", "STATE", "READY/RUN/WANT", "PIDS", "UPTIME", "RESTARTS", "LAST EXIT",
                 "CPU", "MEM")
PROCESS_HEADER = ("NAME#ID", "STATE", "PID", "UPTIME", "RESTARTS", "CPU", "MEM", "STATUS")


def ctl_status_rows(statuses, stats, now) -> list:
    """One row per template: ``statuses`` maps names to ``GET
    /status/NAME`` replies, ``stats`` names to ``GET /stats/NAME``'s."""
    rows = []
    for name, st in statuses.items():
        procs = st.get("processes") or []
        sinces = [p["since"] for p in procs if p.get("os_pid") and p.get("since")]
        s = stats.get(name) or {}
        per = s.get("stats") or []
        rows.append((name, st.get("state", "?"), "%s/%s/%s" % (
            st.get("ready", "-"), st.get("running", 0), st.get("max_processes", 0)),
            ",".join(str(p["os_pid"]) for p in procs if p.get("os_pid")) or "-",
            ctl_duration(now - min(sinces)) if sinces and now else "-",
            st.get("restarts", 0), ctl_exit_text(st.get("last_exit")),
            "%.1f%%" % sum(x.get("cpu") or 0 for x in per) if per else "-",
            human_size(_mem_bytes(per)) if per else "-"))
    return rows


def ctl_process_rows(statuses, stats, now) -> list:
    """One row per process slot."""
    rows = []
    for name, st in statuses.items():
        by_id = {x.get("id"): x for x in (stats.get(name) or {}).get("stats") or []}
        for p in st.get("processes") or []:
            x = by_id.get(p.get("id"))
            rows.append(("%s#%s" % (name, p.get("id") or "-"), p.get("state", "?"),
                         p.get("os_pid") or "-",
                         ctl_duration(now - p["since"]) if now and p.get("since") else "-",
                         p.get("restarts", 0), "%.1f%%" % (x.get("cpu") or 0) if x else "-",
                         human_size(_mem_bytes([x])) if x else "-", p.get("status_text") or ""))
    return rows


def ctl_statuses(target, names):
    """(statuses, stats, now) of the templates ``names`` stand for."""
    reply = ctl_call(target, "GET", "/status")
    every = reply.json()
    now = reply.server_time()
    wanted = ctl_templates(target, names) if names else list(every)
    statuses = collections.OrderedDict()
    for name in wanted:
        statuses[name] = ctl_call(target, "GET", "/status/" + _quote(name)).json()
    stats = {}
    for item in ctl_call(target, "GET", "/stats").json():
        if isinstance(item, dict) and item.get("name") in statuses:
            stats[item["name"]] = item
    return statuses, stats, now


# -- logs --------------------------------------------------------------------

class CtlLogs:
    """Follow the output of every process of the templates ``matches``
    accepts, including the ones started later, into ``put((name, id,
    line))``.

    One feed of ``spawn`` events (resumed by event id) says when a process
    starts; each (re)connection of it also lists the live processes, so a
    spawn missed while disconnected is found too.  Each process has a
    thread that follows ``/streams/ID/LABEL``, resumed by byte offset, so
    nothing is lost or repeated across dropped connections.  A process is
    known by (id, os_pid): after a daemon restart, ids start again at 1."""

    def __init__(self, target, matches, label_index, put, tail=10, follow=True):
        self.target, self.matches, self.label_index = target, matches, label_index
        self.put, self.tail = put, tail
        self.known = set()
        self.lock = threading.Lock()
        self.feeds = []
        self.first_scan = True
        self.labels = {}
        self.watch = CtlFeed(target, "/watch/spawn", on_connect=self._scan)

    def start(self):
        """Connect (CtlExit when the daemon refuses or is away), then follow
        in daemon threads."""
        self.watch.connect()
        thread = threading.Thread(target=self._run_watch, daemon=True)
        thread.start()

    def close(self):
        self.watch.close()
        with self.lock:
            for feed in self.feeds:
                feed.close()

    def _label(self, name):
        if name not in self.labels:
            try:
                labels = ctl_call(self.target, "GET", "/processes/" + _quote(name)).json().get(
                    "redirect_output") or []
            except CtlExit:
                labels = []
            if isinstance(labels, str):
                labels = parse_list(labels)
            self.labels[name] = labels[self.label_index] if len(labels) > self.label_index \
                else ("stdout", "stderr")[self.label_index]
        return self.labels[name]

    def _scan(self):
        """Every live process of the templates, on each (re)connection."""
        tail, self.first_scan = (self.tail if self.first_scan else None), False
        for name in ctl_call(self.target, "GET", "/processes").json():
            if not self.matches(name):
                continue
            try:
                status = ctl_call(self.target, "GET", "/status/" + _quote(name)).json()
            except CtlExit as exc:
                if exc.status == CTL_REFUSED:
                    continue                        # removed meanwhile
                raise
            for proc in status.get("processes") or []:
                if proc.get("id") and proc.get("os_pid"):
                    self._follow(name, proc["id"], proc["os_pid"], tail)

    def _run_watch(self):
        try:
            for _, event, data in self.watch.events():
                try:
                    payload = json.loads("\n".join(data))
                except ValueError:
                    continue
                if event == "missed":
                    self._scan()
                elif event == "spawn" and self.matches(payload.get("name", "")):
                    self._follow(payload["name"], payload["pid"], payload.get("os_pid"), None)
        except CtlExit as exc:
            self.put((None, None, exc))

    def _follow(self, name, pid, os_pid, tail):
        with self.lock:
            if (pid, os_pid) in self.known:
                return
            self.known.add((pid, os_pid))
        thread = threading.Thread(target=self._run_stream, args=(name, pid, os_pid, tail),
                                  daemon=True)
        thread.start()

    def _still_there(self, pid, os_pid):
        """Before a stream reconnects: is its process still alive (True:
        the connection dropped), gone, or replaced by another with the
        same id after a daemon restart (False: its feed is over)?  None
        while the daemon cannot be asked."""
        try:
            reply = ctl_call(self.target, "GET", "/processes/%d" % pid, ok=(200, 404))
        except CtlExit as exc:
            return None if exc.status == CTL_UNREACHABLE else False
        return reply.status == 200 and reply.json().get("os_pid") == os_pid

    def _run_stream(self, name, pid, os_pid, tail):
        label = self._label(name)
        path = "/streams/%d/%s" % (pid, _quote(label))
        if tail is not None:
            path += "?tail=%d" % tail
        # A process started after we began is read from its first byte.
        feed = CtlFeed(self.target, path, last_id=0 if tail is None else None,
                       still_wanted=lambda: self._still_there(pid, os_pid))
        with self.lock:
            self.feeds.append(feed)
        offset, connection = feed.last_id, 0
        partial = ""
        try:
            for event_id, _, data in feed.events():
                if feed.connections != connection:
                    connection = feed.connections
                    if feed.start_offset is not None:
                        if partial and feed.start_offset != offset:
                            self.put((name, pid, partial))      # the rest is lost
                            partial = ""
                        offset = feed.start_offset
                text = "\n".join(data)
                new = int(event_id) if event_id and event_id.isdigit() else None
                # The event id is the byte offset after the chunk: one more
                # byte than its lines means it ended with a line end.
                whole = offset is None or new is None or \
                    new - offset > len(text.encode("utf-8"))
                offset = new if new is not None else offset
                lines = (partial + text).split("\n")
                partial = "" if whole else lines.pop()
                for line in lines:
                    self.put((name, pid, line))
        except CtlExit as exc:
            if exc.status != CTL_REFUSED:
                self.put((None, None, exc))
        if partial:
            self.put((name, pid, partial))
        with self.lock:
            self.feeds.remove(feed)


def ctl_log_prefix(name, pid, colour) -> str:
    text = "%s#%s |" % (name, pid) if pid is not None else "%s |" % name
    if not colour:
        return text
    code = _CTL_COLOURS[sum(name.encode("utf-8")) % len(_CTL_COLOURS)]
    return "\033[%sm%s\033[0m" % (code, text)


# -- commands ----------------------------------------------------------------

def _out(line=""):
    sys.stdout.write(line + "\n")


def ctl_cmd_status(target, args):
    statuses, stats, now = ctl_statuses(target, args.names)
    if args.json:
        for name, st in statuses.items():
            st["stats"] = (stats.get(name) or {}).get("stats", [])
        _out(json.dumps(statuses, indent=2))
        return CTL_OK
    if args.processes:
        lines = ctl_table(ctl_process_rows(statuses, stats, now), PROCESS_HEADER)
    else:
        lines = ctl_table(ctl_status_rows(statuses, stats, now), STATUS_HEADER)
    for line in lines:
        _out(line)
    return CTL_OK


def _act(target, names, action, done, timeout=30.0):
    """POST an action to each template; a refusal is reported and the
    others still get theirs; exit 1 if any was refused."""
    try:
        templates = ctl_templates(target, names)
    except CtlExit as exc:
        if exc.status != CTL_REFUSED:
            raise
        print(exc.message, file=sys.stderr)
        return CTL_REFUSED
    return _each(target, templates, "POST", "/" + action, done, timeout)


def _each(target, templates, method, suffix, done, timeout=30.0):
    """``method /processes/NAME<suffix>`` for each template, saying
    ``NAME: <done>``; a refusal, or a reply that says ``"ok": false`` (a
    rolling restart that failed), is reported and the others still get
    theirs; exit 1 if any was refused.  ``timeout``: the longest silence
    of the daemon while it answers."""
    status = CTL_OK
    for name in templates:
        try:
            reply = ctl_call(target, method, "/processes/" + _quote(name) + suffix,
                             timeout=timeout)
            try:
                result = json.loads(reply.body.decode("utf-8"))
            except ValueError:
                result = None
            if isinstance(result, dict) and result.get("ok") is False:
                print("%s: %s failed: %s" % (name, "rolling restart" if "rolling" in result
                                             else suffix.lstrip("/"),
                                             result.get("reason") or result.get("result")),
                      file=sys.stderr)
                status = CTL_REFUSED
                continue
            _out("%s: %s" % (name, done))
        except CtlExit as exc:
            if exc.status != CTL_REFUSED:
                raise
            print("%s: %s" % (name, exc.message.split(": ", 1)[-1]), file=sys.stderr)
            status = CTL_REFUSED
    return status


def ctl_cmd_start(target, args):
    return _act(target, args.names, "_start", "started")


def ctl_cmd_stop(target, args):
    return _act(target, args.names, "_stop", "stopped")


def ctl_cmd_restart(target, args):
    # a rolling restart answers as it goes and may take many minutes: its
    # reply sends a blank every ROLLOUT_HEARTBEAT seconds while a step waits
    return _act(target, args.names, "_restart", "restarted", timeout=CTL_ROLLOUT_SILENCE)


def ctl_cmd_scale(target, args):
    text = args.count
    if not re.fullmatch(r"[+-]?[0-9]{1,9}", text, re.ASCII):
        raise CtlExit(CTL_USAGE, "gafferd ctl scale: %r is not N, +N or -N" % text)
    path = "/processes/" + _quote(args.name)
    if text[0] in "+-":
        action = "_add" if text[0] == "+" else "_sub"
        reply = ctl_call(target, "POST", "%s/%s/%d" % (path, action, int(text[1:]))).json()
    else:
        wanted = ctl_call(target, "GET", "/status/" + _quote(args.name)).json()["max_processes"]
        diff = int(text) - wanted
        reply = ctl_call(target, "POST", "%s/%s/%d" % (path, "_add" if diff >= 0 else "_sub",
                                                       abs(diff))).json()
    _out("%s: %s process(es)" % (args.name, reply.get("numprocesses")))
    return CTL_OK


def ctl_cmd_signal(target, args):
    try:
        number = parse_signal(args.signal)
    except ApiError as exc:
        raise CtlExit(CTL_USAGE, "gafferd ctl signal: " + exc.message) from None
    return _act(target, args.names, "_signal/%d" % number,
                "sent %s" % signal.Signals(number).name if number in set(
                    s.value for s in signal.Signals) else "sent signal %d" % number)


def ctl_templates_from_file(path) -> list:
    """Template definitions (dicts for ``POST /processes``) from a JSON
    file (one object or a list) or an INI file's ``[process:NAME]``
    sections (with their ``[env:NAME]``; values as written, relative paths
    from the file's directory as in the daemon's own config)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise CtlExit(CTL_USAGE, "gafferd ctl add: cannot read %r: %s"
                      % (path, exc.strerror or exc)) from None
    text = raw.decode("utf-8", "replace")
    if text.lstrip().startswith(("{", "[")) and not text.lstrip().startswith("[process:"):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise CtlExit(CTL_USAGE, "gafferd ctl add: %s: not JSON: %s" % (path, exc)) from None
        data = data if isinstance(data, list) else [data]
        if not all(isinstance(d, dict) for d in data):
            raise CtlExit(CTL_USAGE, "gafferd ctl add: %s: give an object or a list of objects"
                          % path)
        return data
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text, source=path)
    except configparser.Error as exc:
        raise CtlExit(CTL_USAGE, "gafferd ctl add: %s: %s" % (path, " ".join(str(exc).split())))
    base = os.path.dirname(os.path.abspath(path))
    out = []
    for section in parser.sections():
        kind, _, name = section.partition(":")
        if kind != "process" or not name:
            continue
        definition = {"name": name}
        definition.update(parser.items(section))
        definition["cwd"] = os.path.normpath(os.path.join(base, definition.get("cwd", ".")))
        if parser.has_section("env:" + name):
            definition["env"] = {k.upper(): v for k, v in parser.items("env:" + name)}
        out.append(definition)
    if not out:
        raise CtlExit(CTL_USAGE, "gafferd ctl add: %s has no [process:NAME] section" % path)
    return out


def ctl_cmd_add(target, args):
    status = CTL_OK
    for definition in ctl_templates_from_file(args.file):
        try:
            reply = ctl_call(target, "POST", "/processes", definition).json()
            for warning in (reply.get("warnings") if isinstance(reply, dict) else None) or []:
                print("warning: %s: %s" % (definition.get("name"), warning), file=sys.stderr)
            _out("%s: added" % definition.get("name"))
        except CtlExit as exc:
            if exc.status != CTL_REFUSED:
                raise
            print("%s: %s" % (definition.get("name"), exc.message.split(": ", 1)[-1]),
                  file=sys.stderr)
            status = CTL_REFUSED
    return status


def ctl_cmd_rm(target, args):
    return _each(target, ctl_templates(target, args.names), "DELETE", "", "removed")


def _recent_output(target, names, lines, label_index, colour):
    for name in ctl_templates(target, names):
        status = ctl_call(target, "GET", "/status/" + _quote(name)).json()
        definition = ctl_call(target, "GET", "/processes/" + _quote(name)).json()
        labels = definition.get("redirect_output") or []
        labels = parse_list(labels) if isinstance(labels, str) else labels
        label = labels[label_index] if len(labels) > label_index else \
            ("stdout", "stderr")[label_index]
        ids = [p["id"] for p in status.get("processes") or [] if p.get("id")]
        for pid in ids or [None]:
            query = "lines=%d&label=%s" % (lines, _quote(label))
            if pid is not None:
                query += "&pid=%d" % pid
            reply = ctl_call(target, "GET", "/processes/%s/_log?%s" % (_quote(name), query))
            prefix = ctl_log_prefix(name, pid, colour)
            for line in reply.json().get("lines") or []:
                _out("%s %s" % (prefix, line))


def ctl_cmd_logs(target, args):
    colour = ctl_use_colour(sys.stdout, os.environ)
    label_index = 1 if args.stderr else 0
    if not args.follow:
        _recent_output(target, args.names, args.lines, label_index, colour)
        return CTL_OK
    ctl_templates(target, args.names)                      # unknown names: exit 1
    lines = lazy_import("queue").Queue()
    logs = CtlLogs(target, ctl_matcher(args.names), label_index, lines.put, tail=args.lines)
    logs.start()
    try:
        while True:
            name, pid, line = lines.get()
            if name is None:
                raise line
            _out("%s %s" % (ctl_log_prefix(name, pid, colour), line))
            sys.stdout.flush()
    finally:
        logs.close()


def ctl_event_line(payload) -> str:
    """``spawn web pid=3 os_pid=1234``: an event as one line."""
    rest = " ".join("%s=%s" % (k, json.dumps(v) if not isinstance(v, str) else v)
                    for k, v in payload.items() if k not in ("event", "name"))
    return " ".join(p for p in (time.strftime("%H:%M:%S"), payload.get("event", "?"),
                                str(payload.get("name", "")), rest) if p)


def ctl_cmd_events(target, args):
    path = "/watch" + "".join("/" + _quote(p) for p in (args.pattern or "").split(".") if p)
    feed = CtlFeed(target, path)
    feed.connect()
    seen = 0
    for _, event, data in feed.events():
        try:
            payload = json.loads("\n".join(data))
        except ValueError:
            continue
        _out(json.dumps(payload) if args.json else ctl_event_line(payload))
        sys.stdout.flush()
        seen += 1
        if args.count and seen >= args.count:
            return CTL_OK
    return CTL_OK


def ctl_cmd_reload(target, args):
    reply = ctl_call(target, "POST", "/reload" + ("?dry_run=1" if args.dry_run else ""))
    result = reply.json()
    for warning in result.get("warnings") or []:
        print("warning: %s" % warning, file=sys.stderr)
    verb = "would be " if args.dry_run else ""
    for key in ("added", "removed", "changed"):
        _out("%s%s: %s" % (verb, key, ", ".join(result.get(key) or []) or "-"))
    return CTL_OK


def _waited(status, ready) -> bool:
    if status.get("state") in ("completed", "scheduled"):     # a task, a periodic job: done
        return True
    wanted = status.get("max_processes", 0)
    if ready:
        return status.get("state") == "running" and status.get("ready", 0) >= wanted
    return status.get("state") == "running" or 0 < wanted <= status.get("running", 0)


def ctl_cmd_wait(target, args):
    """Event-driven: the feed is opened first, then every template is
    checked, and checked again on each of its events."""
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    names = ctl_templates(target, args.names)
    pending = set(names)
    feed = CtlFeed(target, "/watch")

    def check(name):
        status = ctl_call(target, "GET", "/status/" + _quote(name)).json()
        if status.get("state") == "failed":
            raise CtlExit(CTL_REFUSED, "gafferd ctl wait: %s failed" % name)
        if _waited(status, args.ready):
            pending.discard(name)

    def on_connect():
        for name in sorted(pending):
            check(name)
    feed.on_connect = on_connect
    feed.connect()
    if not pending:
        return CTL_OK
    timer = None
    if deadline is not None:
        timer = threading.Timer(max(0.0, deadline - time.monotonic()), feed.close)
        timer.daemon = True
        timer.start()
    try:
        for _, _, data in feed.events():
            try:
                name = json.loads("\n".join(data)).get("name")
            except (ValueError, AttributeError):
                continue
            if name in pending:
                check(name)
            if not pending:
                return CTL_OK
    finally:
        if timer is not None:
            timer.cancel()
    raise CtlExit(CTL_TIMEOUT, "gafferd ctl wait: timed out after %gs; still waiting for %s"
                  % (args.timeout, ", ".join(sorted(pending))))


def ctl_cmd_ping(target, args):
    _out(ctl_call(target, "GET", "/ping").body.decode("utf-8", "replace").strip())
    return CTL_OK


def ctl_cmd_version(target, args):
    _out("gafferd ctl %s (gaffer API %s)" % (GAFFERD_VERSION, __version__))
    info = ctl_call(target, "GET", "/").json()
    _out("daemon at %s: gafferd %s (gaffer API %s)" % (target.url, info.get("gafferd", "?"),
                                                       info.get("version", "?")))
    return CTL_OK


# -- top ---------------------------------------------------------------------

class CtlTop:
    """``ctl top``: the status table, a log pane for the selected template,
    and keys that act on it, redrawn when an event arrives.

    Threads only read feeds: the event feed (every event) and the output
    of every template (CtlLogs); they put what they read on a queue and
    write a byte to a pipe, and the curses loop, which alone draws and
    sends requests, sleeps in select() on the terminal and that pipe."""

    KEYS = "j/k select  s start  x stop  r restart  +/- scale  q quit"
    LOG_LINES = 200

    def __init__(self, target):
        self.target = target
        self.queue = lazy_import("queue").Queue()
        self.wake_r, self.wake_w = os.pipe()
        self.statuses, self.stats, self.now = collections.OrderedDict(), {}, None
        self.logs = collections.defaultdict(lambda: collections.deque(maxlen=self.LOG_LINES))
        self.selected = 0
        self.message = ""
        self.stale = True

    def _put(self, item):
        self.queue.put(item)
        try:
            os.write(self.wake_w, b"x")
        except OSError:
            pass

    def _run_events(self, feed):
        try:
            for _ in feed.events():
                self._put(("event", None))
        except CtlExit as exc:
            self._put(("error", exc))

    def run(self) -> int:
        feed = CtlFeed(self.target, "/watch", on_connect=lambda: self._put(("event", None)))
        feed.connect()
        logs = CtlLogs(self.target, lambda name: True, 0,
                       lambda item: self._put(("log", item)), tail=self.LOG_LINES)
        logs.start()
        threading.Thread(target=self._run_events, args=(feed,), daemon=True).start()
        curses = lazy_import("curses")
        try:
            return curses.wrapper(self._main)
        finally:
            feed.close()
            logs.close()

    def _main(self, screen) -> int:
        curses = lazy_import("curses")
        select = lazy_import("select")
        try:
            curses.curs_set(0)
        except curses.error:
            pass
        screen.nodelay(True)
        while True:
            self._drain()
            if self.stale:
                self._refresh()
            self._draw(screen, curses)
            ready = select.select([sys.stdin.fileno(), self.wake_r], [], [], 1.0)[0]
            if self.wake_r in ready:
                os.read(self.wake_r, 4096)
            while True:
                key = screen.getch()
                if key == -1:
                    break
                if self._on_key(key, curses) is False:
                    return CTL_OK

    def _drain(self):
        queue = lazy_import("queue")
        while True:
            try:
                kind, item = self.queue.get_nowait()
            except queue.Empty:
                return
            if kind == "event":
                self.stale = True
            elif kind == "log":
                name, pid, line = item
                if name is None:
                    self.message = str(line.message)
                else:
                    self.logs[name].append("#%s | %s" % (pid, line))
            elif kind == "error":
                raise item

    def _refresh(self):
        self.stale = False
        try:
            self.statuses, self.stats, self.now = ctl_statuses(self.target, [])
            self._fetched = time.monotonic()
        except CtlExit as exc:
            self.message = exc.message or ""

    def _selected_name(self):
        names = list(self.statuses)
        if not names:
            return None
        self.selected = max(0, min(self.selected, len(names) - 1))
        return names[self.selected]

    def _on_key(self, key, curses):
        name = self._selected_name()
        if key in (ord("q"), ord("Q"), 27):
            return False
        if key in (ord("j"), curses.KEY_DOWN):
            self.selected += 1
        elif key in (ord("k"), curses.KEY_UP):
            self.selected -= 1
        elif name is not None and 0 <= key < 256 and chr(key) in "sxr+-":
            action = {"s": "_start", "x": "_stop", "r": "_restart", "+": "_add/1",
                      "-": "_sub/1"}[chr(key)]
            try:
                ctl_call(self.target, "POST", "/processes/%s/%s" % (_quote(name), action))
                self.message = "%s: %s" % (name, action.lstrip("_"))
            except CtlExit as exc:
                self.message = exc.message or ""
            self.stale = True
        return True

    def _draw(self, screen, curses):
        height, width = screen.getmaxyx()
        screen.erase()
        now = None
        if self.now is not None:
            now = self.now + (time.monotonic() - self._fetched)

        def put(y, text, attr=0):
            if 0 <= y < height:
                try:
                    screen.addnstr(y, 0, text, max(0, width - 1), attr)
                except curses.error:
                    pass
        put(0, "gafferd top  %s  %d template(s)  %s" % (
            self.target.url, len(self.statuses), time.strftime("%H:%M:%S")), curses.A_BOLD)
        lines = ctl_table(ctl_status_rows(self.statuses, self.stats, now), STATUS_HEADER)
        put(1, lines[0], curses.A_REVERSE)
        name = self._selected_name()
        for index, line in enumerate(lines[1:]):
            put(2 + index, line, curses.A_BOLD if index == self.selected else 0)
        y = 3 + len(lines) - 1
        put(y, "-- output of %s " % (name or "-") + "-" * max(0, width - 20))
        room = height - y - 3
        if name is not None and room > 0:
            for index, line in enumerate(list(self.logs[name])[-room:]):
                put(y + 1 + index, line)
        put(height - 2, self.message)
        put(height - 1, self.KEYS, curses.A_REVERSE)
        screen.refresh()


def ctl_cmd_top(target, args):
    if not sys.stdout.isatty() or not sys.stdin.isatty():
        raise CtlExit(CTL_USAGE, "gafferd ctl top: needs a terminal (use status for a "
                      "one-shot table)")
    return CtlTop(target).run()


# -- command line ------------------------------------------------------------

def _seconds(text):
    try:
        return parse_float(text, 0, MAX_DURATION)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))


def _count(text):
    try:
        return parse_int(text, 0, 1000000)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))


# (name, function, help, arguments: (flags, keywords) pairs)
CTL_COMMANDS = [
    ("status", ctl_cmd_status, "a table of the templates (or of their processes with -p)", [
        (("names",), dict(nargs="*", metavar="NAME", help="templates (web, the group web:, all); "
                                                         "default: every one")),
        (("-p", "--processes"), dict(action="store_true", help="one row per process")),
        (("--json",), dict(action="store_true", help="the daemon's status and stats as JSON"))]),
    ("start", ctl_cmd_start, "start templates", [
        (("names",), dict(nargs="+", metavar="NAME", help="templates, web: for a group, all"))]),
    ("stop", ctl_cmd_stop, "stop templates", [
        (("names",), dict(nargs="+", metavar="NAME", help="templates, web: for a group, all"))]),
    ("restart", ctl_cmd_restart, "restart templates (new processes first, then the old stop)", [
        (("names",), dict(nargs="+", metavar="NAME", help="templates, web: for a group, all"))]),
    ("scale", ctl_cmd_scale, "set how many processes a template runs", [
        (("name",), dict(metavar="NAME")),
        (("count",), dict(metavar="N|+N|-N", help="that many, N more, or N fewer"))]),
    ("signal", ctl_cmd_signal, "send a signal to every process of templates", [
        (("names",), dict(nargs="+", metavar="NAME", help="templates, web: for a group, all")),
        (("signal",), dict(metavar="SIGNAL", help="HUP, SIGHUP or 1"))]),
    ("add", ctl_cmd_add, "create templates from a file", [
        (("file",), dict(metavar="FILE", help="an INI file with [process:NAME] (and [env:NAME]) "
                                              "sections, or JSON: a template or a list"))]),
    ("rm", ctl_cmd_rm, "stop and remove templates", [
        (("names",), dict(nargs="+", metavar="NAME", help="templates, web: for a group, all"))]),
    ("logs", ctl_cmd_logs, "recent output, and with -f live output, as NAME#ID | LINE", [
        (("names",), dict(nargs="+", metavar="NAME", help="templates, web: for a group, all")),
        (("-f", "--follow"), dict(action="store_true",
                                  help="then follow every process, new ones too, until ^C; "
                                       "survives dropped connections and daemon restarts")),
        (("-n", "--lines"), dict(type=_count, default=10, metavar="N",
                                 help="recent lines per process (default 10)")),
        (("--stderr",), dict(action="store_true", help="the second output label (stderr) "
                                                       "instead of the first"))]),
    ("events", ctl_cmd_events, "the event feed, one line per event, until ^C", [
        (("pattern",), dict(nargs="?", metavar="PATTERN",
                            help="exit, proc.web, proc.web.exit... (default: every event)")),
        (("--json",), dict(action="store_true", help="each event as its JSON")),
        (("-n", "--count"), dict(type=_count, metavar="N", help="exit after N events"))]),
    ("reload", ctl_cmd_reload, "re-read the daemon's config file; print what changed", [
        (("--dry-run",), dict(action="store_true", help="only say what would change"))]),
    ("wait", ctl_cmd_wait, "return when templates run (or are ready): for deploy scripts", [
        (("names",), dict(nargs="+", metavar="NAME", help="templates, web: for a group, all")),
        (("--ready",), dict(action="store_true", help="wait until every process is ready")),
        (("--timeout",), dict(type=_seconds, metavar="SECONDS",
                              help="give up after this long: exit status 3"))]),
    ("top", ctl_cmd_top, "a full-screen live view; keys: j/k select, s start, x stop, "
                         "r restart, +/- scale, q quit", []),
    ("ping", ctl_cmd_ping, "check that the daemon answers", []),
    ("version", ctl_cmd_version, "this client's and the daemon's versions", []),
]

CTL_EPILOG = """\
Exit status: 0 success; 1 the daemon refused (its message is printed);
2 a usage mistake; 3 wait timed out; 4 the daemon could not be reached.

Where the daemon is: --url, else GAFFERD_URL, else the first endpoint of
-c CONFIG, else http://%s.  The token: --token, --token-file,
GAFFERD_TOKEN, else auth_token(_file) of -c CONFIG.  Colours only on a
terminal, never with NO_COLOR set.""" % DEFAULT_BIND


class _CtlParser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        typo = re.match(r"argument COMMAND: invalid choice: '(.*?)'", message)
        if typo:
            close = typo_of(typo.group(1), [c[0] for c in CTL_COMMANDS])
            message = "unknown command %r%s (gafferd ctl --help lists them)" % (
                typo.group(1), "; did you mean %r?" % close if close else "")
        raise CtlExit(CTL_USAGE, "%s: error: %s" % (self.prog, message))


def build_ctl_parser():
    parser = _CtlParser(prog="gafferd ctl", description="Control a running gafferd.",
                        epilog=CTL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", metavar="FILE",
                        help="the daemon's INI file: its first endpoint and auth token")
    parser.add_argument("--url", help="http://HOST:PORT, https://HOST:PORT or unix:/PATH")
    parser.add_argument("--token", help="the API token (Bearer)")
    parser.add_argument("--token-file", metavar="FILE", help="read the token from FILE")
    parser.add_argument("--cafile", metavar="FILE", help="trust this CA (or self-signed "
                                                         "certificate) for https://")
    parser.add_argument("--insecure", action="store_true",
                        help="https:// without checking the certificate")
    parser.add_argument("--version", action="version",
                        version="gafferd ctl %s (gaffer API %s)" % (GAFFERD_VERSION, __version__))
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, function, help_text, arguments in CTL_COMMANDS:
        sub = commands.add_parser(name, help=help_text, description=help_text[:1].upper() +
                                  help_text[1:] + ".", epilog=CTL_EPILOG,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        for flags, keywords in arguments:
            sub.add_argument(*flags, **keywords)
        sub.set_defaults(function=function)
    return parser


def ctl_main(argv, environ=None) -> int:
    """``gafferd ctl ARGV``: the client's error boundary.  Every failure
    is one line on stderr and an exit status; never a traceback, not even
    when stdout is a pipe that closes early (SIGPIPE then ends the client
    quietly, as it does cat)."""
    environ = os.environ if environ is None else environ
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    url = None
    try:
        args = build_ctl_parser().parse_args(argv)
        if not args.command:
            build_ctl_parser().print_help(sys.stderr)
            return CTL_USAGE
        target = ctl_target(args, environ)
        url = target.url
        status = args.function(target, args)
        sys.stdout.flush()
        return status
    except CtlExit as exc:
        if exc.message:
            print(exc.message, file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return 130
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
        # a reply of the wrong shape: something other than gafferd answers there
        print("gafferd ctl: unexpected reply from %s (%s: %s): is gafferd listening there?"
              % (re.sub(r"//[^/@]*@", "//***@", str(url)), type(exc).__name__, exc),
              file=sys.stderr)
        return CTL_REFUSED
    except BrokenPipeError:
        try:
            sys.stdout = open(os.devnull, "w")      # nothing more to flush at exit
        except OSError:
            pass
        return CTL_OK


# § 15 daemon and command line ---------------------------------------------------
# Owns: the command line, start-up order, signals
# (TERM/INT/QUIT stop, a second one hurries; HUP reloads the
# config; USR1 reopens log files), reload, --daemon and --pidfile,
# the daemon's own log (file, syslog), sd_notify to systemd (READY=1,
# STATUS=, STOPPING=1, WATCHDOG=1), and main(), the last error boundary.
# Uses everything above.

PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36


def _prctl(option, value):
    try:
        ctypes = lazy_import("ctypes")
        lazy_import("ctypes.util")
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def release_memory():
    """Give back what start-up used (compiling this file costs ~10 MB that
    malloc keeps otherwise)."""
    import gc
    gc.collect()
    malloc_trim()


class PidfileError(Exception):
    pass


def _read_pidfile(path):
    """The pidfile's text, or None when there is none.  A link, a hard
    link or anything but a regular file there is a PidfileError: it is
    neither read (a FIFO would block) nor replaced."""
    try:
        f = open_safely(path, os.O_RDONLY, follow=False)
    except FileNotFoundError:
        return None
    except UnsafeFileError as exc:
        raise PidfileError("refusing pid file %s: %s; remove it" % (exc.path, exc.reason))
    except OSError:
        return None
    try:
        if not f.regular:
            raise PidfileError("refusing pid file %s: not a regular file; remove it" % path)
        return os.read(f.fd, 64).decode("ascii", "replace")
    finally:
        f.close()


def check_pidfile(path):
    """Refuse when a live process other than us holds ``path`` (garbage is stale)."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise PidfileError("%s doesn't exist. Can't create pidfile." % directory)
    content = (_read_pidfile(path) or "").strip()
    if not is_ascii_digits(content) or int(content) <= 0:
        return                                   # none, or garbage: stale
    pid = int(content)
    if pid == os.getpid():
        return
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return
    except PermissionError:
        pass                                     # alive, someone else's
    raise PidfileError("Already running on PID %d (or pid file '%s' is stale)" % (pid, path))


def write_pidfile(path):
    """Write our PID to a new file of a random name (O_EXCL: nothing that
    was there is followed or reused) in the pidfile's directory, then
    rename it over ``path``: readers see the old file or the whole new one."""
    check_pidfile(path)
    dir_fd, name = open_directory_of(path)
    try:
        tmp = ".%s.%s.tmp" % (name, os.urandom(8).hex())
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644, dir_fd=dir_fd)
        try:
            os.write(fd, b"%d\n" % os.getpid())
            os.fchmod(fd, 0o644)
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dir_fd)
            except OSError:
                pass
            raise
        finally:
            os.close(fd)
    finally:
        os.close(dir_fd)


def remove_pidfile(path):
    try:
        if (_read_pidfile(path) or "").strip() != str(os.getpid()):
            return
        dir_fd, name = open_directory_of(path)
        try:
            os.unlink(name, dir_fd=dir_fd)           # unlink(2) never follows a link
        finally:
            os.close(dir_fd)
    except (OSError, PidfileError):
        pass


def daemonize():
    """Double fork into the background (umask 022, not gaffer 0.4.4's 0; cwd kept)."""
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.umask(0o022)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    if devnull > 2:
        os.close(devnull)


def open_stdio():
    """Put /dev/null on whichever of fds 0, 1 and 2 is closed (an init
    script may start us so).  Otherwise the next file or socket opened --
    the daemon's log, a directory it holds, a client's connection -- gets
    that number, and what is meant for stdout or stderr (``-`` log files,
    -vv copies) goes into it."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)      # the lowest free number: fd
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def raise_fd_limit(needed):
    """Raise RLIMIT_NOFILE to its hard limit; warn when still too low."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError):
                pass
        if needed > soft:
            log.warning("the open-file limit (%d) is too low for the configured processes "
                        "(about %d descriptors needed); spawns will fail with EMFILE. Raise "
                        "it with 'ulimit -n' or LimitNOFILE=", soft, needed)
    except ImportError:
        pass


def build_arg_parser():
    parser = argparse.ArgumentParser(
        prog="gafferd",
        description="A process supervisor controlled over HTTP/JSON: start the programs "
                    "of the [process:NAME] sections of CONFIG, keep them running, and "
                    "let curl or gaffer 0.4.4 clients start, stop, scale and watch them.",
        epilog="Signals: TERM/INT/QUIT stop, HUP reloads the config, USR1 reopens "
               "log files.  gafferd --check CONFIG validates a file without starting it.")
    parser.add_argument("config", nargs="?", help="configuration file")
    parser.add_argument("-c", "--config", dest="config_file", help="configuration file")
    parser.add_argument("-p", "--plugins-dir", dest="plugins_dir",
                        default=os.path.expanduser("~/.gafferd/plugins"),
                        help="default plugin dir")
    parser.add_argument("-v", dest="verbose", action="store_true", help="verbose mode")
    parser.add_argument("-vv", dest="vverbose", action="store_true",
                        help="like verbose mode but output stream too")
    parser.add_argument("--daemon", action="store_true", help="Start gaffer in the background")
    parser.add_argument("--pidfile", help="write the daemon's PID to this file")
    parser.add_argument("--log-file", dest="log_file", metavar="FILE",
                        help="also write the daemon's own log to FILE (rotated like program "
                             "logs, reopened on SIGUSR1); wins over [gaffer] logfile")
    parser.add_argument("--bind", default=DEFAULT_BIND, help="default HTTP binding")
    parser.add_argument("--certfile", help="SSL certificate file for the default binding")
    parser.add_argument("--keyfile", help="SSL key file for the default binding")
    parser.add_argument("--backlog", default=str(DEFAULT_BACKLOG),   # checked like the INI key
                        help="default backlog")
    parser.add_argument("--check", action="store_true",
                        help="validate the config, print the templates, exit 0 (or 2)")
    parser.add_argument("--version", action="version",
                        version="gafferd %s (gaffer API %s)" % (GAFFERD_VERSION, __version__))
    return parser


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class DaemonLog(logging.Handler):
    """The daemon's own log file (``--log-file``, ``[gaffer] logfile``).

    A ``LogFile`` like the programs' (same safe open, rotation and
    SIGUSR1 reopen).  Until ``start()`` records are written at once (the
    start-up, before any fork); after it, through a ``LogWriter`` thread
    of its own, so a slow disk never stalls the loop and the writer
    outlives the manager's to record the end of the shutdown."""

    def __init__(self, path, maxbytes, backups):
        super().__init__()
        self.setFormatter(logging.Formatter(LOG_FORMAT))
        self.logfile = LogFile(path, maxbytes, backups)
        self.writer = None

    def open(self):
        """Open the file now, so a bad path is reported at start-up; OSError."""
        self.logfile.open_now()

    def start(self):
        """Write from a thread from now on (after daemonize(): a fork keeps no thread)."""
        self.writer = LogWriter(None)

    def emit(self, record):
        try:
            data = (self.format(record) + "\n").encode("utf-8", "replace")
        except Exception:
            self.handleError(record)
            return
        if self.writer is None:
            self.logfile.write_now(data)
        else:
            self.writer.submit(self.logfile, data)

    def close_file(self):
        """Close the file (after what is queued); the next record opens it
        again, so SIGUSR1 after a rotation moves the log to the new file."""
        if self.writer is None:
            self.logfile.close()
        else:
            self.writer.close_file(self.logfile)

    def close(self):
        """Write what is queued and close the file."""
        if self.writer is not None:
            self.writer.close_file(self.logfile)
            self.writer.stop()
        else:
            self.logfile.close()
        super().close()


class DaemonSyslog(logging.Handler):
    """The daemon's own log lines to syslog (``[gaffer] syslog``): one
    datagram per record through a ``SyslogSender``, at the record's
    severity, never blocking; a record that cannot be sent is dropped and
    counted (never logged: that would be one more record to drop).
    ``logging.Handler``'s lock serialises the loop and the log writer
    thread."""

    SEVERITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
                  (logging.INFO, 6), (0, 7))

    def __init__(self, address, facility, tag):
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))
        self.sender = SyslogSender(address)
        self.facility, self.tag = SYSLOG_FACILITIES[facility], tag

    def emit(self, record):
        try:
            text = self.format(record)
        except Exception:
            self.handleError(record)
            return
        severity = next(n for level, n in self.SEVERITIES if record.levelno >= level)
        self.sender.send(self.facility * 8 + severity, self.tag, os.getpid(),
                         [text.encode("utf-8", "replace")], record.created)

    def close(self):
        self.sender.close()
        super().close()


def open_daemon_syslog(config):
    """The DaemonSyslog ``[gaffer] syslog`` asks for (attached to the root
    logger), or None."""
    if not config.syslog:
        return None
    handler = DaemonSyslog(config.syslog_address, config.syslog_facility, config.syslog_tag)
    logging.getLogger().addHandler(handler)
    return handler


class SystemdNotify:
    """sd_notify for gafferd itself, when systemd started it with
    ``NOTIFY_SOCKET`` set (``Type=notify``).

    ``ready(status)`` sends READY=1 (once the endpoints listen and the
    start-up templates are launched), ``status(text)`` a STATUS= line (at
    most one a second: a change within the second is sent at its end),
    ``stopping()`` STOPPING=1.  With ``WATCHDOG_USEC`` set (and
    ``WATCHDOG_PID`` unset or ours) a timer sends WATCHDOG=1 every half
    interval; without it there is no timer.  The address is a path or
    ``@NAME`` (the abstract namespace).  Each message is one sendto on a
    non-blocking datagram socket: an error drops it (counted in
    ``dropped``), nothing waits.  ``take(environ)`` removes the variables
    so the programs gafferd starts do not inherit them (a program with
    ``ready = notify`` gets a socket of gafferd's own)."""

    VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
    STATUS_INTERVAL = 1.0

    def __init__(self, loop, address, watchdog_usec=None):
        self.loop = loop
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.interval = None
        if watchdog_usec:
            self.interval = min(watchdog_usec / 2e6, MAX_DURATION)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sent = self.dropped = 0
        self.last_status = None
        self._status_at = None                 # loop time of the last STATUS= sent
        self._status_timer = self._watchdog_timer = None
        self._pending = None

    @classmethod
    def take(cls, loop, environ):
        """A SystemdNotify for ``environ`` (its variables removed), or None."""
        address = environ.get("NOTIFY_SOCKET", "")
        usec, pid = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
        for name in cls.VARIABLES:
            environ.pop(name, None)
        if not address.startswith(("/", "@")) or len(address) < 2:
            return None
        watchdog = int(usec) if is_ascii_digits(usec) and len(usec) < 19 else None
        if pid and pid != str(os.getpid()):
            watchdog = None                    # meant for another process
        return cls(loop, address, watchdog)

    def send(self, text) -> bool:
        try:
            self.sock.sendto(text.encode("utf-8", "replace"), self.address)
        except OSError:
            self.dropped += 1
            return False
        self.sent += 1
        return True

    def ready(self, status):
        self.last_status, self._status_at = status, self.loop.time()
        self.send("READY=1\nSTATUS=%s\nMAINPID=%d" % (status, os.getpid()))
        if self.interval:
            self._watchdog()

    def _watchdog(self):
        self.send("WATCHDOG=1")
        self._watchdog_timer = self.loop.call_later(self.interval, self._watchdog)

    def status(self, text):
        """Send STATUS=text, at most once per STATUS_INTERVAL; repeats are not sent."""
        self._pending = text
        if self._status_timer is not None:
            return
        wait = 0.0 if self._status_at is None else \
            self._status_at + self.STATUS_INTERVAL - self.loop.time()
        self._status_timer = self.loop.call_later(max(0.0, wait), self._send_status)

    def _send_status(self):
        self._status_timer = None
        text, self._pending = self._pending, None
        if text is not None and text != self.last_status:
            self.last_status, self._status_at = text, self.loop.time()
            self.send("STATUS=" + text)

    def stopping(self):
        """STOPPING=1.  The watchdog goes on pinging until the loop ends:
        a shutdown that hangs is one for systemd to see."""
        if self._status_timer is not None:
            self._status_timer.cancel()
            self._status_timer = None
        self.send("STOPPING=1\nSTATUS=stopping")

    def close(self):
        self.sock.close()


def status_summary(manager) -> str:
    """The one-line STATUS= of gafferd: templates by state, processes."""
    states = collections.Counter(t.state for t in manager.templates.values())
    parts = ["%d %s" % (states[s], s) for s in TEMPLATE_STATES if states[s]]
    return "%d template(s)%s; %d process(es)%s" % (
        len(manager.templates), " (%s)" % ", ".join(parts) if parts else "",
        len(manager._by_pid), "; stopping" if manager.stopping else "")


class Daemon:
    """Wires config, loop, manager, applications and signals together."""

    def __init__(self, args):
        self.args = args
        self.config_path = args.config or args.config_file
        self.config = None
        self.loop = self.manager = self.server = self.plugins = self.webhooks = None
        self.log_file = None               # DaemonLog, set by main()
        self.syslog = None                 # DaemonSyslog, set by main()
        self.notify = None                 # SystemdNotify under systemd's Type=notify
        self._stop_asked = None            # loop time of the first stop signal
        self.exit_status = 0               # 1 once a critical template failed

    def load(self):
        """Read the config and settle the endpoints; ConfigError(s)."""
        if self.config_path:
            self.config = read_config(self.config_path, self.args.plugins_dir)
        else:
            self.config = Config(None)
            self.config.plugins_dirs = [os.path.abspath(os.path.expanduser(self.args.plugins_dir))]
        if not self.config.endpoints:
            items = {"bind": self.args.bind, "backlog": self.args.backlog}
            if self.args.certfile:
                items["certfile"] = self.args.certfile
            if self.args.keyfile:
                items["keyfile"] = self.args.keyfile
            try:
                self.config.endpoints.append(build_endpoint(
                    "default", items, self.config.defaults, "command line", None, os.getcwd()))
            except ConfigError as exc:
                exc.key = "--" + exc.key if exc.key else exc.key
                raise
            except ConfigErrors as exc:
                for error in exc.errors:
                    error.key = "--" + error.key if error.key else error.key
                raise ConfigErrors(exc.errors) from None
        for warning in self.config.warnings:
            log.warning("%s", warning)
        self.warn_token_files()

    def warn_token_files(self):
        """At start-up, --check and every reload: a token file others can
        read is worth a line each time."""
        for endpoint in self.config.endpoints:
            warning = token_file_warning(endpoint)
            if warning:
                log.warning("%s", warning)

    def describe(self) -> str:
        """The resolved config, for --check."""
        out = []
        for ep in self.config.endpoints:
            out.append("[endpoint:%s] %s%s" % (ep.name, ", ".join(a.text for a in ep.addresses),
                                               " (TLS)" if ep.tls else ""))
        for event, url in self.config.webhooks:
            out.append("[webhooks] %s -> %s" % (event, url))
        for spec in self.config.sockets.values():
            out.append("[socket:%s] %s" % (spec.name, json.dumps(spec.to_dict())))
        for spec in self.config.templates:
            argv, executable = resolve_command(spec, checked_environment(spec, os.environ))
            out.append("[process:%s]" % spec.name)
            out.append("  # resolved: executable = %s" % executable)
            out.append("  # resolved: argv = %s" % " ".join(shlex.quote(a) for a in argv))
            out.append("  # resolved: working directory = %s" % spec.cwd)
            for index, label in enumerate(spec.labels):
                out.append("  # resolved: %s -> label %r%s" % (
                    ("stdout", "stderr")[index], label,
                    ", file " + spec.logfile_for(index) if spec.logfile_for(index) else ""))
            for key, value in spec.definition().items():
                if key not in ("name",):
                    out.append("  %s = %s" % (key, json.dumps(value, default=str)))
        out.append("%d template(s), %d endpoint(s): config OK" % (
            len(self.config.templates), len(self.config.endpoints)))
        return "\n".join(out)

    def prepare(self):
        """Everything that can fail before forking: plugins, sockets."""
        install_import_aliases()
        self.plugins = Plugins(self.config.plugins_dirs)
        self.plugins.discover()
        missing = self.plugins.missing_mandatory()
        if missing:
            raise ConfigErrors([ConfigError(None, None, None, line) for line in missing])
        self.loop = Loop()
        self.notify = SystemdNotify.take(self.loop, os.environ)
        if sys.getswitchinterval() > GIL_SWITCH_INTERVAL:
            sys.setswitchinterval(GIL_SWITCH_INTERVAL)     # see _Starter
        self.manager = Manager(self.loop)
        self.manager.on_critical = self._on_critical_failure
        self.api = Api(self.manager, self.plugins,
                       self.logged_reload if self.config_path else None)
        self.server = HttpServer(self.config.endpoints, self.api)
        self.server.bind()
        self.manager.sockets = HeldSockets()
        self.manager.sockets.bind_all(self.config.sockets)

    def run(self) -> int:
        _prctl(PR_SET_NAME, b"gafferd")
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
        needed = 64 + sum(t.numprocesses * (len(set(t.labels)) + int(t.redirect_input) + 1)
                          for t in self.config.templates)
        raise_fd_limit(needed)
        loop, manager = self.loop, self.manager
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            loop.add_signal_handler(signum, self._on_quit_signal)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        loop.add_signal_handler(signal.SIGUSR1, self._on_usr1)
        loop.add_signal_handler(signal.SIGCHLD, lambda signum: None)
        self.webhooks = Webhooks(self.config.webhooks)
        manager.cfg = self.config.parser
        manager.apps = [self.webhooks, self.server] + self.plugins.make_apps(self.config.parser)
        if self.args.verbose or self.args.vverbose:
            manager.apps.append(Console(stream_output=self.args.vverbose))
        manager.start()
        for spec in self.config.templates:
            manager.add_template(spec)
        if self.syslog is not None:
            manager.daemon_syslog = self.syslog.sender
        release_memory()
        log.info("gafferd %s ready (pid %d)", GAFFERD_VERSION, os.getpid())
        if self.notify is not None:
            self.notify.ready(status_summary(manager))
            for pattern in ("state", "spawn", "exit"):
                manager.subscribe(pattern, self._on_change)
        try:
            loop.run()
        finally:
            manager.sockets.close_all()        # their unix socket files go too
        if self.notify is not None:
            self.notify.close()
        log.info("gafferd stopped (pid %d): shutdown took %.2fs; %d adopted orphan(s) "
                 "reaped since start", os.getpid(), loop.time() - (self._stop_asked or
                                                                 loop.time()),
                 manager.orphans.reaped_total)
        loop.close()
        return self.exit_status

    # A last-resort stop waits at most this long for children that got
    # SIGTERM, whatever their graceful_timeout, before SIGKILL.
    EMERGENCY_GRACE = 30.0

    def stop_children_now(self):
        """Stop every child without the loop, which could not go on: the
        daemon is about to exit and must not leave its children behind.
        SIGTERM to every process group (and to adopted orphans), up to
        their graceful_timeout (at most EMERGENCY_GRACE) to exit, SIGKILL
        for the rest; each exit is reaped.  Waits on the wakeup socket,
        which gets a byte for every SIGCHLD."""
        manager, loop = self.manager, self.loop
        if manager is None:
            return
        procs = [p for p in manager._by_pid.values() if p.pid is not None]
        if not procs:
            return
        log.warning("stopping %d process(es) before exiting", len(procs))
        pids = {p.pid for p in procs}
        grace = min(self.EMERGENCY_GRACE, max(p.spec.graceful_timeout for p in procs))
        for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            for pgid in pids:
                for kill in (os.killpg, os.kill):
                    try:
                        kill(pgid, signum)
                        break
                    except OSError:
                        pass
            manager.shutdown.kill_orphans(signum)
            deadline = time.monotonic() + wait
            while True:
                self._reap_now(pids)
                remaining = deadline - time.monotonic()
                if not pids or remaining <= 0:
                    break
                try:
                    if lazy_import("select").select([loop._wake_r], [], [],
                                                    min(remaining, 0.5))[0]:
                        loop._wake_r.recv(4096)
                except (OSError, ValueError):
                    break                          # no way to wait: on to SIGKILL
            if not pids:
                break
        log.warning("%s", "every process stopped" if not pids else
                    "%d process(es) did not exit: %s" % (len(pids), sorted(pids)))

    @staticmethod
    def _reap_now(pids):
        """Reap every child that has exited; forget the ones in ``pids``."""
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pids.clear()
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            pids.discard(pid)

    def _on_change(self, event, payload):
        """A template changed state, a process came or went: STATUS=."""
        if self.notify is not None and not self.manager.stopping:
            self.notify.status(status_summary(self.manager))

    def _notify_stopping(self):
        if self.notify is not None and self._stop_asked is None:
            self.notify.stopping()

    def _on_quit_signal(self, signum):
        log.info("received %s: shutting down", signal.Signals(signum).name)
        self._notify_stopping()
        if self._stop_asked is None:
            self._stop_asked = self.loop.time()
        self.manager.stop(self._after_stop)

    def _on_critical_failure(self, name):
        """A ``critical`` template failed: stop everything, exit 1."""
        self.exit_status = 1
        if self.manager.stopping:
            return        # one failure can report twice (the exit, the state): one stop
        self._notify_stopping()
        if self._stop_asked is None:
            self._stop_asked = self.loop.time()
        self.manager.stop(self._after_stop)

    def _after_stop(self):
        self.webhooks.drain(self.loop.stop)

    def _on_usr1(self, signum):
        count = self.manager.reopen_logs()
        if self.log_file is not None:
            self.log_file.close_file()
            count += 1
        log.info("received SIGUSR1: reopened %d log file(s)", count)

    def _on_hup(self, signum):
        if not self.config_path:
            log.info("SIGHUP: no config file to reload; restarting plugin applications")
            for app in self.manager.apps:
                if isinstance(app, PluginApp):
                    app.restart()
            return
        try:
            self.logged_reload(who="SIGHUP")
        except (ConfigError, ConfigErrors):
            pass                                         # logged; nothing changed

    def logged_reload(self, dry_run=False, who="SIGHUP") -> dict:
        """``reload`` plus one log line that says who asked (SIGHUP, or the
        API and the client's address) and what changed, or why nothing
        did.  ConfigError(s) are logged, then raised again."""
        try:
            result = self.reload(dry_run)
        except (ConfigError, ConfigErrors) as exc:
            log.error("reload failed, nothing changed (asked by %s): %s", who,
                      "; ".join(str(exc).splitlines()))
            raise
        log.info("%s %s (asked by %s): added %s, removed %s, changed %s",
                 "dry run: would reload" if dry_run else "reloaded", self.config_path,
                 who, result["added"], result["removed"], result["changed"])
        return result

    def reload(self, dry_run=False) -> dict:
        """Re-read the config and apply the difference (SIGHUP, POST /reload)."""
        try:
            new = read_config(self.config_path, self.args.plugins_dir, resolve=False)
        except ConfigErrors as exc:
            for warning in exc.warnings:
                log.warning("reload: %s", warning)
            raise
        for warning in new.warnings:
            log.warning("reload: %s", warning)
        manager = self.manager
        if manager.stopping:
            raise ConfigError(self.config_path, None, None, "the daemon is shutting down")
        kept = [t.spec for n, t in manager.templates.items()
                if t.spec.origin != "config" and n not in {s.name for s in new.templates}]
        problems = socket_problems(kept, new.sockets)
        if problems:
            raise ConfigErrors([ConfigError("(made over HTTP)", "process:" + n, "sockets", message)
                                for n, message in problems])
        result = manager.reload_templates(new.templates, dry_run=True)
        if not dry_run:
            try:
                rebound = manager.sockets.reload(new.sockets)
            except BindError as exc:
                raise ConfigError(self.config_path, None, None, str(exc)) from None
            result = manager.reload_templates(new.templates)
            for name in result["unchanged"]:      # their processes listen on the old address
                if set(manager.templates[name].spec.sockets) & set(rebound) and \
                        manager.templates[name].wanted:
                    manager.restart_process(name, rolling=False if name in manager.rollouts
                                            else None)
                    result["changed"].append(name)
        result.update(dry_run=dry_run, warnings=new.warnings)
        if dry_run:
            return result
        self.webhooks.configure(new.webhooks)
        old_endpoints = [(e.name, [a.text for a in e.addresses]) for e in self.config.endpoints]
        if new.endpoints and [(e.name, [a.text for a in e.addresses])
                              for e in new.endpoints] != old_endpoints:
            log.warning("endpoint changes take effect at the next restart of the daemon")
        new.endpoints = self.config.endpoints
        self.config = new
        self.warn_token_files()
        manager.cfg = new.parser
        for app in manager.apps:
            if isinstance(app, PluginApp):
                app.restart()
        return result


def open_daemon_log(args, config):
    """The DaemonLog that ``--log-file`` or ``[gaffer] logfile`` asks for
    (opened, attached to the root logger), or None; ConfigError when the
    file cannot be opened or is refused."""
    path = os.path.abspath(args.log_file) if args.log_file else config.logfile
    if path is None:
        return None
    where = ("command line", None, "--log-file") if args.log_file else (
        config.path, "gaffer", "logfile")
    handler = DaemonLog(path, config.logfile_maxbytes, config.logfile_backups)
    try:
        handler.open()
    except UnsafeFileError as exc:
        raise ConfigError(*where, "refusing %s: %s" % (path, exc.reason)) from None
    except OSError as exc:
        raise ConfigError(*where, "cannot open %s: %s" % (path, exc.strerror or exc)) from None
    logging.getLogger().addHandler(handler)
    return handler


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["ctl"]:
        return ctl_main(argv[1:])
    # Until the daemon starts, gafferd is a command whose output may go to
    # `head`: a closed pipe ends it quietly, as it does cat or grep.  The
    # daemon itself ignores SIGPIPE (Python's default): a client that goes
    # away is an EPIPE on its socket, never the end of the daemon.
    open_stdio()
    quiet_pipe = signal.getsignal(signal.SIGPIPE)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    args = build_arg_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    daemon = Daemon(args)
    try:
        daemon.load()
        if args.check:
            print(daemon.describe())
            return 0
        daemon.log_file = open_daemon_log(args, daemon.config)
        daemon.syslog = open_daemon_syslog(daemon.config)
        if args.pidfile:
            check_pidfile(args.pidfile)
        signal.signal(signal.SIGPIPE, quiet_pipe)
        daemon.prepare()
    except ConfigErrors as exc:
        for warning in exc.warnings:
            log.warning("%s", warning)
        for error in exc.errors:
            print(str(error), file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except BindError as exc:
        print("gafferd: %s" % exc, file=sys.stderr)
        return 2
    except PidfileError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    try:
        return _run_daemon(daemon, args)
    finally:
        for handler in (daemon.log_file, daemon.syslog):
            if handler is not None:
                root.removeHandler(handler)
                handler.close()


def _run_daemon(daemon, args) -> int:
    """main() from the fork on: pidfile, the loop, the pidfile's removal."""
    if args.daemon:
        if daemon.log_file is not None:
            where = "goes to %s" % daemon.log_file.logfile.path
        else:
            where = ("is discarded (stderr becomes /dev/null); keep it with --log-file FILE "
                     "or [gaffer] logfile")
        print("gafferd: running in the background; its log %s" % where, file=sys.stderr)
        daemonize()
    if daemon.log_file is not None:
        daemon.log_file.start()
    if args.pidfile:
        try:
            write_pidfile(args.pidfile)
        except (PidfileError, OSError) as exc:
            print(str(exc), file=sys.stderr)
            return 1
    try:
        return daemon.run()
    except Exception:
        log.exception("gafferd stopped on an unexpected error")
        try:
            daemon.stop_children_now()
        except Exception:
            log.exception("could not stop every process")
        return 1
    finally:
        if args.pidfile:
            remove_pidfile(args.pidfile)


def _valid_cache(cache, source_stat) -> bool:
    """True when ``cache`` is this interpreter's bytecode of the source
    whose ``os.stat`` is ``source_stat``: the test the import system makes
    (PEP 552 header: magic, flags 0, source mtime and size).  A script
    given as a .pyc is run without that test, so it is made here."""
    try:
        with open(cache, "rb") as f:
            header = f.read(16)
    except OSError:
        return False
    return len(header) == 16 and header[:4] == importlib.util.MAGIC_NUMBER and \
        struct.unpack("<III", header[4:]) == (
            0, int(source_stat.st_mtime) & 0xFFFFFFFF, source_stat.st_size & 0xFFFFFFFF)


def reexec_from_bytecode():
    """Start again from cached bytecode, to stay small.

    Run as a script, this file is compiled in memory at every start, and
    the compiler's memory is kept while the script runs: an idle daemon
    measured 51 MB RSS on CPython 3.11 when compiled, 19 MB when loaded
    from bytecode (49 vs 18 MB on 3.13, 19.7 vs 15.1 MB on 3.8).
    So the same command is exec'd again as ``python [flags] CACHE.pyc
    ARGS``: the PID stays, ``ps`` shows the path of this file's bytecode
    and the original arguments, and the interpreter's flags (``-I``,
    ``-E``, ``-s``, ``-P``, ``-O``, ``-B``, ``-W``, ``-X``...) are passed
    on.  A .pyc run as a script puts only its own ``__pycache__``
    directory on ``sys.path`` (nothing with ``-I``/``-P``), never the
    current directory; ``_after_reexec`` puts this file's directory
    there instead, as running the source would.

    The cache is the one the import system uses, written here when it is
    missing or stale (not with ``-B``).  Returns, and the daemon runs as
    it is, when that cannot be done: a read-only directory, no
    ``sys.executable``, an interpreter that cannot say its flags.
    """
    flags = getattr(subprocess, "_args_from_interpreter_flags", None)
    if flags is None or not sys.executable:
        return
    path = os.path.realpath(__file__)
    try:
        cache = importlib.util.cache_from_source(path, optimization=sys.flags.optimize or "")
        source_stat = os.stat(path)
        if not _valid_cache(cache, source_stat):
            if sys.flags.dont_write_bytecode:
                return
            import py_compile
            py_compile.compile(path, cfile=cache, doraise=True, optimize=sys.flags.optimize,
                               invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
            if not _valid_cache(cache, source_stat):
                return                   # the source changed meanwhile
        argv = [sys.executable] + flags() + [cache] + sys.argv[1:]
    except (OSError, ImportError, NotImplementedError, SyntaxError, ValueError):
        return
    except Exception:                    # py_compile.PyCompileError
        return
    try:
        os.execv(sys.executable, argv)
    except OSError:
        return


def _after_reexec():
    """In the process ``reexec_from_bytecode`` started: replace the
    ``__pycache__`` directory at the head of ``sys.path`` by the source's."""
    cache_dir = os.path.dirname(os.path.realpath(__file__))
    if sys.path and sys.path[0] and os.path.realpath(sys.path[0]) == cache_dir:
        sys.path[0] = os.path.dirname(cache_dir)


if __name__ == "__main__":
    if globals().get("__spec__") is not None:
        pass                             # python -m gafferd: already from bytecode
    elif __file__.endswith(".pyc"):
        _after_reexec()
    else:
        reexec_from_bytecode()
    install_import_aliases()
    sys.exit(main())
