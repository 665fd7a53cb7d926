"""Fit a detector on a folder of references and save it, with no threshold (for large reference sets, where a
held-out threshold would cost many refits), for the export benchmark.

    python3 benchmarks/fit_saved.py --reference ../shared/datasets/mvtec/bottle/train/good --class-name bottle \
        --out runs/patchcore-taef2-bottle-fullshot --set backbone=taef2
"""

from __future__ import annotations

import argparse
import json
import time

import anomalens
from anomalens.io.images import find_images, load_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", default="patchcore")
    parser.add_argument("--set", nargs="*", default=[], help="method options NAME=VALUE")
    parser.add_argument("--reference", required=True)
    parser.add_argument("--class-name", default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    options = dict(item.split("=", 1) for item in args.set)
    references = [load_image(path) for path in find_images([args.reference])]
    began = time.perf_counter()
    detector = anomalens.create(args.method, **options).fit(references, class_name=args.class_name, threshold=None)
    seconds = time.perf_counter() - began
    detector.save(args.out)
    print(json.dumps({"references": len(references), "fit_seconds": round(seconds, 1), "out": args.out}))


if __name__ == "__main__":
    main()
