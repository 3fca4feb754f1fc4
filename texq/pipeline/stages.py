"""The pipeline's stages (``dvc.yaml``): each reads ``params.yaml``, calls ``texq``, writes its outs.

    teacher    the full-precision model on the evaluation set        -> teacher.json
    calibrate  step 1: calibration set and centers (ZeroQ: distilled) -> step1.pt
    train      steps 2-3: generator and quantized model             -> train/ (qmodel.pt, ...)
    evaluate   final-epoch top-1, per-class top-1, texture stats    -> metrics.json

Each stage's results equal those of ``texq run`` with the same configuration: the same functions
run in the same order with the same seeds. Outputs are written atomically; ``train`` checkpoints
each epoch under ``<out>/.work/`` (not a DVC out) and a rerun after a kill resumes from there.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from texq.artifacts import load_quantized, save_quantized, save_torch
from texq.config import RunConfig
from texq.data import load_eval_data
from texq.eval import evaluate
from texq.generator import Generator
from texq.io import write_json
from texq.models import create_model
from texq.pipeline.params import eval_batch_size, load_params, run_config
from texq.device import use_device
from texq.run import (evaluate_stage, fingerprint, synthesize_stage,
                      texture_report, train_stage)

log = logging.getLogger("texq")
STAGES = ("teacher", "calibrate", "train", "evaluate")


def _read(params_file: str | Path, device: str) -> tuple[RunConfig, int]:
    """The stage's RunConfig and evaluation batch size, from one read of the params file."""
    params = load_params(params_file)
    cfg = replace(run_config(params, str(params_file)), device=device)
    return cfg, eval_batch_size(params, str(params_file))


def stage_config(params_file: str | Path, device: str = "auto") -> RunConfig:
    return _read(params_file, device)[0]


def teacher(params_file, out: Path, device: str = "auto", progress: bool = True) -> dict:
    cfg, batch_size = _read(params_file, device)
    model = create_model(cfg.model, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint)
    data = load_eval_data(cfg.data, model.texq_info)
    res = evaluate(model, data, batch_size=batch_size, device=use_device(cfg.device, cfg.tf32),
                   progress=progress)
    result = {**_teacher_source(cfg), **res.to_dict(), "per_class_top1": res.per_class_top1()}
    write_json(out / "teacher.json", result)
    return result


def _teacher_source(cfg: RunConfig) -> dict:
    """What teacher.json's score is of: evaluate reuses it only for the same model and data."""
    return {"model": cfg.model, "data": cfg.data, "checkpoint": cfg.checkpoint,
            "pretrained": cfg.pretrained}


def _teacher_top1(out: Path, cfg: RunConfig, n: int) -> float | None:
    try:
        t = json.loads((out / "teacher.json").read_text())
    except (OSError, ValueError):
        return None
    same = all(t.get(k) == v for k, v in _teacher_source(cfg).items()) and t.get("n") == n
    return t["top1"] if same else None


def calibrate(params_file, out: Path, device: str = "auto", progress: bool = True) -> dict:
    cfg = stage_config(params_file, device)
    model = create_model(cfg.model, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint)
    start = time.perf_counter()
    if cfg.method in ("texq", "zeroq"):
        synthesize_stage(cfg, model, out / "step1.pt", progress)
    else:  # gdfq / real: no step 1; an explicit empty output keeps the DAG uniform
        save_torch(out / "step1.pt", {"method": cfg.method, "images": None})
    return {"stage": "calibrate", "method": cfg.method, "seconds": round(time.perf_counter() - start, 1)}


def train(params_file, out: Path, device: str = "auto", progress: bool = True) -> dict:
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
    return {"stage": "train", "seconds": summary["seconds"]}


def evaluate_(params_file, out: Path, device: str = "auto", progress: bool = True) -> dict:
    cfg, batch_size = _read(params_file, device)
    fp_model = create_model(cfg.model, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint)
    info = fp_model.texq_info
    data = load_eval_data(cfg.data, info)
    folder = out / "train"
    summary = json.loads((folder / "summary.json").read_text())
    dev = use_device(cfg.device, cfg.tf32)
    qmodel = load_quantized(folder / "qmodel.pt").to(dev)
    metrics = evaluate_stage(cfg, fp_model.to(dev), qmodel, data, progress, batch_size,
                             fp_top1=_teacher_top1(out, cfg, len(data)))
    generator = None
    if (folder / "generator.pt").exists():
        generator = Generator.for_model(info, cfg.generator.latent_dim)
        generator.load_state_dict(torch.load(folder / "generator.pt", weights_only=True))
        generator.to(dev)
    torch.manual_seed(cfg.seed)
    metrics.update(texture_report(cfg, info, out / "step1.pt", generator))
    metrics["train_seconds"] = summary["seconds"]
    write_json(out / "metrics.json", metrics)
    return metrics


RUNNERS = {"teacher": teacher, "calibrate": calibrate, "train": train, "evaluate": evaluate_}


def run_stage(name: str, params_file="params.yaml", out="out/pipeline", device: str = "auto",
              progress: bool = True) -> dict:
    """Run one stage by name (what ``texq stage NAME`` and the Prefect tasks call)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log.info("stage %s: %s -> %s", name, params_file, out)
    return RUNNERS[name](params_file, out, device, progress)
