"""A run folder has one owner, and what it holds is checked before it is trusted: a second run into
a busy folder is refused at once, a killed owner's folder is taken over, a damaged or unreadable
file is reported in one line (never reused), a full disk leaves nothing half-written."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from streams import Lines

from texq.cli import main
from texq.export import load_run
from texq.run import RunConfig, run
from texq.util.errors import CheckpointError, TexqError
from texq.util.keys import build
from texq.util.lock import FolderBusy, folder_lock


def _cli(capsys, *argv) -> tuple[int, list[str]]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, [ln for ln in err.splitlines() if ln.startswith("texq: error:")]


def _run_argv(tiny_setup, out) -> list:
    ckpt, data, _ = tiny_setup
    return ["run", "--model", "resnet8_cifar10", "--checkpoint", ckpt, "--data", data, "--profile",
            "tiny", "--device", "cpu", "--no-progress", "--out", out]


def test_a_second_run_into_a_busy_folder_is_refused_at_once(tiny_setup, tmp_path, capsys):
    out = tmp_path / "run"
    with folder_lock(out, "a texq run"):  # held as a running texq run holds it
        rc, lines = _cli(capsys, *_run_argv(tiny_setup, out))
        assert rc == 2 and len(lines) == 1, lines
        assert f"{out} is in use by process {os.getpid()} on " in lines[0] and "a texq run" in lines[0]
        assert [p.name for p in out.iterdir()] == [".lock"]  # the refused run wrote nothing
    assert list(out.iterdir()) == []  # the owner's lock goes with it


def test_a_killed_owner_s_folder_is_taken_over(tmp_path):
    out = tmp_path / "run"
    code = ("import sys, time\nfrom texq.util.lock import folder_lock\n"
            "with folder_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(120)\n")
    owner = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "held"
        with pytest.raises(FolderBusy, match=f"in use by process {owner.pid} on "):
            with folder_lock(out):
                pytest.fail("two owners")
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    assert json.loads((out / ".lock").read_text())["pid"] == owner.pid  # its file is left behind
    with folder_lock(out) as lock:  # ... and taken over
        assert json.loads(lock.read_text())["pid"] == os.getpid()


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A copy of the finished tiny run, and its configuration."""
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    cfg = build(RunConfig, json.loads((copy / "config.json").read_text())["config"])
    return copy, cfg


def test_a_finished_run_records_the_digest_of_every_file_it_wrote(run_copy):
    copy, _ = run_copy
    recorded = json.loads((copy / "digests.json").read_text())
    assert {"teacher.json", "step1.pt", "train/qmodel.pt", "train/generator.pt", "train/summary.json",
            "train/history.jsonl", "history.json", "metrics.json", "per_class.json"} <= set(recorded)
    import hashlib

    for rel, digest in recorded.items():  # an independent hash of each file
        assert hashlib.sha256((copy / rel).read_bytes()).hexdigest() == digest, rel


def test_a_damaged_file_is_reported_never_reused_and_its_step_is_redone_once_removed(run_copy):
    copy, cfg = run_copy
    before = json.loads((copy / "metrics.json").read_text())
    q = copy / "train" / "qmodel.pt"
    data = bytearray(q.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: torch would still read it
    q.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"qmodel.pt: damaged .*remove {copy / 'train'} and rerun"):
        run(cfg, copy, progress=False)
    with pytest.raises(CheckpointError, match="qmodel.pt: damaged"):
        load_run(copy)  # texq export reads it the same way
    (copy / "metrics.json").unlink()
    (copy / "step1.pt").write_bytes(b"")  # truncated to nothing
    with pytest.raises(CheckpointError, match="step1.pt: damaged"):
        run(cfg, copy, progress=False)
    (copy / "step1.pt").unlink()
    shutil.rmtree(copy / "train")  # the remedy: remove what is damaged; the run redoes it
    after = run(cfg, copy, progress=False)
    assert (after["correct"], after["n"]) == (before["correct"], before["n"])


def test_an_unreadable_record_is_one_line(run_copy, tiny_setup, capsys):
    copy, _ = run_copy
    (copy / "config.json").write_text("{not json")
    rc, lines = _cli(capsys, *_run_argv(tiny_setup, copy))
    assert rc == 2 and len(lines) == 1 and f"{copy / 'config.json'}: not valid JSON" in lines[0]


def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(tiny_setup, tmp_path, capsys, monkeypatch):
    import texq.util.io as io

    def full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    monkeypatch.setattr(io.os, "replace", full)
    out = tmp_path / "run"
    rc, lines = _cli(capsys, *_run_argv(tiny_setup, out))
    assert rc == 2 and lines == [f"texq: error: {out / 'config.json'}: No space left on device"]
    assert [p.name for p in out.iterdir()] == []  # no temporary file, no lock, no config.json


def test_a_run_folder_that_is_a_file_is_refused_before_any_work(tiny_setup, tmp_path, capsys):
    out = tmp_path / "run"
    out.write_text("a file")
    rc, lines = _cli(capsys, *_run_argv(tiny_setup, out))
    assert rc == 2 and lines == [f"texq: error: {out} is a file: expected a folder (its destination)"]


def test_settings_outside_their_domain_are_refused_before_anything_is_written(tiny_setup, tmp_path, capsys):
    out = tmp_path / "run"
    for setting, words in (("finetune.lr=-0.1", "expected a positive number"),
                           ("finetune.batch_size=0", "expected an integer >= 1"),
                           ("calibration.iters=-3", "expected an integer >= 1"),
                           ("finetune.kd_temperature=0", "expected a positive number"),
                           ("finetune.mixup_p=2", "expected a number in [0, 1]"),
                           ("finetune.calib_crop_scale=[0, 1]", "expected a number in (0, 1] (each)"),
                           ("generator.lr=.nan", "expected a finite number")):
        rc, lines = _cli(capsys, *_run_argv(tiny_setup, out), "--set", setting)
        assert rc == 2 and len(lines) == 1 and setting.split("=")[0] in lines[0] and words in lines[0], lines
        assert not out.exists(), setting


def test_bad_values_of_python_callers_are_texq_errors():
    with pytest.raises(TexqError, match="finetune.epochs=0"):
        RunConfig.for_profile("tiny", pretrained=True, overrides={"finetune.epochs": 0})


@pytest.mark.integration  # texq run processes, one SIGKILLed
def test_concurrent_runs_one_refused_and_a_sigkilled_owner_s_run_resumed_by_the_next(tiny_setup, tmp_path):
    """Black box: two ``texq run`` into one folder at once, then the owner SIGKILLed mid-training."""

    out = tmp_path / "run"
    argv = [sys.executable, "-m", "texq.cli", *map(str, _run_argv(tiny_setup, out)), "--set", "finetune.epochs=40"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    Lines(first.stderr).wait_for(lambda ln: ln.startswith("epoch 3/"), 300, "the owner's epoch 3")  # it trains
    second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in second.stderr.splitlines() if ln.startswith("texq: error:")]
    assert second.returncode == 2 and len(lines) == 1 and f"in use by process {first.pid}" in lines[0]
    first.kill()
    first.wait()
    third = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-2000:]
    assert "resuming from" in third.stderr and "after epoch" in third.stderr
    assert json.loads(third.stdout.strip().splitlines()[-1])["n"] == 40
    assert not (out / ".lock").exists()
