"""Declares the dummy plugin.

gafferd imports every top-level module of the package and registers
each ``Plugin`` subclass named in the module's ``__all__``.
"""
from gafferd import Plugin

from .app import DummyApp

__all__ = ['DummyPlugin']


class DummyPlugin(Plugin):
    name = "dummy"
    version = "1.0"
    description = "test"

    def app(self, cfg):
        return DummyApp()
