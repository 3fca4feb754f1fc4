"""A quantized model as a file: ``save_quantized`` writes it (atomically; tensors and plain
metadata only, so it loads with ``torch.load(..., weights_only=True)``), ``load_quantized``
rebuilds it, the deployable result of a run."""

from __future__ import annotations

import os
from dataclasses import asdict, fields

from torch import nn

from texq.models.checkpoint import check_finite
from texq.models.info import ModelInfo, get_info
from texq.models.registry import create_model, is_registered
from texq.models.user import architecture_digest, build_factory
from texq.quant import QuantConfig, quantize
from texq.util.errors import CheckpointError
from texq.util.io import load_torch, save_torch

FORMAT = "texq-quantized-v1"


def save_quantized(dest: str | os.PathLike, qmodel: nn.Module, extra: dict | None = None) -> None:
    """The fake-quantized model: its state dict (weights, BN, activation ranges) and how to rebuild
    it (its registry name or factory, its ModelInfo and an architecture digest)."""
    info = get_info(qmodel)
    cfg: QuantConfig = qmodel.texq_quant
    save_torch(dest, {"format": FORMAT, "model": info.factory or info.name, "info": info.to_dict(),
                      "architecture": architecture_digest(qmodel), "quant": asdict(cfg),
                      "state_dict": qmodel.state_dict(), "extra": extra or {}})


def _rebuilt_float_model(obj: dict, path: str | os.PathLike, model: nn.Module | None) -> nn.Module:
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
    check_finite(obj.get("state_dict") or {}, path)
    known = {f.name for f in fields(QuantConfig)}
    cfg = QuantConfig(**{k: v for k, v in obj["quant"].items() if k in known})
    qmodel = quantize(_rebuilt_float_model(obj, path, model), cfg)
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
