"""The candidate GPU speed-ups of steps 2-3, checked on the CPU: bf16 autocast with the
quantizers and BatchNorm in float32, Q's bounded fixed-shape mixup batch (n + c), and
torch.compile of the captured passes (traced with aot_eager: the same numbers as eager)."""

from __future__ import annotations

import math

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from texq.method import finetune as finetune_module
from texq.method.bns import LayerStats, bn_layers
from texq.method.finetune import Finetuner, Sources
from texq.method.generator import Generator
from texq.method.kd import kd_loss
from texq.method.mixup import bounded_slots, mix_capacity, mixup_samples
from texq.models import create_model
from texq.quant import calibrate, quantize
from texq.quant.modules import ActQuantizer, QuantConv2d, WeightQuantizer
from texq.run.config import RunConfig, fingerprint
from texq.util.errors import ConfigError
from texq.util.precision import autocast, float32_batchnorm

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    cfg = RunConfig.for_profile("tiny", model="resnet8a_cifar10", checkpoint="unused")
    fp = create_model("resnet8a_cifar10").eval()
    q = quantize(fp, cfg.quant_config())
    calibrate(q, [torch.randn(16, 3, 32, 32)])
    centers = [LayerStats(torch.randn(10, bn.num_features), torch.rand(10, bn.num_features) + 0.5)
               for bn in bn_layers(fp)]
    return cfg, fp, q, centers


def _tuner(parts, mix_slots="all", **kw):
    cfg, fp, q, centers = parts
    torch.manual_seed(1)
    src = Sources(generator=Generator.for_model(fp.texq_info), centers=centers,
                  calib_images=torch.randn(10, 3, 32, 32), calib_labels=torch.arange(10))
    ft = replace(cfg.finetune, batch_size=12, calib_per_batch=4, mix_slots=mix_slots)
    return Finetuner(copy.deepcopy(fp), copy.deepcopy(q), src, cfg.generator, ft, True, CPU, **kw)


def _steps(tuner, n=3):
    """The terms of ``n`` G + Q iterations from the same seed."""
    torch.manual_seed(2)
    rows = []
    for _ in range(n):
        x, y, g_terms = tuner.generator_step()
        rows.append(torch.cat([g_terms, tuner.quant_step(x, y)]))
    return torch.stack(rows)


# ------------------------------------------------------------------ Q's bounded mixup batch
@pytest.mark.parametrize("n, p", [(144, 0.2), (80, 0.2), (16, 0.5), (30, 0.0), (5, 1.0), (2000, 0.2),
                                  (128, 0.99), (5000, 0.7)])
def test_mix_capacity_is_the_binomial_tail_bound(n, p):
    """The smallest c with P(Binomial(n, p) > c) <= 1e-6, against torch.distributions' pmf."""
    c = mix_capacity(n, p)
    if p in (0.0, 1.0):
        assert c == (0 if p == 0.0 else n)
        return
    pmf = torch.distributions.Binomial(n, torch.tensor(p, dtype=torch.float64)).log_prob(
        torch.arange(n + 1, dtype=torch.float64)).exp()
    assert pmf[c + 1:].sum() <= 1e-6 < pmf[c:].sum()
    if n >= 80 and p <= 0.2:  # the CIFAR batches: well under the 'all' form's n slots
        assert c < 0.5 * n


def test_mix_capacity_of_a_huge_batch_is_quick_and_near_the_normal_bound():
    """A batch size near the limit of its domain (2**31 - 1) is answered at once (the pmf's sum
    starts 40 standard deviations below the mean), close to the normal approximation's bound."""
    n, p = 2**31 - 1, 0.5
    c = mix_capacity(n, p)
    mean, sd = n * p, math.sqrt(n * p * (1 - p))
    assert mean + 4.5 * sd < c < mean + 5.0 * sd  # z(1e-6) = 4.75


