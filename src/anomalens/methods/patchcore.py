"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

1. Features: two mid-level stages of a frozen CNN; each is averaged over a ``neighbourhood`` x
   ``neighbourhood`` window (local aggregation), the deeper one is upsampled to the shallower one's
   grid, the two are concatenated and averaged down to ``feature_dim`` channels.
2. Memory: every patch feature of the reference images, reduced to a greedy k-center coreset
   (computed on a random projection) of ``coreset_ratio`` of them.
3. Scoring: a patch's score is its Euclidean distance to the nearest memory entry; the patch map is
   upsampled to ``image_size``, Gaussian-smoothed (``smoothing_sigma``), and the image score is its maximum.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from anomalens.backbones import FeatureBackbone, check_layers, get_backbone_spec
from anomalens.config import DetectorConfig, check_options
from anomalens.detector import Detector
from anomalens.io.images import images_to_tensor
from anomalens.nn.maps import gaussian_blur
from anomalens.nn.memory import NearestNeighbourMemory


@dataclass
class PatchCoreConfig(DetectorConfig):
    """Configuration of :class:`PatchCore` (batch size, seed, precision, smoothing: :class:`DetectorConfig`)."""

    method: ClassVar[str] = "patchcore"
    weight_fields: ClassVar[tuple[str, ...]] = ("pretrained",)

    backbone: str = "wide_resnet50_2"  # feature backbone; see anomalens.backbones.list_backbones()
    pretrained: str | None = "default"  # "default": the backbone's registered weights; a path; None: random init
    layers: tuple[str, ...] | None = None  # backbone stages to use; None = the backbone's two default stages
    image_size: int = 256  # images are resized to image_size x image_size before feature extraction
    neighbourhood: int = 3  # side of the local aggregation window (the paper's patch size p)
    feature_dim: int = 1024  # channels the concatenated features are averaged down to (never up)
    coreset_ratio: float = 0.1  # share of reference patch features kept in the memory bank (1.0 keeps all)
    coreset_projection_dim: int = 128  # random projection width used by the greedy coreset search

    def __post_init__(self) -> None:
        super().__post_init__()
        self.layers = check_layers(self.backbone, self.layers)
        check_options(
            self.method,
            self,
            {
                "image_size": (self.image_size >= 16, ">= 16"),
                "neighbourhood": (self.neighbourhood >= 1 and self.neighbourhood % 2 == 1, "an odd integer >= 1"),
                "feature_dim": (self.feature_dim >= 1, ">= 1"),
                "coreset_ratio": (0.0 < self.coreset_ratio <= 1.0, "in (0, 1]"),
                "coreset_projection_dim": (self.coreset_projection_dim >= 1, ">= 1"),
            },
        )


class PatchCore(Detector):
    """Few-shot / full-shot PatchCore. ``fit`` needs at least one normal reference image."""

    method_name = "patchcore"
    config_class = PatchCoreConfig
    zero_shot = False
    few_shot = True

    def __init__(
        self,
        config: PatchCoreConfig,
        *,
        weights_dir: str | os.PathLike | None = None,
        load_pretrained: bool = True,
    ):
        super().__init__(config, weights_dir=weights_dir, load_pretrained=load_pretrained)
        self.backbone = FeatureBackbone(
            config.backbone,
            config.layers,
            pretrained=config.pretrained if load_pretrained else None,
            weights_dir=weights_dir,
            method_hint=f"patchcore --backbone {config.backbone}",
            init_seed=config.seed,
        )
        self.memory = NearestNeighbourMemory(metric="l2")

    @classmethod
    def required_weights(cls, config: PatchCoreConfig) -> list[str]:
        if config.pretrained is None:
            return []
        return [get_backbone_spec(config.backbone).weights if config.pretrained == "default" else config.pretrained]

    # ------------------------------------------------------------------ features
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Locally aware patch features.

        Args:
            images: ``(B, 3, S, S)`` in [0, 1], ``S = image_size``.

        Returns:
            ``(B, h, w, D)`` features on the shallowest layer's grid, ``D <= feature_dim``.
        """
        maps = self.backbone(images.to(self.device))
        size = self.config.neighbourhood
        aggregated = [
            F.avg_pool2d(feature, size, stride=1, padding=size // 2, count_include_pad=False) for feature in maps
        ]
        grid = aggregated[0].shape[-2:]
        aligned = [
            feature
            if feature.shape[-2:] == grid
            else F.interpolate(feature, size=grid, mode="bilinear", align_corners=False)
            for feature in aggregated
        ]
        features = torch.cat(aligned, dim=1).permute(0, 2, 3, 1)  # (B, h, w, C)
        if features.shape[-1] > self.config.feature_dim:
            batch, height, width, channels = features.shape
            flat = features.reshape(-1, 1, channels)
            features = F.adaptive_avg_pool1d(flat, self.config.feature_dim).reshape(batch, height, width, -1)
        return features.contiguous()

    def _embed_arrays(self, images: list[np.ndarray]) -> torch.Tensor:
        batches = []
        for start in range(0, len(images), self.config.batch_size):
            tensor = images_to_tensor(images[start : start + self.config.batch_size], self.config.image_size)
            batches.append(self.embed(tensor))
        return torch.cat(batches)

    # ------------------------------------------------------------------ detector hooks
    def _encode_references(self, reference_images: list[np.ndarray]) -> list[torch.Tensor]:
        return list(self._embed_arrays(reference_images))  # one (h, w, C) patch-feature grid per reference

    def _fit_encoded(self, encoded: list[torch.Tensor], class_name: str | None) -> None:
        features = torch.stack(encoded)
        generator = torch.Generator().manual_seed(self.config.seed)
        self.memory.fit(
            features.reshape(-1, features.shape[-1]),
            coreset_ratio=self.config.coreset_ratio,
            projection_dim=self.config.coreset_projection_dim,
            generator=generator,
        )

    def _predict_batch(self, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        with self.timed("image_encoder"):
            features = self._embed_arrays(images)
        batch, height, width, channels = features.shape
        with self.timed("memory_search"):
            distances, _ = self.memory.search(features.reshape(-1, channels), k=1)
        with self.timed("post_processing"):
            patch_scores = distances[:, 0].reshape(batch, 1, height, width)
            size = self.config.image_size
            maps = F.interpolate(patch_scores, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
            maps = gaussian_blur(maps, self.config.smoothing_sigma)
            scores = maps.flatten(1).amax(1)
        return scores, maps
