"""Published pretrained weights: where they live, and fetching them with a hash check.

Lookup order for a named weights file: ``$TEXQ_ASSETS/<dataset>/<file>`` (an offline folder laid
out like the project's shared assets), then the cache ``$TEXQ_HOME/weights`` (default
``~/.cache/texq/weights``), then a download from the published URL. Every file is checked
against the hash its publisher put in its name before it is used.
"""

from __future__ import annotations

import os
import urllib.error
import zipfile
from dataclasses import dataclass
from pathlib import Path

from texq.util.errors import CheckpointError
from texq.util.io import atomic_path, file_digest

PYTORCHCV_URL = "https://github.com/osmr/imgclsmob/releases/download/{tag}/{file}.zip"
AKAMASTER_URL = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/{file}"


@dataclass(frozen=True)
class WeightsFile:
    """One published weights file."""

    file_name: str  # name of the (unzipped) weights file
    url: str  # where it is published
    hash_algo: str  # 'sha1' (pytorchcv) or 'sha256' (akamaster)
    hash_prefix: str  # leading hex digits of the file's hash, as published
    dataset: str  # subfolder of $TEXQ_ASSETS where an offline copy may lie
    zipped: bool = False  # the URL serves a zip holding file_name


def _pytorchcv(model: str, error: str, sha1: str, tag: str, dataset: str) -> WeightsFile:
    file_name = f"{model}-{error}-{sha1[:8]}.pth"
    return WeightsFile(file_name, PYTORCHCV_URL.format(tag=tag, file=file_name), "sha1", sha1,
                       dataset, zipped=True)


def _akamaster(depth: int, sha256_prefix: str) -> WeightsFile:
    file_name = f"resnet{depth}-{sha256_prefix}.th"
    return WeightsFile(file_name, AKAMASTER_URL.format(file=file_name), "sha256", sha256_prefix,
                       "cifar10")


#: registry name -> published weights (pytorchcv model store and akamaster's repository)
PRETRAINED: dict[str, WeightsFile] = {
    "resnet20_cifar10": _pytorchcv("resnet20_cifar10", "0597",
                                   "9b0024ac4c2f374cde2c5052e0d0344a75871cdb", "v0.0.163", "cifar10"),
    "resnet20_cifar100": _pytorchcv("resnet20_cifar100", "2964",
                                    "a5322afed92fa96cb7b3453106f73cf38e316151", "v0.0.180", "cifar100"),
    "resnet56_cifar10": _pytorchcv("resnet56_cifar10", "0452",
                                   "628c42a26fe347b84060136212e018df2bb35e0f", "v0.0.163", "cifar10"),
    "resnet56_cifar100": _pytorchcv("resnet56_cifar100", "2488",
                                    "d65f53b10ad5d124698e728432844c65261c3107", "v0.0.181", "cifar100"),
    "resnet110_cifar10": _pytorchcv("resnet110_cifar10", "0369",
                                    "4d6ca1fc02eaeed724f4f596011e391528536049", "v0.0.163", "cifar10"),
    "resnet110_cifar100": _pytorchcv("resnet110_cifar100", "2280",
                                     "d8d397a767db6d22af040223ec8ae342a088c3e5", "v0.0.190", "cifar100"),
    "resnet20a_cifar10": _akamaster(20, "12fca82f"),
    "resnet32a_cifar10": _akamaster(32, "d509ac18"),
    "resnet44a_cifar10": _akamaster(44, "014dd654"),
    "resnet56a_cifar10": _akamaster(56, "4bfd9763"),
    "resnet110a_cifar10": _akamaster(110, "1d1ed7c2"),
    "resnet1202a_cifar10": _akamaster(1202, "f3b1deed"),
}


def texq_home() -> Path:
    return Path(os.environ.get("TEXQ_HOME", Path.home() / ".cache" / "texq"))


def _hash_ok(path: Path, wf: WeightsFile) -> bool:
    return file_digest(path, wf.hash_algo).startswith(wf.hash_prefix)


def _download(url: str, dest: Path) -> None:
    from torch.hub import download_url_to_file

    try:
        download_url_to_file(url, str(dest), progress=True)
    except (urllib.error.URLError, OSError) as exc:
        raise CheckpointError(
            f"cannot download {url} ({exc}); without internet, put the file in $TEXQ_ASSETS "
            f"or {dest.parent}, or pass a checkpoint path"
        ) from exc


def fetch(wf: WeightsFile, cache_dir: Path | None = None) -> Path:
    """Path to a verified local copy of ``wf``, downloading it into the cache if needed."""
    assets = os.environ.get("TEXQ_ASSETS")
    if assets:
        offline = Path(assets) / wf.dataset / wf.file_name
        if offline.is_file():
            if not _hash_ok(offline, wf):
                raise CheckpointError(f"{offline} does not match its published {wf.hash_algo} "
                                      f"prefix {wf.hash_prefix}: the file is corrupt or another one")
            return offline
    cache_dir = Path(cache_dir) if cache_dir else texq_home() / "weights"
    target = cache_dir / wf.file_name
    if target.is_file() and _hash_ok(target, wf):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        if wf.zipped:
            ztmp = tmp.with_suffix(".zip")
            try:
                _download(wf.url, ztmp)
                with zipfile.ZipFile(ztmp) as zf:
                    tmp.write_bytes(zf.read(wf.file_name))
            except (zipfile.BadZipFile, KeyError) as exc:
                raise CheckpointError(f"{wf.url} is not a zip holding {wf.file_name}: {exc}") from exc
            finally:
                ztmp.unlink(missing_ok=True)
        else:
            _download(wf.url, tmp)
        if not _hash_ok(tmp, wf):
            raise CheckpointError(f"downloaded {wf.url} does not match its published "
                                  f"{wf.hash_algo} prefix {wf.hash_prefix}; nothing was kept")
    return target
