"""Gaussian-noise batches: the zero-effort calibration input (no data at all)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from texq.models.info import ModelInfo


def gaussian_batches(info: ModelInfo, n_batches: int, batch_size: int, seed: int = 0
                     ) -> Iterator[torch.Tensor]:
    """``n_batches`` batches of N(0, 1) images in the model's normalised input space."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch_size, 3, info.input_size, info.input_size)
    for _ in range(n_batches):
        yield torch.randn(shape, generator=gen)
