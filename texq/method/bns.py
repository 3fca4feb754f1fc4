"""Batch-normalisation statistics (BNS): one hook-based collector and the losses of Eq. 3, 7, 8, 11.

The collector records, at every BatchNorm layer of a model, the per-channel mean and variance of
the layer's *input* for the current forward pass -- over the whole batch, or per group of samples
(per class) in one batched pass. "sigma" in the paper is the variance (the BN layer's
``running_var``); variances are biased (divide by the count), as BN normalises with.

Layers are numbered l = 1..L in module registration order. The statistics of all layers are held
side by side, channels concatenated (``LayerStats.sizes`` gives each layer's channel count), so
that grouping and every loss term take a handful of operations for the whole network instead of a
handful per layer: on a GPU each operation is a kernel launch. Everything here has fixed shapes
and never reads a value back to the host (capturable in a CUDA graph).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import Tensor, nn

from texq.util.errors import ConfigError


@dataclass
class LayerStats:
    """Per-channel mean and variance of one layer, or of several side by side (``sizes``)."""

    mean: Tensor  # (C,), or (G, C) for G groups
    var: Tensor  # same shape as mean
    present: Tensor | None = None  # (G,) 1.0 for the groups a per-group loss averages over
    sizes: tuple[int, ...] | None = None  # channels of each layer along the last axis; None: one

    def layers(self) -> list["LayerStats"]:
        """One LayerStats per layer (views)."""
        sizes = self.sizes or (self.mean.shape[-1],)
        return [LayerStats(m, v, self.present) for m, v in
                zip(self.mean.split(sizes, -1), self.var.split(sizes, -1))]


def concat(stats: Sequence[LayerStats]) -> LayerStats:
    """Per-layer statistics side by side (the layout every loss here computes on)."""
    return LayerStats(torch.cat([s.mean for s in stats], -1), torch.cat([s.var for s in stats], -1),
                      stats[0].present, tuple(s.mean.shape[-1] for s in stats))


@dataclass
class GroupedStats:
    """Statistics of each of G groups (ids 0..G-1) in a batch: ``counts`` (G,) and (G, C) stats.

    Every group has a row whatever the batch holds (fixed shapes: no host sync, capturable in a
    CUDA graph); a group with no sample has count 0 and zero statistics, and is left out of
    per-group losses through :meth:`of_groups`' ``present`` mask."""

    counts: Tensor
    mean: Tensor
    var: Tensor
    sizes: tuple[int, ...] | None = None

    def pooled(self) -> LayerStats:
        """The whole batch's statistics, from the groups' (law of total variance; exact)."""
        w = (self.counts / self.counts.sum()).unsqueeze(1)
        mean = (w * self.mean).sum(dim=0)
        var = (w * (self.var + (self.mean - mean).square())).sum(dim=0)
        return LayerStats(mean, var, None, self.sizes)

    def of_groups(self) -> LayerStats:
        """Per-group statistics with the mask of the groups present in the batch."""
        return LayerStats(self.mean, self.var, (self.counts > 0).to(self.mean.dtype), self.sizes)

    def layers(self) -> list["GroupedStats"]:
        sizes = self.sizes or (self.mean.shape[-1],)
        return [GroupedStats(self.counts, m, v) for m, v in
                zip(self.mean.split(sizes, -1), self.var.split(sizes, -1))]


def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers in registration order (l = 1..L)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def per_sample(x: Tensor) -> tuple[Tensor, Tensor]:
    """Each sample's per-channel mean and (centred, biased) variance over the other axes of
    ``x`` (N, C, ...): two (N, C) tensors. Group statistics follow exactly from these (all
    samples have the same number of positions)."""
    dims = tuple(range(2, x.dim()))
    if not dims:
        return x, torch.zeros_like(x)
    mean = x.mean(dim=dims, keepdim=True)
    var = (x - mean).square().mean(dim=dims)
    return mean.flatten(1), var


def batch_from_samples(mean: Tensor, var: Tensor) -> LayerStats:
    """The batch's per-channel mean and variance from per-sample ones (law of total variance)."""
    m = mean.mean(dim=0)
    return LayerStats(m, (var + (mean - m).square()).mean(dim=0))


def groups_from_samples(mean: Tensor, var: Tensor, groups: Tensor, num_groups: int) -> GroupedStats:
    """Per-group mean and variance of the groups 0..G-1 of ``groups`` (N,) from per-sample
    statistics (N, C) (law of total variance: within-sample plus between-sample spread)."""
    ids = torch.arange(num_groups, device=mean.device)
    onehot = (groups.unsqueeze(0) == ids.unsqueeze(1)).to(mean.dtype)  # (G, N)
    counts = onehot.sum(dim=1)
    avg = onehot / counts.clamp_min(1.0).unsqueeze(1)  # absent groups: a zero row
    g_mean = avg @ mean  # (G, C)
    own = onehot.t() @ g_mean  # (N, C) each sample's group mean (matmul: deterministic backward)
    g_var = avg @ (var + (mean - own).square())
    return GroupedStats(counts, g_mean, g_var)