def test_bounded_slots_put_the_mixed_samples_first_and_drop_the_overflow():
    """A hand-worked example: mixed samples 1, 3, 4 of 6."""
    mixed = torch.tensor([False, True, False, True, True, False])
    order, slot_mixed, kept = bounded_slots(mixed, 4)
    assert order.tolist() == [1, 3, 4, 0] and slot_mixed.tolist() == [True, True, True, False]
    assert torch.equal(kept, mixed)
    order, slot_mixed, kept = bounded_slots(mixed, 2)  # sample 4 finds no slot: it stays unmixed
    assert order.tolist() == [1, 3] and slot_mixed.tolist() == [True, True]
    assert kept.tolist() == [False, True, False, True, False, False]
    order, _, kept = bounded_slots(mixed, 10)  # never more slots than samples
    assert len(order) == 6 and torch.equal(kept, mixed)


def test_bounded_slots_give_eq14_value_and_gradient(parts):
    """The bounded form (n + c samples through Q) equals Eq. 14 computed with separate passes on
    x and on its mixes, when no more than c samples are mixed (the same draws)."""
    tuner = _tuner(parts, mix_slots="bounded", fixed_shapes=True)
    assert tuner.bounded and tuner.q_terms[-1] == "quantized/mix_overflow"
    ft = tuner.fcfg
    x, y = torch.randn(12, 3, 32, 32), torch.randint(0, 10, (12,))
    torch.manual_seed(5)
    loss, terms = tuner.quant_loss(x, y)
    grads = torch.autograd.grad(loss, list(tuner.q.parameters()))
    torch.manual_seed(5)
    xc, yc = tuner._calib_batch()
    xa, ya = torch.cat([x, xc]), torch.cat([y, yc])
    x_mix, mixed = mixup_samples(xa, ft.mixup_p)
    assert tuner.mix_capacity == mix_capacity(16, ft.mixup_p)
    assert 0 < int(mixed.sum()) <= tuner.mix_capacity
    l_ce = F.cross_entropy(tuner.q(xa), ya)
    with torch.no_grad():
        teacher = tuner.fp(x_mix)
    ref = l_ce + ft.alpha6 * kd_loss(tuner.q(x_mix), teacher, ft.kd_temperature, ft.kd_reduction)
    ref_grads = torch.autograd.grad(ref, list(tuner.q.parameters()))
    assert terms[2].item() == float(mixed.sum()) and terms[3].item() == 0.0
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(grads, ref_grads))


def test_mixes_beyond_the_bound_stay_unmixed_and_are_counted(parts, monkeypatch):
    """With the bound forced to 1, only the first mixed sample (in batch order) is mixed; the
    others are their own mix, and the overflow term counts them."""
    monkeypatch.setattr(finetune_module, "mix_capacity", lambda n, p: 1)
    tuner = _tuner(parts, mix_slots="bounded", fixed_shapes=True)
    tuner.fcfg = replace(tuner.fcfg, mixup_p=0.6, calib_per_batch=0)
    x, y = torch.randn(12, 3, 32, 32), torch.randint(0, 10, (12,))
    torch.manual_seed(7)
    loss, terms = tuner.quant_loss(x, y)
    torch.manual_seed(7)
    x_mix, mixed = mixup_samples(x, 0.6)
    m = int(mixed.sum())
    assert m >= 2
    first = int(mixed.nonzero()[0])
    kd_in = x.clone()
    kd_in[first] = x_mix[first]
    with torch.no_grad():
        ref = F.cross_entropy(tuner.q(x), y) + tuner.fcfg.alpha6 * kd_loss(
            tuner.q(kd_in), tuner.fp(kd_in), tuner.fcfg.kd_temperature, tuner.fcfg.kd_reduction)
    assert terms[2:].tolist() == [1.0, float(m - 1)]
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_whole_steps_agree_across_the_mixup_forms(parts):
    """Three G + Q iterations: variable-size (CPU), all-n fixed and bounded fixed forms give the
    same terms (the bounded form adds its zero overflow count)."""
    base = _steps(_tuner(parts))
    fixed = _steps(_tuner(parts, fixed_shapes=True))
    bounded = _steps(_tuner(parts, mix_slots="bounded", fixed_shapes=True))
    assert torch.allclose(base, fixed, rtol=1e-4, atol=1e-6)
    assert torch.allclose(base, bounded[:, :-1], rtol=1e-4, atol=1e-6)
    assert bounded[:, -1].tolist() == [0.0, 0.0, 0.0]


