"""``texq.run(config)``: one full quantization run (TexQ or a baseline), resumable.

Stages and their files under ``out``:
  config.json         the run's configuration (a rerun must match it) and the settings in effect
  calibration.pt      step 1: calibration images, labels and per-class centers   (texq)
  distilled.pt        ZeroQ's BNS-distilled images                                  (zeroq)
  checkpoint.pt       steps 2-3 state after the last completed epoch (G, Q, optimisers, RNG)
  history.jsonl       one line of loss terms per epoch
  generator.pt        the trained generator
  qmodel.pt           the quantized model of the final epoch
  metrics.json        final-epoch top-1 on the evaluation set (never a best-of-test epoch)
Test images are read for the final score only. The steps live in ``texq.step1``,
``texq.training`` and ``texq.report`` (the pipeline's stages call them one at a time).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from texq.artifacts import save_quantized
from texq.config import RunConfig, fingerprint
from texq.data import load_eval_data
from texq.errors import ConfigError
from texq.io import write_json
from texq.methods import effective_settings
from texq.models import create_model
from texq.report import evaluate_stage, texture_report
from texq.step1 import synthesize_stage
from texq.training import train_stage

log = logging.getLogger("texq")


def _prepare_out(out: Path, cfg: RunConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.json"
    fp = fingerprint(cfg)
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("fingerprint") != fp:
            raise ConfigError(f"{out} holds a run with another configuration (fingerprint "
                              f"{old.get('fingerprint')} vs {fp}): use another --out or delete it")
    else:
        write_json(path, {"fingerprint": fp, "config": cfg.to_dict(),
                          "effective": effective_settings(cfg)})


def run(cfg: RunConfig, out: str | Path, progress: bool = True) -> dict:
    """Run ``cfg`` writing into ``out``; resumes from what ``out`` already holds."""
    start = time.perf_counter()
    out = Path(out)
    fp_model = create_model(cfg.model, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint)
    eval_data = load_eval_data(cfg.data, fp_model.texq_info)  # fail on bad data before the long work
    _prepare_out(out, cfg)
    if (out / "metrics.json").exists():
        log.info("%s already holds a finished run", out)
        return json.loads((out / "metrics.json").read_text())
    pre = out / ("distilled.pt" if cfg.method == "zeroq" else "calibration.pt")
    if cfg.method in ("texq", "zeroq") and not pre.exists():
        synthesize_stage(cfg, fp_model, pre, progress)
    qmodel, generator, prior = train_stage(cfg, fp_model, pre, out, out, progress)
    save_quantized(out / "qmodel.pt", qmodel, {"method": cfg.method, "seed": cfg.seed})
    metrics = evaluate_stage(cfg, fp_model, qmodel, eval_data, progress)
    metrics.update(texture_report(cfg, fp_model.texq_info, pre, generator))
    metrics["seconds"] = round(prior + time.perf_counter() - start, 1)
    write_json(out / "metrics.json", metrics)
    return metrics
