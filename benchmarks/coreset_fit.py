"""PatchCore's greedy coreset on full-shot MVTec AD bottle: ours against anomalib's, on the same features.

The features are PatchCore-TAEF2's (real weights) for all 209 bottle train/good images: 64 x 64 patches of 128
channels each, 856,064 in all; the coreset keeps 10 % (85,607). Recorded, in one run:

1. Encoding the 209 references (the rest of a fit).
2. ``greedy_coreset_indices`` as shipped (batched, lazy farthest-point picks) on all of them, end to end.
3. The former one-at-a-time loop (one pass over all points per pick; kept here as the reference): the first
   ``--steps`` picks, timed, compared with ours (same picks), and extrapolated linearly to the full count (each
   of its picks costs one identical pass, so its time is linear in the picks).
4. anomalib's ``KCenterGreedy`` (2.x, its own sparse random projection at eps=0.9) on the same features, in its own
   Python (anomalib and anomalens need different open_clip versions): the same ``--steps`` picks, extrapolated
   the same way.
5. Both end to end on the first ``--subset-images`` images (a size anomalib's loop finishes in minutes), with
   the coverage radius each reaches: the largest distance from a patch to its nearest kept patch, in the
   original 128-channel space (what PatchCore's scores are measured in), and the mean.

anomalib runs from a second Python with anomalib installed, e.g.::

    python3 -m venv --system-site-packages /tmp/venv-anomalib
    /tmp/venv-anomalib/bin/pip install "anomalib>=2,<3"
    python3 benchmarks/coreset_fit.py --anomalib-python /tmp/venv-anomalib/bin/python \\
        --out benchmarks/results/coreset-fit-bottle.json

The full-shot detector's metrics and whole fit time come from ``anomalens benchmark --shots all`` (its
``fit_seconds``), committed beside this in ``results/patchcore-taef2-bottle-fullshot-round2``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(features_file: str, steps: int, subset: int, seed: int) -> None:
    """Runs in anomalib's Python: times ``KCenterGreedy`` and prints one JSON line. Imports no anomalens."""
    import torch
    from anomalib.models.components.sampling.k_center_greedy import KCenterGreedy

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    features = torch.load(features_file)
    out = {"anomalib": __import__("anomalib").__version__}

    def run(embedding: torch.Tensor, picks: int) -> tuple[list[int], float, float, int]:
        torch.manual_seed(seed)
        sampler = KCenterGreedy(embedding=embedding, sampling_ratio=picks / embedding.shape[0])
        began = time.perf_counter()
        sampler.model.fit(embedding)  # its select_coreset_idxs, step by step, to time the projection apart
        sampler.features = sampler.model.transform(embedding)
        sampler.reset_distances()
        projected = time.perf_counter()
        index = torch.randint(high=sampler.n_observations, size=(1,)).squeeze()
        chosen = [index]
        for _ in range(sampler.coreset_size - 1):
            sampler.update_distances(cluster_center=index)
            index = sampler.get_new_idx()
            sampler.min_distances.scatter_(0, index.unsqueeze(0).unsqueeze(1), 0.0)
            chosen.append(index)
        done = time.perf_counter()
        return [int(i) for i in chosen], projected - began, done - projected, int(sampler.features.shape[1])

    _, projection_s, loop_s, width = run(features, steps)
    out["full"] = {"picks": steps, "projection_s": projection_s, "loop_s": loop_s, "projected_width": width}
    chosen, projection_s, loop_s, width = run(features[:subset], math.ceil(0.1 * subset))
    out["subset"] = {"picks": len(chosen), "projection_s": projection_s, "loop_s": loop_s,
                     "projected_width": width, "indices": chosen}  # fmt: skip
    print("ANOMALIB " + json.dumps(out), flush=True)


def one_at_a_time(points, count: int, start: int):
    """The former loop: one matrix-vector pass over all points per pick (the reference for the picks)."""
    import torch

    squared = (points * points).sum(1)
    column_major = points.T.contiguous().T
    selected = torch.empty(count, dtype=torch.long)
    min_distances = torch.full((points.shape[0],), float("inf"))
    distances = torch.empty_like(min_distances)
    index = start
    for step in range(count):
        selected[step] = index
        torch.addmv(squared, column_major, points[index], alpha=-2.0, out=distances)
        distances += squared[index]
        torch.minimum(min_distances, distances, out=min_distances)
        min_distances[index] = -1.0
        index = int(torch.argmax(min_distances))
    return selected


