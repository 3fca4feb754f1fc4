"""dvc.lock is committed for the default pipeline and records this commit's code and params, so
that a fresh clone's ``dvc status`` is meaningful (only the cached outs, which no remote holds,
are missing) and ``dvc metrics show`` / ``dvc metrics diff`` read the committed results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DVC = Path(sys.executable).parent / "dvc"
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not DVC.exists(), reason="the pipeline extra (dvc) is not installed")]
REFRESH = "run scripts/main.sh, then commit dvc.lock and out/pipeline/*.json"
ABSENT = ("deleted", "not in cache")  # how dvc status says an out is missing (cache or not)


def stale_entries(status: dict, cached_outs: set[str]) -> dict[str, list]:
    """What in ``dvc status --json`` says the lock is not this commit's: any changed command,
    param, code dep or committed (uncached) out. Only a cached out or an upstream cached out
    being absent (a clone without a DVC remote) is allowed."""
    stale: dict[str, list] = {}
    for stage, changes in status.items():
        for change in changes:
            if not isinstance(change, dict):  # 'changed command', 'always changed', ...
                stale.setdefault(stage, []).append(change)
                continue
            for kind, paths in change.items():
                for path, what in paths.items():
                    if not (what in ABSENT and path in cached_outs):
                        stale.setdefault(stage, []).append(f"{kind}: {path} {what}")
    return stale


def test_stale_entries_allow_only_missing_cached_outs():
    status = {"train": [{"changed deps": {"out/pipeline/step1.pt": "deleted"}},
                        {"changed outs": {"out/pipeline/train": "not in cache"}}],
              "evaluate": [{"changed deps": {"texq/run/evaluate.py": "modified",
                                             "params.yaml": {"modified": "seed"}}},
                           {"changed outs": {"out/pipeline/metrics.json": "deleted"}}],
              "teacher": ["changed command"]}
    cached = {"out/pipeline/step1.pt", "out/pipeline/train"}
    assert stale_entries(status, cached) == {
        "evaluate": ["changed deps: texq/run/evaluate.py modified",
                     "changed deps: params.yaml {'modified': 'seed'}",
                     "changed outs: out/pipeline/metrics.json deleted"],
        "teacher": ["changed command"]}


def test_dvc_lock_records_this_commits_default_pipeline():
    assert (ROOT / "dvc.lock").is_file(), f"dvc.lock is missing: {REFRESH}"
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    cached = {next(iter(o)) if isinstance(o, dict) else o for s in stages.values()
              for o in s.get("outs") or []}  # metrics and plots are cache: false, in git
    assert cached == {"out/pipeline/step1.pt", "out/pipeline/train"}
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    proc = subprocess.run([str(DVC), "status", "--json"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    stale = stale_entries(json.loads(proc.stdout.strip().splitlines()[-1]), cached)
    assert not stale, f"dvc.lock is not this commit's ({stale}): {REFRESH}"
    metrics = json.loads((ROOT / "out/pipeline/metrics.json").read_text())
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]
    assert lock["train"]["params"]["params.yaml"]["w_bits"] == metrics["w_bits"]
    assert lock["evaluate"]["params"]["params.yaml"]["seed"] == metrics["seed"]
