"""Fake-quantized layers: weight quantizers, activation quantizers, QuantConv2d and QuantLinear.

A quantized layer quantizes its weights (ranges taken from the current weights at every forward,
so they follow fine-tuning) and, unless it reads the raw image, its input activation (a per-tensor
range tracked as an EMA of batch min/max while observing, then frozen).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from texq.quant.functional import (
    StaticQParams,
    channel_min_max,
    fake_quantize,
    static_fake_quantize,
    static_qparams,
    tensor_min_max,
)
from texq.util.errors import ConfigError
from texq.util.precision import float32_quantizer


class WeightQuantizer(nn.Module):
    """Quantize a weight tensor per output channel (axis 0) or per tensor; no state."""

    def __init__(self, bits: int, per_channel: bool = True, integer_zero_point: bool = True,
                 ste: str = "clipped"):
        super().__init__()
        self.bits = bits
        self.per_channel = per_channel
        self.integer_zero_point = integer_zero_point
        self.ste = ste

    @float32_quantizer
    def forward(self, w: Tensor) -> Tensor:
        if self.per_channel:
            lo, hi = channel_min_max(w, axis=0)
            axis = 0
        else:
            lo, hi = tensor_min_max(w)
            axis = None
        return fake_quantize(w, lo, hi, self.bits, axis, self.integer_zero_point, self.ste)

    def extra_repr(self) -> str:
        gran = "per_channel" if self.per_channel else "per_tensor"
        return f"bits={self.bits}, {gran}, integer_zero_point={self.integer_zero_point}"


class ActQuantizer(nn.Module):
    """Quantize an activation tensor with one range per tensor.

    While ``observing`` is True each forward updates the range with the batch min/max as an
    exponential moving average (the first batch sets it); otherwise the range is frozen.
    """

    def __init__(self, bits: int, momentum: float = 0.9, integer_zero_point: bool = True,
                 ste: str = "clipped", device: torch.device | str | None = None):
        super().__init__()
        self.bits = bits
        self.momentum = momentum
        self.integer_zero_point = integer_zero_point
        self.ste = ste
        self.observing = False
        self._frozen: StaticQParams | None = None  # host-side copy of the frozen range
        self.register_buffer("x_min", torch.zeros((), device=device))
        self.register_buffer("x_max", torch.zeros((), device=device))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool, device=device))

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """The first batch sets the range, later ones move it by EMA (no host sync)."""
        self._frozen = None
        lo, hi = tensor_min_max(x)
        m = self.momentum
        self.x_min.copy_(torch.where(self.initialized, self.x_min * m + lo * (1 - m), lo))
        self.x_max.copy_(torch.where(self.initialized, self.x_max * m + hi * (1 - m), hi))
        self.initialized.fill_(True)

    @float32_quantizer
    def forward(self, x: Tensor) -> Tensor:
        if self.observing:
            self.observe(x)
            return fake_quantize(x, self.x_min, self.x_max, self.bits, None,
                                 self.integer_zero_point, self.ste)
        return static_fake_quantize(x, self.freeze(), self.ste)

    def freeze(self) -> StaticQParams:
        """The frozen range's host-side quantization parameters (read from the device once: a
        host sync, which callers that capture or compile a step make before it)."""
        if self._frozen is None:
            if not bool(self.initialized):
                raise ConfigError(
                    "activation ranges are not calibrated: run texq.calibrate(qmodel, batches) first"
                )
            self._frozen = static_qparams(self.x_min, self.x_max, self.bits, self.integer_zero_point)
        return self._frozen

    def reset(self) -> None:
        """Forget the range (the next observed batch sets it anew)."""
        self.initialized.fill_(False)
        self._frozen = None

    def _load_from_state_dict(self, *args, **kwargs):
        self._frozen = None
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, momentum={self.momentum}, "
                f"range=[{float(self.x_min):.4g}, {float(self.x_max):.4g}]")


def _adopt(q: nn.Module, layer: nn.Module, weight_quant: nn.Module,
           act_quant: nn.Module | None) -> None:
    """Copy ``layer``'s weight and bias into ``q`` and attach the quantizers."""
    with torch.no_grad():
        q.weight.copy_(layer.weight)
        if layer.bias is not None:
            q.bias.copy_(layer.bias)
    q.weight_quant = weight_quant
    q.act_quant = act_quant if act_quant is not None else nn.Identity()


class QuantConv2d(nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized weights and (optionally) input activation.

    Parameter names are those of ``nn.Conv2d``, so a float state dict loads into it.
    """

    weight_quant: nn.Module
    act_quant: nn.Module

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_quant: nn.Module,
                   act_quant: nn.Module | None) -> "QuantConv2d":
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                device=conv.weight.device, dtype=conv.weight.dtype)
        _adopt(q, conv, weight_quant, act_quant)
        return q

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.act_quant(x), self.weight_quant(self.weight), self.bias)


class QuantLinear(nn.Linear):
    """``nn.Linear`` with fake-quantized weights and (optionally) input activation."""

    weight_quant: nn.Module
    act_quant: nn.Module

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_quant: nn.Module,
                   act_quant: nn.Module | None) -> "QuantLinear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None,
                device=linear.weight.device, dtype=linear.weight.dtype)
        _adopt(q, linear, weight_quant, act_quant)
        return q

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.act_quant(x), self.weight_quant(self.weight), self.bias)
