"""Picture of Dual-Image CLIP's test-time-adaptation pseudo-anomalies on MVTec AD bottle images.

Rows: the image; the former pseudo-anomaly (``tta_textures="pool"``: the next image's shuffled tiles) and its
mask; the default one (``tta_textures="procedural"``: augmented Perlin colour noise, DRAEM-style) and its mask.
The mean absolute change inside the mask, per kind, is printed.

    python3 benchmarks/pseudo_anomaly_grid.py [--shared ../shared] [--out benchmarks/results/...png]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from anomalens.io.images import load_image
from anomalens.methods.synthesis import synthesize_anomaly


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shared", default=os.environ.get("ANOMALENS_SHARED", "../shared"))
    parser.add_argument("--out", default="benchmarks/results/dual-image-pseudo-anomalies.png")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    folder = Path(args.shared) / "datasets" / "mvtec" / "bottle" / "test" / "good"
    paths = sorted(folder.glob("*.png"))[:6]
    images = []
    for path in paths:
        tensor = torch.from_numpy(load_image(path)).permute(2, 0, 1)[None].float() / 255
        images.append(F.interpolate(tensor, size=(args.size, args.size), mode="area")[0])
    generator = torch.Generator().manual_seed(args.seed)
    columns, changes = [], {"pool": [], "procedural": []}
    for index, image in enumerate(images):
        former, former_mask = synthesize_anomaly(image, generator, texture_source=images[(index + 1) % len(images)])
        default, default_mask = synthesize_anomaly(image, generator, augment=True)
        changes["pool"].append(float((former - image).abs()[:, former_mask == 1].mean()))
        changes["procedural"].append(float((default - image).abs()[:, default_mask == 1].mean()))
        rows = [image, former, former_mask.expand(3, -1, -1), default, default_mask.expand(3, -1, -1)]
        columns.append(torch.cat(rows, dim=1))  # stacked vertically
    for kind, values in changes.items():
        print(f"{kind}: mean |change| inside the mask {np.mean(values):.3f}")
    grid = torch.cat([F.pad(column, (2, 2, 2, 2), value=1.0) for column in columns], dim=2)
    array = (grid.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(args.out)
    print(f"wrote {args.out} ({array.shape[1]}x{array.shape[0]})")


if __name__ == "__main__":
    main()
