"""What ``tiling="auto"`` (the default) picks, and what it costs or gains, on the shared data and on a synthetic
elongated part.

For each data set, PatchCore on TAEF2 (real weights, 256 px input) is fitted on good references with
``tiling="auto"`` (the default) and with the other choice (``"off"``, whole images, where auto tiled; ``"on"``,
tiles of the shorter side, where auto did not), and scores the same test images. Recorded per row: what auto
chose and why, image AUROC, seconds per test image, fit seconds.

- ``bottle``: MVTec AD bottle, 900 x 900 (83 test images).
- ``metal_plate``: MPDD metal_plate, 512 x 512 (97 test images).
- ``elongated``: a synthetic 192 x 1152 part (a brushed strip with four bolts), 20 good and 20 with a faint crack
  across it (2 px wide, 40 px long, +45 grey levels) at a random place; references are 6 more good strips (fewer
  than the others: tiled, each strip is 8 tiles, and PatchCore's memory and search grow with the tiles).

    python3 benchmarks/tiling_auto.py [--shared ../shared] [--out benchmarks/results/tiling-auto.json]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

import anomalens
from anomalens.evaluation.metrics import auroc
from anomalens.evaluation.profiling import write_benchmark_json


def _strip(rng: np.random.Generator, scratch: bool) -> np.ndarray:
    """A brushed metal strip, 192 x 1152 (6:1), with four bolts; optionally a thin crack across it."""
    height, width = 192, 1152
    grain = rng.normal(0, 1, (height, width)).cumsum(axis=1) / 40.0  # brushing along the strip
    image = 140 + 12 * np.sin(np.linspace(0, 3 * np.pi, height))[:, None] + 6 * grain
    rows, columns = np.mgrid[0:height, 0:width]
    for centre in (144, 432, 720, 1008):
        image[(rows - height / 2) ** 2 + (columns - centre) ** 2 < 24**2] = 70
    if scratch:  # across the strip: squeezed to a fraction of a pixel when the whole strip is resized to a square
        top, left = rng.integers(20, height - 60), rng.integers(30, width - 30)
        image[top : top + 40, left : left + 2] += 45
    image = np.clip(image + rng.normal(0, 2, image.shape), 0, 255).astype(np.uint8)
    return np.repeat(image[:, :, None], 3, axis=2)


def _data(shared: Path) -> dict[str, tuple[list, list, list[int]]]:
    """name -> (references, test images, labels); images as paths or arrays."""
    sets = {}
    for name, root in (("bottle", shared / "datasets/mvtec/bottle"),
                       ("metal_plate", shared / "datasets/mpdd/metal_plate")):  # fmt: skip
        references = [str(path) for path in sorted((root / "train/good").glob("*.png"))[:10]]
        tests = sorted((root / "test").rglob("*.png"))
        sets[name] = (references, [str(path) for path in tests], [int(path.parent.name != "good") for path in tests])
    rng = np.random.default_rng(0)
    references = [_strip(rng, False) for _ in range(6)]
    labels = [0] * 20 + [1] * 20
    sets["elongated"] = (references, [_strip(rng, bool(label)) for label in labels], labels)
    return sets


def _load(items: list) -> list[np.ndarray]:
    return [np.array(Image.open(item).convert("RGB")) if isinstance(item, str) else item for item in items]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", default=os.environ.get("ANOMALENS_SHARED", "../shared"))
    parser.add_argument("--out", default="benchmarks/results/tiling-auto.json")
    args = parser.parse_args()
    os.environ.setdefault("ANOMALENS_WEIGHTS_DIR", str(Path(args.shared) / "weights"))
    rows = []
    for name, (references, tests, labels) in _data(Path(args.shared)).items():
        references, tests = _load(references), _load(tests)
        tilings = ["auto"]
        for tiling in tilings:
            detector = anomalens.create("patchcore", backbone="taef2", tiling=tiling)
            began = time.perf_counter()
            detector.fit(references)
            fit_seconds = time.perf_counter() - began
            started = time.perf_counter()
            scores = [result.score for result in detector.predict(tests)]
            seconds = (time.perf_counter() - started) / len(tests)
            chosen = detector.config.tiling
            rows.append({"data": name, "size": f"{tests[0].shape[0]} x {tests[0].shape[1]}", "tiling": tiling,
                         "chosen": None if chosen is None else vars(chosen), "reason": detector.tiling_choice,
                         "image_auroc": round(float(auroc(np.asarray(scores), np.asarray(labels))), 4),
                         "seconds_per_image": round(seconds, 4), "fit_seconds": round(fit_seconds, 1)})  # fmt: skip
            print(rows[-1], flush=True)
            if tiling == "auto":  # then the choice auto did not make
                tilings.append("off" if chosen is not None else "on")
    result = write_benchmark_json(args.out, {"rows": rows})
    lines = ["# tiling=\"auto\" on the shared data and a synthetic elongated part", "", f"`{result['command']}`", "",
             "| data | size | tiling | auto chose | image AUROC | s / image | fit (s) |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        chose = row["reason"] if row["tiling"] == "auto" else ""
        lines.append(f"| {row['data']} | {row['size']} | {row['tiling']} | {chose} | {row['image_auroc']} | "
                     f"{row['seconds_per_image']} | {row['fit_seconds']} |")
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
