"""User-facing errors.

Every error a user can cause with bad input (a missing file, a wrong checkpoint, a bit width out
of range...) is a :class:`TexqError`. The CLI prints these as one line on stderr and exits non-zero;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class TexqError(ValueError):
    """Bad input: the message names the file, key or value and what was expected."""


class CheckpointError(TexqError):
    """A checkpoint is missing, unreadable, or does not fit the model."""


class DataError(TexqError):
    """A data set is missing or malformed."""


class ConfigError(TexqError):
    """A configuration value is outside its allowed range."""


class ExportError(TexqError):
    """A model cannot be written in the asked format (a missing package, a setting it cannot hold)."""
