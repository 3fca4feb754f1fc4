"""``quantize(model, QuantConfig(...))`` and ``calibrate(qmodel, batches)``.

``quantize`` returns a fake-quantized copy of a float model and leaves the original untouched:
every ``nn.Conv2d`` and ``nn.Linear`` (``quantizable_layers``) becomes a :class:`QuantConv2d` /
:class:`QuantLinear` whose weights are quantized, and whose input activation is quantized unless
the layer reads the raw image (the first layer). BatchNorm stays as it is unless ``fold_bn=True``;
other layers with weights stay in float, listed by ``unquantized_layers``.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Annotated, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from texq.quant.modules import ActQuantizer, QuantConv2d, QuantLinear, WeightQuantizer
from texq.util.domains import MOMENTUM, Domain, check_fields, one_of
from texq.util.errors import ConfigError

#: bit width meaning "not quantized" (full precision float32)
FULL_PRECISION = 32
MIN_BITS, MAX_BITS = 2, 8


#: the supported bit widths, as a config field's domain (texq.util.domains)
BITS = Domain(f"a supported bit width: an integer in {MIN_BITS}..{MAX_BITS}, or {FULL_PRECISION} for "
              f"full precision", lambda b: MIN_BITS <= b <= MAX_BITS or b == FULL_PRECISION)


def check_bits(name: str, bits: int | None, allow_none: bool = False) -> None:
    """Raise ConfigError unless ``bits`` is in 2..8 or 32 (full precision)."""
    if bits is None and allow_none:
        return
    if isinstance(bits, bool) or not isinstance(bits, int) or not BITS.holds(bits):
        raise ConfigError(f"{name}={bits!r}: expected {BITS.words}")


@dataclass(frozen=True)
class QuantOptions:
    """How a model is quantized, its bit widths aside (a run's ``quant`` section: the bits are the
    run's own ``w_bits`` / ``a_bits``)."""

    per_channel: bool = True  # one weight range per output channel (ZeroQ/GDFQ); False: per tensor
    integer_zero_point: bool = True  # round ZP as the lineage code does, so 0.0 is exact
    ste: Annotated[str, one_of("clipped", "identity")] = "clipped"  # gradient 1 inside the range, 0 where clipped; 'identity': 1 everywhere
    act_momentum: Annotated[float, MOMENTUM] = 0.9  # EMA factor of activation ranges while observing (lineage: 0.9)
    first_layer_bits: Annotated[int | None, BITS] = None  # weight bits of the first layer; None: w_bits
    last_layer_bits: Annotated[int | None, BITS] = None  # weight and input bits of the last layer; None: as others
    quantize_input: bool = False  # also quantize the raw image entering the first layer
    fold_bn: bool = False  # fold BatchNorm into the preceding conv before quantizing
    first_layer: str | None = None  # module name of the first layer; None: first in module order
    last_layer: str | None = None  # module name of the last layer; None: last in module order

    def __post_init__(self) -> None:
        check_bits("quant.first_layer_bits", self.first_layer_bits, allow_none=True)
        check_bits("quant.last_layer_bits", self.last_layer_bits, allow_none=True)
        check_fields(self, "quant.")

    def with_bits(self, w_bits: int, a_bits: int) -> "QuantConfig":
        return QuantConfig(w_bits=w_bits, a_bits=a_bits, **asdict(self))


@dataclass(frozen=True)
class QuantConfig(QuantOptions):
    """How to quantize a model (the paper's setting is the default: per-channel W, per-tensor A)."""

    w_bits: Annotated[int, BITS] = 4  # weight bit width, 2..8 (32 = keep float)
    a_bits: Annotated[int, BITS] = 4  # activation bit width, 2..8 (32 = keep float)

    def __post_init__(self) -> None:
        check_bits("w_bits", self.w_bits)
        check_bits("a_bits", self.a_bits)
        super().__post_init__()

    @property
    def is_full_precision(self) -> bool:
        return (self.w_bits == FULL_PRECISION and self.a_bits == FULL_PRECISION
                and self.first_layer_bits in (None, FULL_PRECISION)
                and self.last_layer_bits in (None, FULL_PRECISION))


def _replaceable(m: nn.Module) -> bool:
    """A Conv2d or Linear computed by its class's own forward (a subclass that overrides it would
    lose its behaviour to QuantConv2d / QuantLinear)."""
    cls = type(m)
    if isinstance(m, nn.Conv2d):
        return cls.forward is nn.Conv2d.forward and cls._conv_forward is nn.Conv2d._conv_forward
    return isinstance(m, nn.Linear) and cls.forward is nn.Linear.forward


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every Conv2d and Linear texq quantizes, in module registration order:
    not one whose subclass overrides the computation, nor the output projection of an
    ``nn.MultiheadAttention`` (which reads its weights directly, bypassing any quantizer)."""
    attention = tuple(f"{n}." if n else "" for n, m in model.named_modules()
                      if isinstance(m, nn.MultiheadAttention))
    return [(n, m) for n, m in model.named_modules()
            if _replaceable(m) and not (attention and n.startswith(attention))]


def unquantized_layers(model: nn.Module) -> list[tuple[str, str]]:
    """(name, class name) of every module holding weights of its own that ``quantize`` leaves in
    float, BatchNorm aside (kept in float by design): ConvTranspose2d, Conv1d, Embedding,
    MultiheadAttention, LayerNorm, custom modules with their own parameters ... ("" names the
    model itself)."""
    quantized = {n for n, _ in quantizable_layers(model)}
    return [(n, type(m).__name__) for n, m in model.named_modules()
            if n not in quantized and not isinstance(m, nn.modules.batchnorm._BatchNorm)
            and next(m.parameters(recurse=False), None) is not None]


def _weight_quant(bits: int, cfg: QuantConfig) -> nn.Module:
    if bits == FULL_PRECISION:
        return nn.Identity()
    return WeightQuantizer(bits, cfg.per_channel, cfg.integer_zero_point, cfg.ste)


def _act_quant(bits: int, cfg: QuantConfig, device: torch.device) -> nn.Module | None:
    if bits == FULL_PRECISION:
        return None
    return ActQuantizer(bits, cfg.act_momentum, cfg.integer_zero_point, cfg.ste, device=device)


def _fold_bn(model: nn.Module) -> nn.Module:
    from torch.fx.experimental.optimization import fuse

    was_training = model.training
    model.eval()
    try:
        fused = fuse(model)
    except Exception as exc:  # symbolic tracing fails on data-dependent control flow
        raise ConfigError(f"fold_bn=True needs a model torch.fx can trace: {exc}") from exc
    for attr in ("texq_info",):
        if hasattr(model, attr):
            setattr(fused, attr, getattr(model, attr))
    return fused.train(was_training)


def quantize(model: nn.Module, config: QuantConfig | None = None) -> nn.Module:
    """Return a fake-quantized copy of ``model``; ``model`` itself is not modified."""
    cfg = config or QuantConfig()
    qmodel = copy.deepcopy(model)
    if cfg.fold_bn:
        qmodel = _fold_bn(qmodel)
    layers = quantizable_layers(qmodel)
    if not layers:
        raise ConfigError("the model has no Conv2d or Linear layer to quantize")
    names = [n for n, _ in layers]
    first = cfg.first_layer or names[0]
    last = cfg.last_layer or names[-1]
    for label, name in (("first_layer", first), ("last_layer", last)):
        if name not in names:
            raise ConfigError(f"{label}={name!r} is not a Conv2d/Linear of the model; "
                              f"candidates: {names[:3]} ... {names[-3:]}")
    for name, layer in layers:
        w_bits, a_bits = cfg.w_bits, cfg.a_bits
        if name == last and cfg.last_layer_bits is not None:
            w_bits = a_bits = cfg.last_layer_bits
        if name == first:
            if cfg.first_layer_bits is not None:
                w_bits = cfg.first_layer_bits
            if not cfg.quantize_input:
                a_bits = FULL_PRECISION
        # every tensor texq adds lives where the layer lives (a model already on a GPU stays there)
        wq, aq = _weight_quant(w_bits, cfg), _act_quant(a_bits, cfg, layer.weight.device)
        cls = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
        qmodel.set_submodule(name, cls.from_float(layer, wq, aq))
    qmodel.texq_quant = cfg
    return qmodel


def act_quantizers(model: nn.Module) -> list[ActQuantizer]:
    return [m for m in model.modules() if isinstance(m, ActQuantizer)]


def set_observing(model: nn.Module, observing: bool, reset: bool = False) -> None:
    """Start (``True``) or stop (``False``) updating activation ranges; ``reset`` forgets them."""
    for q in act_quantizers(model):
        q.observing = observing
        if reset:
            q.reset()


@torch.no_grad()
def calibrate(qmodel: nn.Module, batches: Iterable, device: torch.device | str | None = None,
              progress: bool = False) -> int:
    """Set activation ranges from ``batches`` (tensors, or (input, label) pairs), then freeze them.

    The model runs in eval mode (BatchNorm uses its running statistics). Returns the number of
    batches seen.
    """
    was_training = qmodel.training
    qmodel.eval()
    if device is None:
        device = next(qmodel.parameters()).device
    set_observing(qmodel, True, reset=True)
    seen = 0
    try:
        for batch in tqdm(batches, desc="calibrate", disable=not progress, leave=False):
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            qmodel(x.to(device))
            seen += 1
    finally:
        set_observing(qmodel, False)
        qmodel.train(was_training)
    if seen == 0 and act_quantizers(qmodel):
        raise ConfigError("calibrate() got no batches: activation ranges cannot be set")
    return seen
