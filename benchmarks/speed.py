"""Side-by-side speed and memory of every registered method at full size, in one run.

Usage (from the repository root):
    python3 benchmarks/speed.py [--count 16] [--repeats 3] [--batch-sizes 1 8] [--threads 2] \
        [--methods ...] [--settings N ...] [--no-variants] [--device cpu|cuda] \
        [--dtype float32|bfloat16|float16] [--timeout 3600] [--out FILE]

This is ``anomalens benchmark-speed`` (:mod:`anomalens.evaluation.speed`, which documents every figure) with this
repository's defaults: 2 torch threads, the 16-image stratified subset of MVTec AD bottle's test images from
``$ANOMALENS_SHARED`` (default ``../shared``), and ``benchmarks/results/speed-<machine>-<threads>threads.json``
(plus the markdown table beside it) as the output. ``--list`` shows the settings and their indices.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main() -> int:
    from anomalens.cli import main as anomalens_main
    from anomalens.evaluation.speed import default_output_name

    arguments = sys.argv[1:]
    if "--threads" not in arguments:
        arguments += ["--threads", "2"]
    if "--out" not in arguments:
        threads = int(arguments[arguments.index("--threads") + 1])
        arguments += ["--out", str(ROOT / "benchmarks" / "results" / default_output_name(threads))]
    if "--shared" not in arguments and "ANOMALENS_SHARED" not in os.environ:
        arguments += ["--shared", str(ROOT.parent / "shared")]
    return anomalens_main(["benchmark-speed", *arguments])


if __name__ == "__main__":
    sys.exit(main())
