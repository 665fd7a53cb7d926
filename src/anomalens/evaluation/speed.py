"""Speed and memory of detectors side by side, in one run (``anomalens benchmark-speed``).

Each *setting* (a method, its number of reference images ``shots``, its options and an optional ``variant``
label) runs in a fresh subprocess, so its peak resident memory is its own, with the same torch thread count
and the same test images as every other setting. In it, for each batch size:

- one warm-up batch (first-use costs: prompt encoding, allocations), then ``repeats`` timed batches; seconds
  per image is the median of (batch seconds / batch size);
- the detector's own ``stage_seconds`` over the timed batches give the stage breakdown (image encoder, VAE,
  UNet, text encoder, memory search, TTA, post-processing; the rest is "other");
- one more batch under ``torch.utils.flop_counter.FlopCounterMode`` counts FLOPs per image, inside each stage
  too, so the achieved GFLOP/s of the whole method, of each network and of the dominant one (the network with
  the most FLOPs in that setting) can be set against the machine's matmul peak: the best of 20 square 2048
  matmuls in the setting's precision, measured once for the run and again in each setting's process just
  before it is timed. Percentages use the setting's own peak, so a shared machine's load drifting during a
  long run does not tilt them; the run's is kept beside it.

Every setting's seconds per image is also given as a ratio to WinCLIP zero-shot's in the same run (when the
run has it). :data:`FULL_SIZE_SETTINGS` are the registered methods at their real full size with random weights
(the same FLOPs and memory as the pretrained models, no downloads); a JSON settings file measures any other
configuration. Results are written atomically (JSON and a markdown table) after every setting, so an
interrupted run keeps what it measured.
"""

from __future__ import annotations

