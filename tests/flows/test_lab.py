"""A lab on one machine: PostgreSQL, Prefect's and MLflow's servers on it (scripts/lab.sh), a DVC
directory remote, two GPU "hosts" that share no files (each its own checkout, HOME, caches, DVC
cache, assets and worker, and its own CUDA_VISIBLE_DEVICES) and a control host that runs the grid
flows. A 2x2 grid submitted from a fourth folder runs on both hosts; one host's worker is SIGKILLed
while its run trains (that run ends Crashed / FAILED, the others complete); the same grid
submitted again recomputes nothing that had finished. Everything is read back through the
servers (MLflow's REST API, Prefect's client) and the DVC remote, never from a host's files.

Needs PostgreSQL's server binaries (.ci/run installs Debian's postgresql) and the shared assets
(the hosts run the real ResNet-20 by name, so that their params, and DVC's run-cache keys, match).
About 6 minutes on 2 cores.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml
from servers import BIN, ROOT, cli, free_port, prefect_view, stop

pytestmark = pytest.mark.integration

GRID = {"w_bits,a_bits": [[3, 3], [4, 4]], "mkd": [True, False]}
NAMES = {f"w_bits={b},a_bits={b},mkd={m}" for b in (3, 4) for m in (True, False)}


def _postgres() -> bool:
    return bool(shutil.which("pg_config") or glob.glob("/usr/lib/postgresql/*/bin/initdb"))


def _checkout(dest: Path) -> Path:
    """A copy of the project's files (tracked and new, not ignored): a host's own checkout."""
    files = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="module")
def lab(assets):
    if not _postgres():
        if os.environ.get("TEXQ_REQUIRE_LAB") == "1":
            pytest.fail("PostgreSQL's server is required (TEXQ_REQUIRE_LAB=1) but not installed")
        pytest.skip("PostgreSQL's server is not installed (Debian: apt-get install postgresql)")
    base = Path(tempfile.mkdtemp(prefix="texq-lab-", dir="/tmp"))
    base.chmod(0o755)  # PostgreSQL runs as its own user when the tests run as root
    ports = {"TEXQ_LAB_PG_PORT": free_port(), "TEXQ_LAB_PREFECT_PORT": free_port(),
             "TEXQ_LAB_MLFLOW_PORT": free_port()}
    server_env = dict(os.environ, TEXQ_LAB_DIR=str(base / "servers"), TEXQ_VENV=str(BIN.parent),
                      **{k: str(v) for k, v in ports.items()})
    procs: list[subprocess.Popen] = []
    try:
        started = cli(server_env, ROOT / "scripts/lab.sh", "start", timeout=400)
        urls = dict(line.split("=", 1) for line in started.stdout.split() if "=" in line)
        common = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "TEXQ_"))}
        common.update(PREFECT_API_URL=urls["PREFECT_API_URL"], MLFLOW_TRACKING_URI=urls["MLFLOW_TRACKING_URI"],
                      PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_EXTRA_LOGGERS="texq",
                      MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1", DVC_NO_ANALYTICS="1",
                      OMP_NUM_THREADS="1", PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
        remote = base / "dvc-remote"  # the lab's shared storage: a DVC directory remote
        remote.mkdir()

        def host(name: str, gpu: str | None = None) -> dict:
            """A machine of the lab: its checkout, HOME, caches and assets, nothing shared."""
            h = base / name
            code = _checkout(h / "checkout")
            (h / "assets" / "cifar10").mkdir(parents=True)
            for f in ("resnet20-12fca82f.th", "test_first1000.npz"):
                shutil.copy2(assets / "cifar10" / f, h / "assets" / "cifar10" / f)
            env = dict(common, HOME=str(h / "home"), XDG_CACHE_HOME=str(h / "cache"),
                       TEXQ_HOME=str(h / "texq-home"), PREFECT_HOME=str(h / "prefect-home"),
                       TEXQ_ASSETS=str(h / "assets"), PYTHONPATH=str(code), TEXQ_DVC_REMOTE=str(remote))
            if gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = gpu
            return {"name": name, "dir": h, "code": code, "env": env}

        def start(h: dict, pool: str) -> subprocess.Popen:
            log = h["dir"] / f"worker-{len(procs)}.log"
            p = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--limit", "1",
                                  "--name", h["name"]], cwd=h["code"], env=h["env"], stdout=open(log, "w"),
                                 stderr=subprocess.STDOUT, start_new_session=True)
            procs.append(p)
            return p

        yield {"base": base, "remote": remote, "host": host, "start": start, "common": common}
    finally:
        stop(procs)
        if os.environ.get("TEXQ_LAB_KEEP") == "1":  # look at the UIs afterwards; scripts/lab.sh stop ends it
            print(f"\nlab kept: TEXQ_LAB_DIR={base / 'servers'} {ports}")
        else:
            cli(server_env, ROOT / "scripts/lab.sh", "stop", check=False, timeout=120)
            shutil.rmtree(base, ignore_errors=True)


def _submit(sub: dict, timeout: float = 900) -> tuple[str, dict]:
    """``prefect deployment run texq-grid/texq-grid`` from the submitter's folder, then wait for
    the grid run to be final; returns its id and Prefect's view."""
    out = cli(sub["env"], BIN / "prefect", "deployment", "run", "texq-grid/texq-grid", "--param",
              f"grid={json.dumps(GRID)}", "--param", "base_params=lab-params.yaml",
              cwd=sub["code"]).stdout
    fid = next(w for w in out.replace("'", " ").split() if w.count("-") == 4 and len(w) == 36)
    deadline = time.time() + timeout
    while time.time() < deadline:
        view = prefect_view(sub["env"])
        grid = next(r for r in view["runs"] if r["id"] == fid)
        if grid["type"] in ("COMPLETED", "FAILED", "CANCELLED", "CRASHED"):
            return fid, view
        time.sleep(3)
    raise TimeoutError(f"grid {fid} not final after {timeout} s")


