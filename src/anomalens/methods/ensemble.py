"""Ensembles: fuse the maps and scores of any registered methods on a scale set by the references alone.

One backbone's features can be weak where another's are strong (PatchCore's CNN features on a low-contrast
texture, a reconstruction model on fine geometry). An ensemble runs each member on the same images, puts every
member's scores and maps on a common scale, and averages them with ``weights``::

    detector = anomalens.create("ensemble", members=[
        {"method": "patchcore", "backbone": "taef2"},
        {"method": "vlmdiff", "checkpoint": "runs/vlmdiff-multiclass"},
    ], normalisation="zscore")
    detector.fit(reference_images, class_name="bottle")

The common scale comes from held-out reference images only, never from test images or labels:

1. each member is fitted as :meth:`Detector.fit` would (tiling and all), and scores every reference it did not
   see: leave-one-out folds with up to :data:`~anomalens.thresholds.LOO_LIMIT` references, five seeded folds
   above (the threshold's own calibration when one is asked); a member that takes no references (VLMDiff) scores them
   all, unseen as they are;
2. ``normalisation="zscore"`` (default): a member's score becomes ``(score - mean) / std`` of its held-out scores,
   its map ``(map - mean) / std`` of its held-out maps' pixels; ``"minmax"`` uses the min and the range instead;
   ``"none"`` keeps raw values (only for members on one scale already);
3. the fused score and map are the ``weights``-weighted means of the members' normalised ones; each member's own
   score is kept in ``result.extras["members"]``.

Normalising needs at least two held-out references. The ensemble's thresholds are then chosen on the fused
held-out scores like any detector's (the normalisation statistics come from the same held-out references, a
symmetric function of them: a guess that this does not matter in practice, measured by the benchmark's
false-alarm table).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from anomalens.checks import check_options
from anomalens.config import RUNTIME_FIELDS, DetectorConfig, build_config, config_to_dict
from anomalens.detector import AnomalyResult, Detector
from anomalens.thresholds import ThresholdPlan
from anomalens.tiling import TileConfig

logger = logging.getLogger(__name__)

NORMALISATIONS = ("zscore", "minmax", "none")
SHARED_FIELDS = ("precision", "seed")  # set on the ensemble (not to their defaults), they apply to every member


@dataclass
class EnsembleConfig(DetectorConfig):
    """Options of :class:`Ensemble`."""

    method: ClassVar[str] = "ensemble"

    # member detectors: method names or {"method": NAME, **options}; saved in full. The default pairs a memory bank
    # with a language view (a guess: no ensemble of these methods is published)
    members: tuple[Any, ...] = ("patchcore", "winclip")
    weights: tuple[float, ...] | None = None  # one non-negative weight per member (default: equal)
    normalisation: str = "zscore"  # members' common scale from held-out references: zscore, minmax or none
    smoothing_sigma: float = 0.0  # unused: each member smooths its own map
    tiling: TileConfig | str | None = None  # unused: each member tiles (its own tiling, "auto" by default)

    @classmethod
    def random_weights(cls) -> dict[str, Any]:
        """``--pretrained none``: the default members, each with every network random."""
        from anomalens.registry import get_method

        members = [member_spec(item) for item in cls.members]  # the class default
        return {"members": tuple({"method": name, **options, **get_method(name).config_class.random_weights()}
                                 for name, options in members)}  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        specs = [member_spec(item) for item in self.members]  # names checked here, before any model is built
        check_options(self.method, self, {
            "members": (len(specs) >= 1, "at least one member method (e.g. members=patchcore,winclip)"),
            "weights": (self.weights is None or (len(self.weights) == len(specs) and all(
                float(weight) >= 0 for weight in self.weights) and sum(self.weights) > 0),
                f"one non-negative weight per member ({len(specs)}), not all zero"),
            "normalisation": (self.normalisation in NORMALISATIONS, f"one of {', '.join(NORMALISATIONS)}"),
            "tiling": (self.tiling is None, "None: set tiling on the members (members=[{...,'tiling':'on'}])"),
        })  # fmt: skip


def member_spec(item: Any) -> tuple[str, dict[str, Any]]:
    """``(method name, options)`` of one ``members`` entry (a name or a dict with ``"method"``).

    Raises:
        ValueError: Not a name or dict, no ``method``, an unknown method (the valid ones listed), or an ensemble.
    """
    from anomalens.registry import get_method

    if isinstance(item, str):
        name, options = item.strip(), {}
    elif isinstance(item, dict) and isinstance(item.get("method"), str):
        name, options = item["method"], {key: value for key, value in item.items() if key != "method"}
    else:
        raise ValueError(f"ensemble member {item!r} must be a method name or a dict with a 'method' key")
    get_method(name)  # unknown names list the valid ones
    if name == "ensemble":
        raise ValueError("an ensemble member cannot itself be an ensemble; list its members instead")
    return name, options


class Ensemble(Detector):
    """Weighted fusion of member detectors on a reference-derived common scale (see the module docstring)."""

    method_name = "ensemble"
    cannot_export = "each member is its own graph: export the members"
    cannot_update = None  # update(): each member with references grows; the common scale is re-estimated on the
    # calibration images when given
    config_class = EnsembleConfig

    def __init__(self, config: EnsembleConfig, *, weights_dir=None, load_pretrained: bool = True):
        super().__init__(config, weights_dir=weights_dir, load_pretrained=load_pretrained)
        from anomalens.registry import get_method

        members, saved = [], []
        for item in config.members:
            name, options = member_spec(item)
            cls = get_method(name)
            shared = {name: getattr(config, name) for name in SHARED_FIELDS  # the ensemble's own, where set
                      if getattr(config, name) != getattr(DetectorConfig, name)}  # fmt: skip
            member_config = build_config(cls.config_class, {**shared, **options, "device": config.device}, method=name)
            members.append(cls(member_config, weights_dir=weights_dir, load_pretrained=load_pretrained))
            saved.append({"method": name, **{key: value for key, value in config_to_dict(member_config).items()
                                             if key not in RUNTIME_FIELDS}})  # fmt: skip
        self.members = nn.ModuleList(members)
        config.members = tuple(saved)  # every member option, so a saved ensemble rebuilds the same members
        self.register_buffer("score_stats", torch.tensor([[0.0, 1.0]] * len(members)))  # (shift, scale) per member
        self.register_buffer("map_stats", torch.tensor([[0.0, 1.0]] * len(members)))
        self.zero_shot = all(member.zero_shot for member in members) and config.normalisation == "none"
        self.few_shot = any(member.few_shot for member in members) or config.normalisation != "none"
        self.pooled = any(member.pooled for member in members)

    def _apply(self, fn, recurse: bool = True):
        """``nn.Module._apply`` (``.to()``, ``.half()``...), keeping the common-scale statistics in float32: a member
        moved to bfloat16 still has its scores divided by full-precision spreads."""
        result = super()._apply(fn, recurse)
        for name in ("score_stats", "map_stats"):
            buffer = getattr(self, name)
            if buffer.dtype != torch.float32:
                setattr(self, name, buffer.float())
        return result

    @property
    def class_name(self) -> str | None:
        return self.__dict__.get("_class_name")

    @class_name.setter
    def class_name(self, value: str | None) -> None:  # members need it too (language prompts)
        self.__dict__["_class_name"] = value
        for member in self.__dict__.get("_modules", {}).get("members", []):
            member.class_name = value

    @classmethod
    def required_weights(cls, config: EnsembleConfig) -> list[str]:
        from anomalens.registry import get_method

        needed: list[str] = []
        for item in config.members:
            name, options = member_spec(item)
            member_cls = get_method(name)
            member_config = build_config(member_cls.config_class, options, method=name)
            needed.extend(reference for reference in member_cls.required_weights(member_config)
                          if reference not in needed)  # fmt: skip
        return needed

    @property
    def member_weights(self) -> list[float]:
        weights = self.config.weights or (1.0,) * len(self.members)
        return [float(weight) for weight in weights]

    # ------------------------------------------------------------------ fitting
    def _resolve_tiling(self, arrays: list[np.ndarray]) -> None:
        """Each member chooses its own tiling from the references (the ensemble itself scores no tiles)."""
        for member in self.members:
            member._resolve_tiling(arrays)
        self.tiling_choice = "; ".join(f"{member.method_name}: {member.tiling_choice}" for member in self.members)

    def _fit_and_hold_out(self, arrays: list[np.ndarray], class_name: str | None, plan: ThresholdPlan,
                          report: Callable[[int, int], None]) -> list[AnomalyResult]:  # fmt: skip
        """Fit every member, hold references out for the common scale, and return the fused held-out results."""
        normalise = self.config.normalisation != "none"
        held_plan = plan.holding_out(len(arrays), self.config.seed) if normalise else plan
        if normalise and len(held_plan.calibration_indices if held_plan.calibration else []) < 2:
            raise ValueError(
                f"ensemble normalisation={self.config.normalisation!r} needs at least 2 reference images to hold out "
                f"(got {len(arrays)}); give more references or normalisation='none'"
            )
        held_indices = held_plan.calibration_indices if held_plan.calibration else []
        per_member: list[list[AnomalyResult]] = []
        for number, member in enumerate(self.members):
            member.class_name = class_name
            if member.few_shot and arrays:
                per_member.append(member._fit_and_hold_out(arrays, class_name, held_plan, lambda done, total: None))
            else:
                member._fit_and_hold_out([], class_name, ThresholdPlan("none"), lambda done, total: None)
                per_member.append(member.predict_arrays([arrays[index] for index in held_indices]))
            report(number + 1, len(self.members))
        self._set_scale(per_member)
        self._is_fitted.fill_(True)
        return [self._fuse([results[index] for results in per_member], results_source(per_member, index))
                for index in range(len(held_indices))]  # fmt: skip

    def _set_scale(self, per_member: list[list[AnomalyResult]]) -> None:
        """The common scale from each member's results on held-out normal images."""
        with torch.inference_mode():
            for number, results in enumerate(per_member):
                self.score_stats[number] = torch.tensor(self._stats([result.score for result in results]))
                self.map_stats[number] = torch.tensor(self._map_stats([result.anomaly_map for result in results]))

    def _stats(self, values: Sequence[float]) -> tuple[float, float]:
        values = np.asarray(values, dtype=np.float64)
        if self.config.normalisation == "none" or values.size == 0:
            return 0.0, 1.0
        if self.config.normalisation == "zscore":
            return float(values.mean()), _positive(float(values.std(ddof=1)) if values.size > 1 else 0.0)
        return float(values.min()), _positive(float(values.max() - values.min()))

    def _map_stats(self, maps: Sequence[np.ndarray]) -> tuple[float, float]:
        if self.config.normalisation == "none" or not maps:
            return 0.0, 1.0
        count = sum(item.size for item in maps)
        if self.config.normalisation == "zscore":
            mean = sum(float(item.sum(dtype=np.float64)) for item in maps) / count
            squares = sum(float(((item.astype(np.float64) - mean) ** 2).sum()) for item in maps)
            return mean, _positive((squares / max(count - 1, 1)) ** 0.5)
        low = min(float(item.min()) for item in maps)
        return low, _positive(max(float(item.max()) for item in maps) - low)

    def _extend_arrays(self, arrays: list[np.ndarray], max_memory: int | None,
                       report: Callable[[int, int], None]) -> dict[str, Any]:  # fmt: skip
        """Grow every member fitted with references (each encodes the images itself)."""
        updates = {}
        for number, member in enumerate(self.members):
            if member.cannot_update is None and member.few_shot:
                for name, update in member._extend_arrays(arrays, max_memory, lambda done, total: None).items():
                    updates[f"{number}:{member.method_name}:{name}"] = update
            report(number + 1, len(self.members))
        if not updates:
            raise ValueError("no member of this ensemble keeps references that an update could grow")
        return updates

    def _rescale_on(self, normals: list[np.ndarray]) -> None:
        """The common scale again, from the members' results on ``normals`` (held-out normal images the updated
        members never saw), as the fit estimated it from held-out references."""
        if self.config.normalisation == "none":
            return
        if len(normals) < 2:
            raise ValueError(f"ensemble normalisation={self.config.normalisation!r} needs at least 2 calibration "
                             f"images to re-estimate its scale, got {len(normals)}")  # fmt: skip
        self._set_scale([member.predict_arrays(normals) for member in self.members])

    # ------------------------------------------------------------------ scoring
    def predict_arrays(self, arrays: Sequence[np.ndarray], sources: Sequence[str] | None = None) -> list[AnomalyResult]:
        """Score with every member and fuse (see the module docstring)."""
        if not self.is_fitted:
            raise RuntimeError("ensemble detector is not fitted: call fit() first (or load a saved one)")
        if not arrays:
            return []
        per_member = [member.predict_arrays(arrays, sources) for member in self.members]
        for member in self.members:
            for stage, seconds in member.stage_seconds.items():
                self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds
            member.stage_seconds.clear()
        return [self._fuse([results[index] for results in per_member], sources[index] if sources else "")
                for index in range(len(arrays))]  # fmt: skip

    def _fuse(self, results: list[AnomalyResult], source: str) -> AnomalyResult:
        weights = self.member_weights
        total = sum(weights)
        score, anomaly_map = 0.0, np.zeros(results[0].anomaly_map.shape, dtype=np.float64)
        for number, (result, weight) in enumerate(zip(results, weights)):
            score_shift, score_scale = self.score_stats[number].tolist()
            map_shift, map_scale = self.map_stats[number].tolist()
            score += weight * (result.score - score_shift) / score_scale
            anomaly_map += weight * (result.anomaly_map.astype(np.float64) - map_shift) / map_scale
        fused = self._result(score / total, (anomaly_map / total).astype(np.float32), source)
        fused.extras["members"] = {f"{number}:{member.method_name}": result.score
                                   for number, (member, result) in enumerate(zip(self.members, results))}  # fmt: skip
        return fused

    def _predict_batch(self, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError("an ensemble scores through predict_arrays (its members' maps differ in size)")


def results_source(per_member: list[list[AnomalyResult]], index: int) -> str:
    return per_member[0][index].source if per_member and per_member[0] else ""


def _positive(scale: float) -> float:
    """A usable divisor: a zero or non-finite spread (identical held-out values) becomes 1 (a shift only)."""
    if not np.isfinite(scale) or scale <= 1e-12:
        logger.warning("ensemble: a member's held-out values do not vary; its values are shifted, not scaled")
        return 1.0
    return scale
