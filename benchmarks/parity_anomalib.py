"""anomalens against anomalib 2.x, side by side on identical seeded random weights and identical images.

WinCLIP (zero-shot and one-shot WinCLIP+) and PatchCore (one-shot, every reference patch kept) run with
``compat="anomalib"`` here and as anomalib's own torch models (``WinClipModel``, ``PatchcoreModel``) in a second
Python that has anomalib installed. Both get the same weights (ours, random from ``seed``, copied into anomalib's
networks with every key checked) and the same input pixels: the images are resized once, here, to the models'
input size, so neither side resizes. Written per method: per-image Pearson correlation of the maps, max |delta| of
maps and scores, whether the score rankings are identical, and seconds per image on each side (predict only,
after fitting, the same batch size). Target: identical rankings and max |delta| of the maps within ``--tolerance``
(1e-5).

Timing: the two sides alternate, ``--repeats`` times (ours, theirs, ours, theirs, ...; each of their repeats a fresh
worker process that fits and then times its predict), so a change in the machine's load falls on both; reported
are each side's median and range, and the median of the paired ratios (theirs / ours of the same repeat).

This script installs nothing. anomalib's WinCLIP needs open_clip < 2.26 (from 2.26 its window embeddings are all
equal), and anomalens needs open_clip >= 2.32, so anomalib runs in its own environment, for example::

    python3 -m venv --system-site-packages /tmp/venv-anomalib
    /tmp/venv-anomalib/bin/pip install "anomalib>=2,<3" "open_clip_torch<2.26"
    python3 benchmarks/parity_anomalib.py --anomalib-python /tmp/venv-anomalib/bin/python \\
        --root ../shared/datasets/mvtec --category bottle --out benchmarks/results/parity-anomalib.json

The worker half of this file (``--worker``) runs in that Python and imports anomalib only, never anomalens.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WINCLIP_SIZE = 240  # ViT-B-16-plus-240's input side (anomalib's WinCLIP backbone)
PATCHCORE_SIZE = 224  # anomalib's PatchCore input side (its default centre crop)


# ---------------------------------------------------------------------------------------------------- worker side
def _worker(spec_path: str) -> None:
    """Run anomalib's torch model as ``spec`` says; write scores, maps, timing and what was checked."""
    import torch

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    data = np.load(spec["images"])
    images, references = data["images"], data["references"]
    state = torch.load(spec["weights"], map_location="cpu", weights_only=True)
    info: dict = {"anomalib_version": __import__("anomalib").__version__, "torch_version": torch.__version__}

    def to_tensor(batch: np.ndarray, mean, std) -> torch.Tensor:
        pixels = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255.0)
        return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)

    if spec["method"] == "winclip":
        import open_clip
        from anomalib.models.image.winclip import torch_model
        from anomalib.models.image.winclip.prompting import create_prompt_ensemble

        info["open_clip_version"] = open_clip.version.__version__
        torch_model.PRETRAINED = None  # random init; our weights are loaded below
        model = torch_model.WinClipModel(scales=tuple(spec["scales"]))
        result = model.clip.load_state_dict(state, strict=False)
        info["weights_missing"], info["weights_unexpected"] = list(result.missing_keys), list(result.unexpected_keys)
        model.eval()
        cfg = open_clip.get_model_preprocess_cfg(model.clip)
        mean, std = cfg["mean"], cfg["std"]
        normal, anomalous = create_prompt_ensemble(spec["class_name"])
        info["prompts"] = [sorted(normal), sorted(anomalous)]
        reference_tensor = to_tensor(references, mean, std) if len(references) else None
        model.setup(spec["class_name"], reference_tensor)
    else:
        from anomalib.models.image.patchcore.torch_model import PatchcoreModel

        model = PatchcoreModel(layers=spec["layers"], backbone=spec["backbone"], pre_trained=False, num_neighbors=9)
        extractor = model.feature_extractor.feature_extractor
        result = extractor.load_state_dict(state, strict=False)
        info["weights_missing"], info["weights_unexpected"] = list(result.missing_keys), list(result.unexpected_keys)
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        model.train()
        with torch.no_grad():
            model(to_tensor(references, mean, std))
        model.memory_bank = torch.vstack(model.embedding_store)  # every reference patch: no coreset
        model.embedding_store.clear()
        model.eval()
    scores, maps = [], []
    batch_size = spec["batch_size"]
    with torch.no_grad():
        model(to_tensor(images[:1], mean, std))  # warm-up, as on our side
    start = time.perf_counter()
    with torch.no_grad():
        for first in range(0, len(images), batch_size):
            output = model(to_tensor(images[first : first + batch_size], mean, std))
            scores.append(output.pred_score.reshape(-1).numpy())
            maps.append(output.anomaly_map.reshape(-1, *images.shape[1:3]).numpy())
    info["seconds_per_image"] = (time.perf_counter() - start) / len(images)
    np.savez(spec["out"], scores=np.concatenate(scores), maps=np.concatenate(maps))
    Path(spec["out"] + ".json").write_text(json.dumps(info))


