"""Load a checkpoint file into a model, with errors that name the file and the mismatching keys.

Accepted layouts: a bare state dict; a dict holding it under ``state_dict``, ``model`` or
``model_state_dict`` (akamaster's ``{'best_prec1', 'state_dict'}`` among them); keys optionally
prefixed ``module.`` (saved from ``nn.DataParallel``). BatchNorm's ``num_batches_tracked``
counters may be absent (they do not affect inference).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from texq.util.errors import CheckpointError
from texq.util.io import load_torch

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
OPTIONAL_SUFFIXES = ("num_batches_tracked",)
MAX_LISTED = 6


def extract_state_dict(obj: object, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint object, ``module.`` prefixes removed."""
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path} holds no state dict (found {type(obj).__name__})")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors; keys: {_listed(list(obj))}")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED])
    more = len(keys) - MAX_LISTED
    return shown + (f" (+{more} more)" if more > 0 else "")


def check_compatible(model: nn.Module, state: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     model_name: str = "the model") -> None:
    """Raise CheckpointError naming missing, unexpected and mis-shaped keys, if any."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(OPTIONAL_SUFFIXES)]
    unexpected = [k for k in state if k not in expected]
    mis_shaped = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if not (missing or unexpected or mis_shaped):
        return
    parts = [f"checkpoint {path} does not fit {model_name}"]
    if mis_shaped:
        detail = ", ".join(f"{k} {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                           for k in mis_shaped[:MAX_LISTED])
        parts.append(f"shape mismatch: {detail}")
        classes = _class_count_hint(model, state, mis_shaped)
        if classes:
            parts.append(classes)
    if missing:
        parts.append(f"missing keys: {_listed(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_listed(unexpected)}")
    if missing and unexpected and not mis_shaped:
        parts.append("(another architecture?)")
    raise CheckpointError("; ".join(parts))


def _class_count_hint(model: nn.Module, state: Mapping[str, torch.Tensor],
                      mis_shaped: list[str]) -> str:
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        return ""
    name, last = linears[-1]
    key = f"{name}.weight" if name else "weight"
    if key in mis_shaped and state[key].shape[1:] == last.weight.shape[1:]:
        return (f"wrong class count: the checkpoint has {state[key].shape[0]} classes, "
                f"the model {last.weight.shape[0]}")
    return ""


def check_finite(state: Mapping[str, torch.Tensor], where: str | os.PathLike) -> None:
    """Refuse weights a model cannot have: a floating tensor holding NaN or an infinity, or a
    BatchNorm running variance below 0 (CheckpointError naming the first such tensor)."""
    for key, value in state.items():
        if not value.is_floating_point():
            continue
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            raise CheckpointError(f"{where}: tensor {key} holds {bad} non-finite value(s) (NaN or "
                                  f"infinity) among {value.numel()}")
        if key.endswith("running_var") and bool((value < 0).any()):
            raise CheckpointError(f"{where}: tensor {key} holds a negative running variance "
                                  f"({float(value.min()):.4g})")


def load_checkpoint(model: nn.Module, path: str | os.PathLike, model_name: str = "the model") -> nn.Module:
    """Load the weights in ``path`` into ``model`` (in place) and return it."""
    state = extract_state_dict(load_torch(path), path)
    check_finite(state, path)
    check_compatible(model, state, path, model_name)
    model.load_state_dict(state, strict=False)
    return model
