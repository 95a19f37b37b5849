"""The dummy1 example plugin: shows that discovery goes by ``__all__``."""
