"""WinCLIP and WinCLIP+ (Jeong et al., "WinCLIP: Zero-/Few-Shot Anomaly Classification and Segmentation",
CVPR 2023).

Zero-shot (no references):
1. Text: the compositional prompt ensemble (state words x templates, :mod:`anomalens.backbones.prompts`) gives one
   normal and one anomalous embedding for the class, encoded once and cached.
2. Windows: for each scale s in ``scales`` (2 and 3 patches, stride 1), every s x s window of the patch grid
   is embedded alone: its patch tokens plus the class token go through the transformer (token gathering,
   batched over all windows), and the pooled output is projected into the joint space.
3. Each window's anomaly probability is the softmax over (normal, anomalous) text similarities. A patch's score
   at a scale is the harmonic mean over the windows covering it. The image scale (the global embedding's
   probability) counts as one more scale; the scales are combined (``scale_aggregation``) into the patch map,
   which is upsampled bilinearly and Gaussian-smoothed (``smoothing_sigma``).
4. Image score: the global embedding's probability (``zero_shot_image_score``).

Few-shot, WinCLIP+ (1..k references): the reference images' patch tokens (block ``patch_layer``) and window
embeddings at each scale form one cosine memory per scale. A query patch's or window's visual score is its
distance to that scale's memory, ``(1 - max cos) / 2`` (``visual_distance``); window scores are spread to patches
over the covering windows (``few_shot_window_aggregation``); the few-shot map is the mean over scales. The final
map is the mean of the language-guided and the few-shot map; the image score is the mean of the zero-shot image
score and the few-shot map's maximum.

``compat`` chooses every scoring detail at once: "paper" (the paper as we read it) or "anomalib" (anomalib 2.x's
``WinClipModel``, output for output; ``benchmarks/parity_anomalib.py``). Each detail is also a field of its own,
which overrides the preset (None: the preset's):

===========================  ==========================  =================  ==========================
field                        "paper"                     "anomalib"         former anomalens
===========================  ==========================  =================  ==========================
templates                    None: WinCLIP's 22          anomalib's 21      None
temperature                  None: CLIP's logit scale    1 / 0.07           None
                             (100) [ambiguous]
smoothing_sigma              4 [guess]                   0                  4
scale_aggregation            harmonic                    harmonic           mean
zero_shot_image_score        global                      global             global_and_map_max
prompt_normalisation         per_prompt [ambiguous]      ensemble           per_prompt
visual_distance              half: (1 - cos) / 2         half               full: 1 - cos
few_shot_window_aggregation  harmonic [ambiguous]        harmonic           mean
patch_memory                 unprojected [ambiguous]     unprojected        projected
map_max                      grid                        grid               smoothed
===========================  ==========================  =================  ==========================

Where the paper is ambiguous (marked): the paper writes a temperature tau in its softmax and gives no value; CLIP
was trained to a learned logit scale of 100, which "paper" keeps (anomalib takes 0.07, CLIP's initial value). The
paper says nothing of smoothing; sigma 4 is the field's practice (a guess). It averages prompt embeddings without
saying whether each is normalised first; "per_prompt" is CLIP's prompt-ensembling recipe, "ensemble" averages the
raw embeddings. It describes the few-shot window maps as aggregated like the zero-shot ones (harmonic) and the
patch memory as the image encoder's patch tokens; we follow anomalib's reading (the tokens after ``ln_post``,
before the projection). ``map_max`` "grid" takes maxima on the patch grid, before upsampling and smoothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anomalens.backbones.clip import (
    RESIZE_MODES,
    CLIPBackbone,
    harmonic_window_aggregation,
    sliding_windows,
    window_incidence,
)
from anomalens.backbones.prompts import ANOMALIB_WINCLIP_TEMPLATES
from anomalens.checks import check_options
from anomalens.detector import Detector
from anomalens.export import ExportSpec, PixelsGraph
from anomalens.methods.clip_base import CLIPConfig, check_shots, class_name_of, clip_weights_of, prompt_set_of
from anomalens.nn.memory import NearestNeighbourMemory

WINCLIP_COMPAT: dict[str, dict[str, Any]] = {  # the scoring details each compat preset sets (fields left None)
    "paper": {
        "templates": None, "temperature": None, "smoothing_sigma": 4.0, "scale_aggregation": "harmonic",
        "zero_shot_image_score": "global", "prompt_normalisation": "per_prompt", "visual_distance": "half",
        "few_shot_window_aggregation": "harmonic", "patch_memory": "unprojected", "map_max": "grid",
    },
    "anomalib": {
        "templates": ANOMALIB_WINCLIP_TEMPLATES, "temperature": 1 / 0.07, "smoothing_sigma": 0.0,
        "scale_aggregation": "harmonic", "zero_shot_image_score": "global", "prompt_normalisation": "ensemble",
        "visual_distance": "half", "few_shot_window_aggregation": "harmonic", "patch_memory": "unprojected",
        "map_max": "grid",
    },
}  # fmt: skip


@dataclass
class WinCLIPConfig(CLIPConfig):
    """Configuration of :class:`WinCLIP` (common CLIP fields: :class:`~anomalens.methods.clip_base.CLIPConfig`)."""

    method: ClassVar[str] = "winclip"
    saved_before_the_field: ClassVar[dict[str, Any]] = {
        "scale_aggregation": "mean", "zero_shot_image_score": "global_and_map_max",
        "prompt_normalisation": "per_prompt", "visual_distance": "full", "few_shot_window_aggregation": "mean",
        "patch_memory": "projected", "map_max": "smoothed",
    }  # fmt: skip

    backbone: str = "ViT-B-16-plus-240"  # open_clip model name
    pretrained: str | None = "laion400m_e31"  # open_clip pretrained tag, a checkpoint path, or None (random init)
    shots: int | None = None  # 0 forces zero-shot, k >= 1 few-shot (fit needs references); None: as fit() is called
    scales: tuple[int, ...] = (2, 3)  # window sides in patches; the image scale is always added
    window_stride: int = 1  # patches between window starts (the paper's 1; 2 runs ~3.5x fewer windows, the last
    # row and column of windows always kept so every patch is covered)
    window_tokens_per_call: int = 2048  # tokens per transformer call of the window passes (a speed setting only)
    image_size: int | None = None  # model input side; None = the model's own (240 for ViT-B-16-plus-240)
    resize_mode: str = "resize"  # "resize" (squash to square) or "crop" (centre crop; map placed back in the crop)
    patch_layer: int = -1  # block whose patch tokens form WinCLIP+'s patch-scale memory (-1 = last)
    compat: str = "paper"  # every scoring detail below at once: "paper" or "anomalib" (see the module docstring)
    smoothing_sigma: float | None = None  # Gaussian sigma of the map in input pixels, 0 = none; None: compat's
    scale_aggregation: str | None = None  # zero-shot scales into one map: "harmonic" or "mean"; None: compat's
    zero_shot_image_score: str | None = None  # "global" (the image embedding's probability) or
    # "global_and_map_max" (its mean with the zero-shot map's maximum); None: compat's
    prompt_normalisation: str | None = None  # "per_prompt": normalise each prompt embedding, then average;
    # "ensemble": average the raw embeddings; None: compat's
    visual_distance: str | None = None  # few-shot distance "half" ((1 - max cos) / 2) or "full" (1 - max cos)
    few_shot_window_aggregation: str | None = None  # window distances to patches: "harmonic" or "mean"
    patch_memory: str | None = None  # patch-scale memory tokens "unprojected" (after ln_post) or "projected"
    map_max: str | None = None  # image scores take map maxima on the patch "grid" or the "smoothed" input-size map

    def __post_init__(self) -> None:
        if self.compat not in WINCLIP_COMPAT:
            raise ValueError(f"unknown winclip compat {self.compat!r}; valid: {', '.join(WINCLIP_COMPAT)}")
        for name, value in WINCLIP_COMPAT[self.compat].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        super().__post_init__()
        self.scales = tuple(int(scale) for scale in self.scales)
        check_options(
            self.method,
            self,
            {
                "scales": (bool(self.scales) and all(scale >= 1 for scale in self.scales), "integers >= 1"),
                "window_stride": (1 <= self.window_stride <= min(self.scales, default=1), "in [1, the smallest scale]"),
                "window_tokens_per_call": (self.window_tokens_per_call >= 1, ">= 1"),
                "shots": (self.shots is None or self.shots >= 0, ">= 0 or None"),
                "resize_mode": (self.resize_mode in RESIZE_MODES, f"one of {', '.join(RESIZE_MODES)}"),
                "scale_aggregation": (self.scale_aggregation in ("harmonic", "mean"), "harmonic or mean"),
                "zero_shot_image_score": (
                    self.zero_shot_image_score in ("global", "global_and_map_max"),
                    "global or global_and_map_max",
                ),
                "prompt_normalisation": (
                    self.prompt_normalisation in ("per_prompt", "ensemble"),
                    "per_prompt or ensemble",
                ),
                "visual_distance": (self.visual_distance in ("half", "full"), "half or full"),
                "few_shot_window_aggregation": (
                    self.few_shot_window_aggregation in ("harmonic", "mean"),
                    "harmonic or mean",
                ),
                "patch_memory": (self.patch_memory in ("unprojected", "projected"), "unprojected or projected"),
                "map_max": (self.map_max in ("grid", "smoothed"), "grid or smoothed"),
            },
        )


class WinCLIP(Detector):
    """Zero-shot WinCLIP, or few-shot WinCLIP+ when ``fit`` is given reference images."""

    method_name = "winclip"
    config_class = WinCLIPConfig
    zero_shot = True
    few_shot = True
    cannot_export = None  # exports: export_spec()
    cannot_update = None  # update() with references (WinCLIP+): each scale's memory grows

    def __init__(
        self, config: WinCLIPConfig, *, weights_dir: str | os.PathLike | None = None, load_pretrained: bool = True
    ):
        super().__init__(config, weights_dir=weights_dir, load_pretrained=load_pretrained)
        self.clip = CLIPBackbone(
            config.backbone,
            config.pretrained if load_pretrained else None,
            image_size=config.image_size,
            resize_mode=config.resize_mode,
            weights_dir=weights_dir,
            method_hint="winclip",
            init_seed=config.seed,
        )
        grid = self.clip.grid
        for scale in config.scales:
            if scale > min(grid):
                raise ValueError(f"WinCLIP scale {scale} exceeds the {grid[0]}x{grid[1]} patch grid")
        self.windows = {scale: sliding_windows(grid, scale, config.window_stride) for scale in config.scales}
        self.prompt_set = prompt_set_of(config)
        # Few-shot memories: one per scale ("patch" and each window scale); empty until fit() gets references.
        self.memories = nn.ModuleDict(
            {"patch": NearestNeighbourMemory("cosine")}
            | {f"window{scale}": NearestNeighbourMemory("cosine") for scale in config.scales}
        )
        self.register_buffer("_few_shot", torch.tensor(False))

    @property
    def input_size(self) -> int:
        """CLIP's input side (``tiling=\"auto\"`` compares parts with it)."""
        return self.clip.image_size

    @classmethod
    def required_weights(cls, config: WinCLIPConfig) -> list[str]:
        return clip_weights_of(config)

    # ------------------------------------------------------------------ features
    def _features(self, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
        """Global embeddings ``(B, E)``, normalised patch tokens ``(B, N, E)`` (``(B, N, C)`` unprojected), window
        embeddings per scale."""
        return self._features_of(self.clip.preprocess(images))

    def _features_of(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
        """:meth:`_features` of the normalised ``(B, 3, S, S)`` model input."""
        features = self.clip.encode_image(pixels, layers=[self.config.patch_layer], with_embedded=True)
        projection = self.config.patch_memory == "projected"
        patches = F.normalize(self.clip.project(features.layer_tokens[0], projection), dim=-1)
        windows = {
            scale: self.clip.window_embeddings(features.embedded, index, self.config.window_tokens_per_call)
            for scale, index in self.windows.items()
        }
        return features.embedding, patches, windows

    @property
    def _class_name(self) -> str:
        return class_name_of(self)

    # ------------------------------------------------------------------ detector hooks
    def _encode_references(self, reference_images: list[np.ndarray]) -> list[dict[str, torch.Tensor]]:
        """Per reference: its patch tokens ``(N, C)`` and window embeddings ``(W_s, C)`` per scale."""
        encoded = []
        for start in range(0, len(reference_images), self.config.batch_size):
            _, patches, windows = self._features(reference_images[start : start + self.config.batch_size])
            for index in range(patches.shape[0]):
                encoded.append({"patch": patches[index], **{f"window{s}": w[index] for s, w in windows.items()}})
        return encoded

    def _fit_encoded(self, encoded: list[dict[str, torch.Tensor]], class_name: str | None) -> None:
        check_shots("WinCLIP", self.config.shots, encoded)
        self._text_embeddings()  # encode (and cache) the prompts now
        self._few_shot.fill_(bool(encoded))
        for name, memory in self.memories.items():
            if encoded:
                memory.fit(torch.cat([item[name] for item in encoded]),
                           owners=self._row_owners([item[name].shape[0] for item in encoded]))  # fmt: skip
            else:
                memory.clear()

    def _reference_memories(self) -> list[NearestNeighbourMemory]:
        return list(self.memories.values())

    def _extend_encoded(self, encoded: list[dict[str, torch.Tensor]], max_memory: int | None) -> dict[str, Any]:
        if not bool(self._few_shot):
            raise ValueError("WinCLIP was fitted zero-shot: it keeps no references to add to (fit it with references "
                             "for WinCLIP+)")  # fmt: skip
        return {name: memory.extend(torch.cat([item[name] for item in encoded]), max_memory)
                for name, memory in self.memories.items()}  # fmt: skip

    def _text_embeddings(self) -> torch.Tensor:
        """``(2, E)`` normal and anomalous ensemble embeddings of the class (cached by the backbone)."""
        normalise_prompts = self.config.prompt_normalisation == "per_prompt"
        return self.clip.text_embeddings(self._class_name, self.prompt_set, normalise_prompts)

    def _to_map(self, patch_scores: torch.Tensor) -> torch.Tensor:
        """``(B, N)`` patch scores to the smoothed ``(B, S, S)`` map at the model's input size."""
        return self.clip.patch_scores_to_map(patch_scores, self.config.smoothing_sigma)

    def _map_max(self, patch_scores: torch.Tensor, anomaly_map: torch.Tensor) -> torch.Tensor:
        """``(B,)`` maximum of a map, on its ``(B, N)`` patch grid or its ``(B, S, S)`` smoothed form (``map_max``)."""
        return patch_scores.amax(1) if self.config.map_max == "grid" else anomaly_map.flatten(1).amax(1)

    def _predict_batch(self, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        with self.timed("clip"):
            pixels = self.clip.preprocess(images)
        return self._predict_pixels(pixels)

    def export_spec(self) -> ExportSpec:
        """The graph ``anomalens export`` writes: the image side (window passes, memories) on the normalised
        ``(B, 3, S, S)`` input; the class's text embeddings, encoded now, are constants."""
        with torch.inference_mode():
            self._text_embeddings()  # encode (and cache) the prompts, so the graph holds them as constants
        mean, std = (self.clip.mean.flatten().tolist(), self.clip.std.flatten().tolist())
        return ExportSpec(graph=PixelsGraph(self, self._predict_pixels), input_size=self.clip.image_size,
                          resize="bicubic", resize_mode=self.config.resize_mode, mean=mean, std=std)  # fmt: skip

    def _predict_pixels(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores ``(B,)`` and maps ``(B, S, S)`` of the normalised ``(B, 3, S, S)`` model input."""
        config = self.config
        with self.timed("clip"):
            embedding, patches, windows = self._features_of(pixels)
        batch, count, _ = patches.shape
        with self.timed("text_encoder"):
            text = self._text_embeddings()
        global_probability = self.clip.anomaly_probability(embedding, text, config.temperature)  # (B,)
        scale_scores = [global_probability[:, None].expand(batch, count)]
        for scale, window_embeddings in windows.items():
            window_probability = self.clip.anomaly_probability(window_embeddings, text, config.temperature)  # (B, W)
            scale_scores.append(harmonic_window_aggregation(window_probability, self.windows[scale], count))
        language_scores = _combine_scales(torch.stack(scale_scores), config.scale_aggregation)  # (B, N)
        language_map = self._to_map(language_scores)
        zero_shot_score = global_probability
        if config.zero_shot_image_score == "global_and_map_max":
            zero_shot_score = (global_probability + self._map_max(language_scores, language_map)) / 2
        if not bool(self._few_shot):
            return zero_shot_score, language_map
        harmonic = config.few_shot_window_aggregation == "harmonic"
        spread = harmonic_window_aggregation if harmonic else _mean_window_aggregation
        with self.timed("memory_search"):
            visual_scores = [self.memories["patch"].search(patches.flatten(0, 1))[0].reshape(batch, count)]
            for scale, window_embeddings in windows.items():
                distances = self.memories[f"window{scale}"].search(window_embeddings.flatten(0, 1))[0]
                visual_scores.append(spread(distances.reshape(batch, -1), self.windows[scale], count))
        visual_patch_scores = torch.stack(visual_scores).mean(0)  # (B, N), 1 - max cos
        if config.visual_distance == "half":
            visual_patch_scores = visual_patch_scores / 2
        visual_map = self._to_map(visual_patch_scores)
        score = (zero_shot_score + self._map_max(visual_patch_scores, visual_map)) / 2
        return score, (language_map + visual_map) / 2

    def _map_to_image(self, anomaly_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.clip.restore_map(anomaly_map, size)


def _mean_window_aggregation(window_scores: torch.Tensor, windows: torch.Tensor, num_patches: int) -> torch.Tensor:
    """``(B, W)`` window scores to ``(B, N)`` patch scores: the mean over the windows covering each patch."""
    incidence = window_incidence(windows.to(window_scores.device), num_patches, window_scores.dtype)  # (W, N)
    return (window_scores @ incidence) / incidence.sum(0).clamp_min(1.0)


def _combine_scales(scale_scores: torch.Tensor, aggregation: str) -> torch.Tensor:
    """``(S, B, N)`` per-scale patch scores to ``(B, N)``: their arithmetic ("mean") or "harmonic" mean."""
    if aggregation == "mean":
        return scale_scores.mean(0)
    return scale_scores.shape[0] / (1.0 / scale_scores.clamp_min(1e-12)).sum(0)
