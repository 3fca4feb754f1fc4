"""ONNX export of the shared ResNet-20: file size, ONNX Runtime CPU latency and agreement with texq.

    python bench/export_onnx.py [--assets ../shared/assets] [--bits 4 3] [--threads 2]

Four files side by side: FP32; ONNX Runtime's own ``quantize_static`` of that FP32 file (QDQ,
UINT8 activations, INT8 per-channel weights, BatchNorm folded by ``quant_pre_process``: the int8
model a user would otherwise pick); texq's small file (``texq export --small``) and texq's fast
file (``texq export``, the default). texq's quantized models are texq.quantize + texq.calibrate on
Gaussian noise (8 x 128 images, seed 0, no fine-tuning), and ONNX Runtime's calibrates on the
same images: enough to measure size and speed, whose figures do not depend on how the ranges
were found; their accuracy is the zero-effort baseline's, not TexQ's. Latency is the median of
--runs timed runs (after --warmup), the files alternated so machine noise hits all, with
--threads intra-op threads that sleep when idle (spinning threads of one session would take the
cores from the next). Agreement compares each file under ONNX Runtime with texq's fake-quantized
model on the 1000 lossless CIFAR-10 test images. Writes bench/results/cpu/export_onnx.json.
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


def ort_int8(fp_path: Path, dest: Path, batches: list[torch.Tensor]) -> Path:
    """ONNX Runtime's quantize_static of ``fp_path`` calibrated on ``batches``."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": x.numpy()} for x in batches])

        def get_next(self):
            return next(self.it, None)

    prepared = dest.with_suffix(".pre.onnx")
    quant_pre_process(str(fp_path), str(prepared), skip_symbolic_shape=True)  # its symbolic pass fails on the exporter's Constant nodes
    quantize_static(str(prepared), str(dest), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    return dest


def packed_weight_bytes(qmodel) -> int:
    """The bytes the weight codes take packed at their own bit width (b bits per weight)."""
    return sum(-(-layer.weight.codes.size * layer.weight.bits // 8)
               for layer in quantized_layers(qmodel) if layer.weight is not None)


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--assets", default=os.environ.get("TEXQ_ASSETS", str(ROOT.parent / "shared" / "assets")))
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--runs", type=int, nargs=2, default=[200, 30], metavar=("B1", "B64"),
                   help="timed runs at batch 1 and batch 64")
    p.add_argument("--conv-integer", action="store_true",
                   help="also time the fast file with --conv-form conv_integer (ConvInteger everywhere)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "cpu" / "export_onnx.json"))
    args = p.parse_args()
    load_before = os.getloadavg()[0]

    assets = Path(args.assets)
    model = create_model("resnet20a_cifar10", checkpoint=assets / "cifar10" / "resnet20-12fca82f.th")
    info = model.texq_info
    data = load_eval_data(str(assets / "cifar10" / "test_first1000.npz"), info)
    noise = list(gaussian_batches(info, n_batches=8, batch_size=128, seed=0))
    tmp = Path(tempfile.mkdtemp(prefix="texq-export-bench-"))
    fp_path = tmp / "fp32.onnx"
    fp_path.write_bytes(float_graph(model, info.input_size).SerializeToString())
    check = DataLoader(data, batch_size=500)
    fp_top1 = check_agreement(session(fp_path), model, check).onnx_top1
    ort_path = ort_int8(fp_path, tmp / "ort_int8.onnx", noise)
    ort_top1 = check_agreement(session(ort_path), model, check).onnx_top1
    rows = []
    for bits in args.bits:  # the files and their checks first, all torch work before any timing
        qmodel = quantize(model, QuantConfig(w_bits=bits, a_bits=bits))
        calibrate(qmodel, noise)
        row = {"bits": f"W{bits}A{bits}", "files": {"fp32": str(fp_path), "ort_int8": str(ort_path)},
               "bytes": {"fp32": fp_path.stat().st_size, "ort_int8": ort_path.stat().st_size},
               "packed_weight_codes_bytes": packed_weight_bytes(qmodel),
               "top1": {"fp32": fp_top1, "ort_int8": ort_top1}}
        files = [("small", "small", "qlinear"), ("fast", "fast", "qlinear")]
        if args.conv_integer:
            files.append(("fast_conv_integer", "fast", "conv_integer"))
        for variant, kind, form in files:
            summary = export_onnx(qmodel, tmp / f"w{bits}a{bits}-{variant}.onnx", kind, form)
            res = check_agreement(session(summary.onnx), qmodel, check)
            row["files"][variant], row["bytes"][variant] = summary.onnx, summary.bytes
            row["top1"][variant], row["top1"]["texq"] = res.onnx_top1, res.texq_top1
            row[f"{variant}_ops"] = summary.ops
            row[f"{variant}_check"] = res.to_dict()
        rows.append(row)
    for row in rows:
        sessions = {k: session(path, args.threads, spinning=False) for k, path in row.pop("files").items()}
        for batch, runs in zip((1, 64), args.runs):
            ms = latency_ms(sessions, batch, info.input_size, args.warmup, runs)
            row[f"batch{batch}_ms"] = ms
            row[f"batch{batch}_speedup_vs_fp32"] = {k: round(ms["fp32"] / v, 2) for k, v in ms.items()}
        print(f"{row['bits']}: bytes {row['bytes']}; batch 1 ms {row['batch1_ms']}; batch 64 ms "
              f"{row['batch64_ms']}; top-1 {row['top1']}; fast vs texq: "
              f"{row['fast_check']['agreement']}% same class, small vs texq: "
              f"{row['small_check']['agreement']}%")
    result = {
        "bench": "bench/export_onnx.py", "command": " ".join(["python bench/export_onnx.py", *sys.argv[1:]]),
        "model": "resnet20a_cifar10", "texq": texq.__version__,
        "calibration": "texq.calibrate (ort_int8: quantize_static) on Gaussian noise, 8 x 128 "
                       "images, seed 0 (no fine-tuning)",
        "check_data": "test_first1000.npz (1000 lossless CIFAR-10 test images)",
        "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
        "provider": "CPUExecutionProvider", "intra_op_threads": args.threads,
        "thread_spinning": False,
        "machine": f"{os.cpu_count()}-core {platform.machine()} CPU",
        "load_average_1min": {"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)},
        "latency": f"median ms per call of {args.runs[0]} (batch 1) / {args.runs[1]} (batch 64) "
                   f"runs after {args.warmup} warm-up, the four files alternated",
        "cpu": _cpu_name(),
        "rows": rows,
    }
    write_json(args.out, result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
