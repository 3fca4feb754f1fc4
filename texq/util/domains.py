"""Domains of settings: what values a config field may hold, declared once beside the field.

A config dataclass annotates a field with its domain, ``lr: Annotated[float, POSITIVE] = 1e-4``;
``texq.util.keys.build`` checks it (naming the dotted key: ``finetune.lr=-0.1: expected a
positive number``) for ``--set``, params.yaml and grids, and the dataclass's ``__post_init__``
calls :func:`check_fields` so that a Python caller's ``FinetuneConfig(lr=-0.1)`` is refused the
same way. Every float setting must also be finite (NaN and infinities are never a setting).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Annotated, Any, Callable, get_args, get_origin, get_type_hints

from texq.util.errors import ConfigError


@dataclass(frozen=True)
class Domain:
    """A set of allowed values: ``words`` say it in an error, ``holds`` tests a value."""

    words: str
    holds: Callable[[Any], bool]

    def check(self, key: str, value) -> None:
        """``value`` (each of its numbers, for a tuple) in the domain, else a ConfigError."""
        parts = value if isinstance(value, tuple) else (value,)
        if any(p is not None and not self.holds(p) for p in parts):
            each = " (each)" if isinstance(value, tuple) else ""
            raise ConfigError(f"{key}={value!r}: expected {self.words}{each}")


def _word(choice) -> str:
    return str(choice).lower() if isinstance(choice, bool) else str(choice)  # as YAML writes it


def one_of(*choices) -> Domain:
    """Exactly these values (True is not 1)."""
    return Domain(f"one of {', '.join(map(_word, choices))}",
                  lambda v: any(v == c and type(v) is type(c) for c in choices))


COUNT_LIMIT = 2**31  # counts and sizes (iterations, images, batch sizes, epochs) stay below it:
# beyond, a size overflows torch's index types or a loop over it never ends; no setting comes near


def at_least(low: int) -> Domain:
    """An integer count: ``low`` or more, and below COUNT_LIMIT."""
    return Domain(f"an integer >= {low} and < 2**31", lambda v: low <= v < COUNT_LIMIT)


def between(low: float, high: float, closed: str = "[]") -> Domain:
    """``closed`` says which ends belong: '[]', '[)', '(]' or '()'."""
    lo_ok = (lambda v: v >= low) if closed[0] == "[" else (lambda v: v > low)
    hi_ok = (lambda v: v <= high) if closed[1] == "]" else (lambda v: v < high)
    return Domain(f"a number in {closed[0]}{low}, {high}{closed[1]}", lambda v: lo_ok(v) and hi_ok(v))


POSITIVE = Domain("a positive number", lambda v: v > 0)
NON_NEGATIVE = Domain("a number >= 0", lambda v: v >= 0)
PROBABILITY = between(0, 1)  # [0, 1]
FRACTION = between(0, 1, "(]")  # (0, 1]
MOMENTUM = between(0, 1, "[)")  # [0, 1): an EMA or Adam factor
COUNT = at_least(1)  # an integer >= 1
NON_NEGATIVE_INT = at_least(0)
SEED = Domain("an integer >= 0 and < 2**64 (a torch seed)", lambda v: 0 <= v < 2**64)


def domains_of(hint) -> tuple[Any, list[Domain]]:
    """``Annotated[T, D1, D2]`` -> (T, [D1, D2]); any other hint -> (hint, [])."""
    if get_origin(hint) is Annotated:
        base, *extras = get_args(hint)
        return base, [d for d in extras if isinstance(d, Domain)]
    return hint, []


def check_domains(key: str, value, hint) -> None:
    """``value`` (already of its type) within every domain ``hint`` declares, and finite (each
    number of it), else a ConfigError naming ``key``."""
    _, domains = domains_of(hint)
    parts = value if isinstance(value, tuple) else (value,)
    if any(isinstance(p, float) and not math.isfinite(p) for p in parts):
        raise ConfigError(f"{key}={value!r}: expected a finite number")
    for domain in domains:
        domain.check(key, value)


def check_fields(cfg, prefix: str | None = None) -> None:
    """Every field of the config dataclass ``cfg`` within its domain (for Python callers; the
    error names ``Class.field`` unless ``prefix`` is given)."""
    hints = get_type_hints(type(cfg), include_extras=True)
    prefix = f"{type(cfg).__name__}." if prefix is None else prefix
    for f in fields(cfg):
        check_domains(prefix + f.name, getattr(cfg, f.name), hints[f.name])
