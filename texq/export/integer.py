"""The fast export: texq's integer codes on ONNX Runtime's integer kernels, its results unchanged.

Every BatchNormalization that alone reads a quantized layer's output is folded into that layer
(a = gamma / sqrt(var + eps), b = beta - mean * a, in float64; a negative a flips no code). Then
each quantized layer becomes one of:

- **QLinearConv** (form ``"qlinear"``), where the layer's output reaches only the next layers'
  activation quantizer (through an optional Relu, or Clip as ReLU6 exports): UINT8 codes in, INT8 weights ``m (c - z)``, the
  next quantizer's codes out, with an int32 bias and per-channel scale fitted so that ONNX
  Runtime's requantization gives texq's code for every reachable accumulator
  (:mod:`texq.export.requant`); the next layer's QuantizeLinear is gone;
- **ConvInteger** + Cast, Mul, Add (form ``"conv_integer"``, every quantized Conv): the exact
  int32 accumulator, then ``acc * (s_x s_w a) + b`` in float32;
- **MatMulInteger** + Cast, Mul, Add: the classifier (a Gemm), in both forms;
- a float **Conv** (folded float weights, the input's codes dequantized) where the output must be a
  float: it feeds a residual addition, a pooling or the graph's output. An 8-bit requantization
  there would round a value texq keeps in float, and a b-bit network's codes flip on roundings
  that small (docs/interpretation.md, "Fast file"). A layer whose input texq keeps in float (the
  image), or whose codes fit no 8-bit container, is a float Conv too.

Activation codes come from QuantizeLinear (UINT8) and a Clip at 2^b - 1 on UINT8: Eq. 1's clip in
the integer domain. Every such layer is named in :attr:`IntegerGraph.float_layers` with the reason.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from texq.export.eligible import act_key, fold_batchnorm, integer_input, weight_int8, why_float
from texq.export.graph import act_nodes, match_layers, replace_graph
from texq.export.qparams import ActQDQ, LayerQDQ
from texq.export.requant import fit_layer

if TYPE_CHECKING:
    import onnx

FORMS = ("qlinear", "conv_integer")


@dataclass
class IntegerGraph:
    """What :func:`insert_integer` made of each layer."""

    integer_layers: dict[str, str] = field(default_factory=dict)  # layer -> its integer op type
    float_layers: dict[str, str] = field(default_factory=dict)  # layer -> why it is a float Conv
    folded_bn: int = 0  # BatchNormalization nodes folded into a layer


class _Rewriter:
    """One pass over the float graph's nodes, in their (topological) order."""

    def __init__(self, proto: "onnx.ModelProto", layers: list[LayerQDQ], form: str):
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        self.form, self.graph = form, proto.graph
        at = match_layers(proto, layers)
        self.layer_at = {at[layer.name]: layer for layer in layers}
        self.inits = {t.name: t for t in proto.graph.initializer}
        self.readers: dict[str, list[int]] = {}
        for i, node in enumerate(proto.graph.node):
            for name in node.input:
                self.readers.setdefault(name, []).append(i)
        self.outputs = {o.name for o in proto.graph.output}
        self.codes: dict[tuple, str] = {}  # (float tensor, act key) -> its UINT8 codes
        self.params: dict[tuple, tuple[str, str]] = {}  # act key -> its scale, zero point
        self.skip: set[int] = set()
        self.nodes: list = []
        self.tensors: list = []
        self.result = IntegerGraph()

    # --- small builders ---------------------------------------------------------------------

    def sole_reader(self, name: str, op_type: str) -> int | None:
        r = self.readers.get(name, [])
        if len(r) == 1 and name not in self.outputs and self.graph.node[r[0]].op_type == op_type:
            return r[0]
        return None

    def const(self, name: str, values) -> str:
        from onnx import numpy_helper

        self.tensors.append(numpy_helper.from_array(np.asarray(values), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, name: str, **attrs) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [output], name=name, **attrs))
        return output

    def clip(self, codes: str, lo: int, hi: int, prefix: str) -> str:
        """UINT8 ``codes`` clipped to [lo, hi] (no node where UINT8 saturation does it)."""
        if lo == 0 and hi == 255:
            return codes
        bounds = [self.const(f"{prefix}.codes_min", np.uint8(lo)) if lo else "",
                  self.const(f"{prefix}.codes_max", np.uint8(hi))]
        return self.node("Clip", [codes, *bounds], f"{prefix}.codes", f"{prefix}.codes_clip")

    def act_params(self, a: ActQDQ, prefix: str) -> tuple[str, str]:
        """The initializers of ``a``'s scale and UINT8 zero point, made once per quantizer."""
        key = act_key(a)
        if key not in self.params:
            self.params[key] = (self.const(f"{prefix}_scale", np.float32(a.scale)),
                                self.const(f"{prefix}_zero_point", np.uint8(a.zero_point)))
        return self.params[key]

    def input_codes(self, source: str, a: ActQDQ, prefix: str) -> str:
        """UINT8 codes of float tensor ``source`` under ``a`` (Eq. 1), made once per pair."""
        key = (source, *act_key(a))
        if key not in self.codes:
            q = self.node("QuantizeLinear", [source, *self.act_params(a, f"{prefix}.input")],
                          f"{prefix}.input_codes8", f"{prefix}.input_quantize")
            self.codes[key] = self.clip(q, 0, 2 ** a.bits - 1, f"{prefix}.input")
        return self.codes[key]

    # --- the pass -----------------------------------------------------------------------------

    def rewrite(self) -> IntegerGraph:
        for i, node in enumerate(copy.deepcopy(list(self.graph.node))):
            if i in self.skip:
                continue
            layer = self.layer_at.get(i)
            if layer is None:
                self.nodes.append(node)
            else:
                self.layer(node, layer)
        return self.result

    def fold(self, node: "onnx.NodeProto") -> tuple[np.ndarray, np.ndarray, str]:
        """a, b (float64, per output channel) of the layer's bias and the BatchNormalization that
        alone reads its output (folded: that node is skipped), and the tensor the layer now writes."""
        from onnx import numpy_helper

        channels = numpy_helper.to_array(self.inits[node.input[1]]).shape[0]
        a, b = np.ones(channels), np.zeros(channels)
        if len(node.input) == 3 and node.input[2]:
            b = numpy_helper.to_array(self.inits[node.input[2]]).astype(np.float64)
        out = node.output[0]
        bn = self.sole_reader(out, "BatchNormalization") if node.op_type == "Conv" else None
        if bn is not None:
            bn_a, bn_b = fold_batchnorm(self.graph.node[bn], self.inits)
            a, b, out = bn_a, b * bn_a + bn_b, self.graph.node[bn].output[0]
            self.skip.add(bn)
            self.result.folded_bn += 1
        return a, b, out

    def layer(self, node: "onnx.NodeProto", layer: LayerQDQ) -> None:
        a_bn, bias, out = self.fold(node)
        why = why_float(layer)
        if why is None and node.op_type == "Gemm" and any(
                at.name in ("alpha", "beta") and at.f != 1.0 for at in node.attribute):
            why = "a Gemm with alpha or beta other than 1"
        if why is None:
            w, prefix, act = weight_int8(layer.weight), layer.name, layer.act
            per_channel = np.broadcast_to(layer.weight.scale.astype(np.float64), a_bn.shape)
            scale = np.float64(act.scale) * per_channel * a_bn  # acc -> the layer's float output
            x = self.input_codes(node.input[0], act, prefix)
            if node.op_type == "Gemm":
                return self.integer_product("MatMulInteger", [x, self.const(
                    f"{prefix}.weight_int8", np.ascontiguousarray(w.T))], act, scale, bias, out, prefix, node)
            if self.form == "conv_integer":
                return self.integer_product("ConvInteger", [x, self.const(f"{prefix}.weight_int8", w)],
                                            act, scale, bias, out, prefix, node)
            why = self.qlinear(node, layer, x, w, scale, bias, out)
            if why is None:
                return
        self.result.float_layers[layer.name] = why
        self.float_layer(node, layer, a_bn, bias, out)

    def integer_product(self, op: str, inputs: list[str], act: ActQDQ, scale: np.ndarray,
                        bias: np.ndarray, out: str, prefix: str, node: "onnx.NodeProto") -> None:
        """``op`` (ConvInteger / MatMulInteger) to int32, then acc * scale + bias in float32."""
        from onnx import TensorProto

        zp = self.act_params(act, f"{prefix}.input")[1]
        acc = self.node(op, [*inputs, zp], f"{prefix}.acc", f"{prefix}.{op}")
        if op == "ConvInteger":
            self.nodes[-1].attribute.extend(node.attribute)
        shape = (-1, 1, 1) if op == "ConvInteger" else (-1,)
        y = self.node("Cast", [acc], f"{prefix}.acc_float", f"{prefix}.acc_cast", to=TensorProto.FLOAT)
        y = self.node("Mul", [y, self.const(f"{prefix}.output_scale", scale.astype(np.float32).reshape(shape))],
                      f"{prefix}.acc_scaled", f"{prefix}.output_scale_mul")
        self.node("Add", [y, self.const(f"{prefix}.output_bias", bias.astype(np.float32).reshape(shape))],
                  out, f"{prefix}.output_bias_add")
        self.result.integer_layers[prefix] = op

    def float_layer(self, node: "onnx.NodeProto", layer: LayerQDQ, a_bn: np.ndarray,
                    bias: np.ndarray, out: str) -> None:
        """The layer as a float Conv/Gemm on folded float weights (texq's dequantized weights
        times a) and bias b, reading its input's dequantized codes."""
        prefix, act, source = layer.name, layer.act, node.input[0]
        if integer_input(act):
            codes = self.input_codes(source, act, prefix)
            source = self.node("DequantizeLinear", [codes, *self.act_params(act, f"{prefix}.input")],
                               f"{prefix}.input_dequantized", f"{prefix}.input_dequantize")
        elif act is not None:
            nodes, tensors, source = act_nodes(prefix, act, source)
            self.nodes += nodes
            self.tensors += tensors
        w = layer.weight.dequantize() if layer.weight is not None else layer.float_weight
        shape = (-1,) + (1,) * (w.ndim - 1)
        weight = self.const(f"{prefix}.weight_folded", (w.astype(np.float64) * a_bn.reshape(shape)).astype(np.float32))
        b = self.const(f"{prefix}.bias_folded", bias.astype(np.float32))
        self.node(node.op_type, [source, weight, b], out, f"{prefix}.{node.op_type.lower()}")
        self.nodes[-1].attribute.extend(node.attribute)

    # --- QLinearConv ----------------------------------------------------------------------------

    def activation(self, out: str) -> tuple[int | None, float, float]:
        """The Relu, or Clip with constant bounds, alone reading ``out`` (its node index, or None)
        and the interval it clips to."""
        from onnx import numpy_helper

        relu = self.sole_reader(out, "Relu")
        if relu is not None:
            return relu, 0.0, np.inf
        clip = self.sole_reader(out, "Clip")
        if clip is not None:
            names = (list(self.graph.node[clip].input[1:]) + ["", ""])[:2]
            if all(n == "" or n in self.inits for n in names):
                lo, hi = (float(numpy_helper.to_array(self.inits[n])) if n else default
                          for n, default in zip(names, (-np.inf, np.inf)))
                return clip, lo, hi
        return None, -np.inf, np.inf

    def next_quantizer(self, out: str) -> tuple[ActQDQ, int | None, int, int, str] | None:
        """The one activation quantizer reading ``out`` (through an optional sole Relu or Clip),
        that node, the code range the Relu/Clip leaves (quant is monotone, so quant(clip(y, l, h))
        = clip(quant(y), quant(l), quant(h))), and the float tensor quantized; None if anything
        else reads it."""
        act_at, lo, hi = self.activation(out)
        src = self.graph.node[act_at].output[0] if act_at is not None else out
        readers = self.readers.get(src, [])
        if not readers or src in self.outputs:
            return None
        acts = []
        for r in readers:
            nxt = self.layer_at.get(r)
            if nxt is None or why_float(nxt) is not None or self.graph.node[r].input[0] != src:
                return None
            acts.append(nxt.act)
        if len({act_key(x) for x in acts}) != 1:
            return None
        a = acts[0]
        qmax = 2 ** a.bits - 1

        def code(v: float) -> int:  # Eq. 1 of a bound (0 -> the zero point exactly)
            return int(np.clip(np.rint(np.float32(v) / np.float32(a.scale)) + a.zero_point, 0, qmax))
        return a, act_at, code(lo) if np.isfinite(lo) else 0, code(hi) if np.isfinite(hi) else qmax, src

    def qlinear(self, node, layer, x, w, scale, bias, out) -> str | None:
        """The layer as QLinearConv writing the next quantizer's codes, where a requantization
        that gives texq's codes is found for every output channel; else why not."""
        found = self.next_quantizer(out)
        if found is None:
            return ("output read in float (a residual addition, a pooling, the graph's output, or "
                    "layers that do not all quantize it alike)")
        nxt, act_at, lo, hi, src = found
        fits = fit_layer(w, scale, bias, layer.act, nxt, lo, hi)
        if isinstance(fits, str):
            return fits
        prefix, a = layer.name, layer.act
        mult = np.array([f.multiplier for f in fits]) * np.where(scale < 0, -1, 1)
        stored = w.astype(np.int64) * mult.reshape(-1, 1, 1, 1)
        if stored.min() < -128 or stored.max() > 127:
            raise RuntimeError(f"layer {prefix!r}: weights m (c - z) left INT8")  # fit_layer bounds m
        inputs = [x, *self.act_params(a, f"{prefix}.input"),
                  self.const(f"{prefix}.weight_int8", stored.astype(np.int8)),
                  self.const(f"{prefix}.weight_scale", np.array([f.scale for f in fits], np.float32)),
                  self.const(f"{prefix}.weight_zero_point", np.zeros(len(fits), np.int8)),
                  *self.act_params(nxt, f"{prefix}.output"),
                  self.const(f"{prefix}.bias_int32", np.array([f.bias for f in fits], np.int32))]
        codes = self.node("QLinearConv", inputs, f"{prefix}.output_codes8", f"{prefix}.qlinear_conv")
        self.nodes[-1].attribute.extend(node.attribute)
        self.codes[(src, *act_key(nxt))] = self.clip(codes, lo, hi, f"{prefix}.output")
        if act_at is not None:
            self.skip.add(act_at)
        self.result.integer_layers[prefix] = "QLinearConv"
        return None


def insert_integer(proto: "onnx.ModelProto", layers: list[LayerQDQ], form: str = "qlinear"
                   ) -> IntegerGraph:
    """Rewrite ``proto`` (the float graph) in place into the fast form; see the module's text."""
    rewriter = _Rewriter(proto, layers, form)
    result = rewriter.rewrite()
    replace_graph(proto, rewriter.nodes, rewriter.tensors)
    return result
