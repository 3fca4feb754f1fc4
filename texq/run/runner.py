"""``texq.run.run(config, out)``: one whole quantization run (TexQ or a baseline), resumable.

The same steps as the pipeline's stages, in one process and over the same files
(``texq.run.layout``): teacher -> synthesize (step 1) -> train (steps 2-3) -> evaluate, each skipped
when its output is there, the training resuming after its last completed epoch. ``config.json``
records the configuration and the float model (its ModelInfo, architecture and weights digests),
the settings in effect and the layers left in float; a rerun into the same folder must match both.
Test images are read for the final scores only. The float model is ``cfg.model`` (a registry name
or a ``module:callable`` factory) or a module of one's own.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from torch import nn

from texq.data import load_eval_data
from texq.models import check_model
from texq.models.user import model_record
from texq.run import evaluate, synthesize, teacher, train
from texq.run.config import SPEED_ONLY, RunConfig, fingerprint
from texq.run.layout import Layout
from texq.run.model import float_model
from texq.run.records import finish_step, run_record
from texq.util.device import resolve_device
from texq.util.errors import ConfigError
from texq.util.io import read_json, write_json
from texq.util.keys import leaves
from texq.util.lock import folder_lock

log = logging.getLogger("texq")


def _difference(before, now) -> str:
    """'field a vs b' for each field two recorded dicts differ in; 'a vs b' for two values."""
    if isinstance(before, dict) and isinstance(now, dict):
        return ", ".join(f"{k} {before.get(k)} vs {now.get(k)}" for k in sorted(before.keys() | now.keys())
                         if before.get(k) != now.get(k))
    return f"{before} vs {now}"


def _prepare_out(layout: Layout, cfg: RunConfig, model: dict) -> None:
    layout.root.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(cfg)
    if layout.config.exists():
        old = read_json(layout.config)
        if old.get("fingerprint") != fp:
            before, now = (leaves(c) for c in (old.get("config") or {}, json.loads(json.dumps(cfg.to_dict()))))
            for key in SPEED_ONLY:  # not part of the fingerprint
                before.pop(key, None), now.pop(key, None)
            raise ConfigError(f"{layout.root} holds a run with another configuration "
                              f"({_difference(before, now) or 'fingerprint ' + str(old.get('fingerprint'))}): "
                              f"use another --out or delete it")
        now = json.loads(json.dumps(model))  # as config.json holds it (tuples as lists)
        before = old.get("model", now)  # runs of texq 0.1 recorded no model
        for key in ("info", "architecture", "weights"):
            if before[key] != now[key]:
                raise ConfigError(f"{layout.root} holds a run of another model ({key}: "
                                  f"{_difference(before[key], now[key])}): use another --out or "
                                  f"delete it")
    else:
        write_json(layout.config, run_record(cfg, model))


def run(cfg: RunConfig, out: str | Path, progress: bool = True, model: nn.Module | None = None) -> dict:
    """Run ``cfg`` writing into ``out``; resumes from what ``out`` already holds. ``model``: a float
    module of one's own carrying its ``texq_info``, used in place of building ``cfg.model``
    (which names it: ``RunConfig.for_profile(..., info=model.texq_info)``); texq puts it in eval
    mode and on the run's device, and loads ``cfg.checkpoint`` into it if set."""
    layout = Layout(out)
    resolve_device(cfg.device)  # 'cuda' without a CUDA device: refused before the folder is touched
    fp_model = float_model(cfg, model)
    check_model(fp_model, cfg.model)  # no BatchNorm: refused before any long work
    record = model_record(fp_model)
    if record["unquantized"]:
        log.warning("%s: %d layer(s) with weights stay in float (texq quantizes Conv2d and Linear): %s",
                    cfg.model, len(record["unquantized"]),
                    ", ".join(f"{u['name'] or '<model>'} ({u['type']})" for u in record["unquantized"]))
    data = load_eval_data(cfg.data, fp_model.texq_info)  # fail on bad data before the long work
    with folder_lock(layout.root, "a texq run"):  # one run at a time writes into a folder
        _prepare_out(layout, cfg, record)
        layout.verify()  # a damaged file is refused, never reused
        if layout.metrics.exists():
            log.info("%s already holds a finished run", layout.root)
            return read_json(layout.metrics)
        if teacher.teacher_top1(layout, cfg, len(data)) is None:
            teacher.step(cfg, fp_model, layout, progress, data=data)
            finish_step(layout, "teacher", cfg)
        if not layout.step1.exists():
            synthesize.step(cfg, fp_model, layout, progress)
            finish_step(layout, "synthesize", cfg)
        if not layout.train.exists():
            train.step(cfg, fp_model, layout, progress)
            finish_step(layout, "train", cfg)
        result = evaluate.step(cfg, fp_model, layout, progress, data=data)
        finish_step(layout, "evaluate", cfg)
        return result
