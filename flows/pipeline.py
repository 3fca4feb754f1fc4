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

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.runtime import flow_run

from flows.cache import may_use_cache, record, stage_inputs
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


def write_params(base: str | Path, overrides: dict[str, Any], dest: Path) -> Path:
    """The merged params file a pipeline run reads (kept beside its outputs)."""
    from texq.io import atomic_path

    params = merged_params(base, overrides)
    with atomic_path(dest) as tmp:
        tmp.write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


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
      cache_policy=(INPUTS - "context") + TASK_SOURCE, persist_result=True, result_serializer="json",
      task_run_name="{name}")
def stage(name: str, params_file: str, out: str, device: str = "auto",
          inputs: dict | None = None, context: dict | None = None) -> dict:
    """One pipeline stage in its MLflow run (the run is shared by the pipeline's stages).
    ``inputs`` (``flows.cache.stage_inputs``: what the stage reads, by content) is there for the
    cache key: the same inputs return the cached result of a completed run. ``context`` (the
    MLflow parent run, this flow run's id; not part of the cache key) tags the MLflow run."""
    from flows.tracking import run_tracked_stage

    logging.getLogger("texq").setLevel(logging.INFO)  # PREFECT_LOGGING_EXTRA_LOGGERS=texq shows it
    return run_tracked_stage(name, params_file, out, device, progress=False, **(context or {}))


@flow(name="texq-pipeline")
def texq_pipeline(overrides: dict[str, Any] | None = None, base_params: str = "params.yaml",
                  out: str = "runs/pipeline", device: str = "auto",
                  parent_run_id: str | None = None) -> dict:
    """teacher -> synthesize -> train -> evaluate on ``base_params`` + ``overrides``; returns
    the evaluate stage's metrics. Outputs (and the params file used) go to ``out``."""
    log = get_run_logger()
    folder = Path(out)
    params_file = write_params(base_params, overrides or {}, folder / "params.yaml")
    context = {"parent_run_id": parent_run_id or "", "flow_run_id": flow_run.get_id() or ""}
    result: dict = {}
    for name in STAGES:
        inputs = stage_inputs(name, params_file, folder)
        reuse = may_use_cache(name, folder, inputs)
        log.info("stage %s (%s)%s", name, params_file, "" if reuse else ": runs (no valid cache)")
        result = stage.with_options(refresh_cache=not reuse)(
            name, str(params_file), str(folder), device, inputs, context)
        record(name, folder, inputs)
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
    text = ",".join(f"{k.split('.')[-1]}={v}" for k, v in combo.items())
    return text if len(text) <= 60 else hashlib.sha1(text.encode()).hexdigest()[:12]


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
        return json.loads((folder / "metrics.json").read_text())["top1"]
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
