"""Step ``teacher``: the full-precision model's top-1 on the evaluation set -> ``teacher.json``."""

from __future__ import annotations

from torch import nn

from texq.data import load_eval_data
from texq.eval import evaluate
from texq.run.config import RunConfig
from texq.run.layout import Layout
from texq.util.device import use_device
from texq.util.io import read_json, write_json


def step(cfg: RunConfig, model: nn.Module, layout: Layout, progress: bool = True,
         batch_size: int = 256, data=None) -> dict:
    """Score F (``data``: the evaluation set when already loaded) and write ``teacher.json``."""
    if data is None:
        data = load_eval_data(cfg.data, model.texq_info)
    res = evaluate(model, data, batch_size=batch_size, device=use_device(cfg.device, cfg.tf32),
                   progress=progress)
    result = {**teacher_source(cfg), **res.to_dict(), "per_class_top1": res.per_class_top1()}
    write_json(layout.teacher, result)
    return result


def teacher_source(cfg: RunConfig) -> dict:
    """What teacher.json's score is of: evaluate reuses it only for the same model and data."""
    return {"model": cfg.model, "data": cfg.data, "checkpoint": cfg.checkpoint,
            "pretrained": cfg.pretrained}


def teacher_top1(layout: Layout, cfg: RunConfig, n: int) -> float | None:
    """F's top-1 from ``teacher.json`` if it was scored on the same model and data, else None."""
    try:
        t = read_json(layout.teacher)
    except (OSError, ValueError):
        return None
    same = all(t.get(k) == v for k, v in teacher_source(cfg).items()) and t.get("n") == n
    return t["top1"] if same else None