def batch_mean_var(x: Tensor) -> LayerStats:
    """Per-channel mean and biased variance of ``x`` (N, C, ...) over everything but channels."""
    return batch_from_samples(*per_sample(x))


def group_mean_var(x: Tensor, groups: Tensor, num_groups: int) -> GroupedStats:
    """Per-channel mean and biased variance of ``x`` (N, C, ...) for each group id 0..G-1 of
    ``groups`` (N,); absent groups get zero rows. Each sample is centred on its own mean first
    (two-pass), so that large means lose no precision."""
    return groups_from_samples(*per_sample(x), groups, num_groups)


class BNStatsCollector:
    """Record BN-input statistics of each forward pass of ``model``.

    >>> with BNStatsCollector(model) as bns:
    ...     model(x)                          # bns.collected(): one LayerStats per BN layer
    ...     bns.set_groups(labels, 10)        # later passes record GroupedStats of labels 0..9
    ...     model(x); bns.stats_all()         # all layers side by side (what the losses take)
    """

    def __init__(self, model: nn.Module):
        self.layers = bn_layers(model)
        if not self.layers:
            raise ConfigError("the model has no BatchNorm layer: BNS losses need one")
        self.sizes = tuple(m.num_features for m in self.layers)
        self.groups: Tensor | None = None
        self.num_groups = 0
        self.samples: list = [None] * len(self.layers)
        self._handles: list = []
        self._attached = self._active = False

    def set_groups(self, groups: Tensor | None, num_groups: int = 0) -> None:
        """Record per-group statistics of the ids 0..num_groups-1 in ``groups`` (None: whole batch)."""
        if groups is not None and num_groups < 1:
            raise ValueError("set_groups needs the number of groups (ids 0..num_groups-1)")
        self.groups, self.num_groups = groups, num_groups

    def _hook(self, index: int):
        def fn(module, inputs):
            if self._active:
                self.samples[index] = per_sample(inputs[0].float())  # float32 under autocast too
        return fn

    def attach(self) -> "BNStatsCollector":
        """Keep the hooks on the model for good; ``with`` then only switches recording on and
        off (no hook is added or removed per pass: a compiled step traces without a break)."""
        if not self._attached:
            self._register()
            self._attached = True
        return self

    def detach(self) -> None:
        """Take the hooks off the model again."""
        self._remove()
        self._attached = self._active = False

    def _register(self) -> None:
        self._handles = [m.register_forward_pre_hook(self._hook(i)) for i, m in enumerate(self.layers)]

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "BNStatsCollector":
        if not self._attached:
            self._register()
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        self._active = False
        if not self._attached:
            self._remove()

    def running(self) -> list[LayerStats]:
        """The BN layers' stored running mean and variance (the targets of Eq. 3)."""
        return [LayerStats(m.running_mean, m.running_var) for m in self.layers]

    def stats_all(self) -> LayerStats | GroupedStats:
        """The last forward pass's statistics of all layers side by side: LayerStats, or
        GroupedStats after ``set_groups``. Read once per forward pass (it releases them)."""
        if any(s is None for s in self.samples):
            raise RuntimeError("no forward pass has been recorded yet")
        mean = torch.cat([m for m, _ in self.samples], 1)
        var = torch.cat([v for _, v in self.samples], 1)
        self.samples = [None] * len(self.layers)  # read once per pass: hold no autograd graph
        if self.groups is None:
            return replace(batch_from_samples(mean, var), sizes=self.sizes)
        return replace(groups_from_samples(mean, var, self.groups, self.num_groups), sizes=self.sizes)

    def collected(self) -> list:
        """The last forward pass's statistics, one LayerStats (or GroupedStats) per layer (read
        once per forward pass, as ``stats_all``)."""
        return self.stats_all().layers()


def layer_split(num_layers: int) -> int:
    """The paper's ``ceil(L/2) - 2``, with its ceiling as defined there: "the smallest integer
    greater than its input" (so L/2 + 1 for even L; the usual ceiling for odd L)."""
    return num_layers // 2 + 1 - 2


def layer_weights(num_layers: int, shallow: float, deep: float) -> list[float]:
    """w_l of Eq. 7/8/11: ``shallow`` for 1 <= l < ceil(L/2) - 2, ``deep`` for the rest."""
    split = layer_split(num_layers)
    return [float(shallow if l < split else deep) for l in range(1, num_layers + 1)]


