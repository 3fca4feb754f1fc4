"""Speed only: MobileNetV2 (224 px, random weights with varied BatchNorm statistics) as FP32, small
and fast ONNX files under ONNX Runtime's CPU provider. Random weights say nothing of accuracy; they
give the fast file's share of integer layers and its latency on a network of 1x1 and depthwise
convolutions with ReLU6.

    python bench/export_mobilenet.py [--threads 2]

Prints one JSON line: per file the median ms per call at batch 1 (30 runs) and 8 (8 runs), after 2
warm-up calls, the files alternated; the fast file's node counts; agreement with texq on 8 noise
images.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import onnxruntime
import torch
from export_onnx import latency_ms  # bench/ is the script's folder: on sys.path

from texq.data import gaussian_batches
from texq.export import to_onnx
from texq.export.graph import float_graph
from texq.export.runtime import check_agreement, session
from texq.models import create_model
from texq.quant import QuantConfig, calibrate, quantize


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.manual_seed(0)
    model = create_model("mobilenet_v2").eval()
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_var.uniform_(0.5, 2), bn.running_mean.normal_(0, 0.1)
            bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(0, 0.1)
    info = model.texq_info
    qmodel = quantize(model, QuantConfig(w_bits=4, a_bits=4))
    calibrate(qmodel, gaussian_batches(info, n_batches=2, batch_size=16, seed=0))
    files = {"fp32": float_graph(model, info.input_size).SerializeToString()}
    result = {"bench": "bench/export_mobilenet.py", "onnxruntime": onnxruntime.__version__,
              "intra_op_threads": args.threads}
    x = next(gaussian_batches(info, 1, 8, seed=1))
    for variant in ("small", "fast"):
        proto, _, made = to_onnx(qmodel, variant)
        files[variant] = proto.SerializeToString()
        result[f"{variant}_same_class_percent"] = check_agreement(session(files[variant]), qmodel,
                                                                  [(x, None)]).agreement
        if made:
            result["fast_ops"] = dict(Counter(made["integer_layers"].values()),
                                      Conv=len(made["float_layers"]))
    sessions = {k: session(f, args.threads, spinning=False) for k, f in files.items()}
    for batch, runs in ((1, 30), (8, 8)):
        ms = latency_ms(sessions, batch, info.input_size, warmup=2, runs=runs)
        result[f"batch{batch}_ms"] = {k: round(v, 2) for k, v in ms.items()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
