"""LAWS filters, the texture energy distribution T, dominant elements and L_LAWS (Eq. 5-6)."""

from __future__ import annotations

import pytest
import torch

from texq.method.texture import (
    FILTER_NAMES,
    LawsLossConfig,
    TextureConfig,
    dominant_count,
    dominant_set,
    laws_filters,
    laws_loss,
    texture_energy,
)
from texq.util.errors import ConfigError

EQ5_R5R5 = [
    [1, -4, 6, -4, 1],
    [-4, 16, -24, 16, -4],
    [6, -24, 36, -24, 6],
    [-4, 16, -24, 16, -4],
    [1, -4, 6, -4, 1],
]
RAW = TextureConfig(denormalize=False)


def test_r5r5_is_the_printed_matrix():
    bank = laws_filters()
    assert bank.shape == (16, 1, 5, 5)
    assert bank[FILTER_NAMES.index("R5R5"), 0].tolist() == EQ5_R5R5


def test_filters_are_outer_products_and_zero_sum():
    bank = laws_filters()[:, 0]
    e5 = torch.tensor([-1.0, -2, 0, 2, 1])
    s5 = torch.tensor([-1.0, 0, 2, 0, -1])
    # E5S5 = E5^T * S5: rows follow E5, columns follow S5 (a V-shape across, an edge down)
    assert torch.equal(bank[FILTER_NAMES.index("E5S5")], e5[:, None] * s5[None, :])
    assert torch.equal(bank.sum(dim=(1, 2)), torch.zeros(16))
    assert len(set(FILTER_NAMES)) == 16


@pytest.mark.parametrize("cfg", [RAW, TextureConfig(energy="abs", denormalize=False),
                                 TextureConfig(color="per_channel", denormalize=False),
                                 TextureConfig(filter_norm="l2", denormalize=False)])
def test_t_sums_to_one_and_ignores_brightness_scale_and_offset(cfg):
    x = torch.rand(4, 3, 32, 32)
    t = texture_energy(x, cfg)
    assert t.shape == (4, 16)
    assert torch.allclose(t.sum(dim=1), torch.ones(4), atol=1e-6)
    assert torch.all(t >= 0)
    assert torch.allclose(texture_energy(0.3 * x, cfg), t, atol=1e-5)  # darker image, same T
    assert torch.allclose(texture_energy(x + 0.2, cfg), t, atol=1e-5)  # zero-sum filters


def test_denormalisation_is_undone_first():
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    x = torch.rand(2, 3, 16, 16)
    normalised = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    t = texture_energy(normalised, TextureConfig(), mean, std)
    assert torch.allclose(t, texture_energy(x, RAW), atol=1e-5)
    with pytest.raises(ConfigError, match="mean and std"):
        texture_energy(normalised, TextureConfig())


def test_patterns_that_only_one_filter_sees():
    """Every LAWS vector sums to 0, so a separable filter AB responds to r*c (row times column)
    only through sum_k k*A_k * sum_k k*B_k, non-zero for E5 alone; and to the checkerboard
    (-1)^(r+c) only through sum_k (-1)^k A_k, non-zero for R5 alone (1+4+6+4+1 = 16)."""
    r = torch.arange(20.0).view(20, 1)
    c = torch.arange(20.0).view(1, 20)
    bilinear = (r * c).expand(1, 3, 20, 20) / 400
    checker = ((-1.0) ** (r + c)).expand(1, 3, 20, 20)
    for img, name in ((bilinear, "E5E5"), (checker, "R5R5")):
        t = texture_energy(img, RAW)[0]
        expected = torch.zeros(16)
        expected[FILTER_NAMES.index(name)] = 1.0
        assert torch.allclose(t, expected, atol=1e-6), name
        assert dominant_count(t.unsqueeze(0)).item() == 1


