"""What a coarser anomaly map costs in localisation: a measured bound for CLIPFusion's SD-at-256-px setting.

Usage (from the repository root):
    python3 benchmarks/map_resolution.py [--sides 64 32 16 8] [--threads 2] [--out FILE]

CLIPFusion's diffusion maps come from UNet layers whose feature sides are 32 and 16 with SD at 512 px, and
16 and 8 at 256 px (the same layers). Without SD's weights the accuracy of either cannot be measured here, so
this script measures what the coarser grid alone costs, on MVTec AD bottle's real masks
(``$ANOMALENS_SHARED/datasets/mvtec``), two ways:

- **Oracle maps**: each test image's ground-truth mask area-averaged onto an s x s grid (the best an s x s map
  can know), then brought back the way CLIPFusion does it (bilinear to ``map_size`` 256, Gaussian sigma 4).
  Their pixel AUROC and AUPRO are the ceiling any s x s map can reach.
- **A real detector's maps**: PatchCore on TAEF2 with its real weights (1-shot, seed 0) pooled onto the same
  grids and brought back the same way, so the loss is measured on maps with a real detector's errors.

CLIPFusion averages the layers of both sides (each brought to the larger side first), so its diffusion map is
modelled as the mean of the 32 x 32 and 16 x 16 versions (SD at 512 px) or of the 16 x 16 and 8 x 8 ones
(256 px). Its fused map also adds CLIP's 24 x 24 map (ViT-L/14 at 336 px), which does not change with the SD
size; the ``fused`` rows average that with the diffusion map, as the fusion does with alpha 0.5.

Output: ``benchmarks/results/map-resolution-bottle.json`` (with the command and machine) and a markdown table.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SHARED = Path(os.environ.get("ANOMALENS_SHARED", Path(__file__).resolve().parents[1] / ".." / "shared"))
EVAL_SIZE = 256  # the benchmark harness's eval size and CLIPFusion's map_size
SIGMA = 4.0  # CLIPFusion's smoothing_sigma at map_size
CLIP_SIDE = 24  # ViT-L/14 at 336 px


def at_side(maps: torch.Tensor, side: int) -> torch.Tensor:
    """``(N, H, W)`` maps area-averaged onto ``side x side`` and brought back to ``EVAL_SIZE`` (bilinear)."""
    coarse = F.adaptive_avg_pool2d(maps[:, None], side)
    return F.interpolate(coarse, size=(EVAL_SIZE, EVAL_SIZE), mode="bilinear", align_corners=False)[:, 0]


def at_sides(maps: torch.Tensor, sides: tuple[int, ...]) -> torch.Tensor:
    """The mean of the ``sides`` versions of ``maps``: CLIPFusion's average over its attention layers."""
    return torch.stack([at_side(maps, side) for side in sides]).mean(0)


def fused(maps: torch.Tensor, diffusion_sides: tuple[int, ...]) -> torch.Tensor:
    """The average of the CLIP-grid and the diffusion-grid versions, as CLIPFusion's alpha = 0.5 fusion."""
    return (at_side(maps, CLIP_SIDE) + at_sides(maps, diffusion_sides)) / 2


DIFFUSION_SIDES = {"SD 512 px": (32, 16), "SD 256 px": (16, 8)}  # feature sides of attention_resolutions' layers


def localisation(maps: torch.Tensor, masks: np.ndarray) -> dict[str, float]:
    """Pixel AUROC and AUPRO (to FPR 0.3) of ``(N, S, S)`` maps, Gaussian-smoothed first, against the masks."""
    from anomalens.evaluation.metrics import aupro, auroc
    from anomalens.nn.maps import gaussian_blur

    smoothed = gaussian_blur(maps, SIGMA).numpy()
    return {
        "pixel_auroc": round(100 * auroc(smoothed.ravel(), masks.ravel()), 2),
        "pixel_aupro": round(100 * aupro(list(smoothed), list(masks)), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[64, 32, 16, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/map-resolution-bottle.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import anomalens
    from anomalens.evaluation.benchmark import draw_references
    from anomalens.io.datasets import MVTecAD
    from anomalens.io.images import load_image

    dataset = MVTecAD(SHARED / "datasets" / "mvtec")
    samples = dataset.test_samples("bottle")
    masks = []
    for sample in samples:
        mask = sample.mask(load_image(sample.image_path).shape[:2])
        tensor = torch.from_numpy(mask.astype(np.float32))[None, None]
        masks.append(F.interpolate(tensor, size=(EVAL_SIZE, EVAL_SIZE), mode="area")[0, 0])
    soft_masks = torch.stack(masks)  # (N, 256, 256) in [0, 1]
    binary_masks = (soft_masks > 0.5).numpy()

    started = time.perf_counter()
    detector = anomalens.create("patchcore", backbone="taef2", weights_dir=str(SHARED / "weights" / "taef2"))
    references = draw_references(dataset.train_samples("bottle"), 1, 0)
    detector.fit([load_image(sample.image_path) for sample in references], class_name="bottle")
    detector_maps = []
    for sample in samples:
        (result,) = detector.predict([str(sample.image_path)])
        tensor = torch.from_numpy(result.anomaly_map)[None, None]
        detector_maps.append(F.interpolate(tensor, size=(EVAL_SIZE, EVAL_SIZE), mode="bilinear")[0, 0])
    detector_maps = torch.stack(detector_maps)
    seconds = time.perf_counter() - started

    rows = []
    for source, maps in (("oracle (ground truth)", soft_masks), ("PatchCore-TAEF2 1-shot", detector_maps)):
        rows.append({"maps": source, "grid": "full", **localisation(maps, binary_masks)})
        for side in args.sides:
            rows.append({"maps": source, "grid": f"{side}x{side}", **localisation(at_side(maps, side), binary_masks)})
        for name, sides in DIFFUSION_SIDES.items():
            grid = f"{name}: diffusion map, mean of {' + '.join(f'{side}x{side}' for side in sides)}"
            rows.append({"maps": source, "grid": grid, **localisation(at_sides(maps, sides), binary_masks)})
        for name, sides in DIFFUSION_SIDES.items():
            grid = f"{name}: fused with CLIP's {CLIP_SIDE}x{CLIP_SIDE}"
            rows.append({"maps": source, "grid": grid, **localisation(fused(maps, sides), binary_masks)})
    result = {
        "threads": args.threads,
        "date": time.strftime("%Y-%m-%d"),
        "images": len(samples),
        "anomalous_images": int(sum(mask.any() for mask in binary_masks)),
        "eval_size": EVAL_SIZE,
        "smoothing_sigma": SIGMA,
        "detector_seconds": round(seconds, 1),
        "rows": rows,
    }  # fmt: skip
    out = Path(args.out)
    from anomalens.evaluation.profiling import write_benchmark_json
    from anomalens.io.outputs import atomic_write_text

    write_benchmark_json(str(out), result)  # adds the command and the machine
    lines = ["| maps | grid | pixel AUROC | pixel AUPRO |", "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['maps']} | {row['grid']} | {row['pixel_auroc']:.2f} | {row['pixel_aupro']:.2f} |")
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
