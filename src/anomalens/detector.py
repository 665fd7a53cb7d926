"""The detector API every method implements.

A :class:`Detector` is a plain ``torch.nn.Module``: fitted state (memory banks, adapters) lives in buffers and
parameters, so ``state_dict`` captures a fitted detector. This module does the detecting that every method shares
(loading inputs, batching, precision, maps back to each image's size, results); the rest lives beside its rules:
thresholds and the fold loop in :mod:`anomalens.thresholds` (a detector carries one
:class:`~anomalens.thresholds.Calibration`), tiles in :mod:`anomalens.tiling`, saving and loading in
:mod:`anomalens.persistence`, export in :mod:`anomalens.export`.

The hooks a method implements (``docs/architecture.md`` walks through adding one):

- ``config_class``: a dataclass subclassing :class:`~anomalens.config.DetectorConfig` (batch size, seed, precision,
  smoothing, device, tiling) with one comment per field; validation in its ``__post_init__``; ``weight_fields``
  (the fields naming pretrained weights, ``None`` = random) and ``saved_before_the_field`` (values older saved
  configs lacked).
- ``_encode_references(images) -> list``: one item per ``(H, W, 3)`` uint8 reference holding what fitting needs
  from it (its backbone features), so that held-out folds refit without running the backbone again; the default
  keeps the images.
- ``_fit_encoded(items, class_name)``: build fitted state from those items (default: ``_fit(images, class_name)``,
  the simpler hook for a method whose fit needs the images themselves).
- ``_predict_batch(images) -> (scores (B,), maps (B, h, w))``: score a batch; maps at any common resolution.
- ``_map_to_image(map (h, w), (H, W)) -> (H, W)``: bring a map back to its image (default: bilinear resize;
  override when the method crops or pads).
- ``required_weights(config) -> list[str]`` (classmethod): the weight references a config loads, for
  ``anomalens weights download``.
- ``export_spec() -> ExportSpec``: the graph to export (:mod:`anomalens.export`); a method that cannot be exported
  sets ``cannot_export`` to the reason instead.
- Class flags: ``zero_shot`` (fit may get no references), ``few_shot`` (fit takes references), ``pooled`` (the
  images of one call are scored jointly, as each other's references).
- Advanced: ``predict_arrays`` and ``_fit_and_hold_out`` may be overridden by a method made of other detectors
  (the ensemble).

Rules for a method author: a buffer whose shape follows the data belongs to a
:class:`~anomalens.nn.state.ResizableBuffers` module; cached prompt embeddings go in an
:class:`~anomalens.nn.state.EmbeddingCache`; parked weights need :class:`~anomalens.nn.offload.OffloadMixin`;
``self.timed(stage)`` adds a block's time to ``stage_seconds`` (``stage`` one of :data:`STAGES`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from anomalens.config import PRECISIONS, DetectorConfig, config_hash, config_to_dict
from anomalens.io.images import ImageLike, image_source, load_image
from anomalens.nn.maps import resize_map
from anomalens.nn.state import clear_embedding_caches
from anomalens.persistence import fingerprint, load_detector, save_detector
from anomalens.results import AnomalyResult, pool_order
from anomalens.thresholds import Calibrated, Calibration, ThresholdOptions, ThresholdPlan, fit_holding_out
from anomalens.tiling import AUTO, TileConfig, choose_tiling, score_tiled, tiles_of

if TYPE_CHECKING:
    from anomalens.nn.memory import MemoryUpdate, NearestNeighbourMemory
    from anomalens.updates import UpdateReport

logger = logging.getLogger(__name__)

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


class Detector(Calibrated, nn.Module):
    """Base class of all anomaly detectors (the hooks a method implements: the module docstring).

    Args:
        config: The method's config dataclass instance.
        weights_dir: Folder searched first for pretrained weights (see :mod:`anomalens.backbones.weights`).
        load_pretrained: ``False`` builds the architecture only (used when loading a saved detector, whose file
            restores every tensor).

    Example:
        >>> import anomalens
        >>> detector = anomalens.create("patchcore", backbone="taef2", pretrained=None, image_size=32)
        >>> detector.fit([np.full((32, 32, 3), 128, np.uint8)] * 3).threshold_source
        'leave-one-out'
    """

    method_name: ClassVar[str] = ""
    config_class: ClassVar[type[DetectorConfig]] = DetectorConfig
    zero_shot: ClassVar[bool] = False  # whether fit() may be called without references
    few_shot: ClassVar[bool] = True  # whether fit() accepts reference images
    pooled: ClassVar[bool] = False  # whether images of one predict call are scored jointly (as each other's references)
    cannot_export: ClassVar[str | None] = "the method implements no export_spec()"  # why not, or None: it exports
    cannot_update: ClassVar[str | None] = "its fitted state is not a memory of reference features"  # None: update()

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
        self.calibration = Calibration()  # thresholds, their source and record, the overlays' colour scale (fit())
        self.tiling_choice: str | None = None  # why tiling="auto" chose what it did (fit())
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
        options: ThresholdOptions | None = None,
    ) -> Detector:
        """Prepare the detector for a product class, and set its image and pixel thresholds.

        Each reference passes through the backbone once (as its tiles, with ``tiling``); held-out folds reuse those
        features, so leave-one-out costs one more pass per reference (for the held-out score), not a refit from
        images per fold; memory methods fit once and leave each fold's entries out
        (:func:`~anomalens.thresholds.fit_holding_out`). The rules and their guarantees: :mod:`anomalens.thresholds`.

        Args:
            reference_images: Normal images (paths, PIL images or arrays). Zero-shot methods accept none;
                few-shot methods need at least one.
            class_name: The product's name (e.g. ``"bottle"``), used by language-guided methods.
            threshold: ``"auto"`` (default): conformal if ``false_alarm_rate`` is given, else leave-one-out with
                two or more references, else no threshold. ``"leave-one-out"`` (or another registered rule): that
                rule (needs two or more). A finite number: that threshold. ``None``: none.
            progress: Called as ``progress(done, total)`` after each reference encoded and each held-out score;
                an exception it raises (e.g. to cancel) stops the fit.
            false_alarm_rate: ``α`` in (0, 1): the threshold is the conformal quantile of held-out reference scores,
                so that a normal image is flagged with probability at most ``α``.
            calibration: How references are held out: ``"leave-one-out"``, ``"k-fold"`` (five seeded folds, the
                detector then fitted on all), ``"split"`` (the detector stays fitted on the others only; with
                ``false_alarm_rate``) or ``"auto"`` (leave-one-out up to 16 references; above, split with
                ``false_alarm_rate`` and k-fold for the leave-one-out rule).
            calibration_size: References held out by ``"split"`` (default ``max(ceil(1/α) - 1, min(n // 2, 100))``).
            pixel_threshold: ``"auto"``: the image rule applied to held-out maps' maxima (none without held-out
                references); a number; or ``None``.
            options: All of the threshold arguments above as one :class:`~anomalens.thresholds.ThresholdOptions`
                (replacing them).

        Returns:
            ``self``, fitted; ``calibration`` says what was chosen and how (saved with the detector).

        Raises:
            ValueError: References given to a zero-shot-only method, none given to a method that needs
                them, a reference that is not a readable image, an invalid threshold option, or too few
                references for the rule or ``false_alarm_rate`` asked (the message says how many are needed).
        """
        options = options or ThresholdOptions(threshold, false_alarm_rate, calibration, calibration_size,
                                              pixel_threshold)  # fmt: skip
        references = list(reference_images or [])
        self._check_references(references, class_name)
        plan = options.plan(len(references), self.config.seed)
        arrays = [load_image(image) for image in references]
        self._resolve_tiling(arrays)
        self.class_name = class_name
        held_out = self._fit_and_hold_out(arrays, class_name, plan, progress or (lambda done, total: None))
        self.calibration = Calibration.from_held_out(plan, held_out, len(arrays), options.pixel_threshold)
        return self

    def _check_references(self, references: list, class_name: str | None) -> None:
        if references and not self.few_shot:
            raise ValueError(f"method {self.method_name!r} is zero-shot and takes no reference images")
        if not references and not self.zero_shot:
            raise ValueError(
                f"method {self.method_name!r} needs at least one normal reference image; got none "
                "(pass reference_images=[...] or --reference DIR)"
            )
        if class_name is not None and not isinstance(class_name, str):
            raise ValueError(f"class_name must be a string, got {class_name!r}")

    @property
    def input_size(self) -> int:
        """The side, in pixels, images are resized to before the networks (``tiling="auto"`` compares parts with
        it); methods with another input say so (default: ``config.image_size``, else 256)."""
        return int(getattr(self.config, "image_size", None) or 256)

    def _resolve_tiling(self, arrays: list[np.ndarray]) -> None:
        """``tiling="auto"``: choose from the references' size and aspect (:func:`anomalens.tiling.choose_tiling`);
        the choice replaces "auto" in the config (so it is saved) and its reason is ``tiling_choice``."""
        if self.config.tiling != AUTO:
            return
        self.config.tiling, self.tiling_choice = choose_tiling([array.shape[:2] for array in arrays], self.input_size)
        logger.info("%s tiling=auto: %s", self.method_name, self.tiling_choice)

    def _fit_and_hold_out(self, arrays: list[np.ndarray], class_name: str | None, plan: ThresholdPlan,
                          report: Callable[[int, int], None]) -> list[AnomalyResult]:  # fmt: skip
        """Fit as ``plan`` says; the held-out references' results (:func:`anomalens.thresholds.fit_holding_out`)."""
        return fit_holding_out(self, arrays, class_name, plan, report, self.config.batch_size)

    def _encode_tiled(self, arrays: list[np.ndarray], report: Callable[[int, int], None], total: int) -> list[list]:
        """:meth:`_encode_references` over every reference's tiles (the whole image without tiling), in batches;
        one list of encoded tiles per reference. ``report(done, total)`` after each batch (``done``: references
        whose tiles are all encoded)."""
        owners, tiles = [], []
        for owner, array in enumerate(arrays):
            for tile in tiles_of(array, self.config.tiling if isinstance(self.config.tiling, TileConfig) else None):
                owners.append(owner)
                tiles.append(tile)
        grouped: list[list] = [[] for _ in arrays]
        with torch.inference_mode(), self.autocast():
            for start in range(0, len(tiles), self.config.batch_size):  # progress (and cancelling) per batch
                chunk = range(start, min(start + self.config.batch_size, len(tiles)))
                for index, item in zip(chunk, self._encode_references([tiles[index] for index in chunk])):
                    grouped[owners[index]].append(item)
                last = chunk[-1]
                complete = last + 1 == len(tiles) or owners[last + 1] != owners[last]
                report(owners[last] + complete, total)
        return grouped

    def _fit_on(self, encoded: list[list], class_name: str | None, empty: bool = False,
                owners: Sequence[int] | None = None) -> None:  # fmt: skip
        """Fit on the encoded tiles of some references (``empty``: the zero-shot fit, on nothing). ``owners``: the
        reference index of each group, which memories then keep per entry (:meth:`_without_references`)."""
        with torch.inference_mode(), self.autocast():
            items = [item for group in encoded for item in group]
            self._item_owners = None if owners is None else [owner for owner, group in zip(owners, encoded)
                                                             for _ in group]  # fmt: skip
            try:
                self._fit_encoded(self._encode_references([]) if empty else items, class_name)
            finally:
                self._item_owners = None
        self._is_fitted.fill_(True)

    def _row_owners(self, rows: Sequence[int]) -> torch.Tensor | None:
        """While :meth:`_fit_on` fits with owners: the reference of each memory row, for a memory whose ``i``-th
        encoded item gave ``rows[i]`` rows (in the items' order); else ``None``."""
        owners = getattr(self, "_item_owners", None)
        if owners is None:
            return None
        if len(rows) != len(owners):
            raise ValueError(f"{len(rows)} row counts for {len(owners)} encoded items")
        return torch.repeat_interleave(torch.tensor(owners, dtype=torch.long), torch.tensor(list(rows)))

    def _reference_memories(self) -> list[NearestNeighbourMemory]:
        """The memories holding the references' features, where they are the only thing a fit learns from the
        references (so leaving a reference's entries out equals not having fitted on it). Default: none, and a
        held-out fold is a refit."""
        return []

    @property
    def folds_share_memory(self) -> bool:
        """Whether held-out folds are scored on one fit with their references' entries left out of the memories
        (:func:`anomalens.thresholds.fit_holding_out`), not a refit per fold."""
        return bool(self._reference_memories())

    def _can_leave_out(self, folds: Sequence[Sequence[int]]) -> bool:
        """Whether every fold can be scored by leaving its references' entries out of the memories
        (:meth:`_without_references`) instead of a refit."""
        memories = self._reference_memories()
        return bool(memories) and all(memory.leaves_entries_without(fold) for memory in memories for fold in folds)

    def _forget_owners(self) -> None:
        """Drop what the memories kept for :meth:`_without_references` (after the held-out folds)."""
        for memory in self._reference_memories():
            memory.forget_owners()

    @contextmanager
    def _without_references(self, references: Sequence[int]) -> Iterator[None]:
        """Within the block, every reference memory holds only the entries of references other than
        ``references`` (:meth:`NearestNeighbourMemory.without`)."""
        with ExitStack() as stack:
            for memory in self._reference_memories():
                stack.enter_context(memory.without(references))
            yield

    def update(self, images: Sequence[ImageLike], calibration_images: Sequence[ImageLike] | None = None, *,
               max_memory: int | None = None, calibration_from: str = "held-out normal images",
               progress: Callable[[int, int], None] | None = None) -> UpdateReport:  # fmt: skip
        """Take new normal images into the fitted detector without a refit (overruled false alarms, a new
        supplier's parts), and choose the threshold again on held-out normal images (:mod:`anomalens.updates`).

        Each image is encoded once; its features enter the memory where they lie beyond the memory's coverage
        radius, so every reference and every new image lies within that radius of the memory afterwards.

        Args:
            images: New normal images (paths, PIL images or arrays).
            calibration_images: Normal images this detector never saw, for the threshold: the rule that chose it
                (conformal at the same ``α``, leave-one-out's maximum) is applied to their scores. ``None``: the
                threshold is kept (the report says so).
            max_memory: Entries each memory may hold at most (additions stop there; the radius then grows).
            calibration_from: Where the calibration images came from, in the record (e.g. "line audit sample").
            progress: Called as ``progress(done, total)`` while the new images are encoded.

        Returns:
            An :class:`~anomalens.updates.UpdateReport`: images added, memory sizes and coverage radii, thresholds
            before and after.

        Raises:
            ValueError: A method that cannot grow incrementally (the message says why), no images, an unreadable
                image, too few calibration images for the rule's ``α``.
        """
        from anomalens.updates import update_detector

        return update_detector(self, images, calibration_images, max_memory=max_memory,
                               calibration_from=calibration_from, progress=progress)  # fmt: skip

    def _extend_arrays(self, arrays: list[np.ndarray], max_memory: int | None,
                       report: Callable[[int, int], None]) -> dict[str, MemoryUpdate]:  # fmt: skip
        """Encode ``arrays`` (as their tiles) and grow the memories with them (:meth:`_extend_encoded`)."""
        encoded = self._encode_tiled(arrays, report, len(arrays))
        with torch.inference_mode(), self.autocast():
            return self._extend_encoded([item for group in encoded for item in group], max_memory)

    def _rescale_on(self, normals: list[np.ndarray]) -> None:
        """After an update, re-estimate any scale fitted on held-out normal scores from ``normals`` (normal
        images the updated detector never saw). Default: nothing (a method with no such scale)."""

    def _extend_encoded(self, encoded: list[Any], max_memory: int | None) -> dict[str, MemoryUpdate]:
        """Grow each memory with the encoded items of new normal images; what each memory did, by name."""
        raise NotImplementedError(f"{type(self).__name__} implements no _extend_encoded")

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
        self._check_fitted()
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
            scored = self.predict_arrays(arrays, [image_source(images[index]) for index in chunk])
            for index, result in zip(chunk, scored):
                results[index] = result
        return results  # type: ignore[return-value]

    def predict_arrays(self, arrays: Sequence[np.ndarray], sources: Sequence[str] | None = None) -> list[AnomalyResult]:
        """Score already-loaded ``(H, W, 3)`` uint8 arrays as one batch (the batch commands' entry point); with
        ``tiling``, as the tiles of every image (:func:`anomalens.tiling.score_tiled`)."""
        self._check_fitted()
        arrays = list(arrays)
        if not arrays:
            return []
        tiling = self.config.tiling if isinstance(self.config.tiling, TileConfig) else None
        if tiling is None:
            scored = self._score_images(arrays)
        else:  # a pooled method pools all tiles of the call
            tiles = sum(len(tiles_of(array, tiling)) for array in arrays) if self.pooled else self.config.batch_size
            scored = score_tiled(arrays, tiling, self._score_images, tiles)
        return [self._result(score, anomaly_map, sources[index] if sources else "")
                for index, (score, anomaly_map) in enumerate(scored)]  # fmt: skip

    def _score_images(self, images: list[np.ndarray]) -> list[tuple[float, np.ndarray]]:
        """``(score, (H, W) float32 map)`` of each image, from one :meth:`_predict_batch` call."""
        with torch.inference_mode():
            with self.autocast():
                scores, maps = self._predict_batch(images)
            scores, maps = scores.detach().float().cpu(), maps.detach().float()
            return [(float(scores[index]), self._map_to_image(maps[index], image.shape[:2]).cpu().numpy()
                     .astype(np.float32, copy=False)) for index, image in enumerate(images)]  # fmt: skip

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise RuntimeError(f"{self.method_name} detector is not fitted: call fit() first (or load a saved one)")

    def _result(self, score: float, anomaly_map: np.ndarray, source: str) -> AnomalyResult:
        calibration = self.calibration
        return AnomalyResult(score=score, anomaly_map=anomaly_map, label=calibration.label(score),
                             threshold=calibration.threshold, source=source,
                             pixel_threshold=calibration.pixel_threshold)  # fmt: skip

    def describe(self) -> dict[str, Any]:
        """JSON-ready description: method, config, class name, calibration, fitted state."""
        return {"method": self.method_name, "config": config_to_dict(self.config), "config_hash": self.config_hash,
                "class_name": self.class_name, **self.calibration.to_dict(), "tiling_choice": self.tiling_choice,
                "fitted": self.is_fitted}  # fmt: skip

    # ------------------------------------------------------------------ saving, loading, exporting
    def fingerprint(self) -> str:
        """16 hex digits naming everything that decides a score, the threshold aside
        (:func:`anomalens.persistence.fingerprint`)."""
        return fingerprint(self)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the detector to folder ``path`` (``config.json`` + ``model.safetensors``), atomically
        (:func:`anomalens.persistence.save_detector`); loading it needs no network and no other weights."""
        return save_detector(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Detector:
        """Load a detector written by :meth:`save`, checking its files' SHA-256 and every tensor's name and shape
        (``anomalens.load``). ``Detector.load`` loads any method; ``PatchCore.load`` refuses another method's."""
        return load_detector(path, None if cls is Detector else cls, map_location)

    def export(self, out_dir: str | os.PathLike, format: str = "onnx", **options: Any) -> Path:
        """Export the fitted detector to ONNX (or OpenVINO) for the torch-free runtime; see
        :func:`anomalens.export.export_detector` (the options)."""
        from anomalens.export import export_detector

        return export_detector(self, out_dir, format=format, **options)

    # ------------------------------------------------------------------ hooks for methods
    @classmethod
    def required_weights(cls, config: Any) -> list[str]:
        """Weight references this config loads (see :func:`~anomalens.backbones.weights.resolve`), for downloads."""
        return []

    def _fit(self, reference_images: list[np.ndarray], class_name: str | None) -> None:
        raise NotImplementedError(f"{type(self).__name__} implements neither _fit_encoded nor _fit")

    def _encode_references(self, reference_images: list[np.ndarray]) -> list[Any]:
        """One item per reference holding what fitting needs from it (its backbone features), so that the
        held-out folds refit without running the backbone again. Default: the images themselves."""
        return list(reference_images)

    def _fit_encoded(self, encoded: list[Any], class_name: str | None) -> None:
        """Build fitted state from items of :meth:`_encode_references`. Default: :meth:`_fit` on the images."""
        self._fit(encoded, class_name)

    def _predict_batch(self, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Score a batch. Returns scores ``(B,)`` and maps ``(B, h, w)`` at one common resolution."""
        raise NotImplementedError(f"{type(self).__name__} implements no _predict_batch")

    def _map_to_image(self, anomaly_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Bring one ``(h, w)`` map from the model's input geometry to its image's ``(H, W)``."""
        return resize_map(anomaly_map, size)

    def export_spec(self) -> Any:
        """The graph and preprocessing to export (:class:`anomalens.export.ExportSpec`); see ``cannot_export``."""
        raise ValueError(f"method {self.method_name!r} cannot be exported: {self.cannot_export}")
