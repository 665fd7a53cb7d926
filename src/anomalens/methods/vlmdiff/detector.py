"""VLMDiff (Hicsonmez, Shabayek and Aouada, WACV 2026): caption-conditioned latent diffusion reconstructs
normal images; anomalies are where the input's features differ from its reconstruction's.

Model (:class:`VLMDiffNet`), as the authors' code (github giddyyupp/VLMDiff) builds it unless an option says
otherwise:

1. A latent autoencoder (:class:`LatentAutoencoder`): SD's KL-f8 VAE, or the TAEF2 tiny autoencoder
   (32 latent channels at 1/8 resolution); latents are shifted and scaled to unit variance with statistics
   of the training images.
2. A caption-conditioned UNet (diffusers ``UNet2DConditionModel``); captions are encoded by a frozen
   :class:`anomalens.backbones.text.TextEncoder`, whose states go to the UNet as they are when the widths
   match (SD 1.5's 77 x 768), else through a learned linear projection.
3. A guidance network fed the input image: a diffusers ``ControlNetModel`` initialised from the UNet; its
   residuals reach the UNet's middle block and deepest skips only, after the SFF block fused the next-finer
   level into them (``guidance_levels``, ``fusion``).

Training (``anomalens train vlmdiff``, :mod:`anomalens.methods.vlmdiff.training`): the autoencoder's
fine-tuning, then the noise-prediction loss on normal images of all categories together, with their captions
as condition and the UNet's encoder frozen.

Inference (:class:`VLMDiff`): the input's latent is noised to ``noise_level`` (the paper: t = 999), then
denoised in ``ddim_steps`` deterministic DDIM steps guided by the input image, with the test caption (empty by
default, as in the paper for MVTec AD, VisA and Real-IAD; per image from a caption file or a captioner, with
classifier-free guidance, for COCO-AD). The anomaly map is one minus the cosine similarity between the input's
and the reconstruction's features (DINO ViT-S/8's last block with its final norm by default, any
:mod:`anomalens.backbones` name), averaged over layers at ``image_size``, Gaussian-smoothed (sigma 5); the image
score is the maximum after eight 8 x 8 average pools.

Shapes: images ``(B, 3, S, S)`` in [0, 1] with ``S = image_size``; latents ``(B, C, S/8, S/8)``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from anomalens.backbones import FeatureBackbone, check_layers, get_backbone_spec
from anomalens.checks import check_options
from anomalens.config import DetectorConfig
from anomalens.detector import Detector
from anomalens.io.images import images_to_tensor
from anomalens.methods.vlmdiff.architecture import VLMDiffArchitecture
from anomalens.methods.vlmdiff.captions import DEFAULT_PROMPT, VLMCaptioner, lookup_caption, read_caption_file
from anomalens.methods.vlmdiff.network import VLMDiffNet
from anomalens.methods.vlmdiff.run_files import load_run_weights, read_run
from anomalens.nn.maps import gaussian_blur

logger = logging.getLogger(__name__)

IMAGE_SCORES = ("pooled_max", "max")


@dataclass
class VLMDiffConfig(DetectorConfig):
    """Configuration of :class:`VLMDiff` (batch size, seed, precision, smoothing: :class:`DetectorConfig`)."""

    method: ClassVar[str] = "vlmdiff"
    weight_fields: ClassVar[tuple[str, ...]] = ("feature_weights",)

    @classmethod
    def random_weights(cls) -> dict[str, Any]:
        """Random feature extractor, autoencoder and text encoder (the UNet is random without a checkpoint)."""
        return {
            "feature_weights": None,
            "architecture": {"autoencoder_weights": None, "text_encoder_weights": None, "unet_weights": None},
        }

    checkpoint: str | None = None  # run folder written by `anomalens train vlmdiff`; None: an untrained random model
    architecture: dict | None = None  # VLMDiffArchitecture fields; read from the checkpoint, or given for random models
    noise_level: int = 999  # timestep the input's latent is noised to before denoising (the paper: 999)
    ddim_steps: int = 10  # deterministic DDIM denoising steps (the paper: 10)
    caption: str = ""  # text condition at test time; "" = none (the paper, for MVTec AD / VisA / Real-IAD)
    test_caption_file: str | None = None  # per-image test captions (JSON / JSONL / CSV keyed by path, name or
    # SHA-256, as for training); images it lacks get `caption`
    test_captioner: str | None = None  # a VLM / image-to-text model id or folder captioning each test image (the
    # authors' COCO-AD setting); None: `caption` (or the caption file) for every image
    caption_prompt: str = DEFAULT_PROMPT  # the question asked to the test captioner (the authors')
    guidance_scale: float = 1.0  # classifier-free guidance scale; 1: none (the authors for MVTec AD / VisA /
    # Real-IAD); their COCO-AD setting: 9 with per-image captions
    feature_extractor: str = "dino_vits8"  # backbone comparing input and reconstruction (see anomalens.backbones)
    feature_weights: str | None = "default"  # its weights: "default" registered ones, a path, or None (random)
    feature_layers: tuple[str, ...] | None = None  # its layers; None: DINO's last block with its final norm (the
    # authors'), or the backbone's defaults
    image_score: str = "pooled_max"  # "pooled_max": max after eight 8x8 stride-1 average pools (the authors');
    # "max": the map's plain maximum
    smoothing_sigma: float = 5.0  # Gaussian sigma of the map at image_size (the authors': 5)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.architecture is not None:
            if isinstance(self.architecture, str):
                self.architecture = json.loads(self.architecture)
            self.architecture = asdict(VLMDiffArchitecture.from_dict(dict(self.architecture)))
        if self.feature_layers is None and self.feature_extractor.startswith("dino_"):
            self.feature_layers = ("norm",)
        self.feature_layers = check_layers(self.feature_extractor, self.feature_layers, "feature_layers")
        check_options(
            self.method,
            self,
            {
                "noise_level": (0 < self.noise_level < 1000, "in 1..999"),
                "ddim_steps": (self.ddim_steps >= 1, ">= 1"),
                "image_score": (self.image_score in IMAGE_SCORES, f"one of {', '.join(IMAGE_SCORES)}"),
                "guidance_scale": (math.isfinite(self.guidance_scale) and self.guidance_scale >= 0, ">= 0 and finite"),
            },
        )


class VLMDiff(Detector):
    """A trained VLMDiff model as a detector. Needs no references: ``fit()`` only records the class name."""

    method_name = "vlmdiff"
    config_class = VLMDiffConfig
    zero_shot = True
    few_shot = False
    cannot_export = "scoring runs a DDIM reconstruction loop (VAE, several caption-conditioned UNet steps) per image"
    cannot_update = "its normal model is a trained diffusion network (retrain it with anomalens train vlmdiff)"

    def __init__(
        self,
        config: VLMDiffConfig,
        *,
        weights_dir: str | os.PathLike | None = None,
        load_pretrained: bool = True,
    ):
        if config.architecture is None:  # record the architecture in this detector's own copy of the config
            found = read_run(config.checkpoint)["architecture"] if config.checkpoint else asdict(VLMDiffArchitecture())
            config = replace(config, architecture=found)
        super().__init__(config, weights_dir=weights_dir, load_pretrained=load_pretrained)
        architecture = VLMDiffArchitecture.from_dict(config.architecture)
        if config.checkpoint is not None:  # the run holds the whole trained UNet: its initial weights are not needed
            architecture = replace(architecture, unet_weights=None)
        self.net = VLMDiffNet(
            architecture, load_pretrained=load_pretrained, weights_dir=weights_dir, init_seed=config.seed
        )
        if load_pretrained and config.checkpoint is not None:
            load_run_weights(self.net, config.checkpoint)
        self.features = FeatureBackbone(
            config.feature_extractor,
            config.feature_layers,
            pretrained=config.feature_weights if load_pretrained else None,
            weights_dir=weights_dir,
            method_hint=f"vlmdiff --set feature_extractor={config.feature_extractor}",
            init_seed=config.seed,
        )
        self.image_size = architecture.image_size
        self.net.eval()
        self._test_captions = read_caption_file(config.test_caption_file) if config.test_caption_file else None
        self._captioner = (
            VLMCaptioner(config.test_captioner, config.caption_prompt, device=None) if config.test_captioner else None
        )
        self._batch_captions: dict[int, list[str]] = {}  # the captions of the batch each thread is scoring

    @property
    def input_size(self) -> int:
        """The model's resolution (``tiling=\"auto\"`` compares parts with it)."""
        return self.image_size

    @classmethod
    def required_weights(cls, config: VLMDiffConfig) -> list[str]:
        architecture = VLMDiffArchitecture.from_dict(
            config.architecture or (read_run(config.checkpoint)["architecture"] if config.checkpoint else {})
        )
        needed = []
        if architecture.autoencoder == "taef2" and architecture.autoencoder_weights == "default":
            needed += ["taef2_encoder", "taef2_decoder"]
        elif architecture.autoencoder == "sd" and architecture.autoencoder_weights is not None:
            needed.append(
                architecture.sd_model
                if architecture.autoencoder_weights == "default"
                else architecture.autoencoder_weights
            )
        if architecture.text_encoder == "sd" and architecture.text_encoder_weights is not None:
            needed.append(
                architecture.sd_model
                if architecture.text_encoder_weights == "default"
                else architecture.text_encoder_weights
            )
        if architecture.unet_weights is not None and config.checkpoint is None:
            default = architecture.unet_weights == "default"
            needed.append(architecture.sd_model if default else architecture.unet_weights)
        if config.test_captioner is not None:
            needed.append(config.test_captioner)
        if config.feature_weights is not None:
            spec = get_backbone_spec(config.feature_extractor)
            needed.append(spec.weights if config.feature_weights == "default" else config.feature_weights)
        return list(dict.fromkeys(needed))

    def _fit(self, reference_images: list[np.ndarray], class_name: str | None) -> None:
        """Nothing to fit: the model was trained on normal images of every category beforehand."""

    def captions_for(self, arrays: Sequence[np.ndarray], sources: Sequence[str] | None = None) -> list[str]:
        """Each test image's caption: from ``test_caption_file`` (by source path or name), else the
        ``test_captioner``'s answer, else ``caption``."""
        captions = []
        for index, array in enumerate(arrays):
            caption = None
            if self._test_captions is not None and sources:
                caption = lookup_caption(self._test_captions, sources[index])
                if caption is None:
                    logger.warning("no test caption for %s in %s", sources[index], self.config.test_caption_file)
            if caption is None and self._captioner is not None:
                with self.timed("captioner"):
                    caption = self._captioner(array)
            captions.append(self.config.caption if caption is None else caption)
        return captions

    def predict_arrays(self, arrays: Sequence[np.ndarray], sources: Sequence[str] | None = None) -> list:
        """Score ``(H, W, 3)`` uint8 arrays, each reconstructed with its own caption (see :meth:`captions_for`)."""
        if (self._test_captions is None and self._captioner is None) or not len(arrays):
            return super().predict_arrays(arrays, sources)
        thread = threading.get_ident()
        self._batch_captions[thread] = self.captions_for(arrays, sources)
        try:
            return super().predict_arrays(arrays, sources)
        finally:
            self._batch_captions.pop(thread, None)

    def reconstruct(
        self, images: list[np.ndarray], captions: Sequence[str] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and reconstructions, both ``(B, 3, S, S)`` in [0, 1], for ``(H, W, 3)`` uint8 images, with
        ``captions`` (one per image; ``None``: the config's ``caption``)."""
        pixels = images_to_tensor(images, self.image_size).to(self.device)
        generator = torch.Generator().manual_seed(self.config.seed)
        with torch.inference_mode(), self.autocast():
            reconstructions = self.net.reconstruct(
                pixels,
                caption=self.config.caption if captions is None else list(captions),
                guidance_scale=self.config.guidance_scale,
                noise_level=self.config.noise_level,
                ddim_steps=self.config.ddim_steps,
                generator=generator,
                timed=self.timed,
            )
        return pixels, reconstructions

    def feature_difference(self, images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        """``1 - cos`` between the two images' features, per layer at ``S x S``, averaged: ``(B, S, S)``."""
        size = images.shape[-2:]
        both = self.features(torch.cat([images, reconstructions]))
        maps = []
        for layer in both:
            original, rebuilt = layer.float().chunk(2)
            distance = 1.0 - F.cosine_similarity(original, rebuilt, dim=1)  # (B, h, w)
            maps.append(F.interpolate(distance[:, None], size=size, mode="bilinear", align_corners=False)[:, 0])
        return torch.stack(maps).mean(0)

    def _predict_batch(self, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        pixels, reconstructions = self.reconstruct(images, self._batch_captions.get(threading.get_ident()))
        with self.timed("features"):
            anomaly_maps = self.feature_difference(pixels, reconstructions)
        with self.timed("post_processing"):
            anomaly_maps = gaussian_blur(anomaly_maps, self.config.smoothing_sigma)
            if self.config.image_score == "pooled_max":
                scores = pooled_max(anomaly_maps)
            else:
                scores = anomaly_maps.flatten(1).amax(1)
        return scores, anomaly_maps


def pooled_max(maps: torch.Tensor, kernel: int = 8, repeats: int = 8) -> torch.Tensor:
    """The authors' image score: ``(B, H, W)`` maps average-pooled ``repeats`` times (``kernel`` x ``kernel``,
    stride 1, no padding), then the maximum: ``(B,)``. A pool that would leave less than one pixel is skipped."""
    pooled = maps[:, None]
    for _ in range(repeats):
        if min(pooled.shape[-2:]) < kernel:
            break
        pooled = F.avg_pool2d(pooled, kernel, stride=1)
    return pooled.flatten(1).amax(1)
