"""A PNG grid of input / reconstruction / anomaly map for a few normal and defective test images of a VLMDiff run.

Usage (from the repository root):
    python3 benchmarks/vlmdiff_grid.py --run runs/vlmdiff-bottle-small --set feature_extractor=taef2 \
        --root ../shared/datasets/mvtec/bottle/test --out benchmarks/results/vlmdiff-.../grid.png

Rows: two images from each test sub-folder (``good`` first). Columns: input, reconstruction, anomaly map
(jet colours on one scale for the whole grid, so rows compare), map over the input. Each row is labelled
with its folder and image score.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import anomalens
from anomalens.io.images import find_images, load_image
from anomalens.io.outputs import atomic_write_bytes, jet_colormap, png_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="VLMDiff training run folder")
    parser.add_argument("--root", required=True, help="test split folder with good/ and defect sub-folders")
    parser.add_argument("--per-folder", type=int, default=2, help="images per sub-folder")
    parser.add_argument("--set", dest="options", action="append", default=[], help="detector option NAME=VALUE")
    parser.add_argument("--out", required=True, help="output PNG")
    args = parser.parse_args()
    options = dict(item.split("=", 1) for item in args.options)
    detector = anomalens.create("vlmdiff", checkpoint=args.run, **options).fit()
    folders = sorted(Path(args.root).iterdir(), key=lambda folder: (folder.name != "good", folder.name))
    paths = [path for folder in folders if folder.is_dir() for path in find_images([folder])[: args.per_folder]]
    images = [load_image(path) for path in paths]
    pixels, reconstructions = detector.reconstruct(images)
    results = detector.predict(images)
    side = pixels.shape[-1]
    maps = [np.asarray(Image.fromarray(result.anomaly_map).resize((side, side), Image.BILINEAR)) for result in results]
    low, high = min(float(m.min()) for m in maps), max(float(m.max()) for m in maps)
    label_width, rows = 220, []
    for path, pixel, rebuilt, anomaly_map, result in zip(paths, pixels, reconstructions, maps, results):
        original = (pixel.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        rebuilt = (rebuilt.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        heat = jet_colormap((anomaly_map - low) / max(high - low, 1e-12))
        overlay = (0.55 * original + 0.45 * heat).astype(np.uint8)
        label = Image.new("RGB", (label_width, side), "white")
        draw = ImageDraw.Draw(label)
        draw.text((8, side // 2 - 14), f"{path.parent.name}/{path.name}", fill="black")
        draw.text((8, side // 2 + 2), f"score {result.score:.4f}", fill="black")
        rows.append(np.concatenate([np.asarray(label), original, rebuilt, heat, overlay], axis=1))
    header = Image.new("RGB", (rows[0].shape[1], 24), "white")
    draw = ImageDraw.Draw(header)
    for index, title in enumerate(["input", "reconstruction", f"map ({low:.3f}..{high:.3f})", "overlay"]):
        draw.text((label_width + index * side + 8, 6), title, fill="black")
    grid = Image.fromarray(np.concatenate([np.asarray(header), *rows], axis=0))
    atomic_write_bytes(args.out, png_bytes(np.asarray(grid)))
    print(f"wrote {args.out} ({len(paths)} rows)")


if __name__ == "__main__":
    main()
