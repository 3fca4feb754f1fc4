"""Fixtures of the recording tests (test_recording.py, test_bookkeeping.py): a real SQLite store
and a finished pipeline folder to record."""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture()
def store(tmp_path, monkeypatch):
    """A fresh SQLite store whose lock waits 1 s, its experiment made; the client."""
    from flows.bookkeeping.store import client, experiment_id

    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("TEXQ_TRACKING_WAIT", "1")
    c = client()
    experiment_id(c)
    return c


@pytest.fixture()
def out(tiny_run, tmp_path):
    """A finished pipeline folder (a texq run folder has the same layout) to record."""
    folder = tmp_path / "pipe"
    shutil.copytree(tiny_run, folder)
    return folder
