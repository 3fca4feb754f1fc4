"""MLflow store conventions of flows/tracking.py that need no pipeline run."""

from __future__ import annotations

import importlib.util
import shutil

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mlflow") is None,
                                reason="the pipeline extra is not installed")


def test_a_copied_store_never_writes_artifacts_into_the_old_checkout(tmp_path, monkeypatch):
    from flows.tracking import client, experiment_id
    from texq.errors import ConfigError

    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    (tmp_path / "a").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}")
    c = client()
    exp = c.get_experiment(experiment_id(c))
    assert exp.artifact_location == (tmp_path / "a" / "mlartifacts").as_uri()
    assert experiment_id(c) == exp.experiment_id  # found again, not recreated
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # the project copied, its store with it
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}")
    c = client()
    with pytest.raises(ConfigError, match=r"keeps its artifacts in .*/a/mlartifacts.*not beside this store"):
        experiment_id(c)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "texq-b")  # the remedy the error names
    fresh = c.get_experiment(experiment_id(c))
    assert fresh.artifact_location == (tmp_path / "b" / "mlartifacts").as_uri()