import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Full-size architectures with random weights. Each setting is one row group of the table (one row per batch
# size); "variant" rows show an option's effect in the same run.
_CLIPFUSION = {"backbone": "ViT-L-14-336", "pretrained": None, "diffusion": None}
_CLIPFUSION_256 = {**_CLIPFUSION, "preset": "fast-fp32"}  # SD at 256 px (the preset's fields)
_WINCLIP = {"backbone": "ViT-B-16-plus-240", "pretrained": None}
_VLMDIFF = {
    "architecture": {
        "unet": "sd-1-5",
        "unet_weights": None,
        "autoencoder": "sd",
        "autoencoder_weights": None,
        "text_encoder": "sd",
        "text_encoder_weights": None,
        "image_size": 256,
    },
    "feature_weights": None,
}
FULL_SIZE_SETTINGS: list[dict[str, Any]] = [
    {"method": "patchcore", "shots": 1, "options": {"backbone": "wide_resnet50_2", "pretrained": None}},
    {"method": "winclip", "shots": 0, "options": _WINCLIP},
    {"method": "winclip", "shots": 1, "options": _WINCLIP},
    {"method": "dual_image_clip", "shots": 0, "options": {"backbone": "ViT-L-14-336", "pretrained": None}},
    {"method": "clipfusion", "shots": 0, "options": _CLIPFUSION},
    {"method": "clipfusion", "shots": 1, "options": _CLIPFUSION},
    {"method": "vlmdiff", "shots": 0, "options": _VLMDIFF},
    # a fusion of two methods (its common scale needs two held-out references)
    {"method": "ensemble", "shots": 2, "options": {"members": [
        {"method": "patchcore", "backbone": "wide_resnet50_2", "pretrained": None},
        {"method": "winclip", **_WINCLIP}]}},
    # the faster CLIPFusion presets: SD at 256 px, the same UNet layers (their feature sides halve to 8 and 16)
    {"method": "clipfusion", "shots": 0, "variant": "preset fast-fp32: SD 256 px", "options": _CLIPFUSION_256},
    # bfloat16 autocast (the precision option), for CPUs with native bf16 (AVX512-BF16 / AMX) and GPUs
    {"method": "winclip", "shots": 0, "variant": "bf16", "options": {**_WINCLIP, "precision": "bfloat16"}},
    {"method": "clipfusion", "shots": 0, "variant": "bf16", "options": {**_CLIPFUSION, "precision": "bfloat16"}},
    {"method": "clipfusion", "shots": 0, "variant": "preset fast: SD 256 px, bf16",
     "options": {**_CLIPFUSION_256, "precision": "bfloat16"}},
    # TAESD's encoder (diffusers AutoencoderTiny, random weights here) making SD's latents, at 512 and 256 px
    {"method": "clipfusion", "shots": 0, "variant": "tiny VAE encoder",
     "options": {**_CLIPFUSION, "diffusion_encoder": "tiny", "tiny_autoencoder": None}},
    {"method": "clipfusion", "shots": 0, "variant": "preset fast-tiny: SD 256 px, tiny VAE encoder",
     "options": {**_CLIPFUSION, "preset": "fast-tiny", "tiny_autoencoder": None}},
    # WinCLIP's window passes: windows every 2 patches instead of the paper's every patch (changes the maps), and
    # 4x larger transformer calls over the windows (same maps)
    {"method": "winclip", "shots": 0, "variant": "window stride 2", "options": {**_WINCLIP, "window_stride": 2}},
    {"method": "winclip", "shots": 0, "variant": "8192 window tokens per call",
     "options": {**_WINCLIP, "window_tokens_per_call": 8192}},
]  # fmt: skip
STAGE_GROUPS = {  # the table's stage columns -> the detectors' stage names
    "image encoder": ("clip", "image_encoder", "features"),
    "vae": ("vae",),
    "unet": ("unet",),
    "text encoder": ("text_encoder", "captioner"),
    "memory search": ("memory_search",),
    "tta": ("tta",),
    "post-processing": ("post_processing",),
}
NETWORK_STAGES = ("image encoder", "vae", "unet")  # the stage columns that are one network's forward passes
MEASURED_STAGES = (*NETWORK_STAGES, "memory search")  # the stages whose FLOP rate is reported against the peak
PRECISIONS = ("float32", "bfloat16", "float16")
_RECORD_PREFIX = "SPEED_RECORD "


@dataclass
class SpeedOptions:
    """What ``anomalens benchmark-speed`` times and how."""

    methods: tuple[str, ...] | None = None  # only these methods' full-size settings
    settings: tuple[int, ...] | None = None  # only these full-size settings (indices; see --list)
    variants: bool = True  # include the variant rows (SD 256 px, bf16); --no-variants skips them
    settings_file: str | None = None  # JSON list of {method, shots, options, variant} instead of the built-in rows
    images: tuple[str, ...] | None = None  # test images / folders (default: MVTec AD bottle)
    reference: tuple[str, ...] | None = None  # reference images / folders for few-shot rows
    shared: str | None = None  # folder holding datasets/mvtec (default: $ANOMALENS_SHARED, else ../shared)
    count: int = 16  # test images used (a fixed, evenly spaced subset)
    repeats: int = 3  # timed batches per batch size, after a warm-up
    batch_sizes: tuple[int, ...] = (1, 8)  # batch sizes timed per setting
    threads: int | None = None  # torch threads for every setting (default: torch's)
    device: str = "cpu"  # torch device, e.g. cpu or cuda
    dtype: str = "float32"  # precision of settings without their own: float32, bfloat16 or float16
    timeout: float = 3600  # seconds allowed per setting
    open_clip_config: tuple[str, ...] = ()  # extra open_clip model config JSON files
    list: bool = False  # list the full-size settings and exit
    out: str | None = None  # JSON file (default: speed-<machine>-<threads>threads.json)


def choose_settings(options: SpeedOptions) -> list[dict[str, Any]]:
    """The settings ``options`` select: a settings file, or the full-size rows filtered by method, index, variant."""
    if options.settings_file:
        return load_settings(options.settings_file)
    methods = list(dict.fromkeys(setting["method"] for setting in FULL_SIZE_SETTINGS))
    unknown = sorted(set(options.methods or []) - set(methods))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown} for benchmark-speed; valid: {', '.join(methods)}")
    count = len(FULL_SIZE_SETTINGS)
    bad = sorted(index for index in options.settings or [] if not 0 <= index < count)
    if bad:
        listing = "; ".join(f"{i}: {setting_label(s)} {s['shots']}-shot" for i, s in enumerate(FULL_SIZE_SETTINGS))
        raise ValueError(f"--settings {bad} out of range 0..{count - 1} ({listing})")
    chosen = [setting for index, setting in enumerate(FULL_SIZE_SETTINGS)
              if (options.methods is None or setting["method"] in options.methods)
              and (options.settings is None or index in options.settings)
              and (options.variants or not setting.get("variant"))]  # fmt: skip
    if not chosen:
        raise ValueError("--methods, --settings and --no-variants leave no setting to time")
    return check_settings(chosen)


