"""Step 1 of a run: TexQ's calibration set (Eq. 10) and class centers, or ZeroQ's distilled
images, written to one file."""

from __future__ import annotations

from pathlib import Path

from texq.artifacts import save_calibration, save_torch
from texq.calibration import synthesize
from texq.config import RunConfig
from texq.device import memory_format, use_device
from texq.distill import distill_images
from texq.errors import ConfigError


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
