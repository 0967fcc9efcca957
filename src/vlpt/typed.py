"""Typed dataclasses from plain mappings (YAML, `key=value` overrides), checked as they are built: an
unknown key names the nearest valid one, a wrong type names the key. Configs and objectives' options both
come through here."""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any

from vlpt.errors import UsageError


class ConfigError(UsageError):
    """A config that cannot run; the message names the key and the fix."""


def valid_keys(cls, prefix: str = "") -> list[str]:
    """Every dotted key of a dataclass, nested ones included."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        keys.append(name)
        if dataclasses.is_dataclass(hints[f.name]):
            keys += valid_keys(hints[f.name], name + ".")
    return keys


def build(cls, raw: dict, prefix: str = "", root: tuple | None = None):
    """`cls` from `raw`; `prefix` names its keys in messages. An unknown key is matched against every key
    of `root` (the outermost dataclass and its prefix; default: this one) for a suggestion."""
    root = root or (cls, prefix)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in names:
            near = difflib.get_close_matches(prefix + k, valid_keys(root[0], root[1]), n=1, cutoff=0.5)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise ConfigError(f"unknown config key '{prefix + k}'{hint}")
    return cls(**{k: _coerce(v, hints[k], prefix + k, root) for k, v in raw.items()})


def _coerce(value: Any, tp: Any, key: str, root: tuple) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), key, root)
    if dataclasses.is_dataclass(tp):
        shorthand = getattr(tp, "SHORTHAND", None)
        if shorthand and isinstance(value, str):  # `- zeroshot:scenes:colour` = `- {task: zeroshot:scenes:colour}`
            value = {shorthand: value}
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping, got {value!r}")
        return build(tp, value, key + ".", root)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping, got {value!r}")
        _, vt = typing.get_args(tp)
        return {k: _coerce(v, vt, f"{key}.{k}", root) for k, v in value.items()}
    if origin is list:
        (it,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, it, key, root) for v in value]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}' must be true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"'{key}' must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"'{key}' must be a number, got {value!r}") from None
        if tp is int:
            if number != int(number):
                raise ConfigError(f"'{key}' must be a whole number, got {value!r}")
            return int(number)
        return number
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"'{key}' must be a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {tp} for {key}")
