"""A plugin class that gafferd never finds.

The module lists its plugin in ``__plugins__`` instead of ``__all__``,
so no plugin is registered for this directory and only its site
(``_site/``, "hello dummy1") is served, at ``/_plugin/dummy1/``.
"""
from gafferd import Plugin

__plugins__ = ['DummyPlugin1']


class DummyApp1:

    def start(self, loop, manager):
        print("start dummy1 app", flush=True)

    def stop(self):
        print("stop dummy1", flush=True)

    def restart(self):
        print("restart dummy1", flush=True)


class DummyPlugin1(Plugin):
    name = "dummy1"
    version = "1.0"
    description = "never loaded: not listed in __all__"

    def app(self, cfg):
        return DummyApp1()
