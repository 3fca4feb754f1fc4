"""MLflow tracking of pipeline runs: one MLflow run per pipeline run, whatever stages it reruns.

A pipeline run is identified by the content of its params file, the git commit, the DVC experiment
name and the parent (grid) run: the first stage that runs creates the MLflow run (tagged with that
key), later stages of the same pipeline run find it, ``evaluate`` ends it FINISHED, and a failing
stage ends it FAILED before the error propagates (so ``dvc repro`` fails too).
Everything is logged with ``MlflowClient`` and an explicit run id (no active-run globals: safe in
Prefect's worker threads).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from flows import ROOT
from flows.logged_model import log_quantized_model
from flows.store import client, experiment_id, experiment_name, safe_name
from texq.util.io import file_digest

KEY_TAG = "texq.pipeline_key"
FLOW_END_TAG = "texq.flow_run_end"  # the Prefect state that ended a flow run's MLflow runs
TRAINED_TAG = "texq.trained_fingerprint"
METRICS_TAG = "texq.metrics_sha256"  # which metrics.json a run logged (a restored stage finds it)
RUN_NAME_ENV = "TEXQ_RUN_NAME"  # a grid child's name: its combination (flows.pipeline)


def git_commit() -> str:
    """The project's commit: that of ``$DVC_ROOT`` (the repo a queued DVC experiment came from),
    else of the checkout holding this code (a Prefect run's workspace need not be in one)."""
    for where in (os.environ.get("DVC_ROOT"), ROOT):
        if not where:
            continue
        try:
            out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True,
                                 text=True, timeout=10)
        except OSError:
            continue
        if out.returncode == 0:
            return out.stdout.strip()
    return "unknown"


def pipeline_key(params_file: str | Path, parent_run_id: str = "") -> str:
    parts = [Path(params_file).read_text(), git_commit(), os.environ.get("DVC_EXP_NAME", ""),
             parent_run_id]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


def where_tags() -> dict[str, str]:
    """Where a stage runs, as run tags: the host, the GPUs it sees (``CUDA_VISIBLE_DEVICES`` as the
    worker set it, and the devices' names, or ``cpu``) and the checkout its code comes from."""
    import socket

    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
             if torch.cuda.is_available() else [])
    return {"texq.host": socket.gethostname(),
            "texq.cuda_visible_devices": "(unset)" if visible is None else visible,
            "texq.gpu": ", ".join(names) if names else "cpu",
            "texq.checkout": str(ROOT)}


def flat_params(cfg) -> dict[str, str]:
    """The settings the run uses under their one dotted name (texq.run.methods.effective_settings: what
    its method applies, None for a switch it has no module for, no section it never reads)."""
    from texq.run.methods import effective_settings

    return {k: str(v) for k, v in effective_settings(cfg).items() if k != "device"}


