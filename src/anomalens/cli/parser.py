"""The ``anomalens`` commands and their options, each group of options one dataclass.

Method configs, threshold options, output settings, training configs, server settings and speed settings are the
library's own dataclasses; the few options that only the command line has (which engine, where to save) extend
them or are declared here the same way. :func:`build_parser` generates every option from them
(:mod:`anomalens.cli.options`); :func:`parse` turns the command line, and an optional ``--config`` YAML file, into
validated dataclass instances.

Only the chosen command's option classes are imported (a command names them by import path), so
``anomalens --help`` and ``anomalens list`` import neither torch nor any training code.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from anomalens.checks import check_options
from anomalens.cli.options import add_dataclass_options, build_options, check_config_keys, read_config_file
from anomalens.engines.request import OutputSettings
from anomalens.thresholds import CALIBRATIONS, ThresholdOptions


@dataclass
class MethodOptions:
    """Which detector to build (or load) and where."""

    method: str = ""  # detector method (see `anomalens list`)
    backbone: str = ""  # backbone name (a method config field); empty: the method's default
    pretrained: str = ""  # backbone weights: a tag or a path; none: every network random; empty: the method's default
    set: tuple[str, ...] = dataclasses.field(  # any method config field as NAME=VALUE, one per --set
        default=(), metadata={"one_value_per_option": True, "help": "any method config field as NAME=VALUE (repeat)"}
    )
    weights_dir: str | None = None  # folder with pretrained weights (or $ANOMALENS_WEIGHTS_DIR)
    device: str = "cpu"  # torch device, e.g. cpu or cuda
    batch_size: int | None = None  # images per forward pass; empty: the method's default


@dataclass
class ReferenceOptions(ThresholdOptions):
    """Normal references, the class name, and how the thresholds are chosen (``fit()``'s own options)."""

    reference: tuple[str, ...] = ()  # normal reference images and/or folders (several values or repeated options)
    class_name: str | None = None  # the product's name, e.g. bottle


@dataclass
class PredictOptions(OutputSettings):
    """Where ``predict`` writes (the library's output settings), which engine scores, and whether the verdicts
    are also recorded in a station's history."""

    detector: str | None = None  # a detector folder saved by `anomalens fit`
    save_detector: str | None = None  # also save the fitted detector to this folder
    engine: str = dataclasses.field(default="local", metadata={"choices": ("local", "ray")})  # where to score
    ray_address: str | None = None  # Ray cluster address (default: start a local one)
    num_workers: int = 1  # Ray actors scoring in parallel
    gpu_fraction: float | None = None  # GPUs per Ray actor (default: 1 if the cluster has any)
    record: bool = False  # also write every verdict to the station's history (--models or --db)
    product: str | None = None  # the product name the history records (default: --class-name)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_options("predict", self, {
            "engine": (self.engine in ("local", "ray"), "local or ray"),
            "num_workers": (isinstance(self.num_workers, int) and self.num_workers >= 1, "an integer >= 1"),
            "record": (not self.record or self.engine == "local", "left out with --engine ray (local engine only)"),
        })  # fmt: skip


@dataclass
class FitOptions:
    """Where ``fit`` saves the detector: a folder, or a new version of a product in the models directory."""

    out: str = ""  # folder to save the fitted detector in (or give --product)
    product: str | None = None  # add it to the models directory (--models) as this product's new, active version
    note: str | None = None  # a note recorded with the new version

    def __post_init__(self) -> None:
        check_options("fit", self, {"out": (bool(self.out) or bool(self.product),
                                            "a folder (--out DIR), or give --product NAME and --models DIR")})