@functools.lru_cache(maxsize=None)  # a captured graph may read them for good: never evicted
def _layer_constants(sizes: tuple[int, ...], weights: tuple[float, ...], norm: str,
                     device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(segment matrix (sum C, L), 1/C_l (L,), per-layer coefficients (L,)) on ``device``, made
    once per layout (no host-to-device copy inside a step, so a CUDA graph can capture it)."""
    seg = torch.zeros(sum(sizes), len(sizes), dtype=dtype)
    start = 0
    for l, c in enumerate(sizes):
        seg[start:start + c, l] = 1.0
        start += c
    used = sum(1 for w in weights if w != 0.0)
    coef = torch.tensor([abs(w) / (used if norm == "mse" else 1) for w in weights], dtype=dtype)
    inv = torch.tensor([1.0 / c for c in sizes], dtype=dtype)
    return seg.to(device), inv.to(device), coef.to(device)


def _group_mean(d: Tensor, present: Tensor | None) -> Tensor:
    """Mean of per-group values over the groups present (all groups when no mask)."""
    if present is None or d.dim() == 0:
        return d.mean()
    return (d * present).sum() / present.sum().clamp_min(1.0)


def bns_loss(stats: Sequence[LayerStats] | LayerStats, targets: Sequence[LayerStats] | LayerStats,
             weights: Sequence[float] | Tensor | None = None, norm: str = "mse") -> Tensor:
    """BNS alignment: per layer d(w_l mu_l, w_l mu*_l) + d(w_l var_l, w_l var*_l) (Eq. 3, 7, 8, 11).

    ``stats`` and ``targets``: one LayerStats per layer, or all layers side by side (``sizes``).
    ``norm='mse'`` (default): d is the mean square over channels and layers are averaged over
    those with a non-zero weight -- the ``nn.MSELoss`` form of the code the paper was built on,
    under which its alphas were tuned. ``norm='l2'``: d is the L2 norm and layers are summed, as
    Eq. 3 is printed. Each layer's term is multiplied by w_l: for the L2 norm that is exactly
    ``||w_l (.)||``; for the mean square it keeps the weights linear (0.2 vs 1.1) instead of
    squaring them. Per-group statistics ((G, C) against (G, C) or broadcast (C,) targets) are
    averaged over the groups present (``stats.present``; all groups without a mask), so a
    per-class loss has the magnitude of one class's loss.
    """
    if not isinstance(stats, LayerStats) and not isinstance(targets, LayerStats) \
            and len(stats) != len(targets):
        raise ConfigError(f"{len(stats)} layers of statistics against {len(targets)} targets")
    s = stats if isinstance(stats, LayerStats) else concat(stats)
    t = targets if isinstance(targets, LayerStats) else concat(targets)
    sizes = s.sizes or (s.mean.shape[-1],)
    if t.mean.shape[-1] != sum(sizes):
        raise ConfigError(f"statistics of {sum(sizes)} channels against targets of {t.mean.shape[-1]}")
    if norm not in ("mse", "l2"):
        raise ConfigError(f"bns norm={norm!r}: expected 'mse' or 'l2'")
    ws = (1.0,) * len(sizes) if weights is None else tuple(float(w) for w in (
        weights.tolist() if isinstance(weights, Tensor) else weights))
    if len(ws) != len(sizes):
        raise ConfigError(f"{len(ws)} layer weights for {len(sizes)} layers")
    if all(w == 0.0 for w in ws):
        raise ConfigError("bns_loss: every layer weight is zero")
    seg, inv, coef = _layer_constants(sizes, ws, norm, s.mean.device, s.mean.dtype)
    per_layer = ((s.mean - t.mean).square() @ seg, (s.var - t.var).square() @ seg)  # (..., L)
    if norm == "mse":
        d = per_layer[0] * inv + per_layer[1] * inv
    else:  # the L2 norm; clamped so that an exact match has a zero (not NaN) gradient
        d = per_layer[0].clamp_min(1e-30).sqrt() + per_layer[1].clamp_min(1e-30).sqrt()
    return _group_mean(d @ coef, s.present)


def distort(targets: LayerStats | list[LayerStats], nu_mu: float, nu_sigma: float,
            generator: torch.Generator | None = None) -> LayerStats | list[LayerStats]:
    """Eq. 11's targets: each center plus fresh Gaussian noise of std ``nu_mu`` on means and
    ``nu_sigma`` on variances, as FDDA draws ``torch.normal(center, std)`` at every step. The
    noise is drawn on the centers' device (from ``generator`` if given: it must live there)."""
    if isinstance(targets, list):
        return [distort(t, nu_mu, nu_sigma, generator) for t in targets]
    t = targets
    noise_m = torch.randn(t.mean.shape, generator=generator, device=t.mean.device)
    noise_v = torch.randn(t.var.shape, generator=generator, device=t.var.device)
    return replace(t, mean=t.mean + noise_m * nu_mu, var=t.var + noise_v * nu_sigma)
