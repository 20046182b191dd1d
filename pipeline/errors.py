"""Errors of the pipeline's typed parameters, in a module that imports nothing: entry points that only need to
name them (``service.errors``) do not load torch through :mod:`pipeline.config`."""
from __future__ import annotations


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key."""


__all__ = ["ConfigError"]