@dataclass
class ExportOptions:
    """What ``export`` writes."""

    detector: str = ""  # a detector folder saved by `anomalens fit` (required)
    format: str = "onnx"  # onnx, or openvino (pip install 'anomalens[openvino]')
    out: str = ""  # folder for the model and metadata.json (required)
    batch_size: int = 1  # the exported graph's fixed batch size (the runtime pads the last batch)
    overwrite: bool = False  # replace an earlier export in --out

    def __post_init__(self) -> None:
        check_options("export", self, {
            "detector": (bool(self.detector), "a saved detector folder (--detector DIR)"),
            "format": (self.format in ("onnx", "openvino"), "onnx or openvino"),
            "out": (bool(self.out), "an output folder (--out DIR)"),
            "batch_size": (self.batch_size >= 1, ">= 1"),
        })  # fmt: skip


@dataclass
class ServeOptions:
    """Where ``serve`` listens, and a saved detector to serve."""

    detector: str | None = None  # a detector folder saved by `anomalens fit`
    host: str = "127.0.0.1"  # interface to bind (default: this machine only)
    port: int = 8000  # TCP port
    update_after: int | None = None  # with --models: publish a product's update after this many reviewed false alarms

    def __post_init__(self) -> None:
        check_options("serve", self, {"update_after": (
            self.update_after is None or (isinstance(self.update_after, int) and self.update_after >= 1),
            "an integer >= 1 or none")})  # fmt: skip


def _dataset_names() -> Sequence[str]:
    from anomalens.io.datasets import list_datasets

    return list_datasets()


@dataclass
class BenchmarkOptions:
    """Which dataset a benchmark runs on, and how."""

    dataset: str = dataclasses.field(default="", metadata={"choices": _dataset_names})  # dataset layout (required)
    root: str = ""  # dataset root folder (required)
    category: tuple[str, ...] | None = None  # categories (default: all)
    shots: str = "1"  # reference images per category: an integer, or all
    seeds: tuple[int, ...] = (0,)  # seeds for drawing references
    eval_size: str = "256"  # side maps and masks are resized to; none = each image's native size
    max_images: int | None = None  # score a fixed stratified subset of N test images per category
    out: str | None = None  # output folder for results.json, results.md and scores.csv
    overwrite: bool = False  # replace results already in --out (refused otherwise)
    references_from: str = "auto"  # where references come from: train, test (normal test images, left out), auto
    false_alarm_rates: tuple[float, ...] = ()  # measure the false-alarm rate of the conformal threshold at these
    calibration: str = dataclasses.field(default="auto", metadata={"choices": CALIBRATIONS})  # held out for the rates

    def __post_init__(self) -> None:
        check_options("benchmark", self, {
            "dataset": (bool(self.dataset), f"a dataset layout (--dataset: one of {', '.join(_dataset_names())})"),
            "root": (bool(self.root), "the dataset's root folder (--root DIR)"),
        })  # fmt: skip


@dataclass
class TrainRunOptions:
    """Where a training run writes."""

    out: str = ""  # run folder (required); a re-run on it resumes from its checkpoint
    overwrite: bool = False  # start afresh instead of resuming

    def __post_init__(self) -> None:
        check_options("train", self, {"out": (bool(self.out), "a run folder (--out DIR)")})


@dataclass
class ModelsAddOptions:
    """The saved detector ``models add`` takes in."""

    detector: str = ""  # a detector folder saved by `anomalens fit` (required)
    note: str | None = None  # a note recorded with the version
    reference: tuple[str, ...] = ()  # the reference images it was fitted on (their SHA-256 are recorded)
    drift_delta: float = 0.01  # drift alarm: a line that does not drift raises it with probability at most this

    def __post_init__(self) -> None:
        check_options("models add", self, {"detector": (bool(self.detector), "a saved detector folder (--detector)"),
                                           "drift_delta": (0 < self.drift_delta < 1, "in (0, 1)")})  # fmt: skip


