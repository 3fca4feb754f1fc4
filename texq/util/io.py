"""Atomic file writes and safe checkpoint reads.

Artifacts are written to a temporary file in the destination folder and renamed into place, so a
killed process never leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from texq.util.errors import CheckpointError


@contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(dest: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def load_torch(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU with one clear error for each failure."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint is not a file: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path}: truncated or not a PyTorch file ({_first_line(exc)})"
        ) from exc
    except Exception as exc:  # pickle.UnpicklingError and friends from weights_only
        raise CheckpointError(
            f"cannot read checkpoint {path} with weights_only=True: {_first_line(exc)}"
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def save_torch(dest: str | os.PathLike, obj) -> None:
    """``torch.save`` to ``dest``, atomically. Through an open file, not the temporary path: torch
    names the archive's records after a path it is given (the temporary name is random), so the
    same object would give other bytes on every save, and DVC another hash."""
    with atomic_path(dest) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)
