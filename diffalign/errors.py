"""Errors meant for people: the scripts print them as one line (no traceback unless ``--debug``)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration, file or input the user gave cannot work; the message names the field or file and says what
    to do. Raised before models and data load wherever the check allows."""


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, corrupt checkpoint, non-finite weights at export); the message names
    the step or the file."""
