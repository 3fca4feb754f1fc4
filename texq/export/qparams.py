"""A fake-quantized model's QDQ parameters as plain arrays (torch only, no onnx import).

Eq. 1-2 in ONNX's terms: scale = 1/S and zero_point = -ZP, so that Eq. 1's code
c = clip(round(x*S - ZP), 0, 2^b - 1) dequantizes to (c - zero_point) * scale, which is what
DequantizeLinear computes. The weights' integer codes are recovered from texq's own fake-quantized
weights and checked to dequantize to them bit for bit.

Integer types: a weight's b-bit codes are held in the narrowest ONNX integer type (opset 21)
whose range holds every code 0..2^b - 1 and every zero point (UINT4 for 2-4 bits). Activation
codes go through an 8-bit QuantizeLinear: at 8 bits UINT8's saturation is exactly Eq. 1's clip;
below 8 bits an explicit Clip to the float values of codes 0 and 2^b - 1 comes first. (A UINT4
QuantizeLinear would saturate exactly at 4 bits too, but ONNX Runtime 1.32 fails to load a UINT4
QuantizeLinear behind a Clip, e.g. after MobileNetV2's ReLU6, and 8-bit activation Q/DQ is what
runtimes support most widely.)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from texq.quant.functional import (
    channel_min_max,
    fake_quantize,
    num_levels,
    scale_and_zero_point,
    static_qparams,
    tensor_min_max,
)
from texq.quant.modules import ActQuantizer, QuantConv2d, QuantLinear, WeightQuantizer
from texq.util.errors import ExportError

#: ONNX integer types usable by QuantizeLinear/DequantizeLinear at opset 21, with their ranges
INT_RANGES: dict[str, tuple[int, int]] = {
    "UINT4": (0, 15), "UINT8": (0, 255), "INT8": (-128, 127),
    "UINT16": (0, 65535), "INT16": (-32768, 32767),
}
#: candidate types for weight codes, narrowest first
WEIGHT_TYPES = ("UINT4", "UINT8", "INT8", "UINT16", "INT16")
#: candidate types for activation codes behind an explicit Clip (8-bit first: widest runtime support)
CLIPPED_ACT_TYPES = ("UINT8", "INT8", "UINT16", "INT16")


def integer_type(zero_points: np.ndarray, qmax: int, candidates: tuple[str, ...]) -> str | None:
    """The first of ``candidates`` holding codes 0..qmax and every zero point; None if none does."""
    lo, hi = int(np.min(zero_points)), int(np.max(zero_points))
    for name in candidates:
        tmin, tmax = INT_RANGES[name]
        if tmin <= 0 and qmax <= tmax and tmin <= lo and hi <= tmax:
            return name
    return None


@dataclass(frozen=True)
class WeightQDQ:
    """A layer's weights as Eq. 1 codes with DequantizeLinear's scale and zero point."""

    codes: np.ndarray  # int64 codes in [0, 2^b - 1], the weight's shape
    scale: np.ndarray  # float32 1/S: (C_out,) per output channel, () per tensor
    zero_point: np.ndarray  # int64 -ZP, the shape of ``scale``
    bits: int
    dtype: str  # ONNX integer type holding codes and zero points

    @property
    def axis(self) -> int | None:
        """DequantizeLinear's axis: 0 per output channel, None per tensor."""
        return 0 if self.scale.ndim == 1 else None

    def dequantize(self) -> np.ndarray:
        """(codes - zero_point) * scale in float32: DequantizeLinear's output."""
        shape = (-1,) + (1,) * (self.codes.ndim - 1) if self.axis == 0 else ()
        diff = (self.codes - self.zero_point.reshape(shape)).astype(np.float32)
        return diff * self.scale.reshape(shape)


@dataclass(frozen=True)
class ActQDQ:
    """A layer's input quantizer as QuantizeLinear/DequantizeLinear parameters."""

    scale: np.float32  # 1/S
    zero_point: int  # -ZP, in the code space of ``dtype``
    bits: int
    dtype: str  # ONNX integer type of QuantizeLinear's output
    clip: tuple[np.float32, np.float32] | None  # float values of codes 0 and 2^b - 1, or None


@dataclass(frozen=True)
class LayerQDQ:
    """One QuantConv2d/QuantLinear: its float weights (what the float graph holds) and quantizers."""

    name: str
    float_weight: np.ndarray
    weight: WeightQDQ | None  # None: weights kept in float
    act: ActQDQ | None  # None: input kept in float (the raw image unless quantize_input)


def _require_integer_zero_point(name: str, quantizer: nn.Module) -> None:
    if not quantizer.integer_zero_point:
        raise ExportError(
            f"layer {name!r}: integer_zero_point=False gives fractional zero points (ZP = x_min*S), "
            "which ONNX QuantizeLinear/DequantizeLinear cannot hold (their zero point is an "
            "integer); export a model quantized with integer_zero_point=True (the default)")


