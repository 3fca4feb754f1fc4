"""Where one steps-2-3 iteration spends its GPU time, and what cuDNN's settings change.

    python bench/gpu_profile.py [--model resnet20a_cifar10] [--iters 30]

1. The CUDA kernels of one eager G + Q iteration at the paper's settings, by total time
   (torch.profiler), grouped into convolutions, GEMMs and the rest.
2. ms per iteration (G alone; G + Q; CUDA graphs) for every combination of memory layout
   (NCHW / NHWC), ``cudnn.benchmark``, ``cudnn.deterministic`` and TF32.
The last stdout line is the JSON of both.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
from torch.profiler import ProfilerActivity, profile

from bench.train_speed import build, steps23

LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def kernel_table(model: str, device: torch.device, rows: int = 15) -> list[dict]:
    _, tuner = build(model, device, None, graphs=False)
    steps23(tuner, device, 2)

    def joint():
        x, y, _ = tuner.generator_step()
        tuner.quant_step(x, y)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        joint()
        torch.cuda.synchronize(device)
    kernels = [e for e in prof.key_averages() if e.device_time_total > 0 and e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in kernels)
    groups: dict[str, float] = {}
    for e in kernels:
        name = e.key.lower()
        kind = ("conv" if any(w in name for w in ("conv", "cudnn", "implicit", "winograd", "fft"))
                else "gemm" if any(w in name for w in ("gemm", "sm90", "cutlass", "ampere")) else "other")
        groups[kind] = groups.get(kind, 0.0) + e.self_device_time_total
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:rows]
    print(f"one eager G + Q iteration: {total / 1e3:.2f} ms of kernels, {sum(e.count for e in kernels)} "
          f"launches; " + ", ".join(f"{k} {v / 1e3:.2f} ms" for k, v in groups.items()))
    for e in top:
        print(f"  {e.self_device_time_total / 1e3:7.3f} ms {e.count:5d}x  {e.key[:90]}")
    return [{"kernel": e.key, "ms": e.self_device_time_total / 1e3, "count": e.count} for e in top]


def matrix(model: str, device: torch.device, iters: int) -> list[dict]:
    rows = []
    for layout, bench, det, tf32 in itertools.product(LAYOUTS, (False, True), (True, False), (False, True)):
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = bench, det
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
        _, tuner = build(model, device, None, graphs=True, layout=LAYOUTS[layout])
        t = steps23(tuner, device, iters)
        rows.append({"layout": layout, "cudnn_benchmark": bench, "deterministic": det, "tf32": tf32, **t})
        print(f"{layout} benchmark={bench!s:5} deterministic={det!s:5} tf32={tf32!s:5}: "
              f"G {t['g_only_ms']:6.2f} ms/it, G+Q {t['g_and_q_ms']:6.2f} ms/it", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet20a_cifar10")
    p.add_argument("--iters", type=int, default=30)
    args = p.parse_args()
    device = torch.device("cuda")
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    res = {"device_name": torch.cuda.get_device_name(device), "torch": torch.__version__,
           "kernels": kernel_table(args.model, device), "matrix": matrix(args.model, device, args.iters)}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
