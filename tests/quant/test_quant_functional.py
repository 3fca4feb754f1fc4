"""The quantizer of Eq. 1-2 against hand-worked examples, its literal form and known properties."""

from __future__ import annotations

import pytest
import torch

from texq.quant import ActQuantizer, WeightQuantizer
from texq.quant.functional import (
    dequantize_eq2,
    fake_quantize,
    quantize_eq1,
    reference_fake_quantize,
    scale_and_zero_point,
    static_fake_quantize,
    static_qparams,
)


def t(*v):
    return torch.tensor(v, dtype=torch.float32)


def test_eq1_eq2_by_hand_two_bits():
    # range [-1, 2], b = 2: S = (2^2 - 1) / 3 = 1, ZP = -1 * S = -1
    scale, zp = scale_and_zero_point(t(-1.0), t(2.0), bits=2)
    assert float(scale) == 1.0 and float(zp) == -1.0
    x = t(-1.3, -0.6, 0.2, 0.7, 1.4, 2.8)
    # x*S - ZP = x + 1 = [-0.3, 0.4, 1.2, 1.7, 2.4, 3.8] -> round -> clip to [0, 3]
    q = quantize_eq1(x, scale, zp, bits=2)
    assert q.tolist() == [0, 0, 1, 2, 2, 3]
    # (x_q + ZP) / S = x_q - 1
    assert dequantize_eq2(q, scale, zp).tolist() == [-1, -1, 0, 1, 1, 2]
    fused = fake_quantize(x, t(-1.0), t(2.0), bits=2)
    assert fused.tolist() == [-1, -1, 0, 1, 1, 2]


@pytest.mark.parametrize("integer_zp, expected", [
    # ZP = -1.5 as printed: x*4 + 1.5 = [-0.9, 1.1, 2.7, 4.7, 7.9] -> [0, 1, 3, 5, 7]; (q - 1.5) / 4
    (False, [-0.375, -0.125, 0.375, 0.875, 1.375]),
    # ZP rounded to -2: x*4 + 2 = [-0.4, 1.6, 3.2, 5.2, 8.4] -> [0, 2, 3, 5, 7]; (q - 2) / 4
    (True, [-0.5, 0.0, 0.25, 0.75, 1.25]),
])
def test_eq1_eq2_by_hand_three_bits_zero_point_modes(integer_zp, expected):
    # range [-0.375, 1.375], b = 3: S = 7 / 1.75 = 4, ZP = -0.375 * 4 = -1.5
    lo, hi = t(-0.375), t(1.375)
    x = t(-0.6, -0.1, 0.3, 0.8, 1.6)
    ref = reference_fake_quantize(x, lo, hi, 3, integer_zero_point=integer_zp)
    fused = fake_quantize(x, lo, hi, 3, integer_zero_point=integer_zp)
    assert ref.tolist() == expected
    assert fused.tolist() == expected


def _mismatch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs() > 1e-6 * (1 + b.abs())


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("integer_zp", [True, False])
@pytest.mark.parametrize("per_channel", [True, False])
def test_fused_kernel_matches_literal_equations(bits, integer_zp, per_channel):
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(16, 8, 3, 3, generator=gen) * torch.rand(16, 1, 1, 1, generator=gen) * 3
    if per_channel:
        lo, hi = x.flatten(1).aminmax(dim=1)
        lo, hi = lo * 0.8, hi * 0.8  # some values fall outside and are clipped
        axis = 0
    else:
        lo, hi, axis = x.min() * 0.8, x.max() * 0.8, None
    ref = reference_fake_quantize(x, lo, hi, bits, axis, integer_zp)
    fused = fake_quantize(x, lo, hi, bits, axis, integer_zp)
    bad = _mismatch(fused, ref)
    # the two may differ only where x sits on a rounding boundary (float error), by one step
    assert bad.float().mean() < 1e-3
    if bad.any():
        scale, _ = scale_and_zero_point(lo, hi, bits, integer_zp)
        step = (1 / scale).reshape(-1, 1, 1, 1).expand_as(x) if per_channel else 1 / scale
        step = step[bad] if per_channel else step
        assert torch.all((fused[bad] - ref[bad]).abs() <= step * 1.0001)


