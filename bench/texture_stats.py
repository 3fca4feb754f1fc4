"""Texture statistics (the paper's Fig. 6 measure) of real photos, synthetic and calibration images.

For each image set: the median and histogram of the number of dominant texture elements (fewest
top elements of T holding 80% of it), the mean K_max and the mean sum of the rest of K (top 9).

    python bench/texture_stats.py [--assets ../shared/assets] [--profile paper] [--seeds 0 1 2 3] [--run DIR]

Real images are 32x32 crops of the photographs bundled with scikit-learn and scikit-image (not
CIFAR test images). Every synthetic set is made as a run of ``--profile`` makes it, with that
profile's settings: BNS-only images are ZeroQ's distilled images of the shared ResNet-20 (seed 0);
the calibration images are TexQ's step 1 (one image per class), once per seed in ``--seeds`` (the
calibration sets of that many runs, pooled); ``--run`` adds 256 samples of a trained generator
(``generator.pt`` of a ``texq run`` folder) drawn as in training and as the run's own
``metrics.json`` measures them (train-mode BatchNorm, batches of 64).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from texq.data.photos import photo_crops
from texq.method.calibration import synthesize
from texq.method.distill import distill_images
from texq.method.generator import Generator
from texq.method.texture import (
    LawsLossConfig,
    dominant_count,
    dominant_set,
    laws_loss,
    texture_energy,
)
from texq.models import create_model
from texq.run.config import PROFILES, RunConfig

ROOT = Path(__file__).resolve().parents[1]


def summary(t: torch.Tensor) -> dict:
    counts = dominant_count(t)
    top = dominant_set(t, 9)
    return {"n": len(t), "dominant_median": float(counts.float().median()),
            "hist": np.bincount(counts.numpy(), minlength=17)[1:].tolist(),
            "k_max": round(float(top[:, 0].mean()), 3),
            "k_rest": round(float((top.sum(1) - top[:, 0]).mean()), 3),
            # share of images that L_LAWS (Eq. 6) leaves alone: both terms within their bounds
            "inside_bounds": round(float((laws_loss(t, LawsLossConfig()) == 0).float().mean()), 3),
            "laws_mean": round(float(laws_loss(t, LawsLossConfig()).mean()), 4)}  # mean excess over the bounds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--assets", default=os.environ.get("TEXQ_ASSETS", str(ROOT.parent / "shared" / "assets")))
    p.add_argument("--profile", default="paper", choices=PROFILES)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--run", help="a texq run folder whose generator.pt to sample")
    args = p.parse_args()
    start = time.perf_counter()
    torch.manual_seed(0)
    run_cfg = RunConfig.for_profile(args.profile, model="resnet20a_cifar10", checkpoint=str(
        Path(args.assets) / "cifar10" / "resnet20-12fca82f.th"), device="cpu")
    model = create_model(run_cfg.model, checkpoint=run_cfg.checkpoint)
    info = model.texq_info
    cfg = run_cfg.calibration.texture
    unit = replace(cfg, denormalize=False)
    sets = {"real photo crops": texture_energy(photo_crops(), unit),
            "Gaussian noise": texture_energy(torch.randn(256, 3, 32, 32), cfg, info.mean, info.std)}
    d = run_cfg.distill
    bns_only = distill_images(model, d, seed=0, progress=False)
    sets[f"BNS-only synthetic (ZeroQ, {d.iters} iterations)"] = texture_energy(bns_only, cfg, info.mean, info.std)
    c = run_cfg.calibration
    for laws in (False, True):
        images = torch.cat([synthesize(model, c, use_laws=laws, seed=seed, progress=False).images
                            for seed in args.seeds])
        name = (f"TexQ calibration images{'' if laws else ' without L_LAWS'} ({c.iters} iterations, "
                f"{len(args.seeds)} seeds)")
        sets[name] = texture_energy(images, cfg, info.mean, info.std)
    if args.run:
        g = Generator.for_model(info)
        g.load_state_dict(torch.load(Path(args.run) / "generator.pt", weights_only=True))
        sets["TexQ generator samples"] = texture_energy(g.training_samples(256, 64), cfg, info.mean, info.std)
    rows = {name: summary(t.detach()) for name, t in sets.items()}
    print("| images | n | dominant elements: median | histogram (1..16) | mean K_max | mean rest of K | inside L_LAWS bounds | mean L_LAWS |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r['n']} | {r['dominant_median']:.0f} | {r['hist']} | {r['k_max']:.3f} | {r['k_rest']:.3f} | {100 * r['inside_bounds']:.0f}% | {r['laws_mean']:.4f} |")
    print(f"(profile {args.profile}, seeds {args.seeds}; L_LAWS targets: K_max 0.3 +- 0.015, rest "
          f"0.5 +- 0.015; {time.perf_counter() - start:.0f} s)")
    print(json.dumps({"bench": "texture_stats", "profile": args.profile, "seeds": args.seeds, "rows": rows}))


if __name__ == "__main__":
    main()
