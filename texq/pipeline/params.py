"""``params.yaml`` -> ``RunConfig``: the pipeline's configuration, checked key by key.

The file has ``RunConfig``'s structure: its top-level settings at the top level (``profile``,
``model``, ``method``, ``w_bits``, ``seed``, the Table 3 switches, ...) and one section per stage
config (``quant`` without the bits, ``calibration``, ``generator``, ``finetune``, ``distill``), plus
the pipeline's own ``evaluate`` section. So a setting has one dotted key everywhere
(``finetune.alpha6``, ``w_bits``: ``texq run --set``, ``dvc exp run -S``, grids, MLflow params).
A key set to ``auto`` takes the profile's value (``paper``, ``quick`` or ``tiny``); any other value
overrides it. The device is the machine's (``--device``), not a parameter.
"""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path
from typing import get_type_hints

from texq.config import RunConfig
from texq.errors import ConfigError
from texq.keys import check_value, leaves, with_overrides

AUTO = "auto"
PIPELINE_SECTIONS = ("evaluate",)  # sections of the pipeline, not of RunConfig
EVALUATE_KEYS = ("batch_size", "register_model")
NOT_IN_FILE = {"device": "the device is the machine's: give --device to the stage",
               "quant.w_bits": "set the top-level w_bits (one source of truth for the bits)",
               "quant.a_bits": "set the top-level a_bits (one source of truth for the bits)"}
FIRST = ("model", "checkpoint", "pretrained")  # what a profile's defaults depend on or need


def load_params(path: str | Path = "params.yaml") -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return params


def _keyed_section(params: dict, name: str, keys: tuple[str, ...], source: str) -> dict:
    """Top-level section ``name`` (absent: empty), a mapping whose keys are among ``keys``."""
    section = params.get(name) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: {name}: expected a mapping")
    bad = set(section) - set(keys)
    if bad:
        raise ConfigError(f"{source}: {name}.{sorted(bad)[0]}: unknown key (expected one of "
                          f"{', '.join(keys)})")
    return section


def eval_batch_size(params: dict, source: str = "params.yaml") -> int:
    """``evaluate.batch_size`` of a parsed params.yaml (default 256), checked."""
    size = _keyed_section(params, "evaluate", EVALUATE_KEYS, source).get("batch_size", 256)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"{source}: evaluate.batch_size={size!r}: expected a positive integer")
    return size


def register_model(params: dict, source: str = "params.yaml") -> bool:
    """``evaluate.register_model`` of a parsed params.yaml, checked: whether a tracked pipeline run
    registers its quantized model in MLflow's model registry. ``auto`` (the default): runs of the
    ``paper`` profile only, so that quick and tiny runs (previews, tests) add no versions."""
    flag = _keyed_section(params, "evaluate", EVALUATE_KEYS, source).get("register_model", AUTO)
    if flag == AUTO:
        return params.get("profile", "paper") == "paper"
    if not isinstance(flag, bool):
        raise ConfigError(f"{source}: evaluate.register_model={flag!r}: expected auto, true or false")
    return flag


def run_config(params: dict, source: str = "params.yaml") -> RunConfig:
    """The RunConfig that ``params`` (a parsed params.yaml) describes; errors name the file and
    the key. The ``evaluate`` section is checked here too (``eval_batch_size`` reads it)."""
    eval_batch_size(params, source)
    register_model(params, source)
    names = {f.name for f in fields(RunConfig)}
    for key in sorted(set(params) - names - set(PIPELINE_SECTIONS)):  # empty sections too
        raise ConfigError(f"{source}: unknown config key {key!r} (expected one of "
                          f"{', '.join(sorted(names | set(PIPELINE_SECTIONS)))})")
    flat = leaves({k: v for k, v in params.items() if k not in PIPELINE_SECTIONS})
    for key, why in NOT_IN_FILE.items():
        if key in flat:
            raise ConfigError(f"{source}: {key}: not a params.yaml key ({why})")
    flat = {k: v for k, v in flat.items() if v != AUTO}
    hints = get_type_hints(RunConfig)
    first = {k: check_value(f"{source}: {k}", flat.pop(k), hints[k]) for k in FIRST if k in flat}
    try:
        cfg = RunConfig.for_profile(check_value("profile", flat.pop("profile", "paper"), str), **first)
        return with_overrides(cfg, flat)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc


def read_stage_params(params_file: str | Path, device: str) -> tuple[RunConfig, int]:
    """The stage's RunConfig and evaluation batch size, from one read of the params file."""
    params = load_params(params_file)
    cfg = replace(run_config(params, str(params_file)), device=device)
    return cfg, eval_batch_size(params, str(params_file))


def stage_config(params_file: str | Path, device: str = "auto") -> RunConfig:
    return read_stage_params(params_file, device)[0]