def weight_qdq(name: str, weight: torch.Tensor, wq: WeightQuantizer) -> WeightQDQ:
    """Codes, scale and zero point of ``weight`` under ``wq``; they dequantize exactly to texq's
    fake-quantized weight (the forward value, whichever straight-through estimator ``wq`` uses)."""
    _require_integer_zero_point(name, wq)
    w = weight.detach().float().cpu()
    lo, hi = channel_min_max(w, axis=0) if wq.per_channel else tensor_min_max(w)
    axis = 0 if wq.per_channel else None
    s, zp = scale_and_zero_point(lo, hi, wq.bits, integer_zero_point=True)
    with torch.no_grad():
        w_fq = fake_quantize(w, lo, hi, wq.bits, axis, integer_zero_point=True).numpy()
    scale = s.reciprocal().numpy().astype(np.float32)  # the step fake_quantize uses
    zero_point = (-zp).numpy().astype(np.int64)
    shape = (-1,) + (1,) * (w.dim() - 1) if axis == 0 else ()
    codes = np.rint(w_fq / scale.reshape(shape)).astype(np.int64) + zero_point.reshape(shape)
    qmax = num_levels(wq.bits) - 1
    dtype = integer_type(zero_point, qmax, WEIGHT_TYPES)
    if dtype is None:
        raise ExportError(f"layer {name!r}: weight zero points {zero_point.min()}..{zero_point.max()} "
                          f"fit no ONNX integer type ({', '.join(WEIGHT_TYPES)})")
    out = WeightQDQ(codes, scale, zero_point, wq.bits, dtype)
    if codes.min() < 0 or codes.max() > qmax or not np.array_equal(out.dequantize(), w_fq):
        raise RuntimeError(f"layer {name!r}: weight codes do not reproduce texq's fake-quantized "
                           "weights exactly")
    return out


def act_qdq(name: str, aq: ActQuantizer) -> ActQDQ:
    """QuantizeLinear/DequantizeLinear parameters of a calibrated (frozen) activation quantizer."""
    _require_integer_zero_point(name, aq)
    if not bool(aq.initialized):
        raise ExportError(f"layer {name!r}: its activation range is not calibrated "
                          "(run texq.calibrate(qmodel, batches) before exporting)")
    p = static_qparams(aq.x_min, aq.x_max, aq.bits, integer_zero_point=True)
    scale = np.float32(1.0) / np.float32(p.scale)
    zero_point = -int(p.zero_point)
    if aq.bits == 8 and 0 <= zero_point <= p.qmax:  # UINT8's saturation is Eq. 1's clip
        return ActQDQ(scale, zero_point, aq.bits, "UINT8", None)
    dtype = integer_type(np.array([zero_point]), p.qmax, CLIPPED_ACT_TYPES)
    if dtype is None:
        raise ExportError(f"layer {name!r}: activation zero point {zero_point} (range "
                          f"[{float(aq.x_min):.6g}, {float(aq.x_max):.6g}]) fits no ONNX integer type")
    clip = (np.float32(-zero_point) * scale, np.float32(p.qmax - zero_point) * scale)
    return ActQDQ(scale, zero_point, aq.bits, dtype, clip)


def quantized_layers(qmodel: nn.Module) -> list[LayerQDQ]:
    """Every QuantConv2d/QuantLinear of ``qmodel`` with its QDQ parameters, in module order."""
    out = []
    for name, m in qmodel.named_modules():
        if not isinstance(m, (QuantConv2d, QuantLinear)):
            continue
        for part in (m.weight_quant, m.act_quant):
            if not isinstance(part, (WeightQuantizer, ActQuantizer, nn.Identity)):
                raise ExportError(f"layer {name!r}: unknown quantizer {type(part).__name__}")
        weight = weight_qdq(name, m.weight, m.weight_quant) \
            if isinstance(m.weight_quant, WeightQuantizer) else None
        act = act_qdq(name, m.act_quant) if isinstance(m.act_quant, ActQuantizer) else None
        out.append(LayerQDQ(name, m.weight.detach().float().cpu().numpy(), weight, act))
    if not out:
        raise ExportError("the model has no quantized layer: export a model from texq.quantize "
                          "or a run's qmodel.pt")
    return out


def float_model(qmodel: nn.Module) -> nn.Module:
    """A CPU copy of ``qmodel`` whose quantizers are identities (the graph the QDQ nodes go into)."""
    fm = copy.deepcopy(qmodel).cpu().float().eval()
    for m in fm.modules():
        if isinstance(m, (QuantConv2d, QuantLinear)):
            m.weight_quant, m.act_quant = nn.Identity(), nn.Identity()
    return fm
