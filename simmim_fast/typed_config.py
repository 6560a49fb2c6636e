"""A generic typed loader: JSON data -> nested dataclasses, every key and value checked.

Knows nothing of SimMIM: ``load_typed(cls, source, overrides)`` builds ``cls`` (a dataclass whose
fields may be dataclasses, ``Literal``, ``Union``, ``Optional``, ``List``, ``Tuple``, ``Dict`` and
scalars) from a JSON file, a dict or an instance, applies ``section.key=value`` overrides, calls
``validate()`` if the class has one, and raises ``ConfigError`` naming the key, the value and the
source. The source is added to each message by the loader, so checks (``config_error``) need not
know where the data came from.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import typing
from pathlib import Path
from typing import Any, Dict, List, Literal, Sequence, Tuple, Union

from .errors import MissingFileError, UserError

__all__ = ["ConfigError", "config_error", "check_positive", "type_name", "config_to_dict", "apply_overrides",
           "load_typed"]


class ConfigError(UserError, ValueError):
    """A config key or value is wrong; the message names the key, the value and the source."""


def config_error(key: str, value: Any, why: str) -> None:
    raise ConfigError(f"config key '{key}' = {json.dumps(value, default=str)} {why}")


def check_positive(section: str, obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if v < 1:
            config_error(f"{section}.{n}", v, "must be a positive int")


def type_name(tp: Any) -> str:
    """The annotation ``tp`` in words, as error messages and the generated docs show it."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(json.dumps(a) for a in typing.get_args(tp))
    if origin is Union:
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin in (list, List):
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if origin in (tuple, Tuple):
        args = typing.get_args(tp)
        return f"list of {len(args)} {type_name(args[0])}"
    if origin in (dict, Dict):
        return "object"
    if tp is type(None):
        return "null"
    return {int: "int", float: "number", bool: "bool", str: "string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in the dataclass's form."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"config key '{key}' = {json.dumps(value, default=str)} must be {type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be an object (a JSON dict of keys), got "
                              f"{json.dumps(value, default=str)}")
        return _build(tp, value, key + ".")
    if origin is Literal:
        if not any(value == c and type(value) is type(c) for c in typing.get_args(tp)):
            raise bad
        return value
    if origin is Union:
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise bad
    if tp is type(None):
        if value is not None:
            raise bad
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise bad
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (tuple, Tuple):
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise bad
        return copy.deepcopy(value)
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")


def _build(cls: type, data: Dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}'; known keys"
                          f"{' of ' + prefix[:-1] if prefix else ''}: {', '.join(names)}")
    return cls(**{k: _coerce(v, hints[k], prefix + k) for k, v in data.items()})


def config_to_dict(cfg: Any) -> Dict[str, Any]:
    """A config as plain JSON-able data (tuples become lists)."""
    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return conv(cfg)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # bare strings: --set data.backend=torch


def apply_overrides(data: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Apply ``key.sub=value`` overrides (value parsed as JSON, else taken as a string) to raw config data."""
    data = copy.deepcopy(data)
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} must look like section.key=value (e.g. train.base_lr=1e-4)")
        key, text = ov.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {ov!r}: bad key {key!r}")
        node = data
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {ov!r}: '{p}' is not a section")
            node = nxt
        node[parts[-1]] = _parse_value(text.strip())
    return data


def _read(source: Any, cls: type) -> Tuple[Dict[str, Any], str]:
    if isinstance(source, cls):
        return config_to_dict(source), f"<{cls.__name__}>"
    if source is None:
        return {}, "<defaults>"
    if isinstance(source, dict):
        return copy.deepcopy(source), "<dict>"
    path = Path(source)
    if not path.is_file():
        raise MissingFileError(f"config file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a JSON object at the top level")
    return data, str(path)


def load_typed(cls: type, source: Union[str, os.PathLike, Dict[str, Any], Any, None] = None,
               overrides: Sequence[str] = ()) -> Any:
    """``cls`` built from ``source`` (a JSON file, a dict, an instance or None for defaults) and
    ``overrides``, then validated; every ConfigError names where the data came from."""
    data, name = _read(source, cls)
    where = name + (f" with overrides {list(overrides)}" if overrides else "")
    try:
        cfg = _build(cls, apply_overrides(data, overrides))
        if hasattr(cfg, "validate"):
            cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{e} (in {where})") from None
    return cfg
