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

EXPERIMENT = "texq"
KEY_TAG = "texq.pipeline_key"
TRAINED_TAG = "texq.trained_fingerprint"


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else an absolute sqlite file in the project root (``$DVC_ROOT``
    when DVC runs the stage in a temporary copy, so queued experiments keep their runs)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = Path(os.environ.get("DVC_ROOT") or ROOT).resolve()
    return f"sqlite:///{root / 'mlflow.db'}"


def client():
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri())


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


def artifact_location() -> str | None:
    """Beside a sqlite store, an absolute ``mlartifacts/`` folder (MLflow's default is ``./mlruns``
    relative to the working directory, lost when DVC runs a stage in a temporary copy); a tracking
    server decides for itself."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return None


def experiment_id(c, name: str | None = None) -> str:
    """The experiment's id (created on first use). Beside a sqlite store, an experiment whose
    artifacts go anywhere but the ``mlartifacts/`` beside that store (MLflow fixes the absolute
    path when it creates the experiment: a moved or copied project's store still names the old
    folder) is refused, so that no run writes its artifacts into another checkout."""
    from texq.errors import ConfigError

    name = name or os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    exp = c.get_experiment_by_name(name)
    if exp is None:
        return c.create_experiment(name, artifact_location=artifact_location())
    expected = artifact_location()
    if expected and exp.artifact_location.rstrip("/") != expected.rstrip("/"):
        raise ConfigError(
            f"{tracking_uri()}: experiment {name!r} keeps its artifacts in {exp.artifact_location}, "
            f"not beside this store ({expected}): the store was moved or copied from another "
            "checkout. Use a fresh experiment (MLFLOW_EXPERIMENT_NAME=...), a fresh store (move "
            "mlflow.db away), or a tracking server, whose artifact locations are its own "
            "(mlflow-artifacts:/...)")
    return exp.experiment_id


def flat_params(cfg) -> dict[str, str]:
    """The settings the run uses under their one dotted name (texq.methods.effective_settings: what
    its method applies, None for a switch it has no module for, no section it never reads)."""
    from texq.methods import effective_settings

    flat = {k: v for k, v in effective_settings(cfg).items() if k != "device"}
    return {k: str(v) for k, v in flat.items()}


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
    # mlflow.source.*: the runs table's Source column and the run page's commit, as MLflow shows them
    tags = {KEY_TAG: key, "mlflow.source.git.commit": git_commit(), "mlflow.source.type": "LOCAL",
            "mlflow.source.name": f"texq pipeline ({Path(params_file).name})",
            "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
            "prefect_flow_run_id": flow_run_id,
            "method": cfg.method, "profile": cfg.profile}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    name = f"{cfg.method}-w{cfg.w_bits}a{cfg.a_bits}-s{cfg.seed}-{cfg.profile}"
    run = c.create_run(exp, tags=tags, run_name=name)
    items = [Param(k, v) for k, v in flat_params(cfg).items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        c.log_batch(run.info.run_id, params=items[i:i + 100])
    c.log_batch(run.info.run_id, tags=[RunTag("texq.params_file", str(params_file))])
    return run.info.run_id


def log_outputs(c, run_id: str, stage: str, out: Path, cfg=None, register: bool = False) -> None:
    """What a finished stage adds to the run: metrics (batched), artifacts and, after
    ``evaluate``, the run's pictures (``flows.figures.pipeline_pictures``, also in ``out/figures``)."""
    import time

    from mlflow.entities import Metric

    from flows.figures import loss_curves, read_history

    now = int(time.time() * 1000)
    metrics: list = []
    if stage == "teacher":
        r = json.loads((out / "teacher.json").read_text())
        metrics.append(Metric("fp_top1", r["top1"], now, 0))
        c.log_artifact(run_id, str(out / "teacher.json"))
    elif stage == "train":
        folder = out / "train"  # ZeroQ trains nothing: no history.jsonl, no generator
        rows = read_history(folder / "history.jsonl") if (folder / "history.jsonl").exists() else []
        for row in rows:
            metrics += [Metric(k, float(v), now, int(row["epoch"])) for k, v in row.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"]
        for name in ("summary.json", "history.jsonl", "qmodel.pt"):
            if (folder / name).exists():
                c.log_artifact(run_id, str(folder / name), "train")
        if rows:
            c.log_figure(run_id, loss_curves(rows), "train/loss_curves.png")
    elif stage == "evaluate":
        r = json.loads((out / "metrics.json").read_text())
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
            metrics += [Metric(f"class_top1.{_key(n)}", v, now, 0) for n, v in zip(names, per_class)
                        if v is not None]
        c.log_artifact(run_id, str(out / "metrics.json"))
        # which trained model was scored: a rerun of evaluate alone is not another result
        summary = json.loads((out / "train" / "summary.json").read_text())
        c.set_tag(run_id, TRAINED_TAG, summary["fingerprint"])
        if cfg is not None:
            from flows.figures import pipeline_pictures

            for path in pipeline_pictures(out, cfg):
                c.log_artifact(run_id, str(path), "figures")
            log_quantized_model(c, run_id, out / "train" / "qmodel.pt", cfg, register)
    for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
        c.log_batch(run_id, metrics=metrics[i:i + 1000])


def log_quantized_model(c, run_id: str, path: Path, cfg, register: bool) -> str:
    """The quantized model as an MLflow model of the run (``mlflow.pytorch``, with a signature and
    an input example: one image in the model's normalised input space), registered as a new
    version of ``texq-<model>-wXaY`` when ``register``; returns its URI (also the run's tag
    ``texq.model_uri``). Pickled (not torch.export's pt2, which drops the module's attributes and
its eval mode): loading it needs texq importable."""
    import mlflow
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    from texq.artifacts import load_quantized

    q = load_quantized(path).eval()
    size = q.texq_info.input_size
    x = np.zeros((1, 3, size, size), dtype=np.float32)
    with torch.no_grad():
        y = q(torch.from_numpy(x)).numpy()
    name = (f"texq-{_key(cfg.model, keep='_-.', sub='-')}-w{cfg.w_bits}a{cfg.a_bits}"  # a factory's ':'
            if register else None)
    mlflow.set_tracking_uri(tracking_uri())
    with mlflow.start_run(run_id=run_id):  # mlflow.pytorch logs into the active run only
        info = mlflow.pytorch.log_model(
            q, name="quantized_model", signature=infer_signature(x, y), input_example=x,
            registered_model_name=name, pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            serialization_format="pickle")  # the module itself, texq_info and quantizers included
    c.set_tag(run_id, "texq.model_uri", info.model_uri)
    return info.model_uri


def log_eval_dataset(c, run_id: str, data: str, n: int) -> None:
    """The evaluation set as the run's dataset input (the runs table's Dataset column): its spec
    as name and source, a digest of the file's bytes where the spec is a file (else of the spec
    and its size), context 'evaluation'."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    path = Path(data)
    if path.is_file():
        with open(path, "rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
    else:
        digest = hashlib.sha256(f"{data}\0{n}".encode()).hexdigest()
    ds = Dataset(name=path.name if path.is_file() else data, digest=digest[:16],
                 source_type="local" if path.is_file() else "texq", source=data,
                 profile=json.dumps({"num_rows": n}))
    c.log_inputs(run_id, datasets=[DatasetInput(ds, [InputTag("mlflow.data.context", "evaluation")])])


def _key(name: str, keep: str = "_-. :/", sub: str = "_") -> str:
    """``name`` with every character but alphanumerics and ``keep`` replaced by ``sub``: by
    default a class name as an MLflow metric-name part."""
    return "".join(ch if ch.isalnum() or ch in keep else sub for ch in str(name))


@contextmanager
def tracked_stage(stage: str, params_file: str | Path, out: Path, cfg, parent_run_id: str = "",
                  flow_run_id: str = "", register: bool = False) -> Iterator[str]:
    """Run a stage inside its pipeline run's MLflow run (FAILED on error, FINISHED after
    ``evaluate``)."""
    c = client()
    run_id = find_or_create_run(c, params_file, cfg, parent_run_id, flow_run_id)
    try:
        yield run_id
        log_outputs(c, run_id, stage, Path(out), cfg, register)
    except BaseException:
        c.set_terminated(run_id, "FAILED")
        raise
    if stage == "evaluate":
        c.set_terminated(run_id, "FINISHED")


def run_tracked_stage(name: str, params_file: str | Path, out: str | Path, device: str = "auto",
                      progress: bool = True, parent_run_id: str = "", flow_run_id: str = "") -> dict:
    """``texq.pipeline.run_stage`` inside its pipeline run's MLflow run."""
    from dataclasses import replace

    from texq.pipeline import load_params, run_config, run_stage
    from texq.pipeline.params import register_model

    params = load_params(params_file)  # one read: the run's config and the registry switch
    cfg = replace(run_config(params, str(params_file)), device=device)
    register = register_model(params, str(params_file))
    with tracked_stage(name, params_file, out, cfg, parent_run_id, flow_run_id, register):
        return run_stage(name, params_file, out, device, progress)
