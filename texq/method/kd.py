"""The distillation term of Eq. 13-14: KL(F || Q) on temperature-softened outputs, times T^2."""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F

KD_REDUCTIONS = ("mean", "batchmean")  # KL over batch x classes (lineage) / per sample


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float,
            reduction: str = "mean") -> Tensor:
    """KL(teacher || student) on temperature-softened outputs times T^2.

    ``reduction='mean'`` averages the element-wise KL terms over batch x classes (the lineage's
    ``nn.KLDivLoss()`` default), ``'batchmean'`` sums over classes and averages over the batch
    (the KL divergence proper: ``num_classes`` times larger)."""
    if reduction not in KD_REDUCTIONS:
        raise ValueError(f"kd reduction {reduction!r}: expected one of {KD_REDUCTIONS}")
    t = temperature
    kl = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1),
                  reduction="batchmean")  # torch's 'mean' is to change meaning: divide explicitly
    if reduction == "mean":
        kl = kl / student_logits.shape[1]
    return kl * (t * t)
