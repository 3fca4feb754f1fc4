"""Dotted keys: the one name of each setting ('w_bits', 'finetune.alpha6', 'calibration.laws.k'),
the same in ``texq run --set``, params.yaml and ``dvc exp run -S``, a Prefect grid, MLflow params
and ``texq compare``, and the one walker over nested mappings that all of them use.

``leaves`` / ``nest`` / ``merge`` / ``assign`` work on nested mappings (a parsed params.yaml, a
config as a tree); ``build`` makes a config dataclass of one, each value checked against the
dataclass annotations (``check_value``), and ``with_overrides`` applies dotted keys to a config.
"""

from __future__ import annotations

import difflib
import types
from dataclasses import fields, is_dataclass
from typing import Any, Mapping, Union, get_args, get_origin, get_type_hints

from texq.util.domains import check_domains, domains_of
from texq.util.errors import ConfigError


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
            section = ".".join(parts[:i])
            if not isinstance(node, Mapping):
                raise ConfigError(f"unknown {what} {key!r} ({section} is a setting, not a section)")
            raise ConfigError(unknown_key(what, key, part, section, node, ".".join(parts[i + 1:])))
        if i < len(parts) - 1:
            node = node[part]
    return node, parts[-1]


def unknown_key(what: str, key: str, part: str, section: str, names, rest: str = "") -> str:
    """The one line refusing ``key`` (its part ``part`` is not among ``names``, the settings and
    sections of ``section``; ``rest``: what follows it in ``key``): the closest names when some
    are close, else all of them."""
    prefix, tail = (f"{section}." if section else ""), (f".{rest}" if rest else "")
    close = difflib.get_close_matches(part, sorted(names), n=3, cutoff=0.6)
    if close:
        return f"unknown {what} {key!r}: did you mean {' or '.join(prefix + c + tail for c in close)}?"
    return f"unknown {what} {key!r} (no {part!r} in {section or 'the top level'}: {', '.join(sorted(names))})"


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


def nest(flat: Mapping[str, Any]) -> dict:
    """{'finetune.alpha6': 10, 'w_bits': 3} -> {'finetune': {'alpha6': 10}, 'w_bits': 3}; a value
    that is itself a mapping (a section) is taken as it is."""
    tree: dict = {}
    for key, value in flat.items():
        *parents, last = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key {key!r}: {part!r} is a setting, not a section")
        node[last] = value
    return tree


def merge(*trees: Mapping) -> dict:
    """The nested mappings laid over each other, later ones winning key by key."""
    out: dict = {}
    for tree in trees:
        for key, value in tree.items():
            if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
                out[key] = merge(out[key], value)
            else:
                out[key] = value
    return out


def build(cls, tree: Mapping, prefix: str = ""):
    """The config dataclass ``cls`` from a nested mapping of its settings (those left out take
    their defaults): each key must name a setting or a section of ``cls`` and each value must have
    its annotated type (``check_value``), else a one-line ConfigError naming the dotted key. Every
    dataclass is constructed once, with all of its values, so its checks see them together."""
    hints, names = get_type_hints(cls, include_extras=True), {f.name for f in fields(cls)}
    values = {}
    for name, value in tree.items():
        key = prefix + name
        if name not in names:
            rest = next(iter(leaves(value)), "") if isinstance(value, Mapping) else ""
            raise ConfigError(unknown_key("config key", ".".join(filter(None, (key, rest))), name,
                                          prefix.rstrip("."), names, rest))
        hint = hints[name]
        if is_dataclass(hint):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key {key!r} is a section: set one of its keys "
                                  f"({', '.join(f.name for f in fields(hint))})")
            values[name] = build(hint, value, key + ".")
        else:
            values[name] = check_value(key, value, hint)
    return cls(**values)


def with_overrides(cfg, overrides: Mapping[str, object]):
    """``cfg`` (a config dataclass, e.g. a RunConfig) with dotted-key overrides applied
    ({'finetune.alpha6': 10}), each checked as :func:`build` checks it; the result is validated
    once, after every override is applied, so their order never matters."""
    return build(type(cfg), merge(as_tree(cfg), nest(overrides)))


def check_value(key: str, value, hint):
    """``value`` converted to the annotated type ``hint`` (ints pass as floats, lists as tuples)
    and within the domains it declares (``texq.util.domains``; numbers finite), or a ConfigError
    naming ``key`` and what was expected."""
    base, _ = domains_of(hint)
    value = _typed(key, value, base)
    check_domains(key, value, hint)
    return value


def _typed(key: str, value, hint):
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _typed(key, value, arg)
            except ConfigError:
                pass
    elif origin is tuple and isinstance(value, (list, tuple)) and len(value) == len(args):
        return tuple(_typed(key, v, a) for v, a in zip(value, args))
    elif hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif hint is float and isinstance(value, str) and _number(value):
        return float(value)  # YAML 1.1 reads 1e-5 (no dot) as a string
    elif hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif hint in (bool, str) and isinstance(value, hint):
        return value
    raise ConfigError(f"{key}={value!r}: expected {_type_name(hint)}")


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _type_name(hint) -> str:
    args = get_args(hint)
    if get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if get_origin(hint) is tuple:
        return f"a list of {len(args)} {' / '.join(sorted({_type_name(a) for a in args}))}"
    return {type(None): "null", float: "a number", int: "an integer", bool: "true or false",
            str: "a string"}.get(hint, getattr(hint, "__name__", str(hint)))
