"""Zero-effort baseline: quantize the shared ResNet-20 with activation ranges from Gaussian noise,
no fine-tuning, and score it on the real images. Prints a Markdown table and a JSON line.

    python bench/zero_effort.py [--assets ../shared/assets] [--seeds 0 1 2] [--bits 8 4 3]

Each quantized row is the mean +- std over the noise seeds (seed = the calibration noise).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from texq.data import gaussian_batches, load_eval_data
from texq.eval import evaluate
from texq.models import create_model
from texq.quant import QuantConfig, calibrate, quantize

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--assets", default=os.environ.get("TEXQ_ASSETS", str(ROOT.parent / "shared" / "assets")))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3])
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--calib-batch-size", type=int, default=128)
    args = p.parse_args()

    assets = Path(args.assets)
    model = create_model("resnet20a_cifar10", checkpoint=assets / "cifar10" / "resnet20-12fca82f.th")
    info = model.texq_info
    sets = {"test1000": load_eval_data(str(assets / "cifar10" / "test_first1000.npz"), info),
            "jpeg_dev": load_eval_data(str(assets / "cifar10" / "test_jpeg_dev.npz"), info)}
    rows = []
    start = time.perf_counter()
    fp = {k: evaluate(model, ds, progress=False).top1 for k, ds in sets.items()}
    rows.append({"setting": "FP32", "runs": 1, **{k: (v, 0.0) for k, v in fp.items()}})
    for b in args.bits:
        acc: dict[str, list[float]] = {k: [] for k in sets}
        for seed in args.seeds:
            q = quantize(model, QuantConfig(w_bits=b, a_bits=b))
            calibrate(q, gaussian_batches(info, args.calib_batches, args.calib_batch_size, seed))
            for k, ds in sets.items():
                acc[k].append(evaluate(q, ds, progress=False).top1)
        rows.append({"setting": f"W{b}A{b}", "runs": len(args.seeds),
                     **{k: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0)
                        for k, v in acc.items()}})
    seconds = time.perf_counter() - start

    print("| setting | runs | top-1 test1000 (lossless, n=1000) | top-1 jpeg_dev (n=4500) |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        cells = [f"{r[k][0]:.2f} +- {r[k][1]:.2f}" if r["runs"] > 1 else f"{r[k][0]:.2f}"
                 for k in sets]
        print(f"| {r['setting']} | {r['runs']} | {cells[0]} | {cells[1]} |")
    print(f"(noise seeds {args.seeds}, {args.calib_batches}x{args.calib_batch_size} noise images, "
          f"{platform.machine()} CPU x{torch.get_num_threads()} threads, {seconds:.0f} s)")
    print(json.dumps({"bench": "zero_effort", "seeds": args.seeds, "rows": rows,
                      "seconds": round(seconds, 1)}))


if __name__ == "__main__":
    main()
