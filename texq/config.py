"""Typed configuration of a TexQ run: one dataclass per stage, and the profiles.

Defaults are the paper's values (section 4.1 and 4.3) where it gives them; the rest follow the code
the paper was built on (GDFQ / IntraQ / FDDA) -- see docs/interpretation.md. A profile changes
schedules, batch sizes and learning rates (docs/interpretation.md, "Profiles"), never which losses
are used; the quick profile also averages the KD term per sample (10x the lineage's scale on
CIFAR-10), the setting it was tuned and measured with.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from texq.errors import ConfigError
from texq.models import ModelInfo, is_registered, model_info
from texq.quant import QuantConfig, check_bits
from texq.texture import LawsLossConfig, TextureConfig

KD_REDUCTIONS = ("mean", "batchmean")  # KL over batch x classes (lineage) / per sample
PROFILES = ("paper", "quick", "tiny")
ACT_CALIB_AT = ("start", "end")  # the first / the last act_calib_epochs epochs of the warm-up
ACT_CALIB_INPUTS = ("generated", "batch")  # G's samples / Q's batch (G's + calibration images)


# What each method uses and fixes (texq.methods applies it; a RunConfig refuses a switch its
# method has no module for).
SWITCHES = ("laws", "layered_bns", "mkd")  # Table 3's module switches (RunConfig keys)
SECTIONS = ("calibration", "generator", "finetune", "distill")  # stage sections of RunConfig


@dataclass(frozen=True)
class MethodSpec:
    switches: tuple[str, ...]  # the Table 3 switches the method honours
    sections: tuple[str, ...]  # the stage sections it reads
    fixed: dict[str, object] = field(default_factory=dict)  # dotted key -> the value it always uses
    why: str = ""  # what the method lacks, for errors about the switches it ignores


METHOD_SPECS: dict[str, MethodSpec] = {
    "texq": MethodSpec(SWITCHES, ("calibration", "generator", "finetune")),
    "gdfq": MethodSpec((), ("generator", "finetune"),
                       {"mkd": False, "generator.alpha3": 0.1, "generator.alpha4": 0.0,
                        "generator.alpha5": 0.0},  # GDFQ: CE + 0.1 BNS, plain KD
                       "GDFQ has no calibration set (no L_LAWS, no layered BNS) and uses plain KD"),
    "zeroq": MethodSpec((), ("distill",), {},
                        "ZeroQ only distils images and calibrates ranges (no step 1, no fine-tuning)"),
    "real": MethodSpec(("mkd",), ("finetune",), {},
                       "the real-data baseline fine-tunes on real images (no step 1)"),
}
METHODS = tuple(METHOD_SPECS)  # texq | gdfq | zeroq | real


def check_switches(cfg: RunConfig) -> None:
    """Refuse a switch turned off for a method that has no such module (a one-line ConfigError)."""
    spec = METHOD_SPECS[cfg.method]
    off = [s for s in SWITCHES if s not in spec.switches and getattr(cfg, s) is False
           and spec.fixed.get(s) is not False]
    if off:
        raise ConfigError(f"{', '.join(f'{s}=false' for s in off)} with method {cfg.method!r}: "
                          f"{spec.why}, so the switch would change nothing; leave it true")


@dataclass(frozen=True)
class CalibrationConfig:
    """Step 1: one synthetic calibration image per class (Eq. 10), then the class centers."""

    images_per_class: int = 1  # the paper synthesises one calibration image per class
    classes_per_step: int = 0  # optimise this many classes at a time (0: all; same result, less memory)
    iters: int = 1500  # the paper's maximum number of iterations
    warmup_iters: int = 150  # first iterations at half lr and without L_LAWS (paper)
    lr: float = 0.05  # constant learning rate of the images (paper), Adam
    warmup_lr_factor: float = 0.5  # "half learning rate" during the warm-up (paper)
    alpha1: float = 2.0  # weight of the layered BNS loss L_L-BNS^C (paper's grid search)
    alpha2: float = 10.0  # weight of the cross-entropy L_CE^C (paper's grid search)
    shallow_weight: float = 0.2  # w_l of Eq. 7 for l < ceil(L/2) - 2 (paper)
    deep_weight: float = 1.1  # w_l of Eq. 7 for the deeper layers (paper)
    laws: LawsLossConfig = field(default_factory=LawsLossConfig)  # Eq. 6 (k, theta_U, theta_L, eps)
    texture: TextureConfig = field(default_factory=TextureConfig)  # how T is measured


@dataclass(frozen=True)
class GeneratorConfig:
    """Step 2: GDFQ's generator trained with Eq. 12."""

    latent_dim: int = 100  # GDFQ's noise size
    lr: float = 1e-3  # Adam, initial learning rate (paper)
    beta1: float = 0.5  # GDFQ's Adam betas
    beta2: float = 0.999
    lr_step_epochs: int = 100  # lr x0.1 every 100 epochs (paper)
    lr_gamma: float = 0.1  # the x0.1 (paper)
    alpha3: float = 0.4  # weight of the global BNS loss L_BNS^G (paper)
    alpha4: float = 0.02  # weight of the layered center loss L_L-BNS^G, Eq. 8 (paper)
    alpha5: float = 1.8  # weight of the distorted center loss L_D-BNS^G, Eq. 11 (paper)
    nu_mu: float = 0.5  # std of the noise on center means, Eq. 11 (paper)
    nu_sigma: float = 1.0  # std of the noise on center variances, Eq. 11 (paper)
    shallow_weight: float = 0.0  # w_l of Eq. 8/11 for l < ceil(L/2) - 2 (paper)
    deep_weight: float = 1.0  # w_l of Eq. 8/11 for the deeper layers (paper)


