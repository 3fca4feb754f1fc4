"""Results before bookkeeping (flows.bookkeeping.record_stage, flows.bookkeeping.pipeline_run, flows.bookkeeping.sync): a store that is locked or
down never fails or repeats a stage's work, and what it did not take is recorded later, once."""

from __future__ import annotations

import importlib.util
import json
import sqlite3
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(importlib.util.find_spec("mlflow") is None,
                                 reason="the pipeline extra is not installed")]


def _runs(c):
    from flows.bookkeeping.store import experiment_id

    return c.search_runs([experiment_id(c)], order_by=["attributes.start_time ASC"])


def test_a_store_locked_when_the_work_is_done_fails_nothing_and_sync_records_it_once(
        store, out, tiny_params, tmp_path, capsys, monkeypatch):
    from flows.bookkeeping.record_stage import PENDING
    from flows.bookkeeping.sync import sync
    from flows.bookkeeping.pipeline_run import tracked_stage
    from texq.pipeline import read_config

    cfg = read_config(tiny_params, "cpu").run
    for stage in ("teacher", "synthesize", "train"):
        with tracked_stage(stage, tiny_params, out, cfg) as run_id:
            assert run_id
    lock = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None)
    with tracked_stage("evaluate", tiny_params, out, cfg) as run_id:
        lock.execute("BEGIN EXCLUSIVE")  # another process's long write, from the middle of the stage on
    err = capsys.readouterr().err
    assert "stage evaluate finished and its outputs are kept" in err and "database is locked" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    note = json.loads((out / PENDING).read_text())
    assert [(n["stage"], n["run_id"]) for n in note] == [("evaluate", run_id)]
    lock.execute("ROLLBACK")
    lock.close()
    (run,) = _runs(store)
    assert run.info.status == "RUNNING" and "top1" not in run.data.metrics  # not recorded yet

    first = sync(out, tiny_params)
    assert first["recorded"] == ["evaluate"] and first["status"] == "FINISHED"
    assert not (out / PENDING).exists()
    (run,) = _runs(store)
    metrics = json.loads((out / "metrics.json").read_text())
    assert run.info.status == "FINISHED" and run.data.metrics["top1"] == metrics["top1"]
    assert run.data.tags["texq.model_uri"]  # the model logged, once
    again = sync(out, tiny_params)  # idempotent: nothing logged twice
    assert again["recorded"] == [] and again["status"] == "FINISHED"
    assert len(store.get_metric_history(run.info.run_id, "top1")) == 1
    assert len(store.get_metric_history(run.info.run_id, "fp_top1")) == 1  # teacher's, not again at evaluate
    history = [json.loads(line) for line in (out / "train" / "history.jsonl").read_text().splitlines()]
    g_loss = store.get_metric_history(run.info.run_id, "generator/ce_loss")
    assert len(g_loss) == len(history)  # each epoch once
    # sync finds the run that recorded these very files, whatever key it computes (another
    # checkout's commit, the note gone): no second run
    monkeypatch.setattr("flows.bookkeeping.sync.pipeline_key", lambda *a, **k: "another-commit")
    assert sync(out, tiny_params)["run_id"] == run.info.run_id and len(_runs(store)) == 1


def test_a_store_down_from_the_start_leaves_the_work_running_and_sync_creates_the_run(
        store, out, tiny_params, tmp_path, monkeypatch, capsys):
    import socket

    from flows.bookkeeping.record_stage import PENDING
    from flows.bookkeeping.sync import sync
    from flows.bookkeeping.pipeline_run import tracked_stage
    from texq.pipeline import read_config

    cfg = read_config(tiny_params, "cpu").run
    with socket.socket() as s:  # a port nobody listens on: a tracking server that is down
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with monkeypatch.context() as m:
        m.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
        m.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        ran = []
        with tracked_stage("evaluate", tiny_params, out, cfg) as run_id:
            ran.append(run_id)  # the stage's work runs, unrecorded
        assert ran == [None]
    err = capsys.readouterr().err
    assert f"the MLflow store at http://127.0.0.1:{port} did not answer" in err
    assert "stage evaluate finished and its outputs are kept" in err
    assert [n["stage"] for n in json.loads((out / PENDING).read_text())] == ["evaluate"]
    assert _runs(store) == []
    result = sync(out, tiny_params)  # the store is back (here: the local one)
    (run,) = _runs(store)
    assert result["run_id"] == run.info.run_id and run.info.status == "FINISHED"
    assert result["recorded"] == ["teacher", "train", "evaluate"]  # every stage's files
    assert run.data.params["w_bits"] == str(cfg.w_bits)


