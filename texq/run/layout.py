"""Where a run's files live: one layout for a ``texq run --out`` folder and the pipeline's
``out/pipeline`` (each pipeline stage writes one step's files, ``texq run`` all of them).

    config.json      texq run only: the run's configuration and float model (a rerun must match)
    teacher.json     teacher:    F's top-1 on the evaluation set (with what it was scored on)
    step1.pt         synthesize: step 1's images (TexQ: calibration set and centers; ZeroQ:
                                 distilled images); {"images": None} for a method without step 1
    train/           train:      qmodel.pt (the final epoch's quantized model), generator.pt,
                                 history.jsonl (a line per epoch), summary.json; appears whole
    .work/           train's checkpoint after each epoch (a rerun resumes from it; not an output)
    history.json     the history as one array (dvc.yaml's loss plot)
    metrics.json     evaluate:   final scores, settings in effect, texture statistics
    per_class.json   evaluate:   per-class top-1 (dvc.yaml's per-class plot)
    figures/         the pictures of a finished run (texq.run.figures)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from texq.method.calibration import CalibrationSet
from texq.util.io import load_torch

FILES = {  # a Layout's attribute -> its path under the run folder (the table above)
    "config": "config.json", "teacher": "teacher.json", "step1": "step1.pt", "train": "train",
    "qmodel": "train/qmodel.pt", "generator": "train/generator.pt",
    "history": "train/history.jsonl", "summary": "train/summary.json",
    "history_plot": "history.json", "metrics": "metrics.json", "per_class": "per_class.json",
    "figures": "figures",
}


@dataclass(frozen=True)
class Layout:
    """The files of the run in ``root``: ``Layout(root).qmodel`` is ``root/train/qmodel.pt``, and
    so for every name of ``FILES``."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def __getattr__(self, name: str) -> Path:
        if name in FILES:
            return self.root / FILES[name]
        raise AttributeError(f"a run's layout has no file {name!r} (expected one of {', '.join(FILES)})")

    def work(self, name: str) -> Path:
        """A folder of unfinished work (checkpoints), under ``.work/``."""
        return self.root / ".work" / name

    def step1_images(self):
        """Step 1's images (None for a method without step 1, or before step 1 ran)."""
        return load_torch(self.step1).get("images") if self.step1.exists() else None

    def calibration_set(self) -> CalibrationSet:
        return CalibrationSet.from_dict(load_torch(self.step1))
