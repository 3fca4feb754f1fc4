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

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from texq.bns import BNStatsCollector, LayerStats, bns_loss, layer_weights
from texq.config import CalibrationConfig
from texq.models import get_info
from texq.nn_utils import frozen
from texq.texture import laws_loss, texture_energy


@dataclass
class CalibrationSet:
    images: Tensor  # (K * n, 3, H, W) in the model's normalised input space
    labels: Tensor  # (K * n,)
    centers: list[LayerStats]  # per BN layer: (K, C) mean and variance of each class's BN inputs
    history: list[dict]  # loss terms every 50 iterations


def calibration_loss(x: Tensor, logits: Tensor, labels: Tensor, stats: list[LayerStats],
                     running: list[LayerStats], weights: Tensor | None, cfg: CalibrationConfig,
                     mean, std, use_laws: bool, bns_norm: str = "mse") -> tuple[Tensor, dict]:
    """Eq. 10 with every term averaged over classes (see the module docstring)."""
    # each class's statistics against F's running ones
    l_bns = bns_loss(stats, running, weights, bns_norm)
    l_ce = F.cross_entropy(logits, labels)  # equal-size classes: the mean of the class means
    total = cfg.alpha1 * l_bns + cfg.alpha2 * l_ce
    terms = {"bns": l_bns.item(), "ce": l_ce.item()}
    if use_laws:
        l_laws = laws_loss(texture_energy(x, cfg.texture, mean, std), cfg.laws).mean()
        total = total + l_laws
        terms["laws"] = l_laws.item()
    return total, terms


def synthesize(model: nn.Module, cfg: CalibrationConfig, use_laws: bool = True,
               layered_bns: bool = True, device: torch.device | str = "cpu", seed: int = 0,
               progress: bool = True, bns_norm: str = "mse") -> CalibrationSet:
    """Optimise the calibration images of every class and extract their centers.

    ``layered_bns=False`` (Table 3 ablation) aligns with the plain Eq. 3 (every w_l = 1).
    """
    info = get_info(model)
    k, n = info.num_classes, cfg.images_per_class
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(k * n, 3, info.input_size, info.input_size, generator=gen).to(device)
    x.requires_grad_(True)
    labels = torch.arange(k, device=device).repeat_interleave(n)
    opt = torch.optim.Adam([x], lr=cfg.lr * cfg.warmup_lr_factor)  # warm-up: half lr (paper)
    history: list[dict] = []
    with frozen(model.to(device)), BNStatsCollector(model) as bns:
        bns.groups = labels
        weights = (layer_weights(len(bns.layers), cfg.shallow_weight, cfg.deep_weight)
                   if layered_bns else None)
        running = bns.running()
        bar = tqdm(range(cfg.iters), desc="step 1: calibration images", disable=not progress)
        for it in bar:
            if it == cfg.warmup_iters:
                for group in opt.param_groups:
                    group["lr"] = cfg.lr
            opt.zero_grad(set_to_none=True)
            logits = model(x)
            stats = [g.of_groups() for g in bns.collected()]
            loss, terms = calibration_loss(x, logits, labels, stats, running, weights, cfg,
                                           info.mean, info.std,
                                           use_laws=use_laws and it >= cfg.warmup_iters,
                                           bns_norm=bns_norm)
            loss.backward()
            opt.step()
            if it % 50 == 0 or it == cfg.iters - 1:
                history.append({"iter": it, "loss": loss.item(), **terms})
                bar.set_postfix({t: f"{v:.3f}" for t, v in terms.items()})
        images = x.detach()
        centers = class_centers(model, bns, images, labels)
    return CalibrationSet(images, labels, centers, history)


@torch.no_grad()
def class_centers(model: nn.Module, bns: BNStatsCollector, images: Tensor, labels: Tensor
                  ) -> list[LayerStats]:
    """Per-class BN-input mean and variance (K, C) of the calibration images: the centers."""
    bns.groups = labels
    model(images)
    out = []
    for g in bns.collected():
        if len(g.ids) != int(labels.max()) + 1:
            raise ValueError("every class needs at least one calibration image")
        out.append(LayerStats(g.mean.detach().clone(), g.var.detach().clone()))
    return out
