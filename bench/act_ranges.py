"""When and on what Q's activation ranges are observed: the alternatives of
``finetune.act_calib_at`` x ``finetune.act_calib_inputs``, scored on the JPEG dev set.

The ranges are observed during G's warm-up and frozen for the rest of fine-tuning (see
docs/interpretation.md, "Activation ranges"). This script runs the same TexQ configuration once
per alternative and seed (``texq run`` folders under ``--out``; a rerun resumes and reuses them),
and prints top-1 on the 4500 JPEG dev images (the set to choose on) and on the 1000 lossless
images, with each alternative's paired difference to GDFQ's rule (start, generated) per seed.

Step 1 does not depend on these settings: each seed's calibration set is synthesised once, by
its first run, and copied into the other runs' folders (a run reuses a ``step1.pt`` it finds).

    python bench/act_ranges.py [--bits 3] [--seeds 0 1] [--profile quick] [--combos start-generated ...]
                               [--out out/bench/act_ranges]   (the default is always run: the pairs)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from texq.data import load_eval_data
from texq.eval import evaluate
from texq.method.finetune import ACT_CALIB_AT, ACT_CALIB_INPUTS
from texq.models import load_quantized
from texq.run.config import RunConfig
from texq.run.layout import Layout
from texq.run.runner import run
from texq.util.io import write_json

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ("start", "generated")  # GDFQ's rule, texq's default


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--assets", default=os.environ.get("TEXQ_ASSETS", str(ROOT.parent / "shared" / "assets")))
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--profile", default="quick")
    p.add_argument("--out", default=str(ROOT / "out" / "bench" / "act_ranges"))
    p.add_argument("--device", default="auto")
    p.add_argument("--combos", nargs="+", metavar="AT-INPUTS",
                   help="only these alternatives, e.g. start-generated end-generated (default: all)")
    args = p.parse_args()

    assets = Path(args.assets) / "cifar10"
    headline, dev = str(assets / "test_first1000.npz"), str(assets / "test_jpeg_dev.npz")
    combos = [DEFAULT] + [(a, i) for a in ACT_CALIB_AT for i in ACT_CALIB_INPUTS if (a, i) != DEFAULT]
    if args.combos:
        combos = [c for c in combos if c == DEFAULT or f"{c[0]}-{c[1]}" in args.combos]  # paired
    dev_data, rows = None, []
    for seed in args.seeds:
        step1 = None
        for at, inputs in combos:
            base = RunConfig.for_profile(
                args.profile, model="resnet20a_cifar10", checkpoint=str(assets / "resnet20-12fca82f.th"),
                data=headline, w_bits=args.bits, a_bits=args.bits, seed=seed, device=args.device)
            cfg = replace(base, finetune=replace(base.finetune, act_calib_at=at, act_calib_inputs=inputs))
            folder = Path(args.out) / f"w{args.bits}a{args.bits}" / f"{at}-{inputs}-seed{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            if step1 is not None and not Layout(folder).step1.exists():
                shutil.copyfile(step1, Layout(folder).step1)
            print(f"== act ranges at {at} on {inputs}, W{args.bits}A{args.bits} seed {seed} -> {folder}",
                  flush=True)
            m = run(cfg, folder, progress=False)
            step1 = step1 or Layout(folder).step1
            dev_file = folder / "dev_metrics.json"
            if not dev_file.exists():
                qmodel = load_quantized(Layout(folder).qmodel)
                dev_data = dev_data or load_eval_data(dev, qmodel.texq_info)
                write_json(dev_file, evaluate(qmodel, dev_data, progress=False).to_dict())
            dev_top1 = json.loads(dev_file.read_text())["top1"]
            rows.append({"at": at, "inputs": inputs, "seed": seed, "top1": m["top1"],
                         "dev_top1": dev_top1, "train_seconds": m["train_seconds"]})
            print(f"   top1 {m['top1']:.2f} (dev {dev_top1:.2f}), {m['train_seconds']:.0f} s", flush=True)

    ref = {r["seed"]: r for r in rows if (r["at"], r["inputs"]) == DEFAULT}  # runs of the default
    print("\n| act_calib_at | act_calib_inputs | runs | top-1 jpeg_dev (n=4500) | dev vs default "
          "(paired) | top-1 test1000 (n=1000) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for at, inputs in combos:
        rs = [r for r in rows if (r["at"], r["inputs"]) == (at, inputs)]
        diffs = [r["dev_top1"] - ref[r["seed"]]["dev_top1"] for r in rs if r["seed"] in ref]
        print(f"| {at} | {inputs} | {len(rs)} | {_mean_std([r['dev_top1'] for r in rs])} | "
              f"{_mean_std(diffs, signed=True)} | {_mean_std([r['top1'] for r in rs])} |")
    print(f"(profile {args.profile}, W{args.bits}A{args.bits}, seeds {args.seeds}; "
          f"{platform.machine()} CPU x{torch.get_num_threads()} threads unless device says cuda)")
    print(json.dumps({"bench": "act_ranges", "profile": args.profile, "bits": args.bits, "rows": rows}))


def _mean_std(values: list[float], signed: bool = False) -> str:
    f = "{:+.2f}" if signed else "{:.2f}"
    if len(values) == 1:
        return f.format(values[0])
    return f"{f.format(statistics.mean(values))} +- {statistics.stdev(values):.2f}"


if __name__ == "__main__":
    main()
