"""Step 3's configuration (``finetune`` in params.yaml) and the terms its history records."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from texq.method.kd import KD_REDUCTIONS
from texq.util.domains import (
    COUNT,
    FRACTION,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    PROBABILITY,
    check_fields,
    one_of,
)
from texq.util.errors import ConfigError

ACT_CALIB_AT = ("start", "end")  # the first / the last act_calib_epochs epochs of the warm-up
ACT_CALIB_INPUTS = ("generated", "batch")  # G's samples / Q's batch (G's + calibration images)
MIX_SLOTS = ("all", "bounded")  # fixed-shape mixup: Q scores all n mixes / at most mix_capacity(n, p)


@dataclass(frozen=True)
class FinetuneConfig:
    """Step 3: the quantized model Q trained with Eq. 14 while G keeps learning."""

    warmup_epochs: Annotated[int, COUNT] = 50  # G alone first (paper)
    epochs: Annotated[int, COUNT] = 450  # then G and Q together (paper)
    iters_per_epoch: Annotated[int, COUNT] = 200  # not in the paper; its lineage's value
    batch_size: Annotated[int, COUNT] = 128  # generated samples per step: 128 CIFAR, 16 ImageNet (paper)
    lr: Annotated[float, POSITIVE] = 1e-4  # Q's SGD (nesterov, momentum 0.9) learning rate, CIFAR value of GDFQ/IntraQ
    weight_decay: Annotated[float, NON_NEGATIVE] = 1e-4  # GDFQ's
    alpha6: Annotated[float, NON_NEGATIVE] = 20.0  # weight of the distillation loss, Eq. 14 (paper)
    kd_temperature: Annotated[float, POSITIVE] = 20.0  # softmax temperature of the KL term (lineage: T = 20, x T^2)
    kd_reduction: Annotated[str, one_of(*KD_REDUCTIONS)] = "mean"  # KL averaged over batch x classes, as the lineage's nn.KLDivLoss()
    mixup_p: Annotated[float, PROBABILITY] = 0.2  # probability that a sample is mixed, Eq. 9 (paper)
    act_calib_epochs: Annotated[int, COUNT] = 4  # activation ranges follow Q's inputs for this many warm-up epochs, then freeze
    act_calib_at: Annotated[str, one_of(*ACT_CALIB_AT)] = "start"  # which warm-up epochs observe: the first (GDFQ's rule) or the last
    act_calib_inputs: Annotated[str, one_of(*ACT_CALIB_INPUTS)] = "generated"  # observe G's samples (GDFQ) or Q's training batch ("batch")
    calib_per_batch: Annotated[int, NON_NEGATIVE_INT] = 16  # calibration images added to each batch (FDDA uses 16)
    calib_augment: bool = True  # random resized crop + flip of calibration images (FDDA)
    calib_crop_scale: Annotated[tuple[float, float], FRACTION] = (0.5, 1.0)  # crop area range: IntraQ's 0.5 for 32x32
    mix_slots: Annotated[str, one_of(*MIX_SLOTS)] = "all"  # CUDA graphs: Q scores all n mixes (exact) or only the mixed ones, up to a bound

    def __post_init__(self) -> None:
        check_fields(self, "finetune.")
        if not self.act_calib_epochs <= self.warmup_epochs:
            raise ConfigError(f"finetune.act_calib_epochs={self.act_calib_epochs} with warmup_epochs="
                              f"{self.warmup_epochs}: expected 1 <= act_calib_epochs <= warmup_epochs "
                              f"(ranges are observed during the warm-up; Q must train on frozen "
                              f"activation ranges, which its CUDA graph bakes in)")
        low, high = self.calib_crop_scale
        if low > high:
            raise ConfigError(f"finetune.calib_crop_scale={self.calib_crop_scale!r}: expected the "
                              f"smaller crop area first")

    def observes(self, epoch: int) -> bool:
        """Whether activation ranges are observed in ``epoch`` (0-based; always a warm-up epoch)."""
        first = self.first_observed_epoch()
        return first <= epoch < first + self.act_calib_epochs

    def first_observed_epoch(self) -> int:
        return 0 if self.act_calib_at == "start" else self.warmup_epochs - self.act_calib_epochs


#: every term a history row can hold, as MLflow, DVC's plot and history.jsonl name them: G's
#: Eq. 12 terms (CE, BNS against F's running statistics, the centers' layered and distorted BNS),
#: then Q's Eq. 13-14 terms (CE on labelled samples, KD), the mixed samples per step (Eq. 9) and
#: the mixes a bounded batch had no slot for (``mix_slots: bounded`` only)
HISTORY_TERMS = ("generator/ce_loss", "generator/bns_loss", "generator/layered_bns_loss",
                 "generator/distorted_bns_loss", "quantized/ce_loss", "quantized/kd_loss",
                 "quantized/mixed_per_step", "quantized/mix_overflow")
COUNT_TERMS = HISTORY_TERMS[-2:]  # counts per step, not losses (the progress line leaves them out)


def short_term(term: str) -> str:
    """A history term as the progress line shows it: ``generator/ce_loss`` -> ``G.ce``."""
    return term.replace("generator/", "G.").replace("quantized/", "Q.").removesuffix("_loss")