def find_or_create_run(c, params_file: str | Path, cfg, parent_run_id: str = "",
                       flow_run_id: str = "") -> str:
    """The RUNNING MLflow run of this pipeline run, or a new one with its params and tags."""
    from mlflow.entities import Param, RunTag

    key = pipeline_key(params_file, parent_run_id)
    exp = experiment_id(c)
    found = c.search_runs([exp], f"tags.`{KEY_TAG}` = '{key}' and attributes.status = 'RUNNING'",
                          max_results=1)
    if found:
        return found[0].info.run_id
    if flow_run_id:  # a stage of a flow run already ended (its process died) opens no new run
        runs = c.search_runs([exp], f"tags.`prefect_flow_run_id` = '{flow_run_id}'", max_results=100)
        ended = [r.data.tags[FLOW_END_TAG] for r in runs if FLOW_END_TAG in r.data.tags]
        if ended:
            raise Orphaned(f"its Prefect flow run {flow_run_id} ended {ended[0]}: not recording into it")
    # mlflow.source.*: the runs table's Source column and the run page's commit, as MLflow shows them
    tags = {KEY_TAG: key, "mlflow.source.git.commit": git_commit(), "mlflow.source.type": "LOCAL",
            "mlflow.source.name": f"texq pipeline ({Path(params_file).name})",
            "prefect_flow_run_id": flow_run_id,
            "method": cfg.method, "profile": cfg.profile, **where_tags()}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    # a grid child is named by what differs (its combination); a lone run by what it is
    name = (os.environ.get(RUN_NAME_ENV)
            or f"{cfg.method}-w{cfg.w_bits}a{cfg.a_bits}-s{cfg.seed}-{cfg.profile}")
    run = c.create_run(exp, tags=tags, run_name=name)
    items = [Param(k, v) for k, v in flat_params(cfg).items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        c.log_batch(run.info.run_id, params=items[i:i + 100])
    c.log_batch(run.info.run_id, tags=[RunTag("texq.params_file", str(params_file))])
    return run.info.run_id


def log_outputs(c, run_id: str, stage: str, out: Path, cfg=None, register: bool = False) -> None:
    """What a finished stage adds to the run: metrics (batched), artifacts and, after
    ``evaluate``, the run's pictures (``texq.run.figures.run_pictures``, also in ``out/figures``)."""
    import time

    from mlflow.entities import Metric

    from texq.run.figures import loss_curves, read_history, run_pictures
    from texq.run.layout import Layout

    layout = Layout(out)

    now = int(time.time() * 1000)
    metrics: list = []
    if stage == "teacher":
        r = json.loads(layout.teacher.read_text())
        metrics.append(Metric("fp_top1", r["top1"], now, 0))
        c.log_artifact(run_id, str(layout.teacher))
    elif stage == "train":
        # ZeroQ trains nothing: no history.jsonl, no generator
        rows = read_history(layout.history) if layout.history.exists() else []
        for row in rows:  # step = the epoch counted from 1: step 0 holds the run's scores alone
            metrics += [Metric(k, float(v), now, int(row["epoch"]) + 1) for k, v in row.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"]
        for path in (layout.summary, layout.history, layout.qmodel):
            if path.exists():
                c.log_artifact(run_id, str(path), "train")
        if rows:
            c.log_figure(run_id, loss_curves(rows), "train/loss_curves.png")
    elif stage == "evaluate":
        r = json.loads(layout.metrics.read_text())
        for k in ("top1", "top5", "correct", "n", "fp_top1", "train_seconds"):
            metrics.append(Metric(k, float(r[k]), now, 0))
        low, high = r["top1_ci95"]  # a 95% interval is two numbers: two metrics
        metrics += [Metric("top1_ci95_low", float(low), now, 0), Metric("top1_ci95_high", float(high), now, 0)]
        log_eval_dataset(c, run_id, r["data"], int(r["n"]))
        for group in ("texture", "texture_generated"):
            for k, v in (r.get(group) or {}).items():
                metrics.append(Metric(f"{group}.{k}", float(v), now, 0))
        per_class = r.get("per_class_top1") or []
        names = r["class_names"]  # the evaluate stage's: names, else indices
        if len(per_class) <= 100:  # ImageNet's 1000 stay in the metrics.json artifact
            metrics += [Metric(f"class_top1.{safe_name(n)}", v, now, 0) for n, v in zip(names, per_class)
                        if v is not None]
        # the scores first: the logged model takes the run's metrics at its step (0) when logged
        _log_metrics(c, run_id, metrics)
        metrics = []
        c.log_artifact(run_id, str(layout.metrics))
        # which trained model was scored: a rerun of evaluate alone is not another result
        summary = json.loads(layout.summary.read_text())
        c.set_tag(run_id, TRAINED_TAG, summary["fingerprint"])
        c.set_tag(run_id, METRICS_TAG, file_digest(layout.metrics))
        if cfg is not None:
            for path in run_pictures(layout, cfg):
                c.log_artifact(run_id, str(path), "figures")
            log_quantized_model(c, run_id, layout.qmodel, cfg, register, r)
    _log_metrics(c, run_id, metrics)


def _log_metrics(c, run_id: str, metrics: list) -> None:
    for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
        c.log_batch(run_id, metrics=metrics[i:i + 1000])


def log_eval_dataset(c, run_id: str, data: str, n: int) -> None:
    """The evaluation set as the run's dataset input (the runs table's Dataset column): its spec
    as name and source, a digest of the file's bytes where the spec is a file (else of the spec
    and its size), context 'evaluation'."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    path = Path(data)
    if path.is_file():
        digest = file_digest(path)
    else:
        digest = hashlib.sha256(f"{data}\0{n}".encode()).hexdigest()
    ds = Dataset(name=path.name if path.is_file() else data, digest=digest[:16],
                 source_type="local" if path.is_file() else "texq", source=data,
                 profile=json.dumps({"num_rows": n}))
    c.log_inputs(run_id, datasets=[DatasetInput(ds, [InputTag("mlflow.data.context", "evaluation")])])


class Terminated(BaseException):
    """The stage process was asked to stop (SIGTERM: Prefect cancelling its flow run, a worker
    or host shutting down); its run ends KILLED, not FAILED."""


class Orphaned(Terminated):
    """The stage's flow run is over (its process died: Prefect calls it Crashed); the stage stops
    and its run ends FAILED, as the flow run's own runs do."""


def end_state(exc: BaseException) -> str:
    """The MLflow status a run ends in when its stage raised ``exc``: KILLED when the stage was
    stopped from outside (SIGTERM, Ctrl-C), FAILED for an error or a flow run that died."""
    if isinstance(exc, Orphaned):
        return "FAILED"
    return "KILLED" if isinstance(exc, (Terminated, KeyboardInterrupt)) else "FAILED"


@contextmanager
def tracked_stage(stage: str, params_file: str | Path, out: Path, cfg, parent_run_id: str = "",
                  flow_run_id: str = "", register: bool = False) -> Iterator[str]:
    """Run a stage inside its pipeline run's MLflow run (FAILED on error, KILLED when stopped,
    FINISHED after ``evaluate``)."""
    c = client()
    run_id = find_or_create_run(c, params_file, cfg, parent_run_id, flow_run_id)
    try:
        yield run_id
        log_outputs(c, run_id, stage, Path(out), cfg, register)
    except BaseException as exc:
        c.set_terminated(run_id, end_state(exc))
        raise
    if stage == "evaluate":
        c.set_terminated(run_id, "FINISHED")


def result_run_id(flow_run_id: str, metrics: Path) -> str | None:
    """The MLflow run that holds a pipeline run's result: the one its Prefect flow run opened, else
    (every stage up to date or restored from DVC's run cache, so none was opened) the latest
    finished run that logged this very ``metrics.json``."""
    c = client()
    exp = c.get_experiment_by_name(experiment_name())
    if exp is None:
        return None
    for query in (f"tags.`prefect_flow_run_id` = '{flow_run_id}'" if flow_run_id else None,
                  f"tags.`{METRICS_TAG}` = '{file_digest(metrics)}' and attributes.status = 'FINISHED'"):
        if query:
            runs = c.search_runs([exp.experiment_id], query, max_results=1,
                                 order_by=["attributes.start_time DESC"])
            if runs:
                return runs[0].info.run_id
    return None


def end_flow_run_runs(flow_run_id: str, status: str, state: str = "") -> list[str]:
    """End every MLflow run still RUNNING that a Prefect flow run opened (its pipeline run, or a
    grid's parent run) with ``status`` (KILLED for a cancelled flow run, FAILED for a crashed one):
    the state Prefect gave it, ``state``, is tagged, so that a stage process that outlived its
    flow run opens no new run (:func:`find_or_create_run`). Returns the run ids ended."""
    c = client()
    exp = c.get_experiment_by_name(experiment_name())
    if exp is None or not flow_run_id:
        return []
    runs = c.search_runs([exp.experiment_id], f"tags.`prefect_flow_run_id` = '{flow_run_id}' "
                         "and attributes.status = 'RUNNING'", max_results=1000)
    for run in runs:
        c.set_tag(run.info.run_id, FLOW_END_TAG, state or status)
        c.set_terminated(run.info.run_id, status)
    return [r.info.run_id for r in runs]


def run_tracked_stage(name: str, params_file: str | Path, out: str | Path, device: str = "auto",
                      progress: bool = True, parent_run_id: str = "", flow_run_id: str = "") -> dict:
    """``texq.pipeline.run_stage`` inside its pipeline run's MLflow run, the params file read
    once (the run's configuration, and whether it registers its model)."""
    from texq.pipeline import read_config, run_stage

    config = read_config(params_file, device)
    with tracked_stage(name, params_file, out, config.run, parent_run_id, flow_run_id,
                       config.registers_model):
        return run_stage(name, config, out, progress)