@dataclass
class ModelsUpdateOptions:
    """What ``models update`` takes in: reviewed parts from the history, or folders of images."""

    from_reviews: bool = False  # take in the reviewed false alarms (and audit parts for the threshold) of the history
    images: str | None = None  # or: a folder of new normal images to take in
    calibration: str | None = None  # with --images: a folder of normal images never seen, to recalibrate on
    include_passes: int = 0  # --from-reviews: also take in this many reviewed passes (seeded draw)
    max_memory: int | None = None  # entries each memory may hold at most (additions stop there)
    keep_threshold: bool = False  # keep the threshold when there are too few parts to recalibrate on
    store: str | None = None  # the image store of the reviewed parts (default: MODELS/store)
    note: str | None = None  # a note recorded with the version
    device: str = "cpu"  # torch device of the update
    seed: int = 0  # of the --include-passes draw

    def __post_init__(self) -> None:
        check_options("models update", self, {
            "from_reviews": (self.from_reviews != bool(self.images), "exactly one of --from-reviews and --images DIR"),
            "calibration": (self.calibration is None or bool(self.images), "given with --images only"),
            "include_passes": (isinstance(self.include_passes, int) and self.include_passes >= 0, "an integer >= 0"),
            "max_memory": (self.max_memory is None or (isinstance(self.max_memory, int) and self.max_memory >= 1),
                           "an integer >= 1 or none"),
        })  # fmt: skip


@dataclass
class ModelsRemoveOptions:
    """What ``models remove`` removes."""

    version: int | None = None  # only this version (not the active one); default: the whole product


@dataclass
class HistoryOptions:
    """Which inspections ``history`` lists, and in what form."""

    product: str | None = None  # only this product
    label: str | None = dataclasses.field(default=None, metadata={"choices": ("anomalous", "normal")})  # the verdict
    reviewed: bool | None = None  # only reviewed (--reviewed) or unreviewed (--no-reviewed) inspections
    verdict: str | None = dataclasses.field(default=None, metadata={"choices": ("anomalous", "normal")})  # reviews'
    since: str | None = None  # from this time on (ISO 8601, e.g. 2026-12-05 or 2026-12-05T08:00; UTC if no zone)
    until: str | None = None  # before this time (ISO 8601)
    limit: int | None = 1000  # at most this many, newest first (none: all)
    format: str = dataclasses.field(default="table", metadata={"choices": ("table", "csv", "json", "parquet")})  # how
    out: str | None = None  # write to this file (atomically) instead of standard output; parquet needs it

    def __post_init__(self) -> None:
        check_options("history", self, {
            "out": (self.format != "parquet" or bool(self.out), "a file (--out FILE) with --format parquet"),
            "limit": (self.limit is None or (isinstance(self.limit, int) and self.limit >= 1), "an integer >= 1"),
        })  # fmt: skip


@dataclass
class WeightsCheckOptions:
    """Which default weight sources ``weights check`` asks about."""

    component: tuple[str, ...] = ()  # only these components (see `anomalens weights list`); default: every source
    timeout: float = 10.0  # seconds to wait for each host's answer

    def __post_init__(self) -> None:
        check_options("weights check", self, {"timeout": (self.timeout > 0, "> 0 seconds")})


@dataclass
class Command:
    """One (sub)command: its help, option dataclasses (or their ``"module:Class"`` paths, imported only when the
    command is chosen), positional arguments and handler."""

    help: str
    groups: dict[str, type | str]  # namespace attribute -> options dataclass (or its import path)
    handler: str  # name of the function in anomalens.cli.commands
    positionals: Sequence[tuple[str, dict[str, Any]]] = ()
    flags: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # older spellings of some fields

    def option_classes(self) -> dict[str, type]:
        """The groups' dataclasses, imported."""
        return {title: _imported(cls) for title, cls in self.groups.items()}


def _imported(target: type | str) -> type:
    if isinstance(target, str):
        module, name = target.split(":")
        return getattr(importlib.import_module(module), name)
    return target


_METHOD = {"method": MethodOptions}
_PATHS = {"models": "anomalens.station.settings:StationPaths"}
_STATION = {**_PATHS, "station": "anomalens.station.settings:InspectionSettings"}
_SERVE = {"serve": ServeOptions, "settings": "anomalens.engines.serve:ServerSettings",
          "access": "anomalens.engines.access:AccessSettings", **_STATION,
          "pool": "anomalens.station.settings:PoolOptions"}  # fmt: skip
