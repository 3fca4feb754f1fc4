"""BN statistics collection and the BNS losses against independent computations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from texq.method.bns import (
    BNStatsCollector,
    LayerStats,
    batch_mean_var,
    bn_layers,
    bns_loss,
    distort,
    group_mean_var,
    layer_weights,
)
from texq.models import create_model


def test_layer_weights_for_resnet20_by_hand():
    # akamaster ResNet-20: 19 BN layers, ceil(19/2) - 2 = 8: l = 1..7 shallow, 8..19 deep
    assert len(bn_layers(create_model("resnet20a_cifar10"))) == 19
    assert layer_weights(19, 0.2, 1.1) == pytest.approx([0.2] * 7 + [1.1] * 12)
    assert layer_weights(19, 0.0, 1.0) == [0.0] * 7 + [1.0] * 12
    # pytorchcv ResNet-20 (two projection shortcuts): 21 BN layers, ceil(21/2) - 2 = 9
    assert len(bn_layers(create_model("resnet20_cifar10"))) == 21
    assert layer_weights(21, 0.2, 1.1) == pytest.approx([0.2] * 8 + [1.1] * 13)
    # even L: the paper's ceiling is "the smallest integer greater than its input", so for
    # ResNet-18's 20 BN layers ceil(20/2) = 11 and layers 1..8 are shallow
    assert layer_weights(20, 0.0, 1.0) == [0.0] * 8 + [1.0] * 12


def test_group_statistics_equal_class_by_class():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 5, 6, 6, generator=gen) * 3 + 10  # large mean: two-pass variance matters
    labels = torch.tensor([7, 0, 1, 7, 7, 0, 1, 1, 0, 7, 7, 1])  # classes 2..6 absent
    g = group_mean_var(x, labels, 10)
    assert g.counts.tolist() == [3, 4, 0, 0, 0, 0, 0, 5, 0, 0]
    for c in range(10):
        xs = x[labels == c]
        if len(xs):
            assert torch.allclose(g.mean[c], xs.mean(dim=(0, 2, 3)), atol=1e-5)
            assert torch.allclose(g.var[c], xs.var(dim=(0, 2, 3), unbiased=False), atol=1e-4)
        else:  # an absent class: a zero row, and masked out of per-group losses
            assert not g.mean[c].any() and not g.var[c].any()
    assert g.of_groups().present.tolist() == [1, 1, 0, 0, 0, 0, 0, 1, 0, 0]
    whole = batch_mean_var(x)
    assert torch.allclose(whole.mean, x.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(whole.var, x.var(dim=(0, 2, 3), unbiased=False), atol=1e-4)
    # pooling the groups' statistics gives the whole batch's (law of total variance)
    pooled = g.pooled()
    assert torch.allclose(pooled.mean, whole.mean, atol=1e-5)
    assert torch.allclose(pooled.var, whole.var, atol=1e-4)


def test_per_group_loss_averages_over_the_groups_present_only():
    centers = [LayerStats(torch.zeros(10, 2), torch.zeros(10, 2))]
    x = torch.tensor([[1.0, 1.0], [3.0, 3.0]]).view(2, 2, 1, 1)  # one sample each of classes 2, 5
    (g,) = [group_mean_var(x, torch.tensor([2, 5]), 10).of_groups()]
    # class 2: mean (1, 1) -> MSE 1; class 5: mean (3, 3) -> MSE 9; variances 0; the 8 absent
    # classes are left out: (1 + 9) / 2, not (1 + 9) / 10
    assert bns_loss([g], centers).item() == pytest.approx(5.0)
    # without the mask every group counts
    unmasked = LayerStats(g.mean, g.var)
    assert bns_loss([unmasked], centers).item() == pytest.approx(1.0)


def test_group_statistics_need_the_number_of_groups():
    model = create_model("resnet8a_cifar10")
    with BNStatsCollector(model) as bns, pytest.raises(ValueError, match="number of groups"):
        bns.set_groups(torch.tensor([0, 1]))


def test_collector_records_bn_inputs():
    model = create_model("resnet20a_cifar10")
    seen = {}
    bn = model.layer2[0].bn1
    handle = bn.register_forward_hook(lambda m, i, o: seen.setdefault("x", i[0].detach()))
    x = torch.randn(6, 3, 32, 32)
    with BNStatsCollector(model) as bns:
        model(x)
    handle.remove()
    idx = bn_layers(model).index(bn)
    s = bns.collected()[idx]
    assert torch.allclose(s.mean, seen["x"].mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(s.var, seen["x"].var(dim=(0, 2, 3), unbiased=False), atol=1e-4)
    assert len(bns.running()) == 19
    assert torch.equal(bns.running()[idx].var, bn.running_var)
    # hooks are removed on exit
    assert not bn._forward_pre_hooks


def test_bns_loss_by_hand():
    s = [LayerStats(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0])),
         LayerStats(torch.tensor([0.0, 0.0]), torch.tensor([4.0, 1.0]))]
    t = [LayerStats(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 4.0])),
         LayerStats(torch.tensor([3.0, 4.0]), torch.tensor([4.0, 1.0]))]
    # Eq. 3 as printed -- layer 1: ||(0, 2)|| + ||(0, -3)|| = 5 ; layer 2: ||(-3, -4)|| + 0 = 5
    assert bns_loss(s, t, norm="l2").item() == pytest.approx(10.0)
    # layer weights scale each layer's norms: 0.5 * 5 + 2 * 5
    assert bns_loss(s, t, torch.tensor([0.5, 2.0]), norm="l2").item() == pytest.approx(12.5)
    # the lineage's MSE form: per-layer mean squares (0 + 4)/2 + (0 + 9)/2 = 6.5 and
    # (9 + 16)/2 + 0 = 12.5, averaged over the 2 layers
    assert bns_loss(s, t).item() == pytest.approx(9.5)
    # weights multiply each layer's term; a zero-weight layer is left out of the average
    assert bns_loss(s, t, torch.tensor([2.0, 0.0])).item() == pytest.approx(2 * 6.5)
    assert bns_loss(s, t, torch.tensor([0.2, 1.1])).item() == pytest.approx((0.2 * 6.5 + 1.1 * 12.5) / 2)


def test_bns_loss_per_group_sums_groups():
    s = [LayerStats(torch.tensor([[0.0, 0.0], [1.0, 1.0]]), torch.ones(2, 2))]
    t = [LayerStats(torch.tensor([[3.0, 4.0], [1.0, 1.0]]), torch.ones(2, 2))]
    # group 0 costs ||(3, 4)|| = 5, group 1 nothing: the mean over groups is 2.5
    assert bns_loss(s, t, norm="l2").item() == pytest.approx(2.5)
    # a (C,) target is broadcast to every group
    t1 = [LayerStats(torch.tensor([1.0, 1.0]), torch.ones(2))]
    assert bns_loss(s, t1, norm="l2").item() == pytest.approx((2 ** 0.5 + 0) / 2)


def test_bns_loss_is_zero_on_its_own_statistics_and_has_gradient():
    model = create_model("resnet20a_cifar10")
    x = torch.randn(8, 3, 32, 32, requires_grad=True)
    with BNStatsCollector(model) as bns:
        model(x)
        stats = bns.collected()
        detached = [LayerStats(s.mean.detach(), s.var.detach()) for s in stats]
        assert bns_loss(stats, detached).item() == pytest.approx(0.0, abs=1e-6)
        loss = bns_loss(stats, bns.running())
    loss.backward()
    assert x.grad.abs().sum() > 0


def test_distorted_targets_have_the_requested_spread():
    base = [LayerStats(torch.full((20000,), 2.0), torch.full((20000,), 5.0))]
    gen = torch.Generator().manual_seed(0)
    (d,) = distort(base, nu_mu=0.5, nu_sigma=1.0, generator=gen)
    assert (d.mean - 2.0).mean().abs() < 0.02 and (d.mean - 2.0).std() == pytest.approx(0.5, rel=0.03)
    assert (d.var - 5.0).std() == pytest.approx(1.0, rel=0.03)
    (d2,) = distort(base, 0.5, 1.0, generator=gen)
    assert not torch.equal(d.mean, d2.mean)  # fresh noise at each call


def test_collector_needs_batchnorm():
    with pytest.raises(ValueError, match="no BatchNorm"):
        BNStatsCollector(nn.Sequential(nn.Conv2d(3, 3, 1)))
