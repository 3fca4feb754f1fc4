"""A run's configuration: ``RunConfig`` composes the method's configs (each defined beside what it
computes: ``texq.method.calibration``, ``.generator``, ``.finetune_config``, ``.distill``, and the
quantizer's ``texq.quant.QuantOptions``) under the run's own settings, and the profiles.

Defaults are the paper's values (section 4.1 and 4.3) where it gives them; the rest follow the code
the paper was built on (GDFQ / IntraQ / FDDA) -- see docs/interpretation.md. A profile changes
schedules, batch sizes and learning rates (docs/interpretation.md, "Profiles"), never which losses
are used; the quick profile also averages the KD term per sample (10x the lineage's scale on
CIFAR-10), the setting it was tuned and measured with.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Annotated, Mapping

from texq.method.calibration import CalibrationConfig
from texq.method.distill import DistillConfig
from texq.method.finetune_config import FinetuneConfig
from texq.method.generator import GeneratorConfig
from texq.models import ModelInfo, check_weights, model_info
from texq.quant import BITS, QuantConfig, QuantOptions
from texq.run.methods import METHOD_SPECS, METHODS, check_switches, refuse_replaced
from texq.util.device import DEVICES
from texq.util.domains import SEED, check_fields, one_of
from texq.util.errors import ConfigError
from texq.util.keys import build, check_value, leaves, merge, nest
from texq.util.precision import PRECISIONS

PROFILES = ("paper", "quick", "tiny")


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs; ``RunConfig.for_profile`` fills the method's configs. The values a
    run's method always uses (GDFQ's generator weights and plain KD: ``texq.run.methods``) replace
    those given, so that a config holds the settings in effect."""

    # registry name, 'module:callable' factory, or the ModelInfo name of a module given to texq.run
    model: str = "resnet20_cifar10"
    checkpoint: str | None = None  # weights of the full-precision model
    pretrained: bool = False  # or the published weights (registry models)
    data: str = "cifar10"  # evaluation set (test images: final score only)
    train_data: str | None = None  # real training images, method 'real' only
    method: Annotated[str, one_of(*METHODS)] = "texq"  # texq | gdfq | zeroq | real
    profile: Annotated[str, one_of(*PROFILES)] = "paper"  # paper | quick | tiny
    w_bits: Annotated[int, BITS] = 4  # weight bits
    a_bits: Annotated[int, BITS] = 4  # activation bits
    seed: Annotated[int, SEED] = 0  # seeds every random draw of the run
    device: Annotated[str, one_of(*DEVICES)] = "auto"  # auto | cpu | cuda
    laws: bool = True  # Table 3 switch: L_LAWS^C in step 1
    layered_bns: bool = True  # Table 3 switch: L_L-BNS^C (else the plain Eq. 3) in step 1
    mkd: bool = True  # Table 3 switch: mixup knowledge distillation (else plain KD)
    bns_norm: Annotated[str, one_of("mse", "l2")] = "mse"  # BNS distance: the lineage's mean square ('mse') or Eq. 3's L2 ('l2')
    channels_last: Annotated[bool | str, one_of(True, False, "auto")] = "auto"  # NHWC convolutions (speed only, same maths); auto: where faster (texq.util.device)
    cuda_graphs: bool = True  # on CUDA, replay each training step as one CUDA graph: speed only, same maths
    tf32: bool = False  # TF32 CUDA convolutions: faster, 10-bit-mantissa products (off: float32)
    precision: Annotated[str, one_of(*PRECISIONS)] = "float32"  # steps 2-3: bf16 convolutions/matmuls, quantizers and BN float32 (not yet measured on a GPU)
    compile: bool = False  # steps 2-3's passes through torch.compile (inductor): fewer, fused kernels; speed only
    quant: QuantOptions = field(default_factory=QuantOptions)  # quantizer options; the bits are above
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
        check_fields(self, "")
        if METHOD_SPECS[self.method].real_images and not self.train_data:
            raise ConfigError(f"method {self.method!r} needs train_data (real training images)")
        if self.train_data and _same_data(self.train_data, self.data):
            raise ConfigError(f"train_data={self.train_data!r} names the evaluation images "
                              f"(data={self.data!r}): test images are for the final score only")
        check_weights(self.model, self.pretrained, self.checkpoint)
        check_switches(self)
        for key, value in METHOD_SPECS[self.method].fixed.items():  # what the method always uses
            section, _, name = key.rpartition(".")
            if section:
                object.__setattr__(self, section, replace(getattr(self, section), **{name: value}))
            else:
                object.__setattr__(self, name, value)

    def quant_config(self) -> QuantConfig:
        """The quantizer's configuration: the ``quant`` options at the run's bit widths."""
        return self.quant.with_bits(self.w_bits, self.a_bits)

    @classmethod
    def for_profile(cls, profile: str = "paper", info: ModelInfo | None = None,
                    overrides: Mapping[str, object] | None = None, **kwargs) -> "RunConfig":
        """A config whose method settings are those of ``profile`` for the model ``info`` describes
        (default: the info of ``model``, from the registry, or from the model a factory spec
        builds); ``kwargs`` (top-level keys) and ``overrides`` (dotted keys or sections:
        ``{'finetune.alpha6': 10}``) override them, each checked against its annotated type. A
        module of one's own gives ``info=module.texq_info``: ``model`` then defaults to its
        factory, else its name."""
        if profile not in PROFILES:
            raise ConfigError(f"profile={profile!r}: expected one of {', '.join(PROFILES)}")
        given = merge(nest(kwargs), nest(overrides or {}))
        if info is None:
            info = model_info(check_value("model", given.get("model", cls.model), str))
        given.setdefault("model", info.factory or info.name)
        profiled = profile_settings(profile, info)
        cfg = build(cls, merge(profiled, {"profile": profile}, given))
        profiled_keys = leaves(profiled)
        refuse_replaced(cfg.method, leaves(given), lambda key: _default(cls, profiled_keys, key))
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)


