"""``params.yaml`` -> ``RunConfig``: the pipeline's configuration, checked key by key.

The file mirrors ``RunConfig``: top-level ``profile``, a ``run`` section (model, data, method, bits,
seed, Table 3 switches), ``quant`` (``QuantConfig`` without the bits), ``calibrate``
(``CalibrationConfig``), ``train`` with ``generator`` and ``finetune`` (``GeneratorConfig``,
``FinetuneConfig``), ``distill`` (``DistillConfig``) and ``evaluate``. A schedule key set to
``auto`` takes the profile's value (``paper``, ``quick`` or ``tiny``); any other value overrides it.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

from texq.config import (CalibrationConfig, DistillConfig, FinetuneConfig, GeneratorConfig,
                         RunConfig, check_value, with_overrides)
from texq.errors import ConfigError
from texq.quant import QuantConfig

AUTO = "auto"
# params.yaml section -> the RunConfig field it configures
SECTIONS: dict[str, tuple[str, type]] = {
    "calibrate": ("calibration", CalibrationConfig),
    "train.generator": ("generator", GeneratorConfig),
    "train.finetune": ("finetune", FinetuneConfig),
    "distill": ("distill", DistillConfig),
    "quant": ("quant", QuantConfig),
}
RUN_KEYS = ("model", "checkpoint", "pretrained", "data", "train_data", "method", "w_bits", "a_bits",
            "seed", "device", "laws", "layered_bns", "mkd", "bns_norm", "channels_last",
            "cuda_graphs", "tf32")
EVALUATE_KEYS = ("batch_size",)
NOT_IN_FILE = {"quant": ("w_bits", "a_bits")}  # one source of truth: run.w_bits / run.a_bits


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


def _section_overrides(where: str, section: Any, cls: type, prefix: str, skip=()) -> dict:
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} keys")
    defaults = cls()
    names = {f.name for f in fields(cls)} - set(skip)
    out: dict[str, Any] = {}
    for key, value in section.items():
        if key not in names:
            raise ConfigError(f"{where}.{key}: unknown key (expected one of {', '.join(sorted(names))})")
        default = getattr(defaults, key)
        if is_dataclass(default):
            out.update(_section_overrides(f"{where}.{key}", value, type(default), f"{prefix}{key}."))
        elif value != AUTO:
            out[f"{prefix}{key}"] = check_value(f"{where}.{key}", value, get_type_hints(cls)[key])
    return out


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


def run_config(params: dict, source: str = "params.yaml") -> RunConfig:
    """The RunConfig that ``params`` (a parsed params.yaml) describes; errors name the key.
    The ``evaluate`` section is checked here too (``eval_batch_size`` reads it)."""
    unknown = set(params) - {"profile", "run", "train", "evaluate", *SECTIONS}
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {', '.join(sorted(unknown))}")
    eval_batch_size(params, source)
    run = _keyed_section(params, "run", RUN_KEYS, source)
    hints = get_type_hints(RunConfig)
    top = {k: check_value(f"{source}: run.{k}", v, hints[k]) for k, v in run.items()}
    try:
        cfg = RunConfig.for_profile(params.get("profile", "paper"), **top)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    overrides: dict[str, Any] = {}
    train = params.get("train") or {}
    if not isinstance(train, dict) or set(train) - {"generator", "finetune"}:
        raise ConfigError(f"{source}: train: expected the subsections generator and finetune")
    for name, (field_name, cls) in SECTIONS.items():
        head, _, sub = name.partition(".")
        section = (train.get(sub) if sub else params.get(head)) or {}
        overrides.update(_section_overrides(f"{source}: {name}", section, cls, f"{field_name}.",
                                            NOT_IN_FILE.get(name, ())))
    try:
        return with_overrides(cfg, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
