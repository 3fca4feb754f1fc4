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


def user_message(exc: BaseException) -> str | None:
    """The one line for an error a user causes or meets (bad input: ``TexqError``; their disk:
    an ``OSError`` on a file, e.g. full, read-only, a folder where a file is expected; memory too
    small for a batch), or None for anything else (a bug, which keeps its traceback)."""
    if isinstance(exc, TexqError):
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        if len(lines) > 1:  # re-raised by a DataLoader worker: its traceback, the error last
            return lines[-1].split(": ", 1)[-1] if lines[-1].startswith("texq.") else lines[-1]
        return lines[0] if lines else type(exc).__name__
    if isinstance(exc, OSError) and (exc.filename or exc.errno):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or exc}"
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or _no_memory(exc):
        first = (str(exc).strip().splitlines() or ["out of memory"])[0]
        return f"out of memory ({first}): use smaller batch sizes or image counts"
    return None


def _no_memory(exc: BaseException) -> bool:
    """torch's CPU allocator refusing a tensor: a RuntimeError, 'DefaultCPUAllocator: can't
    allocate memory: you tried to allocate N bytes'."""
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
