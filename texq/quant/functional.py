"""The paper's asymmetric quantizer (Eq. 1-2) as pure functions.

Eq. 1:  x_q = Clip(round(x_f * S - ZP), 0, 2^b - 1)   with S = (2^b - 1) / (x_max - x_min), ZP = x_min * S
Eq. 2:  x_d = (x_q + ZP) / S

``quantize_eq1`` / ``dequantize_eq2`` are the literal equations (slow, the reference).
``fake_quantize`` computes ``dequantize_eq2(quantize_eq1(x))`` in one fused torch kernel with a
straight-through gradient. In torch's terms the step is ``1/S`` and the zero point is ``-ZP``:
``round(x/step + z)`` is ``round(x*S - ZP)`` and ``(x_q - z) * step`` is ``(x_q + ZP) / S``.

Ranges broadcast against ``x`` along ``axis`` (per channel) or are scalars (per tensor).
A frozen per-tensor range (activations after calibration) takes the faster
``static_fake_quantize``, which computes the literal equations with Python-float parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: smallest allowed range x_max - x_min; a constant tensor would otherwise give S = inf
MIN_RANGE = 1e-8


def num_levels(bits: int) -> int:
    """2^b: the number of integer levels of a b-bit quantizer."""
    return 1 << bits


def scale_and_zero_point(
    x_min: Tensor, x_max: Tensor, bits: int, integer_zero_point: bool = True
) -> tuple[Tensor, Tensor]:
    """S and ZP of Eq. 1 for the range [x_min, x_max].

    With ``integer_zero_point`` ZP is rounded to an integer (as the ZeroQ/GDFQ code does), which
    makes 0.0 exactly representable; otherwise ZP = x_min * S exactly as printed.
    """
    span = torch.clamp(x_max - x_min, min=MIN_RANGE)
    scale = (num_levels(bits) - 1) / span
    zero_point = x_min * scale
    if integer_zero_point:
        zero_point = torch.round(zero_point)
    return scale, zero_point


def quantize_eq1(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int) -> Tensor:
    """Eq. 1 literally: the integer code of each element, in [0, 2^b - 1] (float dtype)."""
    return torch.clamp(torch.round(x * scale - zero_point), 0, num_levels(bits) - 1)


def dequantize_eq2(x_q: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """Eq. 2 literally: the real value of each integer code."""
    return (x_q + zero_point) / scale


def _broadcast(v: Tensor, x: Tensor, axis: int | None) -> Tensor:
    if axis is None or v.dim() == 0:
        return v
    shape = [1] * x.dim()
    shape[axis] = -1
    return v.reshape(shape)


def reference_fake_quantize(x: Tensor, x_min: Tensor, x_max: Tensor, bits: int,
                            axis: int | None = None, integer_zero_point: bool = True) -> Tensor:
    """Eq. 2 of Eq. 1, element by element as printed (no fusion, no gradient trick)."""
    scale, zp = scale_and_zero_point(x_min, x_max, bits, integer_zero_point)
    scale, zp = _broadcast(scale, x, axis), _broadcast(zp, x, axis)
    return dequantize_eq2(quantize_eq1(x, scale, zp, bits), scale, zp)


def _f32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float32 else t.float()


def fake_quantize(
    x: Tensor,
    x_min: Tensor,
    x_max: Tensor,
    bits: int,
    axis: int | None = None,
    integer_zero_point: bool = True,
    ste: str = "clipped",
) -> Tensor:
    """Quantize-dequantize ``x`` (Eq. 1 then Eq. 2) with a straight-through estimator.

    ``axis`` is the channel axis for per-channel ranges (``x_min``/``x_max`` of that length), or
    None for per-tensor ranges (0-d or one-element tensors).
    ``ste='clipped'``: the gradient is 1 where x falls inside the range and 0 where Eq. 1 clips;
    ``ste='identity'``: the gradient is 1 everywhere.
    """
    scale, zp = scale_and_zero_point(_f32(x_min), _f32(x_max), bits, integer_zero_point)
    step = scale.reciprocal()  # 1 / S, as ``1.0 / scale`` computes it
    # torch's per-channel kernel takes a float zero point as is (no rounding, no range check),
    # so the same op serves both zero-point modes; a per-tensor range is one "channel".
    if axis is None:
        out = torch.fake_quantize_per_channel_affine(
            x.reshape(1, -1), step.reshape(1), zp.neg().reshape(1), 0, 0, num_levels(bits) - 1
        ).reshape(x.shape)
    else:
        out = torch.fake_quantize_per_channel_affine(
            x, step, zp.neg(), axis % x.dim(), 0, num_levels(bits) - 1)
    if ste == "identity":
        return x + (out - x).detach()
    if ste != "clipped":
        raise ValueError(f"ste must be 'clipped' or 'identity', got {ste!r}")
    return out


@dataclass(frozen=True)
class StaticQParams:
    """Eq. 1 parameters of a frozen range as Python floats (no device sync when used)."""

    scale: float  # S
    zero_point: float  # ZP
    qmax: int  # 2^b - 1
    band_lo: float  # x below this is clipped to code 0 (gradient 0 with the clipped STE)
    band_hi: float  # x above this is clipped to code 2^b - 1


def static_qparams(x_min: Tensor, x_max: Tensor, bits: int, integer_zero_point: bool = True
                   ) -> StaticQParams:
    """Freeze a per-tensor range into :class:`StaticQParams` (the same float32 S and ZP as the
    tensor path, so both give identical codes)."""
    scale, zp = scale_and_zero_point(x_min.float(), x_max.float(), bits, integer_zero_point)
    s, z, qmax = float(scale), float(zp), num_levels(bits) - 1
    # round(x*S - ZP) lies in [0, qmax] exactly when x*S - ZP lies in [-0.5, qmax + 0.5]
    return StaticQParams(s, z, qmax, (z - 0.5) / s, (qmax + z + 0.5) / s)


class _StaticFakeQuantize(torch.autograd.Function):
    """Eq. 1 then Eq. 2 with scalar parameters, written as the equations (in place, 5 passes);
    the clipped STE's backward is one fused kernel (hardtanh's) on the saved input."""

    @staticmethod
    def forward(ctx, x: Tensor, p: StaticQParams, clipped: bool) -> Tensor:
        ctx.p, ctx.clipped = p, clipped
        if clipped:
            ctx.save_for_backward(x)
        out = torch.mul(x, p.scale).sub_(p.zero_point).round_().clamp_(0, p.qmax)
        return out.add_(p.zero_point).div_(p.scale)

    @staticmethod
    def backward(ctx, grad: Tensor):
        if not ctx.clipped:
            return grad, None, None
        (x,) = ctx.saved_tensors
        return torch.ops.aten.hardtanh_backward(grad, x, ctx.p.band_lo, ctx.p.band_hi), None, None


def static_fake_quantize(x: Tensor, p: StaticQParams, ste: str = "clipped") -> Tensor:
    """:func:`fake_quantize` for a frozen per-tensor range given as :class:`StaticQParams`."""
    if ste not in ("clipped", "identity"):
        raise ValueError(f"ste must be 'clipped' or 'identity', got {ste!r}")
    return _StaticFakeQuantize.apply(x, p, ste == "clipped")


def channel_min_max(w: Tensor, axis: int = 0) -> tuple[Tensor, Tensor]:
    """Per-channel min and max of ``w`` along every dimension but ``axis`` (no gradient)."""
    w = w.detach()
    flat = w.flatten(1) if axis == 0 else w.transpose(0, axis).reshape(w.shape[axis], -1)
    lo, hi = torch.aminmax(flat, dim=1)
    return lo, hi


def tensor_min_max(x: Tensor) -> tuple[Tensor, Tensor]:
    """Min and max of the whole tensor (no gradient)."""
    lo, hi = torch.aminmax(x.detach())
    return lo, hi
