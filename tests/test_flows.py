"""Prefect + MLflow for real: servers on 127.0.0.1, a process work pool with 2 workers, a 2x2 grid.

Servers and workers are started and stopped (by PID) here. About two minutes on 2 cores.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("prefect", "mlflow")),
    reason="the pipeline extra (prefect, mlflow) is not installed")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, log: Path, seconds: float = 180) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} not up after {seconds} s: {log.read_text()[-2000:]}")


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:  # SIGINT first: Prefect workers ignore SIGTERM for a long time
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGINT)
    deadline = time.time() + 20
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    pp, mp = _port(), _port()
    env = dict(os.environ, PREFECT_HOME=str(root / "prefect"), PREFECT_API_URL=f"http://127.0.0.1:{pp}/api",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_EXTRA_LOGGERS="texq",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
               MLFLOW_TRACKING_URI=f"http://127.0.0.1:{mp}", MLFLOW_DISABLE_TELEMETRY="true",
               OMP_NUM_THREADS="1", DO_NOT_TRACK="1", PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
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
        _wait(f"http://127.0.0.1:{pp}/api/health", prefect, root / "prefect.log")
        _wait(f"http://127.0.0.1:{mp}/health", mlflow, root / "mlflow.log")
        yield env, root, start
    finally:
        _stop(procs)


def _cli(env, *args, timeout=300) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_grid_axes_and_overrides_are_checked_before_any_run(tiny_params):
    from flows.pipeline import expand, merged_params
    from texq.errors import TexqError

    combos = expand({"w_bits,a_bits": [[3, 3], [4, 4]], "seed": [0, 1]})
    assert combos == [{"w_bits": 3, "a_bits": 3, "seed": 0}, {"w_bits": 3, "a_bits": 3, "seed": 1},
                      {"w_bits": 4, "a_bits": 4, "seed": 0}, {"w_bits": 4, "a_bits": 4, "seed": 1}]
    with pytest.raises(TexqError, match="each value must list 2 items"):
        expand({"w_bits,a_bits": [[3, 3], 4]})
    with pytest.raises(TexqError, match="non-empty lists"):
        expand({"seed": []})
    params = merged_params(tiny_params, {"finetune.alpha6": 7.0, "w_bits": 3})  # --set's keys
    assert params["finetune"]["alpha6"] == 7.0 and params["w_bits"] == 3
    with pytest.raises(TexqError, match="'finetune.alpha7'"):
        merged_params(tiny_params, {"finetune.alpha7": 1})
    with pytest.raises(TexqError, match="alpha6='x': expected a number"):
        merged_params(tiny_params, {"finetune.alpha6": "x"})


def test_grid_on_two_workers_gives_four_finished_child_runs(stack, tiny_params, tmp_path):
    env, root, start = stack
    _cli(env, str(BIN / "prefect"), "work-pool", "create", "texq", "--type", "process")
    _cli(env, str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "texq-pipeline")
    workers = [start(f"worker{i}", str(BIN / "prefect"), "worker", "start", "--pool", "texq",
                     "--limit", "1") for i in range(2)]
    grid = {"w_bits,a_bits": [[3, 3], [4, 4]], "mkd": [True, False]}  # W3A3 and W4A4
    code = ("import json, sys; from flows.pipeline import grid_search; "
            "rows = grid_search(grid=json.loads(sys.argv[1]), base_params=sys.argv[2], out=sys.argv[3], "
            "poll_seconds=2); print(json.dumps(rows))")
    proc = _cli(env, sys.executable, "-c", code, json.dumps(grid), str(tiny_params), str(tmp_path / "grid"),
                timeout=900)
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(rows) == 4 and {r["state"] for r in rows} == {"COMPLETED"}
    assert all(w.poll() is None for w in workers)  # both still serving

    from mlflow.tracking import MlflowClient

    c = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = c.get_experiment_by_name("texq")
    assert exp.artifact_location.startswith("mlflow-artifacts:")  # the server's, not a path here
    runs = c.search_runs([exp.experiment_id])
    parents = [r for r in runs if "texq.grid" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 4 and {r.info.status for r in children} == {"FINISHED"}
    assert {(r.data.params["w_bits"], r.data.params["a_bits"], r.data.params["mkd"]) for r in children} == {
        ("3", "3", "True"), ("3", "3", "False"), ("4", "4", "True"), ("4", "4", "False")}
    assert all(r.data.tags["prefect_flow_run_id"] for r in children)
    assert all((tmp_path / "grid" / f"w_bits={b},a_bits={b},mkd={m}" / "out/pipeline/metrics.json").exists()
               for b in (3, 4) for m in (True, False))
    assert all((tmp_path / "grid" / f"w_bits={b},a_bits={b},mkd={m}" / "dvc.lock").exists()
               for b in (3, 4) for m in (True, False))  # each child a DVC workspace
    cmp = _cli(env, str(BIN / "texq"), "compare")
    assert json.loads(cmp.stdout.strip().splitlines()[-1])["rows"] == 4
    # what a user sees: the parent holds the axes and the results table, Prefect shows the
    # children under the grid run, named by their combination, and the same table as an artifact
    parent = parents[0]
    assert json.loads(parent.data.params["grid.w_bits/a_bits"]) == [[3, 3], [4, 4]]
    assert "grid_results.json" in {a.path for a in c.list_artifacts(parent.info.run_id)}
    seen = json.loads(_cli(env, sys.executable, "-c", PREFECT_VIEW).stdout.strip().splitlines()[-1])
    names = {f"w_bits={b},a_bits={b},mkd={m}" for b in (3, 4) for m in (True, False)}
    assert names <= set(seen["children"]), seen["children"]
    table = {row["combination"]: row for row in seen["table"]}
    assert set(table) == names and all(r["state"] == "COMPLETED" for r in table.values())
    assert {r["mlflow_run"].rsplit("/", 1)[-1] for r in table.values()} == {r.info.run_id for r in children}
    assert all(r["mlflow_run"].startswith(env["MLFLOW_TRACKING_URI"]) for r in table.values())  # links
    assert all(isinstance(r["top1"], float) for r in table.values())


PREFECT_VIEW = """
import json
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
with get_client(sync_client=True) as c:
    grid = [r for r in c.read_flow_runs() if r.name and r.parent_task_run_id is None
            and r.parameters.get("grid")]
    kids = [r.name for r in c.read_flow_runs() if r.parent_task_run_id is not None]
    art = c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["texq-grid-results"])))
print(json.dumps({"children": kids, "table": json.loads(art[0].data) if art else []}))
"""


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


def _logs(env, flow_run_id: str) -> list[str]:
    req = urllib.request.Request(f"{env['PREFECT_API_URL']}/logs/filter", method="POST",
                                 headers={"Content-Type": "application/json"},
                                 data=json.dumps({"logs": {"flow_run_id": {"any_": [flow_run_id]}},
                                                  "limit": 200}).encode())
    with urllib.request.urlopen(req, timeout=30) as r:
        return [row["message"] for row in json.loads(r.read())]


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
        logs = _logs(env, first["flow_run"])
        texq_lines = [m for m in logs if m.startswith(("stage ", "step 1: calibration images", "epoch "))]
        if any(m.startswith("epoch ") for m in texq_lines) or time.time() > deadline:
            break
        time.sleep(2)
    assert any(m.startswith("step 1: calibration images: ") and "(100%)" in m for m in texq_lines), logs
    assert any(m.startswith("epoch 1/") for m in texq_lines), logs