_NAME = ("name", {"help": "the product's name"})
COMMANDS: dict[str, Command] = {
    "predict": Command(
        "score images; write heatmaps, raw maps and scores",
        {**_METHOD, "references": ReferenceOptions, "run": PredictOptions, **_PATHS},
        "cmd_predict",
        [("inputs", {"nargs": "*", "help": "image files and/or folders (searched recursively)"})],
        flags={"map_scale": ["--map-scale", "--map-range"]},
    ),
    "export": Command("export a fitted detector to ONNX / OpenVINO for the torch-free runtime",
                      {"export": ExportOptions}, "cmd_export"),
    "fit": Command("fit a detector on reference images and save it (or add it to the models directory)",
                   {**_METHOD, "references": ReferenceOptions, "run": FitOptions, **_PATHS}, "cmd_fit"),
    "serve": Command("HTTP API and browser page over one detector, or with --models over every product (with "
                     "the history and its review page)", {**_METHOD, "references": ReferenceOptions, **_SERVE},
                     "cmd_serve", flags={"request_timeout_s": ["--timeout", "--request-timeout-s"]}),
    "watch": Command(
        "score each new image file of a folder exactly once, record it, move it to done/ or failed/",
        {**_STATION, "watch": "anomalens.station.watch:WatchOptions"}, "cmd_watch",
        [("folder", {"help": "the folder cameras or gateways drop images into"})],
    ),
    "history": Command("list or export the station's inspections", {**_PATHS, "history": HistoryOptions},
                       "cmd_history"),
    "models add": Command("add a saved detector as a product's new, active version", {**_PATHS,
                          "add": ModelsAddOptions}, "cmd_models_add", [_NAME]),
    "models update": Command("take reviewed false alarms (or new normal images) into a product's detector as a new "
                             "version, its threshold recalibrated", {**_PATHS, "update": ModelsUpdateOptions},
                             "cmd_models_update", [_NAME]),
    "models list": Command("the products, their active versions and thresholds", _PATHS, "cmd_models_list"),
    "models show": Command("one product's versions", _PATHS, "cmd_models_show", [_NAME]),
    "models rollback": Command(
        "make an earlier version active (default: the one before the active one)", _PATHS, "cmd_models_rollback",
        [_NAME, ("version", {"nargs": "?", "type": int, "help": "the version to make active"})],
    ),
    "models remove": Command("remove a product, or one version of it", {**_PATHS, "remove": ModelsRemoveOptions},
                             "cmd_models_remove", [_NAME]),
    "benchmark": Command("reproduce paper-style tables on a dataset", {**_METHOD, "benchmark": BenchmarkOptions},
                         "cmd_benchmark"),
    "benchmark-speed": Command("time methods side by side", {"speed": "anomalens.evaluation.speed:SpeedOptions"},
                               "cmd_benchmark_speed"),
    "train patchclip": Command(
        "PatchCLIP projections for clipfusion", {"train": "anomalens.methods.clipfusion.training:PatchCLIPTrainConfig"},
        "cmd_train_patchclip",
        flags={"learning_rate": ["--learning-rate", "--lr"], "categories": ["--categories", "--category"]},
    ),
    "train vlmdiff": Command(
        "VLMDiff's caption-conditioned diffusion model",
        {"train": "anomalens.methods.vlmdiff.training:VLMDiffTrainConfig", "run": TrainRunOptions},
        "cmd_train_vlmdiff",
        flags={"learning_rate": ["--learning-rate", "--lr"], "caption_file": ["--caption-file", "--captions"]},
    ),
    "weights download": Command(
        "fill the weights cache with what a method needs", _METHOD, "cmd_weights_download",
        [("method_name", {"nargs": "?", "help": "method name (or --method)"})],
    ),
    "weights list": Command(
        "every pretrained component each method needs, and where it is found", _METHOD, "cmd_weights_list",
        [("method_name", {"nargs": "?", "help": "one method (default: all, with their default options)"})],
    ),
    "weights check": Command(
        "ask each default weight source whether it still exists (metadata only; exit 1 if any is missing)",
        {"check": WeightsCheckOptions}, "cmd_weights_check",
    ),
    "list": Command("the available methods, backbones and datasets", {}, "cmd_list"),
}  # fmt: skip


