"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

1. Features: two mid-level stages of a frozen CNN; each is averaged over a ``neighbourhood`` x
   ``neighbourhood`` window (local aggregation; the zero padding at the border counts, as in the authors' code
   and anomalib), the deeper one is upsampled (bilinearly) to the shallower one's grid, the two are concatenated
   and averaged down to ``feature_dim`` channels.
2. Memory: every patch feature of the reference images, reduced to a greedy k-center coreset
   (computed on a random projection) of ``coreset_ratio`` of them.
3. Scoring: a patch's score is its Euclidean distance to the nearest memory entry; the patch map is
   upsampled to ``image_size``, Gaussian-smoothed (``smoothing_sigma``). The image score is the paper's
   Eq. 7: the largest patch score ``s*``, re-weighted by ``1 - softmax`` of the distances from that patch to
   the ``num_neighbours`` memory entries nearest its own nearest entry ``m*`` (the first being ``m*``), so a
   patch whose neighbourhood in memory is sparse counts more.

``compat`` chooses every scoring detail at once: "paper" (the paper, and its authors' code where the paper is
silent) or "anomalib" (anomalib 2.x's ``PatchcoreModel`` output for output). Each detail is also a field of
its own, which overrides the preset:

=====================  ===========================  ======================  =============================
field                  "paper"                      "anomalib"              former anomalens
=====================  ===========================  ======================  =============================
neighbourhood_padding  zeros (authors' code)        zeros                   exclude
feature_dim            1024 (authors' code)         0 (all 1536 channels)   1024
map_upsampling         bilinear (authors' code)     nearest                 bilinear
smoothing_border       reflect (scipy's default,    mirror (kornia's        nearest
                       the authors' code)           "reflect")
image_score            reweighted (Eq. 7)           reweighted              max (of the smoothed map)
distances              exact                        expansion               exact
smoothing_kernel       separable                    2d                      separable
=====================  ===========================  ======================  =============================

``distances`` and ``smoothing_kernel`` are arithmetic, not scoring rules. anomalib blurs with one 2-D
convolution: the same blur as two 1-D passes up to float32 rounding (~1e-4 at map values near 100). It computes
nearest-neighbour distances from the expansion ``|q|^2 - 2 q.m + |m|^2`` in float32, which cancels for near
neighbours beside large norms (about 1e-3 relative); "exact" recomputes the chosen neighbours' distances from
differences.

The authors' code reduces channels per layer before concatenating; ours averages the concatenation (the same
width, not the same values). Their released code takes the plain maximum as the image score; the paper's
Eq. 7 is what "paper" follows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from anomalens.backbones import FeatureBackbone, check_layers, get_backbone_spec
from anomalens.checks import check_options
from anomalens.config import DetectorConfig
from anomalens.detector import Detector
from anomalens.export import ExportSpec, PixelsGraph
from anomalens.io.images import images_to_tensor
from anomalens.nn.maps import BLUR_BORDERS, gaussian_blur
from anomalens.nn.memory import InvertedLists, MemoryUpdate, NearestNeighbourMemory

PATCHCORE_COMPAT = {  # the scoring details each compat preset sets (fields left None)
    "paper": {"neighbourhood_padding": "zeros", "feature_dim": 1024, "map_upsampling": "bilinear",
              "smoothing_border": "reflect", "image_score": "reweighted", "distances": "exact",
              "smoothing_kernel": "separable"},
    "anomalib": {"neighbourhood_padding": "zeros", "feature_dim": 0, "map_upsampling": "nearest",
                 "smoothing_border": "mirror", "image_score": "reweighted", "distances": "expansion",
                 "smoothing_kernel": "2d"},
}  # fmt: skip


@dataclass
class PatchCoreConfig(DetectorConfig):
    """Configuration of :class:`PatchCore` (batch size, seed, precision, smoothing: :class:`DetectorConfig`)."""

    method: ClassVar[str] = "patchcore"
    weight_fields: ClassVar[tuple[str, ...]] = ("pretrained",)
    saved_before_the_field: ClassVar[dict[str, Any]] = {
        "neighbourhood_padding": "exclude", "map_upsampling": "bilinear", "smoothing_border": "nearest",
        "image_score": "max",
    }  # fmt: skip

    backbone: str = "wide_resnet50_2"  # feature backbone; see anomalens.backbones.list_backbones()
    pretrained: str | None = "default"  # "default": the backbone's registered weights; a path; None: random init
    layers: tuple[str, ...] | None = None  # backbone stages to use; None = the backbone's two default stages
    image_size: int = 256  # images are resized to image_size x image_size before feature extraction
    neighbourhood: int = 3  # side of the local aggregation window (the paper's patch size p)
    coreset_ratio: float = 0.1  # share of reference patch features kept in the memory bank (1.0 keeps all)
    coreset_projection_dim: int = 128  # random projection width used by the greedy coreset search
    num_neighbours: int = 9  # memory entries around m* in the Eq. 7 re-weighting (the paper's b; anomalib's 9)
    compat: str = "paper"  # every scoring detail below at once: "paper" or "anomalib" (see the module docstring)
    neighbourhood_padding: str | None = None  # "zeros": the window's zero padding counts; "exclude": only real
    # cells are averaged; None: compat's
    feature_dim: int | None = None  # channels the concatenation is averaged down to (never up); 0: all; None:
    # compat's (paper 1024, anomalib all)
    map_upsampling: str | None = None  # patch map to image_size: "bilinear" or "nearest"; None: compat's
    smoothing_border: str | None = None  # Gaussian smoothing's border, scipy's names: "reflect", "mirror" or
    # "nearest"; None: compat's
    image_score: str | None = None  # "reweighted" (Eq. 7, on the raw patch scores) or "max" (of the smoothed
    # map); None: compat's
    distances: str | None = None  # float32 arithmetic of nearest-neighbour distances: "exact" (norms of
    # differences) or "expansion" (|q|^2 - 2 q.m + |m|^2, anomalib's: ~1e-3 relative error for near neighbours)
    smoothing_kernel: str | None = None  # "separable" (two 1-D passes) or "2d" (one pass with the outer product,
    # anomalib's: the same blur up to float32 rounding); None: compat's
    search: str = "exact"  # nearest-neighbour search of the patches: "exact", or "approximate": inverted lists
    # (k-means clusters of the memory, the nearest search_probes of them searched; recall and metrics in
    # benchmarks/results/approximate-search-bottle.md)
    search_lists: int = 0  # clusters of the approximate search; 0: round(sqrt(memory entries))
    search_probes: int = 8  # clusters searched per patch by the approximate search

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.compat not in PATCHCORE_COMPAT:
            raise ValueError(f"unknown patchcore compat {self.compat!r}; valid: {', '.join(PATCHCORE_COMPAT)}")
        for name, value in PATCHCORE_COMPAT[self.compat].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.layers = check_layers(self.backbone, self.layers)
        check_options(
            self.method,
            self,
            {
                "image_size": (self.image_size >= 16, ">= 16"),
                "neighbourhood": (self.neighbourhood >= 1 and self.neighbourhood % 2 == 1, "an odd integer >= 1"),
                "feature_dim": (self.feature_dim >= 0, ">= 0 (0 keeps all channels)"),
                "coreset_ratio": (0.0 < self.coreset_ratio <= 1.0, "in (0, 1]"),
                "coreset_projection_dim": (self.coreset_projection_dim >= 1, ">= 1"),
                "num_neighbours": (self.num_neighbours >= 1, ">= 1"),
                "neighbourhood_padding": (self.neighbourhood_padding in ("zeros", "exclude"), "zeros or exclude"),
                "map_upsampling": (self.map_upsampling in ("bilinear", "nearest"), "bilinear or nearest"),
                "smoothing_border": (self.smoothing_border in BLUR_BORDERS, f"one of {', '.join(BLUR_BORDERS)}"),
                "image_score": (self.image_score in ("reweighted", "max"), "reweighted or max"),
                "distances": (self.distances in ("exact", "expansion"), "exact or expansion"),
                "smoothing_kernel": (self.smoothing_kernel in ("separable", "2d"), "separable or 2d"),
                "search": (self.search in ("exact", "approximate"), "exact or approximate"),
                "search_lists": (self.search_lists >= 0, ">= 0 (0: the square root of the memory's size)"),
                "search_probes": (self.search_probes >= 1, ">= 1"),
            },
        )


class PatchCore(Detector):
    """Few-shot / full-shot PatchCore. ``fit`` needs at least one normal reference image."""

    method_name = "patchcore"
    config_class = PatchCoreConfig
    zero_shot = False
    few_shot = True
    cannot_export = None  # exports: export_spec()
    cannot_update = None  # update(): the memory grows beyond its coverage radius

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
        with_padding = self.config.neighbourhood_padding == "zeros"
        aggregated = [
            F.avg_pool2d(feature, size, stride=1, padding=size // 2, count_include_pad=with_padding) for feature in maps
        ]
        grid = aggregated[0].shape[-2:]
        aligned = [
            feature
            if feature.shape[-2:] == grid
            else F.interpolate(feature, size=grid, mode="bilinear", align_corners=False)
            for feature in aggregated
        ]
        features = torch.cat(aligned, dim=1).permute(0, 2, 3, 1)  # (B, h, w, C)
        if 0 < self.config.feature_dim < features.shape[-1]:
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
            owners=self._row_owners([item.shape[0] * item.shape[1] for item in encoded]),
        )

    def _reference_memories(self) -> list[NearestNeighbourMemory]:
        return [self.memory]

    def _extend_encoded(self, encoded: list[torch.Tensor], max_memory: int | None) -> dict[str, MemoryUpdate]:
        features = torch.stack(encoded)
        return {"memory": self.memory.extend(features.reshape(-1, features.shape[-1]), max_memory)}

    def _predict_batch(self, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        with self.timed("image_encoder"):
            features = self._embed_arrays(images)
        return self._score_features(features)

    def export_spec(self) -> ExportSpec:
        """The graph ``anomalens export`` writes: ``(B, 3, S, S)`` images in [0, 1] (the backbone normalises them
        itself) to maps and scores, the memory bank a constant searched by chunked matmul + top-k."""
        return ExportSpec(graph=PixelsGraph(self, lambda pixels: self._score_features(self.embed(pixels))),
                          input_size=self.config.image_size, resize="bilinear")  # fmt: skip

    def _score_features(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores ``(B,)`` and maps ``(B, S, S)`` of ``(B, h, w, D)`` patch features."""
        batch, height, width, channels = features.shape
        with self.timed("memory_search"):
            exact = self.config.distances == "exact"
            approximate = InvertedLists(self.config.search_lists, self.config.search_probes, seed=self.config.seed) \
                if self.config.search == "approximate" else None  # fmt: skip
            distances, indices = self.memory.search(features.reshape(-1, channels), k=1, exact=exact,
                                                    approximate=approximate)  # fmt: skip
        with self.timed("post_processing"):
            patch_scores = distances[:, 0].reshape(batch, 1, height, width)
            size, mode = self.config.image_size, self.config.map_upsampling
            corners = {"align_corners": False} if mode == "bilinear" else {}
            maps = F.interpolate(patch_scores, size=(size, size), mode=mode, **corners)[:, 0]
            separable = self.config.smoothing_kernel == "separable"
            maps = gaussian_blur(
                maps, self.config.smoothing_sigma, border=self.config.smoothing_border, separable=separable
            )
        if self.config.image_score == "max":
            return maps.flatten(1).amax(1), maps
        with self.timed("memory_search"):
            scores = reweighted_scores(
                patch_scores.reshape(batch, -1),
                indices[:, 0].reshape(batch, -1),
                features.reshape(batch, height * width, channels),
                self.memory,
                self.config.num_neighbours,
                exact=exact,
            )
        return scores, maps


def reweighted_scores(
    patch_scores: torch.Tensor,
    nearest: torch.Tensor,
    features: torch.Tensor,
    memory: NearestNeighbourMemory,
    num_neighbours: int,
    exact: bool = True,
) -> torch.Tensor:
    """PatchCore's image score (the paper's Eq. 7).

    For each image, the patch with the largest score ``s*`` (its feature ``m_test*``, its nearest memory entry
    ``m*``) gives ``s = (1 - softmax(d)[0]) * s*``, where ``d`` are the distances from ``m_test*`` to the
    ``num_neighbours`` memory entries nearest ``m*`` (``m*`` itself first, so ``d[0] = s*``).

    Args:
        patch_scores: ``(B, P)`` nearest-neighbour distances of each image's patches.
        nearest: ``(B, P)`` index of each patch's nearest memory entry.
        features: ``(B, P, D)`` the patches' features.
        memory: The fitted memory bank.
        num_neighbours: ``b``, at most the memory's size.
        exact: Distances as norms of differences; ``False``: from the float32 expansion (anomalib's arithmetic,
            see :meth:`NearestNeighbourMemory.search`).

    Returns:
        ``(B,)`` image scores.
    """
    batch = torch.arange(patch_scores.shape[0], device=patch_scores.device)
    worst = patch_scores.argmax(1)
    worst_score = patch_scores[batch, worst]
    worst_feature = features[batch, worst].float()  # m_test*
    anchor = memory.bank[nearest[batch, worst].to(memory.bank.device)]  # m*
    _, support = memory.search(anchor, k=min(num_neighbours, len(memory)), exact=exact)  # (B, b), m* first
    query, neighbours = worst_feature[:, None, :].to(memory.bank.device), memory.bank[support]  # (B, 1, D), (B, b, D)
    if exact:
        distances = (query - neighbours).norm(dim=-1)
    else:
        products = (query @ neighbours.transpose(1, 2))[:, 0] * -2.0
        distances = (products + query.pow(2).sum(-1) + neighbours.pow(2).sum(-1)).clamp_min(0.0).sqrt()
    weights = 1.0 - torch.softmax(distances, dim=1)[:, 0]
    return weights.to(worst_score.device) * worst_score
