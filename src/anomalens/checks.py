"""The one validation helper every options dataclass uses, so every rule violation reads the same way."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def check_options(owner: str, config: Any, rules: Mapping[str, tuple[bool, str]]) -> None:
    """Raise ``ValueError`` for the first broken rule: ``"{owner} option {name}={value!r} must be {rule}"``.

    Args:
        owner: Who the options belong to (a method name, ``"serve"``, ...), named in the message.
        config: The dataclass holding the values.
        rules: ``name -> (holds, rule in words)``.

    Example:
        >>> from types import SimpleNamespace
        >>> check_options("serve", SimpleNamespace(port=-1), {"port": (False, "an integer in [1, 65535]")})
        Traceback (most recent call last):
        ...
        ValueError: serve option port=-1 must be an integer in [1, 65535]
    """
    for name, (holds, rule) in rules.items():
        if not holds:
            raise ValueError(f"{owner} option {name}={getattr(config, name)!r} must be {rule}")
