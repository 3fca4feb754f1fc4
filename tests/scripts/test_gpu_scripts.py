"""The prepared GPU commands, run on the CPU: scripts/gpu_speedups.sh (every phase, the tiny
profile) and bench/paper_runs.py (a paper-protocol run stopped at a window's deadline, packed,
unpacked and finished in a later window, as the GPU's short windows need)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.assets]
sys.path.insert(0, str(ROOT / "bench"))
import paper_runs  # noqa: E402


def test_gpu_speedups_script_writes_its_few_files_on_the_cpu(tmp_path, assets):
    out = tmp_path / "check"
    env = {**os.environ, "TEXQ_DEVICE": "cpu", "TEXQ_CHECK_SEEDS": "1", "TEXQ_CHECK_OUT": str(out),
           "TEXQ_ASSETS": str(assets), "PYTHON": sys.executable,
           "TEXQ_CHECK_PHASES": "tests,speed,quick,paper", "TEXQ_PAPER_RUNS": "gdfq-w4a4-s0"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_speedups.sh")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["device.txt", "paper", "quick.jsonl", "speed.err", "speed.log", "summary.txt",
                     "tests.log"]
    assert sorted(p.name for p in (out / "paper").iterdir()) == ["gdfq-w4a4-s0.tar.gz", "summary.txt"]
    summary = (out / "summary.txt").read_text()
    for variant in ("base", "bounded", "all"):
        assert any(line.split()[:1] == [variant] for line in summary.splitlines()[3:]), summary
    assert "1 runs per process" in summary and "2 runs per process" in summary
    rows = [json.loads(line) for line in (out / "quick.jsonl").read_text().splitlines()]
    assert [(r["variant"], r["rc"]) for r in rows] == [("base", 0), ("all", 0)]
    assert all(r["profile"] == "tiny" and 0 < r["top1"] <= 100 for r in rows)
    assert "quick profile base: top-1" in summary and "quick profile all: top-1" in summary
    assert "gdfq-w4a4-s0: rc 0; finished: top-1" in summary  # the paper phase, tiny profile on the CPU


#: texq run that stops itself (SIGSTOP) once its first epoch's checkpoint is written: window 1's
#: deadline then falls at a known point of the run, whatever the machine's speed
PAUSE_AFTER_EPOCH_1 = """
import os, signal, sys
import texq.run.train as train
from texq.cli import main
save = train.save_torch
def save_then_pause(path, obj):
    save(path, obj)
    if path.name == "checkpoint.pt" and obj["epoch"] == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
train.save_torch = save_then_pause
sys.exit(main(sys.argv[1:]))
"""


def _wait_until_paused(proc: subprocess.Popen, deadline: float) -> int | None:
    """paper_runs.wait for window 1: the deadline is the moment the run pauses itself."""
    give_up = time.monotonic() + 300
    while time.monotonic() < give_up:
        if proc.poll() is not None:
            return proc.returncode
        if Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T":
            return None
        time.sleep(0.05)
    raise AssertionError("window 1's run neither paused nor ended in 300 s")


def test_paper_runs_carry_a_stopped_run_to_the_next_window(tmp_path, assets, monkeypatch):
    """Window 1 stops the run at its deadline (after epoch 1 of 2) and packs it; unpacked and
    carried, window 2 finishes it; the result equals an uninterrupted run's and is copied to the
    results."""
    name = "texq-w4a4-s0"
    common = ["--profile", "tiny", "--device", "cpu", "--assets", str(assets), "--min-seconds", "0"]
    whole = tmp_path / "whole"
    assert paper_runs.main(["run", name, "--seconds", "600", "--out", str(whole / "out"),
                            "--dir", str(whole / "runs"), *common]) == 0
    assert "finished" in (whole / "out" / "summary.txt").read_text()

    w1 = tmp_path / "w1"
    with monkeypatch.context() as m:
        command = paper_runs.command
        m.setattr(paper_runs, "command", lambda *a: [sys.executable, "-c", PAUSE_AFTER_EPOCH_1,
                                                     *command(*a)[3:]])
        m.setattr(paper_runs, "wait", _wait_until_paused)
        assert paper_runs.main(["run", name, "--seconds", "600", "--out", str(w1 / "out"),
                                "--dir", str(w1 / "runs"), *common]) == 0
    summary = (w1 / "out" / "summary.txt").read_text()
    assert f"{name}: stopped at the deadline; unfinished: 1 epochs of steps 2-3 checkpointed" in summary
    with tarfile.open(w1 / "out" / f"{name}.tar.gz") as tar:
        assert all(m.name.startswith(name) for m in tar.getmembers())
    here, results = tmp_path / "here", tmp_path / "results"
    assert paper_runs.main(["unpack", str(w1 / "out"), "--dir", str(here), "--results", str(results)]) == 0
    assert not (results / name).exists()
    w2 = tmp_path / "w2"
    assert paper_runs.main(["run", name, "--seconds", "600", "--out", str(w2 / "out"),
                            "--dir", str(here), *common]) == 0
    assert paper_runs.main(["unpack", str(w2 / "out"), "--dir", str(tmp_path / "again"),
                            "--results", str(results)]) == 0
    got = json.loads((results / name / "metrics.json").read_text())
    ref = json.loads((whole / "runs" / name / "metrics.json").read_text())
    assert (got["correct"], got["per_class_top1"]) == (ref["correct"], ref["per_class_top1"])
    assert (results / name / "history.jsonl").exists()


def test_paper_run_names_are_checked():
    with pytest.raises(SystemExit, match="expected <texq|gdfq|real>"):
        paper_runs.command("texq-w4-s0", Path("x"), Path("a"), "paper", "cuda", [])
    cmd = paper_runs.command("real-w3a3-s2", Path("x"), Path("a"), "paper", "cuda", ["compile=true"])
    assert cmd[cmd.index("--w-bits") + 1] == "3" and cmd[cmd.index("--seed") + 1] == "2"
    assert "--train-data" in cmd and cmd[-2:] == ["--set", "compile=true"]
