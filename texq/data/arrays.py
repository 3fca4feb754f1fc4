"""Images held in arrays: the ``.npz`` format of the shared assets.

An ``.npz`` evaluation file holds ``x``: (N, H, W, 3) uint8 RGB and ``y``: (N,) integer labels.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from texq.util.errors import DataError


def load_npz(path: str | os.PathLike, num_classes: int, input_size: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate ``x`` and ``y`` from an ``.npz`` file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            if not {"x", "y"} <= keys:
                raise DataError(f"{path} must hold arrays 'x' (images) and 'y' (labels); "
                                f"found {sorted(keys)}")
            x, y = f["x"], f["y"]
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"cannot read {path} as an .npz file: {exc}") from exc
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
        raise DataError(f"{path}: 'x' has shape {x.shape} and dtype {x.dtype}; "
                        f"expected (N, H, W, 3) uint8 RGB")
    if input_size is not None and x.shape[1:3] != (input_size, input_size):
        raise DataError(f"{path}: images are {x.shape[1]}x{x.shape[2]}, "
                        f"the model expects {input_size}x{input_size}")
    if y.ndim != 1 or y.shape[0] != x.shape[0] or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: 'y' has shape {y.shape} and dtype {y.dtype}; "
                        f"expected ({x.shape[0]},) integer labels, one per image")
    if len(y) == 0:
        raise DataError(f"{path} holds no images")
    bad = (y < 0) | (y >= num_classes)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{path}: label {int(y[i])} at index {i} is outside 0..{num_classes - 1} "
                        f"({int(bad.sum())} labels out of range)")
    return x, y.astype(np.int64)


def to_normalized_tensor(x_uint8_nhwc: np.ndarray, mean, std) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32, scaled to [0, 1] then normalised."""
    x = torch.from_numpy(np.ascontiguousarray(x_uint8_nhwc)).permute(0, 3, 1, 2).float() / 255.0
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


class ArrayDataset(Dataset):
    """Normalised image tensors and labels held in memory."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, source: str = ""):
        self.x, self.y, self.source = x, y, source

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.y[i])


def npz_dataset(path: str | os.PathLike, num_classes: int, input_size: int, mean, std) -> ArrayDataset:
    x, y = load_npz(path, num_classes, input_size)
    return ArrayDataset(to_normalized_tensor(x, mean, std), torch.from_numpy(y), str(path))
