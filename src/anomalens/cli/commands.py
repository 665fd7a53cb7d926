"""The handlers of the ``anomalens`` commands: short orchestration over the library, one function per command.

Each handler takes the parsed options (one validated dataclass per group, see :mod:`anomalens.cli.parser`) and
whether progress bars are off, prints its result and returns the exit status.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from anomalens.cli.parser import MethodOptions, ReferenceOptions

logger = logging.getLogger("anomalens")


# ---------------------------------------------------------------------------------------------------- helpers
def method_config(method: MethodOptions, method_name: str | None = None) -> dict[str, Any]:
    """The method config options of ``--set NAME=VALUE``, ``--backbone``, ``--pretrained`` and ``--batch-size``.

    ``--pretrained none`` builds every network of ``method_name`` (default ``--method``) with random weights; an
    explicit ``--set`` still wins.
    """
    options: dict[str, Any] = {}
    for item in method.set:
        if "=" not in item:
            raise ValueError(f"--set expects NAME=VALUE, got {item!r}")
        name, value = item.split("=", 1)
        options[name.strip().replace("-", "_")] = value
    for name in ("backbone", "pretrained"):
        if getattr(method, name):
            options[name] = getattr(method, name)
    if method.batch_size is not None:
        options["batch_size"] = method.batch_size
    options["device"] = method.device
    if str(options.get("pretrained", "")).lower() == "none" and (method_name or method.method):
        import anomalens

        random = anomalens.get_method(method_name or method.method).config_class.random_weights()
        options = {**random, **{key: value for key, value in options.items() if key != "pretrained"}}
    return options


def create_detector(method: MethodOptions):
    """A new detector of ``--method`` with its options."""
    import anomalens

    if not method.method:
        raise ValueError(f"give --method (one of {', '.join(anomalens.list_methods())})")
    return anomalens.create(method.method, weights_dir=method.weights_dir, **method_config(method))


def detector_from(method: MethodOptions, saved: str | None):
    """A saved detector (``--detector``) or a new one (``--method``)."""
    import anomalens

    if saved:
        detector = anomalens.load(saved, map_location=method.device)
        if method.method and method.method != detector.method_name:
            raise ValueError(f"--method {method.method!r} differs from the saved detector's {detector.method_name!r}")
        return detector
    if not method.method:
        raise ValueError("give --method (and references) or --detector SAVED_FOLDER")
    return create_detector(method)


def progress_bar(total: int | None, desc: str, quiet: bool, unit: str = "img"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=quiet or None, dynamic_ncols=True)


def loss_bar(total: int | None, desc: str, quiet: bool, unit: str):
    """A progress bar and its callback for training loops: ``advance(done, ..., loss)`` moves it to ``done``."""
    bar = progress_bar(total, desc, quiet, unit=unit)

    def advance(done: int, *rest: float) -> None:  # (images done, loss) or (step, total steps, loss)
        if len(rest) == 2 and bar.total != rest[0]:  # the run's own total (epochs decide it once data is read)
            bar.total = rest[0]
        bar.n = done
        bar.set_postfix(loss=f"{rest[-1]:.4f}", refresh=False)
        bar.refresh()

    return bar, advance


def reference_images(entries: Sequence[str], paths: list | None = None) -> list:
    """Load reference images from files and folders, reporting and skipping unreadable ones (the paths of those
    read are appended to ``paths`` when given)."""
    from anomalens.io.images import find_images, readable_images

    if not entries:
        return []
    loaded = list(readable_images(find_images(entries), "reference"))
    if not loaded:
        raise ValueError(f"no readable reference image in {list(entries)}")
    if paths is not None:
        paths.extend(str(path) for path, _ in loaded)
    return [image for _, image in loaded]


def fit_detector(detector, references: ReferenceOptions, quiet: bool = True, paths: list | None = None) -> str:
    """Fit from ``--reference`` and set the thresholds: :func:`anomalens.thresholds.apply_threshold_options`, the
    one place that decides where a threshold comes from. Returns the threshold's source."""
    from anomalens.thresholds import apply_threshold_options

    images = reference_images(references.reference, paths)
    if images and detector.few_shot:
        rule = (f"conformal, false-alarm rate {references.false_alarm_rate}" if references.false_alarm_rate
                else f"threshold {references.threshold}")  # fmt: skip
        logger.info("fitting on %d reference image(s) (%s)", len(images), rule)
    bar = progress_bar(None, "fitting", quiet or not images, unit="step")

    def advance(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        return apply_threshold_options(detector, images, references.class_name, references, advance)
    finally:
        bar.close()


def command_line() -> str:
    return "anomalens " + " ".join(shlex.quote(part) for part in sys.argv[1:])


# ---------------------------------------------------------------------------------------------------- commands
def cmd_predict(options: Any, quiet: bool) -> int:
    import dataclasses

    run = options.run
    if not options.inputs:
        swallowed = f" (--reference took {list(options.references.reference)})" if options.references.reference else ""
        raise ValueError(
            f"no inputs to score{swallowed}: give image files or folders before the options, "
            "or end the reference list with -- (anomalens predict ... --reference refs/ -- incoming/)"
        )
    request = _prepare_request(options)  # the inputs listed and the output folder checked, before any fitting
    detector = detector_from(options.method, run.detector)
    reference_paths: list[str] = []
    fit_detector(detector, options.references, quiet, reference_paths)
    if run.save_detector:
        if not hasattr(detector, "save"):
            raise ValueError(f"--save-detector: {run.detector} is an exported detector; it is saved already")
        detector.save(run.save_detector)
    request = dataclasses.replace(request.calibrated(detector),
                                  run_info={**request.run_info, "references": reference_paths})  # fmt: skip
    bar = progress_bar(len(request.images), "scoring", quiet)
    finished = [0]

    def advance(done: int) -> None:
        bar.update(done - finished[0])
        finished[0] = done

    recorder = _recorder(options, detector) if run.record else None
    try:
        summary = _score(detector, request, run, advance, recorder)
    finally:
        bar.close()
    if summary.threshold is not None:
        print(f"threshold {summary.threshold:.6g} ({summary.threshold_source})")
    if detector.pixel_threshold is not None:
        print(f"pixel threshold {detector.pixel_threshold:.6g} (defect masks in {run.out}/masks)")
    for item in summary.skipped_inputs:
        print(f"skipped {item['path']}: {item['error']}", file=sys.stderr)
    print(summary.line())
    return 0


def _prepare_request(options: Any):
    """The predict request of the command line: the local engine lists local files; Ray (checked first, so a
    missing Ray says how to install it) also reads URIs and resumes an earlier run in the folder."""
    from anomalens.engines.request import PredictRequest

    lister, resumable = None, False
    if options.run.engine == "ray":
        from anomalens.engines.ray import list_inputs, require_ray

        require_ray()
        lister, resumable = list_inputs, True
    extra = {"lister": lister} if lister else {}
    return PredictRequest.prepare(options.inputs, options.run, run_info={"command": command_line()},
                                  batch_size=options.method.batch_size, resumable=resumable, **extra)  # fmt: skip


def _score(detector, request, run, progress, recorder=None):
    if run.engine == "ray":
        from anomalens.engines.ray import score

        return score(detector, request, num_workers=run.num_workers, ray_address=run.ray_address,
                     gpu_fraction=run.gpu_fraction, progress=progress)  # fmt: skip
    from anomalens.engines.local import run_predict

    return run_predict(detector, request, progress, recorder)


def _recorder(options: Any, detector):
    """``predict --record``: each score record also becomes a row of the station's history (source
    ``predict:OUT``; the image stays where it is, its overlay in the run folder)."""
    import hashlib

    from anomalens.station.history import History
    from anomalens.station.models import check_product_name

    product = check_product_name(options.run.product or options.references.class_name or "")
    history = History(options.models.db_url())
    fingerprint = detector.fingerprint() if hasattr(detector, "fingerprint") else None
    source = f"predict:{options.run.out}"

    def record(item: dict, result) -> None:
        with open(item["path"], "rb") as handle:
            sha256 = hashlib.sha256(handle.read()).hexdigest()
        history.record({"product": product, "fingerprint": fingerprint, "method": detector.method_name,
                        "source": source[:255], "image_sha256": sha256, "image_name": item["path"][-255:],
                        "width": item["width"], "height": item["height"], "score": item["score"],
                        "threshold": item["threshold"], "label": item["label"],
                        "p_value": detector.calibration.p_value(item["score"]),
                        "pixel_threshold": item.get("pixel_threshold"), "regions": item.get("regions")})  # fmt: skip

    return record


def cmd_fit(options: Any, quiet: bool) -> int:
    detector = create_detector(options.method)
    reference_paths: list[str] = []
    source = fit_detector(detector, options.references, quiet, reference_paths)
    threshold = "none" if detector.threshold is None else f"{detector.threshold:.6g} ({source})"
    if options.run.out:
        path = detector.save(options.run.out)
        print(f"saved fitted {detector.method_name} detector to {path}; threshold {threshold}")
    if options.run.product:
        version = _add_version(options.models, options.run.product, detector, reference_paths, options.run.note)
        print(f"added {version.label} (now active) to {version.path.parents[2]}; threshold {threshold}")
    return 0


def _add_version(paths: Any, product: str, detector, references: list[str], note: str | None):
    """Save ``detector`` as ``product``'s new, active version in the models directory."""
    import tempfile

    from anomalens.station.models import ModelStore, check_product_name

    check_product_name(product)
    store = ModelStore(paths.models_dir())
    with tempfile.TemporaryDirectory(prefix=".fit.") as staging:
        saved = detector.save(f"{staging}/detector")
        return store.add(product, saved, references=references, source="fit", note=note,
                         extra={"tiling": _tiling_record(detector)})  # fmt: skip


def _tiling_record(detector) -> Any:
    from anomalens.config import config_to_dict

    return config_to_dict(detector.config).get("tiling")


def cmd_export(options: Any, quiet: bool) -> int:
    import anomalens

    export = options.export
    detector = anomalens.load(export.detector)
    if not hasattr(detector, "export"):
        raise ValueError(f"{export.detector} is already an exported detector")
    path = detector.export(export.out, format=export.format, batch_size=export.batch_size, overwrite=export.overwrite)
    import json

    metadata = json.loads((path / "metadata.json").read_text())
    print(f"exported {detector.method_name} to {path} ({metadata['model_file']}, sha256 {metadata['sha256'][:16]}..., "
          f"max |difference| to torch {metadata['verified_max_abs_difference']:.1e}); run it with: "
          f"anomalens predict --detector {path} IMAGES --out DIR  (or anomalens-runtime predict {path} ...)")
    return 0


def cmd_serve(options: Any, quiet: bool) -> int:
    from anomalens.engines.access import check_exposure, is_loopback
    from anomalens.engines.serve import create_app, require_fastapi

    require_fastapi()
    import uvicorn

    serve = options.serve
    check_exposure(serve.host, options.access)  # before any model is built
    if options.models.models:
        return _serve_station(options, uvicorn)
    if serve.update_after is not None:
        raise ValueError("serve --update-after needs --models DIR (a station whose products can take new versions)")
    detector = detector_from(options.method, serve.detector)
    if options.references.reference or detector.is_fitted or detector.zero_shot:
        fit_detector(detector, options.references)  # else it waits for references posted to /v1/references
    app = create_app(detector, options.settings, class_name=options.references.class_name, access=options.access,
                     bound_host=serve.host)  # fmt: skip
    if not is_loopback(serve.host):
        logger.warning("serving on %s: reachable from other machines (API key required)", serve.host)
    key_note = " (API key required)" if options.access.key else ""
    print(f"anomalens serving {detector.method_name} on http://{serve.host}:{serve.port}/{key_note} (Ctrl+C to stop)")
    uvicorn.run(app, host=serve.host, port=serve.port, log_level="warning")
    return 0


def _serve_station(options: Any, uvicorn) -> int:
    """``serve --models DIR``: every product of the models directory, the history and the review page."""
    from anomalens.engines.access import is_loopback
    from anomalens.station.inspect import open_station
    from anomalens.station.server import create_station_app

    serve, method = options.serve, options.method
    if serve.detector or method.method or options.references.reference:
        raise ValueError("serve --models serves the models directory's products: leave out --detector, --method and "
                         "--reference (add detectors with anomalens models add)")  # fmt: skip
    station = open_station(options.models, options.station, options.pool, options.settings, method.device,
                           wait_s=None)  # a service waits for its database
    app = create_station_app(station, options.settings, access=options.access, bound_host=serve.host,
                             update_after=serve.update_after)  # fmt: skip
    if not is_loopback(serve.host):
        logger.warning("serving on %s: reachable from other machines (API key required)", serve.host)
    products = ", ".join(station.pool.store.products()) or "none yet"
    print(f"anomalens station serving {products} from {station.pool.store.root} on http://{serve.host}:{serve.port}/ "
          f"(history {station.history.where}; Ctrl+C to stop)")  # fmt: skip
    with _webhook_dispatch(station), _retention(station):
        uvicorn.run(app, host=serve.host, port=serve.port, log_level="warning")
    return 0


def _in_background(name: str, loop):
    """A context running ``loop(stop)`` in a daemon thread while the command works; on leaving, ``stop`` is set and
    the thread is given 30 s to finish."""
    import contextlib
    import threading

    @contextlib.contextmanager
    def running():
        stop = threading.Event()
        thread = threading.Thread(target=loop, args=(stop,), name=name, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=30)

    return running()


def _retention(station, every_s: float = 3600.0):
    """The image store's retention policy, applied at the start and every ``every_s`` (``watch`` applies it in its
    own loop)."""

    def loop(stop) -> None:
        while True:
            station.apply_retention()
            if stop.wait(every_s):
                return

    return _in_background("anomalens-retention", loop)


def _webhook_dispatch(station):
    """The webhook dispatcher, delivering the outbox while the station works (nothing without webhooks), with one
    last pass on leaving so that what was just recorded (``watch --once``) is sent before exiting."""
    import contextlib

    @contextlib.contextmanager
    def running():
        if not station.settings.webhook:
            yield
            return
        from anomalens.station.webhooks import Dispatcher, webhook_secret

        dispatcher = Dispatcher(station.history, webhook_secret(), station.owner)
        with _in_background("anomalens-webhooks", dispatcher.run):
            yield
        try:
            dispatcher.deliver_due()
        except Exception as error:  # noqa: BLE001 - undelivered events stay in the outbox for the next run
            logger.error("webhook dispatcher: %s", error)

    return running()


def cmd_watch(options: Any, quiet: bool) -> int:
    import signal
    import threading
    from pathlib import Path

    from anomalens.station.inspect import open_station
    from anomalens.station.settings import PoolOptions
    from anomalens.station.watch import Watcher

    watch = options.watch
    station = open_station(options.models, options.station, PoolOptions(watch.max_loaded), device=watch.device,
                           wait_s=None)  # a service waits for its database
    if station.settings.webhook:
        from anomalens.station.webhooks import webhook_secret

        webhook_secret()  # refused now, before any file is taken, if missing
    watcher = Watcher(station, Path(options.folder), watch)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"watching {watcher.folder} for {watch.product} (done: {watcher.done_dir}, failed: {watcher.failed_dir}; "
          f"history {station.history.where}; Ctrl+C to stop)", flush=True)  # fmt: skip
    try:
        with _webhook_dispatch(station):
            counts = watcher.run(stop)
    except KeyboardInterrupt:
        counts = watcher.counts
    finally:
        signal.signal(signal.SIGTERM, previous)
        station.pool.close()
    print(f"scored {counts.scored}, duplicates {counts.duplicates}, failed {counts.failed}, retried errors "
          f"{counts.errors}")  # fmt: skip
    return 0


