"""Saved outputs of a run: the quantized model, the calibration set and its centers, the generator.

Every file is written atomically and holds only tensors and plain metadata, so it loads with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, fields

import torch
from torch import nn

from texq.bns import LayerStats
from texq.calibration import CalibrationSet
from texq.errors import CheckpointError
from texq.io import atomic_path, load_torch
from texq.models import ModelInfo, build_factory, create_model, get_info, is_registered
from texq.models.user import architecture_digest
from texq.quant import QuantConfig, quantize

FORMAT = "texq-quantized-v1"


def save_torch(dest: str | os.PathLike, obj) -> None:
    """``torch.save`` to ``dest``, atomically. Through an open file, not the temporary path: torch
    names the archive's records after a path it is given (the temporary name is random), so the
    same object would give other bytes on every save, and DVC another hash."""
    with atomic_path(dest) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)


def save_quantized(dest: str | os.PathLike, qmodel: nn.Module, extra: dict | None = None) -> None:
    """The fake-quantized model: its state dict (weights, BN, activation ranges) and how to rebuild
    it (its registry name or factory, its ModelInfo and an architecture digest)."""
    info = get_info(qmodel)
    cfg: QuantConfig = qmodel.texq_quant
    save_torch(dest, {"format": FORMAT, "model": info.factory or info.name, "info": info.to_dict(),
                      "architecture": architecture_digest(qmodel), "quant": asdict(cfg),
                      "state_dict": qmodel.state_dict(), "extra": extra or {}})


def _float_model(obj: dict, path: str | os.PathLike, model: nn.Module | None) -> nn.Module:
    """The float model to quantize again: ``model`` if given, else a rebuild from the registry
    name or the factory (a factory's model described by the saved ModelInfo)."""
    if model is not None:
        return model
    info = obj.get("info")  # files of texq 0.1 hold none
    if info is not None and info["factory"]:
        return build_factory(info["factory"], {k: v for k, v in info.items() if k != "factory"})
    if is_registered(obj["model"]):
        return create_model(obj["model"])
    raise CheckpointError(f"{path} holds a model of one's own ({obj['model']!r}) without a factory "
                          f"to rebuild it: pass its float module, load_quantized(path, model=...)")


def load_quantized(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save_quantized` (eval mode, ranges frozen), carrying the
    saved ModelInfo. A model of one's own is rebuilt by its factory, or from ``model``, its float
    module (left untouched)."""
    obj = load_torch(path)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a texq quantized model (format {FORMAT})")
    known = {f.name for f in fields(QuantConfig)}
    cfg = QuantConfig(**{k: v for k, v in obj["quant"].items() if k in known})
    qmodel = quantize(_float_model(obj, path, model), cfg)
    if obj.get("architecture", "") not in ("", architecture_digest(qmodel)):
        raise CheckpointError(f"{path} does not fit {obj['model']}: the model rebuilt has other "
                              f"module classes or tensor shapes than the one saved")
    if "info" in obj:
        qmodel.texq_info = ModelInfo(**obj["info"])
    missing, unexpected = qmodel.load_state_dict(obj["state_dict"], strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit {obj['model']}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return qmodel.eval()


def save_calibration(dest: str | os.PathLike, calib: CalibrationSet) -> None:
    save_torch(dest, {"images": calib.images.cpu(), "labels": calib.labels.cpu(),
                      "center_mean": [c.mean.cpu() for c in calib.centers],
                      "center_var": [c.var.cpu() for c in calib.centers],
                      "history": calib.history})


def load_calibration(path: str | os.PathLike) -> CalibrationSet:
    obj = load_torch(path)
    centers = [LayerStats(m, v) for m, v in zip(obj["center_mean"], obj["center_var"])]
    return CalibrationSet(obj["images"], obj["labels"], centers, obj["history"])
