"""Batched, device-side RandomResizedCrop + RandomHorizontalFlip.

torchvision's transforms augment one image at a time, drawing each random number on the host
(``.item()``): hundreds of small ops and host syncs per batch. Here a whole (N, C, H, W) batch is
augmented at once with fixed-shape ops on its own device: every random draw comes from torch's
RNG on that device, nothing depends on a tensor's value on the host, so the call never syncs
and can be captured in a CUDA graph. The crop parameters follow torchvision's distribution and,
given the parameters, the output equals ``v2.functional.resized_crop(..., antialias=True)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F


def _fallback(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's fallback when no try is valid: a central crop, its ratio clamped to ``ratio``."""
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def crop_params(n: int, height: int, width: int, scale: tuple[float, float] = (0.08, 1.0),
                ratio: tuple[float, float] = (3 / 4, 4 / 3), device: torch.device | str | None = None,
                tries: int = 10) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(top, left, h, w)``, int64 tensors of shape (n,), drawn as torchvision's
    ``RandomResizedCrop.get_params`` draws them: the first of ``tries`` tries (area ~ U(scale) * H * W,
    log-ratio ~ U(log ratio)) whose box fits, placed uniformly; else the central fallback crop.
    All tries are drawn at once; which one is used is picked without leaving the device."""
    area = height * width
    u = torch.rand(n, tries, device=device)
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u)
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * torch.rand(n, tries, device=device))
    # torch.round and Python's round() both round half to even, so they agree; torchvision takes
    # the square root in float64 and here it is float32, which can only differ when the root lies
    # within ~1e-6 of a .5 boundary (probability ~1e-6 per try).
    w = torch.round(torch.sqrt(target_area * aspect)).long()
    h = torch.round(torch.sqrt(target_area / aspect)).long()
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = valid.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first valid try (0 if none)
    found = valid.any(dim=1)
    f_top, f_left, f_h, f_w = _fallback(height, width, ratio)
    h = torch.where(found, h.gather(1, first).squeeze(1), f_h)
    w = torch.where(found, w.gather(1, first).squeeze(1), f_w)
    # top ~ randint(0, H - h + 1): floor(U * count), clamped since U * count may round up to count
    top = (torch.rand(n, device=device) * (height - h + 1)).long().clamp(max=height - h)
    left = (torch.rand(n, device=device) * (width - w + 1)).long().clamp(max=width - w)
    top = torch.where(found, top, f_top)
    left = torch.where(found, left, f_left)
    return top, left, h, w


def _source_coords(start: Tensor, length: Tensor, out: int, size: int, dtype: torch.dtype) -> Tensor:
    """Normalised grid_sample coordinates (N, out) of the ``out`` output pixels resampling
    ``[start, start + length)`` of an axis of ``size`` pixels, as torch's bilinear interpolate
    (align_corners=False) samples them: clamped inside the box."""
    length = length.to(dtype)[:, None]
    dst = torch.arange(out, device=start.device, dtype=dtype)[None, :] + 0.5
    rel = ((length / out) * dst - 0.5).clamp(min=0.0)
    src = start.to(dtype)[:, None] + torch.minimum(rel, length - 1)
    return (2 * src + 1) / size - 1


def resized_crop(images: Tensor, top: Tensor, left: Tensor, h: Tensor, w: Tensor,
                 out_size: int) -> Tensor:
    """Bilinear resize of each image's box ``[top, top+h) x [left, left+w)`` to out_size x out_size,
    in one ``grid_sample`` call. Equals ``v2.functional.resized_crop(img, top, left, h, w,
    [out_size, out_size], antialias=True)`` (to float rounding) for boxes inside the image with
    ``h, w <= out_size``; for larger boxes (downsampling) it is plain bilinear, without antialias."""
    height, width = images.shape[-2:]
    x = images if images.dtype in (torch.float32, torch.float64) else images.float()
    ys = _source_coords(top, h, out_size, height, x.dtype)  # (N, out)
    xs = _source_coords(left, w, out_size, width, x.dtype)
    grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), dim=-1)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.to(images.dtype)


def random_flip(images: Tensor, p: float = 0.5) -> Tensor:
    """Mirrors each image of the batch horizontally with probability ``p``."""
    flip = torch.rand(images.shape[0], device=images.device) < p
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def random_resized_crop_flip(images: Tensor, scale: tuple[float, float] = (0.5, 1.0)) -> Tensor:
    """torchvision's ``RandomResizedCrop(H, scale, antialias=True)`` then ``RandomHorizontalFlip()``
    on a batch of (N, C, H, W) float images with H == W, each image drawing its own parameters
    (the crop parameters first, then the flips) from torch's RNG on the images' device."""
    n, _, height, width = images.shape
    if height != width:
        raise ValueError(f"random_resized_crop_flip needs square images, got {height}x{width}")
    top, left, h, w = crop_params(n, height, width, scale=tuple(scale), device=images.device)
    return random_flip(resized_crop(images, top, left, h, w, height))


def draw_calibration(images: Tensor, labels: Tensor, n: int, crop_scale: tuple[float, float] | None
                     ) -> tuple[Tensor, Tensor]:
    """``n`` of ``images`` (at most all) drawn without replacement where they live, with their
    labels; randomly resized-cropped (``crop_scale``) and flipped unless ``crop_scale`` is None."""
    idx = torch.rand(len(images), device=images.device).argsort()[:min(n, len(images))]
    x = images[idx]
    if crop_scale is not None:
        x = random_resized_crop_flip(x, crop_scale)
    return x, labels[idx]
