"""Where a run computes, and the numerics it allows there.

``tf32`` off (the default) makes CUDA convolutions full float32 (matmuls always are): PyTorch's
own default lets cuDNN convolutions use TF32 (10-bit mantissa products) on Ampere and newer GPUs,
which would silently change the maths between a CPU and a GPU run. cuDNN is asked for deterministic algorithms
so that the same seed on the same GPU gives the same run.
"""

from __future__ import annotations

import torch

from texq.util.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else the CPU), ``cpu`` or ``cuda``; ConfigError otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in DEVICES:
        raise ConfigError(f"device={name!r}: expected one of {', '.join(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda: no CUDA device is available")
    return torch.device(name)


def memory_format(channels_last: bool | str, device: torch.device, tf32: bool) -> torch.memory_format:
    """The convolutions' memory layout: NHWC (``channels_last``) or NCHW; ``auto`` takes the one
    measured faster for texq's steps (bench/gpu_profile.py): NHWC on CPUs and for TF32 on CUDA,
    NCHW for float32 on CUDA (steps 2-3 were 17% slower in NHWC on an H100)."""
    if channels_last == "auto":
        channels_last = device.type != "cuda" or tf32
    return torch.channels_last if channels_last else torch.contiguous_format


def set_numerics(tf32: bool = False) -> None:
    """TF32 on or off for cuDNN's convolutions (process-wide; matmuls, such as the per-class BN
    statistics', stay float32), deterministic cuDNN. Called by the run and pipeline stages; code
    that calls ``synthesize`` or ``Finetuner`` directly decides for itself."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def use_device(name: str, tf32: bool = False) -> torch.device:
    """``resolve_device(name)`` with the run's numerics set (``set_numerics(tf32)``): what every
    entry point that computes calls first."""
    device = resolve_device(name)
    set_numerics(tf32)
    return device
