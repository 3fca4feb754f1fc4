"""The ONNX side of the export: the float graph from torch's exporter, then its QDQ rewrite.

Each quantized layer's Conv or Gemm node is found by its weight initializer, which must equal the
layer's float weights bit for bit (an exporter that folded BatchNorm into the weights, or a layer
read through any other op, is an error naming the layer, never a silent skip). Its weight
initializer becomes integer codes + DequantizeLinear, its input gets (Clip +)
QuantizeLinear -> DequantizeLinear of its own, even where several layers read the same tensor, and
a Conv bias (BatchNorm folded) moves to an Add after the Conv. BatchNorm nodes stay as they are.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from texq.export.qparams import ActQDQ, LayerQDQ, WeightQDQ
from texq.util.errors import ExportError

if TYPE_CHECKING:
    import onnx

#: ONNX opset of the exported graph (the first with INT4/UINT4 and 16-bit QuantizeLinear)
OPSET = 21
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def float_graph(model: nn.Module, input_size: int) -> "onnx.ModelProto":
    """``model`` (no quantizers) as an ONNX graph with a dynamic batch: torch's exporter without
    its optimizer (which folds BatchNorm into the convolutions), then constants folded."""
    import onnxscript.optimizer

    example = torch.zeros(2, 3, input_size, input_size)  # batch 2: a batch of 1 would be specialised
    # the exporter reports progress on stdout (moved to stderr), its passes log every step at INFO
    with contextlib.redirect_stdout(sys.stderr), _quiet("onnxscript", "onnx_ir"):
        program = torch.onnx.export(
            model, (example,), dynamo=True, optimize=False, opset_version=OPSET,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch")},))
        proto = program.model_proto
        onnxscript.optimizer.fold_constants(proto)
        onnxscript.optimizer.remove_unused_nodes(proto)
    _drop_zero_conv_biases(proto)
    _strip_exporter_metadata(proto)
    return proto


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Raise ``loggers`` to WARNING for the duration of the block."""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for logger, _ in saved:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def _strip_exporter_metadata(proto: "onnx.ModelProto") -> None:
    """Drop the exporter's per-node and per-tensor notes (stack traces, FX node text): they
    describe the exporting process, not the model, and take a third of a small model's file."""
    g = proto.graph
    for item in (*g.node, *g.input, *g.output, *g.value_info, *g.initializer):
        del item.metadata_props[:]


def _drop_zero_conv_biases(proto: "onnx.ModelProto") -> None:
    """Remove the all-zero bias the exporter gives a bias-free Conv (x + 0.0 == x)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Conv" and len(node.input) == 3 and node.input[2] in inits \
                and not numpy_helper.to_array(inits[node.input[2]]).any():
            del node.input[2]
    remove_unused_initializers(proto)


def remove_unused_initializers(proto: "onnx.ModelProto") -> None:
    """Drop initializers no node reads."""
    used = {i for n in proto.graph.node for i in n.input} | {o.name for o in proto.graph.output}
    keep = [t for t in proto.graph.initializer if t.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)


def _reads_weight(node: "onnx.NodeProto") -> bool:
    """A Conv, or a Gemm computing x @ W^T with W as stored by nn.Linear."""
    if node.op_type == "Conv":
        return len(node.input) >= 2
    if node.op_type == "Gemm":
        attrs = {a.name: a.i for a in node.attribute}
        return attrs.get("transB", 0) == 1 and attrs.get("transA", 0) == 0 and len(node.input) >= 2
    return False


def match_layers(proto: "onnx.ModelProto", layers: list[LayerQDQ]) -> dict[str, int]:
    """Index of the node computing each layer: the Conv/Gemm whose weight initializer equals the
    layer's float weights (ties broken by the initializer's name ``<layer>.weight``)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    readers = [(i, n.input[1]) for i, n in enumerate(proto.graph.node)
               if _reads_weight(n) and n.input[1] in inits]
    arrays = {w: numpy_helper.to_array(inits[w]) for _, w in readers}
    found: dict[str, int] = {}
    for layer in layers:
        hits = [(i, w) for i, w in readers if np.array_equal(arrays[w], layer.float_weight)]
        if len(hits) > 1:
            hits = [(i, w) for i, w in hits if w == f"{layer.name}.weight"]
        if len(hits) != 1:
            raise ExportError(
                f"layer {layer.name!r}: {'no' if not hits else 'more than one'} Conv/Gemm node of "
                "the exported graph reads its weights unchanged (expected exactly one; the "
                "exporter may have folded or transposed them)")
        if hits[0][0] in found.values():
            raise ExportError(f"layer {layer.name!r}: its node is claimed by another layer")
        found[layer.name] = hits[0][0]
    return found


def _tensor(name: str, values: np.ndarray, dtype: str) -> "onnx.TensorProto":
    """An integer initializer of ONNX type ``dtype`` (4-bit types packed two per byte)."""
    from onnx import TensorProto, helper, numpy_helper

    values = np.asarray(values)
    if dtype in ("UINT4", "INT4"):
        flat = (values.reshape(-1) & 0xF).astype(np.uint8)
        flat = np.append(flat, np.uint8(0)) if flat.size % 2 else flat
        packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)
        return helper.make_tensor(name, getattr(TensorProto, dtype), values.shape,
                                  packed.tobytes(), raw=True)
    return numpy_helper.from_array(values.astype(dtype.lower()), name)


