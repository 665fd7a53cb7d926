"""Data-parallel training (issue 34, item 4): ``anomalens train vlmdiff`` as one process and under
``torchrun --nproc-per-node 2`` (Gloo on the CPU), with the same settings and global batch, on MVTec AD bottle.

Recorded: seconds per optimiser step (the median over the steps after the first 5, from each run's
``losses.csv``), the speed-up, both loss curves (``training-data-parallel-loss.png``: the one-process curve in
blue, the two-process one in orange, dashed), the largest loss difference and the largest weight difference
after the last step. One process gets all the machine's threads; each of the two processes gets half.

    python3 benchmarks/training_data_parallel.py --shared ../shared --steps 60
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from anomalens.evaluation.profiling import write_benchmark_json
from anomalens.io.outputs import atomic_write_bytes, atomic_write_text, png_bytes


def _losses(run: Path) -> tuple[list[float], list[float]]:
    with open(run / "losses.csv") as handle:
        rows = list(csv.DictReader(handle))
    return [float(row["loss"]) for row in rows], [float(row["seconds"]) for row in rows]


def _train(arguments: list[str], processes: int, threads: int, run: Path) -> float:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    command = [*(launcher if processes > 1 else [sys.executable]), "-m", "anomalens", "-q", "train", "vlmdiff",
               *arguments, "--out", str(run)]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    subprocess.run(command, check=True, env=environment)
    return time.perf_counter() - started


def _plot(path: Path, curves: dict[str, list[float]]) -> None:
    """Both loss curves on one log-scaled axis, drawn with Pillow."""
    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 900, 500, 80, 20, 40, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 12), "VLMDiff training loss: 1 process (blue) vs 2 processes (orange, dashed)", fill="black")
    values = [max(value, 1e-8) for curve in curves.values() for value in curve]
    low, high = math.log10(min(values)), math.log10(max(values))
    steps = max(len(curve) for curve in curves.values())

    def point(step: int, value: float) -> tuple[float, float]:
        x = left + (step - 1) / max(steps - 1, 1) * (width - left - right)
        y = top + (high - math.log10(max(value, 1e-8))) / max(high - low, 1e-6) * (height - top - bottom)
        return x, y

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for fraction in np.linspace(0, 1, 5):
        y = top + fraction * (height - top - bottom)
        draw.text((4, y - 6), f"{10 ** (high - fraction * (high - low)):.3g}", fill="black")
        x = left + fraction * (width - left - right)
        draw.text((x - 12, height - bottom + 8), f"{int(1 + fraction * (steps - 1))}", fill="black")
    draw.text((width // 2 - 20, height - 18), "step", fill="black")
    colours = [(31, 119, 180), (255, 127, 14)]
    for number, curve in enumerate(curves.values()):
        points = [point(step + 1, value) for step, value in enumerate(curve)]
        if number == 0:
            draw.line(points, fill=colours[0], width=3)
        else:  # dashed, over the first
            for first, second in zip(points[::2], points[1::2]):
                draw.line([first, second], fill=colours[1], width=2)
    atomic_write_bytes(path, png_bytes(np.asarray(image)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", default=os.environ.get("ANOMALENS_SHARED", "../shared"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--out", default="benchmarks/results/training-data-parallel.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    shared = Path(args.shared).resolve()
    os.environ["ANOMALENS_WEIGHTS_DIR"] = str(shared / "weights" / "taef2")
    arguments = ["--dataset", "mvtec", "--root", str(shared / "datasets" / "mvtec"), "--categories", "bottle",
                 "--unet", "small", "--autoencoder", "taef2", "--text-encoder", "minilm", "--image-size", "256",
                 "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--gradient-accumulation", "1",
                 "--lr", "2e-4", "--warmup-steps", "10", "--checkpoint-every", str(args.steps), "--seed", "0",
                 "--frozen-encoder"]  # fmt: skip
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as folder:
        for processes in (1, 2):
            run = Path(folder) / f"run-{processes}"
            wall = _train(arguments, processes, max(1, args.threads // processes), run)
            losses, seconds = _losses(run)
            per_step = float(np.median(np.diff(seconds[4:]))) if len(seconds) > 6 else seconds[-1] / len(seconds)
            runs[str(processes)] = {"processes": processes, "threads_per_process": max(1, args.threads // processes),
                                    "wall_seconds": round(wall, 1), "seconds_per_step": round(per_step, 3),
                                    "losses": losses, "weights": load_file(run / "model.safetensors")}  # fmt: skip
        one, two = runs["1"].pop("weights"), runs["2"].pop("weights")
        weight_difference = max(float((one[key] - two[key]).abs().max()) for key in one)
        weight_scale = max(float(one[key].abs().max()) for key in one)
    losses_one, losses_two = runs["1"]["losses"], runs["2"]["losses"]
    result = {
        "benchmark": f"VLMDiff (small UNet, TAEF2 latents, MiniLM captions) on MVTec AD bottle, {args.steps} steps of "
                     f"{args.batch_size} images: 1 process vs torchrun --nproc-per-node 2 (Gloo)",
        "runs": runs,
        "speedup": round(runs["1"]["seconds_per_step"] / runs["2"]["seconds_per_step"], 2),
        "largest_loss_difference": max(abs(a - b) for a, b in zip(losses_one, losses_two)),
        "largest_weight_difference": weight_difference,
        "largest_weight": weight_scale,
        "torch": torch.__version__,
    }  # fmt: skip
    result = write_benchmark_json(args.out, result)
    _plot(Path(args.out).with_name("training-data-parallel-loss.png"), {"1": losses_one, "2": losses_two})
    lines = [f"# {result['benchmark']}", "", f"`{result['command']}`", "",
             "| processes | threads each | s / step (median) | wall s | first loss | last loss |",
             "|---|---|---|---|---|---|"]
    for row in runs.values():
        lines.append(f"| {row['processes']} | {row['threads_per_process']} | {row['seconds_per_step']} | "
                     f"{row['wall_seconds']} | {row['losses'][0]:.4f} | {row['losses'][-1]:.4f} |")  # fmt: skip
    lines += ["", f"Speed-up: {result['speedup']}x. Largest loss difference over {args.steps} steps: "
              f"{result['largest_loss_difference']:.2e}; largest weight difference after the last step: "
              f"{weight_difference:.2e} (largest weight {weight_scale:.3g}).", "",
              "![loss curves](training-data-parallel-loss.png)", ""]  # fmt: skip
    atomic_write_text(Path(args.out).with_suffix(".md"), "\n".join(lines))


if __name__ == "__main__":
    main()