def choose_inputs(options: SpeedOptions, needed_references: int) -> tuple[list[Path], list[Path]]:
    """Test images and references: the given folders (unreadable files reported and skipped, since they would fail
    every setting), else MVTec AD bottle under the shared folder."""
    from anomalens.io.images import find_images, readable_images

    shared = Path(options.shared or os.environ.get("ANOMALENS_SHARED", "../shared"))
    if options.images:
        readable = [path for path, _ in readable_images(find_images(options.images), "image")]
        images = evenly_spaced(readable, options.count)
        if not images:
            raise ValueError(f"no readable images in {list(options.images)}")
    else:
        images = default_test_images(shared, options.count)
    if options.reference:
        references = [path for path, _ in readable_images(find_images(options.reference), "reference")]
    else:
        references = sorted((shared / "datasets" / "mvtec" / "bottle" / "train" / "good").glob("*.png"))
        references = references[:needed_references]
    if len(references) < needed_references:
        raise ValueError(
            f"a setting needs {needed_references} reference image(s), found {len(references)}: pass --reference"
        )
    return images, references


def setting_label(setting: dict[str, Any]) -> str:
    """``"method"`` or ``"method (variant)"``."""
    variant = setting.get("variant")
    return f"{setting['method']} ({variant})" if variant else setting["method"]


def check_settings(settings: Any, source: str = "settings") -> list[dict[str, Any]]:
    """Validate settings (a list of ``{"method", "shots", "options", "variant"}`` dicts) before anything runs.

    Raises:
        ValueError: Not a list of such dicts, an unknown method (the valid ones are listed), a negative or
            non-integer ``shots``, or ``options`` that are not a dict; the message names the entry.
    """
    from anomalens.registry import get_method

    if not isinstance(settings, list) or not settings:
        raise ValueError(f"{source} must be a non-empty list of settings, got {type(settings).__name__}")
    checked = []
    for index, setting in enumerate(settings):
        where = f"{source}[{index}]"
        if not isinstance(setting, dict) or "method" not in setting:
            raise ValueError(f"{where} must be an object with a 'method', got {setting!r}")
        unknown = sorted(set(setting) - {"method", "shots", "options", "variant"})
        if unknown:
            raise ValueError(f"{where} has unknown keys {unknown}; valid: method, shots, options, variant")
        get_method(setting["method"])  # unknown names list the valid ones
        shots = setting.get("shots", 0)
        if not isinstance(shots, int) or isinstance(shots, bool) or shots < 0:
            raise ValueError(f"{where} shots must be an integer >= 0, got {shots!r}")
        options = setting.get("options", {})
        if not isinstance(options, dict):
            raise ValueError(f"{where} options must be an object of config fields, got {options!r}")
        checked.append({"method": setting["method"], "shots": shots, "variant": str(setting.get("variant", "")),
                        "options": options})  # fmt: skip
    return checked


