"""Files appear whole or not at all, and every failure names its file in one line."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from texq.util.errors import CheckpointError, TexqError, user_message
from texq.util.io import (
    atomic_path,
    check_dest,
    file_digest,
    load_torch,
    read_json,
    save_torch,
    write_json,
)


def test_a_failed_write_leaves_nothing_and_names_its_file(tmp_path):
    dest = tmp_path / "r.json"
    with pytest.raises(OSError) as exc:
        with atomic_path(dest) as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what write() raises on a full disk
    assert user_message(exc.value) == f"{dest}: No space left on device"
    assert list(tmp_path.iterdir()) == []


_FILL = """
import resource, signal, sys, torch
from texq.util.errors import user_message
from texq.util.io import save_torch
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # a disk that fills at 100 kB
try:
    save_torch(sys.argv[1], {"w": torch.zeros(100_000)})  # 400 kB
except OSError as exc:
    print(user_message(exc))
"""


def test_a_checkpoint_on_a_disk_that_fills_mid_write_names_its_file_and_leaves_nothing(tmp_path):
    """A real failed write of torch's archive (a file-size limit stands in for a full disk): the
    OSError names the checkpoint (torch's own writer would say 'unexpected pos', no file, no errno)."""
    dest = tmp_path / "m.pt"
    proc = subprocess.run([sys.executable, "-c", _FILL, str(dest)], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{dest}: File too large"
    assert list(tmp_path.iterdir()) == []


def test_save_torch_writes_what_torch_save_writes_to_a_file(tmp_path):
    """The same bytes as torch.save into an open file (DVC's hashes of earlier outputs stay)."""
    obj = {"a": torch.arange(10.0), "b": {"c": torch.ones(3, 3)}}
    save_torch(tmp_path / "a.pt", obj)
    with open(tmp_path / "b.pt", "wb") as fh:
        torch.save(obj, fh)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()


def test_user_messages_are_one_line_and_bugs_have_none():
    worker = TexqError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                       "call last):\n  File \"x.py\", line 1\ntexq.util.errors.DataError: a.png: not a readable image")
    assert user_message(worker) == "a.png: not a readable image"
    assert user_message(MemoryError()).startswith("out of memory")
    refused = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 85899345880 bytes. Error code 12")
    assert user_message(refused).startswith("out of memory ([enforce fail") and user_message(RuntimeError("x")) is None
    assert user_message(ValueError("a bug")) is None and user_message(KeyError("k")) is None


def test_json_and_checkpoints_that_cannot_be_read_name_their_file(tmp_path):
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(TexqError, match=r"bad.json: not valid JSON"):
        read_json(tmp_path / "bad.json")
    write_json(tmp_path / "ok.json", {"a": [1, 2]})
    assert read_json(tmp_path / "ok.json") == {"a": [1, 2]}
    (tmp_path / "junk.pt").write_bytes(b"\x80\x04junk")
    with pytest.raises(CheckpointError, match=r"junk.pt.*not a PyTorch file of tensors"):
        load_torch(tmp_path / "junk.pt")


def test_a_destination_is_checked_before_any_work(tmp_path):
    (tmp_path / "f").write_text("x")
    check_dest(tmp_path / "new" / "r.json")  # a folder to be made: fine
    check_dest(tmp_path / "run", folder=True)
    with pytest.raises(TexqError, match="is a folder: expected a file"):
        check_dest(tmp_path)
    with pytest.raises(TexqError, match="is a file: expected a folder"):
        check_dest(tmp_path / "f", folder=True)
    with pytest.raises(TexqError, match="is a file, not a folder"):
        check_dest(tmp_path / "f" / "r.json")


def test_file_digest_is_sha256_of_the_bytes(tmp_path):
    data = os.urandom(3 << 20)  # more than one read chunk
    (tmp_path / "b").write_bytes(data)
    assert file_digest(tmp_path / "b") == hashlib.sha256(data).hexdigest()
    assert file_digest(tmp_path / "b", "sha1") == hashlib.sha1(data).hexdigest()