# ---------------------------------------------------------------------------------------------------- our side
def _load_images(root: Path, category: str, count: int, size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``count`` test images (every k-th of the sorted list, goods and defects alike) and the first training
    image, resized once to ``size`` x ``size`` (PIL bicubic) as uint8 ``(N, size, size, 3)``."""
    from PIL import Image

    test = sorted(path for path in (root / category / "test").rglob("*.png"))
    if not test:
        raise ValueError(f"no test images under {root / category / 'test'}")
    chosen = test[:: max(1, len(test) // count)][:count]
    reference = sorted((root / category / "train" / "good").glob("*.png"))[:1]

    def load(paths: list[Path]) -> np.ndarray:
        return np.stack(
            [np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)) for p in paths]
        )

    return load(chosen), load(reference), [str(p.relative_to(root)) for p in chosen]


def _compare(ours_scores, ours_maps, theirs_scores, theirs_maps) -> dict:
    correlations = [float(np.corrcoef(a.ravel(), b.ravel())[0, 1]) for a, b in zip(ours_maps, theirs_maps)]
    return {
        "map_pearson_mean": float(np.mean(correlations)),
        "map_pearson_min": float(np.min(correlations)),
        "map_max_abs_delta": float(np.abs(ours_maps - theirs_maps).max()),
        "map_value_range": [float(theirs_maps.min()), float(theirs_maps.max())],
        "score_max_abs_delta": float(np.abs(ours_scores - theirs_scores).max()),
        "same_score_ranking": bool(
            (np.argsort(ours_scores, kind="stable") == np.argsort(theirs_scores, kind="stable")).all()
        ),
    }


def _run_case(name: str, detector, method_spec: dict, images, references, args, workdir: Path) -> dict:
    import torch

    fitted = detector.fit(list(references) if len(references) else None, class_name=args.category)
    fitted.predict(list(images[:1]))  # warm-up: the first call pays for lazy set-up on both sides
    start = time.perf_counter()
    results = fitted.predict(list(images))
    ours_times = [(time.perf_counter() - start) / len(images)]
    ours_scores = np.array([r.score for r in results], dtype=np.float64)
    ours_maps = np.stack([r.anomaly_map for r in results]).astype(np.float64)

    if method_spec["method"] == "winclip":
        state = fitted.clip.model.state_dict()
    else:
        extractor = next(m for m in fitted.modules() if type(m).__name__ == "TorchvisionFeatures").extractor
        state = extractor.state_dict()
    torch.save(state, workdir / f"{name}.pt")
    np.savez(workdir / f"{name}-images.npz", images=images, references=references)
    spec = {
        **method_spec,
        "weights": str(workdir / f"{name}.pt"),
        "images": str(workdir / f"{name}-images.npz"),
        "out": str(workdir / f"{name}-out.npz"),
        "class_name": args.category,
        "batch_size": args.batch_size,
        "threads": args.threads,
    }
    (workdir / f"{name}.json").write_text(json.dumps(spec))
    theirs_times = []
    for repeat in range(args.repeats):
        if repeat:  # ours again, then theirs: alternating
            start = time.perf_counter()
            fitted.predict(list(images))
            ours_times.append((time.perf_counter() - start) / len(images))
        subprocess.run([args.anomalib_python, __file__, "--worker", str(workdir / f"{name}.json")], check=True)
        theirs_times.append(json.loads(Path(spec["out"] + ".json").read_text())["seconds_per_image"])
    theirs = np.load(spec["out"])
    info = json.loads(Path(spec["out"] + ".json").read_text())
    info.pop("seconds_per_image")
    ratios = [their / our for our, their in zip(ours_times, theirs_times)]
    row = {
        **_compare(ours_scores, ours_maps, theirs["scores"].astype(np.float64), theirs["maps"].astype(np.float64)),
        "repeats": args.repeats,
        "anomalens_seconds_per_image_each": ours_times,
        "anomalib_seconds_per_image_each": theirs_times,
        "anomalens_seconds_per_image": float(np.median(ours_times)),
        "anomalib_seconds_per_image": float(np.median(theirs_times)),
        "anomalens_seconds_per_image_range": [min(ours_times), max(ours_times)],
        "anomalib_seconds_per_image_range": [min(theirs_times), max(theirs_times)],
        "paired_ratio_median": float(np.median(ratios)),
        "paired_ratio_range": [min(ratios), max(ratios)],
        "anomalib_weights_missing_keys": info.pop("weights_missing"),
        "anomalib_weights_unexpected_keys": info.pop("weights_unexpected"),
        "images": len(images),
        "references": len(references),
        "config": {key: value for key, value in vars(fitted.config).items() if not key.startswith("_")},
    }
    if "prompts" in info:
        normal, anomalous = fitted.prompt_set.prompts(args.category)
        row["same_prompts"] = info.pop("prompts") == [sorted(normal), sorted(anomalous)]
    row["anomalib_environment"] = info
    row["anomalens_faster_by"] = row["paired_ratio_median"] - 1  # > 0: anomalens faster (median over the pairs)
    scale = max(1.0, float(np.abs(theirs["maps"]).max()))
    row["map_max_relative_delta"] = row["map_max_abs_delta"] / scale
    row["target_met"] = row["map_max_abs_delta"] <= args.tolerance and row["same_score_ranking"]
    return row


def _machine(threads: int) -> str:
    """CPU model, logical cores and torch threads, e.g. ``x86_64, AMD EPYC 9B14, 2 logical cores, 1 torch thread``."""
    import os

    model = platform.processor() or "cpu"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        model = names[0] if names else model
    return f"{platform.machine()}, {model}, {os.cpu_count()} logical cores, {threads} torch thread(s) on each side"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--anomalib-python", help="a Python with anomalib 2.x and open_clip < 2.26")
    parser.add_argument("--root", type=Path, help="MVTec AD root (holds <category>/test and <category>/train)")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--images", type=int, default=20, help="test images, every k-th of the sorted split")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch threads on both sides")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--tolerance", type=float, default=1e-5, help="target max |delta| of the maps")
    parser.add_argument("--cases", default="winclip-0shot,winclip-1shot,patchcore-1shot")
    parser.add_argument("--repeats", type=int, default=5, help="timed predicts on each side, alternating")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/parity-anomalib.json"))
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker)
        return
    if not args.anomalib_python or not args.root:
        parser.error("--anomalib-python and --root are required")

    import torch

    import anomalens
    from anomalens.backbones import get_backbone_spec

    torch.set_num_threads(args.threads)
    cases = {}
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.cases.split(","):
            method, shots = name.split("-")
            if method == "winclip":
                images, references, names = _load_images(args.root, args.category, args.images, WINCLIP_SIZE)
                detector = anomalens.create(
                    "winclip", compat="anomalib", pretrained=None, seed=args.seed, batch_size=args.batch_size
                )
                spec = {"method": "winclip", "scales": list(detector.config.scales)}
            elif method == "patchcore":
                images, references, names = _load_images(args.root, args.category, args.images, PATCHCORE_SIZE)
                detector = anomalens.create(
                    "patchcore", compat="anomalib", pretrained=None, seed=args.seed, image_size=PATCHCORE_SIZE,
                    coreset_ratio=1.0, batch_size=args.batch_size,
                )  # fmt: skip
                layers = detector.config.layers or get_backbone_spec("wide_resnet50_2").default_layers
                spec = {"method": "patchcore", "layers": list(layers), "backbone": "wide_resnet50_2"}
            else:
                raise ValueError(f"unknown case {name!r}; valid: winclip-0shot, winclip-1shot, patchcore-1shot")
            references = references[: int(shots.removesuffix("shot"))]
            print(f"{name}: {len(images)} images, {len(references)} reference(s)", flush=True)
            cases[name] = _run_case(name, detector, spec, images, references, args, Path(workdir))
            cases[name]["image_names"] = names
            print(json.dumps({k: v for k, v in cases[name].items() if k not in ("config", "image_names")}), flush=True)
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": _machine(torch.get_num_threads()),
        "date": time.strftime("%Y-%m-%d"),
        "anomalens_version": anomalens.__version__,
        "torch_version": torch.__version__,
        "tolerance": args.tolerance,
        "tolerance_rule": "map max |delta| <= tolerance, and identical score rankings",
        "cases": cases,
        "all_targets_met": all(case["target_met"] for case in cases.values()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.out.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(report, indent=2) + "\n")
    temporary.replace(args.out)
    print(f"wrote {args.out}; all targets met: {report['all_targets_met']}")


if __name__ == "__main__":
    main()
