"""Dotted keys and config building (texq.util.keys), against hand-written expectations."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from texq.util.errors import ConfigError
from texq.util.keys import as_tree, build, leaves, merge, nest, with_overrides


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
    for tree, message in (({"inner": {"kk": 1}}, "unknown config key 'inner.kk' (no 'kk' in inner: k, theta)"),
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
