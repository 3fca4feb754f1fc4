"""MLflow store conventions of flows/bookkeeping/pipeline_run.py that need no pipeline run."""

from __future__ import annotations

import importlib.util
import re
import shutil

import pytest
from streams import Lines

EPOCH = re.compile(r"epoch \d+/")  # an epoch's log line (after a progress bar's \r, on the same line)

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(importlib.util.find_spec("mlflow") is None,
                                 reason="the pipeline extra is not installed")]


def test_a_copied_store_never_writes_artifacts_into_the_old_checkout(tmp_path, monkeypatch):
    from flows.bookkeeping.store import client, experiment_id
    from texq.util.errors import ConfigError

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


def _store(tmp_path, monkeypatch):
    from flows.bookkeeping.store import client

    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return client()


def test_the_experiment_opens_on_its_runs_with_texq_columns(tmp_path, monkeypatch):
    import json

    from flows.bookkeeping.store import VIEW_KEY, experiment_id, runs_view_url

    c = _store(tmp_path, monkeypatch)
    exp = c.get_experiment(experiment_id(c))
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(exp.tags[f"mlflow.sharedViewState.{VIEW_KEY}"])
    assert view["selectedColumns"][0] == "metrics.`top1`" and view["orderByKey"] == "metrics.`top1`"
    assert runs_view_url(exp.experiment_id) is None  # a local store has no server to link
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000/")
    assert runs_view_url("7") == ("http://127.0.0.1:5000/#/experiments/7/runs?viewStateShareKey=texq"
                                  "&workflowType=machine_learning")


def test_a_stopped_stage_ends_killed_an_error_failed_and_a_flow_run_s_leftovers_end_as_told(
        tiny_params, tmp_path, monkeypatch):
    from flows.bookkeeping.store import experiment_id
    from flows.bookkeeping.run_end import FLOW_END_TAG, Orphaned, Terminated, end_flow_run_runs, end_state
    from flows.bookkeeping.pipeline_run import tracked_stage
    from texq.pipeline import read_config

    assert [end_state(e) for e in (Terminated(), KeyboardInterrupt(), ValueError(), SystemExit(1),
                                   Orphaned())] == ["KILLED", "KILLED", "FAILED", "FAILED", "FAILED"]
    c = _store(tmp_path, monkeypatch)
    cfg = read_config(tiny_params, "cpu").run
    ids = {}
    for exc, flow in ((Terminated("SIGTERM"), "f1"), (ValueError("bad"), "f2")):
        with pytest.raises(type(exc)):
            with tracked_stage("train", tiny_params, tmp_path, cfg, flow_run_id=flow) as run_id:
                ids[flow] = run_id
                raise exc
    assert c.get_run(ids["f1"]).info.status == "KILLED" and c.get_run(ids["f2"]).info.status == "FAILED"
    # said apart in words where MLflow's UI draws one red icon for both
    assert c.get_run(ids["f1"]).data.tags["texq.end"] == "stopped: stage train stopped by a signal"
    assert c.get_run(ids["f2"]).data.tags["texq.end"] == "failed: stage train raised ValueError"
    assert c.get_run(ids["f2"]).data.tags["texq.stage"] == "train failed"
    exp = experiment_id(c)
    left = [c.create_run(exp, tags={"prefect_flow_run_id": "f3"}).info.run_id for _ in range(2)]
    done = c.create_run(exp, tags={"prefect_flow_run_id": "f3"}).info.run_id
    c.set_terminated(done, "FINISHED")
    other = c.create_run(exp, tags={"prefect_flow_run_id": "f4"}).info.run_id
    assert sorted(end_flow_run_runs("f3", "KILLED", "Cancelled")) == sorted(left)
    assert [c.get_run(r).info.status for r in (*left, done, other)] == ["KILLED", "KILLED", "FINISHED", "RUNNING"]
    assert c.get_run(left[0]).data.tags[FLOW_END_TAG] == "Cancelled"
    assert c.get_run(left[0]).data.tags["texq.end"] == "stopped: Prefect flow run Cancelled"
    assert end_flow_run_runs("", "FAILED") == []  # no flow run: nothing to end
    # a stage that outlived its flow run (its process died) opens no new run for it
    before = len(c.search_runs([exp]))
    with pytest.raises(Orphaned, match="flow run f3 ended Cancelled"):
        with tracked_stage("evaluate", tiny_params, tmp_path, cfg, flow_run_id="f3"):
            pytest.fail("the stage ran")
    assert len(c.search_runs([exp])) == before


