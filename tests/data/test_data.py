"""Evaluation data: the .npz format, torchvision CIFAR (offline, on files the test writes), folders."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from texq.data import class_names, gaussian_batches, load_eval_data, load_npz
from texq.data.arrays import to_normalized_tensor
from texq.models import model_info
from texq.util.errors import DataError

INFO10 = model_info("resnet20_cifar10")


def write_npz(path, x, y):
    np.savez(path, x=x, y=y)
    return path


def images(n=6, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_npz_roundtrip_and_normalisation(tmp_path):
    x, y = images(), np.array([0, 1, 2, 3, 9, 5])
    ds = load_eval_data(str(write_npz(tmp_path / "d.npz", x, y)), INFO10)
    assert len(ds) == 6
    img, label = ds[4]
    assert label == 9 and img.shape == (3, 32, 32)
    # pixel (row 3, col 7), green channel, by hand
    expected = (x[4, 3, 7, 1] / 255.0 - INFO10.mean[1]) / INFO10.std[1]
    assert img[1, 3, 7].item() == pytest.approx(expected, abs=1e-6)


def test_to_normalized_tensor_inverts():
    x = images(2)
    t = to_normalized_tensor(x, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    back = t * torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1) + torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    assert torch.allclose(back * 255, torch.from_numpy(x).permute(0, 3, 1, 2).float(), atol=1e-3)


@pytest.mark.parametrize("x, y, message", [
    (images()[..., 0], np.zeros(6, int), r"shape \(6, 32, 32\).*expected \(N, H, W, 3\) uint8"),
    (images().astype(np.float32), np.zeros(6, int), "dtype float32"),
    (images(), np.array([0, 1, 2, 10, 4, 5]), "label 10 at index 3 is outside 0..9"),
    (images(), np.array([0, 1, -1, 3, 4, 5]), "label -1 at index 2"),
    (images(), np.zeros(5, int), r"'y' has shape \(5,\)"),
    (images(), np.zeros(6, float), "integer labels"),
    (images(size=28), np.zeros(6, int), "28x28, the model expects 32x32"),
])
def test_npz_bad_contents(tmp_path, x, y, message):
    path = write_npz(tmp_path / "bad.npz", x, y)
    with pytest.raises(DataError, match=message) as err:
        load_eval_data(str(path), INFO10)
    assert "bad.npz" in str(err.value)


def test_a_bare_npz_has_no_class_names(tmp_path):
    np.savez(tmp_path / "d.npz", x=images(3), y=np.array([0, 1, 2]))
    assert class_names(str(tmp_path / "d.npz"), load_eval_data(str(tmp_path / "d.npz"), INFO10)) is None


def test_npz_missing_keys(tmp_path):
    np.savez(tmp_path / "k.npz", images=images(), labels=np.zeros(6, int))
    with pytest.raises(DataError, match=r"'x' \(images\) and 'y'.*found \['images', 'labels'\]"):
        load_npz(tmp_path / "k.npz", 10)


def test_npz_missing_and_corrupt_files(tmp_path):
    with pytest.raises(DataError, match="not found.*nothere.npz"):
        load_eval_data(str(tmp_path / "nothere.npz"), INFO10)
    (tmp_path / "junk.npz").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(DataError, match="cannot read .*junk.npz"):
        load_eval_data(str(tmp_path / "junk.npz"), INFO10)


def test_unknown_spec(tmp_path):
    with pytest.raises(DataError, match="expected a .npz file, cifar10, cifar100 or an image folder"):
        load_eval_data("imagenet-val", INFO10)


def _write_cifar10_test_batch(root, x, y):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    data = x.transpose(0, 3, 1, 2).reshape(len(x), -1)  # CIFAR's row-major CHW bytes
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": data, "labels": list(map(int, y))}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


def test_torchvision_cifar10_path_offline(tmp_path, monkeypatch):
    from torchvision.datasets import cifar

    x, y = images(5, seed=3), np.array([3, 1, 4, 1, 5])
    _write_cifar10_test_batch(tmp_path, x, y)
    monkeypatch.setenv("TEXQ_DATA", str(tmp_path))
    # the files are ours, not the official ones: skip torchvision's md5 checks, nothing else
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: True)
    ds = load_eval_data("cifar10", INFO10, download=False)
    assert len(ds) == 5
    img, label = ds[2]
    assert label == 4
    ref = to_normalized_tensor(x[2:3], INFO10.mean, INFO10.std)[0]
    assert torch.allclose(img, ref, atol=1e-6)


def test_named_subset_from_assets_else_torchvision(tmp_path, monkeypatch):
    """cifar10-test1000: the $TEXQ_ASSETS copy when present, else torchvision's first images."""
    from torchvision.datasets import cifar

    x, y = images(1200, seed=4), np.arange(1200) % 10
    _write_cifar10_test_batch(tmp_path / "tv", x, y)
    monkeypatch.setenv("TEXQ_DATA", str(tmp_path / "tv"))
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: True)
    monkeypatch.delenv("TEXQ_ASSETS", raising=False)
    ds = load_eval_data("cifar10-test1000", INFO10, download=False)
    assert len(ds) == 1000 and ds[999][1] == 9
    assets = tmp_path / "assets" / "cifar10"
    assets.mkdir(parents=True)
    np.savez(assets / "test_first1000.npz", x=x[:7], y=y[:7])  # stands in for the real file
    monkeypatch.setenv("TEXQ_ASSETS", str(tmp_path / "assets"))
    offline = load_eval_data("cifar10-test1000", INFO10, download=False)
    assert len(offline) == 7
    names = class_names("cifar10-test1000", offline)  # CIFAR-10's, also from the bare .npz copy
    assert names == class_names("cifar10", ds) and names[:3] == ["airplane", "automobile", "bird"]
    assert torch.equal(offline[3][0], ds[3][0]) and offline[3][1] == ds[3][1]
    monkeypatch.setenv("TEXQ_ASSETS", str(tmp_path / "nowhere"))
    monkeypatch.setenv("TEXQ_DATA", str(tmp_path / "empty"))
    with pytest.raises(DataError, match="no cifar10/test_first1000.npz under .*TEXQ_ASSETS"):
        load_eval_data("cifar10-test1000", INFO10, download=False)
    with pytest.raises(DataError, match="test images only"):
        load_eval_data("cifar10-test1000", INFO10, train=True)


