"""Prefect flows: ``texq_pipeline`` (the four stages as tasks) and ``grid_search`` (a grid of
pipeline runs fanned out as deployment runs to a work pool, one MLflow parent run over them).

The flows hold no maths: each task runs a ``texq.pipeline`` stage inside its MLflow run.
Deployments are declared in ``prefect.yaml``; workers (one per GPU, ``CUDA_VISIBLE_DEVICES``) pick
the runs up from the work pool, on one host or many.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows import workspace
from flows.tracking import client, experiment_id
from texq.errors import TexqError
from texq.keys import assign
from texq.pipeline import STAGES


def merged_params(base: str | Path, overrides: dict[str, Any]) -> dict:
    """``base`` params.yaml with dotted-key ``overrides`` applied; every key and value is checked
    (an unknown key or a bad value is a TexqError naming it, before any work starts)."""
    from texq.pipeline import load_params, run_config

    params = load_params(base)
    for key, value in overrides.items():
        assign(params, key, value, f"key of {base}")  # a key the file does not hold is refused
    run_config(params, f"{base} + {overrides}")
    return params


def _not_config_error(task, task_run, state) -> bool:
    """Retry transient failures only: a bad parameter fails the same way every time."""
    try:
        state.result()
    except TexqError:
        return False
    except Exception:
        return True
    return True


@task(retries=2, retry_delay_seconds=30, retry_condition_fn=_not_config_error,
      cache_policy=NO_CACHE, task_run_name="{name}")
def stage(name: str, folder: str, device: str = "auto", context: dict | None = None):
    """One pipeline stage: ``dvc repro --single-item NAME`` in the run's workspace (DVC decides
    whether it runs; its output, the stage's progress included, goes to this task's log). The
    stage records into its pipeline run's MLflow run; ``context`` (the MLflow parent run, this
    flow run's id) tags that run. Returns the stage's result; a stage DVC found up to date ends
    in the state "Up to date" instead of "Completed"."""
    from prefect.states import Completed

    env = workspace.stage_env(device, **(context or {}))
    ran = workspace.repro(folder, name, env, get_run_logger())
    result = workspace.result(folder, name)
    if ran:
        return result
    return Completed(name="Up to date", message="dvc: stage and its inputs unchanged, not rerun",
                     data=result)


@flow(name="texq-pipeline")
def texq_pipeline(overrides: dict[str, Any] | None = None, base_params: str = "params.yaml",
                  out: str = "runs/pipeline", device: str = "auto",
                  parent_run_id: str | None = None) -> dict:
    """teacher -> synthesize -> train -> evaluate on ``base_params`` + ``overrides`` in the DVC
    workspace ``out`` (``flows.workspace``: its params.yaml, dvc.lock and ``out/pipeline``);
    returns the evaluate stage's metrics. Rerun on the same folder, only what DVC finds
    changed reruns."""
    log = get_run_logger()
    folder = workspace.prepare(out, merged_params(base_params, overrides or {}))
    context = {"parent_run_id": parent_run_id or "", "flow_run_id": flow_run.get_id() or ""}
    result: dict = {}
    for name in STAGES:
        log.info("stage %s in %s", name, folder)
        result = stage(name, str(folder), device, context, return_state=True).result()
    log.info("top-1 %.2f (%s)", result["top1"], json.dumps(overrides or {}))
    return result


def expand(grid: dict[str, list]) -> list[dict[str, Any]]:
    """{'w_bits,a_bits': [[3, 3], [4, 4]], 'mkd': [True, False]} -> the 4 override dicts, in
    order. Each key is an axis; keys joined by commas are one axis whose values (lists of as many
    items) set them together, e.g. the paper's W3A3 and W4A4 without W3A4 and W4A3."""
    if not grid or any(not isinstance(v, list) or not v for v in grid.values()):
        raise TexqError(f"grid {grid!r}: expected a mapping of params keys to non-empty lists")
    axes = []
    for axis, values in grid.items():
        keys = [k.strip() for k in axis.split(",")]
        if len(keys) == 1:
            axes.append([{keys[0]: v} for v in values])
            continue
        bad = [v for v in values if not isinstance(v, list) or len(v) != len(keys)]
        if bad:
            raise TexqError(f"grid axis {axis!r}: each value must list {len(keys)} items (one per "
                            f"key), got {bad[0]!r}")
        axes.append([dict(zip(keys, v)) for v in values])
    return [{k: v for part in combo for k, v in part.items()} for combo in itertools.product(*axes)]


def _name(combo: dict[str, Any]) -> str:
    """A child's folder: its run name (:func:`_label`), or a hash of it past 60 characters."""
    text = _label(combo)
    return text if len(text) <= 60 and "/" not in text else hashlib.sha1(text.encode()).hexdigest()[:12]