def test_a_registered_version_describes_the_run_in_its_tags():
    from flows.bookkeeping.logged_model import version_description, version_tags
    from texq.run.config import RunConfig

    cfg = RunConfig.for_profile("quick", pretrained=True, w_bits=3, a_bits=3, seed=2)
    scores = {"top1": 86.4, "top1_ci95": [84.13, 88.39], "fp_top1": 91.5, "n": 1000, "data": "cifar10-test1000"}
    tags = version_tags(cfg, scores)
    assert tags == {"top1": "86.40", "top1_ci95": "84.13-88.39", "fp_top1": "91.50", "n": "1000",
                    "data": "cifar10-test1000", "method": "texq", "w_bits": "3", "a_bits": "3", "seed": "2",
                    "profile": "quick"}
    assert version_description(cfg, scores) == (
        "texq W3A3, seed 2, quick profile: top-1 86.40 (95% interval 84.13-88.39; full precision 91.50) "
        "on cifar10-test1000, n = 1000, final-epoch model")


def test_sigterm_stops_a_stage_process_and_its_run_ends_killed(tiny_params, tmp_path):
    """What Prefect's cancellation does to a stage: SIGTERM to its process group."""
    import os
    import signal
    import subprocess
    import sys

    import yaml
    from mlflow.tracking import MlflowClient

    params = yaml.safe_load(tiny_params.read_text())
    params["finetune"]["epochs"] = 100_000  # never finishes: each session is stopped, whatever the speed
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "out"
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", OMP_NUM_THREADS="1")
    env.pop("MLFLOW_EXPERIMENT_NAME", None)
    subprocess.run([sys.executable, "-m", "flows.stage", "synthesize", "--params", str(tmp_path / "params.yaml"),
                    "--out", str(out), "--device", "cpu", "--no-progress"], env=env, check=True,
                   capture_output=True, timeout=300)
    proc = subprocess.Popen([sys.executable, "-m", "flows.stage", "train", "--params", str(tmp_path / "params.yaml"),
                             "--out", str(out), "--device", "cpu"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines = Lines(proc.stderr)
    lines.wait_for(EPOCH.search, 300, "the stage's first epoch")  # stop it once its epochs run
    os.killpg(proc.pid, signal.SIGTERM)
    err = lines.text(proc)
    assert proc.returncode == 128 + signal.SIGTERM and "stopped by signal SIGTERM" in err
    c = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = c.get_experiment_by_name("texq").experiment_id
    (run,) = c.search_runs([exp])
    assert run.info.status == "KILLED" and run.info.end_time

    # the flow run's process (here a stand-in) dies: the stage stops and its run ends FAILED
    flow = subprocess.Popen(["sleep", "600"])
    proc = subprocess.Popen([sys.executable, "-m", "flows.stage", "train", "--params", str(tmp_path / "params.yaml"),
                             "--out", str(out), "--device", "cpu"], env=dict(env, TEXQ_FLOW_PID=str(flow.pid)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines = Lines(proc.stderr)
    lines.wait_for(EPOCH.search, 300, "the stage's first epoch")
    flow.kill()
    flow.wait()
    err = lines.text(proc)
    assert proc.returncode == 128 + signal.SIGTERM and f"its flow run's process {flow.pid} is gone" in err
    # the second session of the same pipeline run continued the first one's record (reopened it)
    (again,) = c.search_runs([exp])
    assert again.info.run_id == run.info.run_id and again.info.status == "FAILED" and again.info.end_time
    assert again.data.tags["texq.resumed"] == "1"
    # a stage started after its flow run's process died does not start
    started = subprocess.run([sys.executable, "-m", "flows.stage", "train", "--params", str(tmp_path / "params.yaml"),
                              "--out", str(out), "--device", "cpu"], env=dict(env, TEXQ_FLOW_PID=str(flow.pid)),
                             capture_output=True, text=True, timeout=120)
    assert started.returncode == 128 + signal.SIGTERM and "not started" in started.stderr
    assert len(c.search_runs([exp])) == 1


def test_the_watch_on_a_flow_run_s_process_fires_once_it_is_gone(monkeypatch):
    import subprocess
    import threading

    import flows.stage
    from flows.stage import alive, watch

    looked, five = [], threading.Event()

    def counted(pid: int) -> bool:  # the watch's own check, counted: no sleep decides the test
        looked.append(pid)
        if len(looked) >= 5:
            five.set()
        return alive(pid)

    monkeypatch.setattr(flows.stage, "alive", counted)
    proc = subprocess.Popen(["sleep", "60"])
    fired = threading.Event()
    watch(proc.pid, fired.set, period=0.05)
    assert five.wait(30)  # the watch found the process alive five times
    assert alive(proc.pid) and not fired.is_set()
    proc.kill()  # not reaped yet: a zombie counts as gone
    assert fired.wait(10) and not alive(proc.pid)
    proc.wait()
