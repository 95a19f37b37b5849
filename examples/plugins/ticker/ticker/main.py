"""ticker: a complete, small gafferd plugin, written as documentation.

It shows the three things most plugins do:

* listen to the manager's events (``manager.subscribe``),
* run something later on the daemon's loop (``loop.call_later``),
* offer an HTTP route of its own (``routes()``).

The ticker counts every manager event (``spawn``, ``exit``, ...) and logs
a summary every ``interval`` seconds (60 by default; set it in the
daemon's config file with a section of the plugin's own)::

    [ticker]
    interval = 10

It answers ``GET /_plugin/ticker/api/count`` with ``{"events": <total>}``.

Layout (the directory name, ``ticker``, is what URLs use)::

    plugins/ticker/            the plugin directory
        ticker/                a package: every top-level module is imported
            __init__.py
            main.py            this file; its __all__ names the plugin class

Everything runs on the daemon's single thread: callbacks must return
quickly and must never block (no sleep, no blocking socket call).
"""
import logging

from gafferd import Plugin

# gafferd registers the Plugin subclasses named here, and only those.
__all__ = ["TickerPlugin"]

# A child of the daemon's logger: lines go wherever the daemon logs.
log = logging.getLogger("gafferd.ticker")


class TickerApp:
    """The application: gafferd calls start(), restart() and stop()."""

    def __init__(self, interval):
        self.interval = interval
        self.events = 0        # every event seen since start
        self.recent = 0        # events since the last summary
        self.loop = None
        self.manager = None
        self.timer = None
        # Keep one bound method so that unsubscribe() gets the very
        # object subscribe() got.
        self.listener = self.on_event

    # -- called by gafferd ------------------------------------------------

    def start(self, loop, manager):
        """Called once at start-up, after the built-in applications."""
        self.loop, self.manager = loop, manager
        # "." means every manager event; "proc.web" would mean every event
        # of template "web", "exit" just the bare exit events.
        manager.subscribe(".", self.listener)
        self.timer = loop.call_later(self.interval, self.tick)

    def stop(self):
        """Called at shutdown, once every process has gone."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.manager.unsubscribe(".", self.listener)
        log.info("ticker: %d events in total", self.events)

    def restart(self):
        """Called on SIGHUP, after the config was reloaded."""
        log.info("ticker: reload seen, %d events so far", self.events)

    def routes(self):
        """HTTP routes, mounted under /_plugin/ticker/api/.

        Each is (method, regex, handler); the regex must match the whole
        rest of the path, and its groups are passed to the handler.
        """
        return [("GET", "count", self.get_count)]

    def metrics(self):
        """Extra lines for GET /metrics (Prometheus text format)."""
        return [
            "# HELP ticker_events_total Manager events seen by the ticker plugin.",
            "# TYPE ticker_events_total counter",
            "ticker_events_total %d" % self.events,
        ]

    # -- our callbacks ----------------------------------------------------

    def on_event(self, event, payload):
        """Every manager event: event is its full name, payload a dict."""
        self.events += 1
        self.recent += 1

    def tick(self):
        """Log a summary, then arm the timer again for the next one."""
        log.info("ticker: %d events in the last %g s (%d in total), "
                 "%d processes running",
                 self.recent, self.interval, self.events,
                 len(self.manager.running))
        self.recent = 0
        self.timer = self.loop.call_later(self.interval, self.tick)

    def get_count(self, request):
        """GET /_plugin/ticker/api/count -> (status, JSON-able body)."""
        return 200, {"events": self.events}


class TickerPlugin(Plugin):
    name = "ticker"
    version = "1.0"
    description = "counts manager events; logs a summary every minute"

    def app(self, cfg):
        # cfg is the daemon's ConfigParser (None without a config file);
        # plugins read sections of their own from it.
        interval = 60.0
        if cfg is not None:
            interval = cfg.getfloat("ticker", "interval", fallback=interval)
        return TickerApp(interval)
