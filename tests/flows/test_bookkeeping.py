"""Bookkeeping that never says what did not happen: each window in which a stage, a sync, a
reconcile or a flow could record a state it is not in, reproduced against a real store (SQLite, or
a real MLflow tracking server) and closed."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml
from streams import Lines

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(importlib.util.find_spec("mlflow") is None,
                                 reason="the pipeline extra is not installed")]


def _runs(c):
    from flows.bookkeeping.store import experiment_id

    return c.search_runs([experiment_id(c)], order_by=["attributes.start_time ASC"])


def _stage(name, params, out, env, **kw):
    return [sys.executable, "-m", "flows.stage", name, "--params", str(params), "--out", str(out),
            "--device", "cpu", *kw.get("extra", ())]


def test_a_second_process_on_a_busy_stage_touches_no_run_and_the_owner_s_run_tells_the_truth(
        tiny_params, tmp_path, monkeypatch):
    """What a retried task or an impatient user does: the same stage command again while it trains."""
    from mlflow.tracking import MlflowClient

    from flows.bookkeeping.sync import reconcile
    from flows.bookkeeping.pipeline_run import PID_TAG, STAGE_TAG

    params = yaml.safe_load(tiny_params.read_text())
    params["finetune"]["epochs"] = 8
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    p, out = tmp_path / "params.yaml", tmp_path / "out"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, OMP_NUM_THREADS="1")
    env.pop("MLFLOW_EXPERIMENT_NAME", None)
    subprocess.run(_stage("synthesize", p, out, env, extra=["--no-progress"]), env=env, check=True,
                   capture_output=True, timeout=300)
    owner = subprocess.Popen(_stage("train", p, out, env), env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        Lines(owner.stderr).wait_for(lambda ln: "epoch " in ln, 180, "an epoch line")
        os.kill(owner.pid, signal.SIGSTOP)  # held in its epochs, however fast this machine is
        second = subprocess.run(_stage("train", p, out, env, extra=["--no-progress"]), env=env,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and f"in use by process {owner.pid}" in second.stderr, second.stderr
        assert owner.poll() is None, "the owner ended before it could be checked"
        c = MlflowClient(uri)
        (run,) = c.search_runs([c.get_experiment_by_name("texq").experiment_id])
        assert run.info.status == "RUNNING"  # not FAILED by the refused process
        assert run.data.tags[PID_TAG] == str(owner.pid) and run.data.tags[STAGE_TAG] == "train running"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        assert reconcile()["ended"] == []  # the owner works: nothing to end
        os.kill(owner.pid, signal.SIGCONT)
        assert owner.wait(300) == 0
    finally:
        if owner.poll() is None:
            os.killpg(owner.pid, signal.SIGKILL)
            owner.wait()
    subprocess.run(_stage("evaluate", p, out, env, extra=["--no-progress"]), env=env, check=True,
                   capture_output=True, timeout=300)
    (run,) = c.search_runs([c.get_experiment_by_name("texq").experiment_id])
    assert run.info.status == "FINISHED" and "texq.resumed" not in run.data.tags


def test_a_sigterm_while_a_finished_stage_records_keeps_the_stage_done_and_sync_records_it(
        tiny_params, tmp_path, monkeypatch):
    """Prefect's cancel (or the flow-process watch) lands after the work, while the store is slow:
    the stage's outputs are kept, it exits 0 (DVC commits it, never reruns it), the record is noted."""
    import sqlite3

    from mlflow.tracking import MlflowClient

    from flows.bookkeeping.record_stage import PENDING
    from flows.bookkeeping.sync import sync

    params = yaml.safe_load(tiny_params.read_text())
    params["finetune"]["epochs"] = 3
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    p, out = tmp_path / "params.yaml", tmp_path / "out"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, OMP_NUM_THREADS="1", TEXQ_TRACKING_WAIT="300")
    env.pop("MLFLOW_EXPERIMENT_NAME", None)
    subprocess.run(_stage("synthesize", p, out, env, extra=["--no-progress"]), env=env, check=True,
                   capture_output=True, timeout=300)
    proc = subprocess.Popen(_stage("train", p, out, env), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    lock = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None, timeout=60)
    try:
        lines = Lines(proc.stderr)
        lines.wait_for(lambda ln: "epoch " in ln, 180, "an epoch line")  # its run is opened and marked
        lock.execute("BEGIN EXCLUSIVE")  # a store that takes minutes (a long write elsewhere)
        lines.wait_for(lambda ln: "texq: recording stage train" in ln, 300, "the recording line")  # work done, the record waits
        os.killpg(proc.pid, signal.SIGTERM)
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        lock.execute("ROLLBACK") if lock.in_transaction else None
        lock.close()
    err = lines.text()
    assert rc == 0, err[-3000:]
    assert "stage train finished and its outputs are kept" in err and "SIGTERM" in err
    assert (out / "train" / "summary.json").is_file()
    assert [n["stage"] for n in json.loads((out / PENDING).read_text())] == ["train"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    assert sync(out, p)["recorded"] == ["train"]
    c = MlflowClient(uri)
    (run,) = c.search_runs([c.get_experiment_by_name("texq").experiment_id])
    assert "texq.recorded.train" in run.data.tags and run.info.status == "KILLED"


def test_the_model_is_logged_and_registered_once_whatever_failed_between_and_no_run_changes_state(
        store, out, tiny_params):
    """A failure between logging the model and the tag that marks it logged: the next recording
    logs and registers nothing again; logging a model into a stopped run leaves it stopped."""
    from flows.bookkeeping.logged_model import log_quantized_model
    from flows.bookkeeping.record_stage import MODEL_FOR_TAG, RECORDED_TAG, record_stage
    from flows.bookkeeping.store import experiment_id
    from texq.pipeline import read_config

    cfg = read_config(tiny_params, "cpu").run
    exp = experiment_id(store)
    run_id = store.create_run(exp).info.run_id
    assert record_stage(store, run_id, "evaluate", out, cfg, register=True)
    store.delete_tag(run_id, MODEL_FOR_TAG)  # as if the process died right after log_model
    store.delete_tag(run_id, RECORDED_TAG + "evaluate")
    assert record_stage(store, run_id, "evaluate", out, cfg, register=True)
    models = store.search_logged_models([exp])
    assert len(models) == 1 and models[0].source_run_id == run_id
    name = f"texq-{cfg.model}-w{cfg.w_bits}a{cfg.a_bits}"
    (version,) = store.search_model_versions(f"name='{name}'")
    assert version.run_id == run_id and version.tags["top1"]
    # a stopped run (KILLED: its session was cancelled) stays stopped while its model is logged
    store.set_terminated(run_id, "KILLED")
    scores = json.loads((out / "metrics.json").read_text())
    log_quantized_model(store, run_id, out / "train" / "qmodel.pt", cfg, False, scores)
    assert store.get_run(run_id).info.status == "KILLED"


def test_params_a_run_failed_to_take_are_logged_by_the_next_stage(store, out, tiny_params):
    from flows.bookkeeping.pipeline_run import KEY_TAG, pipeline_key, tracked_stage
    from texq.pipeline import read_config

    cfg = read_config(tiny_params, "cpu").run
    from flows.bookkeeping.store import experiment_id

    # the run was created, then logging its params failed (the store went away in between)
    store.create_run(experiment_id(store), tags={KEY_TAG: pipeline_key(tiny_params)})
    with tracked_stage("teacher", tiny_params, out, cfg) as run_id:
        pass
    params = store.get_run(run_id).data.params
    assert params["w_bits"] == str(cfg.w_bits) and params["method"] == cfg.method


def test_reconcile_ends_a_completed_flow_run_s_run_and_leaves_another_machine_s_alone(
        store, out, tiny_params, monkeypatch):
    from flows.bookkeeping.store import experiment_id
    from flows.bookkeeping.sync import reconcile
    from flows.bookkeeping.provenance import where_tags
    from flows.bookkeeping.pipeline_run import KEY_TAG, OUT_TAG, PID_TAG, STAGE_TAG

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    exp = experiment_id(store)
    here = where_tags()

    def run(stage, **extra):
        return store.create_run(exp, tags={STAGE_TAG: stage, PID_TAG: str(dead.pid), KEY_TAG: "k",
                                           OUT_TAG: str(out), **here, **extra}).info.run_id

    # a flow run that completed, whose last recording failed, reconciled from another machine
    completed = run("evaluate done", **{"prefect_flow_run_id": "f-done", "texq.host": "gpu-1",
                                        "texq.host_id": "another"})
    # another machine (or container) with this machine's name, whose stage works on
    twin = run("train running", **{"texq.host_id": "another"})
    monkeypatch.setattr("flows.bookkeeping.sync._prefect_states", lambda ids: {"f-done": "COMPLETED"})
    ended = reconcile()["ended"]
    assert [e["run_id"] for e in ended] == [completed]
    assert store.get_run(completed).info.status == "FINISHED"
    assert store.get_run(twin).info.status == "RUNNING"


def test_sync_records_into_the_run_of_the_files_not_of_another_configuration_s_note(
        store, out, tiny_params, tmp_path):
    from flows.bookkeeping.record_stage import PENDING, note_unrecorded
    from flows.bookkeeping.store import experiment_id
    from flows.bookkeeping.sync import sync

    exp = experiment_id(store)
    other = store.create_run(exp, run_name="another configuration").info.run_id
    # a note left when this folder held another configuration's results (since overwritten)
    note_unrecorded(out, "evaluate", "key-of-another-config", other, OSError("store down"))
    notes = json.loads((out / PENDING).read_text())
    notes[0]["digest"] = "0" * 64  # that configuration's metrics.json, not today's
    (out / PENDING).write_text(json.dumps(notes))
    result = sync(out, tiny_params)
    assert result["run_id"] != other and result["status"] == "FINISHED"
    assert "top1" not in store.get_run(other).data.metrics
    assert not (out / PENDING).exists()  # the stale note is dropped, not kept forever


def _down(monkeypatch) -> str:
    """A tracking server that is down (a port nobody listens on), MLflow's retries off."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    return f"http://127.0.0.1:{port}"


def test_finished_work_is_published_when_the_tracking_server_is_down_at_the_end(
        out, tmp_path, monkeypatch):
    """A flow whose stages succeeded, and a grid whose children are final, do not fail because the
    store does not answer as they publish their results."""
    from flows.grid import record_grid
    from flows.pipeline import result_row
    from flows.bookkeeping.store import client

    folder = tmp_path / "workspace"
    (folder / "out").mkdir(parents=True)
    shutil.copytree(out, folder / "out" / "pipeline")
    result = json.loads((out / "metrics.json").read_text())
    uri = _down(monkeypatch)
    warned: list[str] = []
    log = SimpleNamespace(warning=lambda msg, *args: warned.append(msg % args), info=lambda *a: None)
    row = result_row(folder, "flow-1", result, ["evaluate"], log)
    assert row["top1"] == result["top1"] and row["mlflow_run_id"] == "" and row["stages_run"] == "evaluate"
    rows = [{"w_bits": 4, "flow_run": "f1", "state": "COMPLETED", "top1": 50.0, "mlflow_run_id": "r1",
             "stages_run": "none"}]
    table = record_grid(client(), "parent", [{"w_bits": 4}], rows, log)
    assert table == [{"combination": "w_bits=4", "state": "COMPLETED", "top1": 50.0, "stages_run": "none",
                      "mlflow_run": "r1"}]
    assert len(warned) == 3 and all(f"the MLflow store at {uri} did not answer" in w for w in warned)


def test_an_error_of_texq_s_own_recording_is_not_reported_as_the_store_s(
        store, out, tiny_params, monkeypatch, capsys):
    from flows.bookkeeping.pipeline_run import tracked_stage
    from texq.pipeline import read_config

    cfg = read_config(tiny_params, "cpu").run

    def broken(*args, **kwargs):
        raise KeyError("top1")  # a recording bug, e.g. a metrics.json field renamed

    monkeypatch.setattr("flows.bookkeeping.pipeline_run.record_stage", broken)
    with tracked_stage("evaluate", tiny_params, out, cfg):
        pass
    err = capsys.readouterr().err
    assert "an error of texq's, not the store's (KeyError: 'top1')" in err
    assert "did not record them" not in err and "please report" in err
