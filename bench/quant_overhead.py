"""Cost of fake quantization in training: W4A4 step time / full-precision step time.

One process, the same batch, the two models stepped alternately so that machine noise hits both;
the figure is the ratio of the medians. Target: <= 1.3 on a CPU for ResNet-20 at batch 128.

    python bench/quant_overhead.py [--model resnet20_cifar10] [--batch 128] [--steps 25]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch import nn

from texq.models import create_model
from texq.quant import QuantConfig, calibrate, quantize


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet20_cifar10")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=25, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--w-bits", type=int, default=4)
    p.add_argument("--a-bits", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    fp = create_model(args.model).to(device).train()
    size = fp.texq_info.input_size
    x = torch.randn(args.batch, 3, size, size, device=device)
    y = torch.randint(0, fp.texq_info.num_classes, (args.batch,), device=device)
    q = quantize(fp, QuantConfig(w_bits=args.w_bits, a_bits=args.a_bits))
    calibrate(q, [x])  # ranges frozen, as during fine-tuning
    q.train()
    opts = {name: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
            for name, m in (("fp", fp), ("quant", q))}
    models = {"fp": fp, "quant": q}
    times: dict[str, list[float]] = {"fp": [], "quant": []}
    for i in range(args.warmup + args.steps):
        for name in ("fp", "quant") if i % 2 == 0 else ("quant", "fp"):
            t = train_step(models[name], opts[name], x, y, device)
            if i >= args.warmup:
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "bench": "quant_overhead", "model": args.model, "batch": args.batch, "steps": args.steps,
        "w_bits": args.w_bits, "a_bits": args.a_bits, "device": str(device),
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "fp_step_s": round(med["fp"], 4), "quant_step_s": round(med["quant"], 4),
        "ratio": round(med["quant"] / med["fp"], 3),
    }
    print(f"FP step {med['fp'] * 1e3:.1f} ms, W{args.w_bits}A{args.a_bits} step "
          f"{med['quant'] * 1e3:.1f} ms (median of {args.steps}): ratio {result['ratio']:.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
