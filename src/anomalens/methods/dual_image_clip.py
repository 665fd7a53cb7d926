"""Dual-Image Enhanced CLIP (Zhang, Deng, Bao and Li, 2024): zero-shot, with test images as each other's
visual references and test-time adaptation on synthesised anomalies.

1. Language map: v-v attention tokens (CLIP Surgery style, :func:`~anomalens.backbones.clip.add_vv_attention`)
   of the blocks in ``layers``, projected into the joint space, are compared with the normal and anomalous
   prompt-ensemble embeddings; the softmax gives each patch an anomaly probability, averaged over layers.
   The image-level language score is the global embedding's anomaly probability.
2. Dual-image visual map: the images of one ``predict`` call form the pool (``predict`` and the batch commands
   draw pools from a seeded shuffle of their input, :func:`anomalens.detector.pool_order`, so that a pool is not
   one defect type of a sorted folder). Mutual pairing (see :func:`pair_partners`) gives every image at least
   ``partners`` others, deterministically under ``seed``. A patch's
   visual score is the cosine distance from its token to the nearest patch token of a partner, per layer,
   averaged over layers; across partners the minimum is kept, so a defect in one partner cannot leak into
   the query. Reference images given to ``fit`` join every image's partners; a single image with no
   references cannot be scored.
3. Joint map: ``language_weight * language + (1 - language_weight) * visual``, upsampled and smoothed.
   Image score: the mean of the language score and the joint map's maximum.
4. Test-time adaptation (``tta``): a linear adapter on the projected tokens (initialised to the identity)
   is trained for ``tta_steps`` steps on the pool itself. On the real images the adapted tokens' language scores
   follow the zero-shot joint map (soft pseudo-labels, BCE). Pseudo-anomalies (Perlin-shaped regions of
   texture, ``tta_textures``, pasted into a ``tta_pseudo_share`` of the pool's images,
   :mod:`anomalens.methods.synthesis`) are trained towards their masks (BCE + dice): with
   ``tta_objective="paper"`` the prediction is each one's joint score against its own clean original, both
   through the adapter (the paper compares pseudo-anomalous samples with their originals; weighing the two
   parts by ``language_weight`` is our guess), with ``"language"`` its language score alone. The adapted tokens
   give a refined language map (and with "paper" a refined visual map), and the joint map is rebuilt with them.
   With ``tta=False`` the output is exactly the zero-shot joint map.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anomalens.backbones.clip import RESIZE_MODES, CLIPBackbone
from anomalens.checks import check_options
from anomalens.detector import Detector
from anomalens.methods.clip_base import CLIPConfig, class_name_of, clip_weights_of, prompt_set_of
from anomalens.methods.synthesis import synthesize_anomaly, texture_files, texture_from_file
from anomalens.nn.losses import dice_loss
from anomalens.nn.memory import NearestNeighbourMemory
from anomalens.nn.state import ResizableBuffers


@dataclass
class DualImageCLIPConfig(CLIPConfig):
    """Configuration of :class:`DualImageCLIP` (common CLIP fields: :class:`.clip_base.CLIPConfig`)."""

    method: ClassVar[str] = "dual_image_clip"
    saved_before_the_field: ClassVar[dict[str, Any]] = {"pairing": "ring", "tta_objective": "language",
                                                        "tta_textures": "pool"}  # fmt: skip

    batch_size: int = 16  # images scored together as one pool by predict and the batch commands
    layers: tuple[int, ...] = (-13, -7, -1)  # blocks (negative: from the end) whose v-v tokens are used
    partners: int = 1  # r: partners per image within the pool (the paper's base case is 1)
    pairing: str = "mutual"  # "mutual": groups of r + 1 images are each other's partners; "ring": each image's
    # partners are the next r on a seeded ring (not mutual; anomalens before 2026-12)
    language_weight: float = 0.5  # weight of the language map in the joint map; the visual map gets the rest
    tta: bool = True  # test-time adaptation on the pool's images and synthesised anomalies
    tta_steps: int = 10  # adapter optimisation steps per pool
    tta_lr: float = 1e-3  # Adam learning rate of the adapter
    tta_pseudo_share: float = 0.5  # share of the pool's images turned into pseudo-anomalies for TTA
    tta_alignment_weight: float = 1.0  # weight of the alignment to the zero-shot pseudo-labels in the TTA loss
    tta_objective: str = "paper"  # "paper": a pseudo-anomaly's predicted mask is its joint score against its
    # clean original (adapted tokens of both); "language": its adapted tokens' text similarity alone
    tta_textures: str = "procedural"  # pseudo-anomaly texture: "procedural" (augmented Perlin noise), "pool"
    # (shuffled tiles of another pool image, not augmented), or a folder of texture images (e.g. DTD), augmented
    image_size: int | None = None  # model input side; None = the model's own (336 for ViT-L-14-336)
    resize_mode: str = "resize"  # "resize" (squash to square) or "crop" (centre crop; map placed back in the crop)
    forward_batch_size: int = 4  # images per backbone forward pass

    def __post_init__(self) -> None:
        super().__post_init__()
        self.layers = tuple(int(layer) for layer in self.layers)
        check_options(
            self.method,
            self,
            {
                "layers": (bool(self.layers), "one or more block indices"),
                "partners": (self.partners >= 1, ">= 1"),
                "language_weight": (0.0 <= self.language_weight <= 1.0, "in [0, 1]"),
                "tta_steps": (self.tta_steps >= 0, ">= 0"),
                "tta_lr": (self.tta_lr > 0, "> 0"),
                "tta_pseudo_share": (0.0 < self.tta_pseudo_share <= 1.0, "in (0, 1]"),
                "resize_mode": (self.resize_mode in RESIZE_MODES, f"one of {', '.join(RESIZE_MODES)}"),
                "forward_batch_size": (self.forward_batch_size >= 1, ">= 1"),
                "pairing": (self.pairing in ("mutual", "ring"), "mutual or ring"),
                "tta_objective": (self.tta_objective in ("paper", "language"), "paper or language"),
            },
        )
        if self.tta_textures not in ("procedural", "pool"):
            texture_files(self.tta_textures)  # a folder: fails now, naming it, if it is not one or holds no image


def pair_partners(count: int, partners: int, seed: int) -> list[list[int]]:
    """Deterministic, mutual pairing of a pool of ``count`` images.

    A seeded permutation is cut into groups of ``r + 1`` consecutive images (``r = min(partners, count - 1)``);
    the last group takes the images left over, so no group is smaller. An image's partners are the other members
    of its group: every image has at least ``r`` partners, and the relation is mutual (``a`` is ``b``'s partner
    exactly when ``b`` is ``a``'s), as in the paper, where the two images of a pair are each other's reference.

    Raises:
        ValueError: Fewer than two images.
    """
    if count < 2:
        raise ValueError(f"pairing needs at least two images, got {count}")
    order = np.random.default_rng(seed).permutation(count).tolist()
    size = min(partners, count - 1) + 1
    groups = [order[start : start + size] for start in range(0, count - count % size, size)]
    groups[-1].extend(order[count - count % size :])  # the remainder joins the last group
    pairs: list[list[int]] = [[] for _ in range(count)]
    for group in groups:
        for image in group:
            pairs[image] = [mate for mate in group if mate != image]
    return pairs


def ring_partners(count: int, partners: int, seed: int) -> list[list[int]]:
    """The former pairing (``pairing="ring"``): a seeded permutation puts the images on a ring and each image's
    partners are the next ``r`` on it. Each image has ``r`` partners and serves ``r`` times, but ``a`` can be
    ``b``'s partner without ``b`` being ``a``'s."""
    if count < 2:
        raise ValueError(f"pairing needs at least two images, got {count}")
    ring = np.random.default_rng(seed).permutation(count)
    position = np.empty(count, dtype=np.int64)
    position[ring] = np.arange(count)
    r = min(partners, count - 1)
    return [[int(ring[(position[image] + step) % count]) for step in range(1, r + 1)] for image in range(count)]


def content_order(batch: torch.Tensor) -> torch.Tensor:
    """``(B,)`` indices ordering a batch ``(B, ...)`` by its content (sum, then sum of cubes), not by position."""
    values = batch.detach().flatten(1).double()
    key = values.sum(1) + 1e-3 * values.pow(3).sum(1)
    return torch.argsort(key, stable=True).cpu()


class DualImageCLIP(ResizableBuffers, Detector):
    """Zero-shot: scores the images of one ``predict`` call against each other (optionally plus references)."""

    method_name = "dual_image_clip"
    config_class = DualImageCLIPConfig
    zero_shot = True
    few_shot = True
    pooled = True
    cannot_export = ("its images are scored against each other in pools of variable size, and its test-time "
                     "adaptation takes gradient steps on every pool")
    cannot_update = "it is zero-shot: each pool of test images is its own reference, there is no memory"
    resizable_buffers = ("reference_tokens",)

    def __init__(
        self, config: DualImageCLIPConfig, *, weights_dir: str | os.PathLike | None = None, load_pretrained: bool = True
    ):
        super().__init__(config, weights_dir=weights_dir, load_pretrained=load_pretrained)
        probe = CLIPBackbone.depth_of(config.backbone)
        self.layer_indices = sorted({layer % probe for layer in config.layers})
        self.clip = CLIPBackbone(
            config.backbone,
            config.pretrained if load_pretrained else None,
            image_size=config.image_size,
            resize_mode=config.resize_mode,
            vv_layers=probe - self.layer_indices[0],
            weights_dir=weights_dir,
            method_hint="dual_image_clip",
            init_seed=config.seed,
        )
        self.prompt_set = prompt_set_of(config)
        width = self.clip.embed_dim
        self.adapter = nn.Linear(width, width)
        self._reset_adapter()
        # Optional references from fit(): (R, layers, N, E) normalised projected v-v tokens.
        self.register_buffer("reference_tokens", torch.empty(0, 0, 0, 0))

    @property
    def input_size(self) -> int:
        """CLIP's input side (``tiling=\"auto\"`` compares parts with it)."""
        return self.clip.image_size

    @classmethod
    def required_weights(cls, config: DualImageCLIPConfig) -> list[str]:
        return clip_weights_of(config)

    def _reset_adapter(self) -> None:
        with torch.no_grad():
            self.adapter.weight.copy_(torch.eye(self.adapter.in_features))
            self.adapter.bias.zero_()

    @property
    def _class_name(self) -> str:
        return class_name_of(self)

    # ------------------------------------------------------------------ features
    def _tokens(self, pixels: torch.Tensor, stage: str | None = "image_encoder") -> tuple[torch.Tensor, torch.Tensor]:
        """Global embeddings ``(B, E)`` and normalised projected v-v tokens ``(B, L, N, E)``.

        ``stage`` names the timer the forward passes count towards (``None``: the caller's own).
        """
        embeddings, tokens = [], []
        for start in range(0, pixels.shape[0], self.config.forward_batch_size):
            chunk = pixels[start : start + self.config.forward_batch_size]
            if stage is None:
                features = self.clip.encode_image(chunk)
            else:
                with self.timed(stage):
                    features = self.clip.encode_image(chunk)
            layer_tokens = [self.clip.project(features.vv_tokens[index]) for index in self.layer_indices]
            embeddings.append(features.embedding)
            tokens.append(F.normalize(torch.stack(layer_tokens, dim=1), dim=-1))
        return torch.cat(embeddings), torch.cat(tokens)

    def _language_patch_scores(self, tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``(B, L, N, E)`` tokens -> ``(B, N)`` anomaly probability, averaged over layers."""
        return self.clip.anomaly_probability(tokens, text, self.config.temperature).mean(1)

    def _visual_patch_scores(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, L, N, E)`` pool tokens -> ``(B, N)`` min over partners of the layer-mean NN cosine distance."""
        count = tokens.shape[0]
        references = self.reference_tokens if self.reference_tokens.numel() else tokens.new_empty(0, *tokens.shape[1:])
        # Partners are drawn over the images ranked by content, so the pool scores the same in any order.
        order = content_order(tokens).tolist()
        pairing = pair_partners if self.config.pairing == "mutual" else ring_partners
        ranked_pairs = pairing(count, self.config.partners, self.config.seed) if count > 1 else [[]]
        pairs = [[] for _ in range(count)]
        for rank, image in enumerate(order):
            pairs[image] = [order[partner] for partner in ranked_pairs[rank]]
        scores = []
        with self.timed("memory_search"):
            for image in range(count):
                partner_tokens = [tokens[p] for p in pairs[image]] + list(references)
                per_partner = []
                for partner in partner_tokens:
                    per_layer = [
                        NearestNeighbourMemory("cosine").fit(partner[layer]).search(tokens[image, layer])[0][:, 0]
                        for layer in range(tokens.shape[1])
                    ]
                    per_partner.append(torch.stack(per_layer).mean(0))
                scores.append(torch.stack(per_partner).amin(0))
        return torch.stack(scores)

    # ------------------------------------------------------------------ detector hooks
    def _encode_references(self, reference_images: list[np.ndarray]) -> list[torch.Tensor]:
        """Per reference: its patch tokens of every chosen layer."""
        if not reference_images:
            return []
        _, tokens = self._tokens(self.clip.preprocess(reference_images))
        return [tokens[index] for index in range(tokens.shape[0])]

    def _fit_encoded(self, encoded: list[torch.Tensor], class_name: str | None) -> None:
        with self.timed("text_encoder"):
            self.clip.text_embeddings(self._class_name, self.prompt_set)
        if encoded:
            self.reference_tokens = torch.stack(encoded)
        else:
            self.reference_tokens = self.reference_tokens.new_empty(0, 0, 0, 0)

    def _predict_batch(self, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        if len(images) < 2 and not self.reference_tokens.numel():
            raise ValueError(
                "dual_image_clip scores images against each other: give at least two images to predict(), "
                "or one or more reference images to fit()"
            )
        with self.timed("text_encoder"):
            text = self.clip.text_embeddings(self._class_name, self.prompt_set)
        pixels = self.clip.preprocess(images)
        embeddings, tokens = self._tokens(pixels)
        language_score = self.clip.anomaly_probability(embeddings, text, self.config.temperature)
        language = self._language_patch_scores(tokens, text)
        visual = self._visual_patch_scores(tokens)
        weight = self.config.language_weight
        joint = weight * language + (1 - weight) * visual
        if self.config.tta and self.config.tta_steps > 0:
            with self.timed("tta"):
                language, adapted_visual = self._adapt(pixels, tokens, joint, text)
            if adapted_visual is not None:
                visual = adapted_visual
            joint = weight * language + (1 - weight) * visual
        with self.timed("post_processing"):
            maps = self.clip.patch_scores_to_map(joint, self.config.smoothing_sigma)
            scores = (language_score + maps.flatten(1).amax(1)) / 2
        return scores, maps

    def _map_to_image(self, anomaly_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.clip.restore_map(anomaly_map, size)

    # ------------------------------------------------------------------ test-time adaptation
    def pseudo_anomalies(
        self, pixels01: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Synthesise pseudo-anomalies from a ``tta_pseudo_share`` of ``(B, 3, S, S)`` images in [0, 1].

        The texture follows ``tta_textures``: augmented procedural noise, an augmented crop of a random image of
        the texture folder, or (``"pool"``) shuffled tiles of the next image of the pool.

        Returns:
            Images ``(P, 3, S, S)`` in [0, 1], masks ``(P, S, S)`` in {0, 1}, and ``(P,)`` the index in
            ``pixels01`` of each one's clean original; ``P = ceil(share * B)``.
        """
        count, _, height, width = pixels01.shape
        chosen = torch.randperm(count, generator=generator)[
            : max(1, int(np.ceil(self.config.tta_pseudo_share * count)))
        ]
        textures = self.config.tta_textures
        files = texture_files(textures) if textures not in ("procedural", "pool") else []
        images, masks = [], []
        for index in chosen.tolist():
            if textures == "pool":
                source = pixels01[(index + 1) % count] if count > 1 else None
                image, mask = synthesize_anomaly(pixels01[index], generator, texture_source=source)
            elif files:
                path = files[int(torch.randint(len(files), (1,), generator=generator))]
                texture = texture_from_file(path, (height, width), generator)
                image, mask = synthesize_anomaly(pixels01[index], generator, texture=texture, augment=True)
            else:
                image, mask = synthesize_anomaly(pixels01[index], generator, augment=True)
            images.append(image)
            masks.append(mask)
        return torch.stack(images), torch.stack(masks), chosen

    def _joint_against(self, query: torch.Tensor, reference: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``(P, N)`` joint scores of ``(P, L, N, E)`` normalised tokens, each against its own ``(P, L, N, E)``
        reference image: the language score, and the layer-mean cosine distance to the reference's nearest patch
        (differentiable, for the TTA objective)."""
        language = self._language_patch_scores(query, text)
        visual = (1 - (query @ reference.transpose(-1, -2)).amax(-1)).mean(1)
        weight = self.config.language_weight
        return weight * language + (1 - weight) * visual

    def _adapt(
        self, pixels: torch.Tensor, tokens: torch.Tensor, joint: torch.Tensor, text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Train the adapter on the pool; returns the refined ``(B, N)`` language scores, and with the paper's
        objective the ``(B, N)`` visual scores of the adapted tokens (else ``None``).

        The objective: on the real images, the adapted tokens' language scores follow the zero-shot joint map
        (BCE). On each pseudo-anomaly, the predicted mask is (``tta_objective="paper"``) its joint score against
        its clean original, both through the adapter, or (``"language"``) its language score alone; it is
        trained towards the synthetic mask (BCE + dice). All of it counts as the caller's "tta" stage.
        """
        generator = torch.Generator().manual_seed(self.config.seed)
        pixels01 = pixels * self.clip.std + self.clip.mean
        # Pick and pair the images to corrupt in an order given by their content, not their batch positions, so
        # that a pool scores the same in any order.
        order = content_order(pixels01)
        pseudo_images, pseudo_masks, chosen = self.pseudo_anomalies(pixels01[order].cpu(), generator)
        originals = order[chosen].to(tokens.device)  # batch index of each pseudo-anomaly's clean original
        _, pseudo_tokens = self._tokens((pseudo_images.to(pixels.device) - self.clip.mean) / self.clip.std, stage=None)
        height, width = self.clip.grid
        mask_targets = F.adaptive_avg_pool2d(pseudo_masks[:, None], (height, width)).flatten(1).to(pixels.device)
        self._reset_adapter()
        paper = self.config.tta_objective == "paper"
        with torch.inference_mode(False), torch.enable_grad():
            real, pseudo = tokens.clone(), pseudo_tokens.clone()  # leave inference mode: plain tensors
            targets, mask_targets, text = joint.clone(), mask_targets.clone(), text.clone()
            originals = originals.clone()
            optimiser = torch.optim.Adam(self.adapter.parameters(), lr=self.config.tta_lr)
            for _ in range(self.config.tta_steps):
                optimiser.zero_grad()
                adapted_real = F.normalize(self.adapter(real), dim=-1)
                adapted_pseudo = F.normalize(self.adapter(pseudo), dim=-1)
                real_scores = self._language_patch_scores(adapted_real, text)
                if paper:
                    pseudo_scores = self._joint_against(adapted_pseudo, adapted_real[originals], text)
                else:
                    pseudo_scores = self._language_patch_scores(adapted_pseudo, text)
                loss = F.binary_cross_entropy(pseudo_scores.clamp(1e-6, 1 - 1e-6), mask_targets)
                loss = loss + dice_loss(pseudo_scores, mask_targets)
                alignment = F.binary_cross_entropy(real_scores.clamp(1e-6, 1 - 1e-6), targets.clamp(0, 1))
                (loss + self.config.tta_alignment_weight * alignment).backward()
                optimiser.step()
            with torch.no_grad():
                adapted_real = F.normalize(self.adapter(real), dim=-1)
                refined = self._language_patch_scores(adapted_real, text)
        visual = self._visual_patch_scores(adapted_real.detach()) if paper else None
        return refined.detach(), visual
