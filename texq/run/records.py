"""What every run path writes beside its steps' outputs, ``texq run`` and the pipeline's stages
alike: the digests of what each step wrote (``digests.json``, via ``Layout.record``; ``texq run``
only, DVC hashes the stages' outputs itself) and, once a run is evaluated, its pictures
(``figures/``, where matplotlib is installed), drawn from the files whether or not a tracker
records them."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from texq.run.config import RunConfig, fingerprint
from texq.run.layout import Layout
from texq.run.methods import effective_settings

log = logging.getLogger("texq")
# a step (the pipeline's stage of that name) -> the Layout names of the outputs it writes
STEP_OUTPUTS = {"teacher": ("teacher",), "synthesize": ("step1",), "train": ("train", "history_plot"),
                "evaluate": ("metrics", "per_class")}


def run_record(cfg: RunConfig, model: dict) -> dict:
    """``config.json``'s content: the configuration, its fingerprint, the float model (its
    ModelInfo, architecture and weights digests: ``texq.models.user.model_record``) and the
    settings in effect."""
    return {"fingerprint": fingerprint(cfg), "config": cfg.to_dict(), "model": model,
            "effective": effective_settings(cfg)}


def finish_step(layout: Layout, step: str, cfg: RunConfig, digests: bool = True) -> None:
    """After ``step`` wrote its outputs: their digests, and after ``evaluate`` the pictures.
    ``digests=False`` for the pipeline's stages: DVC keeps their hashes (dvc.lock) and restores
    outputs from its cache without running a step, so digests a step wrote could go stale."""
    if digests:
        layout.record(*STEP_OUTPUTS[step])
    if step == "evaluate":
        draw_pictures(layout, cfg)


def draw_pictures(layout: Layout, cfg: RunConfig) -> list[Path]:
    """The run's pictures (``texq.run.figures.run_pictures``) into ``figures/``; none where
    matplotlib is not installed (it comes with ``texq[pipeline]``)."""
    if importlib.util.find_spec("matplotlib") is None:
        log.info("%s: no pictures drawn (matplotlib is not installed: pip install 'texq[pipeline]')",
                 layout.root)
        return []
    from texq.run.figures import run_pictures

    try:
        return run_pictures(layout, cfg)
    except (OSError, RuntimeError, ValueError) as exc:  # the scores are written: pictures are extra
        log.warning("%s: the pictures were not drawn (%s: %s); the run's results are unaffected",
                    layout.root, type(exc).__name__, exc)
        return []


def pictures(layout: Layout, cfg: RunConfig) -> list[Path]:
    """The run's pictures: those in ``figures/`` when they were drawn after ``metrics.json`` was
    written (they show it), else drawn now (a run evaluated before, or outputs restored by DVC)."""
    drawn = sorted(layout.figures.glob("*.png")) if layout.figures.is_dir() else []
    if drawn and min(p.stat().st_mtime_ns for p in drawn) >= layout.metrics.stat().st_mtime_ns:
        return drawn
    return draw_pictures(layout, cfg)
