"""How many of a quantized ResNet's predictions change when its residual branches are rounded.

    python bench/rounding_sensitivity.py RUN_DIR [--levels 8 16 20] [--assets ../shared/assets]

An int8 kernel writes 8-bit codes; texq keeps each residual branch's output (the ``bn2`` of every
CIFAR ResNet block, before the addition) in float. This rounds those outputs to 2^L - 1 levels over
their own range on the 1000 lossless test images (the range read on the same images: the rounding
alone, no clipping) and counts the predictions that change against the unrounded model: the cost
an 8-bit residual stream would have (docs/interpretation.md, "Fast file"). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from texq.data import load_eval_data
    from texq.export import load_run

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", help="a texq run folder (train/qmodel.pt)")
    p.add_argument("--levels", type=int, nargs="+", default=[8, 16, 20], help="bits of the rounding")
    p.add_argument("--assets", default=os.environ.get("TEXQ_ASSETS", str(ROOT.parent / "shared" / "assets")))
    args = p.parse_args()
    qmodel = load_run(args.run_dir).eval()
    data = load_eval_data(str(Path(args.assets) / "cifar10" / "test_first1000.npz"), qmodel.texq_info)
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor([int(data[i][1]) for i in range(len(data))])
    branches = [m for name, m in qmodel.named_modules() if name.endswith("bn2")]
    if not branches:
        sys.exit(f"{args.run_dir}: no residual branch (a module named *bn2) in this model")
    ranges: dict = {}

    def record(module, _inputs, out):
        lo, hi = ranges.get(module, (0.0, 0.0))
        ranges[module] = (min(lo, out.min().item()), max(hi, out.max().item()))

    hooks = [m.register_forward_hook(record) for m in branches]
    with torch.no_grad():
        ref = qmodel(x).argmax(1)
    for h in hooks:
        h.remove()
    rows = []
    for bits in args.levels:
        levels = 2 ** bits - 1

        def rounded(module, _inputs, out, levels=levels):
            lo, hi = ranges[module]
            step = (hi - lo) / levels
            zero = round(-lo / step)
            return (torch.clamp(torch.round(out / step) + zero, 0, levels) - zero) * step

        hooks = [m.register_forward_hook(rounded) for m in branches]
        with torch.no_grad():
            got = qmodel(x).argmax(1)
        for h in hooks:
            h.remove()
        rows.append({"bits": bits, "same_class_percent": round(100 * (got == ref).float().mean().item(), 2),
                     "top1": round(100 * (got == y).float().mean().item(), 2)})
    print(json.dumps({"bench": "bench/rounding_sensitivity.py", "run_dir": args.run_dir,
                      "n": len(y), "texq_top1": round(100 * (ref == y).float().mean().item(), 2),
                      "residual_branches": len(branches), "rounded": rows}))


if __name__ == "__main__":
    main()
