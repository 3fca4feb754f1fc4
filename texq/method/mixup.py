"""Mixup of samples only (Eq. 9): labels are never mixed, the mixed samples feed distillation."""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor


def mixup_samples(x: Tensor, p: float, generator: torch.Generator | None = None
                  ) -> tuple[Tensor, Tensor]:
    """Eq. 9: with probability ``p`` sample i becomes ``lam * x_i + (1 - lam) * x_j`` with
    ``lam ~ U(0, 1)`` and j a random sample of the batch; otherwise it stays ``x_i``.

    Returns the mixed batch and the boolean mask of the samples that were mixed.
    """
    n, dev = x.shape[0], x.device  # drawn where x lives (``generator`` too): no copies, no sync
    mixed = torch.rand(n, generator=generator, device=dev) < p
    partner = torch.randint(0, n, (n,), generator=generator, device=dev)
    lam = torch.rand(n, generator=generator, device=dev).view(-1, *([1] * (x.dim() - 1)))
    blend = lam * x + (1 - lam) * x[partner]
    return torch.where(mixed.view(-1, *([1] * (x.dim() - 1))), blend, x), mixed


@functools.lru_cache(maxsize=None)
def mix_capacity(n: int, p: float, tail: float = 1e-6) -> int:
    """The smallest c with P(more than c of n samples are mixed) <= ``tail``, each mixed with
    probability ``p`` (Eq. 9: the count is Binomial(n, p)); n when p = 1."""
    if p <= 0.0:
        return 0
    if p >= 1.0:
        return n
    # P(more than c mixed) summed from the top down, from 40 standard deviations above the mean
    # (the mass beyond is negligible): small terms only (1 - P(at most c) would lose the tail in
    # rounding for a huge n) and a loop of at most ~45 standard deviations; the pmf in log space
    # (comb(n, c) overflows a float from n ~ 1030)
    top = min(n, math.ceil(n * p + 40 * math.sqrt(n * p * (1 - p)) + 40))
    above = 0.0
    for c in range(top, -1, -1):
        pmf = math.exp(math.lgamma(n + 1) - math.lgamma(c + 1) - math.lgamma(n - c + 1)
                       + c * math.log(p) + (n - c) * math.log1p(-p))
        if above + pmf > tail:
            return c
        above += pmf
    return 0


def bounded_slots(mixed: Tensor, capacity: int) -> tuple[Tensor, Tensor, Tensor]:
    """Q's ``capacity`` slots for the mixed samples of a step (a fixed shape: no host sync).

    Returns ``order`` (c,), the batch indices the slots hold: the mixed samples first, in batch
    order, then unmixed ones; ``slot_mixed`` (c,), whether a slot holds a mixed sample; and
    ``kept`` (n,), the samples mixed in the end: those of ``mixed`` that found a slot (any beyond
    the c-th stay unmixed). c = min(capacity, n)."""
    order = torch.argsort((~mixed).to(torch.uint8), stable=True)[:min(capacity, len(mixed))]
    slot_mixed = mixed[order]
    kept = torch.zeros_like(mixed).index_copy(0, order, slot_mixed)
    return order, slot_mixed, kept


MIX_FORMS = ("none", "subset", "fixed", "bounded")  # how Q scores the mixes: mixed_scores


def mixed_scores(q, x: Tensor, p: float, form: str, capacity: int = 0):
    """Q's scores for Eq. 14 over ``x``: ``(out, student, kd_in, mixed, overflow)``.

    ``out[:n]`` is Q on the n samples (the CE term); ``student`` Q on each sample's mix and
    ``kd_in`` the mixes (F scores them for the KD term); ``mixed`` the samples mixed in the end;
    ``overflow`` the mixes that found no slot (``bounded`` only, else None). An unmixed sample is
    its own mix (Eq. 9), and Q runs in eval mode with frozen ranges, so samples do not interact:

    - ``none`` (no MKD): no mixing, KD on x itself;
    - ``subset``: Q scores the n samples and only the m mixed ones, the unmixed ones reusing the
      CE pass (cheapest where nothing is captured);
    - ``fixed``: Q scores the n samples and all n mixes (a fixed shape, as a CUDA graph needs);
    - ``bounded``: Q scores the n samples and ``c = capacity`` slots holding the mixed samples
      first, in batch order (:func:`bounded_slots`); the slots left over hold unmixed samples,
      whose scores are discarded. Mixed samples beyond the c-th stay unmixed, and are counted.
    The same draws in every form."""
    n = len(x)
    if form == "none":
        out = q(x).float()
        return out, out, x, torch.zeros(n, dtype=torch.bool, device=x.device), None
    x_mix, mixed = mixup_samples(x, p)
    if form == "fixed":
        out = q(torch.cat([x, x_mix])).float()
        return out, out[n:], x_mix, mixed, None
    if form == "subset":
        out = q(torch.cat([x, x_mix[mixed]])).float()
        student = out[:n].clone()
        student[mixed] = out[n:]
        return out, student, x_mix, mixed, None
    if form != "bounded":
        raise ValueError(f"mix form {form!r}: expected one of {', '.join(MIX_FORMS)}")
    order, slot_mixed, kept = bounded_slots(mixed, capacity)
    kd_in = torch.where(kept.view(-1, *([1] * (x.dim() - 1))), x_mix, x)
    out = q(torch.cat([x, kd_in[order]])).float()
    own = out[:n]
    student = own.index_copy(0, order, torch.where(slot_mixed.unsqueeze(1), out[n:], own[order]))
    return out, student, kd_in, kept, mixed.sum() - kept.sum()