def weight_nodes(prefix: str, w: WeightQDQ, output: str
                 ) -> tuple[list["onnx.NodeProto"], list["onnx.TensorProto"]]:
    """Codes, scale and zero point initializers and the DequantizeLinear that yields ``output``."""
    from onnx import helper, numpy_helper

    inits = [_tensor(f"{prefix}.weight_codes", w.codes, w.dtype),
             numpy_helper.from_array(w.scale, f"{prefix}.weight_scale"),
             _tensor(f"{prefix}.weight_zero_point", w.zero_point, w.dtype)]
    axis = {} if w.axis is None else {"axis": w.axis}
    node = helper.make_node("DequantizeLinear", [t.name for t in inits], [output],
                            name=f"{prefix}.weight_dequantize", **axis)
    return [node], inits


def act_nodes(prefix: str, a: ActQDQ, source: str
              ) -> tuple[list["onnx.NodeProto"], list["onnx.TensorProto"], str]:
    """(Clip ->) QuantizeLinear -> DequantizeLinear of tensor ``source``; returns the nodes, their
    initializers and the name of the dequantized output."""
    from onnx import helper, numpy_helper

    scale = numpy_helper.from_array(np.array(a.scale, np.float32), f"{prefix}.input_scale")
    zp = _tensor(f"{prefix}.input_zero_point", np.array(a.zero_point), a.dtype)
    nodes, inits = [], [scale, zp]
    if a.clip is not None:
        lo = numpy_helper.from_array(np.array(a.clip[0], np.float32), f"{prefix}.input_clip_min")
        hi = numpy_helper.from_array(np.array(a.clip[1], np.float32), f"{prefix}.input_clip_max")
        inits += [lo, hi]
        nodes.append(helper.make_node("Clip", [source, lo.name, hi.name], [f"{prefix}.input_clipped"],
                                      name=f"{prefix}.input_clip"))
        source = f"{prefix}.input_clipped"
    nodes += [
        helper.make_node("QuantizeLinear", [source, scale.name, zp.name], [f"{prefix}.input_codes"],
                         name=f"{prefix}.input_quantize"),
        helper.make_node("DequantizeLinear", [f"{prefix}.input_codes", scale.name, zp.name],
                         [f"{prefix}.input_dequantized"], name=f"{prefix}.input_dequantize"),
    ]
    return nodes, inits, f"{prefix}.input_dequantized"


def bias_nodes(prefix: str, bias: np.ndarray, output: str
               ) -> tuple[list["onnx.NodeProto"], list["onnx.TensorProto"], str]:
    """A Conv's bias as an Add of a (C, 1, 1) initializer after the Conv, which now writes the
    returned name. ONNX Runtime's default session would otherwise requantize a float bias read
    beside DequantizeLinear inputs to int32 at scale s_x * s_w (its WeightBiasQuantization),
    which is not texq's arithmetic."""
    from onnx import helper, numpy_helper

    init = numpy_helper.from_array(bias.reshape(-1, 1, 1), f"{prefix}.bias_nchw")
    conv_out = f"{prefix}.conv_output"
    node = helper.make_node("Add", [conv_out, init.name], [output], name=f"{prefix}.bias_add")
    return [node], [init], conv_out


def qdq_layer(node: "onnx.NodeProto", layer: LayerQDQ, inits: dict[str, "onnx.TensorProto"]
              ) -> tuple[list["onnx.NodeProto"], list["onnx.TensorProto"]]:
    """The QDQ form of one layer's node (rewritten in place): its weights as codes +
    DequantizeLinear (the dequantized tensor keeps the float initializer's name), its input through
    its own Q/DQ, and a Conv's bias as an Add after it. Returns the nodes in order (``node``
    among them) and the new initializers."""
    from onnx import numpy_helper

    before, after, tensors = [], [], []
    if layer.weight is not None:
        nodes, new = weight_nodes(layer.name, layer.weight, node.input[1])
        before += nodes
        tensors += new
    if layer.act is not None:
        nodes, new, node.input[0] = act_nodes(layer.name, layer.act, node.input[0])
        before += nodes
        tensors += new
    if node.op_type == "Conv" and len(node.input) == 3 and node.input[2] in inits:
        after, new, conv_out = bias_nodes(
            layer.name, numpy_helper.to_array(inits[node.input[2]]), node.output[0])
        tensors += new
        del node.input[2]
        node.output[0] = conv_out
    return [*before, node, *after], tensors


def replace_graph(proto: "onnx.ModelProto", nodes: list["onnx.NodeProto"],
                  tensors: list["onnx.TensorProto"]) -> None:
    """Give ``proto`` the nodes ``nodes``, and as initializers its own (those no node now produces,
    as a dequantized weight is) plus ``tensors``, dropping those no node reads."""
    graph = proto.graph
    produced = {o for n in nodes for o in n.output}
    kept = [t for t in graph.initializer if t.name not in produced]
    del graph.node[:], graph.initializer[:]
    graph.node.extend(nodes)
    graph.initializer.extend(kept + tensors)
    remove_unused_initializers(proto)


def insert_qdq(proto: "onnx.ModelProto", layers: list[LayerQDQ]) -> None:
    """Rewrite ``proto`` in place: every layer in its QDQ form (:func:`qdq_layer`)."""
    at = match_layers(proto, layers)
    by_node = {at[layer.name]: layer for layer in layers}
    inits = {t.name: t for t in proto.graph.initializer}
    new_nodes, new_inits = [], []
    for i, node in enumerate(copy.deepcopy(list(proto.graph.node))):
        if i in by_node:
            nodes, tensors = qdq_layer(node, by_node[i], inits)
            new_nodes += nodes
            new_inits += tensors
        else:
            new_nodes.append(node)
    replace_graph(proto, new_nodes, new_inits)
