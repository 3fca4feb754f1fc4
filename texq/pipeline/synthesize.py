"""Stage ``synthesize``: step 1, TexQ's calibration set and centers (ZeroQ: distilled images)
-> ``step1.pt``; an explicit empty file for the methods without step 1."""

from __future__ import annotations

import time
from pathlib import Path

from texq.artifacts import save_torch
from texq.models import create_model
from texq.pipeline.params import stage_config
from texq.step1 import synthesize_stage


def run(params_file, out: Path, device: str = "auto", progress: bool = True) -> dict:
    cfg = stage_config(params_file, device)
    model = create_model(cfg.model, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint)
    start = time.perf_counter()
    if cfg.method in ("texq", "zeroq"):
        synthesize_stage(cfg, model, out / "step1.pt", progress)
    else:  # gdfq / real: no step 1; an explicit empty output keeps the DAG uniform
        save_torch(out / "step1.pt", {"method": cfg.method, "images": None})
    return {"stage": "synthesize", "method": cfg.method, "seconds": round(time.perf_counter() - start, 1)}