def test_dominant_count_by_hand():
    t = torch.tensor([[0.5, 0.31, 0.09, 0.05, 0.05] + [0.0] * 11,  # 0.5 + 0.31 > 0.8: 2 elements
                      [0.5, 0.25, 0.125, 0.125] + [0.0] * 12,  # 0.75, then 0.875: 3 elements
                      [1 / 16] * 16])  # 13 x 1/16 = 0.8125 > 0.8 > 12/16: 13 elements
    assert dominant_count(t).tolist() == [2, 3, 13]
    # "more than": a top element of exactly half is not more than half
    assert dominant_count(t, share=0.5).tolist() == [2, 2, 9]
    assert dominant_set(t, 3)[0].tolist() == pytest.approx([0.5, 0.31, 0.09])


def _t_with(k_max: float, rest: float) -> torch.Tensor:
    """A distribution whose top element is k_max and whose next 8 sum to rest."""
    tail = 1.0 - k_max - rest
    t = torch.tensor([k_max] + [rest / 8] * 8 + [tail / 7] * 7)
    assert t[1:9].min() >= t[9:].max()
    return t.unsqueeze(0)


def test_laws_loss_is_zero_inside_the_bounds():
    for k_max, rest in [(0.3, 0.5), (0.31, 0.49), (0.286, 0.514)]:
        assert laws_loss(_t_with(k_max, rest)).item() == pytest.approx(0.0, abs=1e-7)


def test_laws_loss_by_hand_outside_the_bounds():
    # K_max 0.5: |0.5 - 0.3| - 0.015 = 0.185 ; rest 0.4: |0.4 - 0.5| - 0.015 = 0.085
    assert laws_loss(_t_with(0.5, 0.4)).item() == pytest.approx(0.185 + 0.085, abs=1e-6)
    # two-sided as printed: too small a K_max costs too
    assert laws_loss(_t_with(0.2, 0.5)).item() == pytest.approx(0.085, abs=1e-6)
    # Eq. 6 read literally, with (1 - K_max): 0.3 gives |0.7 - 0.5| - 0.015 = 0.185
    literal = LawsLossConfig(rest_term="one_minus_max")
    assert laws_loss(_t_with(0.3, 0.5), literal).item() == pytest.approx(0.185, abs=1e-6)


def test_laws_loss_gradient_reaches_the_image():
    x = (torch.randn(3, 3, 32, 32) * 0.3).requires_grad_()
    loss = laws_loss(texture_energy(x, RAW)).sum()
    assert loss.item() > 0  # Gaussian noise is far outside the bounds (R5R5 dominates)
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # one step down the gradient lowers the loss
    with torch.no_grad():
        y = x - 0.01 * x.grad / x.grad.abs().max()
    assert laws_loss(texture_energy(y, RAW)).sum() < loss


def test_bad_texture_options():
    with pytest.raises(ConfigError):
        TextureConfig(energy="cube")
    with pytest.raises(ConfigError):
        LawsLossConfig(rest_term="other")
    with pytest.raises(ConfigError):
        LawsLossConfig(k=17)


def test_real_photos_show_the_papers_statistics():
    """The chosen T on real photographs (not CIFAR test images): at most 9 dominant elements,
    K_max near theta_U = 0.3 and the rest of K near theta_L = 0.5 (docs/interpretation.md);
    Gaussian noise concentrates on R5R5 instead."""
    pytest.importorskip("sklearn")
    from texq.data.photos import photo_crops

    t = texture_energy(photo_crops(n_per_scale=12, skimage=False), RAW)  # 96 crops
    counts = dominant_count(t)
    top = dominant_set(t, 9)
    assert counts.float().median() <= 9 and (counts <= 10).float().mean() > 0.95
    assert 0.2 <= top[:, 0].mean() <= 0.3
    assert 0.5 <= (top.sum(1) - top[:, 0]).mean() <= 0.65
    noise = texture_energy(torch.randn(64, 3, 32, 32) * 0.25 + 0.5, RAW)
    assert noise.argmax(dim=1).eq(FILTER_NAMES.index("R5R5")).all()
    assert dominant_set(noise, 9)[:, 0].mean() > 0.45
