"""Deployable models: a quantized model as an ONNX graph (``texq export``).

    qmodel = load_run("runs/texq-w4a4-s0")                   # the run's train/qmodel.pt
    summary = export_onnx(qmodel, "model.onnx")              # fast: integer kernels (default)
    summary = export_onnx(qmodel, "small.onnx", "small")     # small: INT4/UINT4 QDQ

Two variants, both onnx.checker-checked and written atomically. ``"fast"``
(:mod:`texq.export.integer`): BatchNorm folded, INT8 weights, UINT8 activation codes, QLinearConv
where its requantization reproduces texq's codes, float Conv where texq's output is a float.
``"small"`` (:mod:`texq.export.graph`): each layer's b-bit codes in the narrowest ONNX integer type
(UINT4 for 2-4 bits) with QuantizeLinear/DequantizeLinear and float convolutions; BatchNorm kept.

Needs the export extra, ``pip install 'texq[export]'`` (onnx, onnxruntime, and onnxscript for
torch's exporter); texq imports them only when exporting.
"""

from __future__ import annotations

import importlib
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

import texq
from texq.export.eligible import integer_input
from texq.export.qparams import LayerQDQ, float_model, quantized_layers
from texq.models import get_info
from texq.util.errors import CheckpointError, ExportError
from texq.util.io import atomic_path

if TYPE_CHECKING:
    import onnx

INSTALL_HINT = "pip install 'texq[export]'"
REQUIRED = ("onnx", "onnxruntime", "onnxscript")


def require_onnx() -> None:
    """Raise ExportError naming the first missing package of the export extra."""
    for name in REQUIRED:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ExportError(f"exporting to ONNX needs the {name} package, which is not "
                              f"installed: {INSTALL_HINT}") from exc


def load_run(run_dir: str | os.PathLike) -> nn.Module:
    """The quantized model a run folder holds (``train/qmodel.pt`` of a ``texq run --out`` folder
    or of ``out/pipeline``; or ``qmodel.pt`` of the ``train`` folder itself), in eval mode."""
    from texq.models import load_quantized
    from texq.run.layout import Layout

    path = Path(run_dir)
    if not path.is_dir():
        found = "is a file, not a run folder" if path.exists() else "run folder not found"
        raise CheckpointError(f"{path}: {found} (expected a folder written by "
                              "`texq run` or the pipeline, holding train/qmodel.pt)")
    for layout in (Layout(path), Layout(path.parent)):  # the run folder, or its train/ folder itself
        if layout.qmodel.is_file() and path in (layout.root, layout.train):
            layout.verify("train")  # as a texq run recorded it, if it did
            return load_quantized(layout.qmodel)
    raise CheckpointError(f"no quantized model in run folder {path}: train/qmodel.pt not found "
                          "(a run writes it when its training finishes)")


@dataclass(frozen=True)
class ExportSummary:
    """What :func:`export_onnx` wrote."""

    onnx: str  # the file
    bytes: int  # its size
    model: str
    w_bits: int
    a_bits: int
    layers: int  # quantized Conv/Gemm layers
    weight_types: dict[str, int]  # ONNX type of the stored weights -> number of layers
    input_types: dict[str, int]  # QuantizeLinear output type (+ "+Clip") -> number of layers
    variant: str = "fast"  # fast | small
    ops: dict[str, int] = field(default_factory=dict)  # the node computing each layer -> count
    float_layers: dict[str, str] = field(default_factory=dict)  # fast: layer -> why a float Conv

    def to_dict(self) -> dict:
        return asdict(self)