def cmd_history(options: Any, quiet: bool) -> int:
    from anomalens.station.history import History
    from anomalens.station.reports import history_rows, write_history

    history = History(options.models.db_url())
    rows = history_rows(history, options.history)
    text = write_history(rows, options.history)
    if text is not None:
        print(text, end="")
    elif options.history.out:
        print(f"wrote {len(rows)} inspection(s) to {options.history.out}", file=sys.stderr)
    return 0


def cmd_models_add(options: Any, quiet: bool) -> int:
    from anomalens.station.models import ModelStore

    add = options.add
    version = ModelStore(options.models.models_dir()).add(options.name, add.detector, references=list(add.reference),
                                                          note=add.note, drift_delta=add.drift_delta)  # fmt: skip
    record = version.record
    print(f"added {version.label} (now active): {record['method']}, fingerprint {record['fingerprint']}")
    return 0


def cmd_models_update(options: Any, quiet: bool) -> int:
    from anomalens.station.history import History
    from anomalens.station.models import ModelStore
    from anomalens.station.store import ImageStore

    update, root = options.update, options.models.models_dir()
    store = ModelStore(root)
    if update.from_reviews:
        from anomalens.station.feedback import update_from_reviews

        history = History(options.models.db_url())
        version, record = update_from_reviews(store, history, ImageStore(update.store or root / "store"), options.name,
                                              include_passes=update.include_passes, max_memory=update.max_memory,
                                              keep_threshold=update.keep_threshold, seed=update.seed,
                                              device=update.device, note=update.note)  # fmt: skip
    else:
        version, record = _update_from_folders(store, options.name, update)
    report = record["update"]
    how = f"recalibrated on {report['calibration_images']} held-out images" if report["recalibrated"] else "kept"
    print(f"{version.label} is active: {report['images']} image(s) taken in, memory {report['memory_size_before']} -> "
          f"{report['memory_size_after']}, threshold {report['threshold_before']} -> {report['threshold_after']} "
          f"({how})")
    for note in report["notes"]:
        print(f"note: {note}")
    return 0


