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
import re
import time
from pathlib import Path
from typing import Annotated, Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from pydantic import Field, StringConstraints

from flows import ROOT, store, tracking, workspace
from flows.store import client, experiment_id
from texq.pipeline import STAGES, load_params
from texq.util.errors import TexqError
from texq.util.keys import assign, leaves


def merged_params(base: str | Path | dict, overrides: dict[str, Any]) -> dict:
    """``base`` (a params.yaml, or its content as a mapping) with dotted-key ``overrides`` applied;
    every key and value is checked (an unknown key or a bad value is a TexqError naming it, before
    any work starts)."""
    import copy

    from texq.pipeline import pipeline_config

    source = "params" if isinstance(base, dict) else str(base)
    params = copy.deepcopy(base) if isinstance(base, dict) else load_params(base)
    for key, value in overrides.items():
        assign(params, key, value, f"key of {source}")  # a key the file does not hold is refused
    pipeline_config(params, f"{source} + {overrides}")
    return params


# The grid as the Prefect form and API take it: keys of params.yaml (comma-joined for a zipped axis)
# to non-empty lists. The server refuses any other key when a run is submitted (the deployment's
# parameter schema), before a run exists; values are checked by the grid flow before any child.
_ORDER = {k: i for i, k in enumerate(leaves(load_params(ROOT / "params.yaml")))}  # params.yaml's key order
_KEYS = "|".join(re.escape(k) for k in sorted(_ORDER, key=len, reverse=True))
GRID_KEY = rf"^({_KEYS})(,({_KEYS}))*$"
GRID_EXAMPLE = {"w_bits,a_bits": [[3, 3], [4, 4]], "finetune.alpha6": [10, 20], "seed": [0, 1, 2]}
Grid = Annotated[
    dict[Annotated[str, StringConstraints(pattern=GRID_KEY)], Annotated[list, Field(min_length=1)]],
    Field(min_length=1, examples=[GRID_EXAMPLE], json_schema_extra={"additionalProperties": False})]


def _end_mlflow_runs(status: str):
    """A flow-run state hook: the flow run's MLflow runs still RUNNING end with ``status``."""
    def hook(flow, run, state) -> None:
        from prefect.logging.loggers import flow_run_logger

        ended = tracking.end_flow_run_runs(str(run.id), status, state.name)
        if ended:
            flow_run_logger(run, flow).info("MLflow runs %s ended %s (Prefect: %s)", ", ".join(ended),
                                            status, state.name)
    return hook


# Prefect's final state, in MLflow's words: a cancelled flow run's MLflow runs end KILLED, a
# crashed (its process died) or failed one's FAILED, so that no run stays RUNNING
END_HOOKS = {"on_cancellation": [_end_mlflow_runs("KILLED")], "on_crashed": [_end_mlflow_runs("FAILED")],
             "on_failure": [_end_mlflow_runs("FAILED")]}


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


@flow(name="texq-pipeline", **END_HOOKS)
def texq_pipeline(overrides: dict[str, Any] | None = None, base_params: str = "params.yaml",
                  out: str = "runs/pipeline", device: str = "auto",
                  parent_run_id: str | None = None, params: dict[str, Any] | None = None,
                  run_name: str = "") -> dict:
    """teacher -> synthesize -> train -> evaluate in a DVC workspace; returns the evaluate
    stage's metrics. Rerun on the same folder (or with a DVC remote, on any host), only what DVC
    finds changed reruns.

    Args:
        overrides: dotted params.yaml keys and their values for this run, e.g.
            {"finetune.alpha6": 10, "w_bits": 3}; each is checked before any stage runs.
        base_params: the params file the overrides apply to, relative to the worker's checkout.
        out: the run's folder (its params.yaml, dvc.lock and out/pipeline), relative to the
            worker's checkout; a rerun into the same folder reruns only what changed.
        device: auto (CUDA when present), cpu or cuda.
        parent_run_id: the MLflow run this run is a child of (a grid's); empty for none.
        params: the base params as a mapping, instead of base_params (a grid passes its own).
        run_name: the MLflow run's name; empty: method-wXaY-sSEED-profile.
    """
    log = get_run_logger()
    _reconcile(log)
    folder = workspace.prepare(out, merged_params(params if params is not None else base_params,
                                                  overrides or {}))
    fid = flow_run.get_id() or ""
    context = {"parent_run_id": parent_run_id or "", "flow_run_id": fid, "run_name": run_name}
    result: dict = {}
    ran = []
    for name in STAGES:
        log.info("stage %s in %s", name, folder)
        state = stage(name, str(folder), device, context, return_state=True)
        result = state.result()
        if state.name != "Up to date":
            ran.append(name)
    _publish_result(folder, fid, result, ran)
    log.info("top-1 %.2f (%s)", result["top1"], json.dumps(overrides or {}))
    return result