# ------------------------------------------------------------------ bf16 autocast
@pytest.mark.parametrize("quantizer", [WeightQuantizer(3), ActQuantizer(3)])
def test_quantizers_compute_in_float32_under_autocast(quantizer):
    """A quantizer under bf16 autocast returns exactly its float32 result, in float32, for a
    float32 or a bf16 input (the grid of a 3-bit quantizer is not a bf16 grid)."""
    torch.manual_seed(0)
    x = torch.randn(8, 4, 5, 5) * 3
    if isinstance(quantizer, ActQuantizer):
        quantizer.observing = True
        quantizer(x)
        quantizer.observing = False
    expected = quantizer(x)
    for given in (x, x.bfloat16()):
        with autocast(CPU, "bf16"):
            got = quantizer(given)
        assert got.dtype == torch.float32
        ref = expected if given.dtype == torch.float32 else quantizer(given.float())
        assert torch.equal(got, ref)


def test_bf16_runs_convolutions_in_bf16_and_batchnorm_in_float32(parts):
    """Under the Finetuner's bf16 autocast, Q's convolutions (and the linear layer) produce bf16
    while every BatchNorm layer receives and returns float32; the hooks come off again."""
    tuner = _tuner(parts, precision="bf16")
    seen = {"conv": set(), "bn_in": set(), "bn_out": set()}

    def conv(m, i, o):
        seen["conv"].add(o.dtype)

    def bn(m, i, o):
        seen["bn_in"].add(i[0].dtype)
        seen["bn_out"].add(o.dtype)
    for m in tuner.q.modules():
        if isinstance(m, (QuantConv2d, nn.Conv2d, nn.Linear)):
            m.register_forward_hook(conv)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.register_forward_hook(bn)
    with torch.no_grad(), autocast(CPU, "bf16"):
        tuner.q(torch.randn(4, 3, 32, 32))
    assert seen == {"conv": {torch.bfloat16}, "bn_in": {torch.float32}, "bn_out": {torch.float32}}
    with torch.no_grad(), tuner.bns, autocast(CPU, "bf16"):  # F's BN statistics, as G's loss reads them
        tuner.fp(torch.randn(4, 3, 32, 32))
    stats = tuner.bns.stats_all()
    assert stats.mean.dtype == stats.var.dtype == torch.float32
    tuner.close()
    seen["bn_in"].clear()
    with torch.no_grad(), autocast(CPU, "bf16"):
        tuner.q(torch.randn(4, 3, 32, 32))
    assert seen["bn_in"] == {torch.bfloat16}


def test_bf16_steps_stay_close_to_float32_and_keep_float32_state(parts):
    """Three G + Q iterations in bf16: every term within 5% of the float32 run's (an 8-bit
    mantissa in the products only), weights, gradients and buffers still float32."""
    fp32 = _steps(_tuner(parts))
    tuner = _tuner(parts, precision="bf16")
    bf16 = _steps(tuner)
    assert torch.isfinite(bf16).all()
    assert torch.allclose(bf16, fp32, rtol=5e-2, atol=1e-4)
    assert not torch.equal(bf16, fp32)  # the products did run in bf16
    for module in (tuner.q, tuner.src.generator):
        assert {p.dtype for p in module.parameters()} == {torch.float32}
        assert {p.grad.dtype for p in module.parameters() if p.grad is not None} == {torch.float32}
        assert {b.dtype for b in module.buffers() if b.is_floating_point()} == {torch.float32}


def test_float32_batchnorm_leaves_float32_inputs_alone():
    bn = nn.BatchNorm2d(3).eval()
    handles = float32_batchnorm(nn.Sequential(bn))
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(bn(x), F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias))
    assert bn(x.bfloat16()).dtype == torch.float32
    for h in handles:
        h.remove()


