"""Real training images as endless random batches: the real-data baseline (method ``real``)
only; the zero-shot methods never read them."""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from texq.data.sets import load_eval_data
from texq.models.info import ModelInfo


def real_batches(spec: str, info: ModelInfo, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless random batches of the training images ``spec`` names (cifar10/100: the training
    split), each randomly cropped with 1/8-side padding and flipped, drawn from torch's global RNG
    so that a resumed run draws the same batches."""
    from torchvision.transforms import v2

    data = load_eval_data(spec, info, train=True)
    size = info.input_size
    tf = v2.Compose([v2.RandomCrop(size, padding=size // 8), v2.RandomHorizontalFlip()])
    while True:
        idx = torch.randperm(len(data))[:batch_size].tolist()
        items = [data[i] for i in idx]
        yield torch.stack([tf(x) for x, _ in items]), torch.tensor([y for _, y in items])
