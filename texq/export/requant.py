"""Integer requantization that reproduces texq's rounding exactly (numpy only).

A quantized convolution whose output is read only by the next layer's activation quantizer (after
BatchNormalization and an optional ReLU) computes, per output channel,

    code(acc) = clip(round(acc * K + beta) + zp, lo, hi)

from its exact int32 accumulator ``acc`` (K = s_x s_w a / s_y, beta = b / s_y, the folded BN's a and
b). ONNX Runtime's QLinearConv computes instead

    code(acc) = clip(nearbyint(float32(m acc + B) * M) + zp, lo, hi)

with an integer bias B, a float32 multiplier M = (s_x * w_scale) / s_y, and here weights stored as
m (c - z) for an integer m >= 1. Rounding beta / K to an integer B shifts every rounding boundary,
which flips codes wherever a value lies near one; and a b-bit network's codes are chaotic enough
that such flips change its predictions. Both functions are non-decreasing steps in ``acc``, and
only the (at most 2^b - 1) steps inside the reachable accumulator range and the clip matter, so
:func:`fit_channel` searches B near m beta / K and an M between the bounds each step sets, and
keeps a pair only when ORT's float32 arithmetic, emulated, gives the same code on both sides of
every step: then the two functions are equal for every reachable accumulator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from texq.export.qparams import ActQDQ

#: integers tried for B on each side of m * beta / K
B_CANDIDATES = 16
#: u8 x s8 products are summed in pairs into int16 by AVX2 kernels without VNNI (saturating)
INT16_PAIRS = 32767


@dataclass(frozen=True)
class ChannelFit:
    multiplier: int  # m: the weights are stored as m (c - z), times the sign of K
    bias: int  # B (int32)
    scale: np.float32  # w_scale with s_x * w_scale / s_y = M (float32)


def target_codes(acc: np.ndarray, k: float, beta: float, zp: int, lo: int, hi: int) -> np.ndarray:
    """texq's code of each accumulator: clip(round(acc K + beta) + zp, lo, hi), in float64."""
    return np.clip(np.rint(acc * k + beta) + zp, lo, hi).astype(np.int64)


def ort_codes(acc: np.ndarray, m: int, bias: int, scale: np.float32, x_scale: np.float32,
              y_scale: np.float32, zp: int, lo: int, hi: int) -> np.ndarray:
    """ONNX Runtime's QLinearConv code of each accumulator (float32 requantization, round half to
    even), then the clip to [lo, hi]."""
    mult = np.float32(np.float32(x_scale * scale) / y_scale)
    value = (np.asarray(m * acc + bias, np.int64).astype(np.float32) * mult).astype(np.float32)
    return np.clip(np.rint(value) + zp, lo, hi).astype(np.int64)


def steps(k: float, beta: float, zp: int, lo: int, hi: int, acc_lo: int, acc_hi: int
          ) -> list[tuple[int, int]]:
    """(T, code at T) for every accumulator T in (acc_lo, acc_hi] where texq's code rises (k > 0)."""
    c_lo, c_hi = (int(target_codes(np.array([a]), k, beta, zp, lo, hi)[0]) for a in (acc_lo, acc_hi))
    out = []
    for code in range(c_lo + 1, c_hi + 1):
        t = math.ceil((code - zp - 0.5 - beta) / k)
        t = min(max(t, acc_lo + 1), acc_hi)
        while t > acc_lo + 1 and target_codes(np.array([t - 1]), k, beta, zp, lo, hi)[0] >= code:
            t -= 1
        while target_codes(np.array([t]), k, beta, zp, lo, hi)[0] < code:
            t += 1
        out.append((t, int(target_codes(np.array([t]), k, beta, zp, lo, hi)[0])))
    return out


