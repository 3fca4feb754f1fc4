"""quantize() / calibrate(): structure, ranges, options, and the shared model at 8 bits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from texq.eval import evaluate
from texq.models import create_model
from texq.quant import (
    ActQuantizer,
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    WeightQuantizer,
    act_quantizers,
    calibrate,
    quantize,
    set_observing,
)
from texq.util.errors import ConfigError


@pytest.fixture(scope="module")
def fp_model():
    torch.manual_seed(0)
    return create_model("resnet20_cifar10")


def noise(n=4, batch=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 32, 32, generator=gen) for _ in range(n)]


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 31, 33, -4, True, 4.0, "4"])
def test_bits_outside_range_are_refused(bits):
    with pytest.raises(ConfigError, match="2..8"):
        QuantConfig(w_bits=bits)
    with pytest.raises(ConfigError, match="a_bits"):
        QuantConfig(a_bits=bits)


def test_valid_bits_accepted():
    for b in [2, 3, 4, 5, 6, 7, 8, 32]:
        assert QuantConfig(w_bits=b, a_bits=b).w_bits == b


def test_quantize_leaves_original_untouched(fp_model):
    before = {k: v.clone() for k, v in fp_model.state_dict().items()}
    qmodel = quantize(fp_model, QuantConfig(w_bits=4, a_bits=4))
    assert qmodel is not fp_model
    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in fp_model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)))
    for k, v in fp_model.state_dict().items():
        assert torch.equal(v, before[k]), k
    calibrate(qmodel, noise())
    with torch.no_grad():
        qmodel(torch.randn(2, 3, 32, 32)).sum()
    for k, v in fp_model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_every_conv_and_linear_is_quantized_and_first_input_is_not(fp_model):
    qmodel = quantize(fp_model, QuantConfig(w_bits=4, a_bits=4))
    layers = [(n, m) for n, m in qmodel.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == 19 + 2 + 1  # 19 3x3 convs, 2 projection shortcuts, the classifier
    assert all(isinstance(m, (QuantConv2d, QuantLinear)) for _, m in layers)
    assert all(isinstance(m.weight_quant, WeightQuantizer) for _, m in layers)
    first_name, first = layers[0]
    assert first_name == "features.init_block.conv"
    assert isinstance(first.act_quant, nn.Identity)  # the raw image is not quantized
    assert all(isinstance(m.act_quant, ActQuantizer) for _, m in layers[1:])
    assert isinstance(layers[-1][1], QuantLinear)
    # BatchNorm stays unfolded
    assert sum(isinstance(m, nn.BatchNorm2d) for m in qmodel.modules()) == 21


def test_full_precision_config_changes_nothing(fp_model):
    qmodel = quantize(fp_model, QuantConfig(w_bits=32, a_bits=32))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(qmodel(x), fp_model(x))


def test_first_and_last_layer_bits(fp_model):
    qmodel = quantize(fp_model, QuantConfig(w_bits=3, a_bits=3, first_layer_bits=8, last_layer_bits=8))
    layers = [m for m in qmodel.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    assert layers[0].weight_quant.bits == 8
    assert layers[-1].weight_quant.bits == 8 and layers[-1].act_quant.bits == 8
    assert {m.weight_quant.bits for m in layers[1:-1]} == {3}
    assert {m.act_quant.bits for m in layers[1:-1]} == {3}


def test_quantize_input_option(fp_model):
    qmodel = quantize(fp_model, QuantConfig(quantize_input=True))
    first = next(m for m in qmodel.modules() if isinstance(m, QuantConv2d))
    assert isinstance(first.act_quant, ActQuantizer)


def test_uncalibrated_model_refuses_to_run(fp_model):
    qmodel = quantize(fp_model, QuantConfig(w_bits=4, a_bits=4))
    with pytest.raises(ConfigError, match="calibrate"):
        qmodel(torch.randn(1, 3, 32, 32))


def test_ema_of_batch_min_max_by_hand():
    q = ActQuantizer(bits=8, momentum=0.9)
    q.observing = True
    q(torch.tensor([-1.0, 3.0]))
    assert (float(q.x_min), float(q.x_max)) == (-1.0, 3.0)  # the first batch sets the range
    q(torch.tensor([-2.0, 1.0]))
    # 0.9 * -1 + 0.1 * -2 = -1.1 ; 0.9 * 3 + 0.1 * 1 = 2.8
    assert float(q.x_min) == pytest.approx(-1.1) and float(q.x_max) == pytest.approx(2.8)
    q(torch.tensor([0.0, 5.0]))
    # 0.9 * -1.1 + 0.1 * 0 = -0.99 ; 0.9 * 2.8 + 0.1 * 5 = 3.02
    assert float(q.x_min) == pytest.approx(-0.99) and float(q.x_max) == pytest.approx(3.02)
    q.observing = False
    q(torch.tensor([-100.0, 100.0]))
    assert float(q.x_min) == pytest.approx(-0.99) and float(q.x_max) == pytest.approx(3.02)


def test_calibrate_sets_then_freezes_ranges(fp_model):
    qmodel = quantize(fp_model, QuantConfig(w_bits=4, a_bits=4))
    assert calibrate(qmodel, noise(n=3)) == 3
    ranges = [(float(q.x_min), float(q.x_max)) for q in act_quantizers(qmodel)]
    assert all(hi > lo for lo, hi in ranges)
    assert all(lo == 0.0 for lo, _ in ranges[:-1])  # post-ReLU conv inputs start at 0
    with torch.no_grad():
        qmodel(torch.randn(8, 3, 32, 32) * 5)
    assert ranges == [(float(q.x_min), float(q.x_max)) for q in act_quantizers(qmodel)]
    # recalibrating forgets the old ranges
    set_observing(qmodel, True, reset=True)
    assert not any(bool(q.initialized) for q in act_quantizers(qmodel))


def test_calibrate_without_batches_is_an_error(fp_model):
    qmodel = quantize(fp_model, QuantConfig(w_bits=4, a_bits=4))
    with pytest.raises(ConfigError, match="no batches"):
        calibrate(qmodel, [])


def test_per_tensor_weights_option(fp_model):
    qmodel = quantize(fp_model, QuantConfig(w_bits=3, a_bits=32, per_channel=False))
    conv = qmodel.features.stage2.unit1.body.conv1.conv
    w = conv.weight_quant(conv.weight)
    assert len(torch.unique(w)) <= 8
    per_channel = quantize(fp_model, QuantConfig(w_bits=3, a_bits=32))
    conv_pc = per_channel.features.stage2.unit1.body.conv1.conv
    assert len(torch.unique(conv_pc.weight_quant(conv_pc.weight))) > 8


def test_fold_bn_matches_float_model(fp_model):
    # give BN non-trivial statistics so that folding matters
    model = create_model("resnet20_cifar10")
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    folded = quantize(model, QuantConfig(w_bits=32, a_bits=32, fold_bn=True))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-4)
    q = quantize(model, QuantConfig(w_bits=4, a_bits=4, fold_bn=True))
    calibrate(q, noise(n=2))
    assert q.texq_info == model.texq_info


def test_quantized_model_trains(fp_model):
    """Gradients flow to every quantized weight through the straight-through estimator."""
    qmodel = quantize(fp_model, QuantConfig(w_bits=4, a_bits=4)).train()
    calibrate(qmodel, noise(n=2))
    loss = nn.functional.cross_entropy(qmodel(noise(n=1)[0]), torch.zeros(16, dtype=torch.long))
    loss.backward()
    for name, p in qmodel.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert sum(float(p.grad.abs().sum()) for p in qmodel.parameters()) > 0


@pytest.mark.assets
def test_w8a8_of_shared_model_within_one_point(shared_model, test1000_data):
    fp = evaluate(shared_model, test1000_data, progress=False)
    assert fp.correct == 915
    qmodel = quantize(shared_model, QuantConfig(w_bits=8, a_bits=8))
    calibrate(qmodel, noise(n=4, batch=128))
    q8 = evaluate(qmodel, test1000_data, progress=False)
    assert abs(q8.top1 - fp.top1) <= 1.0


@pytest.mark.assets
def test_low_bits_degrade_monotonically(shared_model, test1000_data):
    """Zero-effort quantization loses more at fewer bits (a sanity check, not a target)."""
    acc = {}
    for b in (8, 4, 2):
        qmodel = quantize(shared_model, QuantConfig(w_bits=b, a_bits=b))
        calibrate(qmodel, noise(n=2, batch=128))
        acc[b] = evaluate(qmodel, test1000_data, progress=False).top1
    assert acc[8] > acc[4] > acc[2]
    assert acc[2] < 50.0