def _update_from_folders(store, product: str, update) -> tuple[Any, dict[str, Any]]:
    """``models update NAME --images DIR [--calibration DIR]``."""
    import anomalens
    from anomalens.io.outputs import sha256_file
    from anomalens.station.feedback import publish_update

    active = store.active(product)
    paths: list[str] = []
    images = reference_images([update.images], paths)
    calibration = reference_images([update.calibration]) if update.calibration else None
    detector = anomalens.load(active.path, map_location=update.device)
    bar = progress_bar(len(images), "encoding new images", False)
    try:
        report = detector.update(images, calibration, max_memory=update.max_memory,
                                 calibration_from=f"the folder {update.calibration}",
                                 progress=lambda done, total: bar.update(done - bar.n))  # fmt: skip
    finally:
        bar.close()
    added = [sha256_file(path) for path in paths]
    return publish_update(store, active, detector, report, added, {"images_folder": str(update.images)}, update.note)


def cmd_models_list(options: Any, quiet: bool) -> int:
    from anomalens.station.models import ModelStore

    store = ModelStore(options.models.models_dir())
    products = store.products()
    if not products:
        print(f"no products in {store.root} (add one: anomalens models add NAME --detector DIR)")
    for name in products:
        active = store.active(name)
        calibration = active.record.get("calibration") or {}
        print(f"{name:24s} active {active.number:<4d} of {len(store.versions(name)):<3d} {active.record['method']:16s} "
              f"threshold {calibration.get('threshold')} ({calibration.get('threshold_source')})")  # fmt: skip
    return 0