def test_a_grid_on_two_hosts_through_the_servers_then_nothing_finished_recomputed(lab):
    from mlflow.tracking import MlflowClient

    t0 = time.time()
    # scripts/lab.sh start made Prefect's zombie-flow automation (missing heartbeats -> Crashed), once
    again = json.loads(cli(lab["common"], BIN / "python", "-m", "flows.zombies").stdout)
    assert again["created"] is False and again["within_s"] == 540
    a, b = lab["host"]("host-a", "0"), lab["host"]("host-b", "1")
    control, sub = lab["host"]("control"), lab["host"]("submitter")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params.update(profile="tiny")  # the named model and data: the same params on every host
    params["evaluate"]["register_model"] = True
    (control["code"] / "lab-params.yaml").write_text(yaml.safe_dump(params))
    for pool in ("texq", "texq-control"):
        cli(sub["env"], BIN / "prefect", "work-pool", "create", pool, "--type", "process", cwd=sub["code"])
    cli(sub["env"], BIN / "prefect", "--no-prompt", "deploy", "--all", cwd=sub["code"])
    lab["start"](control, "texq-control")
    worker_a = lab["start"](a, "texq")
    worker_b = lab["start"](b, "texq")

    c = MlflowClient(sub["env"]["MLFLOW_TRACKING_URI"])
    # the first grid, waited for in a thread; host A's worker SIGKILLed while A trains
    first: dict = {}

    def submit_first():
        try:
            first.update(zip(("id", "view"), _submit(sub)))
        except BaseException as exc:  # re-raised below, in the test's thread
            first["error"] = exc

    th = threading.Thread(target=submit_first)
    th.start()
    killed = None
    deadline = time.time() + 600
    while killed is None and time.time() < deadline and th.is_alive():
        exp = c.get_experiment_by_name("texq")
        on_a = exp and c.search_runs([exp.experiment_id], "attributes.status = 'RUNNING' and "
                                     "tags.`texq.cuda_visible_devices` = '0'")
        if on_a:
            fid = on_a[0].data.tags["prefect_flow_run_id"]
            if any(t["flow_run"] == fid and t["name"] == "train" and t["state"] == "Running"
                   for t in prefect_view(sub["env"])["tasks"]):
                killed = on_a[0]
                os.kill(worker_a.pid, signal.SIGKILL)  # the worker process alone, mid-stage
        time.sleep(1)
    th.join()
    if "error" in first:
        raise first["error"]
    assert killed is not None, "host A never trained"
    assert worker_a.wait(5) == -signal.SIGKILL
    t_first = time.time() - t0
    crashed = killed.data.tags["prefect_flow_run_id"]

    # where the killed worker's run ends up: Crashed in Prefect, FAILED in MLflow; the rest complete
    view = first["view"]
    grid = next(r for r in view["runs"] if r["id"] == first["id"])
    assert grid["type"] == "FAILED" and "1 of 4 grid runs did not complete: 1 crashed" in grid["message"], grid
    children = {r["id"]: r for r in view["runs"] if r["subflow"] and r["name"] in NAMES}
    assert {r["name"] for r in children.values()} == NAMES
    assert {k: r["type"] for k, r in children.items() if r["type"] != "COMPLETED"} == {crashed: "CRASHED"}
    done_before = {t["name"] for t in view["tasks"] if t["flow_run"] == crashed and t["state"] == "Completed"}
    assert done_before == {"teacher", "synthesize"}  # killed in train
    assert c.get_run(killed.info.run_id).info.status == "FAILED"  # not left RUNNING

    exp = c.get_experiment_by_name("texq")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on its runs
    runs = c.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if "texq.grid" in r.data.tags]
    assert parent.info.status == "FAILED" and "w_bits,a_bits x mkd: 4 runs" in parent.info.run_name
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert {r.info.run_name for r in kids} == NAMES  # named by what differs, whatever order PostgreSQL keeps
    assert sorted(r.info.status for r in kids) == ["FAILED", "FINISHED", "FINISHED", "FINISHED"]
    # the remote holds every finished stage's outs and run-cache entries, the crashed run's too
    entries = list((lab["remote"] / "runs").glob("*/*/*"))
    assert len(entries) >= 1 + 1 + 3 + 3, entries  # teacher, synthesize (shared), train and evaluate x 3

    # the same grid again, host A's worker back and host B's gone: what B computed comes to A from
    # the remote, the crashed run resumes after its finished stages; nothing else is computed
    stop([worker_b])
    lab["start"](a, "texq")
    t1 = time.time()
    second_id, view = _submit(sub)
    t_second = time.time() - t1
    grid2 = next(r for r in view["runs"] if r["id"] == second_id)
    assert grid2["type"] == "COMPLETED", grid2
    kids2 = {r["id"]: r["name"] for r in view["runs"]
             if r["subflow"] and r["name"] in NAMES and r["id"] not in children}
    assert len(kids2) == 4
    ran = {kids2[x["flow_run"]]: row["stages_run"] for x in view["artifacts"]
           if x["key"] == "texq-result" and x["flow_run"] in kids2 for row in x["data"]}
    resumed = set(ran.pop(killed.info.run_name).split(","))  # train too, unless its orphaned
    assert "evaluate" in resumed and not resumed & done_before  # process finished it after the kill
    assert ran == {name: "none" for name in NAMES - {killed.info.run_name}}
    table = next(x["data"] for x in view["artifacts"] if x["key"] == "texq-grid-results"
                 and x["flow_run"] == second_id)
    runs = c.search_runs([exp.experiment_id])
    results = [r for r in runs if "top1" in r.data.metrics]  # one result per combination, no more
    assert sorted(r.info.run_name for r in results) == sorted(NAMES)
    assert {row["mlflow_run"].rsplit("/", 1)[-1] for row in table} == {r.info.run_id for r in results}
    assert not [r for r in runs if r.info.status == "RUNNING"]  # nothing left RUNNING
    # where each result was computed: both hosts' GPUs and checkouts
    assert {r.data.tags["texq.cuda_visible_devices"] for r in results} == {"0", "1"}
    assert {r.data.tags["texq.checkout"] for r in results} == {str(a["code"]), str(b["code"])}
    for r in results:  # scores, pictures and logged model, through the server
        assert r.info.status == "FINISHED" and {"top1", "fp_top1", "top1_ci95_low"} <= set(r.data.metrics)
        assert {f.path.rsplit("/", 1)[-1] for f in c.list_artifacts(r.info.run_id, "figures")} >= {
            "per_class_top1.png", "calibration_images.png"}
        (model,) = [c.get_logged_model(o.model_id) for o in r.outputs.model_outputs]
        assert {m.key: m.value for m in model.metrics}["top1"] == r.data.metrics["top1"]
    by_run = {r.info.run_id: r for r in results}
    for bits in (3, 4):  # registered versions, with the run's figures as tags
        versions = c.search_model_versions(f"name='texq-resnet20a_cifar10-w{bits}a{bits}'")
        assert len(versions) == 2 and all(v.run_id in by_run for v in versions)
        for v in versions:
            assert float(v.tags["top1"]) == pytest.approx(by_run[v.run_id].data.metrics["top1"], abs=0.005)
            assert v.tags["profile"] == "tiny" and "top-1" in v.description
    print(f"\nlab: first grid {t_first:.0f} s (A's worker killed in train), second {t_second:.0f} s, "
          f"whole test {time.time() - t0:.0f} s")
