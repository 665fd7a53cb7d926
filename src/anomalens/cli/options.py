"""Command-line options generated from dataclasses, so every default is written once, beside its field.

Each field of an options dataclass becomes ``--field-name`` (underscores as dashes). Its help is the field's
comment: the comment on its line and the lines continuing it, or the block above a field without one (see
:func:`field_comments`); a field's metadata ``help`` replaces it, and its metadata ``choices`` (a sequence, or a
callable returning one) become the accepted values, listed in the help. ``bool`` fields become ``--name`` /
``--no-name``, tuple and list fields take one or more values (repeating the option adds more; a field with
``one_value_per_option`` in its metadata takes one value per option, so it never swallows the positional arguments
after it), nested dataclass fields are flattened into the parent's options, and ``none`` sets an optional field to
``None``. Values are coerced and validated by the dataclass itself (:func:`anomalens.config.build_config` and its
``__post_init__``), so the command line, a YAML ``--config`` file and the Python API accept exactly the same
things.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import io
import tokenize
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from anomalens.config import _is_optional, build_config

MISSING = dataclasses.MISSING


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """``field name -> help`` from a dataclass's comments (and its bases'): the comment on the field's line, with the
    comment lines that continue it below; a field without one takes the comment block right above it."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        fields = {field.name for field in dataclasses.fields(klass)}
        comments.update(_class_comments(source, fields))
    return comments


def _class_comments(source: str, fields: set[str]) -> dict[str, str]:
    """The help of each field in one class body's source (see :func:`field_comments`)."""
    comments: dict[str, str] = {}
    block: list[str] = []  # comment-only lines since the last statement
    current, trailing, previous = None, [], None  # the field being read, its own comments, the last field read
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.NAME and token.start[1] == 4 and current is None and not trailing:
            current = token.string if token.string in fields else ""
        elif token.type == tokenize.COMMENT:
            text = token.string.lstrip("# ").strip()
            if token.line.strip().startswith("#") and current is None:
                block.append(text)
            elif current is not None:
                trailing.append(text)
        elif token.type == tokenize.NEWLINE and current is not None:
            if current:  # a field: a comment block above one without its own comment is its help, else a
                if not trailing:  # continuation of the previous field's
                    comments[current] = " ".join(block)
                else:
                    if block and previous in comments:
                        comments[previous] = f"{comments[previous]} {' '.join(block)}"
                    comments[current] = " ".join(trailing)
                previous = current
            block, current, trailing = [], None, []
    if block and previous in comments:  # comment lines after the last field continue it
        comments[previous] = f"{comments[previous]} {' '.join(block)}"
    return {name: text for name, text in comments.items() if text}


def _default_text(field: dataclasses.Field) -> str:
    if field.default is not MISSING:
        value = field.default
    elif field.default_factory is not MISSING:  # type: ignore[misc]
        return ""
    else:
        return " (required)"
    if value is None or value == "" or value == ():
        return ""
    if isinstance(value, (tuple, list)):
        value = " ".join(str(item) for item in value)
    return f" (default: {value})"


def _is_sequence(annotation: Any) -> bool:
    _, inner = _is_optional(annotation)
    return typing.get_origin(inner) in (tuple, list)


