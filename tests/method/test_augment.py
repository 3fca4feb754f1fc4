"""texq.method.augment against torchvision: crop parameters in distribution, crops exactly, flips, and no
host sync (runs on the meta device; captured in a CUDA graph where CUDA is present)."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as TF

from texq.method.augment import (
    crop_params,
    draw_calibration,
    random_flip,
    random_resized_crop_flip,
    resized_crop,
)


def _boxes(height: int, width: int, count: int, gen: torch.Generator) -> list[tuple[int, int, int, int]]:
    """Full-image, 1-pixel, border-touching and random boxes inside a height x width image."""
    H, W = height, width
    boxes = [(0, 0, H, W), (0, 0, 1, W), (H - 1, 0, 1, W), (0, 0, H, 1), (0, W - 1, H, 1),
             (H - 1, W - 1, 1, 1), (0, 0, 1, 1), (3, 0, 1, W - 2), (0, 2, H - 5, 3),
             (H - 7, W - 9, 7, 9), (0, W - 11, 13, 11), (H - 4, 0, 4, W)]
    while len(boxes) < count:
        h = int(torch.randint(1, H + 1, (1,), generator=gen))
        w = int(torch.randint(1, W + 1, (1,), generator=gen))
        top = int(torch.randint(0, H - h + 1, (1,), generator=gen))
        left = int(torch.randint(0, W - w + 1, (1,), generator=gen))
        boxes.append((top, left, h, w))
    return boxes


@pytest.mark.parametrize("shape", [(32, 32), (24, 40)])
def test_resized_crop_matches_torchvision(shape):
    H, W = shape
    out = max(H, W)  # every box is at most out x out: upsampling or same size
    gen = torch.Generator().manual_seed(1)
    boxes = _boxes(H, W, 200, gen)
    images = torch.rand(len(boxes), 3, H, W, generator=gen)
    top, left, h, w = (torch.tensor(c) for c in zip(*boxes))
    got = resized_crop(images, top, left, h, w, out)
    assert got.shape == (len(boxes), 3, out, out) and got.dtype == images.dtype
    # in float64 the two agree to 1e-12: the float32 differences below are rounding only
    wide = images.double() * 4 - 2
    got64 = resized_crop(wide, top, left, h, w, out)
    for img, res, img64, res64, (t, l, bh, bw) in zip(images, got, wide, got64, boxes):
        ref = TF.resized_crop(img, t, l, bh, bw, [out, out], antialias=True)
        torch.testing.assert_close(res, ref, atol=1e-5, rtol=0)
        ref64 = TF.resized_crop(img64, t, l, bh, bw, [out, out], antialias=True)
        torch.testing.assert_close(res64, ref64, atol=1e-12, rtol=0)
        # the claim that antialias changes nothing when upsampling
        plain = TF.resized_crop(img, t, l, bh, bw, [out, out], antialias=False)
        torch.testing.assert_close(plain, ref, atol=1e-5, rtol=0)
    # channels_last input, same result
    torch.testing.assert_close(
        resized_crop(images.to(memory_format=torch.channels_last), top, left, h, w, out), got)


def test_antialias_matters_when_downsampling():
    """Why resized_crop claims equality only for h, w <= out_size."""
    img = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(2))
    aa = TF.resized_crop(img, 0, 0, 32, 32, [8, 8], antialias=True)
    plain = TF.resized_crop(img, 0, 0, 32, 32, [8, 8], antialias=False)
    assert (aa - plain).abs().max() > 1e-2
    ours = resized_crop(img[None], *(torch.tensor([v]) for v in (0, 0, 32, 32)), 8)[0]
    torch.testing.assert_close(ours, plain, atol=1e-5, rtol=0)


def _stats(top, left, h, w, H, W) -> dict[str, torch.Tensor]:
    top, left, h, w = (torch.as_tensor(v, dtype=torch.float64) for v in (top, left, h, w))
    return {"area": h * w / (H * W), "log_ratio": torch.log(w / h), "top": top / H, "left": left / W}


@pytest.mark.parametrize("shape,scale", [((32, 32), (0.08, 1.0)), ((32, 32), (0.5, 1.0)),
                                         ((24, 40), (0.3, 1.0))])
def test_crop_params_distribution_matches_torchvision(shape, scale):
    H, W = shape
    n, ratio = 20_000, (3 / 4, 4 / 3)
    torch.manual_seed(3)
    top, left, h, w = crop_params(n, H, W, scale, ratio)
    assert top.shape == left.shape == h.shape == w.shape == (n,)
    assert top.dtype == torch.int64
    assert bool(((h >= 1) & (w >= 1) & (top >= 0) & (left >= 0)
                 & (top + h <= H) & (left + w <= W)).all())
    img = torch.empty(3, H, W)
    ref = list(zip(*(T.RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n))))
    ours, theirs = _stats(top, left, h, w, H, W), _stats(*ref, H, W)
    for name in ours:
        a, b = ours[name], theirs[name]
        se_mean = math.sqrt((a.var() + b.var()) / n)
        assert abs(a.mean() - b.mean()) < 4 * se_mean, (name, a.mean(), b.mean())
        # standard error of a sample variance: sqrt((m4 - var^2) / n)
        m4a, m4b = ((a - a.mean()) ** 4).mean(), ((b - b.mean()) ** 4).mean()
        se_var = math.sqrt((m4a - a.var() ** 2 + m4b - b.var() ** 2) / n)
        assert abs(a.var() - b.var()) < 4 * se_var, (name, a.std(), b.std())
    # the boxes land on the same integer sizes: every h that torchvision draws often, we draw too
    counts = torch.bincount(h, minlength=H + 1).double() / n
    ref_counts = torch.bincount(torch.tensor(ref[2]), minlength=H + 1).double() / n
    assert (counts - ref_counts).abs().sum() < 0.05  # total variation of the height histogram


def test_crop_params_takes_the_first_valid_try():
    """Fed the same uniforms (replayed from the seed), the params are those of torchvision's loop:
    the first valid try, sizes rounded as Python's round() does. (Which valid try is taken does
    not change the distribution, tries being independent, so only this test can see it.)"""
    n, tries, H, W, scale, ratio = 2000, 10, 32, 32, (0.08, 1.0), (3 / 4, 4 / 3)
    torch.manual_seed(7)
    top, left, h, w = crop_params(n, H, W, scale, ratio, tries=tries)
    torch.manual_seed(7)
    u_area, u_ratio = torch.rand(n, tries).tolist(), torch.rand(n, tries).tolist()
    u_top, u_left = torch.rand(n).tolist(), torch.rand(n).tolist()
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    chosen = []
    for i in range(n):
        for k in range(tries):
            area = H * W * (scale[0] + (scale[1] - scale[0]) * u_area[i][k])
            r = math.exp(lo + (hi - lo) * u_ratio[i][k])
            bw, bh = int(round(math.sqrt(area * r))), int(round(math.sqrt(area / r)))
            if 0 < bw <= W and 0 < bh <= H:
                chosen.append((k, bh, bw, int(u_top[i] * (H - bh + 1)), int(u_left[i] * (W - bw + 1))))
                break
        else:
            chosen.append((None, H, W, 0, 0))
    assert sum(c[0] is None for c in chosen) < n // 10 and any(c[0] for c in chosen)
    assert h.tolist() == [c[1] for c in chosen]
    assert w.tolist() == [c[2] for c in chosen]
    assert top.tolist() == [c[3] for c in chosen]
    assert left.tolist() == [c[4] for c in chosen]


@pytest.mark.parametrize("shape", [(32, 32), (20, 40), (40, 20), (30, 36)])
def test_crop_params_fallback(shape):
    H, W = shape
    scale, ratio = (1.5, 2.0), (3 / 4, 4 / 3)  # every try's box is larger than the image
    expected = T.RandomResizedCrop.get_params(torch.empty(3, H, W), list(scale), list(ratio))
    got = crop_params(50, H, W, scale, ratio)
    for g, e in zip(got, expected):
        assert g.tolist() == [e] * 50
    if shape == (20, 40):
        assert expected == (0, 6, 20, 27)  # really the clamped-ratio central crop, not the image


def test_random_flip():
    n = 4000
    images = torch.rand(n, 2, 3, 5)
    torch.manual_seed(4)
    out = random_flip(images)
    same = (out == images).flatten(1).all(1)
    mirrored = (out == images.flip(-1)).flatten(1).all(1)
    assert bool((same ^ mirrored).all())  # exactly one of the two, for every image
    frac = mirrored.double().mean().item()
    assert abs(frac - 0.5) < 4 * math.sqrt(0.25 / n)
    assert torch.equal(random_flip(images, p=0.0), images)
    assert torch.equal(random_flip(images, p=1.0), images.flip(-1))


def test_random_resized_crop_flip_shape_and_seed():
    images = torch.rand(16, 3, 32, 32)
    torch.manual_seed(5)
    a = random_resized_crop_flip(images)
    torch.manual_seed(5)
    b = random_resized_crop_flip(images.to(memory_format=torch.channels_last))
    assert a.shape == images.shape and a.dtype == images.dtype and a.device == images.device
    assert torch.equal(a, b)
    assert not torch.equal(random_resized_crop_flip(images), a)  # the RNG moved on
    with pytest.raises(ValueError):
        random_resized_crop_flip(torch.rand(2, 3, 32, 24))


def test_random_resized_crop_flip_composes_torchvision():
    """Given the same crop parameters and flips, the output is torchvision's, image by image."""
    images = torch.rand(64, 3, 32, 32)
    torch.manual_seed(6)
    out = random_resized_crop_flip(images, scale=(0.3, 1.0))
    torch.manual_seed(6)
    top, left, h, w = crop_params(64, 32, 32, (0.3, 1.0))
    flips = torch.rand(64) < 0.5
    for i in range(64):
        ref = TF.resized_crop(images[i], int(top[i]), int(left[i]), int(h[i]), int(w[i]), [32, 32],
                              antialias=True)
        ref = TF.horizontal_flip(ref) if flips[i] else ref
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_runs_on_meta_device():
    """Any value read on the host (.item(), nonzero, bool) would fail on the meta device."""
    images = torch.empty(8, 3, 32, 32, device="meta")
    out = random_resized_crop_flip(images)
    assert out.device.type == "meta" and out.shape == images.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_capture():
    n = 64
    images = torch.rand(n, 3, 32, 32, device="cuda")

    def step():
        params = crop_params(n, 32, 32, (0.3, 1.0), device="cuda")
        return params, random_flip(resized_crop(images, *params, 32))

    step()  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        params, out = step()
    graph.replay()
    first = out.clone()
    graph.replay()
    assert not torch.equal(first, out)  # fresh random draws on each replay
    # each replayed output is torchvision's crop of the replayed box, maybe mirrored
    top, left, h, w = (p.tolist() for p in params)
    flipped = 0
    for i, (img, res) in enumerate(zip(images.cpu(), out.cpu())):
        ref = TF.resized_crop(img, top[i], left[i], h[i], w[i], [32, 32], antialias=True)
        mirrored = not torch.allclose(res, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(res, ref.flip(-1) if mirrored else ref, atol=1e-5, rtol=0)
        flipped += mirrored
    assert 0 < flipped < n
    # the composed function is capturable too, and a replay draws what an eager call draws
    with torch.cuda.graph(graph2 := torch.cuda.CUDAGraph()):
        out2 = random_resized_crop_flip(images)
    torch.cuda.manual_seed(7)
    graph2.replay()
    torch.cuda.manual_seed(7)
    assert torch.equal(out2, random_resized_crop_flip(images))


def test_draw_calibration_draws_distinct_images_with_their_labels():
    images = torch.arange(10.0).view(10, 1, 1, 1).expand(10, 3, 4, 4).contiguous()
    labels = torch.arange(10) + 100
    torch.manual_seed(0)
    x, y = draw_calibration(images, labels, 6, None)
    picked = x[:, 0, 0, 0].long()
    assert len(set(picked.tolist())) == 6 and torch.equal(y, picked + 100)  # no repeats, own labels
    assert torch.equal(x, images[picked])  # no augmentation without a crop scale
    assert draw_calibration(images, labels, 50, None)[0].shape[0] == 10  # at most all of them
    torch.manual_seed(0)
    xa, ya = draw_calibration(images, labels, 6, (0.5, 1.0))
    assert torch.equal(ya, y) and xa.shape == x.shape  # the same draw, then cropped and flipped

