"""Prefect + MLflow for real: servers on 127.0.0.1, a process work pool with 2 workers, a grid of 2 runs (one per worker).

Servers and workers are started and stopped (by PID) here. About 13 minutes on 2 cores (docs/testing.md).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import yaml
from servers import (
    BIN,
    ROOT,
    cli,
    free_port,
    prefect_logs,
    prefect_view,
    stop,
    wait_http,
)

pytestmark = [pytest.mark.integration, pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("prefect", "mlflow")),
    reason="the pipeline extra (prefect, mlflow) is not installed")]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    pp, mp = free_port(), free_port()
    env = dict(os.environ, PREFECT_HOME=str(root / "prefect"), PREFECT_API_URL=f"http://127.0.0.1:{pp}/api",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_EXTRA_LOGGERS="texq",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
               MLFLOW_TRACKING_URI=f"http://127.0.0.1:{mp}", MLFLOW_DISABLE_TELEMETRY="true",
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
               PREFECT_WORKER_QUERY_SECONDS="2",  # a scheduled run is picked up in 2 s, not 10
               OMP_NUM_THREADS="1", DO_NOT_TRACK="1", PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
               TEXQ_WORKSPACES=str(tmp_path_factory.getbasetemp()))  # the tests' folders are flow runs' folders
    procs: list[subprocess.Popen] = []

    def start(name: str, *cmd: str) -> subprocess.Popen:
        log = root / f"{name}.log"
        p = subprocess.Popen(list(cmd), cwd=ROOT, env=env, stdout=open(log, "w"),
                             stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(p)
        return p

    try:
        prefect = start("prefect", str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                        "--port", str(pp))
        mlflow = start("mlflow", str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mp),
                       "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                       "--artifacts-destination", str(root / "artifacts"))
        wait_http(f"http://127.0.0.1:{pp}/api/health", prefect, root / "prefect.log")
        wait_http(f"http://127.0.0.1:{mp}/health", mlflow, root / "mlflow.log")

        def restart_prefect() -> float:
            """Stop Prefect's server and start it again on its port and database; the seconds it was away."""
            t0 = time.time()
            stop([p for p in procs if p.args[:3] == [str(BIN / "prefect"), "server", "start"]])
            again = start("prefect-restarted", str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                          "--port", str(pp))
            wait_http(f"http://127.0.0.1:{pp}/api/health", again, root / "prefect-restarted.log")
            return time.time() - t0

        start.restart_prefect = restart_prefect
        yield env, root, start
    finally:
        stop(procs)


def _cli(env, *args, timeout=300) -> subprocess.CompletedProcess:
    return cli(env, *args, timeout=timeout)


def test_the_zombie_flow_automation_is_created_once_with_prefect_s_trigger(stack):
    """flows.zombies (scripts/lab.sh start): a flow run silent for 540 s after a heartbeat is
    marked Crashed; a second call finds it; a window under two heartbeats is refused."""
    env, _, _ = stack
    first = json.loads(_cli(env, BIN / "python", "-m", "flows.zombies").stdout)
    again = json.loads(_cli(env, BIN / "python", "-m", "flows.zombies").stdout)
    assert first["created"] is True and again == {**first, "created": False}
    shown = _cli(env, BIN / "python", "-c", (
        "import json; from prefect.automations import Automation; "
        f"a = Automation.read(name={json.dumps(first['automation'])}); t = a.trigger; "
        "print(json.dumps([sorted(t.after), t.posture.value, t.within.total_seconds(), "
        "a.actions[0].type, a.actions[0].state.value]))")).stdout
    assert json.loads(shown) == [["prefect.flow-run.heartbeat"], "Proactive", 540.0, "change-flow-run-state",
                                 "CRASHED"]
    refused = cli(env, BIN / "python", "-m", "flows.zombies", "--within", "40", check=False)
    assert refused.returncode == 2 and "expected at least 60 s" in refused.stderr


@pytest.fixture(scope="module")
def pool(stack):
    """The texq and texq-control work pools, both deployments and 2 workers on the texq pool."""
    env, root, start = stack
    for name in ("texq", "texq-control"):
        _cli(env, BIN / "prefect", "work-pool", "create", name, "--type", "process")
    _cli(env, BIN / "prefect", "--no-prompt", "deploy", "--all")
    return [start(f"worker{i}", str(BIN / "prefect"), "worker", "start", "--pool", "texq", "--limit", "1")
            for i in range(2)]


GRID_CODE = ("import json, sys; from flows.pipeline import grid_search; "
             "rows = grid_search(grid=json.loads(sys.argv[1]), base_params=sys.argv[2], out=sys.argv[3]); "
             "print(json.dumps(rows))")