def _reconcile(log) -> None:
    """End the MLflow runs whose work stopped (flows.sync.reconcile: their Prefect flow run
    crashed or their stage process on this host is gone) before this run starts; the store's
    failure stops nothing (the stages record themselves, or texq track sync does later)."""
    from flows.sync import reconcile

    try:
        for e in reconcile()["ended"]:
            log.warning("MLflow run %s ended %s: %s", e["run_id"], e["status"], e["why"])
    except Exception as exc:
        log.warning("texq track reconcile skipped: %s", exc.__class__.__name__)


def _publish_result(folder: Path, fid: str, result: dict, ran: list[str]) -> None:
    """The run's result as its Prefect table artifact (read by a grid through the server): top-1,
    its interval, the stages that ran (none: every one restored or up to date) and the MLflow run
    that holds it (this flow run's, else the earlier one that logged the same metrics.json)."""
    from prefect.artifacts import create_table_artifact

    from texq.run.layout import Layout

    run_id = tracking.result_run_id(fid, Layout(folder / workspace.OUT).metrics)
    url = store.run_url(run_id) if run_id else ""
    low, high = result["top1_ci95"]
    create_table_artifact([{"top1": result["top1"], "top1_ci95": f"{low:.2f}-{high:.2f}",
                            "stages_run": ",".join(ran) or "none", "mlflow_run_id": run_id or "",
                            "mlflow_run": url or run_id or ""}],
                          key="texq-result", description="top-1 of the final-epoch model; the MLflow run holding it")


def expand(grid: dict[str, list]) -> list[dict[str, Any]]:
    """{'w_bits,a_bits': [[3, 3], [4, 4]], 'mkd': [True, False]} -> the 4 override dicts. Each key
    is an axis; keys joined by commas are one axis whose values (lists of as many items) set them
    together, e.g. the paper's W3A3 and W4A4 without W3A4 and W4A3. Axes go in params.yaml's order
    of their first key (a grid's mapping may come back from a server's database in another
    order), so that a combination's name is the same however the grid was stored."""
    if not grid or any(not isinstance(v, list) or not v for v in grid.values()):
        raise TexqError(f"grid {grid!r}: expected a mapping of params keys to non-empty lists")
    axes = []
    for axis in ordered_axes(grid):
        values = grid[axis]
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


def ordered_axes(grid: dict[str, list]) -> list[str]:
    """The grid's axes in params.yaml's order of their first key (see :func:`expand`)."""
    return sorted(grid, key=lambda axis: _ORDER.get(axis.split(",")[0].strip(), len(_ORDER)))


def _name(combo: dict[str, Any]) -> str:
    """A child's folder: its run name (:func:`_label`), or a hash of it past 60 characters."""
    text = _label(combo)
    return text if len(text) <= 60 and "/" not in text else hashlib.sha1(text.encode()).hexdigest()[:12]


@flow(name="texq-grid", **END_HOOKS)
def grid_search(grid: Grid, base_params: str = "params.yaml", out: str = "runs/grid",
                deployment: str = "texq-pipeline/texq-pipeline", device: str = "auto") -> list[dict]:
    """Every combination of the grid as one texq-pipeline deployment run (the work pool's workers
    run them in parallel, one per GPU): a subflow of this run in Prefect and a child of one MLflow
    parent run, both named by the combination. When all are final: a results table (combination,
    state, top-1, MLflow run) as a Prefect table artifact and on the MLflow parent run.

    Args:
        grid: params.yaml keys to lists of values, every combination one run. Keys joined by a
            comma are one axis whose values set them together: {"w_bits,a_bits": [[3, 3], [4, 4]],
            "finetune.alpha6": [10, 20], "seed": [0, 1, 2]} is 2 x 2 x 3 = 12 runs (W3A3 and W4A4,
            not W3A4). Any key of params.yaml: method, mkd, laws, calibration.alpha1, ...
        base_params: the params file every combination starts from, read where this flow runs
            (its values travel with each run, so workers on other hosts use them too).
        out: the folder of the children's workspaces (one per combination, named by it), relative
            to each worker's checkout.
        deployment: the deployment each combination runs as.
        device: auto (CUDA when present), cpu or cuda, for every run.
    """
    from prefect.artifacts import create_table_artifact
    from prefect.deployments import run_deployment

    log = get_run_logger()
    combos = expand(grid)
    base = load_params(base_params)
    for combo in combos:  # refuse an unknown key or a bad value before starting anything
        merged_params(base, combo)
    c = client()
    axes = " x ".join(ordered_axes(grid))
    parent = c.create_run(experiment_id(c), run_name=f"grid {axes}: {len(combos)} runs ({flow_run.get_name()})",
                          tags={"texq.grid": json.dumps(grid), "prefect_flow_run_id": flow_run.get_id() or "",
                                **tracking.where_tags()})
    parent_id = parent.info.run_id
    for axis, values in grid.items():  # MLflow keys take no comma: a zipped axis as w_bits/a_bits
        c.log_param(parent_id, f"grid.{axis.replace(',', '/')}", json.dumps(values))
    view = store.runs_view_url(parent.info.experiment_id)
    if view:
        log.info("runs table with texq's columns: %s", view)
    runs = []
    for combo in combos:
        fr = run_deployment(deployment, parameters={
            "overrides": combo, "params": base, "out": str(Path(out) / _name(combo)),
            "device": device, "parent_run_id": parent_id, "run_name": _label(combo)}, timeout=0,
            as_subflow=True, flow_run_name=_label(combo))
        runs.append((combo, fr.id))
        log.info("submitted %s -> flow run %s", _label(combo), fr.id)
    rows: list[dict] = []
    for combo, fid in runs:  # Prefect's own waiting (its events), one child after the other
        final = _wait_final(fid, log)
        rows.append({**combo, "flow_run": str(fid), "state": final.state.type.value, **_child_result(fid)})
        log.info("%s: %s (%d of %d final)", _label(combo), final.state.type.value, len(rows), len(runs))
    table = _results_table(c, parent_id, [combo for combo, _ in runs], rows)
    create_table_artifact(table, key="texq-grid-results",
                          description=f"grid {json.dumps(grid)}: top-1 of each run's final-epoch model")
    _log_table(c, parent_id, table)
    counts = {s: sum(r["state"] == s for r in rows) for s in dict.fromkeys(r["state"] for r in rows)}
    c.set_terminated(parent_id, "FINISHED" if set(counts) == {"COMPLETED"} else
                     "KILLED" if set(counts) <= {"COMPLETED", "CANCELLED", "CANCELLING"} else "FAILED")
    if set(counts) != {"COMPLETED"}:
        undone = ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if s != "COMPLETED")
        raise RuntimeError(f"{len(rows) - counts.get('COMPLETED', 0)} of {len(rows)} grid runs did not "
                           f"complete: {undone}")
    return rows


