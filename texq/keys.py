"""Dotted keys: the one name of each setting ('w_bits', 'finetune.alpha6', 'calibration.laws.k'),
the same in ``texq run --set``, params.yaml and ``dvc exp run -S``, a Prefect grid, MLflow params
and ``texq compare``, and the one walker over nested mappings that all of them use.

``lookup`` / ``assign`` / ``leaves`` work on any nested mapping (a parsed params.yaml, a config as a
tree); ``with_overrides`` applies dotted keys to a ``RunConfig`` with each value checked against
the dataclass annotations (``check_value``).
"""

from __future__ import annotations

import math
import types
from dataclasses import fields, is_dataclass
from typing import Any, Mapping, Union, get_args, get_origin, get_type_hints

from texq.errors import ConfigError


def leaves(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """{'finetune': {'alpha6': 20.0}, 'w_bits': 4} -> {'finetune.alpha6': 20.0, 'w_bits': 4}."""
    out: dict[str, Any] = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            out.update(leaves(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = value
    return out


def _parent(tree: Mapping, key: str, what: str) -> tuple[Mapping, str]:
    """The mapping that holds ``key``'s last part, or a ConfigError naming the key."""
    node, parts = tree, key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, Mapping) or part not in node:
            where = ".".join(parts[:i]) or "the top level"
            names = ", ".join(sorted(node)) if isinstance(node, Mapping) else "not a section"
            raise ConfigError(f"unknown {what} {key!r} (no {part!r} in {where}: {names})")
        if i < len(parts) - 1:
            node = node[part]
    return node, parts[-1]


def lookup(tree: Mapping, key: str, what: str = "key") -> Any:
    """The value at dotted ``key`` of a nested mapping."""
    node, last = _parent(tree, key, what)
    return node[last]


def assign(tree: dict, key: str, value: Any, what: str = "key") -> None:
    """Set an existing dotted ``key`` of a nested mapping (a key that is not there is refused)."""
    node, last = _parent(tree, key, what)
    node[last] = value


def as_tree(cfg) -> dict:
    """A config dataclass as nested dicts (sections are dicts, settings their values)."""
    return {f.name: as_tree(v) if is_dataclass(v := getattr(cfg, f.name)) else v for f in fields(cfg)}


def flatten(cfg) -> dict[str, object]:
    """Nested dataclass -> {'finetune.alpha6': 20.0, ...} (for logs and experiment trackers)."""
    return leaves(as_tree(cfg))


def _hints(cfg) -> dict:
    """The annotated type of each setting, as a tree shaped like ``as_tree(cfg)``."""
    hints = get_type_hints(type(cfg))
    return {f.name: _hints(v) if is_dataclass(v := getattr(cfg, f.name)) else hints[f.name]
            for f in fields(cfg)}


def with_overrides(cfg, overrides: Mapping[str, object]):
    """Apply dotted-key overrides ({'finetune.alpha6': 10}) to a config dataclass (a RunConfig).

    Each key must name a setting and each value must have its type (a one-line ConfigError naming
    the key otherwise, before any work starts); the result is validated once, after every
    override is applied, so the order of the overrides never matters."""
    tree, hints = as_tree(cfg), _hints(cfg)
    for key, value in overrides.items():
        hint = lookup(hints, key, "config key")
        if isinstance(hint, dict):
            raise ConfigError(f"config key {key!r} is a section: set one of its keys "
                              f"({', '.join(hint)})")
        assign(tree, key, check_value(key, value, hint))
    return _build(cfg, tree)


def _build(cfg, tree: dict):
    return type(cfg)(**{f.name: _build(v, tree[f.name]) if is_dataclass(v := getattr(cfg, f.name))
                        else tree[f.name] for f in fields(cfg)})


def check_value(key: str, value, hint):
    """``value`` converted to the annotated type ``hint`` (ints pass as floats, lists as tuples),
    or a ConfigError naming ``key`` and the expected type."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return check_value(key, value, arg)
            except ConfigError:
                pass
    elif origin is tuple and isinstance(value, (list, tuple)) and len(value) == len(args):
        return tuple(check_value(key, v, a) for v, a in zip(value, args))
    elif hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif hint is float and isinstance(value, str) and _finite_number(value):
        return float(value)  # YAML 1.1 reads 1e-5 (no dot) as a string
    elif hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif hint in (bool, str) and isinstance(value, hint):
        return value
    raise ConfigError(f"{key}={value!r}: expected {_type_name(hint)}")


def _finite_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _type_name(hint) -> str:
    args = get_args(hint)
    if get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if get_origin(hint) is tuple:
        return f"a list of {len(args)} {' / '.join(sorted({_type_name(a) for a in args}))}"
    return {type(None): "null", float: "a number", int: "an integer", bool: "true or false",
            str: "a string"}.get(hint, getattr(hint, "__name__", str(hint)))
