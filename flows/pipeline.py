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
import os
import time
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.runtime import flow_run

from flows.cache import may_use_cache, record, stage_inputs
from flows.tracking import FLOW_RUN_ENV, PARENT_ENV, client, experiment_id
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
      cache_policy=INPUTS + TASK_SOURCE, persist_result=True, result_serializer="json",
      task_run_name="{name}")
def stage(name: str, params_file: str, out: str, device: str = "auto",
          inputs: dict | None = None) -> dict:
    """One pipeline stage in its MLflow run (the run is shared by the pipeline's stages).
    ``inputs`` (``flows.cache.stage_inputs``: what the stage reads, by content) is there for the
    cache key: the same inputs return the cached result of a completed run."""
    from flows.tracking import run_tracked_stage

    logging.getLogger("texq").setLevel(logging.INFO)  # PREFECT_LOGGING_EXTRA_LOGGERS=texq shows it
    return run_tracked_stage(name, params_file, out, device, progress=False)


@flow(name="texq-pipeline")
def texq_pipeline(overrides: dict[str, Any] | None = None, base_params: str = "params.yaml",
                  out: str = "runs/pipeline", device: str = "auto",
                  parent_run_id: str | None = None) -> dict:
    """teacher -> synthesize -> train -> evaluate on ``base_params`` + ``overrides``; returns
    the evaluate stage's metrics. Outputs (and the params file used) go to ``out``."""
    log = get_run_logger()
    folder = Path(out)
    params_file = write_params(base_params, overrides or {}, folder / "params.yaml")
    saved = {k: os.environ.get(k) for k in (FLOW_RUN_ENV, PARENT_ENV)}
    os.environ[FLOW_RUN_ENV] = flow_run.get_id() or ""
    if parent_run_id:
        os.environ[PARENT_ENV] = parent_run_id
    try:
        result: dict = {}
        for name in STAGES:
            inputs = stage_inputs(name, params_file, folder)
            reuse = may_use_cache(name, folder, inputs)
            log.info("stage %s (%s)%s", name, params_file, "" if reuse else ": runs (no valid cache)")
            result = stage.with_options(refresh_cache=not reuse)(
                name, str(params_file), str(folder), device, inputs)
            record(name, folder, inputs)
        log.info("top-1 %.2f (%s)", result["top1"], json.dumps(overrides or {}))
        return result
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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
    workers run them in parallel), each a child of one MLflow parent run."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    log = get_run_logger()
    combos = expand(grid)
    for combo in combos:  # refuse an unknown key or a bad value before starting anything
        merged_params(base_params, combo)
    c = client()
    parent = c.create_run(experiment_id(c), run_name=f"grid-{len(combos)}", tags={
        "texq.grid": json.dumps(grid), "prefect_flow_run_id": flow_run.get_id() or ""})
    parent_id = parent.info.run_id
    runs = []
    for combo in combos:
        folder = Path(out).resolve() / _name(combo)
        fr = run_deployment(deployment, parameters={
            "overrides": combo, "base_params": str(Path(base_params).resolve()), "out": str(folder),
            "device": device, "parent_run_id": parent_id}, timeout=0, as_subflow=False)
        runs.append((combo, fr.id))
        log.info("submitted %s -> flow run %s", combo, fr.id)
    rows: list[dict] = []
    with get_client(sync_client=True) as pc:
        pending = dict((fid, combo) for combo, fid in runs)
        while pending:
            for fid in list(pending):
                state = pc.read_flow_run(fid).state
                if state is not None and state.is_final():
                    rows.append({**pending.pop(fid), "flow_run": str(fid), "state": state.type.value})
                    log.info("flow run %s: %s (%d left)", fid, state.type.value, len(pending))
            if pending:
                time.sleep(poll_seconds)
    ok = all(r["state"] == "COMPLETED" for r in rows)
    c.set_terminated(parent_id, "FINISHED" if ok else "FAILED")
    if not ok:
        raise RuntimeError(f"{sum(r['state'] != 'COMPLETED' for r in rows)} of {len(rows)} grid runs failed")
    return rows
