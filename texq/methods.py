"""What each method does with a run's settings: the one place that says which Table 3 switches
and config sections a method uses and which settings it fixes.

``texq`` uses everything. ``gdfq`` is GDFQ's generator (CE + 0.1 x BNS, no center losses), plain
KD, no calibration set. ``zeroq`` distils images and calibrates ranges, nothing else. ``real``
fine-tunes on real images, with or without mixup KD. A run records the settings in effect
(:func:`effective_settings`), never a switch it ignored; a switch turned off for a method that has
no such module is refused (:func:`check_switches`), so that no two runs differ only by a setting
that was never applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from texq.config import RunConfig
from texq.keys import flatten, with_overrides
from texq.errors import ConfigError

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


def check_switches(cfg: RunConfig) -> None:
    """Refuse a switch turned off for a method that has no such module (a one-line ConfigError)."""
    spec = METHOD_SPECS[cfg.method]
    off = [s for s in SWITCHES if s not in spec.switches and getattr(cfg, s) is False
           and spec.fixed.get(s) is not False]
    if off:
        raise ConfigError(f"{', '.join(f'{s}=false' for s in off)} with method {cfg.method!r}: "
                          f"{spec.why}, so the switch would change nothing; leave it true")


def applied(cfg: RunConfig) -> RunConfig:
    """``cfg`` with the settings its method fixes (GDFQ's generator weights and plain KD)."""
    check_switches(cfg)
    fixed = METHOD_SPECS[cfg.method].fixed
    return with_overrides(cfg, fixed) if fixed else cfg


def effective_settings(cfg: RunConfig) -> dict[str, object]:
    """The flat settings a run of ``cfg`` uses: its method's fixed values applied, the switches it
    has no module for as None (not applicable), the stage sections it never reads left out."""
    spec = METHOD_SPECS[cfg.method]
    flat = flatten(applied(cfg))
    unused = [s for s in SECTIONS if s not in spec.sections]
    flat = {k: v for k, v in flat.items() if k.split(".")[0] not in unused}
    for s in SWITCHES:
        if s not in spec.switches and s not in spec.fixed:
            flat[s] = None
    return flat
