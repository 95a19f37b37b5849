"""Plugins shipped with gafferd; each sub-directory is a plugin directory."""
