"""Model registry: a name gives an architecture, its input normalisation and its published weights.

Names:
* ``resnet{D}_cifar{10,100}``  -- CIFAR ResNet-D (D = 6n+2), projection shortcut, pytorchcv layout
  (the paper's full-precision models);
* ``resnet{D}a_cifar{10,100}`` -- CIFAR ResNet-D with the original zero-padding "option A"
  shortcut, akamaster layout;
* ``resnet18``, ``resnet50``, ``mobilenet_v2`` -- torchvision's ImageNet models.

A ``module:callable`` factory spec stands for a model of one's own wherever a name does
(:mod:`texq.models.user`). Every model returned by :func:`create_model` carries a
:class:`ModelInfo` as ``model.texq_info``: its class count, input size and the mean/std its inputs
are normalised with.
"""

from __future__ import annotations

import re
from pathlib import Path

from torch import nn

from texq.models.checkpoint import load_checkpoint
from texq.models.cifar_resnet import CifarResNet, CifarResNetA, blocks_per_stage
from texq.models.info import ModelInfo, get_info
from texq.models.user import build_factory, is_factory_spec
from texq.models.weights import PRETRAINED, fetch
from texq.util.errors import CheckpointError, ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# pytorchcv's CIFAR models were trained with these (imgclsmob's CIFAR10MetaInfo)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)

CIFAR_NAME = re.compile(r"^resnet(\d+)(a?)_cifar(10|100)$")
TORCHVISION_MODELS = {"resnet18": "IMAGENET1K_V1", "resnet50": "IMAGENET1K_V1",
                      "mobilenet_v2": "IMAGENET1K_V1"}
LISTED_CIFAR_DEPTHS = (20, 32, 44, 56, 110)


def list_models() -> list[str]:
    """Registered names (CIFAR ResNets accept any depth 6n+2; the usual ones are listed)."""
    names = [f"resnet{d}{s}_cifar{c}" for s in ("", "a") for c in (10, 100)
             for d in LISTED_CIFAR_DEPTHS]
    return names + list(TORCHVISION_MODELS)


def is_registered(name: str) -> bool:
    """Whether ``name`` is a registry name (a CIFAR ResNet name of any depth, or listed)."""
    return bool(CIFAR_NAME.match(name)) or name in TORCHVISION_MODELS


def check_weights(model: str, pretrained: bool, checkpoint, own_module: bool = False) -> None:
    """Refuse a source of weights that cannot be: published weights for a model of one's own (a
    factory spec, a name the registry lacks, or a module given), or no weights for a registry
    model. The one home of these refusals (RunConfig, ``texq eval``, ``texq run``)."""
    own = own_module or not is_registered(model)
    if pretrained and own:
        raise ConfigError(f"pretrained: published weights exist for registry models only, not for "
                          f"{model!r} (a model of one's own comes with its weights, or a checkpoint's)")
    if not own and checkpoint is None and not pretrained:
        raise ConfigError("give the model's weights: a checkpoint (--checkpoint PATH) or the "
                          "published ones (--pretrained)")


def model_info(name: str) -> ModelInfo:
    """The :class:`ModelInfo` of a registered name, or of the model a factory spec builds (the
    factory is called); ConfigError for unknown names."""
    if is_factory_spec(name):
        return get_info(build_factory(name))
    m = CIFAR_NAME.match(name)
    if m:
        depth, style, classes = int(m.group(1)), m.group(2), int(m.group(3))
        try:
            blocks_per_stage(depth)
        except ValueError as exc:
            raise ConfigError(f"model {name!r}: {exc}") from exc
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if style == "a" else (CIFAR_MEAN, CIFAR_STD)
        return ModelInfo(name, classes, 32, mean, std, f"cifar{classes}")
    if name in TORCHVISION_MODELS:
        return ModelInfo(name, 1000, 224, IMAGENET_MEAN, IMAGENET_STD, "imagenet")
    raise ConfigError(f"unknown model {name!r}; known: resnet{{D}}_cifar{{10,100}}, "
                      f"resnet{{D}}a_cifar{{10,100}} (D = 6n+2), {', '.join(TORCHVISION_MODELS)}, "
                      f"or a factory 'module:callable' returning a model of one's own")


def _build(info: ModelInfo, pretrained: bool) -> nn.Module:
    m = CIFAR_NAME.match(info.name)
    if m:
        cls = CifarResNetA if m.group(2) == "a" else CifarResNet
        return cls(int(m.group(1)), info.num_classes)
    import torchvision

    weights = TORCHVISION_MODELS[info.name] if pretrained else None
    try:
        return torchvision.models.get_model(info.name, weights=weights)
    except OSError as exc:  # URLError is an OSError
        raise CheckpointError(f"cannot download torchvision weights {info.name}/{weights} "
                              f"({exc}); without internet pass --checkpoint PATH") from exc


def create_model(name: str, pretrained: bool = False, checkpoint: str | Path | None = None) -> nn.Module:
    """Build ``name`` (eval mode); load ``checkpoint`` if given, else published weights if
    ``pretrained``; attach its :class:`ModelInfo` as ``texq_info``. A factory spec's model comes
    with the weights its factory gives it (``checkpoint`` replaces them; no published weights)."""
    if is_factory_spec(name):
        if pretrained:
            raise ConfigError(f"no published weights for a model of one's own ({name!r}): its "
                              f"factory loads them, or pass a checkpoint path")
        model = build_factory(name)
        return load_checkpoint(model, checkpoint, name) if checkpoint is not None else model
    info = model_info(name)
    model = _build(info, pretrained and checkpoint is None)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, name)
    elif pretrained and info.name in PRETRAINED:
        load_checkpoint(model, fetch(PRETRAINED[info.name]), name)
    elif pretrained and info.name not in TORCHVISION_MODELS:
        raise ConfigError(f"no published weights for {name!r}: pass a checkpoint path "
                          f"(published: {', '.join(PRETRAINED)})")
    model.texq_info = info
    return model.eval()
