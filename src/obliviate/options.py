"""Options dataclasses from plain mappings (YAML, JSON, CLI key=value), checked against their field types.

:func:`options_from_dict` names every unknown key and lists the valid ones, then converts each value
to its field's type: YAML reads ``lr: 1e-3`` as the *string* "1e-3", so text that parses as a number
becomes one; anything else of the wrong type is refused naming the option. Floats must be finite
unless the field's metadata says ``{ALLOW_INF: True}`` (GUARD's ``tau=inf`` means uniform weights);
NaN is never an option value. :func:`check_fields` applies the same rules to a dataclass built
directly (call it from ``__post_init__``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from obliviate.errors import UserError

T = TypeVar("T")

ALLOW_INF = "allow_inf"  # field metadata key: the float may be +-inf
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


class OptionsError(UserError, ValueError):
    """Options that cannot be used; the message names each bad option. A ValueError for old callers."""


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(name: str, value: Any, kind: str) -> float | int:
    """An int or float from a number or numeric text (not a bool: ``True`` is no learning rate)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{name} must be {kind}, got {_short(value)}")
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{name} must be {kind}, got {_short(value)}") from None
    return value


def coerce(name: str, tp: Any, value: Any, allow_inf: bool = False) -> Any:
    """``value`` as type ``tp`` (float, int, bool, str, Path, X | None, list[X], tuple[X, ...]; other
    types pass through), or a ValueError that starts with ``name``."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return coerce(name, typing.get_args(tp)[0], value, allow_inf)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ValueError(f"{name} must be set, got None")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(name, arg, value, allow_inf)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if len(errors) == 1 else f"{name}: " + " or ".join(errors))
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list, got {_short(value)}")
        item_args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        item = item_args[0] if len(item_args) == 1 else Any
        items = [coerce(f"{name}[{i}]", item, v, allow_inf) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError(f"{name} must be true or false, got {_short(value)}")
    if tp is int:
        number = _number(name, value, "an integer")
        if isinstance(number, float):
            if not (math.isfinite(number) and number.is_integer()):
                raise ValueError(f"{name} must be an integer, got {_short(value)}")
            number = int(number)
        return number
    if tp is float:
        number = _number(name, value, "a number")
        try:
            x = float(number)
        except OverflowError:  # an int beyond float range
            raise ValueError(f"{name} must be a finite number, got {_short(value)}") from None
        if math.isnan(x) or (math.isinf(x) and not allow_inf):
            raise ValueError(f"{name} must be a finite number, got {_short(value)}")
        # Numbers keep their type (5 stays 5 in config.yaml); text becomes the number it spells.
        return number if not isinstance(value, str) else x
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be text, got {_short(value)}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ValueError(f"{name} must be a path, got {_short(value)}")
        return Path(value)
    return value


@functools.cache
def _field_types(cls: type) -> dict[str, tuple[Any, bool]]:
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):  # an annotation that does not resolve: leave those values unchecked
        hints = {}
    return {f.name: (hints.get(f.name, Any), bool(f.metadata.get(ALLOW_INF)))
            for f in dataclasses.fields(cls) if f.init}


def coerce_fields(cls: type, data: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The values converted to ``cls``'s field types, and one problem per value that cannot be."""
    out, problems = {}, []
    types_ = _field_types(cls)
    for key, value in data.items():
        tp, allow_inf = types_.get(key, (Any, False))
        try:
            out[key] = coerce(key, tp, value, allow_inf)
        except ValueError as exc:
            problems.append(str(exc))
    return out, problems


def check_fields(obj: Any) -> list[str]:
    """Convert a dataclass instance's values to their field types in place; the problems left."""
    # mypy does not count type[X] as Hashable for functools.cache's wrapper; classes are hashable
    names = _field_types(type(obj))  # type: ignore[arg-type]
    values, problems = coerce_fields(type(obj), {f: getattr(obj, f) for f in names})
    for key, value in values.items():
        object.__setattr__(obj, key, value)  # frozen dataclasses too
    return problems


def options_from_dict(cls: type[T], data: Mapping[str, Any], what: str) -> T:
    """``cls(**data)`` after checking the keys and converting the values to the field types; ``what``
    names the options in errors (e.g. ``"training options"``). ``__post_init__`` checks ranges."""
    if not isinstance(data, Mapping):
        raise OptionsError(f"{what} must be a mapping of option names to values, got {_short(data)}")
    known = set(_field_types(cls))  # type: ignore[arg-type]  # as in check_fields
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise OptionsError(f"unknown {what}: {', '.join(unknown)} (valid: {', '.join(sorted(known))})")
    values, problems = coerce_fields(cls, data)
    if problems:
        raise OptionsError(f"invalid {what}: " + "; ".join(problems))
    return cls(**values)
