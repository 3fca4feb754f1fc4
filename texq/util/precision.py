"""Steps 2-3 in mixed precision (``precision: bf16``) and compiled (``compile: true``).

``precision: bf16`` runs the convolutions and matmuls of G, F and Q in bfloat16 (torch.autocast)
while everything whose precision the method depends on stays float32:

- the quantizers' arithmetic (x/s, rounding, clamp, zero point): :func:`float32_quantizer` runs a
  quantizer with autocast off on a float32 input, so which grid point a value takes is decided in
  float32. The convolution then casts the fake-quantized weight s*(k - z) and activation to bf16,
  which moves each grid value by up to 2^-9 of itself;
- BatchNorm: :func:`float32_batchnorm` casts each BatchNorm layer's input to float32, so its
  normalisation, its running statistics and the BNS losses' batch statistics are float32;
- the losses: logits are cast to float32 before cross-entropy and the KL term (float32 arithmetic
  on logits that a bf16 linear layer produced).

Weights, gradients and optimizer states stay float32 (autocast casts copies). A bf16 product
has an 8-bit mantissa: this changes the numbers, so ``precision`` is part of a run's
configuration (its fingerprint), unlike the speed-only settings. Off by default: its speed and
its effect on accuracy are to be measured on a GPU (scripts/gpu_speedups.sh).

``compile`` wraps the captured step functions in ``torch.compile`` (inductor; texq's own CUDA
graphs still capture the result). ``fallback_random`` keeps every random draw eager, so a compiled
step draws the same numbers as an eager one; fused kernels may round differently in the last bits,
as a different convolution algorithm would.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import Tensor, nn

PRECISIONS = ("float32", "bf16")  # steps 2-3 in float32 / bf16 convolutions and matmuls
_AUTOCAST_DEVICES = ("cpu", "cuda")  # where texq uses autocast (asking of others, e.g. meta, raises)


def autocast(device: torch.device, mode: str) -> contextlib.AbstractContextManager:
    """The autocast context of ``mode`` on ``device`` (a null context for 'float32'). Autocast's
    weight cache is off: a CUDA graph must not capture a cast made outside it."""
    if mode == "float32":
        return contextlib.nullcontext()
    if mode != "bf16":
        raise ValueError(f"precision={mode!r}: expected one of {', '.join(PRECISIONS)}")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, cache_enabled=False)


def float32_quantizer(forward: Callable[[nn.Module, Tensor], Tensor]):
    """Decorate a quantizer's ``forward(self, x)``: under autocast it runs with autocast off on
    ``x`` in float32 and returns float32; otherwise it is called as it is."""

    def wrapped(self: nn.Module, x: Tensor) -> Tensor:
        kind = x.device.type
        if kind not in _AUTOCAST_DEVICES or not torch.is_autocast_enabled(kind):
            return forward(self, x)
        with torch.autocast(kind, enabled=False):
            return forward(self, x.float())

    wrapped.__doc__, wrapped.__name__ = forward.__doc__, forward.__name__
    return wrapped


def _float_input(module: nn.Module, inputs: tuple) -> tuple | None:
    x = inputs[0]
    if isinstance(x, Tensor) and x.is_floating_point() and x.dtype != torch.float32:
        return (x.float(), *inputs[1:])
    return None


def float32_batchnorm(*models: nn.Module | None) -> list:
    """Make every BatchNorm layer of ``models`` compute in float32 (its input cast by a forward
    pre-hook; its parameters are float32). Returns the hooks' handles (``.remove()`` undoes)."""
    return [m.register_forward_pre_hook(_float_input) for model in models if model is not None
            for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def compile_step(fn: Callable, backend: str = "inductor") -> Callable:
    """``torch.compile(fn)`` for a step function texq captures itself: no CUDA graphs of its own
    (``mode=None``), static shapes, random draws as in eager mode. ``backend`` 'aot_eager' traces
    without generating code (the CPU tests' check of the tracing)."""
    options = {"fallback_random": True} if backend == "inductor" else None
    return torch.compile(fn, backend=backend, dynamic=False, options=options)
