"""``ModelInfo``: what texq needs to know about a model (classes, input, normalisation, origin)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from texq.util.errors import ConfigError

CIFAR_SCALE_MAX = 64  # inputs up to this side follow the lineage's CIFAR settings, larger ImageNet's


@dataclass(frozen=True)
class ModelInfo:
    """What a user of a model needs to feed it, and where it comes from.

    A registry model's ``name`` rebuilds it; a model of one's own may name its ``factory`` (a
    ``module:callable`` spec, called with no arguments) so that a resumed run or a reload of its
    quantized model rebuilds it; without one, the float module is passed to them."""

    name: str
    num_classes: int
    input_size: int  # square input side in pixels
    mean: tuple[float, float, float]  # per-channel mean of RGB in [0, 1] subtracted at input
    std: tuple[float, float, float]  # per-channel std divided at input
    dataset: str = "custom"  # 'cifar10', 'cifar100' or 'imagenet' for registry models
    factory: str | None = None  # 'module:callable' that builds the model; None: registry or none

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))  # lists from JSON
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        where = f"ModelInfo of {self.name!r}"
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ConfigError(f"{where}: num_classes={self.num_classes!r}: expected an integer >= 2")
        if (isinstance(self.input_size, bool) or not isinstance(self.input_size, int)
                or self.input_size < 8 or self.input_size % 4):
            raise ConfigError(f"{where}: input_size={self.input_size!r}: expected a multiple of 4, "
                              f"at least 8 (the generator upsamples 4x to it)")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(f"{where}: mean={self.mean}, std={self.std}: expected three RGB "
                              f"values each, std > 0 (texq synthesises 3-channel images)")

    @property
    def imagenet_scale(self) -> bool:
        """Inputs larger than 64 px: the lineage's ImageNet settings apply (GDFQ's class-conditional
        generator, the paper's batch of 16, resize-and-crop evaluation); else CIFAR's."""
        return self.input_size > CIFAR_SCALE_MAX

    def to_dict(self) -> dict:
        return asdict(self)


def get_info(model: nn.Module) -> ModelInfo:
    """The :class:`ModelInfo` a model carries as ``model.texq_info``."""
    info = getattr(model, "texq_info", None)
    if not isinstance(info, ModelInfo):
        raise ConfigError(f"this model ({type(model).__name__}) carries no texq_info (classes, input "
                          f"size, normalisation): build it with texq.models.create_model or set "
                          f"model.texq_info = texq.ModelInfo(...)")
    return info