def test_a_misspelled_grid_key_is_refused_when_submitted_and_the_form_is_described(stack, pool):
    env, _, _ = stack
    bad = cli(env, BIN / "prefect", "deployment", "run", "texq-grid/texq-grid", "--param",
              'grid={"finetune.alpah6": [1, 2]}', check=False)
    assert bad.returncode != 0 and "finetune.alpah6" in bad.stdout + bad.stderr
    view = prefect_view(env)
    assert not [r for r in view["runs"] if r["parameters"].get("grid")]  # no run was created
    schema = json.loads(cli(env, sys.executable, "-c", DEPLOYMENT_SCHEMAS).stdout.strip().splitlines()[-1])
    for name, props in schema.items():  # every parameter of the run form carries its description
        assert all(p.get("description") for p in props.values()), (name, props)
    grid = schema["texq-grid"]["grid"]
    assert grid["examples"][0]["w_bits,a_bits"] == [[3, 3], [4, 4]] and "anyOf" in grid["propertyNames"]
    assert len(bad.stdout + bad.stderr) < 2000  # the key named in a short line, not every key's pattern


DEPLOYMENT_SCHEMAS = """
import json
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as c:
    out = {n: c.read_deployment_by_name(f"{n}/{n}").parameter_openapi_schema["properties"]
           for n in ("texq-grid", "texq-pipeline")}
print(json.dumps(out))
"""