# ------------------------------------------------------------------ torch.compile
def test_compiled_steps_equal_eager_steps(parts):
    """compile=True traces G's and Q's passes (aot_eager: the traced graphs run as eager ops) and
    gives the same terms and the same trained weights as the eager fixed-shape steps."""
    eager = _tuner(parts, fixed_shapes=True)
    compiled = _tuner(parts, compile=True, compile_backend="aot_eager")
    assert compiled.fixed_shapes  # a compiled pass needs static shapes
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    assert torch.equal(_steps(eager), _steps(compiled))
    assert counters["stats"]["unique_graphs"] >= 2  # G's and Q's passes were traced, not run eagerly
    for a, b in zip(eager.q.parameters(), compiled.q.parameters()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ settings
def test_speed_settings_are_checked_and_fingerprinted():
    base = RunConfig.for_profile("tiny", model="resnet8a_cifar10", checkpoint="unused")
    with pytest.raises(ConfigError, match="precision"):
        RunConfig.for_profile("tiny", model="resnet8a_cifar10", checkpoint="unused", precision="fp16")
    with pytest.raises(ConfigError, match="mix_slots"):
        RunConfig.for_profile("tiny", model="resnet8a_cifar10", checkpoint="unused",
                              overrides={"finetune.mix_slots": "some"})
    bf16 = replace(base, precision="bf16")
    bounded = replace(base, finetune=replace(base.finetune, mix_slots="bounded"))
    compiled = replace(base, compile=True)
    assert len({fingerprint(base), fingerprint(bf16), fingerprint(bounded)}) == 3
    assert fingerprint(compiled) == fingerprint(base)  # speed only
    # at their defaults, the later settings leave fingerprints as they were before them (the
    # values computed with texq at 83861ec): folders made then still resume
    assert fingerprint(base) == "88762bf664de0b1a"
    paper = RunConfig.for_profile("paper", model="resnet20a_cifar10", checkpoint="unused")
    assert fingerprint(paper) == "853338e25eddef62"


def test_the_recorder_records_inside_with_only_and_close_takes_every_hook_off(parts):
    """F keeps the BN-statistics hooks for the Finetuner's life (no hook added per pass): a pass
    outside ``with`` (the teacher's in Q's loss) records nothing; ``close`` leaves F, Q and G
    without any hook, as they were given."""
    tuner = _tuner(parts, precision="bf16")
    models = (tuner.fp, tuner.q, tuner.src.generator)

    def hooks():
        return sum(len(m._forward_pre_hooks) for model in models for m in model.modules())
    before = hooks()
    assert before > 0
    _steps(tuner, 2)
    assert hooks() == before
    tuner.fp(torch.randn(2, 3, 32, 32))
    assert all(s is None for s in tuner.bns.samples)
    with tuner.bns:
        tuner.fp(torch.randn(2, 3, 32, 32))
    assert all(s is not None for s in tuner.bns.samples)
    tuner.close()
    assert hooks() == 0


def test_a_run_hands_its_speed_settings_to_the_finetuner(tiny_setup, tmp_path, monkeypatch):
    """``texq run --set precision=bf16 --set compile=true``: the settings reach steps 2-3 (a bf16
    run on the CPU, its passes handed to torch.compile; here a recorder that returns them as
    they are), and the run ends with a score and hook-free models."""
    from texq.method import finetune
    from texq.run.runner import run

    compiled, built = [], []
    monkeypatch.setattr(finetune, "compile_step", lambda fn, backend: compiled.append(backend) or fn)
    real_init = Finetuner.__init__

    def init(self, *args, **kw):
        real_init(self, *args, **kw)
        built.append(self)
    monkeypatch.setattr(Finetuner, "__init__", init)
    ckpt, data, _ = tiny_setup
    cfg = RunConfig.for_profile("tiny", model="resnet8_cifar10", checkpoint=str(ckpt), data=str(data),
                                device="cpu", precision="bf16", compile=True)
    result = run(cfg, tmp_path / "run", progress=False)
    assert 0 <= result["correct"] <= result["n"]
    (tuner,) = built
    assert tuner.precision == "bf16" and compiled == ["inductor", "inductor"] and tuner.fixed_shapes
    assert not tuner._amp_hooks and not tuner.bns._handles  # closed at the end of steps 2-3
