"""CUDA runs (skipped without a GPU; ``scripts/gpu_check.sh`` runs them): every path runs on CUDA,
agrees with the CPU where it must, graph replay computes what eager steps compute, and the same
seed on the same GPU gives the same run."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from texq.eval import evaluate
from texq.method.finetune import Finetuner, Sources
from texq.models import create_model
from texq.models.quantized import load_quantized
from texq.quant import QuantConfig, calibrate, quantize
from texq.run.config import RunConfig
from texq.run.methods import METHODS
from texq.run.runner import run

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
CUDA = torch.device("cuda")


def tiny(tiny_setup, **kw) -> RunConfig:
    ckpt, data, _ = tiny_setup
    return RunConfig.for_profile("tiny", model="resnet8_cifar10", checkpoint=str(ckpt),
                                 data=str(data), device="cuda", **kw)


def test_quantize_keeps_a_cuda_model_on_cuda():
    q = quantize(create_model("resnet8a_cifar10").to(CUDA), QuantConfig(w_bits=4, a_bits=4))
    assert {t.device.type for t in [*q.parameters(), *q.buffers()]} == {"cuda"}
    calibrate(q, [torch.randn(8, 3, 32, 32, device=CUDA)])
    assert q(torch.randn(2, 3, 32, 32, device=CUDA)).shape == (2, 10)


@pytest.mark.assets
def test_eval_on_cuda_matches_the_cpu(shared_model, test1000_data):
    fp_cpu = evaluate(shared_model, test1000_data, progress=False, device="cpu")
    fp_gpu = evaluate(copy.deepcopy(shared_model).to(CUDA), test1000_data, progress=False)
    assert fp_cpu.correct == 915 and abs(fp_gpu.correct - fp_cpu.correct) <= 1
    q = quantize(shared_model, QuantConfig(w_bits=4, a_bits=4))
    calibrate(q, [torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))])
    q_cpu = evaluate(q, test1000_data, progress=False, device="cpu")
    q_gpu = evaluate(copy.deepcopy(q).to(CUDA), test1000_data, progress=False)
    assert abs(q_gpu.correct - q_cpu.correct) <= 5  # rounding at quantization-step boundaries


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_on_cuda(tiny_setup, tmp_path, method):
    kw = {"train_data": str(tiny_setup[2])} if method == "real" else {}
    metrics = run(tiny(tiny_setup, method=method, **kw), tmp_path, progress=False)
    assert metrics["device"] == "cuda" and metrics["n"] == 40 and metrics["method"] == method
    q = load_quantized(tmp_path / "train" / "qmodel.pt")  # saved from CUDA, reloads anywhere
    assert all(t.device.type == "cpu" for t in q.state_dict().values())


def test_same_seed_same_gpu_same_run(tiny_setup, tmp_path):
    cfg = tiny(tiny_setup)
    a = run(cfg, tmp_path / "a", progress=False)
    b = run(cfg, tmp_path / "b", progress=False)
    assert a["correct"] == b["correct"]
    qa, qb = (torch.load(tmp_path / n / "train" / "qmodel.pt", weights_only=True)["state_dict"] for n in "ab")
    assert all(torch.equal(qa[k], qb[k]) for k in qa)


def _tuner(graphs: bool):
    torch.manual_seed(0)
    cfg = RunConfig.for_profile("tiny", model="resnet8a_cifar10", checkpoint="unused")
    fp = create_model("resnet8a_cifar10").to(CUDA).eval()
    q = quantize(fp, cfg.quant_config())
    calibrate(q, [torch.randn(16, 3, 32, 32, device=CUDA)])
    ft = replace(cfg.finetune, calib_per_batch=0)  # Q's step without random draws
    return Finetuner(fp, q, Sources(), cfg.generator, ft, False, CUDA, cuda_graphs=graphs)


def test_graph_replay_computes_the_eager_steps():
    """Q's step (no random draw in it here) replayed as a CUDA graph for a few steps ends where
    the same steps run eagerly end."""
    x = torch.randn(16, 3, 32, 32, device=CUDA)
    y = torch.randint(0, 10, (16,), device=CUDA)
    ends = []
    for graphs in (False, True):
        tuner = _tuner(graphs)
        terms = [tuner.quant_step(x * (1 + 0.1 * i), y).clone() for i in range(6)]
        ends.append((terms, [p.detach().clone() for p in tuner.q.parameters()]))
    (t_e, p_e), (t_g, p_g) = ends
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(t_e, t_g))
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(p_e, p_g))
    assert any(not torch.equal(a, b) for a, b in zip(p_e, _tuner(False).q.parameters()))  # it trained


@pytest.mark.assets
def test_teacher_stage_on_cuda_matches_the_cpu(tmp_path, shared_checkpoint, test1000):
    import yaml

    from texq.pipeline import load_params, read_config, run_stage

    params = load_params(Path(__file__).resolve().parents[2] / "params.yaml")
    params.update(pretrained=False, checkpoint=str(shared_checkpoint), data=str(test1000))
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    cpu = run_stage("teacher", read_config(path, "cpu"), tmp_path / "cpu", progress=False)
    gpu = run_stage("teacher", read_config(path, "cuda"), tmp_path / "gpu", progress=False)
    assert cpu["correct"] == 915 and abs(gpu["correct"] - cpu["correct"]) <= 1


def _full_tuner(graphs: bool, **speed):
    """G + Q on CUDA with calibration images and centers (every random draw of a step)."""
    from texq.method.bns import LayerStats, bn_layers
    from texq.method.generator import Generator

    torch.manual_seed(0)
    cfg = RunConfig.for_profile("tiny", model="resnet8a_cifar10", checkpoint="unused")
    fp = create_model("resnet8a_cifar10").to(CUDA).eval()
    q = quantize(fp, cfg.quant_config())
    calibrate(q, [torch.randn(16, 3, 32, 32, device=CUDA)])
    centers = [LayerStats(torch.randn(10, bn.num_features, device=CUDA),
                          torch.rand(10, bn.num_features, device=CUDA) + 0.5) for bn in bn_layers(fp)]
    src = Sources(generator=Generator.for_model(fp.texq_info).to(CUDA), centers=centers,
                  calib_images=torch.randn(10, 3, 32, 32, device=CUDA),
                  calib_labels=torch.arange(10, device=CUDA))
    ft = replace(cfg.finetune, batch_size=32, mix_slots=speed.pop("mix_slots", "all"))
    return Finetuner(fp, q, src, cfg.generator, ft, True, CUDA, cuda_graphs=graphs,
                     fixed_shapes=True, **speed)


def _run_steps(tuner, n: int = 6):
    torch.manual_seed(3)
    rows = []
    for _ in range(n):
        x, y, g_terms = tuner.generator_step()
        rows.append(torch.cat([g_terms, tuner.quant_step(x, y)]).clone())
    return torch.stack(rows)


@pytest.mark.parametrize("speed", [{"mix_slots": "bounded"}, {"precision": "bf16"},
                                   {"compile": True}], ids=["bounded", "bf16", "compile"])
def test_speedups_replay_as_graphs_what_they_compute_eagerly(speed):
    """Each candidate speed-up, captured as CUDA graphs, computes what the same setting computes
    in eager steps (same draws); bounded and compiled steps also agree with the base's terms,
    bf16 steps stay within 5% of them."""
    eager = _run_steps(_full_tuner(False, **speed))
    graphed = _run_steps(_full_tuner(True, **speed))
    assert torch.isfinite(graphed).all()
    assert torch.allclose(eager, graphed, rtol=1e-3, atol=1e-5)
    base = _run_steps(_full_tuner(True))
    if "precision" not in speed:
        assert torch.allclose(base, graphed[:, :base.shape[1]], rtol=1e-3, atol=1e-5)
    else:  # bf16 products: close to float32, not equal
        assert torch.allclose(base, graphed, rtol=5e-2, atol=1e-4) and not torch.equal(base, graphed)
