"""LAWS texture energy (section 3.2.1, Eq. 5-6).

Four 1-D LAWS filters (edge E5, spot S5, wave W5, ripple R5) give 16 separable 5x5 filters
``AB = A^T B`` (Eq. 5). An image's texture energy distribution T holds its 16 filter energies
normalised to sum 1. The dominant set K is the top-k of T (k = 9 in the paper); the
calibration loss L_LAWS (Eq. 6) keeps K's largest element near theta_U and the rest of K near
theta_L, each within a softness eps.

How the energy is measured (squared vs absolute response, grayscale vs per channel, filter
gains, de-normalisation) is not in the paper: :class:`TextureConfig` holds each choice and
``docs/interpretation.md`` says why the defaults were chosen.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Annotated

import torch
from torch import Tensor
from torch.nn import functional as F

from texq.util.domains import (
    FRACTION,
    NON_NEGATIVE,
    PROBABILITY,
    between,
    check_fields,
    one_of,
)
from texq.util.errors import ConfigError

LAWS_1D: dict[str, tuple[int, ...]] = {
    "E5": (-1, -2, 0, 2, 1),  # edge
    "S5": (-1, 0, 2, 0, -1),  # spot
    "W5": (-1, 2, 0, -2, 1),  # wave
    "R5": (1, -4, 6, -4, 1),  # ripple
}
FILTER_NAMES: tuple[str, ...] = tuple(a + b for a in LAWS_1D for b in LAWS_1D)
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights for grayscale


@dataclass(frozen=True)
class TextureConfig:
    """How T is measured (defaults: see docs/interpretation.md, 'Texture energy')."""

    energy: Annotated[str, one_of("square", "abs")] = "square"  # per-pixel energy of a filter response: r^2 or |r|
    color: Annotated[str, one_of("gray", "per_channel")] = "gray"  # filter the luma image or each RGB channel, energies averaged
    filter_norm: Annotated[str, one_of("none", "l1", "l2")] = "none"  # 'none' keeps LAWS' integer filters; 'l1' / 'l2' equalise gains
    denormalize: bool = True  # undo the model's input normalisation first (energies in [0,1] units)
    share: Annotated[float, FRACTION] = 0.8  # the top elements holding this share of T are the dominant ones (80% rule)

    def __post_init__(self) -> None:
        check_fields(self, "calibration.texture.")


def laws_filters(filter_norm: str = "none") -> Tensor:
    """The 16 5x5 LAWS filters (16, 1, 5, 5) in FILTER_NAMES order; ``AB[i, j] = A[i] * B[j]``."""
    vecs = {k: torch.tensor(v, dtype=torch.float32) for k, v in LAWS_1D.items()}
    bank = torch.stack([torch.outer(vecs[a], vecs[b]) for a in LAWS_1D for b in LAWS_1D])
    if filter_norm == "l1":
        bank = bank / bank.abs().sum(dim=(1, 2), keepdim=True)
    elif filter_norm == "l2":
        bank = bank / bank.pow(2).sum(dim=(1, 2), keepdim=True).sqrt()
    return bank.unsqueeze(1)


@functools.lru_cache(maxsize=None)  # never evicted: a captured CUDA graph may read them
def _constant(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """A (1, len, 1, 1) constant on ``device``, made once (no host-to-device copy per call, so
    the texture loss can run inside a CUDA graph capture)."""
    return torch.tensor(values, dtype=dtype, device=device).view(1, -1, 1, 1)


@functools.lru_cache(maxsize=None)
def _filters_on(filter_norm: str, device: torch.device, dtype: torch.dtype) -> Tensor:
    return laws_filters(filter_norm).to(device=device, dtype=dtype)


def _to_unit_range(images: Tensor, mean, std) -> Tensor:
    m = _constant(tuple(float(v) for v in mean), images.device, images.dtype)
    s = _constant(tuple(float(v) for v in std), images.device, images.dtype)
    return images * s + m


def texture_energy(images: Tensor, cfg: TextureConfig = TextureConfig(), mean=None, std=None) -> Tensor:
    """T of each image: (N, 16) energies normalised to sum 1 (differentiable).

    ``images`` are (N, 3, H, W); if ``cfg.denormalize``, ``mean``/``std`` are the model's input
    normalisation and are undone first. Filters are applied without padding (no border energy).
    """
    x = images
    if cfg.denormalize:
        if mean is None or std is None:
            raise ConfigError("texture_energy(denormalize=True) needs the model's mean and std")
        x = _to_unit_range(x, mean, std)
    if cfg.color == "gray":
        x = (x * _constant(LUMA, x.device, x.dtype)).sum(dim=1, keepdim=True)
    n, c, h, w = x.shape
    bank = _filters_on(cfg.filter_norm, x.device, x.dtype)
    resp = F.conv2d(x.reshape(n * c, 1, h, w), bank)  # (N*C, 16, H-4, W-4)
    energy = resp.square() if cfg.energy == "square" else resp.abs()
    e = energy.mean(dim=(2, 3)).reshape(n, c, -1).mean(dim=1)  # (N, 16)
    return e / e.sum(dim=1, keepdim=True).clamp_min(1e-12)


def dominant_set(t: Tensor, k: int = 9) -> Tensor:
    """K: the k largest elements of each T, in decreasing order (N, k)."""
    return t.topk(k, dim=1).values


def dominant_count(t: Tensor, share: float = 0.8) -> Tensor:
    """Number of dominant texture elements: the fewest top elements of T that "account for more
    than" ``share`` of it (all 16 if rounding keeps the total at the share)."""
    csum = t.sort(dim=1, descending=True).values.cumsum(dim=1)
    return ((csum <= share).sum(dim=1) + 1).clamp_max(t.shape[1])


@dataclass(frozen=True)
class LawsLossConfig:
    """Eq. 6 and its hyper-parameters (section 4.3's optimum)."""

    k: Annotated[int, between(1, len(FILTER_NAMES))] = 9  # size of the dominant set K
    theta_u: Annotated[float, PROBABILITY] = 0.3  # target (upper bound) of K_max
    theta_l: Annotated[float, PROBABILITY] = 0.5  # target (lower bound) of the rest of K
    eps: Annotated[float, NON_NEGATIVE] = 0.015  # softness: deviations up to eps cost nothing
    # second term on sum(K) - K_max (text); 'one_minus_max' (Eq. 6 as printed)
    rest_term: Annotated[str, one_of("sum_minus_max", "one_minus_max")] = "sum_minus_max"

    def __post_init__(self) -> None:
        check_fields(self, "calibration.laws.")


def laws_loss(t: Tensor, cfg: LawsLossConfig = LawsLossConfig()) -> Tensor:
    """L_LAWS^C (Eq. 6) of each T (N,): ``max(|K_max - theta_U| - eps, 0) + max(|rest - theta_L| - eps, 0)``."""
    top = dominant_set(t, cfg.k)
    k_max = top[:, 0]
    rest = top.sum(dim=1) - k_max if cfg.rest_term == "sum_minus_max" else 1.0 - k_max
    return (F.relu((k_max - cfg.theta_u).abs() - cfg.eps)
            + F.relu((rest - cfg.theta_l).abs() - cfg.eps))
