"""Prefect flows: ``texq_pipeline`` (the four stages as tasks) and ``grid_search`` (a grid of
pipeline runs fanned out as deployment runs to a work pool, one MLflow parent run over them).

The flows hold no maths: each task runs a ``texq.pipeline`` stage inside its MLflow run.
Deployments are declared in ``prefect.yaml``; workers (one per GPU, ``CUDA_VISIBLE_DEVICES``) pick
the runs up from the work pool, on one host or many.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from pydantic import StringConstraints

from flows import workspace
from flows.bookkeeping import pipeline_run, provenance, record_stage, run_end, store
from flows.bookkeeping.store import client, experiment_id
from flows.grid import (
    Grid,
    Overrides,
    axis_keys,
    child_folder,
    child_result,
    expand,
    label,
    ordered_axes,
    record_grid,
    run_wide,
    wait_final,
)
from texq.pipeline import STAGES, load_params
from texq.util.device import DEVICES
from texq.util.errors import TexqError
from texq.util.keys import assign


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


# The other parameters as the server checks them when a run is submitted (the run form refuses
# anything else, naming the parameter); paths are checked by the flow before it writes anything
Device = Literal[DEVICES]  # texq.util.device's names, as the run form's choices
RunId = Annotated[str, StringConstraints(pattern=r"^([0-9a-f]{32})?$")]  # an MLflow run id, or empty
RunName = Annotated[str, StringConstraints(max_length=250, pattern=r"^[^\x00-\x1f]*$")]  # MLflow's limit, one line
Deployment = Annotated[str, StringConstraints(pattern=r"^[\w.-]+/[\w.-]+$")]  # flow-name/deployment-name


def _end_mlflow_runs(status: str):
    """A flow-run state hook: the flow run's MLflow runs still RUNNING end with ``status``."""
    def hook(flow, run, state) -> None:
        from prefect.logging.loggers import flow_run_logger

        ended = run_end.end_flow_run_runs(str(run.id), status, state.name)
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
                  out: str = "runs/pipeline", device: Device = "auto",
                  parent_run_id: RunId | None = None, params: dict[str, Any] | None = None,
                  run_name: RunName = "") -> dict:
    """teacher -> synthesize -> train -> evaluate in a DVC workspace; returns the evaluate
    stage's metrics. Rerun on the same folder (or with a DVC remote, on any host), only what DVC
    finds changed reruns.

    Args:
        overrides: dotted params.yaml keys and their values for this run, e.g.
            {"finetune.alpha6": 10, "w_bits": 3}; each is checked before any stage runs.
        base_params: the params file the overrides apply to, relative to the worker's checkout
            (a file in the checkout or under its workspace root).
        out: the run's folder (its params.yaml, dvc.lock and out/pipeline), relative to the
            worker's checkout, inside its workspace root (runs/, or TEXQ_WORKSPACES on the
            worker): anything else is refused before a file is written. A rerun into the same
            folder reruns only what changed.
        device: auto (CUDA when present), cpu or cuda.
        parent_run_id: the MLflow run this run is a child of (a grid's); empty for none.
        params: the base params as a mapping, instead of base_params (a grid passes its own).
        run_name: the MLflow run's name; empty: method-wXaY-sSEED-profile.
    """
    log = get_run_logger()
    # every parameter checked before anything is written (a flow run may come from anyone who
    # reaches the Prefect server): the folder under the workspace root, the params and overrides
    where = workspace.workspace_path(out)
    merged = merged_params(params if params is not None else workspace.params_path(base_params), overrides or {})
    _reconcile(log)
    folder = workspace.prepare(where, merged)
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
    """End the MLflow runs whose work stopped (flows.bookkeeping.sync.reconcile: their Prefect flow run
    crashed or their stage process on this host is gone) before this run starts; the store's
    failure stops nothing (the stages record themselves, or texq track sync does later)."""
    from flows.bookkeeping.sync import reconcile

    try:
        for e in reconcile()["ended"]:
            log.warning("MLflow run %s ended %s: %s", e["run_id"], e["status"], e["why"])
    except Exception as exc:
        log.warning("texq track reconcile skipped: %s", exc.__class__.__name__)


def _publish_result(folder: Path, fid: str, result: dict, ran: list[str]) -> None:
    """The run's result as its Prefect table artifact (read by a grid through the server)."""
    from prefect.artifacts import create_table_artifact

    create_table_artifact([result_row(folder, fid, result, ran, get_run_logger())], key="texq-result",
                          description="top-1 of the final-epoch model; the MLflow run holding it")


def result_row(folder: Path, fid: str, result: dict, ran: list[str], log) -> dict:
    """A pipeline run's result row: top-1, its interval, the stages that ran (none: every one
    restored or up to date) and the MLflow run that holds it (this flow run's, else the earlier one
    that logged the same metrics.json). The stages succeeded: a store that does not answer now
    leaves the MLflow columns empty and fails nothing."""
    run_id, url = record_stage.quietly(log, "the result's MLflow run", (None, ""), lambda: _result_run(folder, fid))
    low, high = result["top1_ci95"]
    return {"top1": result["top1"], "top1_ci95": f"{low:.2f}-{high:.2f}",
            "stages_run": ",".join(ran) or "none", "mlflow_run_id": run_id or "",
            "mlflow_run": url or run_id or ""}


