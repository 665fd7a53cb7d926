"""WinCLIP and WinCLIP+ (Jeong et al., "WinCLIP: Zero-/Few-Shot Anomaly Classification and Segmentation",
CVPR 2023).

Zero-shot (no references):
1. Text: the compositional prompt ensemble (state words x templates, :mod:`anomalens.backbones.prompts`) gives one
   normal and one anomalous embedding for the class, encoded once and cached.
2. Windows: for each scale s in ``scales`` (2 and 3 patches, stride 1), every s x s window of the patch grid
   is embedded alone: its patch tokens plus the class token go through the transformer (token gathering,
   batched over all windows), and the pooled output is projected into the joint space.
3. Each window's anomaly probability is the softmax over (normal, anomalous) text similarities at CLIP's
   temperature. A patch's score at a scale is the harmonic mean over the windows covering it. The image
   scale (the global embedding's probability) counts as one more scale; the map is the mean over scales,
   upsampled and Gaussian-smoothed.
4. Image score: the mean of the global probability and the map's maximum.

Few-shot, WinCLIP+ (1..k references): the reference images' patch tokens (block ``patch_layer``, projected)
and window embeddings at each scale form one cosine memory per scale. A query patch's or window's visual
score is ``1 - max cosine similarity`` to that scale's memory; window scores are spread to patches by the
mean over covering windows; the few-shot map is the mean over scales. The final map is the mean of the
language-guided and the few-shot map, and the image score is the mean of the zero-shot image score and the
few-shot map's maximum.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anomalens.backbones.clip import RESIZE_MODES, CLIPBackbone, harmonic_window_aggregation, sliding_windows
from anomalens.config import check_options
from anomalens.detector import Detector
from anomalens.methods.clip_base import CLIPConfig, check_shots, class_name_of, clip_weights_of, prompt_set_of
from anomalens.nn.memory import NearestNeighbourMemory


@dataclass
class WinCLIPConfig(CLIPConfig):
    """Configuration of :class:`WinCLIP` (common CLIP fields: :class:`~anomalens.methods.clip_base.CLIPConfig`)."""

    method: ClassVar[str] = "winclip"

    backbone: str = "ViT-B-16-plus-240"  # open_clip model name
    pretrained: str | None = "laion400m_e31"  # open_clip pretrained tag, a checkpoint path, or None (random init)
    shots: int | None = None  # 0 forces zero-shot, k >= 1 few-shot (fit needs references); None: as fit() is called
    scales: tuple[int, ...] = (2, 3)  # window sides in patches (stride 1); the image scale is always added
    image_size: int | None = None  # model input side; None = the model's own (240 for ViT-B-16-plus-240)
    resize_mode: str = "resize"  # "resize" (squash to square) or "crop" (centre crop; map placed back in the crop)
    patch_layer: int = -1  # block whose patch tokens form WinCLIP+'s patch-scale memory (-1 = last)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.scales = tuple(int(scale) for scale in self.scales)
        check_options(
            self.method,
            self,
            {
                "scales": (bool(self.scales) and all(scale >= 1 for scale in self.scales), "integers >= 1"),
                "shots": (self.shots is None or self.shots >= 0, ">= 0 or None"),
                "resize_mode": (self.resize_mode in RESIZE_MODES, f"one of {', '.join(RESIZE_MODES)}"),
            },
        )


class WinCLIP(Detector):
    """Zero-shot WinCLIP, or few-shot WinCLIP+ when ``fit`` is given reference images."""

    method_name = "winclip"
    config_class = WinCLIPConfig
    zero_shot = True
    few_shot = True

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
        self.windows = {scale: sliding_windows(grid, scale) for scale in config.scales}
        self.prompt_set = prompt_set_of(config)
        # Few-shot memories: one per scale ("patch" and each window scale); empty until fit() gets references.
        self.memories = nn.ModuleDict(
            {"patch": NearestNeighbourMemory("cosine")}
            | {f"window{scale}": NearestNeighbourMemory("cosine") for scale in config.scales}
        )
        self.register_buffer("_few_shot", torch.tensor(False))

    @classmethod
    def required_weights(cls, config: WinCLIPConfig) -> list[str]:
        return clip_weights_of(config)

    # ------------------------------------------------------------------ features
    def _features(self, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
        """Global embeddings ``(B, E)``, projected patch tokens ``(B, N, E)``, window embeddings per scale."""
        pixels = self.clip.preprocess(images)
        features = self.clip.encode_image(pixels, layers=[self.config.patch_layer], with_embedded=True)
        patches = F.normalize(self.clip.project(features.layer_tokens[0]), dim=-1)
        windows = {
            scale: self.clip.window_embeddings(features.embedded, index) for scale, index in self.windows.items()
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
        self.clip.text_embeddings(self._class_name, self.prompt_set)  # encode (and cache) the prompts now
        self._few_shot.fill_(bool(encoded))
        for name, memory in self.memories.items():
            if encoded:
                memory.fit(torch.cat([item[name] for item in encoded]))
            else:
                memory.clear()

    def _predict_batch(self, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        with self.timed("clip"):
            embedding, patches, windows = self._features(images)
        batch, count, _ = patches.shape
        with self.timed("text_encoder"):
            text = self.clip.text_embeddings(self._class_name, self.prompt_set)
        temperature = self.config.temperature
        global_probability = self.clip.anomaly_probability(embedding, text, temperature)  # (B,)
        scale_maps = [global_probability[:, None].expand(batch, count)]
        for scale, window_embeddings in windows.items():
            window_probability = self.clip.anomaly_probability(window_embeddings, text, temperature)  # (B, W)
            scale_maps.append(harmonic_window_aggregation(window_probability, self.windows[scale], count))
        language_map = self.clip.patch_scores_to_map(torch.stack(scale_maps).mean(0), self.config.smoothing_sigma)
        zero_shot_score = (global_probability + language_map.flatten(1).amax(1)) / 2
        if not bool(self._few_shot):
            return zero_shot_score, language_map
        with self.timed("memory_search"):
            visual_maps = [self.memories["patch"].search(patches.flatten(0, 1))[0].reshape(batch, count)]
            for scale, window_embeddings in windows.items():
                distances = self.memories[f"window{scale}"].search(window_embeddings.flatten(0, 1))[0]
                visual_maps.append(_mean_window_aggregation(distances.reshape(batch, -1), self.windows[scale], count))
        visual_map = self.clip.patch_scores_to_map(torch.stack(visual_maps).mean(0), self.config.smoothing_sigma)
        score = (zero_shot_score + visual_map.flatten(1).amax(1)) / 2
        return score, (language_map + visual_map) / 2

    def _map_to_image(self, anomaly_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.clip.restore_map(anomaly_map, size)


def _mean_window_aggregation(window_scores: torch.Tensor, windows: torch.Tensor, num_patches: int) -> torch.Tensor:
    """``(B, W)`` window scores to ``(B, N)`` patch scores: the mean over the windows covering each patch."""
    flat = windows.reshape(-1).to(window_scores.device)
    sums = torch.zeros(window_scores.shape[0], num_patches, dtype=window_scores.dtype, device=window_scores.device)
    sums.index_add_(1, flat, window_scores.repeat_interleave(windows.shape[1], dim=1))
    counts = torch.bincount(flat, minlength=num_patches).to(window_scores.dtype)
    return sums / counts.clamp_min(1.0)
