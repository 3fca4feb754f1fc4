"""Atomic file writes and safe checkpoint reads.

Artifacts are written to a temporary file in the destination folder and renamed into place, so a
killed process never leaves a half-written file under the final name.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from texq.util.errors import CheckpointError, TexqError


@contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
        except OSError as exc:  # a write's error (a full disk) names no file: name the one it is for
            if exc.filename or not exc.errno:
                raise
            raise OSError(exc.errno, exc.strerror, str(dest)) from exc
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file's content, or a TexqError naming the file (missing, unreadable, not JSON)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise TexqError(f"{path}: not found") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise TexqError(f"{path}: not valid JSON ({_first_line(exc)}): remove it, or its folder, "
                        f"and rerun") from exc


def check_dest(path: str | os.PathLike, folder: bool = False) -> None:
    """Refuse, before any work, a destination that cannot be written: a folder where a file is
    expected (or a file where a folder is), or a parent that is a file."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        kind, want = ("a file", "a folder") if folder else ("a folder", "a file")
        raise TexqError(f"{path} is {kind}: expected {want} (its destination)")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise TexqError(f"{path}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK):
                raise TexqError(f"{path}: {parent} is not writable")
            break


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
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        why = next((ln for ln in lines if ln.startswith("Unsupported")), _first_line(exc))
        raise CheckpointError(
            f"cannot read checkpoint {path} with weights_only=True: not a PyTorch file of tensors "
            f"and plain containers (a plain pickle, pickled code, or other bytes: {why})"
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def save_torch(dest: str | os.PathLike, obj) -> None:
    """``torch.save`` to ``dest``, atomically. Serialized in memory first, then written: torch's
    own writer reports a failed write (a full disk) as "unexpected pos" with no errno, where a
    plain write raises the OSError that names the file. In memory, not to the temporary path:
    torch names the archive's records after a path it is given (the temporary name is random),
    so the same object would give other bytes on every save, and DVC another hash."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(dest) as tmp, open(tmp, "wb") as fh:
        fh.write(buffer.getbuffer())


def file_digest(path: str | os.PathLike, algo: str = "sha256") -> str:
    """The hex digest of a file's bytes."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
