"""Stage ``train``: steps 2-3 -> ``train/`` (``qmodel.pt``, ``generator.pt``, ``history.jsonl``,
``summary.json``) and ``history.json`` (the same history, the data of dvc.yaml's loss plot), written as a whole; each epoch checkpoints under ``<out>/.work/`` so that a
rerun after a kill resumes."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from texq.artifacts import save_quantized
from texq.config import fingerprint
from texq.finetune import HISTORY_TERMS
from texq.io import write_json
from texq.models import create_model
from texq.pipeline.params import stage_config
from texq.training import train_stage


def run(params_file, out: Path, device: str = "auto", progress: bool = True) -> dict:
    cfg = stage_config(params_file, device)
    model = create_model(cfg.model, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint)
    start = time.perf_counter()
    work = out / ".work" / f"train-{fingerprint(cfg)}"  # checkpoint and history: a rerun resumes
    work.mkdir(parents=True, exist_ok=True)
    qmodel, _, prior = train_stage(cfg, model, out / "step1.pt", work, work, progress)
    tmp = out / ".work" / "train-out"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name in ("history.jsonl", "generator.pt"):
        if (work / name).exists():
            (work / name).rename(tmp / name)
    save_quantized(tmp / "qmodel.pt", qmodel, {"method": cfg.method, "seed": cfg.seed})
    summary = {"fingerprint": fingerprint(cfg), "config": cfg.to_dict(),
               "seconds": round(prior + time.perf_counter() - start, 1)}
    write_json(tmp / "summary.json", summary)
    folder = out / "train"
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)  # the whole folder appears at once
    shutil.rmtree(work, ignore_errors=True)
    write_json(out / "history.json", plot_rows(folder / "history.jsonl"))
    return {"stage": "train", "seconds": summary["seconds"]}


def plot_rows(history: Path) -> list[dict]:
    """The history as one JSON array for dvc.yaml's loss plot: every row with the same columns
    (DVC plots rows only when all share their keys), null where a term is absent (G's warm-up has
    no Q terms, GDFQ no center terms, the real-data run no G terms)."""
    rows = [json.loads(line) for line in history.read_text().splitlines() if line] if history.exists() else []
    return [{"epoch": r["epoch"], "phase": r["phase"], "quantized/lr": r.get("quantized/lr"),
             **{t: r.get(t) for t in HISTORY_TERMS}} for r in rows]
