"""Stage ``evaluate``: the final-epoch model's top-1 and per-class top-1, the settings in effect and
texture statistics -> ``metrics.json``, and per-class top-1 as ``per_class.json`` (a DVC plot)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from texq.artifacts import load_quantized
from texq.data import class_names, load_eval_data
from texq.device import use_device
from texq.generator import Generator
from texq.io import write_json
from texq.models import create_model
from texq.pipeline.params import read_stage_params
from texq.pipeline.teacher import teacher_top1
from texq.report import evaluate_stage, texture_report


def run(params_file, out: Path, device: str = "auto", progress: bool = True) -> dict:
    cfg, batch_size = read_stage_params(params_file, device)
    fp_model = create_model(cfg.model, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint)
    info = fp_model.texq_info
    data = load_eval_data(cfg.data, info)
    folder = out / "train"
    summary = json.loads((folder / "summary.json").read_text())
    dev = use_device(cfg.device, cfg.tf32)
    qmodel = load_quantized(folder / "qmodel.pt").to(dev)
    metrics = evaluate_stage(cfg, fp_model.to(dev), qmodel, data, progress, batch_size,
                             fp_top1=teacher_top1(out, cfg, len(data)))
    generator = None
    if (folder / "generator.pt").exists():
        generator = Generator.for_model(info, cfg.generator.latent_dim)
        generator.load_state_dict(torch.load(folder / "generator.pt", weights_only=True))
        generator.to(dev)
    torch.manual_seed(cfg.seed)
    metrics.update(texture_report(cfg, info, out / "step1.pt", generator))
    metrics["train_seconds"] = summary["seconds"]
    # the evaluation set's class names, else the class indices: what every later view titles with
    labels = class_names(cfg.data, data) or [str(i) for i in range(len(metrics["per_class_top1"]))]
    metrics["class_names"] = labels
    write_json(out / "per_class.json", [  # dvc.yaml's per-class plot: one row per class
        {"class": c, "top1": v} for c, v in zip(labels, metrics["per_class_top1"]) if v is not None])
    write_json(out / "metrics.json", metrics)
    return metrics
