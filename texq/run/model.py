"""A run's full-precision model F: built from ``cfg.model`` (a registry name or a factory), or a
module of one's own that ``cfg.model`` names; the one place every step and ``texq run`` gets it."""

from __future__ import annotations

from torch import nn

from texq.models import (
    check_weights,
    create_model,
    get_info,
    is_registered,
    load_checkpoint,
)
from texq.models.user import architecture_digest
from texq.run.config import RunConfig
from texq.util.errors import ConfigError


def float_model(cfg: RunConfig, module: nn.Module | None = None) -> nn.Module:
    """F in eval mode: ``cfg.model`` built with its weights, or ``module`` (which ``cfg.model``
    must name) with ``cfg.checkpoint`` loaded into it if set."""
    if module is None:
        return create_model(cfg.model, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint)
    info = get_info(module)
    if cfg.model not in (info.name, info.factory):
        raise ConfigError(f"the config's model is {cfg.model!r} but the module given is "
                          f"{info.name!r} (its texq_info): build the config with "
                          f"RunConfig.for_profile(..., info=module.texq_info)")
    check_weights(cfg.model, cfg.pretrained, cfg.checkpoint, own_module=True)
    if info.factory is None and is_registered(info.name) and (
            architecture_digest(module) != architecture_digest(create_model(info.name))):
        raise ConfigError(f"the module given is named {info.name!r} but is not that registry "
                          f"model's architecture: give it a name of its own in its texq_info")
    if cfg.checkpoint is not None:
        load_checkpoint(module, cfg.checkpoint, cfg.model)
    return module.eval()
