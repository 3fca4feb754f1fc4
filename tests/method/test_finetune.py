"""Eq. 12 and Eq. 14 as the fine-tuner computes them (all layers side by side, per-class rows for
every class, fixed-shape mixup) against slow layer-by-layer, class-by-class references; and the
CUDA-graph warm-up leaving no trace (checked on the CPU)."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch.nn import functional as F

from texq.method.bns import LayerStats, bn_layers, layer_weights
from texq.method.finetune import Finetuner, Sources
from texq.method.generator import Generator
from texq.method.kd import kd_loss
from texq.method.mixup import mixup_samples
from texq.models import create_model
from texq.quant import calibrate, quantize
from texq.run.config import RunConfig
from texq.util.errors import ConfigError
from texq.util.graphs import GraphedStep


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    cfg = RunConfig.for_profile("tiny", model="resnet8a_cifar10", checkpoint="unused")
    fp = create_model("resnet8a_cifar10").eval()
    gen = torch.Generator().manual_seed(1)
    for bn in bn_layers(fp):  # running statistics unlike a random batch's
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen) * 0.3)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
    q = quantize(fp, cfg.quant_config())
    calibrate(q, [torch.randn(16, 3, 32, 32)])
    centers = [LayerStats(torch.randn(10, bn.num_features, generator=gen),
                          torch.rand(10, bn.num_features, generator=gen) + 0.5) for bn in bn_layers(fp)]
    return cfg, fp, q, centers


def _tuner(parts, mkd=True, calib=False, **gen_kw):
    cfg, fp, q, centers = parts
    g = Generator.for_model(fp.texq_info)
    src = Sources(generator=g, centers=centers)
    if calib:
        src.calib_images, src.calib_labels = torch.randn(10, 3, 32, 32), torch.arange(10)
    gcfg = replace(cfg.generator, **gen_kw)
    ft = replace(cfg.finetune, batch_size=12, calib_per_batch=4 if calib else 0)
    return Finetuner(copy.deepcopy(fp), copy.deepcopy(q), src, gcfg, ft, mkd, torch.device("cpu"))


def _bn_inputs(model, x):
    seen = []
    hooks = [bn.register_forward_pre_hook(lambda m, i: seen.append(i[0])) for bn in bn_layers(model)]
    logits = model(x)
    for h in hooks:
        h.remove()
    return logits, seen


def test_generator_loss_is_eq12_layer_by_layer_and_class_by_class(parts):
    """CE + a3 L_BNS + a4 L_L-BNS + a5 L_D-BNS (Eq. 12), with the distortion noise at zero so that
    Eq. 11 is Eq. 8: the reference loops over layers and over the classes present in the batch
    (three absent), mean squares per layer (the default 'mse' form), w_l of Eq. 8."""
    tuner = _tuner(parts, nu_mu=0.0, nu_sigma=0.0)
    cfg, fp, _, centers = parts
    gcfg = tuner.gcfg
    x = torch.randn(12, 3, 32, 32, requires_grad=True)
    y = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 5, 6, 6, 0])  # classes 7, 8, 9 absent
    tuner.src.generator.sample = lambda n, device=None: (x, y)
    loss, _, _, terms = tuner.generator_loss()
    (grad,) = torch.autograd.grad(loss, x)

    logits, inputs = _bn_inputs(tuner.fp, x)
    w = layer_weights(len(inputs), gcfg.shallow_weight, gcfg.deep_weight)
    running = [(bn.running_mean, bn.running_var) for bn in bn_layers(tuner.fp)]
    dims = (0, 2, 3)
    l_bns = sum(F.mse_loss(a.mean(dims), rm) + F.mse_loss(a.var(dims, unbiased=False), rv)
                for a, (rm, rv) in zip(inputs, running)) / len(inputs)
    used = [l for l in range(len(inputs)) if w[l] != 0]
    present = y.unique().tolist()
    l_lbns = 0.0
    for l in used:
        a, c = inputs[l], centers[l]
        per_class = [F.mse_loss(a[y == k].mean(dims), c.mean[k])
                     + F.mse_loss(a[y == k].var(dims, unbiased=False), c.var[k]) for k in present]
        l_lbns = l_lbns + w[l] * sum(per_class) / len(present)
    l_lbns = l_lbns / len(used)
    l_ce = F.cross_entropy(logits, y)
    ref = l_ce + gcfg.alpha3 * l_bns + (gcfg.alpha4 + gcfg.alpha5) * l_lbns
    (ref_grad,) = torch.autograd.grad(ref, x)
    assert torch.allclose(terms, torch.stack([l_ce, l_bns, l_lbns, l_lbns]).detach(), rtol=1e-4)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4)
    assert torch.allclose(grad, ref_grad, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("mkd, fixed", [(True, True), (True, False), (False, True)])
def test_quant_loss_is_eq14_on_separate_forward_passes(parts, mkd, fixed):
    """CE(Q(x), y) + a6 KL(F(x_mix) || Q(x_mix)) over the batch plus 4 calibration images, with
    Q and F run on x and on x_mix separately: both batched forms equal it, value and gradient
    (an unmixed sample is its own mix)."""
    tuner = _tuner(parts, mkd=mkd, calib=True)
    tuner.fixed_shapes = fixed  # all n mixes in one pass (CUDA graphs) or the m mixed ones only
    ft = tuner.fcfg
    x, y = torch.randn(12, 3, 32, 32), torch.randint(0, 10, (12,))
    torch.manual_seed(5)
    loss, terms = tuner.quant_loss(x, y)
    grads = torch.autograd.grad(loss, list(tuner.q.parameters()))

    torch.manual_seed(5)  # the same draws: calibration images, their augmentation, the mixes
    xc, yc = tuner._calib_batch()
    xa, ya = torch.cat([x, xc]), torch.cat([y, yc])
    x_mix, mixed = mixup_samples(xa, ft.mixup_p) if mkd else (xa, torch.zeros(16, dtype=torch.bool))
    l_ce = F.cross_entropy(tuner.q(xa), ya)
    with torch.no_grad():
        teacher = tuner.fp(x_mix)
    l_kd = kd_loss(tuner.q(x_mix), teacher, ft.kd_temperature, ft.kd_reduction)
    ref = l_ce + ft.alpha6 * l_kd
    ref_grads = torch.autograd.grad(ref, list(tuner.q.parameters()))
    assert terms.tolist() == pytest.approx([l_ce.item(), l_kd.item(), float(mixed.sum())], rel=1e-4)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(grads, ref_grads))
    if mkd:
        assert 0 < int(mixed.sum()) < 16 or ft.mixup_p in (0.0, 1.0)


def test_graph_warmup_leaves_no_trace(parts):
    """The CUDA-graph path runs each step a few times before capture and then restores every
    buffer and the RNG; rehearsed on the CPU (warm-up and restore, no capture), training follows
    exactly the plain eager trajectory."""
    ends = []
    for rehearse in (False, True):
        cfg, fp, q, centers = parts
        torch.manual_seed(3)
        g = Generator.for_model(fp.texq_info)
        src = Sources(generator=g, centers=centers, calib_images=torch.randn(10, 3, 32, 32),
                      calib_labels=torch.arange(10))
        ft = replace(cfg.finetune, batch_size=8, calib_per_batch=4, iters_per_epoch=3)
        tuner = Finetuner(copy.deepcopy(fp), copy.deepcopy(q), src, cfg.generator, ft, True,
                          torch.device("cpu"), rehearse=rehearse)
        rows = [tuner.run_epoch(e) for e in range(ft.warmup_epochs + 1)]
        ends.append((rows, [t.clone() for t in [*g.state_dict().values(), *tuner.q.state_dict().values()]]))
    (rows_a, state_a), (rows_b, state_b) = ends
    assert rows_a == rows_b
    assert all(torch.equal(a, b) for a, b in zip(state_a, state_b))


def test_a_changed_capture_key_captures_again():
    """What a capture bakes in (Q's quantizer modes and frozen ranges) is the step's key: when it
    changes, or after reset() (a loaded checkpoint), the warm-up and capture run again."""
    calls, mode = [], {"v": 0}
    step = GraphedStep(lambda: calls.append(mode["v"]) or torch.zeros(()), "cpu", [], warmup=2,
                       rehearse=True, key=lambda: mode["v"])
    step(), step()
    assert calls == [0, 0, 0, 0]  # two warm-up calls, then the two steps
    mode["v"] = 1
    step()
    assert calls[4:] == [1, 1, 1]  # the key changed: warm-up (and capture) again
    step.reset()
    step()
    assert calls[7:] == [1, 1, 1]


def test_q_never_trains_on_moving_ranges(parts):
    cfg = parts[0]
    with pytest.raises(ConfigError, match="frozen activation ranges"):
        bad = replace(cfg.finetune, warmup_epochs=1, act_calib_epochs=2)
        Finetuner(parts[1], parts[2], Sources(), cfg.generator, bad, True, torch.device("cpu"))


@pytest.mark.parametrize("at, observed", [("start", [0, 1]), ("end", [2, 3])])
@pytest.mark.parametrize("inputs", ["generated", "batch"])
def test_activation_ranges_are_observed_when_and_on_what_is_configured(parts, at, observed, inputs):
    """``act_calib_at``: which warm-up epochs observe (ranges reset at the first of them and frozen
    after); ``act_calib_inputs``: G's batch alone or with the calibration images Q trains on."""
    tuner = _tuner(parts, calib=True)
    tuner.fcfg = replace(tuner.fcfg, warmup_epochs=4, epochs=1, iters_per_epoch=2, act_calib_epochs=2,
                         act_calib_at=at, act_calib_inputs=inputs)
    assert [e for e in range(5) if tuner.fcfg.observes(e)] == observed
    first = next(m for m in tuner.q.modules() if hasattr(m, "observing"))
    sizes, ranges = [], []
    hook = tuner.q.register_forward_pre_hook(
        lambda m, i: sizes.append((first.observing, len(i[0]))))
    for epoch in range(4):
        tuner.run_epoch(epoch)
        ranges.append((float(first.x_min), float(first.x_max)))
    hook.remove()
    batch = tuner.fcfg.batch_size + (tuner.fcfg.calib_per_batch if inputs == "batch" else 0)
    assert sizes == [(True, batch)] * 4  # two iterations in each of the two observing epochs
    moved = [e for e in range(1, 4) if ranges[e] != ranges[e - 1]]
    assert moved == [e for e in observed if e > 0]  # frozen outside the observed epochs
    assert all(not a.observing for a in tuner.q.modules() if hasattr(a, "observing"))


def test_act_calib_settings_are_checked():
    for key, value in (("act_calib_at", "middle"), ("act_calib_inputs", "calib")):
        with pytest.raises(ConfigError, match=f"finetune.{key}='{value}'"):
            replace(RunConfig.for_profile("tiny", checkpoint="x").finetune, **{key: value})
