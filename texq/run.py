"""``texq.run(config)``: one full quantization run (TexQ or a baseline), resumable.

Stages and their files under ``out``:
  config.json         the run's configuration and its float model (a rerun must match both: ModelInfo,
                      architecture and weights digests), the settings in effect, the layers left in float
  calibration.pt      step 1: calibration images, labels and per-class centers   (texq)
  distilled.pt        ZeroQ's BNS-distilled images                                  (zeroq)
  checkpoint.pt       steps 2-3 state after the last completed epoch (G, Q, optimisers, RNG)
  history.jsonl       one line of loss terms per epoch
  generator.pt        the trained generator
  qmodel.pt           the quantized model of the final epoch
  metrics.json        final-epoch top-1 on the evaluation set (never a best-of-test epoch)
Test images are read for the final score only. The steps live in ``texq.step1``,
``texq.training`` and ``texq.report`` (the pipeline's stages call them one at a time). The float
model is ``cfg.model`` (a registry name or a ``module:callable`` factory) or a module of one's own.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from torch import nn

from texq.artifacts import save_quantized
from texq.config import RunConfig, fingerprint
from texq.data import load_eval_data
from texq.errors import ConfigError
from texq.io import write_json
from texq.methods import effective_settings
from texq.models import check_model, create_model, get_info, is_registered, load_checkpoint
from texq.models.user import architecture_digest, model_record
from texq.report import evaluate_stage, texture_report
from texq.step1 import synthesize_stage
from texq.training import train_stage

log = logging.getLogger("texq")


def _float_model(cfg: RunConfig, model: nn.Module | None) -> nn.Module:
    """F: ``cfg.model`` built, or ``model`` (which ``cfg.model`` must name) with ``cfg.checkpoint``
    loaded into it if set."""
    if model is None:
        return create_model(cfg.model, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint)
    info = get_info(model)
    if cfg.model not in (info.name, info.factory):
        raise ConfigError(f"the config's model is {cfg.model!r} but the module given is "
                          f"{info.name!r} (its texq_info): build the config with "
                          f"RunConfig.for_profile(..., info=module.texq_info)")
    if cfg.pretrained:
        raise ConfigError("pretrained=True with a module given: texq uses the module's own weights "
                          "(or cfg.checkpoint's)")
    if info.factory is None and is_registered(info.name) and (
            architecture_digest(model) != architecture_digest(create_model(info.name))):
        raise ConfigError(f"the module given is named {info.name!r} but is not that registry "
                          f"model's architecture: give it a name of its own in its texq_info")
    if cfg.checkpoint is not None:
        load_checkpoint(model, cfg.checkpoint, cfg.model)
    return model.eval()


def _difference(before, now) -> str:
    """'field a vs b' for each field two recorded dicts differ in; 'a vs b' for two values."""
    if isinstance(before, dict) and isinstance(now, dict):
        return ", ".join(f"{k} {before.get(k)} vs {now.get(k)}" for k in sorted(before.keys() | now.keys())
                         if before.get(k) != now.get(k))
    return f"{before} vs {now}"


def _prepare_out(out: Path, cfg: RunConfig, model: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.json"
    fp = fingerprint(cfg)
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("fingerprint") != fp:
            raise ConfigError(f"{out} holds a run with another configuration (fingerprint "
                              f"{old.get('fingerprint')} vs {fp}): use another --out or delete it")
        now = json.loads(json.dumps(model))  # as config.json holds it (tuples as lists)
        before = old.get("model", now)  # runs of texq 0.1 recorded no model
        for key in ("info", "architecture", "weights"):
            if before[key] != now[key]:
                raise ConfigError(f"{out} holds a run of another model ({key}: "
                                  f"{_difference(before[key], now[key])}): use another --out or "
                                  f"delete it")
    else:
        write_json(path, {"fingerprint": fp, "config": cfg.to_dict(), "model": model,
                          "effective": effective_settings(cfg)})


def run(cfg: RunConfig, out: str | Path, progress: bool = True, model: nn.Module | None = None) -> dict:
    """Run ``cfg`` writing into ``out``; resumes from what ``out`` already holds. ``model``: a float
    module of one's own carrying its ``texq_info``, used in place of building ``cfg.model``
    (which names it: ``RunConfig.for_profile(..., info=model.texq_info)``); texq puts it in eval
    mode and on the run's device, and loads ``cfg.checkpoint`` into it if set."""
    start = time.perf_counter()
    out = Path(out)
    fp_model = _float_model(cfg, model)
    check_model(fp_model, cfg.model)  # no BatchNorm: refused before any long work
    record = model_record(fp_model)
    if record["unquantized"]:
        log.warning("%s: %d layer(s) with weights stay in float (texq quantizes Conv2d and Linear): %s",
                    cfg.model, len(record["unquantized"]),
                    ", ".join(f"{u['name'] or '<model>'} ({u['type']})" for u in record["unquantized"]))
    eval_data = load_eval_data(cfg.data, fp_model.texq_info)  # fail on bad data before the long work
    _prepare_out(out, cfg, record)
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
