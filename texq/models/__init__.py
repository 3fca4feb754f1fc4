"""Model registry (CIFAR ResNets in two shortcut styles, torchvision ImageNet models) and models of
one's own (a ``module:callable`` factory, or a module with its ``ModelInfo``)."""

from texq.models.checkpoint import load_checkpoint
from texq.models.info import ModelInfo, get_info
from texq.models.quantized import load_quantized, save_quantized
from texq.models.registry import (
           check_weights,
           create_model,
           is_registered,
           list_models,
           model_info,
)
from texq.models.user import build_factory, check_model, is_factory_spec

__all__ = ["ModelInfo", "build_factory", "check_model", "check_weights", "create_model", "get_info", "is_factory_spec",
           "is_registered", "list_models", "load_checkpoint", "load_quantized", "model_info",
           "save_quantized"]
