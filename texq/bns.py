"""Batch-normalisation statistics (BNS): one hook-based collector and the losses of Eq. 3, 7, 8, 11.

The collector records, at every BatchNorm layer of a model, the per-channel mean and variance of
the layer's *input* for the current forward pass -- over the whole batch, or per group of samples
(per class) in one batched pass. "sigma" in the paper is the variance (the BN layer's
``running_var``); variances are biased (divide by the count), as BN normalises with.

Layers are numbered l = 1..L in module registration order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from texq.errors import ConfigError


@dataclass
class LayerStats:
    mean: Tensor  # (C,), or (G, C) for G groups
    var: Tensor  # same shape as mean


@dataclass
class GroupedStats:
    """Statistics of the groups present in a batch: ``ids`` (P,), ``counts`` (P,), (P, C) stats."""

    ids: Tensor
    counts: Tensor
    mean: Tensor
    var: Tensor

    def pooled(self) -> LayerStats:
        """The whole batch's statistics, from the groups' (law of total variance; exact)."""
        w = (self.counts / self.counts.sum()).to(self.mean.dtype).unsqueeze(1)
        mean = (w * self.mean).sum(dim=0)
        var = (w * (self.var + (self.mean - mean).square())).sum(dim=0)
        return LayerStats(mean, var)

    def of_groups(self) -> LayerStats:
        return LayerStats(self.mean, self.var)


def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers in registration order (l = 1..L)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def batch_mean_var(x: Tensor) -> LayerStats:
    """Per-channel mean and biased variance of ``x`` (N, C, ...) over everything but channels."""
    c = x.shape[1]
    flat = x.transpose(0, 1).reshape(c, -1)
    mean = flat.mean(dim=1)
    return LayerStats(mean, (flat - mean.unsqueeze(1)).square().mean(dim=1))


def group_mean_var(x: Tensor, groups: Tensor) -> GroupedStats:
    """Per-channel mean and biased variance of ``x`` (N, C, ...) for each group id present in
    ``groups`` (N,). Two-pass (centred), so that large means lose no precision."""
    n, c = x.shape[:2]
    flat = x.reshape(n, c, -1)
    ids, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    onehot = torch.zeros(len(ids), n, dtype=x.dtype, device=x.device)
    onehot[inverse, torch.arange(n, device=x.device)] = 1.0
    weights = onehot / (counts.to(x.dtype).unsqueeze(1) * flat.shape[2])  # (P, N)
    mean = weights @ flat.sum(dim=2)  # (P, C)
    var = weights @ (flat - mean[inverse].unsqueeze(2)).square().sum(dim=2)
    return GroupedStats(ids, counts, mean, var)


def select_groups(centers: list[LayerStats], stats: list[GroupedStats]) -> list[LayerStats]:
    """The per-class centers (K, C) of the groups present in ``stats``, in the same order."""
    return [LayerStats(c.mean[s.ids], c.var[s.ids]) for c, s in zip(centers, stats)]


class BNStatsCollector:
    """Record BN-input statistics of each forward pass of ``model``.

    >>> with BNStatsCollector(model) as bns:
    ...     model(x)                 # bns.collected(): one LayerStats per BN layer
    ...     bns.groups = labels      # later passes record GroupedStats (per label present)
    """

    def __init__(self, model: nn.Module):
        self.layers = bn_layers(model)
        if not self.layers:
            raise ConfigError("the model has no BatchNorm layer: BNS losses need one")
        self.groups: Tensor | None = None
        self.stats: list = [None] * len(self.layers)
        self._handles: list = []

    def _hook(self, index: int):
        def fn(module, inputs):
            x = inputs[0]
            self.stats[index] = batch_mean_var(x) if self.groups is None else group_mean_var(x, self.groups)
        return fn

    def __enter__(self) -> "BNStatsCollector":
        self._handles = [m.register_forward_pre_hook(self._hook(i)) for i, m in enumerate(self.layers)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def running(self) -> list[LayerStats]:
        """The BN layers' stored running mean and variance (the targets of Eq. 3)."""
        return [LayerStats(m.running_mean, m.running_var) for m in self.layers]

    def collected(self) -> list:
        """The last forward pass's statistics: LayerStats, or GroupedStats when ``groups`` is set."""
        if any(s is None for s in self.stats):
            raise RuntimeError("no forward pass has been recorded yet")
        return list(self.stats)


def layer_split(num_layers: int) -> int:
    """The paper's ``ceil(L/2) - 2``, with its ceiling as defined there: "the smallest integer
    greater than its input" (so L/2 + 1 for even L; the usual ceiling for odd L)."""
    return num_layers // 2 + 1 - 2


def layer_weights(num_layers: int, shallow: float, deep: float) -> Tensor:
    """w_l of Eq. 7/8/11: ``shallow`` for 1 <= l < ceil(L/2) - 2, ``deep`` for the rest."""
    split = layer_split(num_layers)
    return torch.tensor([shallow if l < split else deep for l in range(1, num_layers + 1)])


def _distance(a: Tensor, b: Tensor, norm: str) -> Tensor:
    """Distance over the last (channel) dimension, one value per group."""
    d = a - b
    if norm == "l2":
        return d.norm(dim=-1)
    if norm == "mse":
        return d.square().mean(dim=-1)
    raise ConfigError(f"bns norm={norm!r}: expected 'mse' or 'l2'")


def bns_loss(stats: list[LayerStats], targets: list[LayerStats], weights: Tensor | None = None,
             norm: str = "mse") -> Tensor:
    """BNS alignment: per layer d(w_l mu_l, w_l mu*_l) + d(w_l var_l, w_l var*_l) (Eq. 3, 7, 8, 11).

    ``norm='mse'`` (default): d is the mean square over channels and layers are averaged over
    those with a non-zero weight -- the ``nn.MSELoss`` form of the code the paper was built on,
    under which its alphas were tuned. ``norm='l2'``: d is the L2 norm and layers are summed, as
    Eq. 3 is printed. Each layer's term is multiplied by w_l: for the L2 norm that is exactly
    ``||w_l (.)||``; for the mean square it keeps the weights linear (0.2 vs 1.1) instead of
    squaring them. Per-group statistics ((G, C) against (G, C) or broadcast (C,) targets) are
    averaged over groups, so a per-class loss has the magnitude of one class's loss.
    """
    if len(stats) != len(targets):
        raise ConfigError(f"{len(stats)} layers of statistics against {len(targets)} targets")
    total = stats[0].mean.new_zeros(())
    used = 0
    for i, (s, t) in enumerate(zip(stats, targets)):
        w = 1.0 if weights is None else float(weights[i])
        if w == 0.0:
            continue
        used += 1
        total = total + abs(w) * (_distance(s.mean, t.mean, norm).mean()
                                  + _distance(s.var, t.var, norm).mean())
    if used == 0:
        raise ConfigError("bns_loss: every layer weight is zero")
    return total / used if norm == "mse" else total


def distort(targets: list[LayerStats], nu_mu: float, nu_sigma: float,
            generator: torch.Generator | None = None) -> list[LayerStats]:
    """Eq. 11's targets: each center plus fresh Gaussian noise of std ``nu_mu`` on means and
    ``nu_sigma`` on variances, as FDDA draws ``torch.normal(center, std)`` at every step."""
    out = []
    for t in targets:
        noise_m = torch.randn(t.mean.shape, generator=generator).to(t.mean.device) * nu_mu
        noise_v = torch.randn(t.var.shape, generator=generator).to(t.var.device) * nu_sigma
        out.append(LayerStats(t.mean + noise_m, t.var + noise_v))
    return out
