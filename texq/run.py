"""``texq.run(config)``: one full quantization run (TexQ or a baseline), resumable.

Stages and their files under ``out``:
  config.json         the run's configuration (a rerun must match it)
  calibration.pt      step 1: calibration images, labels and per-class centers   (texq)
  distilled.pt        ZeroQ's BNS-distilled images                                  (zeroq)
  checkpoint.pt       steps 2-3 state after the last completed epoch (G, Q, optimisers, RNG)
  history.jsonl       one line of loss terms per epoch
  generator.pt        the trained generator
  qmodel.pt           the quantized model of the final epoch
  metrics.json        final-epoch top-1 on the evaluation set (never a best-of-test epoch)
Test images are read for the final score only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from texq.artifacts import (load_calibration, save_calibration, save_quantized, save_torch)
from texq.calibration import synthesize
from texq.config import RunConfig
from texq.data import load_eval_data
from texq.device import memory_format, use_device
from texq.distill import distill_images
from texq.errors import ConfigError
from texq.eval import evaluate
from texq.finetune import Finetuner, Sources
from texq.generator import Generator
from texq.io import load_torch, write_json
from texq.models import create_model
from texq.quant import calibrate, quantize
from texq.texture import dominant_count, dominant_set, texture_energy

log = logging.getLogger("texq")


def fingerprint(cfg: RunConfig) -> str:
    """What identifies a run's results (the device and the speed-only settings do not)."""
    d = cfg.to_dict()
    for speed_only in ("device", "cuda_graphs", "channels_last"):  # same maths either way
        d.pop(speed_only)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _prepare_out(out: Path, cfg: RunConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.json"
    fp = fingerprint(cfg)
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("fingerprint") != fp:
            raise ConfigError(f"{out} holds a run with another configuration (fingerprint "
                              f"{old.get('fingerprint')} vs {fp}): use another --out or delete it")
    else:
        write_json(path, {"fingerprint": fp, "config": cfg.to_dict()})


def texture_summary(images: torch.Tensor, cfg: RunConfig, info) -> dict:
    t = texture_energy(images, cfg.calibration.texture, info.mean, info.std)
    top = dominant_set(t, cfg.calibration.laws.k)
    counts = dominant_count(t, cfg.calibration.texture.share).float()
    return {"dominant_median": float(counts.median()), "k_max_mean": float(top[:, 0].mean()),
            "k_rest_mean": float((top.sum(1) - top[:, 0]).mean())}


def _real_batches(cfg: RunConfig, info, batch_size: int):
    """Endless random batches of real training images (random crop with 4-pixel padding and
    flip), drawn from torch's global RNG so that a resumed run draws the same batches."""
    from torchvision.transforms import v2

    data = load_eval_data(cfg.train_data, info, train=True)  # cifar10/100: the training split
    size = info.input_size
    tf = v2.Compose([v2.RandomCrop(size, padding=size // 8), v2.RandomHorizontalFlip()])
    while True:
        idx = torch.randperm(len(data))[:batch_size].tolist()
        items = [data[i] for i in idx]
        yield torch.stack([tf(x) for x, _ in items]), torch.tensor([y for _, y in items])


def run(cfg: RunConfig, out: str | Path, progress: bool = True) -> dict:
    """Run ``cfg`` writing into ``out``; resumes from what ``out`` already holds."""
    start = time.perf_counter()
    out = Path(out)
    fp_model = create_model(cfg.model, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint)
    eval_data = load_eval_data(cfg.data, fp_model.texq_info)  # fail on bad data before the long work
    _prepare_out(out, cfg)
    if (out / "metrics.json").exists():
        log.info("%s already holds a finished run", out)
        return json.loads((out / "metrics.json").read_text())
    pre = out / ("distilled.pt" if cfg.method == "zeroq" else "calibration.pt")
    if cfg.method in ("texq", "zeroq") and not pre.exists():
        synthesize_stage(cfg, fp_model, pre, progress)
    qmodel, generator, prior = train_stage(cfg, fp_model, pre, out, out, progress)
    save_quantized(out / "qmodel.pt", qmodel, {"method": cfg.method, "seed": cfg.seed})
    metrics = evaluate_stage(cfg, fp_model, qmodel, eval_data, progress)
    metrics.update(texture_report(cfg, fp_model.texq_info, pre, generator))
    metrics["seconds"] = round(prior + time.perf_counter() - start, 1)
    write_json(out / "metrics.json", metrics)
    return metrics


def synthesize_stage(cfg: RunConfig, fp_model, dest: Path, progress: bool = True) -> None:
    """Step 1 (``texq``: calibration images and centers) or ZeroQ's distilled images -> ``dest``.
    Every random draw comes from a generator seeded with ``cfg.seed`` (the global RNG is untouched)."""
    device = use_device(cfg.device, cfg.tf32)
    fp_model = fp_model.to(device, memory_format=memory_format(cfg.channels_last, device, cfg.tf32))
    if cfg.method == "zeroq":
        images = distill_images(fp_model, cfg.distill, device, cfg.seed, progress, cfg.bns_norm)
        save_torch(dest, {"images": images.cpu()})
    elif cfg.method == "texq":
        calib = synthesize(fp_model, cfg.calibration, cfg.laws, cfg.layered_bns, device,
                           cfg.seed, progress, cfg.bns_norm, cfg.cuda_graphs)
        save_calibration(dest, calib)
    else:
        raise ConfigError(f"method {cfg.method!r} has no step 1: no calibration set to synthesize")


def train_stage(cfg: RunConfig, fp_model, pre: Path, out: Path, work: Path,
                progress: bool = True) -> tuple:
    """Steps 2-3 (or ZeroQ's range calibration): returns (qmodel, the generator or None, seconds
    spent in earlier sessions). Writes ``generator.pt`` and ``history.jsonl`` to ``out``; the per-epoch
    checkpoint goes to ``work`` (a rerun with the same ``work`` resumes). ``pre`` is the output of
    ``synthesize_stage`` for ``texq`` and ``zeroq``."""
    torch.manual_seed(cfg.seed)
    device = use_device(cfg.device, cfg.tf32)
    info = fp_model.texq_info
    layout = memory_format(cfg.channels_last, device, cfg.tf32)
    fp_model = fp_model.to(device, memory_format=layout)
    qmodel = quantize(fp_model, cfg.quant)
    if cfg.method == "zeroq":
        images = load_torch(pre)["images"]
        calibrate(qmodel, images.to(device).split(cfg.distill.batch_size), device=device)
        return qmodel, None, 0.0
    sources = Sources()
    gcfg = cfg.generator
    if cfg.method == "texq":
        calib = load_calibration(pre)
        sources.calib_images, sources.calib_labels = calib.images.to(device), calib.labels.to(device)
        sources.centers = [type(c)(c.mean.to(device), c.var.to(device)) for c in calib.centers]
    elif cfg.method == "gdfq":
        gcfg = replace(gcfg, alpha3=0.1, alpha4=0.0, alpha5=0.0)  # GDFQ: CE + 0.1 * BNS
    if cfg.method == "real":
        sources.real = _real_batches(cfg, info, cfg.finetune.batch_size)
    else:
        sources.generator = Generator.for_model(info, gcfg.latent_dim).to(device, memory_format=layout)
    mkd = cfg.mkd and cfg.method != "gdfq"
    tuner = Finetuner(fp_model, qmodel, sources, gcfg, cfg.finetune, mkd, device, cfg.bns_norm,
                      cfg.cuda_graphs)
    prior = _train(tuner, cfg, work / "checkpoint.pt", out / "history.jsonl", progress)
    if sources.generator is not None:
        save_torch(out / "generator.pt", sources.generator.state_dict())
    return qmodel, sources.generator, prior


def texture_report(cfg: RunConfig, info, pre: Path | None, generator: Generator | None,
                   n_generated: int = 256, batch_size: int = 64) -> dict:
    """Texture statistics of the step-1 images (``pre``) and of ``n_generated`` generator samples
    (training-mode BN, the distribution Q was trained on, in batches of ``batch_size``)."""
    out: dict = {}
    if pre is not None and cfg.method in ("texq", "zeroq"):
        out["texture"] = texture_summary(load_torch(pre)["images"], cfg, info)
    if generator is not None:
        device = next(generator.parameters()).device
        with torch.no_grad():
            g = generator.train()
            samples = torch.cat([g.sample(min(batch_size, n_generated - i), device)[0].cpu()
                                 for i in range(0, n_generated, batch_size)])
        out["texture_generated"] = texture_summary(samples, cfg, info)
    return out


def evaluate_stage(cfg: RunConfig, fp_model, qmodel, eval_data, progress: bool = True,
                   batch_size: int = 256, fp_top1: float | None = None) -> dict:
    """Score the final quantized model (and F, unless its ``fp_top1`` on the same evaluation set
    is given) on the evaluation set (final score only)."""
    device = use_device(cfg.device, cfg.tf32)
    result = evaluate(qmodel, eval_data, batch_size=batch_size, device=device, progress=progress)
    if fp_top1 is None:
        fp_top1 = evaluate(fp_model, eval_data, batch_size=batch_size, device=device,
                           progress=progress).top1
    return {"model": cfg.model, "data": cfg.data, "method": cfg.method, "profile": cfg.profile,
            "w_bits": cfg.w_bits, "a_bits": cfg.a_bits, "seed": cfg.seed,
            "laws": cfg.laws, "layered_bns": cfg.layered_bns, "mkd": cfg.mkd,
            **result.to_dict(), "fp_top1": round(fp_top1, 4), "device": str(device),
            "per_class_top1": result.per_class_top1()}


def _train(tuner: Finetuner, cfg: RunConfig, ckpt: Path, history: Path, progress: bool) -> float:
    """Epoch loop with a checkpoint after each epoch; returns seconds spent in earlier sessions."""
    first, prior = 0, 0.0
    if ckpt.exists():
        state = load_torch(ckpt)
        tuner.load_state_dict(state["tuner"])
        torch.set_rng_state(state["rng"])
        if torch.cuda.is_available() and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        first, prior = state["epoch"], state["seconds"]
        log.info("resuming from %s after epoch %d of %d", ckpt, first, tuner.total_epochs)
        _truncate_history(history, first)
    t0 = time.perf_counter()
    total = tuner.total_epochs * cfg.finetune.iters_per_epoch
    bar = tqdm(total=total, initial=first * cfg.finetune.iters_per_epoch, desc="steps 2-3: G and Q",
               disable=not progress)
    for epoch in range(first, tuner.total_epochs):
        row = tuner.run_epoch(epoch, bar)
        with open(history, "a") as f:
            f.write(json.dumps(row) + "\n")
        log.info("epoch %d/%d %s", epoch + 1, tuner.total_epochs,
                 " ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)))
        save_torch(ckpt, {"epoch": epoch + 1, "tuner": tuner.state_dict(),
                          "rng": torch.get_rng_state(),
                          "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                          "seconds": prior + time.perf_counter() - t0})
    bar.close()
    return prior


def _truncate_history(path: Path, epochs: int) -> None:
    """Keep the first ``epochs`` lines (an epoch logged but not checkpointed is redone)."""
    if path.exists():
        lines = path.read_text().splitlines()[:epochs]
        path.write_text("".join(line + "\n" for line in lines))