WAIT_PATIENCE_S = 600  # how long a grid waits for a Prefect server that went away (a restart)


def _wait_final(fid, log):
    """The child flow run once final, by Prefect's own waiting (``wait_for_flow_run``: its events
    stream). The stream does not survive the server going away (a restart, its database paused):
    the grid then waits for the server to answer again, up to WAIT_PATIENCE_S, instead of failing
    while its children work on."""
    from prefect.flow_runs import wait_for_flow_run
    from prefect.utilities.asyncutils import run_coro_as_sync

    away_since = None
    while True:
        try:
            return run_coro_as_sync(wait_for_flow_run(fid, timeout=None))
        except Exception as exc:
            now = time.monotonic()
            away_since = away_since or now
            if now - away_since > WAIT_PATIENCE_S:
                raise
            log.warning("waiting for flow run %s: the Prefect server did not answer (%s); trying again",
                        fid, type(exc).__name__)
            time.sleep(5)


def _child_result(fid) -> dict:
    """A child's top-1 and MLflow run, from its ``texq-result`` artifact on the Prefect server
    (nothing read from the child's files: it may have run on another host)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    with get_client(sync_client=True) as pc:
        arts = pc.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[fid]), key=ArtifactFilterKey(any_=["texq-result"])))
    if not arts:
        return {"top1": None, "mlflow_run_id": "", "stages_run": ""}
    row = json.loads(arts[-1].data)[0]
    return {"top1": row["top1"], "mlflow_run_id": row["mlflow_run_id"], "stages_run": row["stages_run"]}


def _label(combo: dict[str, Any]) -> str:
    """A child run's name: its combination with full keys (``finetune.alpha6=10,seed=0``)."""
    return ",".join(f"{k}={v}" for k, v in combo.items())


def _results_table(c, parent_id: str, combos: list[dict], rows: list[dict]) -> list[dict]:
    """One row per child (``combos[i]`` and its ``rows[i]``): its combination, state, top-1, the
    stages it ran and its MLflow run (a link when the tracking URI is a server's); a child that
    left no result (failed, cancelled) is found by its flow run's tag."""
    children = c.search_runs([c.get_run(parent_id).info.experiment_id],
                             f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=10_000)
    by_flow = {r.data.tags.get("prefect_flow_run_id"): r.info.run_id for r in children}
    table = []
    for combo, r in zip(combos, rows):
        run_id = r.get("mlflow_run_id") or by_flow.get(r["flow_run"], "")
        table.append({"combination": _label(combo), "state": r["state"], "top1": r["top1"],
                      "stages_run": r.get("stages_run", ""),
                      "mlflow_run": (store.run_url(run_id) or run_id) if run_id else ""})
    return table


def _log_table(c, parent_id: str, table: list[dict]) -> None:
    """The results table on the MLflow parent run (``grid_results.json``, the UI's table view)."""
    c.log_table(parent_id, {k: [row[k] for row in table] for k in table[0]}, "grid_results.json")
