"""The candidate speed-ups of steps 2-3, each alone and together, and runs per process.

Prints, for the device it runs on (random weights: the timings do not depend on them), one row
per variant: G-only and G + Q ms per iteration at the paper's settings, the projected minutes of
one ``--profile paper`` run (step 1 counted at the base variant's measured rate), and the ratio to
the base (float32, CUDA graphs, all n mixes):

  bf16       ``precision: bf16`` (convolutions/matmuls in bf16; quantizers and BN in float32)
  bounded    ``finetune.mix_slots: bounded`` (Q scores n + c samples, c the mixes' tail bound)
  compile    ``compile: true`` (torch.compile of the captured passes, inductor)
  tf32       ``tf32: true`` (TF32 convolutions)
  bf16-nhwc  bf16 with ``channels_last: true`` (``auto`` keeps NCHW for it on CUDA)
  all        bf16 + bounded + compile

Then, with ``--streams 1,2,4``: k runs in one process, each on its own CUDA stream with its own
graphs (and their memory pools), stepped in turn; their summed iteration rate as paper-protocol runs
per hour. The k runs share the device's random generator, so this measures speed only: it is not
a way to make k reproducible runs (texq runs one run per process).

    python bench/speedups.py [--device cuda] [--variants base,bf16,bounded,compile,tf32,all]
                             [--streams 1,2,4] [--seconds 10]
The last stdout line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import build, paper_minutes, per_call, step1_ms, sync  # noqa: E402

from texq.util.device import set_numerics  # noqa: E402

VARIANTS = {
    "base": {},
    "bf16": {"precision": "bf16"},
    "bounded": {"mix_slots": "bounded"},
    "compile": {"compile": True},
    "tf32": {"tf32": True},
    "bf16-nhwc": {"precision": "bf16", "layout": "nhwc"},
    "all": {"precision": "bf16", "mix_slots": "bounded", "compile": True},
}
PAPER_ITERS = 100_000 + 1500  # steps 2-3 iterations, plus step 1's (counted alike)


def tuner_for(model: str, device: torch.device, graphs: bool, variant: dict, seed: int = 0,
              backend: str = "inductor", batch: int | None = None):
    """The paper-setting Finetuner of train_speed.build with a variant's settings."""
    set_numerics(variant.get("tf32", False))
    layout = torch.channels_last if variant.get("layout") == "nhwc" else None
    return build(model, device, batch, graphs, seed=seed, layout=layout,
                 precision=variant.get("precision", "float32"),
                 mix_slots=variant.get("mix_slots", "all"), compile=variant.get("compile", False),
                 compile_backend=backend)


def iterate(tuners, streams, rounds: int) -> None:
    """``rounds`` G + Q iterations of every tuner, in turn, each on its own stream (or none)."""
    for _ in range(rounds):
        for tuner, stream in zip(tuners, streams):
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                x, y, _ = tuner.generator_step()
                tuner.quant_step(x, y)


def variant_row(model: str, device: torch.device, graphs: bool, name: str, n: int,
                step1: float, backend: str, batch: int | None = None) -> dict:
    cfg, tuner = tuner_for(model, device, graphs, VARIANTS[name], backend=backend, batch=batch)
    t0 = time.perf_counter()
    iterate([tuner], [None], 3)  # capture (and compile) before timing
    sync(device)
    setup = time.perf_counter() - t0
    g_ms = 1e3 * per_call(tuner.generator_step, n, device)
    gq_ms = 1e3 * per_call(lambda: iterate([tuner], [None], 1), n, device)
    return {"variant": name, "settings": VARIANTS[name], "g_only_ms": g_ms, "g_and_q_ms": gq_ms,
            "setup_s": setup, "paper_minutes": paper_minutes(cfg, step1, g_ms, gq_ms)}


def streams_rate(model: str, device: torch.device, graphs: bool, variant: dict, k: int,
                 seconds: float, backend: str, batch: int | None = None) -> float:
    """Summed iterations per second of ``k`` runs stepped in turn on ``k`` streams."""
    tuners = [tuner_for(model, device, graphs, variant, seed=i, backend=backend, batch=batch)[1]
              for i in range(k)]
    streams = [torch.cuda.Stream(device) if device.type == "cuda" else None for _ in range(k)]
    sync(device)
    iterate(tuners, streams, 3)
    sync(device)
    rounds, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        iterate(tuners, streams, 5)
        rounds += 5
        sync(device)
    return k * rounds / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="resnet20a_cifar10")
    p.add_argument("--batch", type=int, default=None, help="generated samples per step (default: the paper's)")
    p.add_argument("--variants", default="base,bf16,bounded,compile,tf32,bf16-nhwc,all")
    p.add_argument("--iters", type=int, default=40, help="timed iterations per figure")
    p.add_argument("--streams", default="", help="e.g. 1,2,4: runs per process")
    p.add_argument("--streams-variant", default="base", choices=sorted(VARIANTS))
    p.add_argument("--seconds", type=float, default=10.0, help="timed seconds per streams level")
    p.add_argument("--backend", default="inductor", help=argparse.SUPPRESS)  # tests: aot_eager
    args = p.parse_args(argv)
    device = torch.device(args.device)
    graphs = device.type == "cuda"
    names = args.variants.split(",")
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)}; expected some of {', '.join(VARIANTS)}")
    set_numerics(False)
    step1 = step1_ms(args.model, device, graphs, (10, 60) if graphs else (2, 10))
    res: dict = {"bench": "speedups", "model": args.model, "device": str(device),
                 "device_name": torch.cuda.get_device_name(device) if graphs
                 else platform.processor() or platform.machine(), "torch": torch.__version__,
                 "cuda_graphs": graphs, "step1_ms": step1, "variants": []}
    base = None
    print(f"{'variant':10} {'G ms':>8} {'G+Q ms':>8} {'paper min':>10} {'vs base':>8} {'set-up s':>9}")
    for name in names:
        row = variant_row(args.model, device, graphs, name, args.iters, step1, args.backend, args.batch)
        base = base or (row["g_and_q_ms"] if name == "base" else None)
        row["speedup"] = base / row["g_and_q_ms"] if base else None
        res["variants"].append(row)
        print(f"{name:10} {row['g_only_ms']:8.2f} {row['g_and_q_ms']:8.2f} {row['paper_minutes']:10.1f} "
              f"{row['speedup'] or float('nan'):8.2f} {row['setup_s']:9.1f}", flush=True)
    if args.streams:
        variant = VARIANTS[args.streams_variant]
        res["streams"] = {}
        for k in map(int, args.streams.split(",")):
            rate = streams_rate(args.model, device, graphs, variant, k, args.seconds, args.backend,
                                args.batch)
            res["streams"][k] = {"its_per_s": rate, "paper_runs_per_hour": 3600 * rate / PAPER_ITERS}
            print(f"{k} runs per process ({args.streams_variant}): {rate:.1f} it/s in all, "
                  f"{3600 * rate / PAPER_ITERS:.2f} paper runs/h", flush=True)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
