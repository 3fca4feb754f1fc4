"""Steps 2-3 of a run (or ZeroQ's range calibration): the generator and the quantized model,
trained epoch by epoch with a checkpoint after each, so that a killed run resumes."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from texq.artifacts import load_calibration, save_torch
from texq.config import RunConfig
from texq.data import load_eval_data
from texq.device import memory_format, use_device
from texq.finetune import Finetuner, Sources
from texq.generator import Generator
from texq.io import load_torch
from texq.methods import applied
from texq.quant import calibrate, quantize

log = logging.getLogger("texq")


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
    cfg = applied(cfg)  # the method's fixed settings (GDFQ: CE + 0.1 BNS, plain KD)
    sources = Sources()
    if cfg.method == "texq":
        calib = load_calibration(pre)
        sources.calib_images, sources.calib_labels = calib.images.to(device), calib.labels.to(device)
        sources.centers = [type(c)(c.mean.to(device), c.var.to(device)) for c in calib.centers]
    if cfg.method == "real":
        sources.real = _real_batches(cfg, info, cfg.finetune.batch_size)
    else:
        sources.generator = Generator.for_model(info, cfg.generator.latent_dim).to(
            device, memory_format=layout)
    tuner = Finetuner(fp_model, qmodel, sources, cfg.generator, cfg.finetune, cfg.mkd, device,
                      cfg.bns_norm, cfg.cuda_graphs)
    prior = _train(tuner, cfg, work / "checkpoint.pt", out / "history.jsonl", progress)
    if sources.generator is not None:
        save_torch(out / "generator.pt", sources.generator.state_dict())
    return qmodel, sources.generator, prior


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