def _version() -> str:
    from anomalens import __version__

    return __version__


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``anomalens`` parser, every option generated from the dataclasses in :data:`COMMANDS`.

    Args:
        only: Generate the options of this command alone (the others are listed with their help); ``None``: of
            every command (the CLI reference, the tests).
    """
    parser = argparse.ArgumentParser(prog="anomalens", description="Visual anomaly detection with foundation models.")
    parser.add_argument("--version", action="version", version=f"anomalens {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only, no progress bars")
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    nested: dict[str, argparse._SubParsersAction] = {}
    for name, command in COMMANDS.items():
        words = name.split()
        if len(words) == 2 and words[0] not in nested:
            group = top.add_parser(words[0], help=f"{words[0]} commands")
            nested[words[0]] = group.add_subparsers(dest="action", required=True, metavar="ACTION")
        container = nested[words[0]] if len(words) == 2 else top
        sub = container.add_parser(words[-1], help=command.help, description=command.help)
        sub.set_defaults(command_key=name)
        if only is not None and name != only:
            continue
        for positional, options in command.positionals:
            sub.add_argument(positional, **options)
        for title, cls in command.option_classes().items():
            add_dataclass_options(sub.add_argument_group(title), cls, flags=command.flags)
        sub.add_argument("--config", metavar="FILE", help="YAML file of option values (the command line overrides)")
        sub.add_argument("--print-config", action="store_true", help="print the resolved options as YAML and exit")
    return parser


def command_parser(name: str) -> argparse.ArgumentParser:
    """The parser of one command (``"predict"``, ``"train vlmdiff"``), with every option: for its help and for the
    generated CLI reference."""
    parser = build_parser(only=name)
    for word in name.split():
        action = next(item for item in parser._actions if isinstance(item, argparse._SubParsersAction))
        parser = action.choices[word]
    return parser


def chosen_command(argv: Sequence[str]) -> str | None:
    """The command an argument list names (``"predict"``, ``"train vlmdiff"``), read before parsing: the first
    word that is not an option (only flags without values may come before it), and the next for a group."""
    words = [item for item in argv if not item.startswith("-")]
    if not words:
        return None
    if len(words) >= 2 and f"{words[0]} {words[1]}" in COMMANDS:
        return f"{words[0]} {words[1]}"
    return words[0] if words[0] in COMMANDS else None


def parse(argv: Sequence[str] | None) -> tuple[Command, SimpleNamespace, argparse.Namespace]:
    """Parse the command line into ``(command, options, raw namespace)``.

    ``options`` has one attribute per group of the command (a validated dataclass instance each) plus the
    positional arguments.
    """
    import sys

    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(only=chosen_command(arguments) or "")
    namespace, extra = parser.parse_known_args(arguments)
    command = COMMANDS[namespace.command_key]
    if extra:  # inputs may stand anywhere between the options: ``predict in1/ --method m in2/``
        options_left = [item for item in extra if item.startswith("-")]
        if options_left or "inputs" not in dict(command.positionals):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        namespace.inputs = [*namespace.inputs, *extra]
    classes = command.option_classes()
    file_values = read_config_file(namespace.config) if namespace.config else {}
    if file_values:
        check_config_keys(file_values, list(classes.values()), source=namespace.config)
    owner = namespace.command_key
    options = SimpleNamespace(**{title: build_options(cls, file_values, namespace, owner=owner)
                                 for title, cls in classes.items()})  # fmt: skip
    for positional, _ in command.positionals:
        setattr(options, positional, getattr(namespace, positional))
    return command, options, namespace


def handler_of(command: Command) -> Callable[..., int]:
    from anomalens.cli import commands

    return getattr(commands, command.handler)