def cmd_models_show(options: Any, quiet: bool) -> int:
    import json

    from anomalens.station.models import ModelStore

    print(json.dumps(ModelStore(options.models.models_dir()).describe(options.name), indent=2))
    return 0


def cmd_models_rollback(options: Any, quiet: bool) -> int:
    from anomalens.station.models import ModelStore

    version = ModelStore(options.models.models_dir()).rollback(options.name, options.version)
    print(f"{version.label} is active")
    return 0


def cmd_models_remove(options: Any, quiet: bool) -> int:
    from anomalens.station.models import ModelStore

    ModelStore(options.models.models_dir()).remove(options.name, options.remove.version)
    what = f"version {options.remove.version} of {options.name}" if options.remove.version else options.name
    print(f"removed {what}")
    return 0


def cmd_benchmark(options: Any, quiet: bool) -> int:
    from anomalens.evaluation.benchmark import parse_shots, results_table, run_benchmark

    bench = options.benchmark
    eval_size = None if str(bench.eval_size).lower() == "none" else int(bench.eval_size)
    detector = create_detector(options.method)
    results = run_benchmark(
        detector, bench.dataset, bench.root, categories=bench.category, shots=parse_shots(bench.shots),
        seeds=list(bench.seeds), out_dir=bench.out, batch_size=options.method.batch_size, eval_size=eval_size,
        max_images=bench.max_images, command=command_line(), overwrite=bench.overwrite,
        references_from=bench.references_from, false_alarm_rates=bench.false_alarm_rates, calibration=bench.calibration,
        progress_factory=lambda total, desc: progress_bar(total, desc, quiet),
    )  # fmt: skip
    print(results_table(results))
    if bench.out:
        print(f"results written to {os.path.join(bench.out, 'results.json')} and results.md")
    return 0


