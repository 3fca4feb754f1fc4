"""Files appear whole or not at all, and every failure names its file in one line."""

from __future__ import annotations

import errno
import hashlib
import os
from unittest import mock

import pytest

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
    failed_save = RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    with mock.patch("torch.save", side_effect=failed_save), pytest.raises(OSError) as exc:
        save_torch(tmp_path / "m.pt", {"a": 1})
    assert user_message(exc.value).startswith(f"{tmp_path / 'm.pt'}: cannot be written (")
    assert list(tmp_path.iterdir()) == []
    with mock.patch("torch.save", side_effect=RuntimeError("a bug")), pytest.raises(RuntimeError):
        save_torch(tmp_path / "m.pt", {"a": 1})  # anything else is not the disk's: raised as it is


def test_user_messages_are_one_line_and_bugs_have_none():
    worker = TexqError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                       "call last):\n  File \"x.py\", line 1\ntexq.util.errors.DataError: a.png: not a readable image")
    assert user_message(worker) == "a.png: not a readable image"
    assert user_message(MemoryError()).startswith("out of memory")
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
