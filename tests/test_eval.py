"""Accuracy counting and the Wilson interval against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from texq.eval import Z95, EvalResult, evaluate, topk_correct, wilson_interval


def wilson_by_bisection(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson interval from its definition: all p with |k/n - p| <= z * sqrt(p(1-p)/n)."""
    phat = k / n

    def inside(p):
        return abs(phat - p) <= z * math.sqrt(p * (1 - p) / n)

    def edge(a, b):  # a inside, b outside
        for _ in range(200):
            m = (a + b) / 2
            a, b = (m, b) if inside(m) else (a, m)
        return a

    lo = 0.0 if inside(0.0) or phat == 0 else edge(phat, 0.0)
    hi = 1.0 if inside(1.0) or phat == 1 else edge(phat, 1.0)
    return lo, hi


@pytest.mark.parametrize("k, n", [(915, 1000), (500, 1000), (3, 10), (0, 10), (10, 10), (3638, 4500)])
def test_wilson_interval_matches_its_definition(k, n):
    lo, hi = wilson_interval(k, n)
    rlo, rhi = wilson_by_bisection(k, n)
    assert lo == pytest.approx(rlo, abs=1e-9) and hi == pytest.approx(rhi, abs=1e-9)


def test_wilson_interval_known_values():
    # 0 successes of 10: upper bound z^2 / (n + z^2)
    assert wilson_interval(0, 10)[1] == pytest.approx(Z95**2 / (10 + Z95**2))
    # symmetric under k -> n - k
    lo, hi = wilson_interval(915, 1000)
    lo2, hi2 = wilson_interval(85, 1000)
    assert lo == pytest.approx(1 - hi2) and hi == pytest.approx(1 - lo2)
    # about +-1.7 points at 91.5% of 1000, as the assets' README says
    assert (hi - lo) / 2 == pytest.approx(0.0173, abs=0.0005)


def test_topk_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 500)
    order = np.argsort(-logits, axis=1)
    for k in (1, 3, 5):
        expected = int(sum(labels[i] in order[i, :k] for i in range(500)))
        assert topk_correct(torch.from_numpy(logits), torch.from_numpy(labels), k) == expected
    # k larger than the class count counts everything
    assert topk_correct(torch.from_numpy(logits[:, :3]), torch.zeros(500, dtype=torch.long), 5) == 500


class Oracle(nn.Module):
    """Predicts the class written in the first pixel; 'wrong' for every third image."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        cls = x[:, 0, 0, 0].long()
        logits = nn.functional.one_hot(cls, 10).float()
        return logits + self.dummy


def test_evaluate_counts_exactly():
    n = 99
    labels = torch.arange(n) % 10
    x = torch.zeros(n, 3, 4, 4)
    x[:, 0, 0, 0] = labels.float()
    x[::3, 0, 0, 0] = ((labels[::3] + 1) % 10).float()  # 33 wrong predictions
    res = evaluate(Oracle(), TensorDataset(x, labels), batch_size=16, progress=False)
    assert (res.correct, res.n) == (66, 99)
    assert res.top1 == pytest.approx(100 * 66 / 99)
    d = res.to_dict()
    assert d["correct"] == 66 and d["n"] == 99 and len(d["top1_ci95"]) == 2
    # per label, counted by hand: every third sample (indices 0, 3, ..., 96) is wrong
    wrong = torch.zeros(10, dtype=torch.long).index_add_(0, labels[::3], torch.ones(33, dtype=torch.long))
    n_per = torch.bincount(labels, minlength=10)
    assert res.class_n == tuple(n_per.tolist()) and sum(res.class_correct) == 66
    assert res.class_correct == tuple((n_per - wrong).tolist())
    assert res.per_class_top1()[0] == pytest.approx(100 * (n_per[0] - wrong[0]).item() / n_per[0].item())


def test_eval_result_properties():
    r = EvalResult(915, 998, 1000)
    assert r.top1 == 91.5 and r.top5 == 99.8
    lo, hi = r.top1_ci95
    assert lo < 91.5 < hi


def test_evaluate_moves_the_model_to_the_requested_device(monkeypatch):
    """Inputs go to ``device`` and so must the model (a CPU model scored with device='cuda'
    crashed the teacher stage on a GPU); where the model lives is the default."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    data = TensorDataset(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]))
    moved = []
    original = nn.Module.to

    def spy(self, *args, **kwargs):
        moved.append(args[0] if args else kwargs.get("device"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "to", spy)
    evaluate(model, data, device=torch.device("cpu"), progress=False)
    assert moved == [torch.device("cpu")]
    moved.clear()
    evaluate(model, data, progress=False)
    assert moved == []
