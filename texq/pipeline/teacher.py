"""Stage ``teacher``: the full-precision model's top-1 on the evaluation set -> ``teacher.json``."""

from __future__ import annotations

import json
from pathlib import Path

from texq.config import RunConfig
from texq.data import load_eval_data
from texq.device import use_device
from texq.eval import evaluate
from texq.io import write_json
from texq.models import create_model
from texq.pipeline.params import read_stage_params


def run(params_file, out: Path, device: str = "auto", progress: bool = True) -> dict:
    cfg, batch_size = read_stage_params(params_file, device)
    model = create_model(cfg.model, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint)
    data = load_eval_data(cfg.data, model.texq_info)
    res = evaluate(model, data, batch_size=batch_size, device=use_device(cfg.device, cfg.tf32),
                   progress=progress)
    result = {**teacher_source(cfg), **res.to_dict(), "per_class_top1": res.per_class_top1()}
    write_json(out / "teacher.json", result)
    return result


def teacher_source(cfg: RunConfig) -> dict:
    """What teacher.json's score is of: evaluate reuses it only for the same model and data."""
    return {"model": cfg.model, "data": cfg.data, "checkpoint": cfg.checkpoint,
            "pretrained": cfg.pretrained}


def teacher_top1(out: Path, cfg: RunConfig, n: int) -> float | None:
    try:
        t = json.loads((out / "teacher.json").read_text())
    except (OSError, ValueError):
        return None
    same = all(t.get(k) == v for k, v in teacher_source(cfg).items()) and t.get("n") == n
    return t["top1"] if same else None