@pytest.mark.parametrize("bits", range(2, 9))
def test_at_most_two_to_the_b_levels_per_channel(bits):
    w = torch.randn(32, 16, 3, 3) * 0.1
    wq = WeightQuantizer(bits)(w)
    for c in range(w.shape[0]):
        levels = torch.unique(wq[c])
        assert len(levels) <= 2 ** bits
    # with 144 values per channel and b <= 4 every level is used somewhere in some channel
    if bits <= 4:
        assert max(len(torch.unique(wq[c])) for c in range(32)) == 2 ** bits


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_levels_lie_on_the_integer_grid(bits):
    w = torch.randn(8, 50)
    lo, hi = w.aminmax(dim=1)
    wq = fake_quantize(w, lo, hi, bits, axis=0)
    scale, zp = scale_and_zero_point(lo, hi, bits)
    codes = wq * scale[:, None] - zp[:, None]  # Eq. 2 inverted: x_q = x_d * S - ZP
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.round().min() >= 0 and codes.round().max() <= 2 ** bits - 1


@pytest.mark.parametrize("integer_zp", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantize_is_idempotent(bits, integer_zp):
    x = torch.randn(1000) * 2
    lo, hi = t(-1.5), t(2.5)
    once = fake_quantize(x, lo, hi, bits, integer_zero_point=integer_zp)
    twice = fake_quantize(once, lo, hi, bits, integer_zero_point=integer_zp)
    assert torch.equal(once, twice)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_weight_quantizer_is_idempotent_with_recomputed_ranges(bits):
    w = torch.randn(16, 4, 3, 3)
    wq = WeightQuantizer(bits)
    once = wq(w)
    assert torch.allclose(wq(once), once, atol=1e-6)


@pytest.mark.parametrize("ste", ["clipped", "identity"])
def test_ste_gradient(ste):
    x = t(-3.0, -0.9, -0.2, 0.0, 0.4, 0.95, 2.5).requires_grad_()
    y = fake_quantize(x, t(-1.0), t(1.0), bits=4, ste=ste)
    y.backward(torch.ones_like(y))
    inside = [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    assert x.grad.tolist() == (inside if ste == "clipped" else [1.0] * 7)


def test_constant_tensor_is_kept():
    x = torch.full((4, 4), 0.37)
    lo, hi = x.aminmax()
    assert torch.allclose(fake_quantize(x, lo, hi, 4), x, atol=1e-6)


def test_error_shrinks_with_bits():
    x = torch.randn(10000)
    lo, hi = x.aminmax()
    errors = [(fake_quantize(x, lo, hi, b) - x).abs().max().item() for b in range(2, 9)]
    assert all(a > b for a, b in zip(errors, errors[1:]))
    # the largest error inside the range is half a step (plus the rounded zero point's shift)
    step = ((hi - lo) / 255).item()
    assert errors[-1] <= step * 1.0 + 1e-6


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("integer_zp", [True, False])
def test_static_path_equals_literal_equations(bits, integer_zp):
    """Frozen activation ranges take the scalar path: the same codes as Eq. 1-2, bit for bit."""
    x = torch.randn(4, 8, 6, 6) * 2
    lo, hi = t(-1.3), t(2.2)
    p = static_qparams(lo, hi, bits, integer_zp)
    expected = reference_fake_quantize(x, lo, hi, bits, integer_zero_point=integer_zp)
    assert torch.equal(static_fake_quantize(x, p), expected)


@pytest.mark.parametrize("ste", ["clipped", "identity"])
def test_static_path_ste_matches_fused_kernel(ste):
    x = torch.linspace(-3, 3, 2001).requires_grad_()
    lo, hi = t(-1.0), t(1.5)
    static_fake_quantize(x, static_qparams(lo, hi, 3), ste).sum().backward()
    g_static = x.grad.clone()
    x.grad = None
    fake_quantize(x, lo, hi, 3, ste=ste).sum().backward()
    assert torch.equal(g_static, x.grad)
    if ste == "clipped":
        inside = (x > -1.0) & (x < 1.5)
        assert torch.all(g_static[inside] == 1) and g_static.sum() < len(x)


def test_frozen_range_follows_loaded_state():
    q = ActQuantizer(bits=4)
    q.observing = True
    q(torch.tensor([0.0, 1.0]))
    q.observing = False
    x = torch.tensor([0.5, 1.7, 3.0])
    assert q(x).max().item() == pytest.approx(1.0)
    other = ActQuantizer(bits=4)
    other.observing = True
    other(torch.tensor([0.0, 3.0]))
    q.load_state_dict(other.state_dict())
    assert q(x).max().item() == pytest.approx(3.0)  # the cached frozen range was refreshed
