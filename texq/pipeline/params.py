"""``params.yaml`` -> ``PipelineConfig``: the pipeline's configuration, read once per stage and
checked key by key.

The file has ``RunConfig``'s structure: its top-level settings at the top level (``profile``,
``model``, ``method``, ``w_bits``, ``seed``, the Table 3 switches, ...) and one section per method
config (``quant`` without the bits, ``calibration``, ``generator``, ``finetune``, ``distill``), plus
the pipeline's own ``evaluate`` section. So a setting has one dotted key everywhere
(``finetune.alpha6``, ``w_bits``: ``texq run --set``, ``dvc exp run -S``, grids, MLflow params).
A key set to ``auto`` takes the profile's value (``paper``, ``quick`` or ``tiny``); any other value
overrides it. The device is the machine's (``--device``), not a parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from texq.run.config import RunConfig
from texq.util.domains import COUNT, check_fields, one_of
from texq.util.errors import ConfigError
from texq.util.keys import build, check_value, leaves

AUTO = "auto"
NOT_IN_FILE = {"device": "the device is the machine's: give --device to the stage",
               "quant.w_bits": "set the top-level w_bits (one source of truth for the bits)",
               "quant.a_bits": "set the top-level a_bits (one source of truth for the bits)"}


@dataclass(frozen=True)
class EvaluateConfig:
    """The pipeline's ``evaluate`` section: how the teacher and evaluate stages score, and what a
    tracked run does with its model."""

    batch_size: Annotated[int, COUNT] = 256  # evaluation batch; any size gives the same counts
    # a version in MLflow's registry per tracked run; auto: paper runs
    register_model: Annotated[bool | str, one_of(AUTO, True, False)] = AUTO

    def __post_init__(self) -> None:
        check_fields(self, "evaluate.")

    def registers(self, profile: str) -> bool:
        """Whether a tracked run registers its quantized model: ``auto`` for the ``paper`` profile
        only, so that quick and tiny runs (previews, tests) add no versions."""
        return profile == "paper" if self.register_model == AUTO else bool(self.register_model)


@dataclass(frozen=True)
class PipelineConfig:
    run: RunConfig  # the run's settings: every section but evaluate
    evaluate: EvaluateConfig  # the pipeline's evaluate section

    @property
    def registers_model(self) -> bool:
        return self.evaluate.registers(self.run.profile)


def _unique_keys_loader(path: Path):
    """A safe YAML loader that refuses a key given twice in one mapping (PyYAML keeps the last)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise ConfigError(f"{path}: key {key!r} given twice (lines {seen[key] + 1} and "
                                      f"{key_node.start_mark.line + 1}): keep one")
                seen[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep)

    return Loader


def load_params(path: str | Path = "params.yaml") -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        params = yaml.load(path.read_text(), Loader=_unique_keys_loader(path))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from exc
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return params


def _without_auto(tree: dict) -> dict:
    return {k: _without_auto(v) if isinstance(v, dict) else v for k, v in tree.items() if v != AUTO}


def pipeline_config(params: dict, source: str = "params.yaml", device: str = "auto") -> PipelineConfig:
    """The configuration ``params`` (a parsed params.yaml) describes, run on ``device``; errors
    name the file and the key."""
    try:
        evaluate = build(EvaluateConfig, params.get("evaluate") or {}, "evaluate.")
        tree = {k: v for k, v in params.items() if k != "evaluate"}
        for key, why in NOT_IN_FILE.items():
            if key in leaves(tree):
                raise ConfigError(f"{key}: not a params.yaml key ({why})")
        tree = _without_auto(tree)
        profile = check_value("profile", tree.pop("profile", "paper"), str)
        return PipelineConfig(RunConfig.for_profile(profile, overrides={**tree, "device": device}),
                              evaluate)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc


def read_config(params_file: str | Path = "params.yaml", device: str = "auto") -> PipelineConfig:
    """One read of the params file: the stage's whole configuration."""
    return pipeline_config(load_params(params_file), str(params_file), device)