def _result_run(folder: Path, fid: str) -> tuple[str | None, str]:
    from texq.run.layout import Layout

    run_id = pipeline_run.result_run_id(fid, Layout(folder / workspace.OUT).metrics)
    return run_id, (store.run_url(run_id) if run_id else "") or ""


@flow(name="texq-grid", **END_HOOKS)
def grid_search(grid: Grid, overrides: Overrides = {}, base_params: str = "params.yaml",
                out: str = "runs/grid", deployment: Deployment = "texq-pipeline/texq-pipeline",
                device: Device = "auto") -> list[dict]:
    """Every combination of the grid as one texq-pipeline deployment run (the work pool's workers
    run them in parallel, one per GPU): a subflow of this run in Prefect and a child of one MLflow
    parent run, both named by the combination. When all are final: a results table (combination,
    state, top-1, MLflow run) as a Prefect table artifact and on the MLflow parent run.

    Args:
        grid: params.yaml keys to lists of values, every combination one run. Keys joined by a
            comma are one axis whose values set them together: {"w_bits,a_bits": [[3, 3], [4, 4]],
            "finetune.alpha6": [10, 20], "seed": [0, 1, 2]} is 2 x 2 x 3 = 12 runs (W3A3 and W4A4,
            not W3A4). Any key of params.yaml: method, mkd, laws, calibration.alpha1, ...
        overrides: params.yaml keys set for every run, not an axis: {"profile": "paper"} or
            {"method": "gdfq", "finetune.epochs": 200}. A key may not be both an axis and here.
        base_params: the params file every combination starts from, read where this flow runs
            (its values travel with each run, so workers on other hosts use them too).
        out: the folder of the children's workspaces (one per combination, named by it), relative
            to each worker's checkout, inside its workspace root (runs/, or TEXQ_WORKSPACES).
        deployment: the deployment each combination runs as.
        device: auto (CUDA when present), cpu or cuda, for every run.
    """
    from prefect.artifacts import create_table_artifact
    from prefect.deployments import run_deployment

    log = get_run_logger()
    workspace.workspace_path(out)  # each child's folder lies under it: checked here, and by the child
    combos = expand(grid)
    overrides = run_wide(grid, overrides)
    # every child starts from the base params with the run-wide overrides (checked here first)
    base = merged_params(load_params(workspace.params_path(base_params)), overrides)
    for combo in combos:  # refuse an unknown key or a bad value before starting anything
        merged_params(base, combo)
    c = client()
    axes = " x ".join(ordered_axes(grid))
    fixed = "".join(f", {k}={v}" for k, v in overrides.items())
    # its flow run's name first (what tells two grids apart), then what it varies and fixes
    parent = c.create_run(experiment_id(c), run_name=f"grid {flow_run.get_name()}: {axes}, {len(combos)} runs{fixed}",
                          tags={"texq.grid": json.dumps(grid), "texq.grid_overrides": json.dumps(overrides),
                                "prefect_flow_run_id": flow_run.get_id() or "", **provenance.where_tags()})
    parent_id = parent.info.run_id
    for axis, values in grid.items():  # MLflow keys take no comma: a zipped axis as w_bits/a_bits
        c.log_param(parent_id, f"grid.{axis.replace(',', '/')}", json.dumps(values))
    for key, value in overrides.items():
        c.log_param(parent_id, key, json.dumps(value))
    view_key = store.add_grid_view(c, parent.info.experiment_id, parent_id, axis_keys(grid))
    view = store.runs_view_url(parent.info.experiment_id, view_key)
    if view:
        charts = store.runs_view_url(parent.info.experiment_id, view_key, charts=True)
        log.info("this grid's runs, best top-1 first: %s; compared on top-1: %s", view, charts)
        c.set_tag(parent_id, "mlflow.note.content", f"Grid of {len(combos)} runs ({axes}{fixed}). "
                  f"Its runs, best top-1 first: [{view}]({view}); compared on top-1: [{charts}]({charts})")
    runs = []
    for combo in combos:
        fr = run_deployment(deployment, parameters={
            "overrides": combo, "params": base, "out": str(Path(out) / child_folder(combo)),
            "device": device, "parent_run_id": parent_id, "run_name": label(combo)}, timeout=0,
            as_subflow=True, flow_run_name=label(combo))
        runs.append((combo, fr.id))
        log.info("submitted %s -> flow run %s", label(combo), fr.id)
    rows: list[dict] = []
    for combo, fid in runs:  # Prefect's own waiting (its events), one child after the other
        final = wait_final(fid, log)
        rows.append({**combo, "flow_run": str(fid), "state": final.state.type.value, **child_result(fid)})
        log.info("%s: %s (%d of %d final)", label(combo), final.state.type.value, len(rows), len(runs))
    table = record_grid(c, parent_id, [combo for combo, _ in runs], rows, log)
    create_table_artifact(table, key="texq-grid-results",
                          description=f"grid {json.dumps(grid)}: top-1 of each run's final-epoch model")
    counts = {s: sum(r["state"] == s for r in rows) for s in dict.fromkeys(r["state"] for r in rows)}
    if set(counts) != {"COMPLETED"}:
        undone = ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if s != "COMPLETED")
        raise RuntimeError(f"{len(rows) - counts.get('COMPLETED', 0)} of {len(rows)} grid runs did not "
                           f"complete: {undone}")
    return rows
