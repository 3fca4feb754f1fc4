"""Where a run's files live: one layout for a ``texq run --out`` folder and the pipeline's
``out/pipeline`` (each pipeline stage writes one step's files, ``texq run`` all of them).

    config.json      texq run only: the run's configuration and float model (a rerun must match)
    teacher.json     teacher:    F's top-1 on the evaluation set (with what it was scored on)
    step1.pt         synthesize: step 1's images (TexQ: calibration set and centers; ZeroQ:
                                 distilled images); {"images": None} for a method without step 1
    train/           train:      qmodel.pt (the final epoch's quantized model), generator.pt,
                                 history.jsonl (a line per epoch), summary.json; appears whole
    .work/           train's checkpoint after each epoch (a rerun resumes from it; not an output),
                     the last one kept until evaluate has scored train/
    history.json     the history as one array (dvc.yaml's loss plot)
    metrics.json     evaluate:   final scores, settings in effect, texture statistics
    per_class.json   evaluate:   per-class top-1 (dvc.yaml's per-class plot)
    figures/         the pictures of a finished run (texq.run.records.draw_pictures, after evaluate)
    digests.json     texq run only: the SHA-256 of each file above as its step wrote it; a rerun,
                     a resume and ``texq export`` refuse a file that no longer matches
    .lock            while a run or a stage writes into the folder (texq.util.lock)
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from texq.method.calibration import CalibrationSet
from texq.util.errors import CheckpointError
from texq.util.io import file_digest, load_torch, read_json, write_json

TRAIN_FILES = {  # the train step's files: in train/, and as they are made under .work/
    "qmodel": "qmodel.pt", "generator": "generator.pt", "history": "history.jsonl",
    "summary": "summary.json", "checkpoint": "checkpoint.pt",
}
FILES = {  # a Layout's attribute -> its path under the run folder (the table above)
    "config": "config.json", "teacher": "teacher.json", "step1": "step1.pt", "train": "train",
    **{name: f"train/{file}" for name, file in TRAIN_FILES.items() if name != "checkpoint"},
    "history_plot": "history.json", "metrics": "metrics.json", "per_class": "per_class.json",
    "figures": "figures", "digests": "digests.json",
}


def train_file(folder: Path, name: str) -> Path:
    """The train step's file ``name`` (a TRAIN_FILES key) in ``folder``: train/ or a folder of
    unfinished work (``Layout.work``)."""
    return Path(folder) / TRAIN_FILES[name]


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

    def clear_work(self) -> None:
        """Remove ``.work/`` (checkpoints of finished or abandoned training), once the run's scores
        are written."""
        shutil.rmtree(self.root / ".work", ignore_errors=True)

    def step1_images(self):
        """Step 1's images (None for a method without step 1, or before step 1 ran)."""
        return load_torch(self.step1).get("images") if self.step1.exists() else None

    def calibration_set(self) -> CalibrationSet:
        return CalibrationSet.from_dict(load_torch(self.step1))

    def record(self, *names: str) -> None:
        """Add the digests of the files ``names`` (FILES keys; a folder: each file in it) to
        ``digests.json``, as they are now."""
        digests = self.recorded()
        for name in names:
            path = getattr(self, name)
            digests = {k: v for k, v in digests.items() if not (k + "/").startswith(FILES[name] + "/")}
            for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
                if f.is_file():
                    digests[f.relative_to(self.root).as_posix()] = file_digest(f)
        write_json(self.digests, digests)

    def recorded(self) -> dict[str, str]:
        """{relative path: sha256} of the files written so far ({} for a folder without records)."""
        return read_json(self.digests) if self.digests.is_file() else {}

    def verify(self, *names: str) -> None:
        """Every recorded file (under ``names`` only, if given) still has its digest; else a
        CheckpointError naming it and the remedy: remove the step's output (the file, or the
        folder holding it), which the next run redoes. A step's output removed whole is not an
        error: it is redone."""
        prefixes = tuple(FILES[n] for n in names)
        for rel, digest in self.recorded().items():
            if prefixes and not rel.startswith(prefixes):
                continue
            path, output = self.root / rel, self.root / rel.split("/")[0]
            if not output.exists():
                continue  # removed whole: the step is redone
            if not path.is_file():
                raise CheckpointError(f"{path}: missing from {output}: remove {output} and rerun "
                                      f"(the run redoes that step)")
            if file_digest(path) != digest:
                raise CheckpointError(f"{path}: damaged (its SHA-256 differs from the one recorded "
                                      f"when it was written): remove {output} and rerun (the run "
                                      f"redoes that step)")
