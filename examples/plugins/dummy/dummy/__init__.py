"""The dummy example plugin: a site (``_site/``) and an application."""
