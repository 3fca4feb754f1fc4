"""Models of one's own: a ``module:callable`` factory, the checks a model passes before a run, and
the digests that tie a run folder or a saved quantized model to one model.

A factory spec ``my_pkg.models:build`` names a callable that takes no arguments and returns an
``nn.Module``; its :class:`ModelInfo` is the module's ``texq_info``, or is given field by field
(``texq run --num-classes --input-size --mean --std``). texq records the spec in the info
(``factory``), so that a resumed run or ``texq.models.quantized.load_quantized`` rebuilds the model.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
import traceback
from dataclasses import fields, replace
from typing import Any, Mapping

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from texq.models.checkpoint import check_finite
from texq.models.info import ModelInfo, get_info
from texq.quant import quantizable_layers, unquantized_layers
from texq.util.errors import ConfigError

_NAME = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
FACTORY_SPEC = re.compile(rf"^({_NAME}):({_NAME})$")  # dotted.module:attribute[.attribute]
REQUIRED_FIELDS = ("num_classes", "input_size", "mean", "std")  # what a factory's model must tell


def is_factory_spec(name: str) -> bool:
    """Whether ``name`` reads ``module:callable`` (a registry name never holds a colon)."""
    return bool(FACTORY_SPEC.match(name))


def _resolve(spec: str):
    match = FACTORY_SPEC.match(spec)
    if not match:
        raise ConfigError(f"model factory {spec!r}: expected 'module:callable', e.g. my_pkg.models:build")
    module_name, attr = match.groups()
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (module_name + ".").startswith(exc.name + "."):
            raise factory_failure(spec, "importing it", exc) from exc  # an import inside it fails
        raise ConfigError(f"model factory {spec!r}: no module named {exc.name!r} "
                          f"(is its folder on sys.path / PYTHONPATH?)") from exc
    except Exception as exc:  # a syntax error, an error at import time: the user's code
        raise factory_failure(spec, "importing it", exc) from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"model factory {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"model factory {spec!r}: {attr!r} is not callable "
                          f"({type(obj).__name__}): expected a callable returning an nn.Module")
    try:
        inspect.signature(obj).bind()
    except TypeError as exc:
        raise ConfigError(f"model factory {spec!r} cannot be called without arguments ({exc}): "
                          f"name a callable that takes none") from exc
    except ValueError:  # no signature to inspect (some builtins): call it and see
        pass
    return obj


def factory_failure(spec: str, doing: str, exc: BaseException) -> ConfigError:
    """One line for an error raised by a user's factory module: what failed and where (the last
    line of the user's code in the traceback, or the syntax error's line)."""
    if isinstance(exc, SyntaxError):
        where = f"{exc.filename}, line {exc.lineno}"
    else:
        frames = traceback.extract_tb(exc.__traceback__)
        own = [f for f in frames if "importlib" not in f.filename] or frames
        where = f"{own[-1].filename}, line {own[-1].lineno}" if own else "?"
    text = exc.msg if isinstance(exc, SyntaxError) else (str(exc).strip().splitlines() or [""])[0]
    return ConfigError(f"model factory {spec!r} failed {doing}: {type(exc).__name__}: {text} ({where})")


def build_factory(spec: str, info_fields: Mapping[str, Any] | None = None) -> nn.Module:
    """Call the factory ``spec`` and return its module in eval mode with ``texq_info`` set: the
    module's own, its fields replaced by ``info_fields``; a module without one needs
    ``info_fields`` to hold num_classes, input_size, mean and std (name: the spec)."""
    factory = _resolve(spec)
    try:
        model = factory()
    except Exception as exc:
        raise factory_failure(spec, "calling it", exc) from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model factory {spec!r} returned {type(model).__name__}, "
                          f"expected a torch.nn.Module")
    given = dict(info_fields or {})
    unknown = set(given) - {f.name for f in fields(ModelInfo)}
    if unknown:
        raise ConfigError(f"model factory {spec!r}: unknown ModelInfo fields {sorted(unknown)}")
    own = getattr(model, "texq_info", None)
    if own is not None and not isinstance(own, ModelInfo):
        raise ConfigError(f"model factory {spec!r}: its module's texq_info is a "
                          f"{type(own).__name__}, expected a texq.ModelInfo")
    if own is None:
        missing = [k for k in REQUIRED_FIELDS if k not in given]
        if missing:
            flags = ", ".join("--" + k.replace("_", "-") for k in missing)
            raise ConfigError(f"model factory {spec!r} returned a {type(model).__name__} without "
                              f"texq_info: set model.texq_info = texq.ModelInfo(...) in the factory "
                              f"or give its {', '.join(missing)} (texq run: {flags})")
        own = ModelInfo(**{"name": spec, **given})
    else:
        own = replace(own, **given)
    model.texq_info = replace(own, factory=spec)
    return model.eval()


def check_model(model: nn.Module, name: str) -> None:
    """Refuse, before any long work, a model texq cannot run on: one without BatchNorm layers
    keeping running statistics (every method matches them: BNS losses, Eq. 3, 7, 8, 11), or with
    nothing to quantize."""
    bns = [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
    if not bns:
        raise ConfigError(f"model {name!r} has no BatchNorm layer: TexQ and its baselines match the "
                          f"running statistics BatchNorm keeps (BNS losses, Eq. 3, 7, 8, 11); "
                          f"quantize a BatchNorm-equipped CNN")
    stateless = [n for n, m in bns if m.running_mean is None]
    if stateless:
        raise ConfigError(f"model {name!r}: BatchNorm {', '.join(stateless[:3])} keeps no running "
                          f"statistics (track_running_stats=False), which the BNS losses match")
    if not quantizable_layers(model):
        raise ConfigError(f"model {name!r} has no Conv2d or Linear layer texq can quantize")
    check_finite(model.state_dict(), f"model {name!r}")


def architecture_digest(model: nn.Module) -> str:
    """Hash of the module tree (names, classes) and of the state dict's names, shapes and dtypes:
    equal for two builds of one architecture whatever their weights."""
    parts = [f"{n}:{type(m).__module__}.{type(m).__qualname__}" for n, m in model.named_modules()]
    parts += [f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in model.state_dict().items()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def weights_digest(model: nn.Module) -> str:
    """Hash of every state-dict tensor's values (memory layout and device aside)."""
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def model_record(model: nn.Module) -> dict:
    """What a run records of its float model: its ModelInfo, architecture and weights digests,
    and the layers with weights that texq leaves in float (BatchNorm aside)."""
    return {"info": get_info(model).to_dict(), "architecture": architecture_digest(model),
            "weights": weights_digest(model),
            "unquantized": [{"name": n, "type": t} for n, t in unquantized_layers(model)]}
