"""Configuration: plain dataclasses, validated when built, the one source of every option.

- :class:`DetectorConfig` holds the fields every method has (batch size, seed, precision, smoothing, device);
  each method's config subclasses it (the CLIP methods through
  :class:`~anomalens.methods.clip_base.CLIPConfig`) and adds its own fields, one comment per field.
- :func:`build_config` turns keyword options (from Python, a YAML file or the CLI's ``--set key=value``) into
  such a dataclass, rejecting unknown names with the list of valid ones and coercing strings.
- :func:`check_options` is the one validation helper: every rule violation becomes a ``ValueError`` that names
  the method, the option, its value and the rule.
- The command line is generated from the same dataclasses (:mod:`anomalens.cli.options`), so a default is
  written once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar, Union

from anomalens.checks import check_options
from anomalens.tiling import TileConfig

ConfigT = TypeVar("ConfigT")
PRECISIONS = ("float32", "bfloat16", "float16")  # values of every method config's ``precision`` field
RUNTIME_FIELDS = ("device",)  # fields that change where a detector runs, not what it computes (not hashed)


@dataclass
class DetectorConfig:
    """The fields every method's config has. Subclasses add theirs and may change these defaults."""

    method: ClassVar[str] = "detector"  # the registered method name, used in error messages
    weight_fields: ClassVar[tuple[str, ...]] = ()  # fields naming pretrained weights; None in each = random weights
    # fields added after detectors of the method were first saved, with the behaviour those detectors had: a saved
    # config that lacks one loads with this value, so a saved detector scores as it did when it was fitted
    saved_before_the_field: ClassVar[dict[str, Any]] = {}

    @classmethod
    def random_weights(cls) -> dict[str, Any]:
        """The options that build every network of the method with random weights (``--pretrained none``)."""
        return {name: None for name in cls.weight_fields}

    batch_size: int = 8  # images per forward pass
    seed: int = 0  # seeds every random choice of the method and random initialisation of untrained weights
    precision: str = "float32"  # "bfloat16" or "float16": networks under autocast (see Detector.autocast)
    smoothing_sigma: float = 4.0  # Gaussian sigma of the anomaly map, in pixels at the method's map size; 0 = none
    device: str = "cpu"  # torch device the detector is built on and runs on: "cpu", "cuda", "cuda:1", ...
    tiling: TileConfig | str | None = "auto"  # overlapping square tiles (anomalens.tiling); auto: chosen from the
    # references' size and aspect at fit time; none: whole images

    def __post_init__(self) -> None:
        if not isinstance(self.tiling, (TileConfig, type(None))):
            self.tiling = TileConfig.parse(self.tiling)  # "auto" stays "auto" until fit() chooses
        check_options(
            self.method,
            self,
            {
                "batch_size": (isinstance(self.batch_size, int) and self.batch_size >= 1, "an integer >= 1"),
                "seed": (isinstance(self.seed, int), "an integer"),
                "precision": (self.precision in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
                "smoothing_sigma": (self.smoothing_sigma >= 0, ">= 0"),
                "device": (isinstance(self.device, str) and bool(self.device), "a torch device name such as cpu"),
            },
        )


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
    if inner is TileConfig:
        return TileConfig.parse(value)
    if origin in (Union, types.UnionType):  # e.g. float | str: text becomes the first type that reads it, str last
        if not isinstance(value, str):
            return value  # left to the dataclass's own validation
        for member in sorted(typing.get_args(inner), key=lambda member: member is str):
            try:
                return _coerce(name, value, member)
            except ValueError:
                continue
        raise ValueError(f"option {name!r}: cannot read {value!r} as {inner}")
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
        options: Field values by name; strings are coerced to the field's type. ``preset``, for a config class
            with a ``PRESETS`` table, names a set of field values; options given beside it override them.
        method: The method's registered name, used in error messages.

    Returns:
        The config instance (its ``__post_init__`` validates values).

    Raises:
        ValueError: An unknown option or preset (the message lists the valid ones) or a value of the wrong type.
    """
    if "preset" in options:
        presets: dict[str, dict[str, Any]] = getattr(config_cls, "PRESETS", {})
        options = dict(options)
        name = options.pop("preset")
        if name not in presets:
            valid_presets = ", ".join(presets) if presets else f"none: method {method!r} has no presets"
            raise ValueError(f"unknown preset {name!r} for method {method!r}; valid presets: {valid_presets}")
        options = {**presets[name], **options}
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
    """Short stable hash of a method and its config, recorded with every score (runtime fields left out)."""
    values = {name: value for name, value in config_to_dict(config).items() if name not in RUNTIME_FIELDS}
    payload = json.dumps({"method": method, "config": values}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]
