"""Domains of settings (texq.util.domains): declared once beside each field, checked for every way
a config is made."""

from __future__ import annotations

import math
import re
from dataclasses import fields, is_dataclass
from typing import get_type_hints

import pytest

from texq.method.finetune import FinetuneConfig
from texq.method.generator import GeneratorConfig
from texq.quant import QuantConfig
from texq.run.config import RunConfig
from texq.util.domains import (
    COUNT,
    FRACTION,
    MOMENTUM,
    PROBABILITY,
    between,
    domains_of,
    one_of,
)
from texq.util.errors import ConfigError
from texq.util.keys import build, check_value

# the settings whose values are free: names of files, models, data sets, layers
FREE = {"model", "checkpoint", "data", "train_data", "quant.first_layer", "quant.last_layer"}


def _settings(cls, prefix=""):
    hints = get_type_hints(cls, include_extras=True)
    for f in fields(cls):
        base, domains = domains_of(hints[f.name])
        if is_dataclass(base):
            yield from _settings(base, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, base, domains


def test_every_setting_of_a_run_declares_its_domain():
    undeclared = [key for key, base, domains in _settings(RunConfig)
                  if not domains and base is not bool and key not in FREE]
    assert undeclared == []


@pytest.mark.parametrize("domain, inside, outside", [
    (COUNT, [1, 2, 10**6], [0, -1]),
    (FRACTION, [1e-9, 0.5, 1.0], [0.0, -0.1, 1.0000001]),
    (PROBABILITY, [0.0, 0.3, 1.0], [-1e-9, 1.5]),
    (MOMENTUM, [0.0, 0.999], [1.0, -0.5]),
    (between(1, 16), [1, 16], [0, 17]),
    (one_of("a", True), ["a", True], ["b", 1, False]),  # True is not 1
])
def test_a_domain_holds_its_values_and_refuses_the_others(domain, inside, outside):
    assert all(domain.holds(v) for v in inside)
    assert not any(domain.holds(v) for v in outside)
    for v in outside:
        with pytest.raises(ConfigError, match="^" + re.escape(f"k={v!r}: expected {domain.words}") + "$"):
            domain.check("k", v)


def test_values_are_checked_for_python_callers_as_for_files():
    with pytest.raises(ConfigError, match=r"^finetune\.lr=-1: expected a positive number$"):
        FinetuneConfig(lr=-1)
    with pytest.raises(ConfigError, match=r"^generator\.lr=nan: expected a finite number$"):
        GeneratorConfig(lr=math.nan)
    with pytest.raises(ConfigError, match=r"^w_bits=9: expected a supported bit width"):
        QuantConfig(w_bits=9)
    with pytest.raises(ConfigError, match=r"^finetune\.calib_crop_scale=\(0\.9, 0\.5\): expected the smaller"):
        FinetuneConfig(calib_crop_scale=(0.9, 0.5))
    # a file's value is converted first, then checked; a finite value in the domain passes
    assert build(FinetuneConfig, {"lr": "1e-5", "mixup_p": 1}).lr == 1e-5
    with pytest.raises(ConfigError, match=r"^finetune\.lr=inf: expected a finite number$"):
        build(FinetuneConfig, {"lr": "inf"}, "finetune.")


def test_a_tuple_setting_checks_each_number_and_names_the_whole_value():
    hint = get_type_hints(FinetuneConfig, include_extras=True)["calib_crop_scale"]
    assert check_value("s", [0.25, 1], hint) == (0.25, 1.0)
    with pytest.raises(ConfigError, match=r"^s=\(0\.25, 1\.5\): expected a number in \(0, 1\] \(each\)$"):
        check_value("s", [0.25, 1.5], hint)


def test_the_defaults_and_every_profile_lie_in_their_domains():
    for profile in ("paper", "quick", "tiny"):
        RunConfig.for_profile(profile, pretrained=True)  # raises if a profile value left its domain
    for cls in (FinetuneConfig, GeneratorConfig, QuantConfig):
        cls()


def test_seeds_and_counts_stop_at_their_types_range():
    """A seed fits torch's (uint64); a count stays below 2**31 (torch's sizes, and loops over it)."""
    hints = get_type_hints(RunConfig, include_extras=True)
    assert check_value("seed", 2**64 - 1, hints["seed"]) == 2**64 - 1
    for seed in (2**64, 2**70, -1):
        with pytest.raises(ConfigError, match=re.escape(f"seed={seed}: expected an integer >= 0 and < 2**64")):
            check_value("seed", seed, hints["seed"])
    ft = get_type_hints(FinetuneConfig, include_extras=True)["batch_size"]
    assert check_value("finetune.batch_size", 2**31 - 1, ft) == 2**31 - 1
    with pytest.raises(ConfigError, match=re.escape("finetune.batch_size=2147483648: expected an integer >= 1 and < 2**31")):
        check_value("finetune.batch_size", 2**31, ft)
