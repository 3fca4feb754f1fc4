"""Which quantized layers the fast export can run on integer kernels, and the numbers it folds.

A layer's integer product needs INT8 weights (``codes - zero_point``), UINT8 activation codes and
u8 x s8 pairs that cannot saturate int16 (AVX2 kernels without VNNI); :func:`why_float` names
what fails. :func:`fold_batchnorm` is an inference BatchNormalization as ``y = a x + b``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from texq.export.qparams import ActQDQ, LayerQDQ, WeightQDQ
from texq.export.requant import INT16_PAIRS

if TYPE_CHECKING:
    import onnx


def weight_int8(w: WeightQDQ) -> np.ndarray | None:
    """``codes - zero_point`` as INT8 (the weight's shape), or None where it does not fit."""
    shape = (-1,) + (1,) * (w.codes.ndim - 1) if w.axis == 0 else ()
    diff = w.codes - w.zero_point.reshape(shape)
    return diff.astype(np.int8) if diff.min() >= -128 and diff.max() <= 127 else None


def act_key(a: ActQDQ) -> tuple:
    """Activation quantizers with equal keys give equal codes."""
    return float(a.scale), int(a.zero_point), int(a.bits)


def integer_input(a: ActQDQ | None) -> bool:
    """Whether ``a``'s codes fit UINT8 with their zero point."""
    return a is not None and a.bits <= 8 and 0 <= a.zero_point <= 255


def why_float(layer: LayerQDQ) -> str | None:
    """Why ``layer`` cannot be an integer product, or None if it can."""
    if layer.weight is None:
        return "weights kept in float"
    if layer.act is None:
        return "input kept in float (quantize_input=False)"
    if not integer_input(layer.act):
        return f"activation zero point {layer.act.zero_point} ({layer.act.bits} bits) fits no UINT8"
    w = weight_int8(layer.weight)
    if w is None:
        return "weight codes minus zero points fit no INT8"
    if 2 * (2 ** layer.act.bits - 1) * int(np.abs(w.astype(np.int64)).max(initial=0)) > INT16_PAIRS:
        return "u8 x s8 pairs could saturate int16 (AVX2 kernels without VNNI)"
    return None


def fold_batchnorm(bn: "onnx.NodeProto", inits: dict) -> tuple[np.ndarray, np.ndarray]:
    """a, b of an inference BatchNormalization y = a x + b, in float64."""
    from onnx import numpy_helper

    gamma, beta, mean, var = (numpy_helper.to_array(inits[n]).astype(np.float64) for n in bn.input[1:5])
    eps = next((at.f for at in bn.attribute if at.name == "epsilon"), 1e-5)
    a = gamma / np.sqrt(var + np.float64(np.float32(eps)))
    return a, beta - mean * a
