"""The final scores of a run: top-1 of the final-epoch quantized model (and of F) on the
evaluation set, with the settings in effect, and texture statistics of its synthetic images."""

from __future__ import annotations

from pathlib import Path

import torch

from texq.config import SWITCHES, RunConfig
from texq.device import use_device
from texq.eval import evaluate
from texq.generator import Generator
from texq.io import load_torch
from texq.methods import effective_settings
from texq.texture import dominant_count, dominant_set, texture_energy


def texture_summary(images: torch.Tensor, cfg: RunConfig, info) -> dict:
    t = texture_energy(images, cfg.calibration.texture, info.mean, info.std)
    top = dominant_set(t, cfg.calibration.laws.k)
    counts = dominant_count(t, cfg.calibration.texture.share).float()
    return {"dominant_median": float(counts.median()), "k_max_mean": float(top[:, 0].mean()),
            "k_rest_mean": float((top.sum(1) - top[:, 0]).mean())}


def texture_report(cfg: RunConfig, info, pre: Path | None, generator: Generator | None,
                   n_generated: int = 256, batch_size: int = 64) -> dict:
    """Texture statistics of the step-1 images (``pre``) and of ``n_generated`` generator samples
    (training-mode BN, the distribution Q was trained on, in batches of ``batch_size``)."""
    out: dict = {}
    if pre is not None and cfg.method in ("texq", "zeroq"):
        out["texture"] = texture_summary(load_torch(pre)["images"], cfg, info)
    if generator is not None:
        samples = generator.training_samples(n_generated, batch_size)
        out["texture_generated"] = texture_summary(samples, cfg, info)
    return out


def evaluate_stage(cfg: RunConfig, fp_model, qmodel, eval_data, progress: bool = True,
                   batch_size: int = 256, fp_top1: float | None = None) -> dict:
    """Score the final quantized model (and F, unless its ``fp_top1`` on the same evaluation set
    is given) on the evaluation set (final score only)."""
    device = use_device(cfg.device, cfg.tf32)
    effective = effective_settings(cfg)
    result = evaluate(qmodel, eval_data, batch_size=batch_size, device=device, progress=progress)
    if fp_top1 is None:
        fp_top1 = evaluate(fp_model, eval_data, batch_size=batch_size, device=device,
                           progress=progress).top1
    return {"model": cfg.model, "data": cfg.data, "method": cfg.method, "profile": cfg.profile,
            "w_bits": cfg.w_bits, "a_bits": cfg.a_bits, "seed": cfg.seed,
            **{s: effective[s] for s in SWITCHES},  # as applied (None: the method has no such module)
            **result.to_dict(), "fp_top1": round(fp_top1, 4), "device": str(device),
            "per_class_top1": result.per_class_top1()}
