"""The ``anomalens`` command line.

Commands:
    predict    score image files and folders; write heatmaps, raw maps, scores.jsonl / scores.csv
    benchmark  reproduce paper-style tables on MVTec AD, VisA, Real-IAD or your own folder
    benchmark-speed
               time every method side by side (seconds, FLOPs, % of the matmul peak, stages, peak memory)
    fit        fit a detector on reference images and save it (for predict --detector)
    serve      an HTTP API and a browser page over one detector
    train      train learned components (PatchCLIP projections for clipfusion, VLMDiff)
    weights    download the pretrained weights a method needs, list where they are found, or check their sources
    list       the available methods, backbones and datasets

Every option is generated from a dataclass (:mod:`anomalens.cli.parser`): method options, or any method config
field with ``--set NAME=VALUE``; ``--config FILE`` reads option values from YAML and ``--print-config`` prints the
resolved ones. Errors are reported in one line, without a traceback (set ``ANOMALENS_DEBUG=1`` for one).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from anomalens.cli.parser import build_parser, handler_of, parse

__all__ = ["build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``anomalens`` command."""
    try:
        command, options, namespace = parse(list(argv) if argv is not None else None)
    except (ValueError, ImportError) as error:
        if os.environ.get("ANOMALENS_DEBUG"):
            raise
        print(f"anomalens: error: {error}", file=sys.stderr)
        return 2
    level = logging.DEBUG if namespace.verbose else logging.WARNING if namespace.quiet else logging.INFO
    # Our own messages at the chosen level; other libraries' (open_clip, Ray, ...) at warnings only.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("anomalens").setLevel(level)
    if namespace.print_config:
        from anomalens.cli.options import to_yaml

        print(to_yaml(list(vars(options).values())[: len(command.groups)]), end="")
        return 0
    try:
        return handler_of(command)(options, namespace.quiet)
    except KeyboardInterrupt:  # Ctrl+C or SIGTERM: run folders are already marked "interrupted"
        print("anomalens: interrupted; results written so far are kept (re-run the command to resume a Ray run)",
              file=sys.stderr)  # fmt: skip
        return 130
    except (ValueError, OSError, ImportError, RuntimeError) as error:  # OSError: files, folders, links, disks
        if os.environ.get("ANOMALENS_DEBUG"):
            raise
        print(f"anomalens: error: {error}", file=sys.stderr)
        return 2
