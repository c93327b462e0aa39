"""The one checked reader of config sections.

Every section of a config file is a frozen dataclass; `read_section` turns the section (an
ml_collections ConfigDict or a dict) into it, and rejects before any compute: unknown keys (with
the closest valid spelling), missing required keys, values of the wrong type, and values outside
the bounds a field declares. Errors are `ConfigError`s naming the file, the section and the key:

    experiments/configs/tiny_cpu.py: config.rl.group_size = 0: must be >= 1

Fields declare their rules with `setting(...)`; a dataclass constructed in code checks the same
bounds by calling `check_fields(self)` in `__post_init__`. Supported field types: bool, int, float
(ints accepted), str, `X | None`, `tuple[X, ...]` / `tuple[X, Y]` (lists accepted), `Mapping[str, X]`
/ `dict[str, X]`, `Any`, and nested section dataclasses (read recursively).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import types
import typing
from typing import Any, Iterable, Mapping, TypeVar

from agentflow_jax.errors import UserError

T = TypeVar("T")
_MISSING = dataclasses.MISSING


class ConfigError(UserError, ValueError):
    """A config file asks for something invalid; the message names the file, section and key."""


class FieldValueError(ValueError):
    """A field's value breaks its declared rule (raised by `check_fields`; `field` names it)."""

    def __init__(self, field: str, rule: str, value: Any):
        super().__init__(f"{field} {rule}, got {value!r}")
        self.field, self.rule = field, rule


def setting(default: Any = _MISSING, *, default_factory: Any = _MISSING, min: float | None = None,
            max: float | None = None, above: float | None = None, choices: Iterable[Any] | None = None,
            set_by: str | None = None) -> Any:
    """A dataclass field with rules: `min`/`max` inclusive bounds, `above` an exclusive lower bound,
    `choices` the allowed values, `set_by` = the config key this field is derived from (a config
    may not set it)."""
    metadata = {"min": min, "max": max, "above": above, "set_by": set_by,
                "choices": None if choices is None else tuple(choices)}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check_fields(instance: Any) -> None:
    """Raises FieldValueError for the first field of a dataclass instance that breaks its rule."""
    for field in dataclasses.fields(instance):
        rule = field.metadata
        value = getattr(instance, field.name)
        if value is None or not rule:
            continue
        if rule.get("choices") is not None and value not in rule["choices"]:
            raise FieldValueError(field.name, f"must be one of {list(rule['choices'])}", value)
        if rule.get("min") is not None and value < rule["min"]:
            raise FieldValueError(field.name, f"must be >= {rule['min']}", value)
        if rule.get("max") is not None and value > rule["max"]:
            raise FieldValueError(field.name, f"must be <= {rule['max']}", value)
        if rule.get("above") is not None and value <= rule["above"]:
            raise FieldValueError(field.name, f"must be > {rule['above']}", value)


def as_dict(section: Any) -> dict[str, Any]:
    """A plain dict of a section (ConfigDicts become nested dicts; None becomes {})."""
    if section is None:
        return {}
    if hasattr(section, "to_dict"):
        return dict(section.to_dict())
    if isinstance(section, Mapping):
        return dict(section)
    raise TypeError(f"a config section must be a mapping, got {type(section).__name__}")


def check_keys(path: str, section: Mapping[str, Any], valid: Iterable[str], *, source: str | None = None) -> None:
    """Raises ConfigError naming the first unknown key of `section`, the closest valid one and all valid ones."""
    valid = sorted(set(valid))
    for key in sorted(set(section) - set(valid)):
        close = difflib.get_close_matches(str(key), valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        where = f"config.{path}" if path else "config"
        raise ConfigError(f"{_where(source)}{where} has unknown key {key!r}{hint}; valid keys: {valid}")


def read_section(config: Any, name: str, cls: type[T], *, source: str | None = None, required: bool = True) -> T:
    """Section `name` of `config` as the dataclass `cls` (module docstring); a missing optional
    section gives `cls()`."""
    if name not in config or config[name] is None:
        if required:
            raise ConfigError(f"{_where(source)}config lacks section {name!r} "
                              f"(keys {[f.name for f in dataclasses.fields(cls)]})")
        return read_mapping({}, cls, path=name, source=source)
    value = config[name]
    if not (hasattr(value, "to_dict") or isinstance(value, Mapping)):
        raise ConfigError(f"{_where(source)}config.{name} must be a section (a dict of keys), got {value!r}")
    return read_mapping(as_dict(value), cls, path=name, source=source)


def read_mapping(values: Mapping[str, Any], cls: type[T], *, path: str, source: str | None = None) -> T:
    """`cls(**values)` after the checks of `read_section`; `path` names the section in errors."""
    where = _where(source)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    check_keys(path, values, fields, source=source)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, field in fields.items():
        if field.metadata.get("set_by"):
            if name in values:
                raise ConfigError(f"{where}config.{path}.{name} is set from config.{field.metadata['set_by']}; "
                                  "remove it")
            continue
        if name not in values:
            if field.default is _MISSING and field.default_factory is _MISSING:
                raise ConfigError(f"{where}config.{path} lacks key {name!r}")
            continue
        kwargs[name] = _convert(values[name], hints[name], f"{path}.{name}", source)
    try:
        return cls(**kwargs)
    except FieldValueError as e:
        raise ConfigError(f"{where}config.{path}.{e.field} = {kwargs.get(e.field)!r}: {e.rule}") from None
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}config.{path}: {e}") from None


def _convert(value: Any, kind: Any, path: str, source: str | None) -> Any:
    """`value` checked against the annotation `kind` (lists -> tuples, sections -> dataclasses)."""
    wrong = ConfigError(f"{_where(source)}config.{path} = {value!r}: expected {_type_name(kind)}")
    if kind is Any:
        return value
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(value, option, path, source)
            except ConfigError:
                continue
        raise wrong
    if dataclasses.is_dataclass(kind):
        if not (hasattr(value, "to_dict") or isinstance(value, Mapping)):
            raise wrong
        return read_mapping(as_dict(value), kind, path=path, source=source)
    if kind is bool:
        if not isinstance(value, bool):
            raise wrong
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise wrong
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise wrong
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{path}[{i}]", source) for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise wrong
        return tuple(_convert(v, a, f"{path}[{i}]", source) for i, (v, a) in enumerate(zip(value, args or
                                                                                          (Any,) * len(value))))
    if origin in (dict, collections.abc.Mapping) or kind in (dict, collections.abc.Mapping):
        if not (hasattr(value, "to_dict") or isinstance(value, Mapping)):
            raise wrong
        key_kind, value_kind = args if args else (Any, Any)
        return {_convert(k, key_kind, f"{path}", source): _convert(v, value_kind, f"{path}.{k}", source)
                for k, v in as_dict(value).items()}
    raise TypeError(f"config_reader cannot check fields of type {kind!r} ({path})")


def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", None) or str(kind).replace("typing.", "")


def _where(source: str | None) -> str:
    return f"{source}: " if source else ""


def load_config_module(filename: str, *, relative_to: str) -> Any:
    """Imports a config file that sits beside another one (e.g. the shared `base.py` next to the
    file calling this with `relative_to=__file__`)."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.abspath(relative_to)), filename)
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    if spec is None or not os.path.isfile(path):
        raise ConfigError(f"{relative_to}: cannot find the config file {path!r} it builds on")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