def load_settings(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Settings from a JSON file holding a list of ``{"method", "shots", "options", "variant"}`` objects."""
    try:
        settings = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read settings file {path}: {error}") from None
    return check_settings(settings, str(path))


def default_test_images(shared: str | os.PathLike, count: int) -> list[Path]:
    """The fixed stratified subset of ``count`` MVTec AD bottle test images under ``shared/datasets/mvtec``."""
    from anomalens.evaluation.benchmark import subset_test
    from anomalens.io.datasets import open_dataset

    root = Path(shared) / "datasets" / "mvtec"
    if not (root / "bottle").is_dir():
        raise ValueError(
            f"no MVTec AD bottle under {root}: pass --images, or point --shared / ANOMALENS_SHARED at the data"
        )
    dataset = open_dataset("mvtec", root)
    return [sample.image_path for sample in subset_test(dataset.test_samples("bottle"), count)]


def evenly_spaced(paths: Sequence[Path], count: int) -> list[Path]:
    """``count`` paths spread evenly over ``paths`` (all of them when there are fewer), order kept."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if len(paths) <= count:
        return list(paths)
    step = len(paths) / count
    return [paths[int(index * step)] for index in range(count)]


def matmul_peak(device: str, dtype: str, side: int = 2048, repeats: int = 20) -> float:
    """GFLOP/s of a square ``side`` matmul in ``dtype``: the best of ``repeats`` (a peak, not a typical value)."""
    import torch

    torch_dtype = getattr(torch, dtype)
    left = torch.randn(side, side, device=device, dtype=torch_dtype)
    right = torch.randn(side, side, device=device, dtype=torch_dtype)
    timings = []
    for index in range(repeats + 2):
        _synchronize(device)
        start = time.perf_counter()
        left @ right
        _synchronize(device)
        if index >= 2:
            timings.append(time.perf_counter() - start)
    return 2 * side**3 / min(timings) / 1e9


def _synchronize(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def stage_group(stage: str) -> str:
    """The table column of a detector stage name (``"other"`` for names outside :data:`STAGE_GROUPS`)."""
    key = stage.lower().replace(" ", "_")
    return next((group for group, names in STAGE_GROUPS.items() if key in names), "other")


def grouped_per_image(per_stage: dict[str, float], images: int) -> dict[str, float]:
    """Stage totals over ``images`` images, summed per table column and divided by ``images``."""
    grouped: dict[str, float] = {}
    for name, value in per_stage.items():
        group = stage_group(name)
        grouped[group] = grouped.get(group, 0.0) + value / images
    return grouped


def dominant_network(stage_gflops: dict[str, float]) -> str:
    """The network stage with the most FLOPs per image (``"image encoder"`` when none counted any).

    Taken per setting and batch size, not per method: CLIPFusion's SD VAE dominates at 512 px, its CLIP tower
    at 256 px.
    """
    counted = {stage: stage_gflops.get(stage, 0.0) for stage in NETWORK_STAGES}
    return max(counted, key=counted.get) if any(counted.values()) else "image encoder"


def count_flops(detector, batch: list) -> tuple[float, dict[str, float]]:
    """Score ``batch`` under ``FlopCounterMode``: the total FLOPs and the FLOPs inside each timed stage.

    ``nn.MultiheadAttention``'s inference fast path (one fused ``_native_multi_head_attention`` kernel, which
    open_clip's transformers take) is invisible to ``FlopCounterMode``: it would count its projections and
    attention as 0 FLOPs, a third of a ViT's. So this batch runs with the fast path off, through the same
    matmuls as separate, counted operators; the timed batches keep it. Newer torch (2.14) then runs the attention
    through the CPU flash kernel ``_scaled_dot_product_flash_attention_for_cpu``, which ``FlopCounterMode`` has no
    formula for either; it is counted with torch's own formula for the other SDPA kernels (same FLOPs).
    """
    import torch
    from torch.backends import mha
    from torch.utils.flop_counter import FlopCounterMode

    stage_flops: dict[str, float] = {}
    timed = detector.timed

    @contextmanager
    def counted(stage: str):
        before = counter.get_total_flops()
        with timed(stage):
            yield
        stage_flops[stage] = stage_flops.get(stage, 0.0) + counter.get_total_flops() - before

    fast_path = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
        mapping = {cpu_flash: _cpu_flash_attention_flops} if cpu_flash is not None else {}
        with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            detector.timed = counted  # an instance attribute, shadowing the method for this batch only
            try:
                detector.predict_arrays(batch)
            finally:
                del detector.timed
    finally:
        mha.set_fastpath_enabled(fast_path)
    return float(counter.get_total_flops()), stage_flops


def _cpu_flash_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of one CPU flash-attention call: torch's count for its other SDPA kernels, from the input shapes."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def measure_setting(
    setting: dict[str, Any],
    image_paths: Sequence[str | os.PathLike],
    reference_paths: Sequence[str | os.PathLike],
    *,
    batch_sizes: Sequence[int],
    repeats: int,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict[str, Any]:
    """Build, fit and time one setting in this process (:func:`run_speed` calls it in a fresh subprocess).

    Returns:
        The setting's record: build-and-fit seconds, per batch size the figures of the module docstring, and
        the process's peak resident memory (``peak_rss_mb``).
    """
    import resource

    import anomalens
    from anomalens.io.images import load_image

    method, shots = setting["method"], setting["shots"]
    options = {"precision": dtype, **setting["options"]}
    started = time.perf_counter()
    detector = anomalens.create(method, **options).to(device)
    if shots > len(reference_paths):
        raise ValueError(f"{setting_label(setting)} needs {shots} reference image(s), got {len(reference_paths)}")
    references = [load_image(path) for path in reference_paths[:shots]]
    detector.fit(references or None, class_name="bottle", threshold=None)
    build_seconds = time.perf_counter() - started
    images = [load_image(path) for path in image_paths]
    record: dict[str, Any] = {"method": method, "shots": shots, "variant": setting.get("variant", ""),
                              "precision": options["precision"], "build_and_fit_seconds": round(build_seconds, 2),
                              "matmul_peak_gflops": round(matmul_peak(device, options["precision"]), 2),
                              "batches": {}}  # fmt: skip
    for batch_size in batch_sizes:
        if detector.pooled and batch_size < 2 and not references:
            record["batches"][str(batch_size)] = {"skipped": "a pooled zero-shot method scores at least 2 images"}
            continue
        record["batches"][str(batch_size)] = time_batches(detector, images, batch_size, repeats, device)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    record["peak_rss_mb"] = round(peak_kb / (2**20 if sys.platform == "darwin" else 1024), 1)
    return record


def time_batches(detector, images: list, batch_size: int, repeats: int, device: str) -> dict[str, Any]:
    """Time ``repeats`` batches of ``batch_size`` images after a warm-up; seconds, FLOPs and stage figures."""
    batches = [[images[(start + offset) % len(images)] for offset in range(batch_size)]
               for start in range(0, batch_size * (repeats + 1), batch_size)]  # fmt: skip
    detector.predict_arrays(batches[0])  # warm-up
    detector.stage_seconds.clear()
    per_image = []
    for batch in batches[1:]:
        start = time.perf_counter()
        detector.predict_arrays(batch)
        _synchronize(device)
        per_image.append((time.perf_counter() - start) / batch_size)
    stages = grouped_per_image(detector.stage_seconds, batch_size * repeats)
    flops, stage_flops = count_flops(detector, batches[1])
    flops_per_image = flops / batch_size
    group_flops = grouped_per_image(stage_flops, batch_size)
    seconds = statistics.median(per_image)
    stages["other"] = max(statistics.mean(per_image) - sum(stages.values()), 0.0)
    stage_gflops = {group: value / 1e9 for group, value in group_flops.items()}
    networks = {stage: significant(stage_gflops[stage] / stages[stage]) for stage in MEASURED_STAGES
                if stage_gflops.get(stage) and stages.get(stage)}  # fmt: skip
    dominant = dominant_network(stage_gflops)
    return {
        "seconds_per_image": significant(seconds),
        "images_per_second": significant(1 / seconds),
        "timed_seconds_per_image": [significant(value) for value in per_image],
        "gflops_per_image": significant(flops_per_image / 1e9),
        "achieved_gflops_per_second": significant(flops_per_image / seconds / 1e9),
        "stages_seconds_per_image": {group: significant(value) for group, value in stages.items() if value > 0},
        "stages_gflops_per_image": {group: significant(value) for group, value in stage_gflops.items()},
        "networks_gflops_per_second": networks,  # FLOPs counted inside each network's stage (and the memory
        # search's) / its time
        "dominant_network": dominant,
        "dominant_gflops_per_second": networks.get(dominant),
    }


def significant(value: float, digits: int = 4) -> float:
    """``value`` rounded to ``digits`` significant figures (a fixed number of decimals would erase fast methods'
    figures: 0.00081 s/img on a GPU is 0.0008 to four decimals)."""
    return float(f"{value:.{digits}g}") if value else 0.0


def _short(value: float) -> str:
    """A figure for the table: three significant figures (an exponent only below 1e-4)."""
    return f"{value:.0f}" if abs(value) >= 1000 else f"{significant(value, 3):g}"


def setting_peak(record: dict[str, Any], peaks: dict[str, float]) -> float | None:
    """The matmul peak a record is measured against: its own (taken just before it was timed), else the run's."""
    return record.get("matmul_peak_gflops") or peaks.get(record.get("precision", "float32"))


def add_ratios(records: list[dict[str, Any]], peaks: dict[str, float]) -> None:
    """Set, in place, each batch's ``ratio_to_winclip_zero_shot`` (same batch size, same run), and its
    ``percent_of_peak``, ``networks_percent_of_peak`` and ``dominant_percent_of_peak`` (whole method, each
    network stage and the dominant network, against :func:`setting_peak`) and ``dominant_percent_of_run_peak``
    (against the run's peak of its precision)."""
    reference = next((record for record in records if record["method"] == "winclip" and record["shots"] == 0
                      and not record.get("variant") and "batches" in record), None)  # fmt: skip
    for record in records:
        peak, run_peak = setting_peak(record, peaks), peaks.get(record.get("precision", "float32"))
        for batch, figures in record.get("batches", {}).items():
            base = (reference or {}).get("batches", {}).get(batch, {}).get("seconds_per_image")
            if base and "seconds_per_image" in figures:
                figures["ratio_to_winclip_zero_shot"] = round(figures["seconds_per_image"] / base, 3)
            if figures.get("achieved_gflops_per_second") and peak:
                figures["percent_of_peak"] = round(100 * figures["achieved_gflops_per_second"] / peak, 1)
            networks = figures.get("networks_gflops_per_second")
            if networks and peak:
                figures["networks_percent_of_peak"] = {
                    stage: round(100 * value / peak, 1) for stage, value in networks.items()
                }
            dominant = figures.get("dominant_gflops_per_second")
            if dominant and peak:
                figures["dominant_percent_of_peak"] = round(100 * dominant / peak, 1)
            if dominant and run_peak:
                figures["dominant_percent_of_run_peak"] = round(100 * dominant / run_peak, 1)


def markdown(result: dict[str, Any]) -> str:
    """The run as a markdown table: settings are rows (one per batch size), the figures are columns."""
    peaks = result["matmul_peak_gflops"]
    machine = result.get("machine", {})
    lines = [
        f"# Speed and memory, {machine.get('cpu', 'unknown CPU')} ({result['threads']} threads, {result['device']})",
        "",
        "Matmul peak measured in the same run: "
        + ", ".join(f"{dtype} {value:.1f} GFLOP/s" for dtype, value in peaks.items())
        + f". {result['count']} test images, {result['repeats']} timed batches after a warm-up. % of peak: the "
        "whole method's GFLOP/s, and its dominant network's (the network stage with the most FLOPs; FLOPs counted "
        "inside that stage / its time), against "
        "the matmul peak of the row's precision measured in the setting's own process just before it was timed "
        "(the peak column).",
        "",
        "| method | shots | precision | batch | s/img | img/s | × WinCLIP 0-shot | GFLOP/img | peak GFLOP/s "
        "| % of peak | dominant network, % of peak (other networks, memory search) | peak RSS MB | stages (s/img) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for record in result["records"]:
        head = f"| {setting_label(record)} | {record['shots']} | {record.get('precision', '')}"
        if "error" in record:
            lines.append(f"{head} | – | error: {record['error'][:160]} |")
            continue
        peak = setting_peak(record, peaks) or next(iter(peaks.values()))
        for batch, figures in record["batches"].items():
            if "skipped" in figures:
                lines.append(f"{head} | {batch} | skipped: {figures['skipped']} |")
                continue
            stages = ", ".join(f"{name} {_short(value)}" for name, value in figures["stages_seconds_per_image"].items())
            ratio = figures.get("ratio_to_winclip_zero_shot")
            dominant = figures.get("dominant_gflops_per_second")
            dominant_text = f"{figures['dominant_network']} {100 * dominant / peak:.0f}" if dominant else "–"
            networks = figures.get("networks_gflops_per_second", {})
            others = [f"{stage} {100 * value / peak:.0f}" for stage, value in networks.items()
                      if stage != figures["dominant_network"]]  # fmt: skip
            if others:
                dominant_text += f" ({', '.join(others)})"
            lines.append(
                f"{head} | {batch} | {_short(figures['seconds_per_image'])} | {_short(figures['images_per_second'])} "
                f"| {'–' if ratio is None else f'{ratio:.2f}'} | {_short(figures['gflops_per_image'])} | {peak:.0f} "
                f"| {100 * figures['achieved_gflops_per_second'] / peak:.0f} | {dominant_text} "
                f"| {record['peak_rss_mb']:.0f} | {stages} |"
            )
    return "\n".join(lines) + "\n"


def default_output_name(threads: int) -> str:
    """``speed-<machine>-<threads>threads.json``: the accelerator's name, or ``cpu``."""
    from anomalens.evaluation.profiling import machine_info

    accelerator = machine_info()["accelerator"] or "cpu"
    name = re.sub(r"[^a-z0-9]+", "-", accelerator.lower()).strip("-")
    return f"speed-{name}-{threads}threads.json"


def write_results(out: Path, result: dict[str, Any]) -> dict[str, Any]:
    """Ratios, then the JSON (with the command and machine, atomically) and the markdown table beside it."""
    from anomalens.evaluation.profiling import write_benchmark_json
    from anomalens.io.outputs import atomic_write_text

    add_ratios(result["records"], result["matmul_peak_gflops"])
    written = write_benchmark_json(str(out), result)
    atomic_write_text(out.with_suffix(".md"), markdown(written))
    return written


def run_speed(
    settings: Sequence[dict[str, Any]],
    image_paths: Sequence[str | os.PathLike],
    reference_paths: Sequence[str | os.PathLike] = (),
    *,
    out: str | os.PathLike,
    batch_sizes: Sequence[int] = (1, 8),
    repeats: int = 3,
    threads: int = 2,
    device: str = "cpu",
    dtype: str = "float32",
    timeout: float = 3600,
    open_clip_configs: Sequence[str | os.PathLike] = (),
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Measure every setting, each in a fresh subprocess, and write the results after each one.

    Args:
        settings: Checked by :func:`check_settings`.
        image_paths / reference_paths: Test images every setting scores; normal images (``shots=k``: the first k).
        out: The JSON file; the markdown table goes beside it (``.md``).
        batch_sizes / repeats: Batch sizes timed per setting; timed batches per batch size (after a warm-up).
        threads / device: torch threads and device, the same for the matmul peak and every setting.
        dtype: Precision of the settings whose options do not set their own ``precision``.
        timeout: Seconds allowed per setting; one that runs over is recorded as an error and the run goes on.
        open_clip_configs: Extra open_clip model config JSON files, registered in every worker.
        on_record: Called with each setting's record as soon as it is measured (a progress hook).

    Returns:
        The result written to ``out``. A setting that fails is recorded with its error; the others still run.
    Raises:
        ValueError: Bad settings, no images, a non-positive batch size, repeats or threads, or an unknown dtype.
    """
    import torch  # here: the settings' subprocess workers import it themselves

    settings = _check_run(settings, image_paths, dtype, repeats, threads, batch_sizes)
    out = Path(out)
    torch.set_num_threads(threads)
    precisions = sorted({setting["options"].get("precision", dtype) for setting in settings})
    peaks = {precision: round(matmul_peak(device, precision), 2) for precision in precisions}
    logger.info("matmul peak: %s GFLOP/s", peaks)
    result: dict[str, Any] = {"matmul_peak_gflops": peaks, "count": len(image_paths), "repeats": repeats,
                              "threads": threads, "device": device, "dtype": dtype,
                              "images": [str(path) for path in image_paths], "records": []}  # fmt: skip
    common = {"images": [str(path) for path in image_paths], "references": [str(path) for path in reference_paths],
              "batch_sizes": list(batch_sizes), "repeats": repeats, "threads": threads, "device": device,
              "dtype": dtype, "open_clip_configs": [str(path) for path in open_clip_configs]}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="anomalens-speed-") as folder:
        for index, setting in enumerate(settings):
            spec_path = Path(folder) / f"setting-{index}.json"
            spec_path.write_text(json.dumps({"setting": setting, **common}))
            logger.info("timing %s %d-shot", setting_label(setting), setting["shots"])
            record = _run_worker(spec_path, timeout)
            record = {"method": setting["method"], "shots": setting["shots"], "variant": setting["variant"],
                      "precision": setting["options"].get("precision", dtype), **record}  # fmt: skip
            result["records"].append(record)
            result = write_results(out, result)  # after every setting: an interrupted run keeps what it measured
            if on_record is not None:
                on_record(record)
    return result


def _check_run(settings, image_paths, dtype: str, repeats: int, threads: int, batch_sizes) -> list[dict[str, Any]]:
    """The checked settings of a run; a ``ValueError`` naming the first bad argument otherwise."""
    settings = check_settings(list(settings))
    if not image_paths:
        raise ValueError("no test images to time")
    if dtype not in PRECISIONS:
        raise ValueError(f"dtype {dtype!r} must be one of {', '.join(PRECISIONS)}")
    for name, value in (("repeats", repeats), ("threads", threads), *(("batch size", size) for size in batch_sizes)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    return settings


def _run_worker(spec_path: Path, timeout: float) -> dict[str, Any]:
    command = [sys.executable, "-m", "anomalens.evaluation.speed", str(spec_path)]
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    line = next((row for row in completed.stdout.splitlines() if row.startswith(_RECORD_PREFIX)), None)
    if line is None:
        lines = completed.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"the worker exited with code {completed.returncode} and no output"}
    return json.loads(line.removeprefix(_RECORD_PREFIX))


def _worker(spec_path: str) -> None:
    """One setting in this process, from the spec file :func:`run_speed` wrote; prints one record line."""
    import torch

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    if spec["open_clip_configs"]:
        import open_clip

        for config in spec["open_clip_configs"]:
            open_clip.add_model_config(config)
    record = measure_setting(spec["setting"], spec["images"], spec["references"], batch_sizes=spec["batch_sizes"],
                             repeats=spec["repeats"], device=spec["device"], dtype=spec["dtype"])  # fmt: skip
    sys.stdout.write(_RECORD_PREFIX + json.dumps(record) + "\n")


if __name__ == "__main__":  # the worker of run_speed
    logging.basicConfig(level=logging.WARNING)
    _worker(sys.argv[1])
