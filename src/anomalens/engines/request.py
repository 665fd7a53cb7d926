"""One predict run, decided before any image is scored: what to score, where to write, how to label and draw.

:class:`PredictRequest` is built once and handed to whichever engine scores (the local one, Ray, the torch-free
runtime's command line): :meth:`PredictRequest.prepare` lists the inputs and checks the output folder before any
fitting (a mistake costs nothing), and :meth:`PredictRequest.calibrated` fixes the calibration (threshold, pixel
threshold, the overlays' colour scale) from the detector that will score. The engines take nothing else.

Example:
    >>> from anomalens.engines.local import run_predict
    >>> from anomalens.engines.request import OutputSettings, PredictRequest
    >>> request = PredictRequest.prepare(["incoming/"], OutputSettings(out="runs/today"))  # doctest: +SKIP
    >>> run_predict(detector, request.calibrated(detector))  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from anomalens.checks import check_options
from anomalens.engines.run_folder import RAW_FORMATS, check_out_dir, check_resume, collect_inputs, output_names
from anomalens.io.images import ImageLimits
from anomalens.thresholds import Calibration


@dataclass
class OutputSettings:
    """What a predict run writes, and the limits each input is checked against (the command line's ``predict``
    options extend this declaration)."""

    out: str = ""  # output folder (required)
    overwrite: bool = False  # replace an earlier run in --out
    raw_format: str = field(default="npy", metadata={"choices": RAW_FORMATS})  # raw maps: npy (exact) or png16
    overlays: bool = True  # write heatmap overlays (--no-overlays: only raw maps and scores)
    max_pixels: int = 40_000_000  # larger images (width * height, read from the header) are skipped
    max_image_memory_bytes: int = 2 * 2**30  # images needing more memory to decode, score and draw are skipped
    map_scale: tuple[float, ...] | None = None  # overlay colour scale LOW HIGH; default: from the references

    def __post_init__(self) -> None:
        scale = self.map_scale
        check_options("predict", self, {
            "out": (bool(self.out), "an output folder (--out DIR)"),
            "raw_format": (self.raw_format in RAW_FORMATS, f"one of {', '.join(RAW_FORMATS)}"),
            "max_pixels": (isinstance(self.max_pixels, int) and self.max_pixels >= 1, "an integer >= 1"),
            "max_image_memory_bytes": (isinstance(self.max_image_memory_bytes, int)
                                       and self.max_image_memory_bytes >= 1, "an integer >= 1"),
            "map_scale": (scale is None or (len(scale) == 2 and scale[0] < scale[1]), "two numbers LOW < HIGH"),
        })  # fmt: skip

    @property
    def limits(self) -> ImageLimits:
        """The size limits each image's header is checked against before decoding."""
        return ImageLimits(max_pixels=self.max_pixels, max_memory_bytes=self.max_image_memory_bytes)


Lister = Callable[[Sequence[str]], list[tuple[str, str]]]  # inputs -> (path or URI, output name) of every image


def local_images(inputs: Sequence[str]) -> list[tuple[str, str]]:
    """``(path, output name)`` of every image file under local files and folders (searched recursively)."""
    paths, roots = collect_inputs(inputs)
    return [(str(path), name) for path, name in zip(paths, output_names(paths, roots))]


@dataclass(frozen=True)
class PredictRequest:
    """Everything a predict run needs besides the detector (see the module docstring)."""

    inputs: tuple[str, ...]  # the inputs as given (files, folders, URIs)
    images: tuple[tuple[str, str], ...]  # (path or URI, output name) of every image found, in listing order
    settings: OutputSettings  # where to write, formats, limits
    run_info: Mapping[str, Any] = field(default_factory=dict)  # extra run.json fields (the command line, ...)
    batch_size: int | None = None  # images per forward pass; None: the method's
    calibration: Calibration | None = None  # the run's thresholds (None until calibrated())
    map_scale: tuple[float, float] | None = None  # the overlays' colour scale, decided with the calibration
    map_scale_source: str = "per-image"  # where the colour scale comes from (Calibration.map_scale_for)

    @classmethod
    def prepare(cls, inputs: Sequence[str | os.PathLike], settings: OutputSettings, *,
                run_info: Mapping[str, Any] | None = None, batch_size: int | None = None,
                lister: Lister = local_images, resumable: bool = False) -> PredictRequest:  # fmt: skip
        """List the inputs and check the output folder, before anything is fitted.

        Args:
            inputs: Image files and folders (and URIs, with a lister that reads them).
            settings: Where and what to write.
            run_info: Extra ``run.json`` fields.
            batch_size: Images per forward pass (``None``: the method's).
            lister: Lists the images under the inputs (:func:`local_images`; Ray's also reads URIs).
            resumable: The engine resumes an earlier run in the folder (Ray) instead of refusing it.

        Raises:
            ValueError: No image under the inputs, an output folder that holds a run (without ``overwrite``),
                is a file or has a linked artifact, or a ``batch_size`` below 1.
        """
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):  # fmt: skip
            raise ValueError(f"predict option batch_size={batch_size!r} must be an integer >= 1")
        as_text = tuple(str(entry) for entry in inputs)
        (check_resume if resumable else check_out_dir)(settings.out, settings.overwrite)
        images = tuple(lister(as_text))
        if not images:
            raise ValueError(f"no image files found in {list(as_text)}")
        return cls(as_text, images, settings, dict(run_info or {}), batch_size)

    def calibrated(self, detector: Any) -> PredictRequest:
        """This request with ``detector``'s calibration fixed as the run's, and the colour scale it gives."""
        calibration = detector.calibration
        scale, source = calibration.map_scale_for(self.settings.map_scale, getattr(detector, "zero_shot", False))
        return replace(self, calibration=calibration, map_scale=scale, map_scale_source=source)

    @property
    def out(self) -> Path:
        return Path(self.settings.out)

    def checked_calibration(self) -> Calibration:
        """The run's calibration; a request that was never calibrated is a mistake of the caller."""
        if self.calibration is None:
            raise ValueError("the predict request has no calibration: call request.calibrated(detector) first")
        return self.calibration

    def manifest(self, describe: Mapping[str, Any]) -> dict[str, Any]:
        """The ``run.json`` of a starting run: the detector's description with the run's calibration, the inputs,
        formats and colour scale."""
        calibration = self.checked_calibration()
        return {**describe, **calibration.to_dict(), "threshold_rule": calibration.rule_text,
                "inputs": list(self.inputs), "raw_format": self.settings.raw_format, "status": "running",
                **self.run_info, "map_scale": list(self.map_scale) if self.map_scale else None,
                "map_scale_source": self.map_scale_source}  # fmt: skip
