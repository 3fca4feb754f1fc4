"""Real photographs that are not test images: crops of the photos bundled with scikit-learn
(and scikit-image, when installed), for texture statistics of natural images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from texq.util.errors import ConfigError


def sample_photos() -> list[np.ndarray]:
    """scikit-learn's two bundled photos (china.jpg, flower.jpg: what
    ``sklearn.datasets.load_sample_images`` returns), read from its package folder with PIL
    without importing scikit-learn (4 s of start-up for two JPEG files)."""
    import importlib.util

    from PIL import Image

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("photo_crops needs scikit-learn's photos (pip install scikit-learn)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "images"
    photos = []
    for path in sorted(folder.glob("*.jpg")):
        with Image.open(path) as im:
            photos.append(np.asarray(im))
    return photos


def photo_crops(n_per_scale: int = 12, seed: int = 0, skimage: bool = True) -> torch.Tensor:
    """(N, 3, 32, 32) crops in [0, 1]: each photo downscaled so that its short side is 40, 64, 96
    and 160 px (CIFAR-like object scales), ``n_per_scale`` random crops at each size.
    scikit-learn's two photos always; scikit-image's astronaut, cat, coffee and rocket if
    ``skimage`` and it is installed."""
    from PIL import Image

    photos = sample_photos()
    if skimage:  # four more photos, when scikit-image is installed
        try:
            import skimage.data as sd

            photos += [sd.astronaut(), sd.chelsea(), sd.coffee(), sd.rocket()]
        except ImportError:
            pass
    rng = np.random.default_rng(seed)
    crops = []
    for photo in photos:
        im = Image.fromarray(photo)
        for short in (40, 64, 96, 160):
            s = short / min(im.size)
            size = (max(32, round(im.size[0] * s)), max(32, round(im.size[1] * s)))
            arr = np.asarray(im.resize(size, Image.BICUBIC))
            for _ in range(n_per_scale):
                y, x = rng.integers(0, arr.shape[0] - 31), rng.integers(0, arr.shape[1] - 31)
                crops.append(arr[y:y + 32, x:x + 32])
    return torch.tensor(np.stack(crops)).permute(0, 3, 1, 2).float() / 255.0
