"""The ``anomalens`` command line.

Commands:
    predict    score image files and folders; write heatmaps, raw maps, scores.jsonl / scores.csv
    benchmark  reproduce paper-style tables on MVTec AD, VisA, Real-IAD or your own folder
    benchmark-speed
               time every method side by side (seconds, FLOPs, % of the matmul peak, stages, peak memory)
    fit        fit a detector on reference images and save it (for predict --detector)
    serve      an HTTP API and a browser page over one detector
    train      train learned components (PatchCLIP projections for clipfusion)
    weights    download the pretrained weights a method needs, or list where they are found
    list       the available methods, backbones and datasets

Method options: ``--backbone`` and ``--pretrained`` (``none`` builds random weights), or any config field
with ``--set NAME=VALUE`` (repeatable). Errors are reported in one line, without a traceback
(set ``ANOMALENS_DEBUG=1`` for one).
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from jsonargparse import ArgumentParser

from anomalens.weights import WEIGHTS_DIR_ENV

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger("anomalens")


def _add_method_options(parser: ArgumentParser, method_required: bool = True) -> None:
    parser.add_argument("--method", required=method_required, help="detector method (see `anomalens list`)")
    parser.add_argument("--backbone", default=None, help="backbone name (method option)")
    parser.add_argument("--pretrained", default=None, help="pretrained weights: a tag, a path, or 'none' (random)")
    parser.add_argument(
        "--set", dest="options", action="append", default=[], metavar="NAME=VALUE", help="any method config field"
    )
    parser.add_argument("--weights-dir", default=None, help=f"folder with pretrained weights (or ${WEIGHTS_DIR_ENV})")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=None, help="images per forward pass")


def _add_reference_options(parser: ArgumentParser, threshold_help: str) -> None:
    parser.add_argument("--reference", nargs="+", default=None, help="normal reference images and/or folders")
    parser.add_argument("--class-name", default=None, help="the product's name, e.g. bottle")
    parser.add_argument("--threshold", type=float, default=None, help=threshold_help)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="anomalens", description="Visual anomaly detection with foundation models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only, no progress bars")
    commands = parser.add_subcommands(dest="command", required=True)

    predict = ArgumentParser(description="Score images; write heatmaps, raw maps and scores.")
    _add_method_options(predict, method_required=False)
    predict.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    predict.add_argument("--out", required=True, help="output folder")
    predict.add_argument("--detector", default=None, help="a detector folder saved by `anomalens fit`")
    _add_reference_options(predict, "score above which an image is anomalous")
    predict.add_argument("--raw-format", default="npy", choices=["npy", "png16"], help="format of the raw maps")
    predict.add_argument("--no-overlays", action="store_true", help="do not write heatmap overlays")
    predict.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    predict.add_argument("--save-detector", default=None, help="also save the fitted detector to this folder")
    predict.add_argument("--engine", default="local", choices=["local", "ray"], help="where to score")
    predict.add_argument("--ray-address", default=None, help="Ray cluster address (default: start a local one)")
    predict.add_argument("--num-workers", type=int, default=1, help="Ray actors scoring in parallel")
    predict.add_argument("--gpu-fraction", type=float, default=None, help="GPUs per Ray actor (default: 1 if any)")
    commands.add_subcommand("predict", predict, help="score images")

    benchmark = ArgumentParser(description="Benchmark a method on a dataset; write results.json and results.md.")
    _add_method_options(benchmark)
    benchmark.add_argument("--dataset", required=True, help="mvtec, visa, realiad or folder")
    benchmark.add_argument("--root", required=True, help="dataset root folder")
    benchmark.add_argument("--category", nargs="+", default=None, help="categories (default: all)")
    benchmark.add_argument("--shots", default="1", help="reference images per category: an integer, or 'all'")
    benchmark.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds for drawing references")
    benchmark.add_argument("--eval-size", default="256", help="side maps and masks are resized to; 'none' = native")
    benchmark.add_argument(
        "--max-images", type=int, default=None, help="score a fixed stratified subset of N test images per category"
    )
    benchmark.add_argument("--out", default=None, help="output folder for results.json and results.md")
    commands.add_subcommand("benchmark", benchmark, help="reproduce paper-style tables")

    speed = ArgumentParser(
        description="Time methods side by side in one run: seconds and images per second, FLOPs, GFLOP/s against "
        "the matmul peak, stage breakdown, peak memory (one subprocess per setting); write JSON and markdown."
    )
    speed.add_argument("--methods", nargs="+", default=None, help="only these methods' full-size settings")
    speed.add_argument("--settings", type=int, nargs="+", default=None, help="only these full-size settings (indices)")
    speed.add_argument("--no-variants", action="store_true", help="skip the variant rows (SD 256 px, bf16)")
    speed.add_argument("--settings-file", default=None, help="JSON list of {method, shots, options, variant} instead")
    speed.add_argument("--images", nargs="+", default=None, help="test images / folders (default: MVTec AD bottle)")
    speed.add_argument("--reference", nargs="+", default=None, help="reference images / folders for few-shot rows")
    speed.add_argument("--shared", default=None, help="holds datasets/mvtec (default: $ANOMALENS_SHARED, ../shared)")
    speed.add_argument("--count", type=int, default=16, help="test images used (a fixed subset)")
    speed.add_argument("--repeats", type=int, default=3, help="timed batches per batch size, after a warm-up")
    speed.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    speed.add_argument("--threads", type=int, default=None, help="torch threads for every setting (default: torch's)")
    speed.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    speed.add_argument(
        "--dtype", default="float32", help="precision of settings without their own: float32, bfloat16 or float16"
    )
    speed.add_argument("--timeout", type=float, default=3600, help="seconds allowed per setting")
    speed.add_argument("--open-clip-config", nargs="+", default=[], help="extra open_clip model config JSON files")
    speed.add_argument("--list", action="store_true", help="list the full-size settings and exit")
    speed.add_argument("--out", default=None, help="JSON file (default: speed-<machine>-<threads>threads.json)")
    commands.add_subcommand("benchmark-speed", speed, help="time methods side by side")

    serve = ArgumentParser(description="Serve a detector over HTTP with a browser page.")
    _add_method_options(serve, method_required=False)
    serve.add_argument("--detector", default=None, help="a detector folder saved by `anomalens fit`")
    _add_reference_options(serve, "score above which an image is anomalous")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default: localhost only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-batch", type=int, default=8, help="images per forward pass at most")
    serve.add_argument("--max-wait-ms", type=float, default=20.0, help="time to fill a batch")
    serve.add_argument("--max-upload-mb", type=float, default=20.0, help="largest accepted file")
    serve.add_argument("--max-megapixels", type=float, default=40.0, help="largest accepted image")
    serve.add_argument("--timeout", type=float, default=60.0, help="seconds before a request gets 504")
    commands.add_subcommand("serve", serve, help="HTTP API and browser page")

    fit = ArgumentParser(description="Fit a detector on reference images and save it.")
    _add_method_options(fit)
    _add_reference_options(fit, "fixed threshold (default: leave-one-out)")
    fit.add_argument("--out", required=True, help="folder to save the detector in")
    commands.add_subcommand("fit", fit, help="fit and save a detector")

    weights = ArgumentParser(description="Pretrained weights.")
    commands.add_subcommand("weights", weights, help="download or list pretrained weights")
    weights_commands = weights.add_subcommands(dest="action", required=True)
    download = ArgumentParser(description="Download the weights METHOD needs into the cache.")
    download.add_argument("method", help="method name")
    download.add_argument("--backbone", default=None, help="backbone name (method option)")
    download.add_argument("--pretrained", default=None, help="pretrained weights tag or path")
    download.add_argument("--set", dest="options", action="append", default=[], metavar="NAME=VALUE")
    download.add_argument("--weights-dir", default=None, help="look here first")
    weights_commands.add_subcommand("download", download, help="fill the weights cache")
    listing = ArgumentParser(description="Registered weights and where they are found.")
    listing.add_argument("--weights-dir", default=None, help="look here first")
    weights_commands.add_subcommand("list", listing, help="list registered weights")

    train = ArgumentParser(description="Train the learned parts of a method.")
    commands.add_subcommand("train", train, help="train learned components (PatchCLIP projections, VLMDiff)")
    train_commands = train.add_subcommands(dest="target", required=True)
    patchclip = ArgumentParser(description="Train CLIPFusion's PatchCLIP projections on an auxiliary dataset.")
    patchclip.add_argument("--dataset", required=True, help="auxiliary dataset with pixel labels (mvtec, visa, ...)")
    patchclip.add_argument("--root", required=True, help="its root folder")
    patchclip.add_argument("--out", required=True, help="output .safetensors file")
    patchclip.add_argument("--backbone", default="ViT-L-14-336", help="open_clip model")
    patchclip.add_argument("--pretrained", default="openai", help="its pretrained tag, a path, or 'none'")
    patchclip.add_argument("--layers", type=int, nargs="+", default=[5, 11, 17, 23], help="0-based CLIP blocks")
    patchclip.add_argument("--category", nargs="+", default=None, help="categories to train on (default: all)")
    patchclip.add_argument("--epochs", type=int, default=1)
    patchclip.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    patchclip.add_argument("--batch-size", type=int, default=8)
    patchclip.add_argument("--seed", type=int, default=0)
    patchclip.add_argument("--weights-dir", default=None, help="folder with pretrained weights")
    train_commands.add_subcommand("patchclip", patchclip, help="PatchCLIP projections for clipfusion")
    vlmdiff = ArgumentParser(description="Train one VLMDiff model on the normal images of all chosen categories.")
    vlmdiff.add_argument("--dataset", required=True, help="dataset layout (mvtec, visa, realiad, folder)")
    vlmdiff.add_argument("--root", required=True, help="its root folder")
    vlmdiff.add_argument("--categories", nargs="+", default=None, help="categories trained together (default: all)")
    vlmdiff.add_argument("--out", required=True, help="run folder (a re-run on it resumes from its checkpoint)")
    vlmdiff.add_argument("--unet", default="sd-1-5", help="UNet / guidance size: sd-1-5, small or tiny")
    vlmdiff.add_argument("--autoencoder", default="sd", help="latent autoencoder: sd, taef2 or tiny")
    vlmdiff.add_argument("--autoencoder-weights", default="default", help="'default', a path / repo id, or 'none'")
    vlmdiff.add_argument("--text-encoder", default="sd", help="sd, minilm, tiny, or a sentence-encoder id / folder")
    vlmdiff.add_argument("--text-encoder-weights", default="default", help="'default', a path / repo id, or 'none'")
    vlmdiff.add_argument("--sd-model", default=None, help="repo id / folder of Stable Diffusion (sd parts)")
    vlmdiff.add_argument("--image-size", type=int, default=256)
    vlmdiff.add_argument("--steps", type=int, default=10000, help="optimiser steps in total")
    vlmdiff.add_argument("--batch-size", type=int, default=12)
    vlmdiff.add_argument("--gradient-accumulation", type=int, default=1, help="micro-batches per optimiser step")
    vlmdiff.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate")
    vlmdiff.add_argument("--warmup-steps", type=int, default=0)
    vlmdiff.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    vlmdiff.add_argument("--seed", type=int, default=0)
    vlmdiff.add_argument("--captions", default=None, help="caption file (.json, .jsonl or .csv)")
    vlmdiff.add_argument("--captioner", default=None, help="transformers VLM / image-to-text model id or folder")
    vlmdiff.add_argument("--caption-template", default="a photo of a {class_name}", help="fallback caption")
    vlmdiff.add_argument("--caption-dropout", type=float, default=0.1, help="share of captions replaced by ''")
    vlmdiff.add_argument("--mixed-precision", default="auto", help="auto, no, bf16 or fp16 (GPU only)")
    vlmdiff.add_argument("--autoencoder-finetune-steps", type=int, default=0, help="autoencoder fine-tuning steps")
    vlmdiff.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    vlmdiff.add_argument("--weights-dir", default=None, help="folder with pretrained weights")
    vlmdiff.add_argument("--overwrite", action="store_true", help="start afresh instead of resuming")
    train_commands.add_subcommand("vlmdiff", vlmdiff, help="VLMDiff's caption-conditioned diffusion model")

    commands.add_subcommand("list", ArgumentParser(description="Methods, backbones and datasets."), help="list names")
    return parser


def _method_options(args: Any) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in args.options or []:
        if "=" not in item:
            raise ValueError(f"--set expects NAME=VALUE, got {item!r}")
        name, value = item.split("=", 1)
        options[name.strip().replace("-", "_")] = value
    if getattr(args, "backbone", None) is not None:
        options["backbone"] = args.backbone
    if getattr(args, "pretrained", None) is not None:
        options["pretrained"] = args.pretrained
    if getattr(args, "batch_size", None) is not None:
        options["batch_size"] = args.batch_size
    return options


def _create(args: Any):
    import anomalens

    options = _method_options(args)
    cls = anomalens.get_method(args.method)
    from anomalens.config import config_fields

    # --batch-size is a runtime option: only pass it to configs that have the field.
    if "batch_size" in options and "batch_size" not in config_fields(cls.config_class):
        options.pop("batch_size")
    detector = anomalens.create(args.method, weights_dir=args.weights_dir, **options)
    return detector.to(args.device)


def _progress(total: int | None, desc: str, quiet: bool, unit: str = "img"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=quiet or None, dynamic_ncols=True)


def _readable_images(paths: Sequence, kind: str) -> Iterator[tuple[Any, np.ndarray]]:
    """``(path, image)`` for each of ``paths`` that loads as an image; the others are reported and skipped."""
    from anomalens.images import ImageLoadError, load_image

    for path in paths:
        try:
            image = load_image(path)
        except ImageLoadError as error:
            logger.warning("skipped %s %s: %s", kind, path, error.reason)
            continue
        yield path, image


def _reference_images(entries: Sequence[str] | None) -> list:
    """Load reference images, reporting and skipping unreadable ones."""
    from anomalens.images import find_images

    if not entries:
        return []
    images = [image for _, image in _readable_images(find_images(entries), "reference")]
    if not images:
        raise ValueError(f"no readable reference image in {list(entries)}")
    return images


def _fit_detector(detector, args: Any) -> str:
    """Fit from --reference (deriving the default threshold); returns how the threshold was chosen."""
    from anomalens.predict import leave_one_out_threshold

    references = _reference_images(args.reference)
    if not references:
        if not detector.is_fitted:
            detector.fit(None, class_name=args.class_name)
        return "detector" if detector.threshold is not None else "none"
    if args.threshold is None and detector.few_shot:
        logger.info("fitting on %d reference image(s) and deriving the threshold (leave-one-out)", len(references))
        detector.threshold = leave_one_out_threshold(detector, references, class_name=args.class_name)
        return "leave-one-out" if detector.threshold is not None else "none"
    detector.fit(references, class_name=args.class_name)
    return "given" if args.threshold is not None else "none"


def cmd_predict(args: Any) -> int:
    import anomalens
    from anomalens.predict import collect_inputs, run_predict

    if args.engine == "ray":
        from anomalens.distributed import list_inputs, require_ray

        require_ray()  # before any work: a missing Ray says how to install it
        total = len(list_inputs(args.inputs))
    else:
        total = len(collect_inputs(args.inputs)[0])
    if total == 0:
        raise ValueError(f"no image files found in {args.inputs}")
    if args.detector:
        detector = anomalens.load(args.detector, map_location=args.device)
        if args.method and args.method != detector.method_name:
            raise ValueError(f"--method {args.method!r} differs from the saved detector's {detector.method_name!r}")
    elif args.method:
        detector = _create(args)
    else:
        raise ValueError("give --method (and references) or --detector SAVED_FOLDER")
    source = _fit_detector(detector, args)
    if args.save_detector:
        detector.save(args.save_detector)
    bar = _progress(total, "scoring", args.quiet)
    finished = [0]

    def advance(done: int) -> None:
        bar.update(done - finished[0])
        finished[0] = done

    common = {
        "threshold": args.threshold,
        "threshold_source": "given" if args.threshold is not None else source,
        "raw_format": args.raw_format,
        "overwrite": args.overwrite,
        "write_overlays": not args.no_overlays,
        "run_info": {"command": _command_line()},
        "progress": advance,
    }
    try:
        if args.engine == "ray":
            from anomalens.distributed import score

            summary = score(
                detector,
                args.inputs,
                args.out,
                num_workers=args.num_workers,
                batch_size=args.batch_size or getattr(detector.config, "batch_size", 8),
                ray_address=args.ray_address,
                gpu_fraction=args.gpu_fraction,
                **common,
            )
        else:
            summary = run_predict(detector, args.inputs, args.out, batch_size=args.batch_size, **common)
    finally:
        bar.close()
    if summary.threshold is not None:
        print(f"threshold {summary.threshold:.6g} ({summary.threshold_source})")
    for item in summary.skipped_inputs:
        print(f"skipped {item['path']}: {item['error']}", file=sys.stderr)
    print(summary.line())
    return 0


def cmd_serve(args: Any) -> int:
    import anomalens
    from anomalens.serve import ServerSettings, _require_fastapi, create_app

    _require_fastapi()
    import uvicorn

    if args.detector:
        detector = anomalens.load(args.detector, map_location=args.device)
    elif args.method:
        detector = _create(args)
    else:
        raise ValueError("give --method (and optionally --reference) or --detector SAVED_FOLDER")
    if args.threshold is not None:
        detector.threshold = args.threshold
    if args.reference or (detector.zero_shot and not detector.is_fitted):
        _fit_detector(detector, args)
    settings = ServerSettings(
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_pixels=int(args.max_megapixels * 1e6),
        request_timeout_s=args.timeout,
    )
    app = create_app(detector, settings, class_name=args.class_name)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s: reachable from other machines", args.host)
    print(f"anomalens serving {detector.method_name} on http://{args.host}:{args.port}/ (Ctrl+C to stop)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def cmd_benchmark(args: Any) -> int:
    from anomalens.benchmark import parse_shots, run_benchmark

    shots = parse_shots(args.shots)
    eval_size = None if str(args.eval_size).lower() == "none" else int(args.eval_size)
    detector = _create(args)
    results = run_benchmark(
        detector,
        args.dataset,
        args.root,
        categories=args.category,
        shots=shots,
        seeds=args.seeds,
        out_dir=args.out,
        batch_size=args.batch_size,
        eval_size=eval_size,
        max_images=args.max_images,
        command=_command_line(),
        progress_factory=lambda total, desc: _progress(total, desc, args.quiet),
    )
    from anomalens.benchmark import results_table

    print(results_table(results))
    if args.out:
        print(f"results written to {os.path.join(args.out, 'results.json')} and results.md")
    return 0


def _speed_settings(args: Any) -> list[dict]:
    from anomalens.speed import FULL_SIZE_SETTINGS, check_settings, load_settings, setting_label

    if args.settings_file:
        return load_settings(args.settings_file)
    methods = list(dict.fromkeys(setting["method"] for setting in FULL_SIZE_SETTINGS))
    unknown = sorted(set(args.methods or []) - set(methods))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown} for benchmark-speed; valid: {', '.join(methods)}")
    count = len(FULL_SIZE_SETTINGS)
    bad = sorted(index for index in args.settings or [] if not 0 <= index < count)
    if bad:
        listing = "; ".join(f"{i}: {setting_label(s)} {s['shots']}-shot" for i, s in enumerate(FULL_SIZE_SETTINGS))
        raise ValueError(f"--settings {bad} out of range 0..{count - 1} ({listing})")
    chosen = [setting for index, setting in enumerate(FULL_SIZE_SETTINGS)
              if (args.methods is None or setting["method"] in args.methods)
              and (args.settings is None or index in args.settings)
              and not (args.no_variants and setting.get("variant"))]  # fmt: skip
    if not chosen:
        raise ValueError("--methods, --settings and --no-variants leave no setting to time")
    return check_settings(chosen)


def cmd_benchmark_speed(args: Any) -> int:
    from pathlib import Path

    import torch

    from anomalens.images import find_images
    from anomalens.speed import (
        FULL_SIZE_SETTINGS,
        default_output_name,
        default_test_images,
        evenly_spaced,
        markdown,
        run_speed,
        setting_label,
    )

    if args.list:
        for index, setting in enumerate(FULL_SIZE_SETTINGS):
            print(f"{index:2d}  {setting_label(setting)} {setting['shots']}-shot  {setting['options']}")
        return 0
    settings = _speed_settings(args)
    shared = Path(args.shared or os.environ.get("ANOMALENS_SHARED", "../shared"))
    if args.images:
        # unreadable files are skipped here: every setting would fail on them
        images = evenly_spaced([path for path, _ in _readable_images(find_images(args.images), "image")], args.count)
        if not images:
            raise ValueError(f"no readable images in {args.images}")
    else:
        images = default_test_images(shared, args.count)
    needed = max(setting["shots"] for setting in settings)
    if args.reference:
        references = [path for path, _ in _readable_images(find_images(args.reference), "reference")]
    else:
        references = sorted((shared / "datasets" / "mvtec" / "bottle" / "train" / "good").glob("*.png"))[:needed]
    if len(references) < needed:
        raise ValueError(f"a setting needs {needed} reference image(s), found {len(references)}: pass --reference")
    threads = args.threads or torch.get_num_threads()
    out = Path(args.out or default_output_name(threads))
    bar = _progress(len(settings), "settings", args.quiet, unit="setting")

    def on_record(record: dict) -> None:
        bar.update(1)
        if "error" in record:
            logger.warning("%s %d-shot failed: %s", setting_label(record), record["shots"], record["error"])

    try:
        result = run_speed(settings, images, references, out=out, batch_sizes=args.batch_sizes, repeats=args.repeats,
                           threads=threads, device=args.device, dtype=args.dtype, timeout=args.timeout,
                           open_clip_configs=args.open_clip_config, on_record=on_record)  # fmt: skip
    finally:
        bar.close()
    print(markdown(result))
    print(f"results written to {out} and {out.with_suffix('.md')}")
    return 0


def cmd_fit(args: Any) -> int:
    detector = _create(args)
    if args.threshold is not None:
        detector.threshold = args.threshold
    source = _fit_detector(detector, args)
    path = detector.save(args.out)
    threshold = "none" if detector.threshold is None else f"{detector.threshold:.6g} ({source})"
    print(f"saved fitted {detector.method_name} detector to {path}; threshold {threshold}")
    return 0


def cmd_weights(args: Any) -> int:
    import anomalens
    from anomalens.weights import WEIGHTS, resolve

    if args.action == "list":
        for name, source in sorted(WEIGHTS.items()):
            try:
                where = str(resolve(name, weights_dir=args.list.weights_dir, allow_download=False))
            except FileNotFoundError:
                where = "not found"
            print(f"{name:20s} {source.size_mb:7.1f} MB  {source.licence:28s} {where}")
        return 0
    download = args.download
    cls = anomalens.get_method(download.method)
    from anomalens.config import build_config

    config = build_config(cls.config_class, _method_options(download), method=download.method)
    references = cls.required_weights(config)
    if not references:
        print(f"{download.method} with this configuration needs no pretrained weights")
    for reference in references:
        path = resolve(reference, weights_dir=download.weights_dir, method_hint=download.method)
        print(f"{reference}: {path}")
    return 0


def _none_or(value: str | None) -> str | None:
    return None if value is None or str(value).lower() == "none" else value


def cmd_train_vlmdiff(options: Any, quiet: bool) -> int:
    from tqdm.auto import tqdm

    from anomalens.methods.vlmdiff import VLMDiffArchitecture
    from anomalens.methods.vlmdiff_training import VLMDiffTrainConfig, train_vlmdiff

    architecture = {
        "unet": options.unet,
        "autoencoder": options.autoencoder,
        "autoencoder_weights": _none_or(options.autoencoder_weights),
        "text_encoder": options.text_encoder,
        "text_encoder_weights": _none_or(options.text_encoder_weights),
        "image_size": options.image_size,
    }
    if options.sd_model:
        architecture["sd_model"] = options.sd_model
    config = VLMDiffTrainConfig(
        dataset=options.dataset,
        root=options.root,
        categories=options.categories,
        architecture=VLMDiffArchitecture.from_dict(architecture),
        steps=options.steps,
        batch_size=options.batch_size,
        gradient_accumulation=options.gradient_accumulation,
        learning_rate=options.lr,
        warmup_steps=options.warmup_steps,
        checkpoint_every=options.checkpoint_every,
        seed=options.seed,
        caption_file=options.captions,
        captioner=options.captioner,
        caption_template=options.caption_template,
        caption_dropout=options.caption_dropout,
        mixed_precision=options.mixed_precision,
        autoencoder_finetune_steps=options.autoencoder_finetune_steps,
        device=options.device,
        weights_dir=options.weights_dir,
    )
    bar = tqdm(total=config.steps, desc="training vlmdiff", unit="step", disable=quiet or None, dynamic_ncols=True)

    def advance(step: int, total: int, loss: float) -> None:
        bar.n = step
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        bar.refresh()

    def caption_bar(iterable):
        return tqdm(iterable, desc="captioning", unit="img", disable=quiet or None, dynamic_ncols=True)

    try:
        out = train_vlmdiff(
            config, options.out, overwrite=options.overwrite, progress=advance, caption_progress=caption_bar
        )
    finally:
        bar.close()
    print(
        f"trained VLMDiff in {out}; score with: "
        f"anomalens predict --method vlmdiff --set checkpoint={out} IMAGES --out DIR"
    )
    return 0


def cmd_train(args: Any) -> int:
    from anomalens.training import train_patchclip

    if args.target == "vlmdiff":
        return cmd_train_vlmdiff(args.vlmdiff, args.quiet)
    options = args.patchclip
    pretrained = _none_or(options.pretrained)
    bar = _progress(None, "training patchclip", args.quiet)
    finished = [0]

    def advance(done: int, loss: float) -> None:
        bar.update(done - finished[0])
        bar.set_postfix(loss=f"{loss:.4f}")
        finished[0] = done

    try:
        path = train_patchclip(
            options.dataset,
            options.root,
            options.out,
            backbone=options.backbone,
            pretrained=pretrained,
            layers=options.layers,
            categories=options.category,
            epochs=options.epochs,
            learning_rate=options.lr,
            batch_size=options.batch_size,
            seed=options.seed,
            weights_dir=options.weights_dir,
            progress=advance,
        )
    finally:
        bar.close()
    print(
        f"saved PatchCLIP projections to {path}; use them with --set clip_projection=trained "
        f"--set clip_projection_weights={path}"
    )
    return 0


def cmd_list(args: Any) -> int:
    import anomalens
    from anomalens.backbones import list_backbones
    from anomalens.datasets import list_datasets

    print("methods:   " + ", ".join(anomalens.list_methods()))
    print("backbones: " + ", ".join(list_backbones()))
    print("datasets:  " + ", ".join(list_datasets()))
    return 0


def _command_line() -> str:
    return "anomalens " + " ".join(shlex.quote(part) for part in sys.argv[1:])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``anomalens`` command."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    # Our own messages at the chosen level; other libraries' (open_clip, Ray, ...) at warnings only.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("anomalens").setLevel(level)
    handlers = {"predict": cmd_predict, "benchmark": cmd_benchmark, "fit": cmd_fit, "weights": cmd_weights}
    handlers["list"] = cmd_list
    handlers["train"] = cmd_train
    handlers["serve"] = cmd_serve
    handlers["benchmark-speed"] = cmd_benchmark_speed
    command_args = getattr(args, args.command)
    if args.command in ("predict", "benchmark", "benchmark-speed", "train"):
        command_args.quiet = args.quiet
    try:
        return handlers[args.command](command_args if args.command != "weights" else args.weights)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as error:
        if os.environ.get("ANOMALENS_DEBUG"):
            raise
        print(f"anomalens: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
