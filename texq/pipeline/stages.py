"""The pipeline's stages (``dvc.yaml``): each runs one step of a run (``texq.run.<step>``) in its
own process, over ``out/pipeline`` laid out as a ``texq run`` folder (``texq.run.layout``).

    teacher    the full-precision model on the evaluation set        -> teacher.json
    synthesize step 1: calibration set and centers (ZeroQ: distilled) -> step1.pt
    train      steps 2-3: generator and quantized model             -> train/ (qmodel.pt, ...)
    evaluate   final-epoch top-1, per-class top-1, texture stats    -> metrics.json

The same step functions as ``texq run``, with the same seeds: the same results. Outputs are written
atomically; ``train`` checkpoints each epoch under ``<out>/.work/`` (not a DVC out) and a rerun
after a kill resumes from there; its final checkpoint stays until ``evaluate`` has scored ``train/``,
so that a rerun of ``train`` whose outputs DVC removed (a failure after the stage, a lost process)
trains nothing again. A stage holds ``<out>``'s lock while it runs (texq.util.lock): a
second stage process on the same folder (an orphan still running, a concurrent rerun) is refused.
"""

from __future__ import annotations

import logging
from pathlib import Path

from texq.pipeline.params import PipelineConfig
from texq.run.layout import Layout
from texq.run.model import float_model
from texq.run.records import finish_step
from texq.util.lock import folder_lock

log = logging.getLogger("texq")
STAGES = ("teacher", "synthesize", "train", "evaluate")
SCORING = ("teacher", "evaluate")  # the steps that score images, at evaluate.batch_size


def run_stage(name: str, config: PipelineConfig, out: str | Path = "out/pipeline",
              progress: bool = True) -> dict:
    """Run one stage by name (what ``texq stage NAME`` and the Prefect tasks call): the step
    ``texq.run.<name>``, imported alone, so that a stage loads only the code its dvc.yaml deps
    name (tests/pipeline/test_dvc_deps.py)."""
    if name == "teacher":
        from texq.run.teacher import step
    elif name == "synthesize":
        from texq.run.synthesize import step
    elif name == "train":
        from texq.run.train import step
    elif name == "evaluate":
        from texq.run.evaluate import step
    else:
        raise ValueError(f"unknown stage {name!r}: expected one of {', '.join(STAGES)}")
    layout = Layout(out)
    with folder_lock(layout.root, f"stage {name}"):  # one stage process at a time writes into out
        log.info("stage %s: texq.run.%s.step -> %s", name, name, layout.root)
        extra = {"batch_size": config.evaluate.batch_size} if name in SCORING else {}
        result = step(config.run, float_model(config.run), layout, progress, **extra)
        finish_step(layout, name, config.run, digests=False)  # after evaluate, the pictures
        return result