def coverage(features, indices) -> tuple[float, float]:
    """Largest and mean distance from every feature to its nearest selected one (exact, chunked)."""
    import torch

    from anomalens.nn.memory import NearestNeighbourMemory

    memory = NearestNeighbourMemory().fit(features[torch.as_tensor(indices)])
    distances = torch.cat([memory.search(chunk)[0][:, 0] for chunk in features.split(65536)])
    return float(distances.max()), float(distances.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", default=os.environ.get("ANOMALENS_SHARED", "../shared"))
    parser.add_argument("--anomalib-python", help="a Python with anomalib 2.x installed (skipped without)")
    parser.add_argument("--steps", type=int, default=1000, help="picks timed for the extrapolated loops")
    parser.add_argument("--subset-images", type=int, default=20, help="images of the end-to-end comparison")
    parser.add_argument("--out", default="benchmarks/results/coreset-fit-bottle.json")
    parser.add_argument("--worker", nargs=4, metavar=("FEATURES", "STEPS", "SUBSET", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        features_file, steps, subset, seed = args.worker
        worker(features_file, int(steps), int(subset), int(seed))
        return

    import torch

    import anomalens
    from anomalens.evaluation.profiling import machine_info
    from anomalens.io.images import load_image
    from anomalens.nn.memory import greedy_coreset_indices

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    shared = Path(args.shared)
    paths = sorted((shared / "datasets/mvtec/bottle/train/good").glob("*.png"))
    detector = anomalens.create("patchcore", backbone="taef2", weights_dir=str(shared / "weights/taef2"))
    record: dict = {"benchmark": __doc__.split("\n\n")[0], "images": len(paths)}

    began = time.perf_counter()
    with torch.inference_mode():
        grids = detector._embed_arrays([load_image(path) for path in paths])  # what fit encodes
    record["encode_s"] = time.perf_counter() - began
    features = grids.reshape(-1, grids.shape[-1]).contiguous()
    count = math.ceil(detector.config.coreset_ratio * features.shape[0])
    record.update(patches=features.shape[0], channels=features.shape[1], coreset=count)
    print(f"encoded {len(paths)} images in {record['encode_s']:.1f} s: {tuple(features.shape)}", flush=True)

    began = time.perf_counter()
    ours = greedy_coreset_indices(features, count, projection_dim=detector.config.coreset_projection_dim,
                                  generator=torch.Generator().manual_seed(detector.config.seed))  # fmt: skip
    record["ours_full_s"] = time.perf_counter() - began
    print(f"ours: {count} picks in {record['ours_full_s']:.1f} s", flush=True)

    began = time.perf_counter()
    former = one_at_a_time(features.float(), args.steps, int(ours[0]))
    loop_s = time.perf_counter() - began
    first = ours[: args.steps]
    record["former_loop"] = {"picks_timed": args.steps, "seconds": loop_s,
                             "extrapolated_full_s": loop_s * count / args.steps,
                             "same_picks_as_ours": len(set(former.tolist()) & set(first.tolist())),
                             "same_order_prefix": int((former == first).long().cumprod(0).sum())}  # fmt: skip
    print(f"former loop: {args.steps} picks in {loop_s:.1f} s", flush=True)

    subset = args.subset_images * grids.shape[1] * grids.shape[2]
    subset_features = features[:subset]
    subset_count = math.ceil(0.1 * subset)
    began = time.perf_counter()
    ours_subset = greedy_coreset_indices(subset_features, subset_count, projection_dim=128,
                                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    record["subset"] = {"images": args.subset_images, "patches": subset, "picks": subset_count,
                        "ours_s": time.perf_counter() - began}  # fmt: skip
    radius, mean = coverage(subset_features, ours_subset)
    record["subset"].update(ours_radius=radius, ours_mean_distance=mean)

    if args.anomalib_python:
        with tempfile.TemporaryDirectory() as folder:
            features_file = str(Path(folder) / "features.pt")
            torch.save(features, features_file)
            answer = subprocess.run([args.anomalib_python, __file__, "--worker", features_file, str(args.steps),
                                     str(subset), "0"], capture_output=True, text=True, check=True)  # fmt: skip
        found = json.loads(next(line for line in answer.stdout.splitlines() if line.startswith("ANOMALIB "))[9:])
        full = found["full"]
        record["anomalib"] = {"version": found["anomalib"], "projected_width": full["projected_width"],
                              "projection_s": full["projection_s"], "picks_timed": args.steps,
                              "loop_s": full["loop_s"],
                              "extrapolated_full_s": full["projection_s"]
                              + full["loop_s"] * count / args.steps}  # fmt: skip
        part = found["subset"]
        radius, mean = coverage(subset_features, part["indices"])
        record["subset"].update(anomalib_s=part["projection_s"] + part["loop_s"], anomalib_radius=radius,
                                anomalib_mean_distance=mean,
                                anomalib_projected_width=part["projected_width"])  # fmt: skip
    record["command"] = " ".join(["python3", *sys.argv])
    record["machine"] = machine_info()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(record, indent=1))
    temporary.replace(out)
    print(json.dumps({k: v for k, v in record.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    main()
