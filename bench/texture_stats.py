"""Texture statistics (the paper's Fig. 6 measure) of real photos, synthetic and calibration images.

For each image set: the median and histogram of the number of dominant texture elements (fewest
top elements of T holding 80% of it), the mean K_max and the mean sum of the rest of K (top 9).

    python bench/texture_stats.py [--assets ../shared/assets] [--calib-iters 1500] [--run DIR]

Real images are 32x32 crops of the photographs bundled with scikit-learn and scikit-image (not
CIFAR test images). BNS-only synthetic images are ZeroQ-distilled from the shared ResNet-20; the
calibration images are TexQ's step 1 with the paper's settings; ``--run`` adds the samples of a
trained generator (``generator.pt`` of a ``texq run`` folder).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from texq.calibration import synthesize
from texq.data.photos import photo_crops
from texq.config import CalibrationConfig, DistillConfig
from texq.distill import distill_images
from texq.generator import Generator
from texq.models import create_model
from texq.texture import LawsLossConfig, TextureConfig, dominant_count, dominant_set, laws_loss, texture_energy

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
    p.add_argument("--calib-iters", type=int, default=1500)
    p.add_argument("--distill-iters", type=int, default=500)
    p.add_argument("--images-per-class", type=int, default=4)
    p.add_argument("--run", help="a texq run folder whose generator.pt to sample")
    args = p.parse_args()
    start = time.perf_counter()
    torch.manual_seed(0)
    model = create_model("resnet20a_cifar10",
                         checkpoint=Path(args.assets) / "cifar10" / "resnet20-12fca82f.th")
    info = model.texq_info
    cfg = TextureConfig()
    unit = TextureConfig(denormalize=False)
    sets = {"real photo crops": texture_energy(photo_crops(), unit),
            "Gaussian noise": texture_energy(torch.randn(256, 3, 32, 32), cfg, info.mean, info.std)}
    bns_only = distill_images(model, DistillConfig(num_images=128, iters=args.distill_iters),
                              progress=False)
    sets["BNS-only synthetic (ZeroQ)"] = texture_energy(bns_only, cfg, info.mean, info.std)
    for laws in (False, True):
        ccfg = CalibrationConfig(iters=args.calib_iters, images_per_class=args.images_per_class)
        calib = synthesize(model, ccfg,
                           use_laws=laws, progress=False)
        name = "TexQ calibration images" + ("" if laws else " without L_LAWS")
        sets[name] = texture_energy(calib.images, cfg, info.mean, info.std)
    if args.run:
        g = Generator.for_model(info)
        g.load_state_dict(torch.load(Path(args.run) / "generator.pt", weights_only=True))
        with torch.no_grad():
            x, _ = g.eval().sample(256)
        sets["TexQ generator samples"] = texture_energy(x, cfg, info.mean, info.std)
    rows = {name: summary(t.detach()) for name, t in sets.items()}
    print("| images | n | dominant elements: median | histogram (1..16) | mean K_max | mean rest of K | inside L_LAWS bounds | mean L_LAWS |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r['n']} | {r['dominant_median']:.0f} | {r['hist']} | {r['k_max']:.3f} | {r['k_rest']:.3f} | {100 * r['inside_bounds']:.0f}% | {r['laws_mean']:.4f} |")
    print(f"(L_LAWS targets: K_max 0.3 +- 0.015, rest 0.5 +- 0.015; {time.perf_counter() - start:.0f} s)")
    print(json.dumps({"bench": "texture_stats", "rows": rows}))


if __name__ == "__main__":
    main()