def cmd_benchmark_speed(options: Any, quiet: bool) -> int:
    from pathlib import Path

    import torch

    from anomalens.evaluation.speed import (
        FULL_SIZE_SETTINGS,
        choose_inputs,
        choose_settings,
        default_output_name,
        markdown,
        run_speed,
        setting_label,
    )

    speed = options.speed
    if speed.list:
        for index, setting in enumerate(FULL_SIZE_SETTINGS):
            print(f"{index:2d}  {setting_label(setting)} {setting['shots']}-shot  {setting['options']}")
        return 0
    settings = choose_settings(speed)
    images, references = choose_inputs(speed, max(setting["shots"] for setting in settings))
    threads = speed.threads or torch.get_num_threads()
    out = Path(speed.out or default_output_name(threads))
    bar = progress_bar(len(settings), "settings", quiet, unit="setting")

    def on_record(record: dict) -> None:
        bar.update(1)
        if "error" in record:
            logger.warning("%s %d-shot failed: %s", setting_label(record), record["shots"], record["error"])

    try:
        result = run_speed(settings, images, references, out=out, batch_sizes=speed.batch_sizes, repeats=speed.repeats,
                           threads=threads, device=speed.device, dtype=speed.dtype, timeout=speed.timeout,
                           open_clip_configs=speed.open_clip_config, on_record=on_record)  # fmt: skip
    finally:
        bar.close()
    print(markdown(result))
    print(f"results written to {out} and {out.with_suffix('.md')}")
    return 0


