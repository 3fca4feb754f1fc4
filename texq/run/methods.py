"""The method table: what TexQ and each baseline does in a run, the one place that says it.

``texq`` uses everything. ``gdfq`` is GDFQ's generator (CE + 0.1 x BNS, no center losses), plain
KD, no calibration set. ``zeroq`` distils images and calibrates activation ranges on them, nothing
else. ``real`` fine-tunes on real images, with or without mixup KD. The steps read a method's
:class:`MethodSpec` and never its name. A run records the settings in effect
(:func:`effective_settings`; a RunConfig holds the values its method fixes), never a switch it ignored; a switch turned off for a method that has
no such module is refused (:func:`check_switches`, for every RunConfig), so that no two runs differ
only by a setting that was never applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from texq.method.calibration import synthesize
from texq.method.distill import distill_images
from texq.util.errors import ConfigError
from texq.util.keys import flatten

SWITCHES = ("laws", "layered_bns", "mkd")  # Table 3's module switches (RunConfig keys)
SECTIONS = ("calibration", "generator", "finetune", "distill")  # method sections of RunConfig
# a run's RunConfig (texq.run.config, which reads this table: not imported here), F, the device,
# whether to show progress -> what step1.pt holds
Step1 = Callable[[object, nn.Module, torch.device, bool], dict]


def calibration_set(cfg, model: nn.Module, device: torch.device, progress: bool) -> dict:
    """TexQ's step 1 (Eq. 10): one calibration image per class and the class centers."""
    return synthesize(model, cfg.calibration, cfg.laws, cfg.layered_bns, device, cfg.seed, progress,
                      cfg.bns_norm, cfg.cuda_graphs).to_dict()


def distilled_images(cfg, model: nn.Module, device: torch.device, progress: bool) -> dict:
    """ZeroQ's step 1: images distilled from noise with the BNS loss alone (Eq. 3)."""
    return {"images": distill_images(model, cfg.distill, device, cfg.seed, progress,
                                     cfg.bns_norm).cpu()}


@dataclass(frozen=True)
class MethodSpec:
    switches: tuple[str, ...]  # the Table 3 switches the method honours
    sections: tuple[str, ...]  # the config sections it reads
    fixed: dict[str, object] = field(default_factory=dict)  # dotted key -> the value it always uses
    why: str = ""  # what the method lacks, for errors about the switches it ignores
    step1: Step1 | None = None  # what step 1 computes into step1.pt; None: no step 1
    step1_images: str = ""  # what step 1's images are, as figures and reports title them
    fine_tunes: bool = True  # steps 2-3 train Q; False: activation ranges set on step 1's images
    uses_calibration_set: bool = False  # step 1's images and centers join steps 2-3 (Eq. 8, 11, 14)
    real_images: bool = False  # Q learns from real training images instead of a generator


METHOD_SPECS: dict[str, MethodSpec] = {
    "texq": MethodSpec(SWITCHES, ("calibration", "generator", "finetune"),
                       step1=calibration_set, step1_images="calibration images",
                       uses_calibration_set=True),
    "gdfq": MethodSpec((), ("generator", "finetune"),
                       {"mkd": False, "generator.alpha3": 0.1, "generator.alpha4": 0.0,
                        "generator.alpha5": 0.0},  # GDFQ: CE + 0.1 BNS, plain KD
                       "GDFQ has no calibration set (no L_LAWS, no layered BNS) and uses plain KD"),
    "zeroq": MethodSpec((), ("distill",), {},
                        "ZeroQ only distils images and calibrates ranges (no step 1, no fine-tuning)",
                        step1=distilled_images, step1_images="distilled images", fine_tunes=False),
    "real": MethodSpec(("mkd",), ("finetune",), {},
                       "the real-data baseline fine-tunes on real images (no step 1)",
                       real_images=True),
}
METHODS = tuple(METHOD_SPECS)  # texq | gdfq | zeroq | real


def spec(cfg) -> MethodSpec:
    return METHOD_SPECS[cfg.method]


def check_switches(cfg) -> None:
    """Refuse a switch turned off for a method that has no such module (a one-line ConfigError)."""
    s = spec(cfg)
    off = [w for w in SWITCHES if w not in s.switches and getattr(cfg, w) is False
           and s.fixed.get(w) is not False]
    if off:
        raise ConfigError(f"{', '.join(f'{w}=false' for w in off)} with method {cfg.method!r}: "
                          f"{s.why}, so the switch would change nothing; leave it true")


def refuse_replaced(method: str, given: dict[str, object], default: Callable[[str], object]) -> None:
    """Refuse a value given (a flat dict of dotted keys) for a setting that ``method`` always fixes,
    unless it is the method's own value or the setting's default (a params.yaml lists every key,
    at its default unless changed): one ConfigError line instead of a value silently replaced."""
    s = METHOD_SPECS[method]
    for key, value in s.fixed.items():
        if key in given and given[key] != value and given[key] != default(key):
            raise ConfigError(f"{key}={given[key]!r} with method {method!r}: the method always uses "
                              f"{key}={value!r}; leave {key} out (or at its default, "
                              f"{default(key)!r}) or use method 'texq'")


def effective_settings(cfg) -> dict[str, object]:
    """The flat settings a run of ``cfg`` uses (its method's fixed values are applied when the
    config is made): the switches it has no module for as None (not applicable), the sections it
    never reads left out."""
    s = spec(cfg)
    flat = flatten(cfg)
    unused = [name for name in SECTIONS if name not in s.sections]
    flat = {k: v for k, v in flat.items() if k.split(".")[0] not in unused}
    for w in SWITCHES:
        if w not in s.switches and w not in s.fixed:
            flat[w] = None
    return flat
