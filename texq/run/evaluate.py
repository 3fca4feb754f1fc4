"""Step ``evaluate``: the final scores of a run -> ``metrics.json``: top-1 of the final-epoch
quantized model (never a best-of-test epoch) and per-class top-1 on the evaluation set, F's top-1
(from ``teacher.json`` when scored on the same model and data), the settings in effect, and the
texture statistics of step 1's images and of the generator's samples; ``per_class.json`` holds the
per-class scores as dvc.yaml's plot reads them."""

from __future__ import annotations

import torch
from torch import nn

from texq.data import class_names, load_eval_data
from texq.eval import evaluate
from texq.method.generator import Generator
from texq.method.texture import dominant_count, dominant_set, texture_energy
from texq.models import load_quantized
from texq.run.config import RunConfig
from texq.run.layout import Layout
from texq.run.methods import SWITCHES, effective_settings, spec
from texq.run.teacher import teacher_top1
from texq.util.device import use_device
from texq.util.io import load_torch, read_json, write_json


def step(cfg: RunConfig, model: nn.Module, layout: Layout, progress: bool = True,
         batch_size: int = 256, data=None) -> dict:
    """Score the run's ``train/qmodel.pt`` (F = ``model``; ``data``: the evaluation set when
    already loaded) and write ``metrics.json`` and ``per_class.json``."""
    info = model.texq_info
    if data is None:
        data = load_eval_data(cfg.data, info)
    summary = read_json(layout.summary)
    dev = use_device(cfg.device, cfg.tf32)
    qmodel = load_quantized(layout.qmodel, model=model).to(dev)
    metrics = scores(cfg, model.to(dev), qmodel, data, progress, batch_size,
                     fp_top1=teacher_top1(layout, cfg, len(data)))
    generator = None
    if layout.generator.exists():
        generator = Generator.for_model(info, cfg.generator.latent_dim)
        generator.load_state_dict(load_torch(layout.generator))
        generator.to(dev)
    torch.manual_seed(cfg.seed)
    metrics.update(texture_report(cfg, info, layout, generator))
    metrics["train_seconds"] = summary["seconds"]
    # the evaluation set's class names, else the class indices: what every later view titles with
    labels = class_names(cfg.data, data) or [str(i) for i in range(len(metrics["per_class_top1"]))]
    metrics["class_names"] = labels
    write_json(layout.per_class, [  # dvc.yaml's per-class plot: one row per class
        {"class": c, "top1": v} for c, v in zip(labels, metrics["per_class_top1"]) if v is not None])
    write_json(layout.metrics, metrics)
    layout.clear_work()  # the run is scored: train's kept checkpoint is no longer needed
    return metrics


def scores(cfg: RunConfig, fp_model, qmodel, eval_data, progress: bool = True,
           batch_size: int = 256, fp_top1: float | None = None) -> dict:
    """Top-1 of the final quantized model (and of F, unless its ``fp_top1`` on the same evaluation
    set is given) on the evaluation set, with the run's settings in effect."""
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


def texture_summary(images: torch.Tensor, cfg: RunConfig, info) -> dict:
    t = texture_energy(images, cfg.calibration.texture, info.mean, info.std)
    top = dominant_set(t, cfg.calibration.laws.k)
    counts = dominant_count(t, cfg.calibration.texture.share).float()
    return {"dominant_median": float(counts.median()), "k_max_mean": float(top[:, 0].mean()),
            "k_rest_mean": float((top.sum(1) - top[:, 0]).mean())}


def texture_report(cfg: RunConfig, info, layout: Layout, generator: Generator | None,
                   n_generated: int = 256, batch_size: int = 64) -> dict:
    """Texture statistics of step 1's images and of ``n_generated`` generator samples
    (training-mode BN, the distribution Q was trained on, in batches of ``batch_size``)."""
    out: dict = {}
    if spec(cfg).step1 is not None:
        out["texture"] = texture_summary(layout.step1_images(), cfg, info)
    if generator is not None:
        samples = generator.training_samples(n_generated, batch_size)
        out["texture_generated"] = texture_summary(samples, cfg, info)
    return out
