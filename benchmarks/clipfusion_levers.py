"""How far each CLIPFusion speed lever moves the default maps, on full-size random weights.

Every setting is built from the same seed (so the same random ViT-L-14-336, SD 2.1-base UNet, VAE and text
encoders) and scores the same bottle test images zero-shot; each is compared with the defaults (SD at 512 px,
float32): the largest absolute map difference, the maps' Pearson correlation, and the image scores' largest
difference and Spearman correlation.

What the figures can and cannot say: ``precision=bfloat16`` runs the same networks in lower precision, so its
deviation is what real weights would see too, up to their activation ranges. SD at 256 px and the TAESD encoder
change the inputs themselves (a half-resolution latent; a second, differently random network making the latents),
so their deviations on random weights bound nothing about real ones. For SD at 256 px the README's map-resolution
bound (``benchmarks/results/map-resolution-bottle.md``) gives the accuracy side; for TAESD only real weights can.

    python3 benchmarks/clipfusion_levers.py --count 4 --out benchmarks/results/clipfusion-levers-random.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

SETTINGS = {  # name -> options on top of the random full-size defaults
    "defaults (SD 512 px, float32)": {},
    "precision=bfloat16": {"precision": "bfloat16"},
    "preset fast-fp32 (SD 256 px)": {"preset": "fast-fp32"},
    "preset fast (SD 256 px, bfloat16)": {"preset": "fast"},
    "TAESD encoder (random), SD 512 px": {"diffusion_encoder": "tiny", "tiny_autoencoder": None},
    "preset fast-tiny (SD 256 px, TAESD encoder)": {"preset": "fast-tiny", "tiny_autoencoder": None},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", default=os.environ.get("ANOMALENS_SHARED", "../shared"))
    parser.add_argument("--count", type=int, default=4, help="bottle test images, evenly spaced")
    parser.add_argument("--out", default="benchmarks/results/clipfusion-levers-random.json")
    args = parser.parse_args()

    import torch
    from scipy.stats import spearmanr

    import anomalens
    from anomalens.evaluation.profiling import write_benchmark_json
    from anomalens.io.images import load_image

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    tests = sorted((Path(args.shared) / "datasets/mvtec/bottle/test").rglob("*.png"))
    chosen = [tests[int(i)] for i in np.linspace(0, len(tests) - 1, args.count)]
    images = [load_image(path) for path in chosen]
    base = {"backbone": "ViT-L-14-336", "pretrained": None, "diffusion": None, "class_name": "bottle"}
    outputs = {}
    for name, options in SETTINGS.items():
        detector = anomalens.create("clipfusion", **base, **options).fit()
        results = detector.predict(images)
        outputs[name] = (np.stack([r.anomaly_map for r in results]), np.array([r.score for r in results]))
        print(name, "done", flush=True)
        del detector
    maps, scores = outputs["defaults (SD 512 px, float32)"]
    rows = []
    for name, (other_maps, other_scores) in outputs.items():
        rows.append({
            "setting": name,
            "options": SETTINGS[name],
            "map_max_abs_difference": float(np.abs(other_maps - maps).max()),
            "map_range_of_defaults": float(maps.max() - maps.min()),
            "map_pearson": float(np.corrcoef(other_maps.ravel(), maps.ravel())[0, 1]),
            "score_max_abs_difference": float(np.abs(other_scores - scores).max()),
            "score_spearman": float(spearmanr(other_scores, scores).statistic) if len(scores) > 2 else None,
        })  # fmt: skip
    record = {"benchmark": __doc__.split("\n\n")[0], "images": [str(path) for path in chosen], "rows": rows}
    write_benchmark_json(args.out, record)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
