"""Typed pass configs from dicts, CLI strings (``k=v,k2=v2``) and TOML tables.

Unknown keys are errors that list the valid ones (the opposite of a silently ignored
``extra_options`` dict). Values given as strings are converted to the field's type.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

__all__ = ["describe", "from_dict", "option", "parse_options"]

C = TypeVar("C")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def from_dict(config_class: type[C], values: Mapping[str, Any], *, owner: str = "") -> C:
    """Build ``config_class`` from ``values``, converting strings and rejecting unknown keys.

    Raises:
        ValueError: an unknown key (with the valid ones listed) or a value of the wrong type.
    """
    owner = owner or config_class.__name__
    fields = {f.name: f for f in dataclasses.fields(config_class) if f.init}
    hints = typing.get_type_hints(config_class)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        valid = ", ".join(fields) or "(none)"
        raise ValueError(f"unknown option {unknown[0]!r} for {owner}; valid: {valid}")
    kwargs = {}
    for key, raw in values.items():
        try:
            kwargs[key] = _convert(raw, hints[key])
        except (TypeError, ValueError) as err:
            raise ValueError(f"option {key!r} of {owner}: {err}") from None
    return config_class(**kwargs)


def parse_options(text: str) -> dict[str, str]:
    """Parse ``"k=v,k2=v2"`` (values may hold commas inside ``[...]``) into a dict of strings."""
    out: dict[str, str] = {}
    depth = 0
    item = ""
    items = []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            items.append(item)
            item = ""
        else:
            item += ch
    items.append(item)
    for part in items:
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise ValueError(f"expected key=value, got {part!r}")
        key, value = part.split("=", 1)
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def _convert(raw: Any, hint: Any) -> Any:  # noqa: PLR0911 - one branch per supported type
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(raw, arg)
            except (TypeError, ValueError) as err:
                errors.append(str(err))
        raise ValueError("; ".join(errors))
    if origin is typing.Literal:
        for arg in args:
            text = str(raw).lower() if isinstance(raw, bool) else raw  # TOML true -> "true"
            if text == arg or (isinstance(text, str) and str(arg) == text):
                return arg
        raise ValueError(f"expected one of {', '.join(map(repr, args))}, got {raw!r}")
    if origin in (frozenset, tuple, list, set):
        items = _as_list(raw)
        inner = args[0] if args else str
        converted = [_convert(x, inner) for x in items]
        return frozenset(converted) if origin in (frozenset, set) else origin(converted)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return raw if isinstance(raw, hint) else hint(raw)
        except ValueError:
            valid = ", ".join(repr(m.value) for m in hint)
            raise ValueError(f"expected one of {valid}, got {raw!r}") from None
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in _TRUE | _FALSE:
            return raw.lower() in _TRUE
        raise ValueError(f"expected true/false, got {raw!r}")
    if hint is int:
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise ValueError(f"expected an integer, got {raw!r}")
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise ValueError(f"expected an integer, got {raw!r}") from None
    if hint is float:
        if isinstance(raw, bool):
            raise ValueError(f"expected a number, got {raw!r}")
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {raw!r}") from None
    if hint is str:
        if not isinstance(raw, str):
            raise ValueError(f"expected a string, got {raw!r}")
        return raw
    return raw  # Any, or a type the caller validates in __post_init__


def _as_list(raw: Any) -> list[Any]:
    if isinstance(raw, str):
        text = raw.strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        return [x.strip() for x in text.replace(";", ",").split(",") if x.strip()]
    if isinstance(raw, (list, tuple, set, frozenset)):
        return list(raw)
    raise ValueError(f"expected a list, got {raw!r}")


def describe(config_class: type) -> list[dict[str, str]]:
    """Per field: name, type, default and help (from the ``#:`` style field metadata)."""
    rows = []
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        if not field.init:
            continue
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = "(required)"
        hint = hints[field.name]
        type_name = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
        rows.append(
            {
                "name": field.name,
                "type": type_name,
                "default": _show(default),
                "help": field.metadata.get("help", ""),
            }
        )
    return rows


def _show(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, frozenset):
        return "[" + ",".join(sorted(map(str, value))) + "]"
    return str(value)


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None) -> Any:  # noqa: A002
    """A config field with a help text shown by ``onnxopt passes``."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})
