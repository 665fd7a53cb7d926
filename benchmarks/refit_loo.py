"""Leave-one-out threshold with 16 references: features reused across folds vs refitting from images per fold.

PatchCore on TAEF2 (real weights), 16 MVTec AD bottle train/good images. Both ways run in one process:

- the old way refits from the images for every fold, then once on all of them;
- `fit(threshold="leave-one-out")` encodes each reference once and reuses its features in every fold.

Recorded: seconds, backbone passes (images through the feature extractor), and the two thresholds, which must be
equal.

    python3 benchmarks/refit_loo.py [--shared ../shared] [--references 16]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import anomalens
from anomalens.evaluation.profiling import write_benchmark_json


def _counting(detector) -> list[int]:
    """Count the images that go through the backbone (PatchCore's ``_embed_arrays``)."""
    passes = [0]
    embed = detector._embed_arrays

    def counted(images):
        passes[0] += len(images)
        return embed(images)

    detector._embed_arrays = counted
    return passes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shared", default=os.environ.get("ANOMALENS_SHARED", "../shared"))
    parser.add_argument("--references", type=int, default=16)
    parser.add_argument("--out", default="benchmarks/results/refit-loo-bottle.json")
    args = parser.parse_args()
    good = sorted((Path(args.shared) / "datasets" / "mvtec" / "bottle" / "train" / "good").glob("*.png"))
    references = [anomalens.load_image(path) for path in good[: args.references]]
    weights = Path(args.shared) / "weights"

    old = anomalens.create("patchcore", backbone="taef2", weights_dir=weights)
    old_passes = _counting(old)
    started = time.perf_counter()
    held_out = []
    for index in range(len(references)):
        old.fit(references[:index] + references[index + 1 :], class_name="bottle", threshold=None)
        held_out.append(old.predict([references[index]])[0].score)
    old.fit(references, class_name="bottle", threshold=None)
    old_seconds = time.perf_counter() - started

    new = anomalens.create("patchcore", backbone="taef2", weights_dir=weights)
    new_passes = _counting(new)
    started = time.perf_counter()
    new.fit(references, class_name="bottle", threshold="leave-one-out")
    new_seconds = time.perf_counter() - started

    result = {
        "benchmark": f"leave-one-out threshold, PatchCore-TAEF2, {len(references)} MVTec AD bottle references",
        "references": len(references),
        "refit_per_fold": {
            "seconds": round(old_seconds, 2),
            "backbone_images": old_passes[0],
            "threshold": max(held_out),
        },  # fmt: skip
        "features_reused": {
            "seconds": round(new_seconds, 2),
            "backbone_images": new_passes[0],
            "threshold": new.threshold,
        },  # fmt: skip
        "speedup": round(old_seconds / new_seconds, 2),
        "thresholds_equal": abs(max(held_out) - new.threshold) <= 1e-5 * abs(new.threshold),
    }
    write_benchmark_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
