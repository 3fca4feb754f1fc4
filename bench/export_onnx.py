"""ONNX export of the shared ResNet-20: file size and ONNX Runtime CPU latency, FP32 vs QDQ.

    python bench/export_onnx.py [--assets ../shared/assets] [--bits 4 3] [--threads 2]

The quantized models are texq.quantize + texq.calibrate on Gaussian noise (8 x 128 images, seed
0, no fine-tuning): enough to measure size and speed, whose figures do not depend on how the
ranges were found; their accuracy is the zero-effort baseline's, not TexQ's. Latency is the
median of --runs timed runs (after --warmup), FP32 and QDQ alternated so machine noise hits both,
with --threads intra-op threads that sleep when idle (spinning threads of one session would take
the cores from the other). Agreement compares ONNX Runtime with texq's fake-quantized model
on the 1000 lossless CIFAR-10 test images. Writes bench/results/cpu/export_onnx.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from torch.utils.data import DataLoader

import texq
from texq.data import gaussian_batches, load_eval_data
from texq.export import export_onnx
from texq.export.graph import float_graph
from texq.export.qparams import quantized_layers
from texq.export.runtime import check_agreement, onnx_logits, session
from texq.models import create_model
from texq.quant import QuantConfig, calibrate, quantize
from texq.util.io import write_json

ROOT = Path(__file__).resolve().parents[1]


def latency_ms(sessions: dict, batch: int, size: int, warmup: int, runs: int) -> dict[str, float]:
    """Median ms per call of each session on one fixed random batch, the sessions alternated."""
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for i in range(warmup + runs):
        for name in sessions if i % 2 == 0 else reversed(list(sessions)):
            t0 = time.perf_counter()
            onnx_logits(sessions[name], x)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {k: round(1e3 * statistics.median(v), 3) for k, v in times.items()}


def packed_weight_bytes(qmodel) -> int:
    """The bytes the weight codes take packed at their own bit width (b bits per weight)."""
    return sum(-(-layer.weight.codes.size * layer.weight.bits // 8)
               for layer in quantized_layers(qmodel) if layer.weight is not None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--assets", default=os.environ.get("TEXQ_ASSETS", str(ROOT.parent / "shared" / "assets")))
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--runs", type=int, nargs=2, default=[200, 30], metavar=("B1", "B64"),
                   help="timed runs at batch 1 and batch 64")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "cpu" / "export_onnx.json"))
    args = p.parse_args()
    load_before = os.getloadavg()[0]

    assets = Path(args.assets)
    model = create_model("resnet20a_cifar10", checkpoint=assets / "cifar10" / "resnet20-12fca82f.th")
    info = model.texq_info
    data = load_eval_data(str(assets / "cifar10" / "test_first1000.npz"), info)
    tmp = Path(tempfile.mkdtemp(prefix="texq-export-bench-"))
    fp_path = tmp / "fp32.onnx"
    fp_path.write_bytes(float_graph(model, info.input_size).SerializeToString())
    fp_top1 = check_agreement(session(fp_path), model, DataLoader(data, batch_size=500)).onnx_top1
    rows = []
    for bits in args.bits:  # the files and their checks first, all torch work before any timing
        qmodel = quantize(model, QuantConfig(w_bits=bits, a_bits=bits))
        calibrate(qmodel, gaussian_batches(info, n_batches=8, batch_size=128, seed=0))
        summary = export_onnx(qmodel, tmp / f"w{bits}a{bits}.onnx")
        check = check_agreement(session(summary.onnx), qmodel, DataLoader(data, batch_size=500))
        rows.append({"bits": f"W{bits}A{bits}", "onnx": summary.onnx,
                     "fp32_onnx_bytes": fp_path.stat().st_size, "qdq_onnx_bytes": summary.bytes,
                     "packed_weight_codes_bytes": packed_weight_bytes(qmodel),
                     "weight_types": summary.weight_types, "input_types": summary.input_types,
                     "fp32_onnx_top1": fp_top1,
                     **{f"check_{k}": v for k, v in check.to_dict().items()}})
    fp_sess = session(fp_path, args.threads, spinning=False)
    for row in rows:
        q_sess = session(row.pop("onnx"), args.threads, spinning=False)
        for batch, runs in zip((1, 64), args.runs):
            ms = latency_ms({"fp32": fp_sess, "qdq": q_sess}, batch, info.input_size, args.warmup, runs)
            row[f"batch{batch}_ms"] = ms
        print(f"{row['bits']}: FP32 {row['fp32_onnx_bytes'] / 1e3:.0f} kB, QDQ "
              f"{row['qdq_onnx_bytes'] / 1e3:.0f} kB (weight codes packed at their bit width: "
              f"{row['packed_weight_codes_bytes'] / 1e3:.0f} kB); batch 1 {row['batch1_ms']} ms, "
              f"batch 64 {row['batch64_ms']} ms; agreement {row['check_agreement']}%, top-1 ONNX "
              f"{row['check_onnx_top1']} / texq {row['check_texq_top1']}, max |logit diff| "
              f"{row['check_max_abs_logit_diff']:.3g}")
    result = {
        "bench": "bench/export_onnx.py", "command": " ".join(["python bench/export_onnx.py", *sys.argv[1:]]),
        "model": "resnet20a_cifar10", "texq": texq.__version__,
        "calibration": "texq.calibrate on Gaussian noise, 8 x 128 images, seed 0 (no fine-tuning)",
        "check_data": "test_first1000.npz (1000 lossless CIFAR-10 test images)",
        "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
        "provider": "CPUExecutionProvider", "intra_op_threads": args.threads,
        "thread_spinning": False,
        "machine": f"{os.cpu_count()}-core {platform.machine()} CPU",
        "load_average_1min": {"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)},
        "latency": f"median ms per call of {args.runs[0]} (batch 1) / {args.runs[1]} (batch 64) "
                   f"runs after {args.warmup} warm-up, FP32 and QDQ alternated",
        "rows": rows,
    }
    write_json(args.out, result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