@dataclass(frozen=True)
class FinetuneConfig:
    """Step 3: the quantized model Q trained with Eq. 14 while G keeps learning."""

    warmup_epochs: int = 50  # G alone first (paper)
    epochs: int = 450  # then G and Q together (paper)
    iters_per_epoch: int = 200  # not in the paper; its lineage's value
    batch_size: int = 128  # generated samples per step: 128 CIFAR, 16 ImageNet (paper)
    lr: float = 1e-4  # Q's SGD (nesterov, momentum 0.9) learning rate, CIFAR value of GDFQ/IntraQ
    weight_decay: float = 1e-4  # GDFQ's
    alpha6: float = 20.0  # weight of the distillation loss, Eq. 14 (paper)
    kd_temperature: float = 20.0  # softmax temperature of the KL term (lineage: T = 20, x T^2)
    kd_reduction: str = "mean"  # KL averaged over batch x classes, as the lineage's nn.KLDivLoss()
    mixup_p: float = 0.2  # probability that a sample is mixed, Eq. 9 (paper)
    act_calib_epochs: int = 4  # activation ranges follow Q's inputs for this many warm-up epochs, then freeze
    act_calib_at: str = "start"  # which warm-up epochs observe: the first (GDFQ's rule) or the last
    act_calib_inputs: str = "generated"  # observe G's samples (GDFQ) or Q's training batch ("batch")
    calib_per_batch: int = 16  # calibration images added to each batch (FDDA uses 16)
    calib_augment: bool = True  # random resized crop + flip of calibration images (FDDA)
    calib_crop_scale: tuple[float, float] = (0.5, 1.0)  # crop area range: IntraQ's 0.5 for 32x32

    def __post_init__(self) -> None:
        if not 1 <= self.act_calib_epochs <= self.warmup_epochs:
            raise ConfigError(f"finetune.act_calib_epochs={self.act_calib_epochs} with warmup_epochs="
                              f"{self.warmup_epochs}: expected 1 <= act_calib_epochs <= warmup_epochs "
                              f"(ranges are observed during the warm-up; Q must train on frozen "
                              f"activation ranges, which its CUDA graph bakes in)")
        if self.act_calib_at not in ACT_CALIB_AT:
            raise ConfigError(f"finetune.act_calib_at={self.act_calib_at!r}: expected one of "
                              f"{', '.join(ACT_CALIB_AT)}")
        if self.act_calib_inputs not in ACT_CALIB_INPUTS:
            raise ConfigError(f"finetune.act_calib_inputs={self.act_calib_inputs!r}: expected one of "
                              f"{', '.join(ACT_CALIB_INPUTS)}")

    def observes(self, epoch: int) -> bool:
        """Whether activation ranges are observed in ``epoch`` (0-based; always a warm-up epoch)."""
        first = self.first_observed_epoch()
        return first <= epoch < first + self.act_calib_epochs

    def first_observed_epoch(self) -> int:
        return 0 if self.act_calib_at == "start" else self.warmup_epochs - self.act_calib_epochs