def add_dataclass_options(
    parser: argparse._ActionsContainer,
    cls: type,
    *,
    exclude: Sequence[str] = (),
    flags: Mapping[str, Sequence[str]] | None = None,
    prefix: str = "",
) -> None:
    """Add one option per field of dataclass ``cls`` to ``parser``.

    Args:
        parser: A parser or argument group.
        cls: The options dataclass.
        exclude: Field names to leave out (set by the command itself).
        flags: ``field name -> option strings`` where a field keeps an older or shorter spelling too
            (e.g. ``{"learning_rate": ["--learning-rate", "--lr"]}``).
        prefix: Destination prefix of a nested dataclass's fields (``"architecture."``).
    """
    flags = flags or {}
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    for field in dataclasses.fields(cls):
        if field.name in exclude or not field.init:
            continue
        annotation = hints[field.name]
        if dataclasses.is_dataclass(annotation):
            add_dataclass_options(parser, annotation, exclude=exclude, flags=flags, prefix=f"{prefix}{field.name}.")
            continue
        names = list(flags.get(field.name, ["--" + field.name.replace("_", "-")]))
        choices = field.metadata.get("choices")
        choices = list(choices() if callable(choices) else choices) if choices is not None else None
        help_text = (field.metadata.get("help") or comments.get(field.name, ""))
        if choices:
            help_text += f" (one of: {', '.join(map(str, choices))})"
        help_text = (help_text + _default_text(field)).replace("%", "%%")
        options: dict[str, Any] = {"dest": prefix + field.name, "default": argparse.SUPPRESS, "help": help_text}
        if choices:
            options["choices"] = choices
        if _is_optional(annotation)[1] is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif _is_sequence(annotation) and field.metadata.get("one_value_per_option"):
            options.update(action="append", metavar=field.name.upper())  # --set a=1 --set b=2: never swallows inputs
        elif _is_sequence(annotation):
            options.update(nargs="+", action="extend", metavar=field.name.upper())
        else:
            options["metavar"] = field.name.upper()
        if field.default is MISSING and field.default_factory is MISSING and not prefix:  # type: ignore[misc]
            options["required"] = True
            options.pop("default")
        parser.add_argument(*names, **options)


def given_values(namespace: argparse.Namespace, cls: type, prefix: str = "") -> dict[str, Any]:
    """The values of ``cls``'s fields that were given on the command line (nested dataclasses as dicts)."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[field.name]):
            nested = given_values(namespace, hints[field.name], f"{prefix}{field.name}.")
            if nested:
                values[field.name] = nested
        elif hasattr(namespace, prefix + field.name):
            values[field.name] = getattr(namespace, prefix + field.name)
    return values


def build_options(cls: type, file_values: Mapping[str, Any], namespace: argparse.Namespace, *, owner: str) -> Any:
    """An instance of ``cls`` from a ``--config`` file's values, overridden by the command line's.

    Raises:
        ValueError: An unknown key in the file (the message lists the valid ones) or a bad value.
    """
    values = {key: value for key, value in file_values.items() if key in _field_names(cls)}
    for name, value in given_values(namespace, cls).items():
        if isinstance(value, dict) and isinstance(values.get(name), Mapping):
            value = {**values[name], **value}
        values[name] = value
    hints = typing.get_type_hints(cls)
    for name, value in list(values.items()):
        if dataclasses.is_dataclass(hints[name]) and isinstance(value, Mapping):
            values[name] = build_config(hints[name], dict(value), method=f"{owner} {name}")
    return build_config(cls, values, method=owner)


def _field_names(cls: type) -> set[str]:
    return {field.name for field in dataclasses.fields(cls)}


def check_config_keys(file_values: Mapping[str, Any], classes: Sequence[type], *, source: str) -> None:
    """Refuse keys of a ``--config`` file that no options dataclass of the command has."""
    valid = set().union(*(_field_names(cls) for cls in classes))
    unknown = sorted(set(file_values) - valid)
    if unknown:
        raise ValueError(f"{source}: unknown option(s) {unknown}; valid options: {', '.join(sorted(valid))}")


def read_config_file(path: str) -> dict[str, Any]:
    """A YAML (or JSON) mapping of option names to values; dashes in names are read as underscores."""
    import yaml

    try:
        with open(path) as handle:
            loaded = yaml.safe_load(handle)
    except OSError as error:
        raise ValueError(f"cannot read --config {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ValueError(f"--config {path} is not valid YAML: {error}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, Mapping):
        raise ValueError(f"--config {path} must hold a mapping of option names to values, got {type(loaded).__name__}")
    return {str(key).replace("-", "_"): value for key, value in loaded.items()}


def to_yaml(options: Sequence[Any]) -> str:
    """The resolved options of a command as YAML (what ``--print-config`` prints; ``--config`` reads it back)."""
    import yaml

    merged: dict[str, Any] = {}
    for instance in options:
        merged.update(_plain(dataclasses.asdict(instance)))
    return yaml.safe_dump(merged, sort_keys=False)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value
