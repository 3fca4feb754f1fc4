"""Step ``synthesize`` (step 1): what the method's table entry computes before training (TexQ's
calibration set and centers, Eq. 10; ZeroQ's distilled images) -> ``step1.pt``; an explicit
``{"images": None}`` for a method without step 1, so that every run has the same files."""

from __future__ import annotations

import time

from torch import nn

from texq.run.config import RunConfig
from texq.run.layout import Layout
from texq.run.methods import spec
from texq.util.device import memory_format, use_device
from texq.util.io import save_torch


def step(cfg: RunConfig, model: nn.Module, layout: Layout, progress: bool = True) -> dict:
    """Step 1 -> ``layout.step1``. Every random draw comes from a generator seeded with
    ``cfg.seed`` (the global RNG is untouched)."""
    start = time.perf_counter()
    compute = spec(cfg).step1
    if compute is None:
        save_torch(layout.step1, {"method": cfg.method, "images": None})
    else:
        device = use_device(cfg.device, cfg.tf32)
        model = model.to(device, memory_format=memory_format(cfg.channels_last, device, cfg.tf32))
        save_torch(layout.step1, compute(cfg, model, device, progress))
    return {"step": "synthesize", "method": cfg.method,
            "seconds": round(time.perf_counter() - start, 1)}
