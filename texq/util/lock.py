"""One owner per folder: a run (``texq run --out``) or a stage process writing into a folder holds
its lock; a second one is refused at once, naming the owner.

The lock is the kernel's (``fcntl.flock`` on ``FOLDER/.lock``): it is released when its process
ends, however it ends, so a folder whose owner was SIGKILLed is taken over by the next run with no
stale lock to clean up. The file holds the owner's process id, host and start time (for the error
message) and is removed on release.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from texq.util.errors import TexqError

LOCK_NAME = ".lock"


class FolderBusy(TexqError):
    """Another process owns the folder."""


def _owner(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"process {info['pid']} on {info['host']} (since {when})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "a run") -> Iterator[Path]:
    """Hold ``folder``'s lock for the block (the folder is created if missing); FolderBusy, naming
    the owner, if another live process holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderBusy(f"{folder} is in use by {_owner(path)}, {what} writing into it: wait "
                             f"for it to end or choose another folder") from None
        try:  # the file we locked may have been removed by its previous owner meanwhile
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.time()}).encode())
        yield path
    finally:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        os.close(fd)  # releases the lock
