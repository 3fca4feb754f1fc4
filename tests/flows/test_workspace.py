"""A Prefect run's folder as a DVC workspace (flows/workspace.py): DVC's dvc.lock decides what
reruns. The Prefect flow over it is tested in test_flows.py."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(importlib.util.find_spec("dvc") is None,
                                 reason="the pipeline extra is not installed")]

from flows import ROOT, workspace  # noqa: E402
from texq.util.errors import TexqError  # noqa: E402
from texq.util.keys import assign  # noqa: E402


def test_relative_paths_become_absolute_and_names_stay(tmp_path):
    (tmp_path / "w.pt").write_bytes(b"x")
    params = {"checkpoint": "w.pt", "data": "cifar10-test1000", "train_data": None, "seed": 3,
              "model": "w.pt"}
    fixed = workspace.absolute_paths(params, tmp_path)
    assert fixed == {**params, "checkpoint": str(tmp_path / "w.pt")}  # model is a name, not a path
    assert params["checkpoint"] == "w.pt"  # the input is not modified


def test_prepare_lays_out_a_dvc_workspace_and_keeps_it(tiny_params, tmp_path):
    params = yaml.safe_load(Path(tiny_params).read_text())
    folder = workspace.prepare(tmp_path / "run", params)
    assert yaml.safe_load((folder / "params.yaml").read_text()) == params  # paths already absolute
    ws, project = (yaml.safe_load(f.read_text()) for f in (folder / "dvc.yaml", ROOT / "dvc.yaml"))
    assert ws["stages"].keys() == project["stages"].keys() and ws["plots"] == project["plots"]
    for name, stage in project["stages"].items():  # the same stages, every out in DVC's cache
        mine = ws["stages"][name]
        assert [mine[k] for k in ("cmd", "deps", "params")] == [stage[k] for k in ("cmd", "deps", "params")]
        for kind in ("outs", "metrics", "plots"):
            assert mine.get(kind, []) == [next(iter(o)) if isinstance(o, dict) else o for o in stage.get(kind, [])]
    assert (folder / "texq").resolve() == (ROOT / "texq").resolve() and (folder / ".dvc").is_dir()
    (folder / "dvc.lock").write_text("kept")
    assign(params, "finetune.alpha6", 7.0)
    assert workspace.prepare(folder, params) == folder
    assert yaml.safe_load((folder / "params.yaml").read_text())["finetune"]["alpha6"] == 7.0
    assert (folder / "dvc.lock").read_text() == "kept"
    (folder / "texq").unlink()
    (folder / "texq").mkdir()
    with pytest.raises(TexqError, match="a folder where the workspace links"):
        workspace.prepare(folder, params)


def test_dvc_runs_a_stage_then_skips_it_until_a_key_it_reads_changes(tiny_params, tmp_path, caplog):
    params = yaml.safe_load(Path(tiny_params).read_text())
    folder = workspace.prepare(tmp_path / "run", params)
    env = workspace.stage_env("cpu")
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with caplog.at_level(logging.INFO, logger="texq"):
        assert workspace.repro(folder, "teacher", env) is True
    assert any(r.getMessage().startswith("stage teacher:") for r in caplog.records)  # its log, live
    first = workspace.result(folder, "teacher")
    assert first == json.loads((folder / "out/pipeline/teacher.json").read_text()) and first["n"] == 40
    assert workspace.repro(folder, "teacher", env) is False  # dvc.lock: nothing changed
    assign(params, "finetune.alpha6", 7.0)  # a key teacher does not read
    workspace.prepare(folder, params)
    assert workspace.repro(folder, "teacher", env) is False
    assign(params, "evaluate.batch_size", 8)  # one it reads
    workspace.prepare(folder, params)
    assert workspace.repro(folder, "teacher", env) is True
    again = workspace.result(folder, "teacher")
    (folder / "out/pipeline/teacher.json").unlink()  # an out deleted behind DVC's back:
    assert workspace.repro(folder, "teacher", env) is False  # restored from DVC's run cache
    assert workspace.result(folder, "teacher") == again


def test_a_bad_input_is_the_stages_own_error_anything_else_a_failure(tiny_params, tmp_path):
    params = yaml.safe_load(Path(tiny_params).read_text())
    params["checkpoint"] = str(tmp_path / "missing.pt")
    folder = workspace.prepare(tmp_path / "run", params)
    env = workspace.stage_env("cpu")
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(TexqError, match=r"stage teacher .*missing\.pt"):
        workspace.repro(folder, "teacher", env)
    (folder / "dvc.yaml").write_text("stages:\n  teacher:\n    cmd: exit 3\n")
    with pytest.raises(workspace.StageFailed, match="exited with 3"):
        workspace.repro(folder, "teacher", env)


def test_a_zeroq_pipeline_runs_tracked_and_its_plots_load(tiny_params, tmp_path):
    """ZeroQ trains nothing (no history, no generator): every stage still runs and records, and
    DVC's plots load without an error (the loss curves are empty)."""
    import subprocess

    from mlflow.tracking import MlflowClient

    params = yaml.safe_load(Path(tiny_params).read_text())
    params["method"] = "zeroq"
    folder = workspace.prepare(tmp_path / "run", params)
    env = workspace.stage_env("cpu")
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for name in ("teacher", "synthesize", "train", "evaluate"):
        assert workspace.repro(folder, name, env) is True
    assert json.loads((folder / "out/pipeline/history.json").read_text()) == []
    shown = subprocess.run([*workspace._dvc_cmd(), "plots", "show", "--json"], cwd=folder, env=env,
                           capture_output=True, text=True, check=True)
    plots = json.loads(shown.stdout)
    assert "errors" not in plots and len(plots["data"]["per_class_top1"]) == 1
    c = MlflowClient(env["MLFLOW_TRACKING_URI"])
    [run] = c.search_runs([c.get_experiment_by_name("texq").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["method"] == "zeroq"
    assert run.data.metrics["top1"] == workspace.result(folder, "evaluate")["top1"]
