"""Config sections (dicts or ml_collections ConfigDicts) checked against the keys their reader accepts."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping, TypeVar

T = TypeVar("T")


def as_dict(section: Mapping[str, Any]) -> dict[str, Any]:
    """A plain dict of a section (ConfigDicts become nested dicts)."""
    return dict(section.to_dict() if hasattr(section, "to_dict") else section)


def check_keys(name: str, section: Mapping[str, Any], valid: Iterable[str]) -> None:
    """Raises ValueError naming the section's unknown keys and the valid ones."""
    valid = set(valid)
    unknown = sorted(set(section) - valid)
    if unknown:
        raise ValueError(f"unknown {name} config key(s) {unknown}; valid keys: {sorted(valid)}")


def dataclass_from_section(cls: Callable[..., T], section: Mapping[str, Any], name: str) -> T:
    """`cls(**section)` for a dataclass, after `check_keys` against its fields; lists become tuples
    (the frozen dataclasses hold tuples, config files and JSON give lists)."""
    values = as_dict(section)
    check_keys(name, values, (f.name for f in dataclasses.fields(cls)))
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
