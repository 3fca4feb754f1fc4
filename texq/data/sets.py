"""Resolve a data SPEC to an evaluation set for a model.

SPEC is one of: a ``.npz`` file (see :mod:`texq.data.arrays`); ``cifar10`` / ``cifar100`` (the
test split through torchvision, downloaded into ``$TEXQ_DATA`` -- default ``~/.cache/texq/data``
-- on machines with internet); ``cifar10-test1000`` (test images 0..999: the offline copy in
``$TEXQ_ASSETS`` if present, else torchvision's); or an ImageNet-style folder with one subfolder per class, whose
sorted names give the class indices (ImageNet's synset folders and CIFAR's class names both sort
into the standard order).

Only test/validation images are read here: the zero-shot path never needs training data.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch.utils.data import Dataset

from texq.data.arrays import npz_dataset
from texq.models.info import ModelInfo
from texq.models.weights import texq_home
from texq.util.errors import DataError

TORCHVISION_SETS = {"cifar10": 10, "cifar100": 100}
# named subsets: spec -> (torchvision set, first n test images, file in $TEXQ_ASSETS holding them)
SUBSETS = {"cifar10-test1000": ("cifar10", 1000, "cifar10/test_first1000.npz")}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")  # torchvision's CIFAR10.classes, label order


def data_root() -> Path:
    return Path(os.environ.get("TEXQ_DATA", texq_home() / "data"))


def eval_transform(info: ModelInfo):
    from torchvision import transforms as T

    size = info.input_size
    resize = ([T.Resize(round(size / 0.875)), T.CenterCrop(size)] if info.imagenet_scale
              else [T.Resize((size, size))])
    return T.Compose([*resize, T.ToTensor(), T.Normalize(info.mean, info.std)])


def _torchvision_set(name: str, info: ModelInfo, root: Path, download: bool,
                     train: bool = False) -> Dataset:
    from torchvision import datasets

    classes = TORCHVISION_SETS[name]
    if classes != info.num_classes:
        raise DataError(f"data {name} has {classes} classes, model {info.name} has {info.num_classes}")
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        return cls(str(root), train=train, transform=eval_transform(info), download=download)
    except (RuntimeError, OSError) as exc:  # not found / corrupt / no internet
        split = "training" if train else "test"
        raise DataError(f"{name} {split} set not available under {root} ({exc}); on a machine "
                        f"without internet copy it there or set TEXQ_DATA") from exc


def _folder_set(path: Path, info: ModelInfo) -> Dataset:
    from torchvision import datasets

    try:
        ds = datasets.ImageFolder(str(path), transform=eval_transform(info), loader=_read_image)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"{path} is not an image folder with one subfolder per class: {exc}") from exc
    if len(ds.classes) != info.num_classes:
        raise DataError(f"{path} has {len(ds.classes)} class folders, model {info.name} has "
                        f"{info.num_classes}: the folder must hold one subfolder per class, "
                        f"sorted names giving indices 0..{info.num_classes - 1}")
    for file, _ in ds.samples:  # every image's header, before any work (a truncated body: at reading)
        _check_header(file)
    return ds


def _check_header(file: str) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file):
            pass
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{file}: not a readable image ({exc}): remove or replace it") from exc


def _read_image(file: str):
    """An RGB image, or a one-line DataError naming the file (a corrupt or truncated image)."""
    from PIL import Image

    try:
        with Image.open(file) as im:
            return im.convert("RGB")
    except OSError as exc:  # UnidentifiedImageError is an OSError
        raise DataError(f"{file}: not a readable image ({exc}): remove or replace it") from exc


def _subset(spec: str, info: ModelInfo, download: bool, train: bool) -> Dataset:
    """The first n test images of a torchvision set: the offline copy in ``$TEXQ_ASSETS`` when
    there is one (the same images, lossless), else torchvision's (downloaded where possible)."""
    from torch.utils.data import Subset

    name, n, rel = SUBSETS[spec]
    if train:
        raise DataError(f"data {spec!r} holds test images only: it cannot be training data")
    assets = os.environ.get("TEXQ_ASSETS")
    if assets and (Path(assets) / rel).is_file():
        return npz_dataset(Path(assets) / rel, info.num_classes, info.input_size, info.mean, info.std)
    try:
        full = _torchvision_set(name, info, data_root(), download)
    except DataError as exc:
        raise DataError(f"data {spec!r}: no {rel} under $TEXQ_ASSETS ({assets or 'not set'}) and "
                        f"{exc}") from exc
    return Subset(full, range(n))


def load_eval_data(spec: str, info: ModelInfo, download: bool = True, train: bool = False) -> Dataset:
    """The evaluation set named by ``spec``, normalised for the model described by ``info``.

    ``train=True`` selects the training split of a named torchvision set (``cifar10``,
    ``cifar100``); a file or folder is read as it is."""
    if spec in TORCHVISION_SETS:
        return _torchvision_set(spec, info, data_root(), download, train)
    if spec in SUBSETS:
        return _subset(spec, info, download, train)
    path = Path(spec)
    if path.suffix == ".npz":
        return npz_dataset(path, info.num_classes, info.input_size, info.mean, info.std)
    if path.is_dir():
        return _folder_set(path, info)
    if not path.exists():
        raise DataError(f"data {spec!r} not found: expected a .npz file, cifar10, cifar100 "
                        f"or an image folder")
    raise DataError(f"data {spec!r}: expected a .npz file, cifar10, cifar100 or an image folder")


def class_names(spec: str, data: Dataset) -> list[str] | None:
    """The names of labels 0..K-1 of an evaluation set, where it knows them: CIFAR-10 by name
    (also from its offline .npz copy), a torchvision set's or an image folder's ``classes``;
    None for a bare .npz file."""
    if SUBSETS.get(spec, (spec,))[0] == "cifar10":
        return list(CIFAR10_CLASSES)
    base = getattr(data, "dataset", data)  # a Subset's underlying set
    names = getattr(base, "classes", None)
    return list(names) if names else None
