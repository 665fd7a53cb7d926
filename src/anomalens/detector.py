"""The detector API every method implements.

A :class:`Detector` is a plain ``torch.nn.Module``: fitted state (memory banks, adapters) lives in
buffers and parameters, so ``state_dict`` captures a fitted detector and :meth:`Detector.save` writes
it as safetensors beside a JSON config. Methods implement two hooks:

- ``_fit(reference_images, class_name)``: build state from ``(H, W, 3)`` uint8 references (may be empty
  for zero-shot methods);
- ``_predict_batch(images)``: score a batch, returning image scores ``(B,)`` and anomaly maps at any
  common resolution ``(B, h, w)``; the base class resizes each map back to its image's own size.

Everything else (input loading and validation, batching, result type, persistence) is shared here.

Rules for a method author, all stated here:

- ``config_class`` is a dataclass subclassing :class:`~anomalens.config.DetectorConfig` (batch size, seed,
  precision, smoothing, device) with one comment per field; validation goes in its ``__post_init__``.
- Fitted state lives in buffers and parameters (``state_dict`` saves it). A buffer whose shape follows the data
  belongs to a :class:`~anomalens.nn.state.ResizableBuffers` module; cached prompt embeddings go in an
  :class:`~anomalens.nn.state.EmbeddingCache`; parked weights need :class:`~anomalens.nn.offload.OffloadMixin`.
- ``self.timed(stage)`` adds a block's time to ``stage_seconds``; ``stage`` is one of :data:`STAGES`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from anomalens.config import PRECISIONS, DetectorConfig, build_config, config_hash, config_to_dict
from anomalens.io.images import ImageLike, describe, load_image
from anomalens.io.outputs import honour_umask, read_format_file
from anomalens.nn.maps import resize_map
from anomalens.nn.state import clear_embedding_caches
from anomalens.results import AnomalyResult, pool_order
from anomalens.thresholds import ThresholdPlan, check_pixel_threshold, describe_plan, plan_thresholds, threshold_from
from anomalens.tiling import MapStitcher, tile_boxes

logger = logging.getLogger(__name__)

FORMAT_NAME = "anomalens-detector"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
TENSORS_FILE = "model.safetensors"
STAGES = (  # stage names of Detector.timed(); the speed tables group them into columns
    "image_encoder",  # a CNN / ViT image feature pass (PatchCore, Dual-Image CLIP)
    "clip",  # CLIP image passes (WinCLIP, CLIPFusion)
    "features",  # a feature extractor comparing images (VLMDiff)
    "vae",  # a latent autoencoder
    "unet",  # a diffusion UNet (and its guidance network)
    "text_encoder",  # prompt / caption encoding
    "captioner",  # a VLM captioning test images (VLMDiff with a test captioner)
    "memory_search",  # nearest-neighbour search in a memory bank
    "tta",  # test-time adaptation
    "post_processing",  # map fusion, resizing, smoothing
)
__all__ = ["PRECISIONS", "STAGES", "AnomalyResult", "Detector"]


class Detector(nn.Module):
    """Base class of all anomaly detectors.

    Subclasses set ``method_name`` and ``config_class`` and implement ``_fit`` and ``_predict_batch``.

    Args:
        config: The method's config dataclass instance.
        weights_dir: Folder searched first for pretrained weights (see :mod:`anomalens.backbones.weights`).
        load_pretrained: ``False`` builds the architecture only (used by :meth:`load`, which restores
            every tensor from the saved file).
    """

    method_name: ClassVar[str] = ""
    config_class: ClassVar[type[DetectorConfig]] = DetectorConfig
    zero_shot: ClassVar[bool] = False  # whether fit() may be called without references
    few_shot: ClassVar[bool] = True  # whether fit() accepts reference images
    pooled: ClassVar[bool] = False  # whether images of one predict call are scored jointly (as each other's references)

    def __init__(
        self, config: DetectorConfig, *, weights_dir: str | os.PathLike | None = None, load_pretrained: bool = True
    ):
        super().__init__()
        if not isinstance(config, DetectorConfig):
            raise ValueError(
                f"{type(self).__name__} config must be a DetectorConfig dataclass (anomalens.config), "
                f"got {type(config).__name__}"
            )
        self.config = config
        self.weights_dir = weights_dir
        self.load_pretrained = load_pretrained
        self.class_name: str | None = None
        self.threshold: float | None = None
        self.threshold_source = "none"  # how ``threshold`` was chosen: given, leave-one-out, conformal, none (fit())
        self.pixel_threshold: float | None = None  # map value above which a pixel is marked defective
        self.held_out_scores: list[float] = []  # scores of held-out references behind the thresholds (fit())
        self.threshold_calibration: dict[str, Any] = {}  # how the thresholds were chosen (rule, guarantee, sizes)
        self.map_scale: tuple[float, float] | None = None  # (low, high) colour scale of overlays, from references
        self.stage_seconds: dict[str, float] = {}  # time spent per named stage, summed since last cleared
        self.register_buffer("_is_fitted", torch.tensor(False))

    def autocast(self) -> torch.autocast:
        """The config's ``precision`` as a ``torch.autocast`` context (disabled for ``"float32"``).

        Networks run their matmuls and convolutions in bfloat16/float16 under it; weights, memory banks and
        nearest-neighbour distances stay float32, and maps and scores are returned as float32.
        """
        dtype = getattr(torch, self.config.precision)
        weights = self.weights_dtype
        if weights in (torch.bfloat16, torch.float16):  # moved with .to(dtype): compute in the weights' dtype
            dtype = weights
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32)

    @property
    def weights_dtype(self) -> torch.dtype:
        """The dtype of the detector's floating-point weights (``float32`` unless moved with ``.to(dtype)``)."""
        for tensor in self.parameters():
            if tensor.is_floating_point():
                return tensor.dtype
        return torch.float32

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Add the time spent inside the block to ``stage_seconds[stage]``; ``stage`` is one of :data:`STAGES`."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; valid stages: {', '.join(STAGES)}")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + time.perf_counter() - start

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, then every :class:`~anomalens.nn.state.EmbeddingCache` (prompt embeddings
        derived from the old weights) is cleared. Runs in inference mode, because fitted state (memory banks) is made
        in inference mode and can only be overwritten there."""
        clear_embedding_caches(self)
        with torch.inference_mode():
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ------------------------------------------------------------------ public API
    @property
    def is_fitted(self) -> bool:
        """Whether :meth:`fit` has been called (restored by :meth:`load`)."""
        return bool(self._is_fitted)

    @property
    def device(self) -> torch.device:
        """The device the detector's tensors live on."""
        return self._is_fitted.device

    @property
    def config_hash(self) -> str:
        """Short hash of the method and config, recorded with every score."""
        return config_hash(self.method_name, self.config)

    def fit(
        self,
        reference_images: Sequence[ImageLike] | None = None,
        class_name: str | None = None,
        threshold: float | str | None = "auto",
        progress: Callable[[int, int], None] | None = None,
        *,
        false_alarm_rate: float | None = None,
        calibration: str = "auto",
        calibration_size: int | None = None,
        pixel_threshold: float | str | None = "auto",
    ) -> Detector:
        """Prepare the detector for a product class, and set its image and pixel thresholds.

        Each reference passes through the backbone once (as its tiles, with ``tiling``); held-out folds reuse those
        features, so leave-one-out costs one more pass per reference (for the held-out score), not a refit from
        images per fold. The rules and their guarantees are described in :mod:`anomalens.thresholds`.

        Args:
            reference_images: Normal images (paths, PIL images or arrays). Zero-shot methods accept none;
                few-shot methods need at least one.
            class_name: The product's name (e.g. ``"bottle"``), used by language-guided methods.
            threshold: ``"auto"`` (default): conformal if ``false_alarm_rate`` is given, else leave-one-out with
                two or more references, else no threshold. ``"leave-one-out"``: the largest score of each
                reference against the others (needs two or more). A finite number: that threshold. ``None``: none.
            progress: Called as ``progress(done, total)`` after each reference encoded and each held-out score;
                an exception it raises (e.g. to cancel) stops the fit.
            false_alarm_rate: ``α`` in (0, 1): the threshold is the conformal quantile of held-out reference scores,
                so that a normal image is flagged with probability at most ``α`` (see :mod:`anomalens.thresholds`).
            calibration: How references are held out: ``"leave-one-out"``, ``"k-fold"`` (five seeded folds, the
                detector then fitted on all), ``"split"`` (the detector stays fitted on the others only; with
                ``false_alarm_rate``) or ``"auto"`` (leave-one-out up to 16 references; above, split with
                ``false_alarm_rate`` and k-fold for the leave-one-out rule).
            calibration_size: References held out by ``"split"`` (default ``max(ceil(1/α) - 1, min(n // 2, 100))``).
            pixel_threshold: ``"auto"``: the image rule applied to held-out maps' maxima (none without held-out
                references); a number; or ``None``.

        Returns:
            ``self``, fitted. ``threshold``, ``threshold_source``, ``pixel_threshold``, ``held_out_scores``,
            ``threshold_calibration`` and ``map_scale`` describe the thresholds (all saved with the detector).

        Raises:
            ValueError: References given to a zero-shot-only method, none given to a method that needs
                them, a reference that is not a readable image, an invalid threshold option, or too few
                references for the rule or ``false_alarm_rate`` asked (the message says how many are needed).
        """
        references = list(reference_images or [])
        if references and not self.few_shot:
            raise ValueError(f"method {self.method_name!r} is zero-shot and takes no reference images")
        if not references and not self.zero_shot:
            raise ValueError(
                f"method {self.method_name!r} needs at least one normal reference image; got none "
                "(pass reference_images=[...] or --reference DIR)"
            )
        if class_name is not None and not isinstance(class_name, str):
            raise ValueError(f"class_name must be a string, got {class_name!r}")
        plan = plan_thresholds(threshold, len(references), false_alarm_rate=false_alarm_rate, calibration=calibration,
                               calibration_size=calibration_size, seed=self.config.seed)  # fmt: skip
        check_pixel_threshold(pixel_threshold)
        arrays = [load_image(image) for image in references]
        self.class_name = class_name
        held_out = self._fit_with_plan(arrays, class_name, plan, progress or (lambda done, total: None))
        self._set_thresholds(plan, held_out, len(arrays), pixel_threshold)
        return self

    def _fit_with_plan(self, arrays: list[np.ndarray], class_name: str | None, plan: ThresholdPlan,
                       report: Callable[[int, int], None]) -> list[AnomalyResult]:  # fmt: skip
        """Fit on ``arrays`` as ``plan`` says; return the held-out references' results (maps included), in the
        order of ``plan.calibration_indices`` (none without calibration)."""
        held = plan.calibration_indices if plan.calibration else []
        total = len(arrays) + len(held)
        encoded = self._encode_tiled(arrays, report, total)
        held_out: list[AnomalyResult] = []
        if plan.folds:  # leave-one-out or k-fold: each fold scored by the detector fitted on the others
            by_index: dict[int, AnomalyResult] = {}
            for fold in plan.folds:
                chosen = set(fold)
                self._fit_on([group for index, group in enumerate(encoded) if index not in chosen], class_name)
                for start in range(0, len(fold), self.config.batch_size):
                    chunk = fold[start : start + self.config.batch_size]
                    by_index.update(zip(chunk, self.predict_arrays([arrays[index] for index in chunk])))
                    report(len(arrays) + len(by_index), total)
            held_out = [by_index[index] for index in plan.calibration_indices]
        keep = plan.fit_indices(len(arrays))
        self._fit_on([encoded[index] for index in keep], class_name, empty=not arrays)
        if plan.calibration == "split":
            for start in range(0, len(held), self.config.batch_size):
                chunk = held[start : start + self.config.batch_size]
                held_out.extend(self.predict_arrays([arrays[index] for index in chunk]))
                report(len(arrays) + len(held_out), total)
        return held_out

    def _encode_tiled(self, arrays: list[np.ndarray], report: Callable[[int, int], None], total: int) -> list[list]:
        """:meth:`_encode_references` over every reference's tiles (the whole image without tiling), in batches;
        one list of encoded tiles per reference."""
        owners, tiles = [], []
        for owner, array in enumerate(arrays):
            for tile in self._tiles_of(array):
                owners.append(owner)
                tiles.append(tile)
        grouped: list[list] = [[] for _ in arrays]
        with torch.inference_mode(), self.autocast():
            for start in range(0, len(tiles), self.config.batch_size):  # progress (and cancelling) per batch
                chunk = range(start, min(start + self.config.batch_size, len(tiles)))
                for index, item in zip(chunk, self._encode_references([tiles[index] for index in chunk])):
                    grouped[owners[index]].append(item)
                report(sum(owner < owners[chunk[-1]] for owner in range(len(arrays))) + (
                    chunk[-1] + 1 == len(tiles) or owners[chunk[-1] + 1] != owners[chunk[-1]]), total)
        return grouped

    def _fit_on(self, encoded: list[list], class_name: str | None, empty: bool = False) -> None:
        """Fit on the encoded tiles of some references (``empty``: the zero-shot fit, on nothing)."""
        with torch.inference_mode(), self.autocast():
            items = [item for group in encoded for item in group]
            self._fit_encoded(self._encode_references([]) if empty else items, class_name)
        self._is_fitted.fill_(True)

    def _set_thresholds(self, plan: ThresholdPlan, held_out: list[AnomalyResult], references: int,
                        pixel_threshold: float | str | None) -> None:  # fmt: skip
        """The image and pixel thresholds, the overlays' colour scale and the record of how they were chosen."""
        self.held_out_scores = [float(result.score) for result in held_out]
        maxima = [float(result.anomaly_map.max()) for result in held_out]
        self.threshold = plan.given if plan.rule == "given" else threshold_from(plan, self.held_out_scores)
        self.threshold_source = plan.rule if self.threshold is not None else "none"
        if isinstance(pixel_threshold, (int, float)) and not isinstance(pixel_threshold, bool):
            self.pixel_threshold = float(pixel_threshold)
        elif pixel_threshold == "auto" and held_out:
            self.pixel_threshold = threshold_from(plan, maxima)
        else:
            self.pixel_threshold = None
        self.threshold_calibration = describe_plan(plan, references) if plan.rule != "none" else {}
        self.map_scale = map_scale(self.pixel_threshold, [result.anomaly_map for result in held_out])

    def predict(self, images: Sequence[ImageLike] | ImageLike, batch_size: int | None = None) -> list[AnomalyResult]:
        """Score images.

        Args:
            images: One image or a sequence (paths, PIL images or ``(H, W[, C])`` arrays); sizes may differ.
            batch_size: Images per forward pass; defaults to the config's ``batch_size``.

        Returns:
            One :class:`AnomalyResult` per image, in order; each ``anomaly_map`` has that image's ``(H, W)``.

        Raises:
            RuntimeError: The detector is not fitted.
            ImageLoadError: An input is not a readable image (the message names it).
        """
        if not self.is_fitted:
            raise RuntimeError(f"{self.method_name} detector is not fitted: call fit() first (or load a saved one)")
        if isinstance(images, (str, os.PathLike, np.ndarray)) or not isinstance(images, Sequence):
            images = [images]
        size = batch_size or self.config.batch_size
        if size < 1:
            raise ValueError(f"batch_size must be >= 1, got {size}")
        # A pooled method scores each chunk as one pool: chunks of a seeded shuffle mix the whole input.
        order = pool_order(len(images), self.config.seed) if self.pooled else list(range(len(images)))
        results: list[AnomalyResult | None] = [None] * len(images)
        for start in range(0, len(images), size):
            chunk = order[start : start + size]
            arrays = [load_image(images[index]) for index in chunk]
            scored = self.predict_arrays(arrays, [describe(images[index]) for index in chunk])
            for index, result in zip(chunk, scored):
                results[index] = result
        return results  # type: ignore[return-value]

    def predict_arrays(self, arrays: Sequence[np.ndarray], sources: Sequence[str] | None = None) -> list[AnomalyResult]:
        """Score already-loaded ``(H, W, 3)`` uint8 arrays as one batch (the batch commands' entry point); with
        ``tiling``, as the tiles of every image (see :mod:`anomalens.tiling`)."""
        if not self.is_fitted:
            raise RuntimeError(f"{self.method_name} detector is not fitted: call fit() first (or load a saved one)")
        if not arrays:
            return []
        if self.config.tiling is not None:
            return self._predict_tiled(list(arrays), sources)
        with torch.inference_mode():
            with self.autocast():
                scores, maps = self._predict_batch(list(arrays))
            scores = scores.detach().float().cpu()
            maps = maps.detach().float()
            results = []
            for index, array in enumerate(arrays):
                full = self._map_to_image(maps[index], array.shape[:2]).cpu().numpy().astype(np.float32, copy=False)
                results.append(self._result(float(scores[index]), full, sources[index] if sources else ""))
        return results

    def _result(self, score: float, anomaly_map: np.ndarray, source: str) -> AnomalyResult:
        label = None if self.threshold is None else bool(score > self.threshold)
        return AnomalyResult(score=score, anomaly_map=anomaly_map, label=label, threshold=self.threshold,
                             source=source, pixel_threshold=self.pixel_threshold)  # fmt: skip

    def _tiles_of(self, array: np.ndarray) -> list[np.ndarray]:
        """The tiles of one ``(H, W, 3)`` image (the image itself without ``tiling``)."""
        if self.config.tiling is None:
            return [array]
        return [np.ascontiguousarray(array[top:bottom, left:right])
                for top, left, bottom, right in tile_boxes(*array.shape[:2], self.config.tiling)]  # fmt: skip

    def _predict_tiled(self, arrays: list[np.ndarray], sources: Sequence[str] | None) -> list[AnomalyResult]:
        """Score every tile of every image (in batches; a pooled method pools all tiles of the call), stitch."""
        tiling = self.config.tiling
        boxes = [tile_boxes(*array.shape[:2], tiling) for array in arrays]
        stitchers = [MapStitcher(*array.shape[:2], image_boxes) for array, image_boxes in zip(arrays, boxes)]
        tile_scores: list[list[float]] = [[] for _ in arrays]
        work = [(owner, box) for owner, image_boxes in enumerate(boxes) for box in image_boxes]
        size = len(work) if self.pooled else self.config.batch_size
        with torch.inference_mode():
            for start in range(0, len(work), size):
                chunk = work[start : start + size]
                crops = [np.ascontiguousarray(arrays[owner][top:bottom, left:right])
                         for owner, (top, left, bottom, right) in chunk]  # fmt: skip
                with self.autocast():
                    scores, maps = self._predict_batch(crops)
                scores, maps = scores.detach().float().cpu(), maps.detach().float()
                for index, (owner, box) in enumerate(chunk):
                    size_yx = (box[2] - box[0], box[3] - box[1])
                    stitchers[owner].add(box, self._map_to_image(maps[index], size_yx).cpu().numpy())
                    tile_scores[owner].append(float(scores[index]))
        results = []
        for owner, stitcher in enumerate(stitchers):
            anomaly_map = stitcher.result()
            score = float(anomaly_map.max()) if tiling.score == "map_max" else max(tile_scores[owner])
            results.append(self._result(score, anomaly_map, sources[owner] if sources else ""))
        return results

    def fingerprint(self) -> str:
        """16 hex digits that change when anything deciding a score changes, the threshold aside: the method, its
        config, the class name and every persistent buffer (the fitted state, e.g. memory banks built from the
        references). Weights are named by the config; a resumed run compares fingerprints."""
        import hashlib

        digest = hashlib.sha256(f"{self.config_hash}|{self.class_name}".encode())
        parameters = {name for name, _ in self.named_parameters()}
        for name, tensor in self.state_dict().items():
            if name in parameters:
                continue
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"|{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        return digest.hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """JSON-ready description: method, config, class name, threshold, fitted state."""
        return {
            "method": self.method_name,
            "config": config_to_dict(self.config),
            "config_hash": self.config_hash,
            "class_name": self.class_name,
            "threshold": self.threshold,
            "threshold_source": self.threshold_source if self.threshold is not None else "none",
            "threshold_calibration": self.threshold_calibration,
            "held_out_scores": self.held_out_scores,
            "pixel_threshold": self.pixel_threshold,
            "map_scale": list(self.map_scale) if self.map_scale else None,
            "fitted": self.is_fitted,
        }

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write the detector to folder ``path`` (``config.json`` + ``model.safetensors``), atomically.

        The file holds every tensor of the module (backbone and fitted state), so :meth:`load`
        needs no network and no other weights.
        """
        from safetensors.torch import save_file

        target = Path(path)
        if target.exists() and not (target / CONFIG_FILE).exists():
            if not target.is_dir() or any(target.iterdir()):
                raise ValueError(f"cannot save detector to {target}: it exists and is not a saved detector")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        honour_umask(staging, directory=True)
        try:
            meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **self.describe()}
            meta["anomalens_version"] = _package_version()
            meta["fingerprint"] = self.fingerprint()
            (staging / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in self.state_dict().items()}
            save_file(_unshare(tensors), str(staging / TENSORS_FILE), metadata={"format": FORMAT_NAME})
            honour_umask(staging / TENSORS_FILE)  # safetensors writes 0600 whatever the umask
            if target.exists():
                backup = target.with_name(f".{target.name}.old")
                shutil.rmtree(backup, ignore_errors=True)
                os.replace(target, backup)
                os.replace(staging, target)
                shutil.rmtree(backup, ignore_errors=True)
            else:
                os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        logger.info("saved %s detector to %s", self.method_name, target)
        return target

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Detector:
        """Load a detector written by :meth:`save`, checking every tensor's name and shape (``anomalens.load``).

        ``Detector.load`` loads any method; a subclass (``PatchCore.load``) refuses a folder of another method.
        """
        from safetensors.torch import load_file

        from anomalens.backbones.weights import load_state_dict_checked
        from anomalens.registry import get_method

        meta = config_from_saved(path)
        method = get_method(meta["method"])
        if cls is not Detector and not issubclass(method, cls):
            raise ValueError(f"{path} holds a {meta['method']!r} detector, not {cls.method_name!r}")
        options = {key: value for key, value in meta["config"].items() if key != "device"}
        for key, value in method.config_class.saved_before_the_field.items():
            options.setdefault(key, value)
        detector = method(build_config(method.config_class, options, method=meta["method"]), load_pretrained=False)
        state = load_file(str(Path(path) / TENSORS_FILE), device="cpu")
        load_state_dict_checked(detector, state, source=str(path))
        detector.class_name = meta.get("class_name")
        detector.threshold = meta.get("threshold")
        detector.threshold_source = meta.get("threshold_source") or (
            "given" if detector.threshold is not None else "none"
        )
        detector.pixel_threshold = meta.get("pixel_threshold")
        detector.held_out_scores = list(meta.get("held_out_scores") or [])
        detector.threshold_calibration = dict(meta.get("threshold_calibration") or {})
        detector.map_scale = tuple(meta["map_scale"]) if meta.get("map_scale") else None
        detector.config.device = str(torch.device(map_location))
        return detector.to(map_location)

    def export(self, out_dir: str | os.PathLike, format: str = "onnx", **options: Any) -> Path:
        """Export the fitted detector to ONNX (or OpenVINO) for the torch-free runtime; see
        :func:`anomalens.export.export_detector` (which methods export, and the options)."""
        from anomalens.export import export_detector

        return export_detector(self, out_dir, format=format, **options)

    # ------------------------------------------------------------------ hooks for methods
    @classmethod
    def required_weights(cls, config: Any) -> list[str]:
        """Weight references this config loads (see :func:`~anomalens.backbones.weights.resolve`), for downloads."""
        return []

    def _fit(self, reference_images: list[np.ndarray], class_name: str | None) -> None:
        raise NotImplementedError

    def _encode_references(self, reference_images: list[np.ndarray]) -> list[Any]:
        """One item per reference holding what fitting needs from it (its backbone features), so that the
        leave-one-out folds refit without running the backbone again. Default: the images themselves."""
        return list(reference_images)

    def _fit_encoded(self, encoded: list[Any], class_name: str | None) -> None:
        """Build fitted state from items of :meth:`_encode_references`. Default: :meth:`_fit` on the images."""
        self._fit(encoded, class_name)

    def _predict_batch(self, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Score a batch. Returns scores ``(B,)`` and maps ``(B, h, w)`` at one common resolution."""
        raise NotImplementedError

    def _map_to_image(self, anomaly_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Bring one ``(h, w)`` map from the model's input geometry to its image's ``(H, W)``."""
        return resize_map(anomaly_map, size)


THRESHOLD_RULES = ("auto", "leave-one-out")


def map_scale(pixel_threshold: float | None, held_out_maps: Sequence[np.ndarray]) -> tuple[float, float] | None:
    """The overlays' colour scale ``(low, high)``: ``low`` is the typical value of normal maps (the mean of the
    held-out references' map medians; 0 without them) and the pixel threshold sits in the middle of the palette,
    ``high = 2 * pixel_threshold - low``. ``None`` without a pixel threshold above ``low``."""
    if pixel_threshold is None:
        return None
    low = float(np.mean([np.median(item) for item in held_out_maps])) if len(held_out_maps) else 0.0
    if pixel_threshold <= low:
        return None
    return low, 2.0 * pixel_threshold - low


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Clone tensors that share storage, which safetensors refuses to write."""
    seen: dict[int, str] = {}
    result = {}
    for name, tensor in tensors.items():
        pointer = tensor.untyped_storage().data_ptr() if tensor.numel() else -id(tensor)
        result[name] = tensor.clone() if pointer in seen else tensor
        seen.setdefault(pointer, name)
    return result


def _package_version() -> str:
    from anomalens import __version__

    return __version__


def config_from_saved(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check the ``config.json`` of a saved detector folder."""
    folder = Path(path)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file() or not (folder / TENSORS_FILE).is_file():
        raise ValueError(f"{folder} is not a saved anomalens detector (expected {CONFIG_FILE} and {TENSORS_FILE})")
    return read_format_file(config_path, FORMAT_NAME, FORMAT_VERSION)
