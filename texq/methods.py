"""What each method does with a run's settings, applied: ``texq.config.METHOD_SPECS`` says which
Table 3 switches and config sections a method uses and which settings it fixes.

``texq`` uses everything. ``gdfq`` is GDFQ's generator (CE + 0.1 x BNS, no center losses), plain
KD, no calibration set. ``zeroq`` distils images and calibrates ranges, nothing else. ``real``
fine-tunes on real images, with or without mixup KD. A run records the settings in effect
(:func:`effective_settings`), never a switch it ignored; a switch turned off for a method that has
no such module is refused (``texq.config.check_switches``, for every RunConfig), so that no two runs differ only by a setting
that was never applied.
"""

from __future__ import annotations

from texq.config import METHOD_SPECS, SECTIONS, SWITCHES, RunConfig, check_switches
from texq.keys import flatten, with_overrides


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
