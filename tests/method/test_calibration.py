"""Step 1: batched per-class optimisation is exactly the class-by-class one; centers; distillation."""

from __future__ import annotations

import pytest
import torch

from texq.method.bns import BNStatsCollector, bns_loss, layer_weights
from texq.method.calibration import CalibrationConfig, calibration_loss, synthesize
from texq.method.distill import DistillConfig, distill_images
from texq.models import create_model
from texq.util.nn_utils import frozen


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = create_model("resnet8a_cifar10")
    gen = torch.Generator().manual_seed(0)
    for bn in [mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)]:
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen) * 0.2)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
    return m.eval()


def _grad(model, x, labels, cfg, weights):
    x = x.clone().requires_grad_(True)
    info = model.texq_info
    with frozen(model), BNStatsCollector(model) as bns:
        bns.set_groups(labels, 10)
        logits = model(x)
        stats = [g.of_groups() for g in bns.collected()]
        loss, _ = calibration_loss(x, logits, labels, stats, bns.running(), weights, cfg,
                                   info.mean, info.std, use_laws=True)
    loss.backward()
    return x.grad


def test_batched_classes_give_each_image_its_own_class_gradient(model):
    """The joint loss is the mean of the per-class losses, so the gradient at a class's image is
    1/K of the gradient that class's loss alone gives it: the same optimisation under Adam."""
    cfg = CalibrationConfig()
    k, n = 10, 2
    x = torch.randn(k * n, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(k).repeat_interleave(n)
    weights = layer_weights(7, cfg.shallow_weight, cfg.deep_weight)
    joint = _grad(model, x, labels, cfg, weights)
    for c in (0, 3, 9):
        alone = _grad(model, x[labels == c], labels[labels == c], cfg, weights)
        assert torch.allclose(joint[labels == c], alone / k, rtol=1e-4, atol=1e-9)


def test_synthesize_shapes_centers_and_progress(model):
    cfg = CalibrationConfig(iters=8, warmup_iters=3, images_per_class=2)
    calib = synthesize(model, cfg, progress=False)
    assert calib.images.shape == (20, 3, 32, 32)
    assert calib.labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert len(calib.centers) == 7 and calib.centers[0].mean.shape == (10, 16)
    # the centers are the per-class BN-input statistics of the returned images
    with BNStatsCollector(model) as bns, torch.no_grad():
        model(calib.images[calib.labels == 4])
        s = bns.collected()[3]
    assert torch.allclose(calib.centers[3].mean[4], s.mean, atol=1e-5)
    assert torch.allclose(calib.centers[3].var[4], s.var, atol=1e-4)
    assert "laws" not in calib.history[0] and "laws" in calib.history[-1]  # warm-up without L_LAWS
    assert all(p.requires_grad for p in model.parameters())  # restored after step 1


def test_chunked_classes_give_the_one_batch_result(model):
    """Optimising 4 classes at a time (memory for large models) yields the same images and
    centers as all 10 in one batch: each chunk's loss is scaled by its share of the classes."""
    cfg = CalibrationConfig(iters=12, warmup_iters=4, images_per_class=2)
    whole = synthesize(model, cfg, progress=False, seed=3)
    chunks = synthesize(model, CalibrationConfig(iters=12, warmup_iters=4, images_per_class=2,
                                                 classes_per_step=4), progress=False, seed=3)
    assert torch.equal(whole.labels, chunks.labels)
    assert torch.allclose(whole.images, chunks.images, atol=1e-4)
    for a, b in zip(whole.centers, chunks.centers):
        assert torch.allclose(a.mean, b.mean, atol=1e-4) and torch.allclose(a.var, b.var, atol=1e-3)
    assert {h["classes_from"] for h in chunks.history} == {0, 4, 8}


def test_synthesis_lowers_its_loss(model):
    calib = synthesize(model, CalibrationConfig(iters=60, warmup_iters=10), progress=False)
    first, last = calib.history[1], calib.history[-1]  # both after the warm-up
    assert last["loss"] < first["loss"]


def test_distilled_images_match_bn_statistics_better_than_noise(model):
    cfg = DistillConfig(num_images=24, iters=30, batch_size=16)
    images = distill_images(model, cfg, progress=False)
    assert images.shape == (24, 3, 32, 32)
    noise = torch.randn(24, 3, 32, 32)
    with BNStatsCollector(model) as bns, torch.no_grad():
        model(images)
        distilled = bns_loss(bns.collected(), bns.running()).item()
        model(noise)
        plain = bns_loss(bns.collected(), bns.running()).item()
    assert distilled < 0.5 * plain