def test_the_next_stage_records_what_the_last_one_could_not(store, out, tiny_params, capsys):
    from flows.bookkeeping.record_stage import PENDING, note_unrecorded
    from flows.bookkeeping.pipeline_run import pipeline_key, tracked_stage
    from texq.pipeline import read_config

    cfg = read_config(tiny_params, "cpu").run
    note_unrecorded(out, "teacher", pipeline_key(tiny_params), None, OSError("disk full"))
    with tracked_stage("synthesize", tiny_params, out, cfg) as run_id:
        pass
    assert "recorded stage(s) teacher left unrecorded earlier" in capsys.readouterr().err
    assert not (out / PENDING).exists()
    run = store.get_run(run_id)
    assert run.data.metrics["fp_top1"] == json.loads((out / "teacher.json").read_text())["top1"]
    assert run.data.tags["texq.stage"] == "synthesize done" and run.info.status == "RUNNING"


def test_an_interrupted_session_continues_its_run_instead_of_opening_another(store, out, tiny_params):
    from flows.bookkeeping.run_end import Terminated
    from flows.bookkeeping.pipeline_run import RESUMED_TAG, tracked_stage
    from texq.pipeline import read_config

    cfg = read_config(tiny_params, "cpu").run
    with pytest.raises(Terminated):
        with tracked_stage("train", tiny_params, out, cfg) as first:
            raise Terminated("stopped by signal SIGTERM")
    assert store.get_run(first).info.status == "KILLED"
    with tracked_stage("train", tiny_params, out, cfg) as second:  # the resumed session
        assert store.get_run(second).info.status == "RUNNING"
    assert second == first and store.get_run(first).data.tags[RESUMED_TAG] == "1"
    with tracked_stage("evaluate", tiny_params, out, cfg):
        pass
    assert [r.info.status for r in _runs(store)] == ["FINISHED"]
    # a finished run is never reopened: the same pipeline run forced again is another record
    with tracked_stage("evaluate", tiny_params, out, cfg) as third:
        assert third != first
    # another flow run with the same params opens its own
    with tracked_stage("evaluate", tiny_params, out, cfg, flow_run_id="f9") as fourth:
        assert fourth not in (first, third)


def test_reconcile_ends_the_runs_of_dead_stage_processes_recording_their_finished_work(
        store, out, tiny_params, tmp_path):
    from flows.bookkeeping.record_stage import note_unrecorded
    from flows.bookkeeping.store import experiment_id
    from flows.bookkeeping.sync import reconcile
    from flows.bookkeeping.provenance import where_tags
    from flows.bookkeeping.pipeline_run import KEY_TAG, OUT_TAG, PID_TAG, STAGE_TAG

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "flows.stage"])
    try:
        exp = experiment_id(store)
        here = {k: v for k, v in where_tags().items() if k in ("texq.host", "texq.host_id")}

        def run(stage: str, pid: int, key: str, **extra) -> str:
            tags = {STAGE_TAG: stage, PID_TAG: str(pid), KEY_TAG: key, **here, OUT_TAG: str(out), **extra}
            return store.create_run(exp, tags=tags).info.run_id

        evaluated = run("evaluate running", dead.pid, "k1")  # killed after its work, unrecorded
        note_unrecorded(out, "evaluate", "k1", evaluated, OSError("x"))
        killed = run("train running", dead.pid, "k2")
        working = run("train running", alive.pid, "k3")
        between = run("train done", dead.pid, "k4")  # between stages: nothing tells it stopped
        elsewhere = run("train running", dead.pid, "k5", **{"texq.host_id": "another-machine"})
        result = reconcile()
    finally:
        alive.kill()
        alive.wait()
    status = {r: store.get_run(r).info.status for r in (evaluated, killed, working, between, elsewhere)}
    assert status == {evaluated: "FINISHED", killed: "KILLED", working: "RUNNING", between: "RUNNING",
                      elsewhere: "RUNNING"}
    assert store.get_run(evaluated).data.metrics["top1"] == json.loads((out / "metrics.json").read_text())["top1"]
    assert [e["run_id"] for e in result["ended"]] == [killed]
    assert "is gone" in result["ended"][0]["why"]
    assert store.get_run(killed).data.tags[STAGE_TAG] == "train lost"
    # the working stage's process has ended since (killed above): its run is ended next time
    assert [e["run_id"] for e in reconcile()["ended"]] == [working]
    assert reconcile()["ended"] == []  # nothing left to end


def test_track_commands_say_one_line_for_a_store_that_is_down(out, tiny_params, tmp_path, monkeypatch, capsys):
    import socket

    from texq.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    assert main(["track", "sync", str(out), "--params", str(tiny_params)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"texq: error: the MLflow store at http://127.0.0.1:{port} did not answer")
    assert main(["track", "sync", str(tmp_path / "nowhere"), "--params", str(tiny_params)]) == 2
    assert "no such folder" in capsys.readouterr().err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    monkeypatch.setenv("TEXQ_TRACKING_WAIT", "soon")
    assert main(["track", "reconcile"]) == 2
    assert "TEXQ_TRACKING_WAIT='soon': expected seconds" in capsys.readouterr().err
