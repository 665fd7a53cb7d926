"""``anomalens-runtime``: score with an exported detector, without torch (numpy, Pillow and onnxruntime or
OpenVINO only). It writes the same run folder as ``anomalens predict``, through the same predict request.

Usage: ``anomalens-runtime predict MODEL_DIR INPUT... --out DIR [--threshold X] [--backend onnx|openvino]``
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from anomalens.runtime import BACKENDS, ExportedDetector


def build_parser() -> argparse.ArgumentParser:
    """The ``anomalens-runtime`` parser."""
    parser = argparse.ArgumentParser(prog="anomalens-runtime", description="Run an exported anomalens detector.")
    commands = parser.add_subparsers(dest="command", required=True)
    predict = commands.add_parser("predict", help="score images; write heatmaps, raw maps, masks and scores")
    predict.add_argument("model", help="a folder written by anomalens export")
    predict.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    predict.add_argument("--out", required=True, help="output folder")
    predict.add_argument("--threshold", default=None,
                         help="override the exported threshold: a finite number, or none (no labels)")  # fmt: skip
    predict.add_argument("--batch-size", type=int, default=None, help="images per model call")
    predict.add_argument("--raw-format", choices=("npy", "png16"), default="npy")
    predict.add_argument("--no-overlays", action="store_true", help="write only raw maps, masks and scores")
    predict.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    predict.add_argument("--backend", choices=BACKENDS, default=None, help="default: the one exported")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``anomalens-runtime predict MODEL_DIR INPUT... --out DIR``: score with an exported detector, no torch."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = _predict(args)
    except (ValueError, ImportError, OSError) as error:
        print(f"anomalens-runtime: error: {error}", file=sys.stderr)
        return 2
    for item in summary.skipped_inputs:
        print(f"skipped {item['path']}: {item['error']}", file=sys.stderr)
    print(summary.line())
    return 0


def _predict(args: argparse.Namespace):
    from anomalens.engines.local import run_predict
    from anomalens.engines.request import OutputSettings, PredictRequest
    from anomalens.thresholds import apply_threshold_options, threshold_from_text

    settings = OutputSettings(out=args.out, overwrite=args.overwrite, raw_format=args.raw_format,
                              overlays=not args.no_overlays)  # fmt: skip
    command = "anomalens-runtime " + " ".join(sys.argv[1:])
    request = PredictRequest.prepare(args.inputs, settings, run_info={"command": command}, batch_size=args.batch_size)
    detector = ExportedDetector.load(args.model, args.backend)
    if args.threshold is not None:  # decided and checked like every threshold (a NaN or inf is refused)
        apply_threshold_options(detector, [], None, threshold_from_text(args.threshold))
    return run_predict(detector, request.calibrated(detector))


if __name__ == "__main__":
    sys.exit(main())
