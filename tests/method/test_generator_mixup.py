"""The GDFQ generator and mixup of samples (Eq. 9)."""

from __future__ import annotations

import pytest
import torch

from texq.method.generator import GDFQ_BN_EPS, Generator
from texq.method.kd import kd_loss
from texq.method.mixup import MIX_FORMS, mixed_scores, mixup_samples


@pytest.mark.parametrize("conditional_bn", [False, True])
def test_generator_output_shape_and_range(conditional_bn):
    torch.manual_seed(0)
    g = Generator(num_classes=10, img_size=32, conditional_bn=conditional_bn).train()
    x, y = g.sample(64)
    assert x.shape == (64, 3, 32, 32) and y.shape == (64,) and y.max() < 10
    # the affine-free output BN leaves each channel of a training batch at mean 0 and variance
    # v / (v + eps) of the tanh output's variance v: just under 1
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    var = x.var(dim=(0, 2, 3), unbiased=False)
    assert torch.all(var <= 1.0) and torch.all(var > 0.99)
    assert g.out_bn.weight is None
    bn1 = g.bn1.bn if conditional_bn else g.bn1
    assert bn1.eps == GDFQ_BN_EPS
    g.eval()
    assert g(torch.randn(2, 100), torch.tensor([1, 2])).shape == (2, 3, 32, 32)


def test_generator_is_conditional():
    torch.manual_seed(0)
    g = Generator(10).eval()
    z = torch.randn(1, 100).repeat(2, 1)
    with torch.no_grad():
        a, b = g(z, torch.tensor([0, 1]))
    assert not torch.allclose(a, b)


def test_generator_sizes():
    assert Generator(1000, img_size=224, conditional_bn=True).init_size == 56
    with pytest.raises(ValueError):
        Generator(10, img_size=30)


def test_mixup_leaves_a_one_minus_p_share_untouched():
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(20000, dtype=torch.float32).view(-1, 1)
    for p in (0.0, 0.2, 0.5, 1.0):
        mixed_x, mixed = mixup_samples(x, p, gen)
        assert abs(mixed.float().mean().item() - p) < 0.015
        assert torch.equal(mixed_x[~mixed], x[~mixed])


def test_mixed_samples_are_convex_combinations_of_two_batch_samples():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(500, 3, 4, 4)
    mixed_x, mixed = mixup_samples(x, 0.5, gen)
    flat, orig = mixed_x.flatten(1), x.flatten(1)
    for i in torch.nonzero(mixed).flatten()[:50].tolist():
        # some j and lam in [0, 1] with mixed = lam * x_i + (1 - lam) * x_j
        d = orig - orig[i]  # x_j - x_i
        target = flat[i] - orig[i]  # (1 - lam) (x_j - x_i)
        coef = (d @ target) / d.square().sum(dim=1).clamp_min(1e-12)
        resid = (coef[:, None] * d - target).abs().max(dim=1).values
        j = int(resid.argmin())
        assert resid[j] < 1e-4 and -1e-5 <= coef[j] <= 1 + 1e-5


def test_kd_loss_against_its_definition():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 10, generator=gen), torch.randn(8, 10, generator=gen)
    temp = 20.0
    ps, pt = (s.double() / temp).softmax(1), (t.double() / temp).softmax(1)
    expected = (pt * (pt.log() - ps.log())).sum(1).mean() * temp * temp  # in float64
    assert kd_loss(s, t, temp, "batchmean").item() == pytest.approx(expected.item(), rel=1e-4)
    # the lineage's nn.KLDivLoss() default: the element-wise terms averaged over batch x classes
    assert kd_loss(s, t, temp).item() == pytest.approx(expected.item() / 10, rel=1e-4)
    assert kd_loss(t, t, temp).item() == pytest.approx(0.0, abs=1e-4)  # float32 x T^2
    assert kd_loss(s, t, 1.0).item() > 0
    with pytest.raises(ValueError, match="sum"):
        kd_loss(s, t, temp, "sum")


@pytest.mark.parametrize("form", MIX_FORMS)
def test_each_mix_form_scores_each_sample_s_own_mix(form):
    """Whatever the form, Q's score of a sample in the KD term is Q on that sample's mix, scored
    alone (a slow reference: one sample at a time), the CE pass is Q on the samples, and every
    form draws the same mixes."""
    torch.manual_seed(0)
    q = torch.nn.Linear(6, 3)
    x = torch.randn(12, 6)
    torch.manual_seed(1)
    x_mix, mask = mixup_samples(x, 0.5)
    assert 0 < mask.sum() < 12
    torch.manual_seed(1)
    out, student, kd_in, mixed, overflow = mixed_scores(q, x, 0.5, form, capacity=12)
    with torch.no_grad():
        alone = torch.stack([q(row) for row in kd_in])
        assert torch.allclose(out[:12], q(x), atol=1e-6)
    assert torch.allclose(student, alone, atol=1e-6)
    if form == "none":
        assert torch.equal(kd_in, x) and not mixed.any() and overflow is None
    else:
        assert torch.equal(mixed, mask) and torch.equal(kd_in, x_mix)
        assert (overflow == 0) if form == "bounded" else overflow is None


def test_mixes_past_the_bounded_capacity_stay_unmixed_and_are_counted():
    torch.manual_seed(0)
    q = torch.nn.Linear(6, 3)
    x = torch.randn(12, 6)
    torch.manual_seed(1)
    _, mask = mixup_samples(x, 0.5)
    m = int(mask.sum())
    torch.manual_seed(1)
    _, student, kd_in, kept, overflow = mixed_scores(q, x, 0.5, "bounded", capacity=m - 2)
    assert int(overflow) == 2 and int(kept.sum()) == m - 2 and not (kept & ~mask).any()
    first = mask.nonzero().flatten()[:m - 2]  # the mixed samples first, in batch order
    assert torch.equal(kept.nonzero().flatten(), first)
    assert torch.equal(kd_in[~kept], x[~kept])
    with torch.no_grad():
        assert torch.allclose(student, q(kd_in), atol=1e-6)
    with pytest.raises(ValueError, match="mix form 'all'"):
        mixed_scores(q, x, 0.5, "all")