def cmd_weights_list(options: Any, quiet: bool) -> int:
    from importlib.util import find_spec

    import anomalens
    from anomalens.backbones.sources import SOURCES
    from anomalens.backbones.weights import resolve
    from anomalens.config import build_config

    method = options.method
    names = [options.method_name or method.method] if (options.method_name or method.method) else None
    for name in names or anomalens.list_methods():
        cls = anomalens.get_method(name)
        config = build_config(cls.config_class, method_config(method, name) if names else {}, method=name)
        references = cls.required_weights(config)
        if not references:
            print(f"{name:16s} (no pretrained weights with these options)")
        for reference in references:
            try:
                where = str(resolve(reference, weights_dir=method.weights_dir, allow_download=False))
            except FileNotFoundError:
                where = f"NOT FOUND (anomalens weights download {name}, or --weights-dir)"
            print(f"{name:16s} {reference:52s} {where}")
    print("\ndefault sources (anomalens.backbones.sources; `anomalens weights check` asks whether each still exists):")
    for component, source in SOURCES.items():
        try:
            if source.kind == "package":
                where = "installed" if find_spec(component.removeprefix("package:").replace("-", "_")) else "not found"
            else:
                where = str(resolve(component, weights_dir=method.weights_dir, allow_download=False))
        except (FileNotFoundError, ImportError):
            where = "not found on this machine"
        print(f"  {component:46s} {source.size_mb:8.1f} MB  {where}")
        print(f"  {'':46s} from {source.location}, {source.publisher}; {source.licence}")
    return 0