@flow(name="texq-grid")
def grid_search(grid: dict[str, list], base_params: str = "params.yaml", out: str = "runs/grid",
                deployment: str = "texq-pipeline/texq-pipeline", device: str = "auto",
                poll_seconds: float = 5.0) -> list[dict]:
    """Every combination of ``grid`` as one deployment run of ``texq-pipeline`` (the work pool's
    workers run them in parallel): each a subflow of this run in the Prefect UI, named by its
    combination, and a child of one MLflow parent run. When all are final: a results table
    (combination, state, top-1, MLflow run) as a Prefect table artifact and on the MLflow parent
    run, which also holds the grid's axes as params."""
    from prefect.artifacts import create_table_artifact
    from prefect.deployments import run_deployment
    from prefect.flow_runs import wait_for_flow_run
    from prefect.utilities.asyncutils import run_coro_as_sync

    log = get_run_logger()
    combos = expand(grid)
    for combo in combos:  # refuse an unknown key or a bad value before starting anything
        merged_params(base_params, combo)
    c = client()
    parent = c.create_run(experiment_id(c), run_name=f"grid-{len(combos)}", tags={
        "texq.grid": json.dumps(grid), "prefect_flow_run_id": flow_run.get_id() or ""})
    parent_id = parent.info.run_id
    for axis, values in grid.items():  # MLflow keys take no comma: a zipped axis as w_bits/a_bits
        c.log_param(parent_id, f"grid.{axis.replace(',', '/')}", json.dumps(values))
    runs = []
    for combo in combos:
        folder = Path(out).resolve() / _name(combo)
        fr = run_deployment(deployment, parameters={
            "overrides": combo, "base_params": str(Path(base_params).resolve()), "out": str(folder),
            "device": device, "parent_run_id": parent_id}, timeout=0, as_subflow=True,
            flow_run_name=_label(combo))
        runs.append((combo, fr.id, folder))
        log.info("submitted %s -> flow run %s", _label(combo), fr.id)
    rows: list[dict] = []
    for combo, fid, folder in runs:  # Prefect's own waiting, one child after the other
        final = run_coro_as_sync(wait_for_flow_run(fid, timeout=None, poll_interval=poll_seconds))
        rows.append({**combo, "flow_run": str(fid), "state": final.state.type.value,
                     "top1": _top1(folder)})
        log.info("%s: %s (%d of %d final)", _label(combo), final.state.type.value, len(rows), len(runs))
    table = _results_table(c, parent_id, [combo for combo, _, _ in runs], rows)
    create_table_artifact(table, key="texq-grid-results",
                          description=f"grid {json.dumps(grid)}: top-1 of each run's final-epoch model")
    _log_table(c, parent_id, table)
    ok = all(r["state"] == "COMPLETED" for r in rows)
    c.set_terminated(parent_id, "FINISHED" if ok else "FAILED")
    if not ok:
        raise RuntimeError(f"{sum(r['state'] != 'COMPLETED' for r in rows)} of {len(rows)} grid runs failed")
    return rows


def _label(combo: dict[str, Any]) -> str:
    """A child run's name: its combination with full keys (``finetune.alpha6=10,seed=0``)."""
    return ",".join(f"{k}={v}" for k, v in combo.items())


def _top1(folder: Path) -> float | None:
    try:
        return json.loads((folder / workspace.OUT / "metrics.json").read_text())["top1"]
    except (OSError, ValueError, KeyError):
        return None


def _results_table(c, parent_id: str, combos: list[dict], rows: list[dict]) -> list[dict]:
    """One row per child (``combos[i]`` and its ``rows[i]``): its combination, state, top-1 and
    MLflow run (a link when the tracking URI is a server's)."""
    from flows.tracking import tracking_uri

    children = c.search_runs([c.get_run(parent_id).info.experiment_id],
                             f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=10_000)
    by_flow = {r.data.tags.get("prefect_flow_run_id"): r for r in children}
    uri, table = tracking_uri(), []
    for combo, r in zip(combos, rows):
        run = by_flow.get(r["flow_run"])
        link = ""
        if run is not None:
            link = (f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
                    if uri.startswith("http") else run.info.run_id)
        table.append({"combination": _label(combo), "state": r["state"], "top1": r["top1"],
                      "mlflow_run": link})
    return table


def _log_table(c, parent_id: str, table: list[dict]) -> None:
    """The results table on the MLflow parent run (``grid_results.json``, the UI's table view)."""
    c.log_table(parent_id, {k: [row[k] for row in table] for k in table[0]}, "grid_results.json")