def test_torchvision_cifar_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TEXQ_DATA", str(tmp_path))
    with pytest.raises(DataError, match="cifar10 test set not available under .*TEXQ_DATA"):
        load_eval_data("cifar10", INFO10, download=False)
    with pytest.raises(DataError, match="cifar100 has 100 classes, model resnet20_cifar10 has 10"):
        load_eval_data("cifar100", INFO10, download=False)


def test_image_folder(tmp_path):
    from PIL import Image

    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    x = images(10, size=40, seed=5)
    for i, name in enumerate(names):
        (tmp_path / name).mkdir()
        Image.fromarray(x[i]).save(tmp_path / name / f"{i}.png")
    ds = load_eval_data(str(tmp_path), INFO10)
    assert len(ds) == 10 and class_names(str(tmp_path), ds) == names  # sorted folder names
    img, label = ds[7]
    assert label == 7 and img.shape == (3, 32, 32)  # resized to the model's input size


def test_image_folder_with_wrong_class_count(tmp_path):
    from PIL import Image

    for name in ["a", "b", "c"]:
        (tmp_path / name).mkdir()
        Image.fromarray(images(1)[0]).save(tmp_path / name / "0.png")
    with pytest.raises(DataError, match="3 class folders, model resnet20_cifar10 has 10"):
        load_eval_data(str(tmp_path), INFO10)


def test_gaussian_batches_are_seeded():
    a = list(gaussian_batches(INFO10, 2, 4, seed=7))
    b = list(gaussian_batches(INFO10, 2, 4, seed=7))
    c = list(gaussian_batches(INFO10, 2, 4, seed=8))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (4, 3, 32, 32)
    big = torch.cat(list(gaussian_batches(INFO10, 4, 256, seed=0)))
    assert abs(big.mean().item()) < 0.01 and abs(big.std().item() - 1) < 0.01


@pytest.mark.assets
def test_shared_images_load(test1000, assets):
    x, y = load_npz(test1000, 10, 32)
    assert x.shape == (1000, 32, 32, 3) and y.shape == (1000,)
    assert np.bincount(y).min() >= 80  # about 100 per class
    xd, yd = load_npz(assets / "cifar10" / "test_jpeg_dev.npz", 10, 32)
    assert len(xd) == 4500


def test_the_sample_photos_are_scikit_learn_s_read_without_importing_it():
    import subprocess
    import sys

    sklearn = pytest.importorskip("sklearn.datasets")
    from texq.data.photos import sample_photos

    ours, theirs = sample_photos(), sklearn.load_sample_images().images
    assert len(ours) == len(theirs) == 2
    assert all(np.array_equal(a, b) for a, b in zip(ours, theirs))
    loaded = subprocess.run([sys.executable, "-c", "import sys; from texq.data.photos import sample_photos; "
                             "sample_photos(); print('sklearn' in sys.modules)"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "False"