def test_grid_on_two_workers_gives_two_finished_child_runs(stack, pool, tiny_params, tmp_path):
    env, root, start = stack
    grid = {"w_bits,a_bits": [[3, 3]], "mkd": [True, False]}  # two axes (one zipped), two runs: one per worker
    proc = _cli(env, sys.executable, "-c", GRID_CODE, json.dumps(grid), str(tiny_params), str(tmp_path / "grid"),
                timeout=900)
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(rows) == 2 and {r["state"] for r in rows} == {"COMPLETED"}
    assert all(w.poll() is None for w in pool)  # both still serving

    from mlflow.tracking import MlflowClient

    c = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = c.get_experiment_by_name("texq")
    assert exp.artifact_location.startswith("mlflow-artifacts:")  # the server's, not a path here
    # the experiment opens on its runs (not MLflow's GenAI overview); texq's view of the runs table
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(exp.tags["mlflow.sharedViewState.texq"])
    assert {"metrics.`top1`", "params.`w_bits`", "params.`a_bits`", "params.`mkd`", "tags.`texq.end`"} <= set(view["selectedColumns"])
    runs = c.search_runs([exp.experiment_id])
    parents = [r for r in runs if "texq.grid" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 2 and {r.info.status for r in children} == {"FINISHED"}
    names = {f"W3A3,mkd={m}" for m in ("true", "false")}
    assert {r.info.run_name for r in children} == names  # named by what differs, as in Prefect
    assert {(r.data.params["w_bits"], r.data.params["a_bits"], r.data.params["mkd"]) for r in children} == {
        ("3", "3", "True"), ("3", "3", "False")}
    for r in children:
        assert r.data.tags["prefect_flow_run_id"] and r.data.tags["texq.gpu"] == "cpu"
        assert "quant.w_bits" not in r.data.params and "dvc_exp_name" not in r.data.tags
        # the logged model's page lists the run's own scores, not the first epoch's losses
        (model,) = [c.get_logged_model(o.model_id) for o in r.outputs.model_outputs]
        scores = {m.key: m.value for m in model.metrics}
        assert len(scores) == len(model.metrics)  # each listed once (fp_top1 was twice)
        assert scores["top1"] == r.data.metrics["top1"] and not any("/" in k for k in scores)
    assert c.search_registered_models() == []  # tiny runs register nothing (register_model: auto)
    assert all((tmp_path / "grid" / name / "out/pipeline/metrics.json").exists() for name in names)
    assert all((tmp_path / "grid" / name / "dvc.lock").exists() for name in names)  # each child a DVC workspace
    cmp = _cli(env, str(BIN / "texq"), "compare")
    assert json.loads(cmp.stdout.strip().splitlines()[-1])["rows"] == 2
    # what a user sees: the parent holds the axes and the results table, Prefect shows the
    # children under the grid run, named by their combination, and the same table as an artifact
    parent = parents[0]
    assert json.loads(parent.data.params["grid.w_bits/a_bits"]) == [[3, 3]]
    assert "grid_results.json" in {a.path for a in c.list_artifacts(parent.info.run_id)}
    seen = prefect_view(env)
    (grid_run,) = [r for r in seen["runs"] if r["parameters"].get("grid") == grid]
    assert parent.info.run_name == f"grid {grid_run['name']}: w_bits,a_bits x mkd, 2 runs"  # two grids differ
    assert names <= {r["name"] for r in seen["runs"] if r["subflow"]}
    (art,) = [a for a in seen["artifacts"] if a["key"] == "texq-grid-results"]
    table = {row["combination"]: row for row in art["data"]}
    assert set(table) == names and all(r["state"] == "COMPLETED" for r in table.values())
    assert {r["mlflow_run"].split("?")[0].rsplit("/", 1)[-1] for r in table.values()} == {
        r.info.run_id for r in children}
    assert all(r["mlflow_run"].startswith(env["MLFLOW_TRACKING_URI"]) for r in table.values())  # links
    assert all(r["mlflow_run"].endswith("?workflowType=machine_learning") for r in table.values())
    # the parent carries the grid's summary as metrics, says how it ended, and links its own view
    scores = [r.data.metrics["top1"] for r in children]
    assert parent.data.metrics["runs_completed"] == 2 and parent.data.metrics["top1_best"] == max(scores)
    assert parent.data.metrics["top1_mean"] == pytest.approx(sum(scores) / 2)
    assert parent.data.tags["texq.end"] == "finished: 2 of 2 runs completed"
    assert {r.data.tags["texq.end"] for r in children} == {"finished"}
    key = f"grid-{parent.info.run_id}"
    assert f"viewStateShareKey={key}" in parent.data.tags["mlflow.note.content"]
    assert json.loads(exp.tags[f"mlflow.sharedViewState.{key}"])["searchFilter"] == (
        f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert all(isinstance(r["top1"], float) for r in table.values())
    assert {r["stages_run"] for r in table.values()} == {"teacher,synthesize,train,evaluate"}


def _training_child(env: dict, name: str, grid: subprocess.Popen, timeout: float = 300) -> str:
    """The id of the grid's child flow run ``name`` once its train task runs."""
    deadline = time.time() + timeout
    while time.time() < deadline and grid.poll() is None:
        view = prefect_view(env)
        for r in view["runs"]:
            if r["name"] == name and any(t["flow_run"] == r["id"] and t["name"] == "train"
                                         and t["state"] == "Running" for t in view["tasks"]):
                return r["id"]
        time.sleep(1)
    raise AssertionError(f"the child {name} never reached its train stage")


def test_a_cancelled_child_ends_killed_in_mlflow_and_the_grid_says_cancelled(stack, pool, tiny_params, tmp_path):
    env, _, _ = stack
    grid = {"finetune.epochs": [400]}  # a train stage long enough to be cancelled in
    proc = subprocess.Popen([sys.executable, "-c", GRID_CODE, json.dumps(grid), str(tiny_params),
                             str(tmp_path / "grid")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    child = _training_child(env, "epochs=400", proc)
    work = tmp_path / "grid" / "epochs=400" / "out" / "pipeline" / ".work"
    deadline = time.monotonic() + 300
    while not any(work.glob("train-*/history.jsonl")):  # an epoch done: inside the stage's epochs
        assert proc.poll() is None and time.monotonic() < deadline, "the train stage never ended an epoch"
        time.sleep(0.2)
    cli(env, BIN / "prefect", "flow-run", "cancel", child)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "1 of 1 grid runs did not complete: 1 cancelled" in out + err
    view = prefect_view(env)
    assert next(r for r in view["runs"] if r["id"] == child)["type"] == "CANCELLED"

    from mlflow.tracking import MlflowClient

    c = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = c.get_experiment_by_name("texq")
    (run,) = c.search_runs([exp.experiment_id], f"tags.`prefect_flow_run_id` = '{child}'")
    assert run.info.status == "KILLED" and run.info.end_time  # ended, as Prefect says: cancelled
    assert c.get_run(run.info.run_id).data.tags["texq.end"].startswith("stopped: ")  # not "failed"
    parent = c.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "KILLED" and parent.data.tags["texq.end"] == "stopped: 0 of 1 runs completed"
    assert parent.data.metrics["runs_cancelled"] == 1 and "top1_best" not in parent.data.metrics
    assert not c.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")  # none left RUNNING


def test_a_prefect_server_restart_mid_train_is_waited_out_and_nothing_is_trained_twice(
        stack, pool, tiny_params, tmp_path):
    """The Prefect server goes away while a child trains and comes back on the same database: the
    flow runs wait it out (Prefect's client retries), the child and the grid complete, its MLflow
    run is FINISHED and each epoch was trained once."""
    env, _, start = stack
    grid = {"finetune.epochs": [30]}
    proc = subprocess.Popen([sys.executable, "-c", GRID_CODE, json.dumps(grid), str(tiny_params),
                             str(tmp_path / "grid")], cwd=ROOT, env=dict(env, PREFECT_CLIENT_MAX_RETRIES="7"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    child = _training_child(env, "epochs=30", proc)
    away = start.restart_prefect()
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, (out + err)[-3000:]
    view = prefect_view(env)
    assert next(r for r in view["runs"] if r["id"] == child)["type"] == "COMPLETED"
    from mlflow.tracking import MlflowClient

    c = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = c.get_experiment_by_name("texq")
    (run,) = c.search_runs([exp.experiment_id], f"tags.`prefect_flow_run_id` = '{child}'")
    assert run.info.status == "FINISHED"
    history = (tmp_path / "grid" / "epochs=30" / "out" / "pipeline" / "train" / "history.jsonl")
    epochs = [json.loads(line)["epoch"] for line in history.read_text().splitlines()]
    assert epochs == sorted(set(epochs)) and len(epochs) == len(c.get_metric_history(run.info.run_id, "generator/ce_loss"))
    print(f"\nPrefect server away {away:.0f} s mid-train: waited out")


CACHE_SCRIPT = """
import json, sys
from pathlib import Path
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from flows.pipeline import texq_pipeline

base, out = sys.argv[1], sys.argv[2]

def run(overrides):
    state = texq_pipeline(overrides=overrides, base_params=base, out=out, device="cpu", return_state=True)
    fid = state.state_details.flow_run_id
    with get_client(sync_client=True) as c:
        tasks = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fid])))
    return {"flow_run": str(fid), "top1": state.result()["top1"],
            "tasks": {t.name: t.state.name for t in tasks}}

rows = [run({}), run({})]
rows.append(run({"finetune.alpha6": 7.0}))
Path(out, "out/pipeline/metrics.json").unlink()
rows.append(run({"finetune.alpha6": 7.0}))
print(json.dumps(rows))
"""


def test_dvc_decides_what_the_pipeline_tasks_rerun_and_library_logs_reach_the_server(stack, tiny_params,
                                                                                     tmp_path):
    env, _, _ = stack
    proc = _cli(env, sys.executable, "-c", CACHE_SCRIPT, str(tiny_params), str(tmp_path / "p"), timeout=600)
    first, again, alpha6, lost = json.loads(proc.stdout.strip().splitlines()[-1])
    stages = ("teacher", "synthesize", "train", "evaluate")
    assert first["tasks"] == {s: "Completed" for s in stages}
    assert again["tasks"] == {s: "Up to date" for s in stages} and again["top1"] == first["top1"]
    # a train key: train and evaluate run, DVC finds the rest up to date
    assert alpha6["tasks"] == {"teacher": "Up to date", "synthesize": "Up to date", "train": "Completed",
                               "evaluate": "Completed"}
    # an out deleted behind DVC's back: DVC restores it from its run cache instead of rerunning
    assert lost["tasks"] == {s: "Up to date" for s in stages}
    assert (tmp_path / "p" / "out/pipeline/metrics.json").exists() and lost["top1"] == alpha6["top1"]
    lock = yaml.safe_load((tmp_path / "p" / "dvc.lock").read_text())["stages"]
    assert lock["train"]["params"]["params.yaml"]["finetune"]["alpha6"] == 7.0  # DVC's own record
    deadline = time.time() + 30  # logs are shipped in batches
    while True:
        logs = prefect_logs(env, first["flow_run"])
        texq_lines = [m for m in logs if m.startswith(("stage ", "step 1: calibration images", "epoch "))]
        if any(m.startswith("epoch ") for m in texq_lines) or time.time() > deadline:
            break
        time.sleep(2)
    assert any(m.startswith("step 1: calibration images: ") and "(100%)" in m for m in texq_lines), logs
    assert any(m.startswith("epoch 1/") for m in texq_lines), logs


REFUSED_SCRIPT = """
import json, sys
from flows.pipeline import texq_pipeline
state = texq_pipeline(base_params=sys.argv[1], out=sys.argv[2], device="cpu", return_state=True)
print(json.dumps({"type": state.type.value, "message": state.message}))
"""


def test_a_flow_run_whose_folder_is_outside_the_workspace_root_writes_nothing(stack, tiny_params):
    """texq_pipeline(out=".") once rewrote the worker checkout's params.yaml and dvc.yaml."""
    env, _, _ = stack
    before = {n: (ROOT / n).read_bytes() for n in ("params.yaml", "dvc.yaml")}
    stamps = {n: (ROOT / n).stat().st_mtime_ns for n in before}
    proc = _cli(env, sys.executable, "-c", REFUSED_SCRIPT, str(tiny_params), ".")
    state = json.loads(proc.stdout.strip().splitlines()[-1])
    assert state["type"] == "FAILED" and f"out='.': resolves to {ROOT}, not inside" in state["message"]
    assert {n: (ROOT / n).read_bytes() for n in before} == before
    assert {n: (ROOT / n).stat().st_mtime_ns for n in before} == stamps
