"""Step ``train`` (steps 2-3, or ZeroQ's range calibration): the generator and the quantized model,
trained epoch by epoch with a checkpoint after each under ``.work/`` (a killed run resumes), then
``train/`` (``qmodel.pt``, ``generator.pt``, ``history.jsonl``, ``summary.json``) written as a whole
and ``history.json`` (dvc.yaml's loss plot). The final checkpoint is kept until the evaluate step
has read ``train/``: a rerun before then writes the outputs again without training."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from texq.data import real_batches
from texq.method.finetune import HISTORY_TERMS, Finetuner, Sources
from texq.method.generator import Generator
from texq.models import save_quantized
from texq.quant import calibrate, quantize
from texq.run.config import RunConfig, fingerprint
from texq.run.layout import Layout, train_file
from texq.run.methods import spec
from texq.util.device import memory_format, use_device
from texq.util.io import load_torch, save_torch, write_json

log = logging.getLogger("texq")


def step(cfg: RunConfig, model: nn.Module, layout: Layout, progress: bool = True) -> dict:
    """Train (or, for ZeroQ, calibrate the activation ranges of) Q from F = ``model`` and step
    1's file; resumes from ``.work/`` when a checkpoint of the same configuration is there."""
    start = time.perf_counter()
    work = layout.work(f"train-{fingerprint(cfg)}")
    work.mkdir(parents=True, exist_ok=True)
    qmodel, prior = _quantized_model(cfg, model, layout, work, progress)
    tmp = layout.work("train-out")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name in ("history", "generator"):
        if train_file(work, name).exists():
            shutil.copy2(train_file(work, name), train_file(tmp, name))
    save_quantized(train_file(tmp, "qmodel"), qmodel, {"method": cfg.method, "seed": cfg.seed})
    summary = {"fingerprint": fingerprint(cfg), "config": cfg.to_dict(),
               "seconds": round(prior + time.perf_counter() - start, 1)}
    write_json(train_file(tmp, "summary"), summary)
    shutil.rmtree(layout.train, ignore_errors=True)
    tmp.rename(layout.train)  # the whole folder appears at once
    # the final checkpoint stays until evaluate has read train/ (Layout.clear_work): a rerun of
    # this step before then (its outputs lost after a crash, DVC removing them to rerun a stage
    # whose recording failed) resumes after the last epoch and trains nothing again
    write_json(layout.history_plot, plot_rows(layout.history))
    return {"step": "train", "seconds": summary["seconds"]}


def _quantized_model(cfg: RunConfig, fp_model: nn.Module, layout: Layout, work: Path,
                     progress: bool) -> tuple[nn.Module, float]:
    """Q, and the seconds spent in earlier sessions; ``generator.pt`` and ``history.jsonl`` go to
    ``work`` beside the per-epoch checkpoint."""
    torch.manual_seed(cfg.seed)
    device = use_device(cfg.device, cfg.tf32)
    method = spec(cfg)
    info = fp_model.texq_info
    nhwc = memory_format(cfg.channels_last, device, cfg.tf32)
    fp_model = fp_model.to(device, memory_format=nhwc)
    qmodel = quantize(fp_model, cfg.quant_config())
    if not method.fine_tunes:  # ZeroQ: ranges from step 1's images, nothing trained
        images = layout.step1_images()
        calibrate(qmodel, images.to(device).split(cfg.distill.batch_size), device=device)
        return qmodel, 0.0
    sources = Sources()
    if method.uses_calibration_set:
        calib = layout.calibration_set()
        sources.calib_images, sources.calib_labels = calib.images.to(device), calib.labels.to(device)
        sources.centers = [type(c)(c.mean.to(device), c.var.to(device)) for c in calib.centers]
    if method.real_images:
        sources.real = real_batches(cfg.train_data, info, cfg.finetune.batch_size)
    else:
        sources.generator = Generator.for_model(info, cfg.generator.latent_dim).to(
            device, memory_format=nhwc)
    tuner = Finetuner(fp_model, qmodel, sources, cfg.generator, cfg.finetune, cfg.mkd, device,
                      cfg.bns_norm, cfg.cuda_graphs, precision=cfg.precision, compile=cfg.compile)
    try:
        prior = _train(tuner, train_file(work, "checkpoint"), train_file(work, "history"), progress)
    finally:
        tuner.close()
    if sources.generator is not None:
        save_torch(train_file(work, "generator"), sources.generator.state_dict())
    return qmodel, prior


def _train(tuner: Finetuner, ckpt: Path, history: Path, progress: bool) -> float:
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
    per_epoch = tuner.fcfg.iters_per_epoch
    bar = tqdm(total=tuner.total_epochs * per_epoch, initial=first * per_epoch, desc="steps 2-3: G and Q",
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


def plot_rows(history: Path) -> list[dict]:
    """The history as one JSON array for dvc.yaml's loss plot: every row with the same columns
    (DVC plots rows only when all share their keys), null where a term is absent (G's warm-up has
    no Q terms, GDFQ no center terms, the real-data run no G terms)."""
    rows = [json.loads(line) for line in history.read_text().splitlines() if line] if history.exists() else []
    return [{"epoch": r["epoch"], "phase": r["phase"], "quantized/lr": r.get("quantized/lr"),
             **{t: r.get(t) for t in HISTORY_TERMS}} for r in rows]