def _default(cls, profiled: dict, key: str):
    """The value of dotted ``key`` that a config of ``cls`` takes unless given: the profile's, else
    the field's default."""
    if key in profiled:
        return profiled[key]
    section, _, name = key.rpartition(".")
    f = {f.name: f for f in fields(cls)}[section or name]
    return getattr(f.default_factory(), name) if section else f.default


def _same_data(a: str, b: str) -> bool:
    """Whether two data specs name the same files (a named set's train split differs from data)."""
    from texq.data.sets import TORCHVISION_SETS

    if a in TORCHVISION_SETS or b in TORCHVISION_SETS:
        return False  # a named set's training split is read for train_data, its test split for data
    return Path(a).resolve() == Path(b).resolve()


PROFILE_SETTINGS: dict[str, dict] = {
    "paper": {},
    # finishes on a 2-core CPU in under 15 minutes for ResNet-20 (same losses, shorter schedules)
    # (chosen on the JPEG dev set only; see docs/interpretation.md, "Profiles")
    "quick": {
        "calibration": {"iters": 500, "warmup_iters": 50},
        "generator": {"lr_step_epochs": 10_000},
        # KL per sample ('batchmean'): 10x the lineage's scale on CIFAR-10, as the quick settings
        # were chosen and measured (see docs/interpretation.md, "Profiles")
        "finetune": {"warmup_epochs": 2, "epochs": 8, "iters_per_epoch": 100, "batch_size": 64,
                     "act_calib_epochs": 1, "lr": 1e-5, "kd_reduction": "batchmean"},
        "distill": {"iters": 200},
    },
    # seconds, for tests and pipeline checks: not for results
    "tiny": {
        "calibration": {"iters": 6, "warmup_iters": 2},
        "finetune": {"warmup_epochs": 1, "epochs": 2, "iters_per_epoch": 2, "batch_size": 16,
                     "act_calib_epochs": 1, "calib_per_batch": 4},
        "distill": {"num_images": 16, "iters": 3, "batch_size": 16},
    },
}


def profile_settings(profile: str, info: ModelInfo) -> dict:
    """The settings ``profile`` gives a model that ``info`` describes, as nested sections."""
    tree = PROFILE_SETTINGS[profile]
    if info.num_classes > 100:
        # e.g. ImageNet's 1000 classes: step 1 in chunks of 100 (same result, ~1/10 memory)
        tree = merge(tree, {"calibration": {"classes_per_step": 100}})
    if profile == "paper" and info.imagenet_scale:
        # the paper's ImageNet batch; the lineage's (FDDA) ImageNet learning rate of Q
        tree = merge(tree, {"finetune": {"batch_size": 16, "lr": 1e-6}})
    return tree


SPEED_ONLY = ("device", "cuda_graphs", "channels_last", "compile")  # settings that leave the maths as it is
#: settings added after runs were made: at these values they leave a fingerprint as it was
LATER_DEFAULTS = {("precision",): "float32", ("finetune", "mix_slots"): "all"}


def fingerprint(cfg: RunConfig) -> str:
    """What identifies a run's results (the device and the speed-only settings do not)."""
    d = cfg.to_dict()
    for speed_only in SPEED_ONLY:
        d.pop(speed_only)
    for (*section, key), value in LATER_DEFAULTS.items():
        where = d
        for name in section:
            where = where[name]
        if where.get(key) == value:
            where.pop(key)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]
