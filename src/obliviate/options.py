"""Building an options dataclass from a plain mapping (YAML, JSON, CLI key=value), with one error
that names every unknown key and lists the valid ones."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def options_from_dict(cls: type[T], data: dict[str, Any], what: str) -> T:
    """``cls(**data)`` after checking the keys; ``what`` names the options in the error
    (e.g. ``"training options"``). The dataclass's own ``__post_init__`` checks the values."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {what}: {', '.join(unknown)} (valid: {', '.join(sorted(known))})")
    return cls(**data)
