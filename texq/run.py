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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda: no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"device={name!r}: expected auto, cpu or cuda")
    return torch.device(name)


def fingerprint(cfg: RunConfig) -> str:
    """What identifies a run's results (the device does not)."""
    d = cfg.to_dict()
    d.pop("device")
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
    device = resolve_device(cfg.device)
    fp_model = create_model(cfg.model, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint)
    info = fp_model.texq_info
    eval_data = load_eval_data(cfg.data, info)  # fail on bad data before the long work
    _prepare_out(out, cfg)
    if (out / "metrics.json").exists():
        log.info("%s already holds a finished run", out)
        return json.loads((out / "metrics.json").read_text())
    torch.manual_seed(cfg.seed)
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    fp_model = fp_model.to(device, memory_format=layout)
    qmodel = quantize(fp_model, cfg.quant)
    extra: dict = {}
    prior_seconds = 0.0

    if cfg.method == "zeroq":
        path = out / "distilled.pt"
        if path.exists():
            images = load_torch(path)["images"]
        else:
            images = distill_images(fp_model, cfg.distill, device, cfg.seed, progress, cfg.bns_norm)
            save_torch(path, {"images": images.cpu()})
        calibrate(qmodel, images.to(device).split(cfg.distill.batch_size), device=device)
        extra["texture"] = texture_summary(images.cpu(), cfg, info)
    else:
        sources = Sources()
        gcfg = cfg.generator
        if cfg.method == "texq":
            path = out / "calibration.pt"
            if path.exists():
                calib = load_calibration(path)
            else:
                calib = synthesize(fp_model, cfg.calibration, cfg.laws, cfg.layered_bns, device,
                                   cfg.seed, progress, cfg.bns_norm)
                save_calibration(path, calib)
            sources.calib_images, sources.calib_labels = calib.images.to(device), calib.labels.to(device)
            sources.centers = [type(c)(c.mean.to(device), c.var.to(device)) for c in calib.centers]
            extra["texture"] = texture_summary(calib.images, cfg, info)
        elif cfg.method == "gdfq":
            gcfg = replace(gcfg, alpha3=0.1, alpha4=0.0, alpha5=0.0)  # GDFQ: CE + 0.1 * BNS
        if cfg.method == "real":
            sources.real = _real_batches(cfg, info, cfg.finetune.batch_size)
        else:
            sources.generator = Generator(info.num_classes, info.input_size, gcfg.latent_dim,
                                          conditional_bn=info.dataset == "imagenet"
                                          ).to(device, memory_format=layout)
        mkd = cfg.mkd and cfg.method != "gdfq"
        tuner = Finetuner(fp_model, qmodel, sources, gcfg, cfg.finetune, mkd, device, cfg.bns_norm)
        prior_seconds = _train(tuner, cfg, out, progress)
        if sources.generator is not None:
            save_torch(out / "generator.pt", sources.generator.state_dict())
            with torch.no_grad():  # training-mode BN: the distribution Q was trained on
                g = sources.generator.train()
                bs = cfg.finetune.batch_size  # batches of the training size: memory as in training
                samples = torch.cat([g.sample(min(bs, 256 - i), device)[0].cpu()
                                     for i in range(0, 256, bs)])
            extra["texture_generated"] = texture_summary(samples, cfg, info)

    result = evaluate(qmodel, eval_data, device=device, progress=progress)
    fp_result = evaluate(fp_model, eval_data, device=device, progress=progress)
    save_quantized(out / "qmodel.pt", qmodel, {"method": cfg.method, "seed": cfg.seed})
    metrics = {"model": cfg.model, "data": cfg.data, "method": cfg.method, "profile": cfg.profile,
               "w_bits": cfg.w_bits, "a_bits": cfg.a_bits, "seed": cfg.seed,
               "laws": cfg.laws, "layered_bns": cfg.layered_bns, "mkd": cfg.mkd,
               **result.to_dict(), "fp_top1": round(fp_result.top1, 4), "device": str(device),
               "seconds": round(prior_seconds + time.perf_counter() - start, 1), **extra}
    write_json(out / "metrics.json", metrics)
    return metrics


def _train(tuner: Finetuner, cfg: RunConfig, out: Path, progress: bool) -> float:
    """Epoch loop with a checkpoint after each epoch; returns seconds spent in earlier sessions."""
    ckpt, history = out / "checkpoint.pt", out / "history.jsonl"
    first, prior = 0, 0.0
    if ckpt.exists():
        state = load_torch(ckpt)
        tuner.load_state_dict(state["tuner"])
        torch.set_rng_state(state["rng"])
        if torch.cuda.is_available() and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        first, prior = state["epoch"], state["seconds"]
        log.info("resuming %s after epoch %d of %d", out, first, tuner.total_epochs)
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