def fit_channel(k: float, beta: float, zp: int, lo: int, hi: int, acc_lo: int, acc_hi: int,
                max_multiplier: int, x_scale: np.float32, y_scale: np.float32) -> ChannelFit | None:
    """An (m, B, w_scale) whose ORT codes equal texq's for every accumulator in [acc_lo, acc_hi]
    (k > 0), trying the largest multiplier first; None if none is found."""
    jumps = steps(k, beta, zp, lo, hi, acc_lo, acc_hi)
    check = np.array(sorted({acc_lo, acc_hi, *(t for t, _ in jumps), *(t - 1 for t, _ in jumps)}))
    want = target_codes(check, k, beta, zp, lo, hi)
    for m in range(max_multiplier, 0, -1):
        centre = m * beta / k
        for d in sorted(range(-B_CANDIDATES, B_CANDIDATES + 1), key=abs):
            bias = int(round(centre)) + d
            if abs(bias) >= 2 ** 31 - abs(m) * max(abs(acc_lo), abs(acc_hi)):
                continue
            mult = _multiplier(jumps, zp, m, bias, k / m)
            if mult is None:
                continue
            scale = np.float32(mult * float(y_scale) / float(x_scale))
            got = ort_codes(check, m, bias, scale, x_scale, y_scale, zp, lo, hi)
            if np.array_equal(got, want):
                return ChannelFit(m, bias, scale)
    return None


def _multiplier(jumps: list[tuple[int, int]], zp: int, m: int, bias: int, ideal: float
                ) -> float | None:
    """A float M > 0 with round((m T + B) M) reaching each step's code at T and not at T - 1, or
    None: the steps bound M from both sides; the middle of the bounds is taken."""
    lower, upper = 0.0, math.inf
    for t, code in jumps:
        edge = code - zp - 0.5  # (m T + B) M must reach it, (m (T - 1) + B) M must not
        p, q = m * t + bias, m * (t - 1) + bias
        if p > 0:
            lower = max(lower, edge / p)
        elif p < 0:
            upper = min(upper, edge / p)
        elif edge > 0:
            return None
        if q > 0:
            upper = min(upper, edge / q)
        elif q < 0:
            lower = max(lower, edge / q)
        elif edge <= 0:
            return None
    if not lower < upper:
        return None
    if not jumps:
        return ideal
    return (lower + upper) / 2 if math.isfinite(upper) else max(ideal, 2 * lower)


def fit_layer(w: np.ndarray, scale: np.ndarray, bias: np.ndarray, a: ActQDQ, nxt: ActQDQ,
              lo: int, hi: int) -> list[ChannelFit] | str:
    """Each output channel's exact requantization of a layer (INT8 weights ``w``, float output
    ``acc * scale + bias``, input quantizer ``a``) into ``nxt``'s codes clipped to [lo, hi]; or
    why a channel has none."""
    x_scale, y_scale = np.float32(a.scale), np.float32(nxt.scale)
    x_lo, x_hi = -a.zero_point, 2 ** a.bits - 1 - a.zero_point  # code - zero point
    fits = []
    for c in range(w.shape[0]):
        wc = w[c].astype(np.int64).reshape(-1) * (-1 if scale[c] < 0 else 1)
        k, beta = abs(float(scale[c])) / float(y_scale), float(bias[c]) / float(y_scale)
        top = int(np.abs(wc).max(initial=0))
        if k == 0 or top == 0:
            return f"output channel {c} is constant (no weight or a zero scale)"
        acc_lo = int(np.minimum(wc * x_lo, wc * x_hi).sum())
        acc_hi = int(np.maximum(wc * x_lo, wc * x_hi).sum())
        # m (c - z) stays INT8 with its sign; u8 x s8 pairs stay inside int16 (AVX2 without VNNI)
        most = min(127 // top, INT16_PAIRS // (2 * max(x_hi - x_lo, 1) * top))
        if most < 1:
            return f"output channel {c}: weights {top} x inputs {x_hi - x_lo} do not fit the int8 kernel"
        fit = fit_channel(k, beta, nxt.zero_point, lo, hi, acc_lo, acc_hi, most, x_scale, y_scale)
        if fit is None:
            return f"no exact requantization found for output channel {c}"
        fits.append(fit)
    return fits
