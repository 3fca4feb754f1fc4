"""Model registry (CIFAR ResNets in two shortcut styles, torchvision ImageNet models)."""

from texq.models.checkpoint import load_checkpoint
from texq.models.registry import ModelInfo, create_model, get_info, list_models, model_info

__all__ = ["ModelInfo", "create_model", "get_info", "list_models", "load_checkpoint", "model_info"]
