"""Method configurations: plain dataclasses, validated when built from user options.

Every method declares a ``@dataclass`` config with one comment per field. ``build_config`` turns
keyword options (from Python or from the CLI's ``--set key=value``) into that dataclass, rejecting
unknown names with the list of valid ones and coercing strings from the command line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from typing import Any, TypeVar, Union

ConfigT = TypeVar("ConfigT")


def config_fields(config_cls: type) -> list[str]:
    """Names of the fields of a config dataclass, in declaration order."""
    return [field.name for field in dataclasses.fields(config_cls)]


def _is_optional(annotation: Any) -> tuple[bool, Any]:
    """Split ``X | None`` into ``(True, X)``; anything else into ``(False, annotation)``."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) < len(typing.get_args(annotation)):
            return True, args[0] if len(args) == 1 else Union[tuple(args)]  # noqa: UP007
    return False, annotation


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Convert ``value`` (often a CLI string) to ``annotation``; raise ``ValueError`` naming the field."""
    optional, inner = _is_optional(annotation)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional or value is None and inner is Any:
            return None
        raise ValueError(f"option {name!r} may not be None")
    origin = typing.get_origin(inner)
    try:
        if inner is bool:
            if isinstance(value, str):
                lowered = value.lower()
                if lowered in ("1", "true", "yes", "on"):
                    return True
                if lowered in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if inner in (int, float):
            if isinstance(value, bool):
                raise ValueError(value)
            converted = inner(value)
            if inner is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return converted
        if inner is str:
            return str(value)
        if origin in (tuple, list):
            (item_type, *_rest) = typing.get_args(inner) or (Any,)
            if isinstance(value, str):
                text = value.strip()
                items = json.loads(text) if text.startswith("[") else [part for part in text.split(",") if part]
            else:
                items = list(value)
            if item_type is not Any and item_type is not Ellipsis:
                items = [_coerce(name, item, item_type) for item in items]
            return tuple(items) if origin is tuple else list(items)
    except (TypeError, ValueError, json.JSONDecodeError):
        raise ValueError(f"option {name!r}: cannot read {value!r} as {getattr(inner, '__name__', inner)}") from None
    return value


def build_config(config_cls: type[ConfigT], options: dict[str, Any], *, method: str) -> ConfigT:
    """Build ``config_cls`` from keyword options, checking names and types.

    Args:
        config_cls: The method's config dataclass.
        options: Field values by name; strings are coerced to the field's type.
        method: The method's registered name, used in error messages.

    Returns:
        The config instance (its ``__post_init__`` validates values).

    Raises:
        ValueError: An unknown option (the message lists the valid ones) or a value of the wrong type.
    """
    valid = config_fields(config_cls)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; valid options: {', '.join(valid)}")
    hints = typing.get_type_hints(config_cls)
    coerced = {name: _coerce(name, value, hints[name]) for name, value in options.items()}
    return config_cls(**coerced)


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_hash(method: str, config: Any) -> str:
    """Short stable hash of a method and its config, recorded with every score."""
    payload = json.dumps({"method": method, "config": config_to_dict(config)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]