def cmd_weights_check(options: Any, quiet: bool) -> int:
    from anomalens.backbones.availability import STATUSES, check_sources
    from anomalens.backbones.sources import SOURCES

    wanted = options.check.component
    unknown = [name for name in wanted if name not in SOURCES]
    if unknown:
        raise ValueError(f"unknown component(s) {', '.join(unknown)} for --component; valid: {', '.join(SOURCES)}")
    rows = check_sources([SOURCES[name] for name in wanted] if wanted else None, timeout=options.check.timeout)
    for row in rows:
        line = f"{row.status:8s} {row.source.component:46s} {row.source.location}"
        if row.detail:
            line += f"  ({row.detail})"
        if row.status == "MISSING" and row.source.alternatives:
            line += f"; alternatives: {', '.join(row.source.alternatives)}"
        print(line)
    counts = {status: sum(row.status == status for row in rows) for status in STATUSES}
    print(f"{len(rows)} source(s) checked: " + ", ".join(f"{counts[status]} {status}" for status in STATUSES))
    return 1 if counts["MISSING"] else 3 if counts["ERROR"] else 0


def cmd_weights_download(options: Any, quiet: bool) -> int:
    import anomalens
    from anomalens.backbones.weights import resolve
    from anomalens.config import build_config

    method = options.method
    name = options.method_name or method.method
    if not name:
        raise ValueError(f"give the method: anomalens weights download METHOD ({', '.join(anomalens.list_methods())})")
    cls = anomalens.get_method(name)
    references = cls.required_weights(build_config(cls.config_class, method_config(method, name), method=name))
    if not references:
        print(f"{name} with this configuration needs no pretrained weights")
    for reference in references:
        print(f"{reference}: {resolve(reference, weights_dir=method.weights_dir, method_hint=name)}")
    return 0


def cmd_train_patchclip(options: Any, quiet: bool) -> int:
    from anomalens.distributed import is_main_process
    from anomalens.methods.clipfusion.training import train_patchclip

    main = is_main_process()  # under torchrun, process 0 alone reports
    bar, advance = loss_bar(None, "training patchclip", quiet or not main, "img")
    try:
        path = train_patchclip(options.train, progress=advance)
    finally:
        bar.close()
    if main:
        print(f"saved PatchCLIP projections to {path}; use them with --set clip_projection=trained "
              f"--set clip_projection_weights={path}")  # fmt: skip
    return 0


def cmd_train_vlmdiff(options: Any, quiet: bool) -> int:
    from tqdm.auto import tqdm

    from anomalens.distributed import is_main_process
    from anomalens.methods.vlmdiff.training import train_vlmdiff

    config = options.train
    main = is_main_process()  # under torchrun, process 0 alone reports
    quiet = quiet or not main
    bar, advance = loss_bar(config.steps, "training vlmdiff", quiet, "step")

    def caption_bar(iterable):
        return tqdm(iterable, desc="captioning", unit="img", disable=quiet or None, dynamic_ncols=True)

    try:
        out = train_vlmdiff(config, options.run.out, overwrite=options.run.overwrite, progress=advance,
                            caption_progress=caption_bar)  # fmt: skip
    finally:
        bar.close()
    if main:
        print(f"trained VLMDiff in {out}; score with: "
              f"anomalens predict --method vlmdiff --set checkpoint={out} IMAGES --out DIR")  # fmt: skip
    return 0


def cmd_list(options: Any, quiet: bool) -> int:
    import anomalens
    from anomalens.backbones import list_backbones
    from anomalens.io.datasets import list_datasets

    print("methods:   " + ", ".join(anomalens.list_methods()))
    print("backbones: " + ", ".join(list_backbones()))
    print("datasets:  " + ", ".join(list_datasets()))
    return 0