def metadata(qmodel: nn.Module, layers: list[LayerQDQ], variant: str = "small",
             ops: dict[str, str] | None = None) -> dict[str, str]:
    """``metadata_props`` of the exported model: texq's version, the model, its bit widths and
    input normalisation, the variant, and each layer's bits, types and (fast) node."""
    info, cfg = get_info(qmodel), qmodel.texq_quant
    rows = [{"layer": layer.name,
             "w_bits": layer.weight.bits if layer.weight else 32,
             "weight_type": _weight_type(layer, variant, ops),
             **({"op": (ops or {}).get(layer.name, "Conv/Gemm (float)")} if variant == "fast" else {}),
             "a_bits": layer.act.bits if layer.act else 32,
             "input_type": layer.act.dtype if layer.act else "FLOAT",
             "input_clip": bool(layer.act and layer.act.clip is not None)} for layer in layers]
    props = {
        "texq.version": texq.__version__, "texq.model": info.name, "texq.variant": variant,
        "texq.w_bits": cfg.w_bits, "texq.a_bits": cfg.a_bits,
        "texq.first_layer_bits": rows[0]["w_bits"], "texq.last_layer_bits": rows[-1]["w_bits"],
        "texq.per_channel": cfg.per_channel, "texq.quantize_input": cfg.quantize_input,
        "texq.zero_point": "ONNX scale = 1/S, zero_point = -ZP of Eq. 1 (integer)",
        "texq.input": json.dumps({"layout": "NCHW float32 RGB in [0, 1], then (x - mean) / std",
                                  "size": info.input_size, "mean": info.mean, "std": info.std}),
        "texq.num_classes": info.num_classes,
        "texq.layers": json.dumps(rows),
    }
    return {k: str(v) for k, v in props.items()}


VARIANTS = ("fast", "small")


def _weight_type(layer: LayerQDQ, variant: str, ops: dict[str, str] | None) -> str:
    if layer.weight is None:
        return "FLOAT"
    if variant == "small":
        return layer.weight.dtype
    return "INT8" if layer.name in (ops or {}) else "FLOAT"


def to_onnx(qmodel: nn.Module, variant: str = "fast", conv_form: str = "qlinear"
            ) -> tuple["onnx.ModelProto", list[LayerQDQ], dict]:
    """The graph of ``qmodel`` (checked by onnx.checker), its layers' QDQ parameters, and for the
    fast variant what became of each layer (:class:`texq.export.integer.IntegerGraph`'s fields)."""
    require_onnx()
    import onnx
    from onnx import helper

    from texq.export.graph import float_graph, insert_qdq
    from texq.export.integer import insert_integer

    if variant not in VARIANTS:
        raise ExportError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if getattr(qmodel, "texq_quant", None) is None:
        raise ExportError("the model is not quantized: export a model from texq.quantize or a "
                          "run's qmodel.pt")
    layers = quantized_layers(qmodel)
    proto = float_graph(float_model(qmodel), get_info(qmodel).input_size)
    made: dict = {}
    if variant == "small":
        insert_qdq(proto, layers)
    else:
        made = asdict(insert_integer(proto, layers, conv_form))
    proto.producer_name, proto.producer_version = "texq", texq.__version__
    helper.set_model_props(proto, metadata(qmodel, layers, variant, made.get("integer_layers")))
    onnx.checker.check_model(proto, full_check=True)
    return proto, layers, made


def export_onnx(qmodel: nn.Module, dest: str | os.PathLike, variant: str = "fast",
                conv_form: str = "qlinear") -> ExportSummary:
    """Write ``qmodel`` to ``dest`` as the ``variant`` ONNX graph (atomically)."""
    proto, layers, made = to_onnx(qmodel, variant, conv_form)
    with atomic_path(dest) as tmp:
        tmp.write_bytes(proto.SerializeToString())
    cfg = qmodel.texq_quant
    inputs = Counter(f"{'UINT8' if variant == 'fast' and integer_input(x.act) else x.act.dtype}"
                     f"{'+Clip' if x.act.clip is not None else ''}" for x in layers if x.act)
    integer = made.get("integer_layers", {})
    ops = Counter(integer.values()) + Counter(
        "Conv" if x.float_weight.ndim == 4 else "Gemm" for x in layers if x.name not in integer)
    weights = Counter(_weight_type(x, variant, integer) for x in layers if x.weight)
    return ExportSummary(str(dest), Path(dest).stat().st_size, get_info(qmodel).name, cfg.w_bits,
                         cfg.a_bits, len(layers), dict(weights), dict(inputs), variant, dict(ops),
                         made.get("float_layers", {}))


__all__ = ["ExportSummary", "INSTALL_HINT", "VARIANTS", "export_onnx", "load_run", "metadata", "require_onnx",
           "to_onnx"]
