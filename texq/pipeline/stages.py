"""The pipeline's stages (``dvc.yaml``): each reads ``params.yaml``, calls ``texq``, writes its outs.

    teacher    the full-precision model on the evaluation set        -> teacher.json
    synthesize step 1: calibration set and centers (ZeroQ: distilled) -> step1.pt
    train      steps 2-3: generator and quantized model             -> train/ (qmodel.pt, ...)
    evaluate   final-epoch top-1, per-class top-1, texture stats    -> metrics.json

Each stage's results equal those of ``texq run`` with the same configuration: the same functions
run in the same order with the same seeds. Outputs are written atomically; ``train`` checkpoints
each epoch under ``<out>/.work/`` (not a DVC out) and a rerun after a kill resumes from there.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

log = logging.getLogger("texq")
STAGES = ("teacher", "synthesize", "train", "evaluate")


def run_stage(name: str, params_file="params.yaml", out="out/pipeline", device: str = "auto",
              progress: bool = True) -> dict:
    """Run one stage by name (what ``texq stage NAME`` and the Prefect tasks call). Each stage is
    the module ``texq.pipeline.<name>``, imported alone: it loads only the code its dvc.yaml deps
    name (tests/test_dvc_deps.py)."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}: expected one of {', '.join(STAGES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log.info("stage %s: %s -> %s", name, params_file, out)
    return importlib.import_module(f"texq.pipeline.{name}").run(params_file, out, device, progress)