@dataclass(frozen=True)
class DistillConfig:
    """ZeroQ baseline: images distilled from noise with the BNS loss alone (Eq. 3)."""

    num_images: int = 256  # distilled images (two of GDFQ's batches)
    iters: int = 500  # ZeroQ's iterations
    lr: float = 0.5  # ZeroQ's / IntraQ's Adam learning rate on images
    batch_size: int = 128  # images optimised together


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs; ``RunConfig.for_profile`` fills the stage configs."""

    # registry name, 'module:callable' factory, or the ModelInfo name of a module given to texq.run
    model: str = "resnet20_cifar10"
    checkpoint: str | None = None  # weights of the full-precision model
    pretrained: bool = False  # or the published weights (registry models)
    data: str = "cifar10"  # evaluation set (test images: final score only)
    train_data: str | None = None  # real training images, method 'real' only
    method: str = "texq"  # texq | gdfq | zeroq | real
    profile: str = "paper"  # paper | quick | tiny
    w_bits: int = 4  # weight bits
    a_bits: int = 4  # activation bits
    seed: int = 0  # seeds every random draw of the run
    device: str = "auto"  # auto | cpu | cuda
    laws: bool = True  # Table 3 switch: L_LAWS^C in step 1
    layered_bns: bool = True  # Table 3 switch: L_L-BNS^C (else the plain Eq. 3) in step 1
    mkd: bool = True  # Table 3 switch: mixup knowledge distillation (else plain KD)
    bns_norm: str = "mse"  # BNS distance: the lineage's mean square ('mse') or Eq. 3's L2 ('l2')
    channels_last: bool | str = "auto"  # NHWC convolutions (speed only, same maths); auto: where faster (texq.device)
    cuda_graphs: bool = True  # on CUDA, replay each training step as one CUDA graph: speed only, same maths
    tf32: bool = False  # TF32 CUDA convolutions: faster, 10-bit-mantissa products (off: float32)
    quant: QuantConfig = field(default_factory=QuantConfig)  # quantizer options; bits from above
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r}: expected one of {', '.join(METHODS)}")
        if self.profile not in PROFILES:
            raise ConfigError(f"profile={self.profile!r}: expected one of {', '.join(PROFILES)}")
        if self.method == "real" and not self.train_data:
            raise ConfigError("method 'real' needs train_data (real training images)")
        if self.train_data and _same_data(self.train_data, self.data):
            raise ConfigError(f"train_data={self.train_data!r} names the evaluation images "
                              f"(data={self.data!r}): test images are for the final score only")
        if self.checkpoint is None and not self.pretrained and is_registered(self.model):
            raise ConfigError("give the model's weights: checkpoint=PATH or pretrained=True")
        if self.pretrained and not is_registered(self.model):
            raise ConfigError(f"pretrained=True: published weights exist for registry models only, "
                              f"not for {self.model!r} (a model of one's own comes with its weights)")
        ft = self.finetune
        if ft.kd_reduction not in KD_REDUCTIONS:
            raise ConfigError(f"finetune.kd_reduction={ft.kd_reduction!r}: expected one of {KD_REDUCTIONS}")
        if self.channels_last not in (True, False, "auto"):
            raise ConfigError(f"channels_last={self.channels_last!r}: expected true, false or auto")
        if self.bns_norm not in ("mse", "l2"):
            raise ConfigError(f"bns_norm={self.bns_norm!r}: expected 'mse' or 'l2'")
        check_switches(self)
        check_bits("w_bits", self.w_bits)
        check_bits("a_bits", self.a_bits)
        # the quantizer's bit widths are the run's (one source of truth for grids and logs)
        object.__setattr__(self, "quant", replace(self.quant, w_bits=self.w_bits, a_bits=self.a_bits))

    @classmethod
    def for_profile(cls, profile: str = "paper", info: ModelInfo | None = None, **kwargs) -> "RunConfig":
        """A config whose stage settings are those of ``profile`` for the model ``info`` describes
        (default: the info of ``model``, from the registry, or from the model a factory spec
        builds); kwargs override top-level keys. A module of one's own gives
        ``info=module.texq_info``: ``model`` then defaults to its factory, else its name."""
        if profile not in PROFILES:
            raise ConfigError(f"profile={profile!r}: expected one of {', '.join(PROFILES)}")
        stages = dict(PROFILE_STAGES[profile])
        if info is None:
            info = model_info(kwargs.get("model", cls.model))
        kwargs.setdefault("model", info.factory or info.name)
        if info.num_classes > 100:
            # e.g. ImageNet's 1000 classes: step 1 in chunks of 100 (same result, ~1/10 memory)
            calib = stages.get("calibration", CalibrationConfig())
            stages["calibration"] = replace(calib, classes_per_step=100)
        if profile == "paper" and info.imagenet_scale:
            # the paper's ImageNet batch; the lineage's (FDDA) ImageNet learning rate of Q
            stages["finetune"] = FinetuneConfig(batch_size=16, lr=1e-6)
        return cls(profile=profile, **{**stages, **kwargs})

    def to_dict(self) -> dict:
        return asdict(self)


def _same_data(a: str, b: str) -> bool:
    """Whether two data specs name the same files (a named set's train split differs from data)."""
    from texq.data.sets import TORCHVISION_SETS

    if a in TORCHVISION_SETS or b in TORCHVISION_SETS:
        return False  # a named set's training split is read for train_data, its test split for data
    return Path(a).resolve() == Path(b).resolve()


PROFILE_STAGES: dict[str, dict] = {
    "paper": {},
    # finishes on a 2-core CPU in under 15 minutes for ResNet-20 (same losses, shorter schedules)
    # (chosen on the JPEG dev set only; see docs/interpretation.md, "Profiles")
    "quick": {
        "calibration": CalibrationConfig(iters=500, warmup_iters=50),
        "generator": GeneratorConfig(lr_step_epochs=10_000),
        # KL per sample ('batchmean'): 10x the lineage's scale on CIFAR-10, as the quick settings
        # were chosen and measured (see docs/interpretation.md, "Profiles")
        "finetune": FinetuneConfig(warmup_epochs=2, epochs=8, iters_per_epoch=100, batch_size=64,
                                   act_calib_epochs=1, lr=1e-5, kd_reduction="batchmean"),
        "distill": DistillConfig(iters=200),
    },
    # seconds, for tests and pipeline checks: not for results
    "tiny": {
        "calibration": CalibrationConfig(iters=6, warmup_iters=2),
        "generator": GeneratorConfig(),
        "finetune": FinetuneConfig(warmup_epochs=1, epochs=2, iters_per_epoch=2, batch_size=16,
                                   act_calib_epochs=1, calib_per_batch=4),
        "distill": DistillConfig(num_images=16, iters=3, batch_size=16),
    },
}


def fingerprint(cfg: RunConfig) -> str:
    """What identifies a run's results (the device and the speed-only settings do not)."""
    d = cfg.to_dict()
    for speed_only in ("device", "cuda_graphs", "channels_last"):  # same maths either way
        d.pop(speed_only)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]
