"""Device placement and capturability, checked on the CPU.

Every tensor texq creates must live on the model's device (a GPU run crashed when the quantizer's
buffers stayed on the CPU), and a training step must never read a value back to the host nor
produce a shape that depends on data (CUDA-graph capture forbids both). The ``meta`` device checks
both without a GPU: a meta tensor has no data, so mixing it with a CPU tensor raises, and so does
reading a value (``.item()``, ``bool()``) or an op whose output shape depends on values.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from texq.method.bns import BNStatsCollector, concat, layer_weights
from texq.method.calibration import CalibrationConfig, calibration_loss, synthesize
from texq.method.finetune import Finetuner, Sources
from texq.method.generator import Generator
from texq.models import create_model
from texq.quant import QuantConfig, act_quantizers, calibrate, quantize
from texq.run.config import RunConfig

META = torch.device("meta")


@pytest.fixture(scope="module", autouse=True)
def meta_fake_quantize():
    """torch has no meta kernel for the fused fake-quantize op: give it the shape-only one."""
    lib = torch.library.Library("aten", "IMPL")
    lib.impl("fake_quantize_per_channel_affine_cachemask",
             lambda x, *args: (torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)), "Meta")
    yield
    lib._destroy()


def _devices(module: torch.nn.Module) -> set[torch.device]:
    return {t.device for t in [*module.parameters(), *module.buffers()]}


def test_quantize_keeps_every_tensor_on_the_model_device():
    model = create_model("resnet8a_cifar10").to(META)
    q = quantize(model, QuantConfig(w_bits=4, a_bits=4))
    assert _devices(q) == {META}
    assert act_quantizers(q) and all(a.x_min.device == META for a in act_quantizers(q))


def test_generator_samples_where_it_lives():
    g = Generator(10).to(META)
    x, y = g.sample(4)
    assert x.device == META and y.device == META


@pytest.fixture(scope="module")
def cpu_parts():
    torch.manual_seed(0)
    cfg = RunConfig.for_profile("tiny", model="resnet8a_cifar10", checkpoint="unused.pt")
    fp = create_model("resnet8a_cifar10").eval()
    calib = synthesize(fp, cfg.calibration, progress=False)
    q = quantize(fp, cfg.quant_config())
    calibrate(q, [torch.randn(8, 3, 32, 32)])
    q(torch.randn(2, 3, 32, 32))  # freezes each range's Eq. 1 parameters as Python floats
    return cfg, fp, q, calib


@pytest.mark.parametrize("mkd, mix_slots", [(True, "all"), (False, "all"), (True, "bounded")])
def test_training_steps_run_on_meta(cpu_parts, mkd, mix_slots):
    """Steps 2 and 3 end to end (losses, backward) on meta tensors: no tensor made elsewhere,
    no host sync, no data-dependent shape. The same functions are what a CUDA graph captures
    (Q's bounded mixup batch too)."""
    cfg, fp, q, calib = cpu_parts
    g = Generator.for_model(fp.texq_info).to(META)
    fp_m, q_m = copy.deepcopy(fp).to(META), copy.deepcopy(q).to(META)
    centers = [type(c)(c.mean.to(META), c.var.to(META)) for c in calib.centers]
    src = Sources(generator=g, calib_images=calib.images.to(META),
                  calib_labels=calib.labels.to(META), centers=centers)
    ft = replace(cfg.finetune, batch_size=6, calib_per_batch=3, mix_slots=mix_slots)
    tuner = Finetuner(fp_m, q_m, src, cfg.generator, ft, mkd, META, fixed_shapes=True)
    x, y, g_terms = tuner._generator_pass()
    assert x.device == META and g_terms.shape == (4,)
    assert all(p.grad is not None and p.grad.device == META for p in g.parameters())
    q_terms = tuner._quant_pass(x, y)
    assert q_terms.shape == (4 if mix_slots == "bounded" else 3,) and q_terms.device == META
    assert all(p.grad.device == META for p in q_m.parameters() if p.requires_grad)
    if mkd:  # the variable-size batch (the mixed samples only) is what a capture cannot take
        tuner.fixed_shapes = False
        with pytest.raises(NotImplementedError, match="nonzero"):
            tuner._quant_pass(x, y)


def test_calibration_step_runs_on_meta():
    """Step 1's loss (Eq. 10 with per-class statistics and L_LAWS) and its backward on meta."""
    model = create_model("resnet8a_cifar10").eval().to(META)
    cfg = CalibrationConfig()
    x = torch.randn(10, 3, 32, 32, device=META, requires_grad=True)
    labels = torch.arange(10, device=META)
    info = model.texq_info
    with BNStatsCollector(model) as bns:
        bns.set_groups(labels, 10)
        logits = model(x)
        stats = bns.stats_all().of_groups()
        weights = layer_weights(len(bns.layers), cfg.shallow_weight, cfg.deep_weight)
        loss, terms = calibration_loss(x, logits, labels, stats, concat(bns.running()), weights,
                                       cfg, info.mean, info.std, use_laws=True)
    loss.backward()
    assert x.grad.device == META and set(terms) == {"bns", "ce", "laws"}
