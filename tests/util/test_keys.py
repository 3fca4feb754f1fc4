"""Dotted keys and config building (texq.util.keys), against hand-written expectations."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from texq.util.errors import ConfigError
from texq.util.keys import as_tree, assign, build, leaves, merge, nest, with_overrides


@dataclass(frozen=True)
class Inner:
    k: int = 9
    theta: float = 0.3


@dataclass(frozen=True)
class Outer:
    name: str = "a"
    bits: int | None = None
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self) -> None:
        if self.inner.k < self.inner.theta:
            raise ConfigError("inner.k below theta")


def test_nest_and_leaves_are_inverse():
    flat = {"name": "b", "inner.k": 3, "inner.theta": 0.5}
    assert nest(flat) == {"name": "b", "inner": {"k": 3, "theta": 0.5}}
    assert leaves(nest(flat)) == flat
    with pytest.raises(ConfigError, match="'name' is a setting"):
        nest({"name": "b", "name.x": 1})


def test_merge_lays_later_trees_over_earlier_key_by_key():
    assert merge({"a": 1, "s": {"x": 1, "y": 2}}, {"s": {"y": 3}}, {"b": 4}) == \
        {"a": 1, "s": {"x": 1, "y": 3}, "b": 4}


def test_build_makes_the_dataclass_once_with_checked_values():
    got = build(Outer, {"inner": {"k": 2, "theta": 1}, "bits": None})
    assert got == Outer(inner=Inner(k=2, theta=1.0)) and isinstance(got.inner.theta, float)
    assert as_tree(got) == {"name": "a", "bits": None, "inner": {"k": 2, "theta": 1.0}}
    for tree, message in (({"inner": {"kk": 1}}, "unknown config key 'inner.kk': did you mean inner.k?"),
                          ({"inner": {"zzz": 1}}, "unknown config key 'inner.zzz' (no 'zzz' in inner: k, theta)"),
                          ({"innr": {"theta": 1}}, "unknown config key 'innr.theta': did you mean inner.theta?"),
                          ({"nope": 1}, "unknown config key 'nope' (no 'nope' in the top level"),
                          ({"inner": 3}, "config key 'inner' is a section: set one of its keys (k, theta)"),
                          ({"inner": {"k": "x"}}, "inner.k='x': expected an integer"),
                          ({"bits": 2.5}, "bits=2.5: expected an integer or null")):
        with pytest.raises(ConfigError) as exc:
            build(Outer, tree)
        assert message in str(exc.value)
    # the dataclass's own checks see every value at once, whatever the order of the overrides
    assert with_overrides(Outer(), {"inner.theta": 50.0, "inner.k": 60}).inner == Inner(60, 50.0)
    with pytest.raises(ConfigError, match="below theta"):
        with_overrides(Outer(), {"inner.theta": 50.0})


def test_a_misspelled_key_is_refused_naming_the_closest_keys_in_one_short_line():
    tree = {"w_bits": 4, "a_bits": 4, "seed": 0, "finetune": {"alpha6": 20.0, "lr": 1e-4}}
    for key, message in (("w_bit", "unknown key 'w_bit': did you mean w_bits or a_bits?"),
                         ("finetun.lr", "unknown key 'finetun.lr': did you mean finetune.lr?"),
                         ("finetune.alhpa6", "unknown key 'finetune.alhpa6': did you mean finetune.alpha6?"),
                         ("finetune.lr.x", "unknown key 'finetune.lr.x' (finetune.lr is a setting, not a section)"),
                         ("qqqq", "unknown key 'qqqq' (no 'qqqq' in the top level: a_bits, finetune, seed, w_bits)")):
        with pytest.raises(ConfigError) as exc:
            assign(tree, key, 1)
        assert str(exc.value) == message
    assign(tree, "finetune.lr", 0.5)
    assert tree["finetune"]["lr"] == 0.5
