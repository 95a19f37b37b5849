"""The ticker example plugin; everything is in ``main.py``."""
