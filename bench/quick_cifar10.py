"""Quick-profile benchmark on the shared CIFAR-10 ResNet-20: TexQ against GDFQ and ZeroQ.

Each run is a ``texq run`` folder under ``--out`` (a rerun of this script resumes unfinished runs
and reuses finished ones). Every quantized model is scored on the 1000 lossless test images (the
headline) and on the 4500 JPEG dev images (relative comparisons); the table gives mean +- std
over seeds, the number of runs and the mean wall time of a run.

    python bench/quick_cifar10.py [--bits 4 3] [--texq-seeds 0 1 2] [--baseline-seeds 0]
                                  [--ablations] [--out out/bench/quick]
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

from texq.data import load_eval_data
from texq.eval import evaluate
from texq.models import load_quantized
from texq.run.config import RunConfig
from texq.run.layout import Layout
from texq.run.runner import run
from texq.util.io import write_json

ROOT = Path(__file__).resolve().parents[1]
ABLATIONS = {  # Table 3's switches: name -> (laws, layered_bns, mkd)
    "texq": (True, True, True), "texq -mkd": (True, True, False),
    "texq -lbns": (True, False, True), "texq -laws": (False, True, True),
    "texq -laws -lbns": (False, False, True),
}


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--assets", default=os.environ.get("TEXQ_ASSETS", str(ROOT.parent / "shared" / "assets")))
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    p.add_argument("--texq-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--baseline-seeds", type=int, nargs="+", default=[0])
    p.add_argument("--methods", nargs="+", default=["texq", "gdfq", "zeroq"])
    p.add_argument("--ablations", action="store_true", help="also Table 3's module switches")
    p.add_argument("--profile", default="quick")
    p.add_argument("--out", default=str(ROOT / "out" / "bench" / "quick"))
    p.add_argument("--device", default="auto")
    args = p.parse_args()

    assets = Path(args.assets) / "cifar10"
    headline, dev = str(assets / "test_first1000.npz"), str(assets / "test_jpeg_dev.npz")
    plan: list[tuple[str, str, tuple[bool, bool, bool], int]] = []
    for name in args.methods:
        seeds = args.texq_seeds if name == "texq" else args.baseline_seeds
        plan += [(name, name, (True, True, True), s) for s in seeds]
    if args.ablations:
        plan += [(n, "texq", sw, s) for n, sw in ABLATIONS.items() if n != "texq" for s in args.baseline_seeds]
    dev_data = None
    results: dict[tuple[str, int], list[dict]] = {}
    for bits in args.bits:
        for label, method, (laws, lbns, mkd), seed in plan:
            cfg = RunConfig.for_profile(
                args.profile, model="resnet20a_cifar10", checkpoint=str(assets / "resnet20-12fca82f.th"),
                data=headline, method=method, w_bits=bits, a_bits=bits, seed=seed, device=args.device,
                laws=laws, layered_bns=lbns, mkd=mkd)
            folder = Path(args.out) / f"w{bits}a{bits}" / f"{label.replace(' ', '')}-seed{seed}"
            print(f"== {label} W{bits}A{bits} seed {seed} -> {folder}", flush=True)
            start = time.perf_counter()
            m = run(cfg, folder, progress=False)
            m["seconds"] = round(time.perf_counter() - start, 1)  # this call's wall time (0 if done)
            dev_file = folder / "dev_metrics.json"
            if not dev_file.exists():
                qmodel = load_quantized(Layout(folder).qmodel)
                dev_data = dev_data or load_eval_data(dev, qmodel.texq_info)
                write_json(dev_file, evaluate(qmodel, dev_data, progress=False).to_dict())
            m["dev_top1"] = json.loads(dev_file.read_text())["top1"]
            results.setdefault((label, bits), []).append(m)
            print(f"   top1 {m['top1']:.2f} (dev {m['dev_top1']:.2f}), {m['seconds']:.0f} s", flush=True)

    print("\n| method | bits | runs | top-1 test1000 (n=1000) | top-1 jpeg_dev (n=4500) | "
          "wall time / run |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (label, bits), ms in results.items():
        print(f"| {label} | W{bits}A{bits} | {len(ms)} | {mean_std([m['top1'] for m in ms])} | "
              f"{mean_std([m['dev_top1'] for m in ms])} | "
              f"{statistics.mean(m['seconds'] for m in ms) / 60:.1f} min |")
    print(f"(profile {args.profile}; seeds: texq {args.texq_seeds}, baselines {args.baseline_seeds}; "
          f"{platform.machine()} CPU x{torch.get_num_threads()} threads unless device says cuda)")
    print(json.dumps({"bench": "quick_cifar10", "rows": [
        {"method": k[0], "bits": k[1], "top1": [m["top1"] for m in v],
         "dev_top1": [m["dev_top1"] for m in v], "seconds": [m["seconds"] for m in v]}
        for k, v in results.items()]}))


if __name__ == "__main__":
    main()
