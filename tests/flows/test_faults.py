"""Faults injected into real pipeline runs (tests/flows/faults.py; bench/faults.py prints every
scenario as the reliability table of docs/reliability.md): finished work is kept, nothing finished is computed
twice, the rerun ends with the metrics of a run without faults, and no MLflow run stays RUNNING."""

from __future__ import annotations

import importlib.util
import shutil

import pytest
from faults import (
    Project,
    can_mount_tmpfs,
    disk_full,
    killed,
    sqlite_locked,
    stages_in_process,
)

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(importlib.util.find_spec("mlflow") is None or shutil.which("git") is None,
                                 reason="the pipeline extra (dvc, mlflow) or git is missing")]
EPOCHS = 5


@pytest.fixture(scope="module")
def reference(tiny_params, tmp_path_factory) -> dict:
    """The metrics of the same pipeline without faults: its stages run in this process (15 s instead
    of a whole ``dvc repro``, ~2 min; bench/faults.py still runs the no-fault scenario)."""
    return stages_in_process(tiny_params, EPOCHS, tmp_path_factory.mktemp("no-fault"))


def _check(result, allowed_recomputed=()):
    assert result.kept, result
    assert set(result.recomputed) <= set(allowed_recomputed), result
    assert result.states == ["FINISHED"], result  # one run, its true final state; none RUNNING
    assert result.same_metrics, result


def test_a_store_locked_from_the_middle_of_train_to_the_end_loses_and_repeats_nothing(
        reference, tiny_params, tmp_path):
    p = Project(tmp_path, tiny_params, EPOCHS)
    _check(sqlite_locked(p, reference, EPOCHS, "middle to end"))
    assert "did not record them" in "".join(p.log) and "Traceback" not in "".join(p.log)


def test_a_killed_pipeline_is_ended_killed_by_reconcile_and_resumes_into_the_same_run(
        reference, tiny_params, tmp_path):
    p = Project(tmp_path, tiny_params, EPOCHS)
    result = killed(p, reference, EPOCHS)
    _check(result, result.unfinished)
    assert "RUNNING -> KILLED" in result.notes  # reconcile ended the dead run before the rerun


def test_a_full_disk_mid_train_is_one_line_and_the_rerun_resumes_with_each_epoch_once(
        reference, tiny_params, tmp_path):
    if not can_mount_tmpfs(tmp_path / "probe"):
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN)")
    p = Project(tmp_path, tiny_params, EPOCHS)
    result = disk_full(p, reference, EPOCHS)
    _check(result, result.unfinished)  # an epoch whose checkpoint the full disk refused is trained again
    assert len(result.unfinished) <= 1
