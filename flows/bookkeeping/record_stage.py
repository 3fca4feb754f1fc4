"""What a finished stage adds to its MLflow run, recorded from its files: results first, bookkeeping
second.

A stage's computation needs no server. When the MLflow store cannot be reached or written (a
tracking server restarting, a SQLite file locked past its busy timeout, an artifact disk full), the
stage keeps its outputs, says in one line which store and what was not recorded, and notes it in
``<out>/.unrecorded.json``; the next tracked stage of the same pipeline run, or ``texq track sync``,
records it from the files. Recording is idempotent: a stage's record is tagged with the digest of
the file it comes from (``texq.recorded.<stage>``; a tagged record is not logged again), metrics
carry the time their file was written (MLflow drops a point logged twice with the same time, step
and value), artifacts are overwritten, and the model is logged once per ``metrics.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from flows.bookkeeping.logged_model import log_quantized_model
from flows.bookkeeping.store import safe_name, tracking_uri
from texq.util.io import file_digest, read_json, write_json

log = logging.getLogger("texq")
PENDING = ".unrecorded.json"  # under a pipeline's out folder: stages whose recording failed
RECORDED_TAG = "texq.recorded."  # + stage: the digest of the file the stage's record came from
TRAINED_TAG = "texq.trained_fingerprint"
METRICS_TAG = "texq.metrics_sha256"  # which metrics.json a run logged (a restored stage finds it)
MODEL_FOR_TAG = "texq.model_metrics_sha256"  # the metrics.json whose model the run logged


def source_file(out: Path, stage: str) -> Path | None:
    """The file a stage's record comes from (None: ``synthesize`` records nothing)."""
    from texq.run.layout import Layout

    layout = Layout(out)
    return {"teacher": layout.teacher, "train": layout.summary, "evaluate": layout.metrics}.get(stage)


def tracking_error(exc: BaseException) -> bool:
    """Whether ``exc`` comes from the tracking store (a server, a database, its disk) rather than
    from texq: those leave the work alone."""
    import requests
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    return isinstance(exc, (MlflowException, SQLAlchemyError, requests.RequestException, OSError))


def failure_line(exc: BaseException) -> str:
    """The store's error in one line (SQLAlchemy's SQL text and MLflow's traces left out)."""
    text = str(getattr(exc, "orig", None) or exc).split("\n[SQL:")[0]
    return f"{type(exc).__name__}: {' '.join(text.split())[:240]}"


def quietly(log, what: str, default, call):
    """``call()``, or ``default`` with one warning when the MLflow store fails it (a bookkeeper:
    its failure never fails finished work); texq's own errors are raised."""
    try:
        return call()
    except Exception as exc:
        if not tracking_error(exc):
            raise
        log.warning("%s not recorded: the MLflow store at %s did not answer (%s)", what,
                    tracking_uri(), failure_line(exc))
        return default


@contextmanager
def quiet_store() -> Iterator[None]:
    """MLflow's SQL store logs each failed call with its traceback; texq reports it in one line."""
    logger = logging.getLogger("mlflow.store.db.utils")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def record_stage(c, run_id: str, stage: str, out: Path, cfg, register: bool = False) -> bool:
    """Log what ``stage`` left in ``out`` into ``run_id`` unless that very file was recorded
    already; True when something was logged."""
    src = source_file(out, stage)
    if src is None or not src.is_file():
        return False
    digest = file_digest(src)
    if c.get_run(run_id).data.tags.get(RECORDED_TAG + stage) == digest:
        return False
    log_outputs(c, run_id, stage, out, cfg, register)
    c.set_tag(run_id, RECORDED_TAG + stage, digest)
    return True


def unrecorded(out: Path, key: str | None = None) -> list[dict]:
    """The stages noted as not recorded (for pipeline run ``key``, else all)."""
    path = Path(out) / PENDING
    try:
        entries = read_json(path) if path.is_file() else []
    except Exception:  # a damaged note: texq track sync records every stage anyway
        return []
    return [e for e in entries if key is None or e.get("key") == key]


def note_unrecorded(out: Path, stage: str, key: str, run_id: str | None, exc: BaseException) -> bool:
    """Add ``stage`` to ``<out>/.unrecorded.json`` (False when even that cannot be written)."""
    entries = [e for e in unrecorded(out) if (e.get("stage"), e.get("key")) != (stage, key)]
    src = source_file(Path(out), stage)
    entries.append({"stage": stage, "key": key, "run_id": run_id, "store": tracking_uri(),
                    "error": failure_line(exc),  # the file the note is about, as it was then
                    "digest": file_digest(src) if src is not None and src.is_file() else None})
    try:
        write_json(Path(out) / PENDING, entries)
        return True
    except Exception:
        return False


def current(out: Path, note: dict) -> bool:
    """Whether ``note`` is about the files ``out`` holds now (the stage's file has the digest it
    had when noted): a note left by another configuration, whose files were since replaced, is not."""
    src = source_file(Path(out), note.get("stage", ""))
    return bool(note.get("digest")) and src is not None and src.is_file() and file_digest(src) == note["digest"]


def drop_unrecorded(out: Path) -> None:
    """Remove ``out``'s notes (texq track sync recorded every stage's files as they are)."""
    (Path(out) / PENDING).unlink(missing_ok=True)


def forget_unrecorded(out: Path, stages: list[str], key: str) -> None:
    """Drop the notes of ``stages`` of pipeline run ``key`` (recorded now)."""
    path = Path(out) / PENDING
    left = [e for e in unrecorded(out) if not (e.get("key") == key and e.get("stage") in stages)]
    if left:
        write_json(path, left)
    elif path.exists():
        path.unlink()


def log_outputs(c, run_id: str, stage: str, out: Path, cfg=None, register: bool = False) -> None:
    """What a finished stage adds to the run: metrics (batched, timed by their file), artifacts
    and, after ``evaluate``, the run's pictures (``texq.run.records.pictures``: those the
    evaluate step drew in ``out/figures``) and its model."""
    from mlflow.entities import Metric

    from texq.run.figures import loss_curves, read_history
    from texq.run.layout import Layout
    from texq.run.records import pictures

    layout = Layout(out)
    src = source_file(out, stage)
    now = int(src.stat().st_mtime * 1000) if src is not None and src.exists() else 0
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
        # fp_top1 once: the teacher stage logged it (at its own time), and the logged model lists
        # every value of the run's metrics at step 0
        logged_fp = c.get_run(run_id).data.metrics.get("fp_top1")
        for k in ("top1", "top5", "correct", "n", "fp_top1", "train_seconds"):
            if k != "fp_top1" or logged_fp != float(r[k]):
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
        digest = file_digest(layout.metrics)
        c.set_tag(run_id, TRAINED_TAG, summary["fingerprint"])
        c.set_tag(run_id, METRICS_TAG, digest)
        if cfg is not None:
            for path in pictures(layout, cfg):
                c.log_artifact(run_id, str(path), "figures")
            if c.get_run(run_id).data.tags.get(MODEL_FOR_TAG) != digest:  # once per result
                log_quantized_model(c, run_id, layout.qmodel, cfg, register, r, digest)
                c.set_tag(run_id, MODEL_FOR_TAG, digest)
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
