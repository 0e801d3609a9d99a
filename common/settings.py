"""Declaring a setting once: a dataclass field that also carries its help, the seed's alias, its
validity check and whether it defines a run. The server's flags, config reader, docs and resume hash,
and the hyperparameters sent to clients are all derived from these declarations
(fl_server/config.py, common/messages.py ClientHyperparameters).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

_KEY = "setting"


class SettingError(ValueError):
    """A value of the wrong type or outside what its setting allows; the message names the key."""


@dataclass(frozen=True)
class Rule:
    """A validity check: `ok(value)` or the error "{what}, got {value!r}"."""

    ok: Callable[[Any], bool]
    what: str

    def problem(self, value: Any) -> str | None:
        return None if self.ok(value) else f"{self.what}, got {value!r}"


@dataclass(frozen=True)
class Parsed:
    """A validity check by a parser that raises a ValueError saying what is wrong and what is allowed."""

    parse: Callable[[Any], object]

    def problem(self, value: Any) -> str | None:
        try:
            self.parse(value)
        except ValueError as e:
            return str(e)
        return None


Check = Rule | Parsed


def at_least(low: float, what: str | None = None) -> Rule:
    return Rule(lambda v: v >= low, what or f"must be at least {low}")


def positive(what: str = "must be positive") -> Rule:
    return Rule(lambda v: v > 0, what)


def one_of(*choices: str) -> Rule:
    return Rule(lambda v: v in choices, f"must be one of {', '.join(choices)}")


@dataclass(frozen=True)
class Setting:
    help: str
    defines_run: bool  # part of the resume hash: changing it between a checkpoint and a restart mixes two runs
    alias: str | None = None  # the seed's conf.json name
    check: Check | None = None
    value_aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)  # the seed's names for values
    canonical: Callable[[Any], Any] | None = None  # the spelling clients receive, if not the value as given


def setting(default: Any, help: str, *, defines_run: bool, alias: str | None = None, check: Check | None = None,
            value_aliases: Mapping[str, str] | None = None, canonical: Callable[[Any], Any] | None = None) -> Any:
    """A dataclass field declared as a setting. `defines_run` has no default so that nobody adding a
    setting can forget to decide whether a checkpoint made under another value may be resumed."""
    return dataclasses.field(default=default, metadata={_KEY: Setting(
        help, defines_run, alias, check, dict(value_aliases or {}), canonical)})


@dataclass(frozen=True)
class Declared:
    name: str
    type: type
    default: Any
    setting: Setting


@functools.cache
def declared(cls: type) -> tuple[Declared, ...]:
    """The settings of dataclass `cls`, in declaration order (a base class's first)."""
    hints = typing.get_type_hints(cls)
    return tuple(Declared(f.name, hints[f.name], f.default, f.metadata[_KEY])
                 for f in dataclasses.fields(cls) if _KEY in f.metadata)


def check_type(key: str, value: Any, kind: type) -> Any:
    """`value` as a `kind`, or SettingError. JSON and TOML have one number type each way round, so an
    int is a float, but a float is not an int, and bool (an int in Python) is neither."""
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise SettingError(f"config key {key!r}: expected a whole number, got {value!r}")
    if kind is int and abs(value) >= 2**63:  # what torch and numpy take as a seed or a count
        raise SettingError(f"config key {key!r} is out of range: a whole number below 2**63 in magnitude, got {value}")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise SettingError(f"config key {key!r}: expected a number, got {value!r}")
        return float(value)
    if kind is bool and not isinstance(value, bool):
        raise SettingError(f"config key {key!r}: expected true or false, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise SettingError(f"config key {key!r}: expected a string, got {value!r}")
    return value


def parse_bool(text: str) -> bool:
    """A flag's true or false (argparse's type=bool would take "false" for True)."""
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "on", "1"):
        return True
    if lowered in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def check_value(name: str, value: Any, check: Check | None) -> None:
    problem = check.problem(value) if check is not None else None
    if problem is not None:
        raise SettingError(f"config key {name!r}: {problem}")


def values_of(obj: Any, cls: type) -> dict[str, Any]:
    """The values of `cls`'s settings in `obj` (an instance of `cls` or of a subclass)."""
    return {d.name: getattr(obj, d.name) for d in declared(cls)}


def typed_values(cls: type, raw: Mapping[str, Any]) -> dict[str, Any]:
    """`raw`'s values of `cls`'s settings, type- and validity-checked; keys `cls` does not declare are
    left out (a newer peer's), and settings `raw` lacks are left to their defaults (an older one's)."""
    values = {}
    for d in declared(cls):
        if d.name in raw:
            values[d.name] = check_type(d.name, raw[d.name], d.type)
            check_value(d.name, values[d.name], d.setting.check)
    return values
