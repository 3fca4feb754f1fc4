"""Commands pointed at the wrong kind of folder or store say so in one line and create nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _texq(monkeypatch, capsys, uri: str, *argv: str) -> list[str]:
    from texq.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(list(argv)) == 2
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_compare_on_a_store_that_does_not_exist_creates_none(tmp_path, monkeypatch, capsys):
    db = tmp_path / "new.db"
    err = _texq(monkeypatch, capsys, f"sqlite:///{db}", "compare")
    assert len(err) == 1 and err[0].startswith(f"texq: error: no MLflow store at {db}: nothing is recorded"), err
    assert not db.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("params", [[], ["--params", str(ROOT / "params.yaml")]], ids=["default", "--params"])
def test_sync_on_a_folder_without_pipeline_results_records_nothing(tmp_path, monkeypatch, capsys, params):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.txt").write_text("not a pipeline's output")
    db = tmp_path / "store.db"
    monkeypatch.chdir(ROOT)
    err = _texq(monkeypatch, capsys, f"sqlite:///{db}", "track", "sync", str(tmp_path / "photos"), *params)
    assert len(err) == 1 and "holds none of a pipeline's results (teacher.json" in err[0], err
    assert not db.exists() and sorted(p.name for p in (tmp_path / "photos").iterdir()) == ["a.txt"]
