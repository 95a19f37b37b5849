"""gafferd health checks: see :mod:`healthcheck.plugin` for the configuration."""
