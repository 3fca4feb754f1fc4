"""Step 1 (section 3.3.1): the calibration set and its per-class calibration centers.

Gaussian-noise images, ``images_per_class`` per class, are optimised against the frozen FP model
with Eq. 10: ``L_LAWS^C + alpha1 * L_L-BNS^C + alpha2 * L_CE^C``. The paper trains each class's
image on its own; here all classes are optimised in one batch with per-class BN statistics and
per-class losses averaged over classes. The FP model runs in eval mode (every image's forward pass
is independent of the others), each image's gradient only comes from its own class's terms, and
Adam's update is element-wise and invariant to a common gradient scale, so this is the same
optimisation (up to Adam's epsilon), only batched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from texq.method.bns import (
    BNStatsCollector,
    LayerStats,
    bns_loss,
    concat,
    layer_weights,
)
from texq.method.texture import LawsLossConfig, TextureConfig, laws_loss, texture_energy
from texq.models import get_info
from texq.util.domains import (
    COUNT,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    check_fields,
)
from texq.util.errors import ConfigError
from texq.util.graphs import GraphedStep
from texq.util.nn_utils import frozen
from texq.util.progress import progress_bar


@dataclass(frozen=True)
class CalibrationConfig:
    """Step 1: one synthetic calibration image per class (Eq. 10), then the class centers."""

    images_per_class: Annotated[int, COUNT] = 1  # the paper synthesises one calibration image per class
    classes_per_step: Annotated[int, NON_NEGATIVE_INT] = 0  # optimise this many classes at a time (0: all; same result, less memory)
    iters: Annotated[int, COUNT] = 1500  # the paper's maximum number of iterations
    warmup_iters: Annotated[int, NON_NEGATIVE_INT] = 150  # first iterations at half lr and without L_LAWS (paper)
    lr: Annotated[float, POSITIVE] = 0.05  # constant learning rate of the images (paper), Adam
    warmup_lr_factor: Annotated[float, POSITIVE] = 0.5  # "half learning rate" during the warm-up (paper)
    alpha1: Annotated[float, NON_NEGATIVE] = 2.0  # weight of the layered BNS loss L_L-BNS^C (paper's grid search)
    alpha2: Annotated[float, NON_NEGATIVE] = 10.0  # weight of the cross-entropy L_CE^C (paper's grid search)
    shallow_weight: Annotated[float, NON_NEGATIVE] = 0.2  # w_l of Eq. 7 for l < ceil(L/2) - 2 (paper)
    deep_weight: Annotated[float, NON_NEGATIVE] = 1.1  # w_l of Eq. 7 for the deeper layers (paper)
    laws: LawsLossConfig = field(default_factory=LawsLossConfig)  # Eq. 6 (k, theta_U, theta_L, eps)
    texture: TextureConfig = field(default_factory=TextureConfig)  # how T is measured

    def __post_init__(self) -> None:
        check_fields(self, "calibration.")
        if self.warmup_iters > self.iters:
            raise ConfigError(f"calibration.warmup_iters={self.warmup_iters} with iters={self.iters}: "
                              f"expected warmup_iters <= iters")


@dataclass
class CalibrationSet:
    images: Tensor  # (K * n, 3, H, W) in the model's normalised input space
    labels: Tensor  # (K * n,)
    centers: list[LayerStats]  # per BN layer: (K, C) mean and variance of each class's BN inputs
    history: list[dict]  # loss terms every 50 iterations

    def to_dict(self) -> dict:
        """Tensors on the CPU and plain lists: what ``torch.load(..., weights_only=True)`` reads."""
        return {"images": self.images.cpu(), "labels": self.labels.cpu(),
                "center_mean": [c.mean.cpu() for c in self.centers],
                "center_var": [c.var.cpu() for c in self.centers], "history": self.history}

    @classmethod
    def from_dict(cls, obj: dict) -> "CalibrationSet":
        centers = [LayerStats(m, v) for m, v in zip(obj["center_mean"], obj["center_var"])]
        return cls(obj["images"], obj["labels"], centers, obj["history"])


def calibration_loss(x: Tensor, logits: Tensor, labels: Tensor,
                     stats: LayerStats | list[LayerStats], running: LayerStats | list[LayerStats],
                     weights: Sequence[float] | None, cfg: CalibrationConfig, mean, std,
                     use_laws: bool, bns_norm: str = "mse") -> tuple[Tensor, dict[str, Tensor]]:
    """Eq. 10 with every term averaged over classes (see the module docstring); the terms are
    returned as detached 0-d tensors (no host sync)."""
    # each class's statistics against F's running ones
    l_bns = bns_loss(stats, running, weights, bns_norm)
    l_ce = F.cross_entropy(logits, labels)  # equal-size classes: the mean of the class means
    total = cfg.alpha1 * l_bns + cfg.alpha2 * l_ce
    terms = {"bns": l_bns.detach(), "ce": l_ce.detach()}
    if use_laws:
        l_laws = laws_loss(texture_energy(x, cfg.texture, mean, std), cfg.laws).mean()
        total = total + l_laws
        terms["laws"] = l_laws.detach()
    return total, terms


def synthesize(model: nn.Module, cfg: CalibrationConfig, use_laws: bool = True,
               layered_bns: bool = True, device: torch.device | str = "cpu", seed: int = 0,
               progress: bool = True, bns_norm: str = "mse", cuda_graphs: bool = True
               ) -> CalibrationSet:
    """Optimise the calibration images of every class and extract their centers.

    ``layered_bns=False`` (Table 3 ablation) aligns with the plain Eq. 3 (every w_l = 1).
    ``cfg.classes_per_step`` > 0 optimises the classes in chunks (for large models and many
    classes): each chunk's loss is scaled by its share of the classes, so every image receives
    the gradient it gets in the one-batch optimisation. On CUDA each iteration's forward and
    backward pass is replayed as a CUDA graph unless ``cuda_graphs=False`` (texq.util.graphs).
    """
    info = get_info(model)
    device = torch.device(device)
    k, n = info.num_classes, cfg.images_per_class
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(k * n, 3, info.input_size, info.input_size, generator=gen)
    labels = torch.arange(k).repeat_interleave(n)
    chunk = cfg.classes_per_step if cfg.classes_per_step > 0 else k
    images, centers, history = [], [], []
    with frozen(model.to(device)), BNStatsCollector(model) as bns:
        weights = (layer_weights(len(bns.layers), cfg.shallow_weight, cfg.deep_weight)
                   if layered_bns else None)
        running = concat(bns.running())
        bar = progress_bar(cfg.iters * -(-k // chunk), "step 1: calibration images", progress)
        for first in range(0, k, chunk):
            sel = (labels >= first) & (labels < first + chunk)
            classes = min(chunk, k - first)
            x, y = x0[sel].to(device), labels[sel].to(device)
            x, hist = _optimise(model, bns, x, y, first, classes, classes / k, weights, running,
                                cfg, info, use_laws, bns_norm, bar, cuda_graphs)
            history += [{"classes_from": first, **h} if chunk < k else h for h in hist]
            images.append(x)
            centers.append(class_centers(model, bns, x, y - first, classes))
        bar.close()
    centers = [LayerStats(torch.cat([c[i].mean for c in centers]), torch.cat([c[i].var for c in centers]))
               for i in range(len(centers[0]))]
    return CalibrationSet(torch.cat(images), labels.to(device), centers, history)


def _optimise(model, bns, x, labels, first, classes, share, weights, running, cfg, info,
              use_laws, bns_norm, bar, cuda_graphs) -> tuple[Tensor, list[dict]]:
    """Adam on the images ``x`` of classes ``first..first+classes-1``; the loss is scaled by
    ``share``. Loss terms are read from the device every 50 iterations only."""
    x = x.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.lr * cfg.warmup_lr_factor)  # warm-up: half lr (paper)
    history: list[dict] = []
    bns.set_groups(labels - first, classes)

    def make_step(laws_on: bool):
        def fn() -> Tensor:
            logits = model(x)
            stats = bns.stats_all().of_groups()
            loss, terms = calibration_loss(x, logits, labels, stats, running, weights, cfg,
                                           info.mean, info.std, use_laws=laws_on, bns_norm=bns_norm)
            (loss * share).backward()
            return torch.stack([loss.detach(), *terms.values()])
        names = ["loss", "bns", "ce"] + (["laws"] if laws_on else [])
        return GraphedStep(fn, x.device, [x], enabled=cuda_graphs), names

    steps = {False: make_step(False)}
    for it in range(cfg.iters):
        laws_on = use_laws and it >= cfg.warmup_iters
        if it == cfg.warmup_iters:
            for group in opt.param_groups:
                group["lr"] = cfg.lr
        if laws_on not in steps:
            steps = {laws_on: make_step(laws_on)}  # the warm-up's graph is not needed again
        step, names = steps[laws_on]
        values = step()
        opt.step()
        bar.update()
        if it % 50 == 0 or it == cfg.iters - 1:
            terms = dict(zip(names, values.tolist()))
            history.append({"iter": it, **terms})
            bar.set_postfix({t: f"{v:.3f}" for t, v in terms.items() if t != "loss"})
    return x.detach(), history


@torch.no_grad()
def class_centers(model: nn.Module, bns: BNStatsCollector, images: Tensor, labels: Tensor,
                  num_classes: int) -> list[LayerStats]:
    """Per-class BN-input mean and variance (K, C) of the calibration images: the centers.
    ``labels`` are 0..num_classes-1; every class needs at least one image."""
    if len(torch.unique(labels.cpu())) != num_classes:
        raise ValueError("every class needs at least one calibration image")
    bns.set_groups(labels, num_classes)
    model(images)
    return [LayerStats(g.mean.detach().clone(), g.var.detach().clone()) for g in bns.collected()]
