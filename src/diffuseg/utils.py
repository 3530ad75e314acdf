"""Small helpers shared across modules."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

__all__ = ["dataclass_from_dict"]

T = TypeVar("T")


def dataclass_from_dict(cls: type[T], values: dict[str, Any], what: str) -> T:
    """Build a settings dataclass, refusing unknown keys with the valid ones listed.

    A typo in a YAML recipe or a checkpoint config must fail loudly, not be silently ignored.
    """
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {what} settings {unknown}; valid: {sorted(names)}")
    return cls(**values)
