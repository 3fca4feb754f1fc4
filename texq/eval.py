"""Top-1 / top-5 accuracy with the 95% interval for the sample size."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

Z95 = 1.959963984540054  # two-sided 95% quantile of the standard normal


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (fractions in [0, 1])."""
    if n <= 0:
        raise ValueError("n must be positive")
    p = correct / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


@dataclass(frozen=True)
class EvalResult:
    correct: int  # images whose top-1 prediction is the label
    correct5: int  # images whose label is among the top-5 predictions
    n: int  # images evaluated
    class_correct: tuple[int, ...] = ()  # per label: images of that label classified correctly
    class_n: tuple[int, ...] = ()  # per label: images of that label

    @property
    def top1(self) -> float:
        return 100.0 * self.correct / self.n

    @property
    def top5(self) -> float:
        return 100.0 * self.correct5 / self.n

    @property
    def top1_ci95(self) -> tuple[float, float]:
        lo, hi = wilson_interval(self.correct, self.n)
        return 100.0 * lo, 100.0 * hi

    def per_class_top1(self) -> list[float | None]:
        """Top-1 in percent of each label 0..K-1 (None where the data holds none of it)."""
        return [round(100.0 * c / m, 4) if m else None for c, m in zip(self.class_correct, self.class_n)]

    def to_dict(self) -> dict:
        lo, hi = self.top1_ci95
        return {"top1": round(self.top1, 4), "top5": round(self.top5, 4), "correct": self.correct,
                "correct5": self.correct5, "n": self.n,
                "top1_ci95": [round(lo, 2), round(hi, 2)]}


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    """Number of rows whose label is among the k largest logits."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return int((top == labels.unsqueeze(1)).any(dim=1).sum())


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset | DataLoader, batch_size: int = 256,
             device: torch.device | str | None = None, progress: bool = True,
             workers: int = 0) -> EvalResult:
    """Accuracy of ``model`` on ``data`` (a Dataset of (image, label) or a DataLoader), on
    ``device`` (the model is moved there) or where the model lives."""
    loader = data if isinstance(data, DataLoader) else DataLoader(
        data, batch_size=batch_size, shuffle=False, num_workers=workers)
    if device is None:
        device = next(model.parameters()).device
    else:
        model.to(device)  # the model follows the requested device (in place, as nn.Module.to)
    was_training = model.training
    model.eval()
    correct = correct5 = n = 0
    per_class = None  # (2, K): images of each label, and those classified correctly
    bar = tqdm(loader, desc="eval", disable=not progress, leave=False, unit="batch")
    try:
        for x, y in bar:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            k, labels = logits.shape[1], y.cpu()
            if per_class is None:
                per_class = torch.zeros(2, k, dtype=torch.long)
            per_class[0] += torch.bincount(labels, minlength=k)
            per_class[1] += torch.bincount(labels[(logits.argmax(dim=1) == y).cpu()], minlength=k)
            correct += topk_correct(logits, y, 1)
            correct5 += topk_correct(logits, y, 5)
            n += len(y)
            bar.set_postfix(top1=f"{100.0 * correct / n:.2f}")
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("evaluation data is empty")
    return EvalResult(correct, correct5, n, tuple(per_class[1].tolist()), tuple(per_class[0].tolist()))
