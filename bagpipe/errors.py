"""Errors shared by the roles (the configuration's own is `bagpipe.config.ConfigError`)."""

from __future__ import annotations


class PeerError(RuntimeError):
    """A peer died, timed out or sent something other than what the plan says."""
