"""VLMDiff (Hicsonmez, Shabayek and Aouada, WACV 2026): caption-conditioned latent diffusion reconstructs
normal images; anomalies are where the input's features differ from its reconstruction's.

Model (:class:`VLMDiffNet`):

1. A latent autoencoder (:class:`LatentAutoencoder`): SD's KL-f8 VAE, or the TAEF2 tiny autoencoder
   (32 latent channels at 1/8 resolution); latents are shifted and scaled to unit variance with statistics
   of the training images.
2. A caption-conditioned UNet (diffusers ``UNet2DConditionModel``); captions are encoded by a frozen
   :class:`anomalens.text_encoders.TextEncoder` and mapped to the UNet's cross-attention width by a learned
   linear projection.
3. A guidance network fed the input image: a diffusers ``ControlNetModel`` initialised from the UNet whose
   residuals are added into the UNet's skip connections and middle block.

Training (``anomalens train vlmdiff``, :mod:`anomalens.methods.vlmdiff_training`) is the usual
noise-prediction loss on normal images of all categories together, with their captions as condition.

Inference (:class:`VLMDiff`): the input's latent is noised to ``noise_level`` (the paper: t = 999), then
denoised in ``ddim_steps`` deterministic DDIM steps guided by the input image, with the test caption
(empty by default, as in the paper for MVTec AD, VisA and Real-IAD). The anomaly map is one minus the
cosine similarity between the input's and the reconstruction's features (DINO ViT-S/8 by default, any
:mod:`anomalens.backbones` name), averaged over layers at ``image_size``, Gaussian-smoothed; the image
score is its maximum.

Shapes: images ``(B, 3, S, S)`` in [0, 1] with ``S = image_size``; latents ``(B, C, S/8, S/8)``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anomalens.backbones import FeatureBackbone, check_layers, get_backbone_spec
from anomalens.backbones.diffusion import SD_VAE_CONFIG, TINY_VAE_CONFIG, require_diffusers, vae_encode_in_chunks
from anomalens.detector import Detector
from anomalens.postprocess import gaussian_blur, images_to_tensor
from anomalens.text_encoders import TextEncoder

logger = logging.getLogger(__name__)

RUN_CONFIG_FILE = "vlmdiff.json"
RUN_WEIGHTS_FILE = "model.safetensors"
SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"

# UNet sizes. ``attention_head_dim`` follows diffusers' (historical) meaning for SD 1.x: the number of heads.
UNET_SIZES: dict[str, dict[str, Any]] = {
    "sd-1-5": {  # Stable Diffusion 1.5's UNet (860M parameters with 4 latent channels)
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "attention_head_dim": 8,
        "cross_attention_dim": 768,
        "norm_num_groups": 32,
    },
    "small": {  # trains from scratch on a 2-core CPU in about an hour; attention at 1/2 and 1/4 of the latent side
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (64, 128, 192),
        "layers_per_block": 1,
        "attention_head_dim": 4,
        "cross_attention_dim": 192,
        "norm_num_groups": 32,
    },
    "tiny": {  # tests
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (8, 16),
        "layers_per_block": 1,
        "attention_head_dim": 2,
        "cross_attention_dim": 16,
        "norm_num_groups": 4,
    },
}
# Channels of the guidance network's image encoder (3 stride-2 convolutions: pixels to the 1/8 latent grid).
GUIDANCE_EMBEDDING_CHANNELS = {"sd-1-5": (16, 32, 96, 256), "small": (16, 32, 64, 128), "tiny": (4, 4, 8, 8)}
AUTOENCODERS = ("taef2", "sd", "tiny")


@dataclass
class VLMDiffArchitecture:
    """What a VLMDiff model is built from; written to a training run's ``vlmdiff.json``."""

    unet: str = "sd-1-5"  # UNet and guidance-network size: one of UNET_SIZES
    autoencoder: str = "sd"  # latent autoencoder: "sd" (KL-f8 VAE), "taef2", or "tiny" (tests)
    autoencoder_weights: str | None = (
        "default"  # "default": real weights (sd_model's vae/, registered TAEF2); None: random; or a path / repo id
    )
    text_encoder: str = "sd"  # caption encoder: "sd", "minilm", "tiny", or a transformers sentence-encoder id / folder
    text_encoder_weights: str | None = (
        "default"  # "default": the kind's real weights; None: random; or a path / repo id
    )
    sd_model: str = SD15_REPO  # repo id / diffusers folder of the "sd" autoencoder and text encoder
    image_size: int = 256  # training and inference resolution (a multiple of 8)
    max_caption_tokens: int = 77  # captions are padded / truncated to this many tokens

    def __post_init__(self) -> None:
        if self.unet not in UNET_SIZES:
            raise ValueError(f"unknown VLMDiff unet size {self.unet!r}; valid: {', '.join(UNET_SIZES)}")
        if self.autoencoder not in AUTOENCODERS:
            raise ValueError(f"unknown VLMDiff autoencoder {self.autoencoder!r}; valid: {', '.join(AUTOENCODERS)}")
        if self.image_size < 16 or self.image_size % 8:
            raise ValueError(f"VLMDiff image_size must be a multiple of 8 and >= 16, got {self.image_size}")
        if self.max_caption_tokens < 2:
            raise ValueError(f"VLMDiff max_caption_tokens must be >= 2, got {self.max_caption_tokens}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> VLMDiffArchitecture:
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown VLMDiff architecture field(s) {unknown}; valid: {', '.join(sorted(known))}")
        return cls(**values)


class LatentAutoencoder(nn.Module):
    """Image <-> latent, frozen unless fine-tuned. Images ``(B, 3, S, S)`` in [0, 1]; latents ``(B, C, S/8, S/8)``.

    ``encode`` returns raw latents (the SD VAE's posterior mean); :class:`VLMDiffNet` normalises them.
    """

    def __init__(
        self,
        kind: str,
        weights: str | None,
        *,
        sd_model: str = SD15_REPO,
        weights_dir: str | os.PathLike | None = None,
    ):
        super().__init__()
        self.kind = kind
        if kind == "taef2":
            from anomalens.backbones.taef2 import taef2_decoder, taef2_encoder
            from anomalens.weights import load_state_dict_checked, read_checkpoint, resolve

            self.encoder, self.decoder = taef2_encoder(), taef2_decoder()
            if weights is not None:
                references = (
                    ("taef2_encoder", "taef2_decoder")
                    if weights == "default"
                    else (
                        f"{weights}/taef2_encoder.pth",
                        f"{weights}/taef2_decoder.pth",
                    )
                )
                for module, reference in zip((self.encoder, self.decoder), references):
                    path = resolve(reference, weights_dir=weights_dir, method_hint="vlmdiff")
                    load_state_dict_checked(module, read_checkpoint(path), source=str(path))
            for module in (self.encoder, self.decoder):  # faster CPU convolutions, as FeatureBackbone's
                module.to(memory_format=torch.channels_last)
            self.latent_channels = 32
        else:
            diffusers = require_diffusers()
            if weights is None or kind == "tiny":
                # Stable Diffusion 1.x and 2.x share the KL-f8 VAE architecture.
                self.vae = diffusers.AutoencoderKL(**(TINY_VAE_CONFIG if kind == "tiny" else SD_VAE_CONFIG))
            else:
                from anomalens.weights import resolve

                folder = resolve(
                    sd_model if weights == "default" else weights, weights_dir=weights_dir, method_hint="vlmdiff"
                )
                subfolder = "vae" if (Path(folder) / "vae").is_dir() else None
                self.vae = diffusers.AutoencoderKL.from_pretrained(folder, subfolder=subfolder)
            self.latent_channels = int(self.vae.config.latent_channels)

    # SD's VAE runs this many images at a time: its full-resolution activations take ~35 MB per image and tensor
    # at 256 px (~130 MB at 512), so a whole batch of 8 would add GBs; each image's result is the same.
    vae_chunk_size = 2

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` in [0, 1] to raw latents ``(B, C, S/8, S/8)``."""
        if self.kind == "taef2":
            return self.encoder(images.contiguous(memory_format=torch.channels_last)).contiguous()
        return vae_encode_in_chunks(self.vae, images * 2.0 - 1.0, self.vae_chunk_size)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw latents to images ``(B, 3, S, S)`` in [0, 1]."""
        if self.kind == "taef2":
            return self.decoder(latents.contiguous(memory_format=torch.channels_last)).contiguous().clamp(0.0, 1.0)
        images = [
            self.vae.decode(chunk.contiguous(memory_format=torch.channels_last)).sample
            for chunk in latents.split(self.vae_chunk_size)
        ]
        return ((torch.cat(images).contiguous() + 1.0) / 2.0).clamp(0.0, 1.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``decode(encode(images))`` (what fine-tuning optimises)."""
        return self.decode(self.encode(images))


def scaled_linear_alphas_cumprod(
    steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """Stable Diffusion's noise schedule: cumulative products of ``1 - beta`` (float64, ``(steps,)``)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def ddim_timesteps(noise_level: int, steps: int) -> list[int]:
    """``steps`` decreasing timesteps from ``noise_level`` towards 0 (evenly spaced, first = noise_level)."""
    if steps < 1:
        raise ValueError(f"ddim_steps must be >= 1, got {steps}")
    if noise_level < 1:
        raise ValueError(f"noise_level must be >= 1, got {noise_level}")
    return [int(round(value)) for value in np.linspace(noise_level, 0, steps, endpoint=False)]


def ddim_step(sample: torch.Tensor, predicted_noise: torch.Tensor, alpha: float, alpha_previous: float) -> torch.Tensor:
    """One deterministic DDIM update (eta = 0) from cumulative alpha ``alpha`` to ``alpha_previous``."""
    predicted_clean = (sample - (1.0 - alpha) ** 0.5 * predicted_noise) / alpha**0.5
    return alpha_previous**0.5 * predicted_clean + (1.0 - alpha_previous) ** 0.5 * predicted_noise


class VLMDiffNet(nn.Module):
    """Autoencoder + caption encoder (frozen) and UNet + guidance network + caption projection (trained).

    Args:
        architecture: What to build.
        load_pretrained: Load the autoencoder's and text encoder's weights as the architecture says; ``False``
            builds them randomly (a saved detector then restores every tensor).
        weights_dir: Searched first for pretrained weights.
        init_seed: Seed of every random initialisation.
    """

    def __init__(
        self,
        architecture: VLMDiffArchitecture,
        *,
        load_pretrained: bool = True,
        weights_dir: str | os.PathLike | None = None,
        init_seed: int = 0,
    ):
        super().__init__()
        diffusers = require_diffusers()
        self.architecture = architecture
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            self.autoencoder = LatentAutoencoder(
                architecture.autoencoder,
                architecture.autoencoder_weights if load_pretrained else None,
                sd_model=architecture.sd_model,
                weights_dir=weights_dir,
            )
            self.text_encoder = TextEncoder(
                architecture.text_encoder,
                architecture.text_encoder_weights if load_pretrained else None,
                sd_model=architecture.sd_model,
                max_tokens=architecture.max_caption_tokens,
                weights_dir=weights_dir,
                init_seed=init_seed,
            )
            size = dict(UNET_SIZES[architecture.unet])
            channels = self.autoencoder.latent_channels
            self.unet = diffusers.UNet2DConditionModel(
                sample_size=architecture.image_size // 8, in_channels=channels, out_channels=channels, **size
            )
            self.guidance = diffusers.ControlNetModel.from_unet(
                self.unet, conditioning_embedding_out_channels=GUIDANCE_EMBEDDING_CHANNELS[architecture.unet]
            )
            self.caption_projection = nn.Linear(self.text_encoder.width, size["cross_attention_dim"])
        self.autoencoder.eval().requires_grad_(False)
        self.register_buffer("latent_shift", torch.zeros(()))
        self.register_buffer("latent_scale", torch.ones(()))
        self.register_buffer("alphas_cumprod", scaled_linear_alphas_cumprod(), persistent=False)

    def trainable_modules(self) -> dict[str, nn.Module]:
        """The parts training updates (and a run's ``model.safetensors`` stores)."""
        return {"unet": self.unet, "guidance": self.guidance, "caption_projection": self.caption_projection}

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] to normalised latents (about zero mean, unit variance on the training set)."""
        return (self.autoencoder.encode(images) - self.latent_shift) / self.latent_scale

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents to images in [0, 1]."""
        return self.autoencoder.decode(latents * self.latent_scale + self.latent_shift)

    def condition(self, captions: list[str]) -> torch.Tensor:
        """Captions to cross-attention states ``(B, L, D_cross)``.

        Padding positions are kept (their states were computed with the padding masked out inside the text
        encoder), as Stable Diffusion does with CLIP's 77 states; the guidance network takes no cross-attention
        mask, so the UNet gets none either.
        """
        states, _ = self.text_encoder(captions)
        return self.caption_projection(states)

    def predict_noise(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        condition: torch.Tensor,
        guidance_images: torch.Tensor,
    ) -> torch.Tensor:
        """The UNet's noise estimate with the guidance network's residuals added. Returns ``noisy_latents``' shape."""
        down_residuals, mid_residual = self.guidance(
            noisy_latents,
            timesteps,
            encoder_hidden_states=condition,
            controlnet_cond=guidance_images,
            return_dict=False,
        )
        return self.unet(
            noisy_latents,
            timesteps,
            encoder_hidden_states=condition,
            down_block_additional_residuals=down_residuals,
            mid_block_additional_residual=mid_residual,
        ).sample

    def training_loss(
        self,
        latents: torch.Tensor,
        images: torch.Tensor,
        captions: list[str],
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Noise-prediction MSE for normalised ``latents`` of ``images`` conditioned on ``captions``.

        Timesteps and noise are drawn from ``generator`` (on the CPU), so training is reproducible.
        """
        batch = latents.shape[0]
        timesteps = torch.randint(0, self.alphas_cumprod.numel(), (batch,), generator=generator)
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        alpha = self.alphas_cumprod[timesteps.to(self.alphas_cumprod.device)].to(latents.dtype).view(-1, 1, 1, 1)
        noisy = alpha.sqrt() * latents + (1.0 - alpha).sqrt() * noise
        condition = self.condition(captions)
        predicted = self.predict_noise(noisy, timesteps.to(latents.device), condition, images)
        return F.mse_loss(predicted.float(), noise.float())

    @torch.no_grad()
    def reconstruct(
        self,
        images: torch.Tensor,
        *,
        caption: str = "",
        noise_level: int = 999,
        ddim_steps: int = 10,
        generator: torch.Generator | None = None,
        timed: Callable[[str], AbstractContextManager] | None = None,
    ) -> torch.Tensor:
        """Noise the images' latents to ``noise_level`` and denoise them with DDIM, guided by the images.

        Args:
            images: ``(B, 3, S, S)`` in [0, 1].
            caption: Text condition for every image ("" = none).
            noise_level: Starting timestep (0 < t < 1000).
            ddim_steps: Denoising steps.
            generator: CPU generator of the starting noise.
            timed: ``stage -> context manager`` adding the time of the autoencoder ("vae"), caption encoding
                ("text_encoder") and denoising ("unet") to a detector's stage times.

        Returns:
            Reconstructions ``(B, 3, S, S)`` in [0, 1].
        """
        last = self.alphas_cumprod.numel() - 1
        if not 0 < noise_level <= last:
            raise ValueError(f"noise_level must be in 1..{last}, got {noise_level}")
        timed = timed or (lambda stage: nullcontext())
        with timed("vae"):
            latents = self.encode_latents(images)
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        timesteps = ddim_timesteps(noise_level, ddim_steps)
        alphas = self.alphas_cumprod.double().cpu()
        alpha = float(alphas[timesteps[0]])
        sample = alpha**0.5 * latents + (1.0 - alpha) ** 0.5 * noise
        with timed("text_encoder"):
            condition = self.condition([caption] * images.shape[0])
        with timed("unet"):
            for index, timestep in enumerate(timesteps):
                alpha = float(alphas[timestep])
                alpha_previous = float(alphas[timesteps[index + 1]]) if index + 1 < len(timesteps) else 1.0
                step = torch.full((images.shape[0],), timestep, device=images.device, dtype=torch.long)
                predicted = self.predict_noise(sample, step, condition, images)
                sample = ddim_step(sample, predicted.to(sample.dtype), alpha, alpha_previous)
        with timed("vae"):
            return self.decode_latents(sample)


def read_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``vlmdiff.json`` of a training run folder (architecture, training settings, progress)."""
    folder = Path(run_dir)
    path = folder / RUN_CONFIG_FILE
    if not path.is_file() or not (folder / RUN_WEIGHTS_FILE).is_file():
        raise ValueError(
            f"{folder} is not a VLMDiff training run (expected {RUN_CONFIG_FILE} and {RUN_WEIGHTS_FILE}; "
            "write one with `anomalens train vlmdiff --out DIR`)"
        )
    return json.loads(path.read_text())


def load_run_weights(net: VLMDiffNet, run_dir: str | os.PathLike) -> None:
    """Load a run's trained tensors (UNet, guidance, projection, latent statistics, a fine-tuned autoencoder)."""
    from safetensors.torch import load_file

    from anomalens.weights import load_state_dict_checked

    path = Path(run_dir) / RUN_WEIGHTS_FILE
    state = load_file(str(path), device="cpu")
    parts = dict(net.trainable_modules())
    if any(key.startswith("autoencoder.") for key in state):  # the run fine-tuned its autoencoder
        parts["autoencoder"] = net.autoencoder
    for name, module in parts.items():
        prefix = f"{name}."
        part = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
        load_state_dict_checked(module, part, source=f"{path} ({name})")
    for name in ("latent_shift", "latent_scale"):
        if name not in state:
            raise ValueError(f"{path} lacks the tensor {name!r}")
        getattr(net, name).copy_(state[name])


@dataclass
class VLMDiffConfig:
    """Configuration of :class:`VLMDiff`."""

    checkpoint: str | None = None  # run folder written by `anomalens train vlmdiff`; None: an untrained random model
    architecture: dict | None = None  # VLMDiffArchitecture fields; read from the checkpoint, or given for random models
    noise_level: int = 999  # timestep the input's latent is noised to before denoising (the paper: 999)
    ddim_steps: int = 10  # deterministic DDIM denoising steps (the paper: 10)
    caption: str = ""  # text condition at test time; "" = none (the paper, for MVTec AD / VisA / Real-IAD)
    feature_extractor: str = "dino_vits8"  # backbone comparing input and reconstruction (see anomalens.backbones)
    feature_weights: str | None = "default"  # its weights: "default" registered ones, a path, or None (random)
    feature_layers: tuple[str, ...] | None = None  # its layers; None = the backbone's defaults
    smoothing_sigma: float = 4.0  # Gaussian sigma in pixels at image_size (the paper: about 4-5)
    batch_size: int = 8  # images per forward pass
    seed: int = 0  # seeds the starting noise (predictions are deterministic) and random initialisation
    precision: str = "float32"  # "bfloat16" or "float16": networks under autocast (see Detector.autocast)

    def __post_init__(self) -> None:
        if self.architecture is not None:
            if isinstance(self.architecture, str):
                self.architecture = json.loads(self.architecture)
            self.architecture = asdict(VLMDiffArchitecture.from_dict(dict(self.architecture)))
        self.feature_layers = check_layers(self.feature_extractor, self.feature_layers, "feature_layers")
        if not 0 < self.noise_level < 1000:
            raise ValueError(f"VLMDiff option noise_level={self.noise_level!r} must be in 1..999")
        for name, minimum in (("ddim_steps", 1), ("batch_size", 1)):
            if getattr(self, name) < minimum:
                raise ValueError(f"VLMDiff option {name}={getattr(self, name)!r} must be >= {minimum}")
        if self.smoothing_sigma < 0:
            raise ValueError(f"VLMDiff option smoothing_sigma={self.smoothing_sigma!r} must be >= 0")


class VLMDiff(Detector):
    """A trained VLMDiff model as a detector. Needs no references: ``fit()`` only records the class name."""

    method_name = "vlmdiff"
    config_class = VLMDiffConfig
    zero_shot = True
    few_shot = False

    def __init__(
        self,
        config: VLMDiffConfig,
        *,
        weights_dir: str | os.PathLike | None = None,
        load_pretrained: bool = True,
    ):
        super().__init__(config, weights_dir=weights_dir, load_pretrained=load_pretrained)
        if config.architecture is None:
            if config.checkpoint is not None:
                config.architecture = read_run(config.checkpoint)["architecture"]
            else:
                config.architecture = asdict(VLMDiffArchitecture())
        architecture = VLMDiffArchitecture.from_dict(config.architecture)
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
        if config.feature_weights is not None:
            spec = get_backbone_spec(config.feature_extractor)
            needed.append(spec.weights if config.feature_weights == "default" else config.feature_weights)
        return list(dict.fromkeys(needed))

    def _fit(self, reference_images: list[np.ndarray], class_name: str | None) -> None:
        """Nothing to fit: the model was trained on normal images of every category beforehand."""

    def reconstruct(self, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and reconstructions, both ``(B, 3, S, S)`` in [0, 1], for ``(H, W, 3)`` uint8 images."""
        pixels = images_to_tensor(images, self.image_size).to(self.device)
        generator = torch.Generator().manual_seed(self.config.seed)
        with torch.inference_mode(), self.autocast():
            reconstructions = self.net.reconstruct(
                pixels,
                caption=self.config.caption,
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
        pixels, reconstructions = self.reconstruct(images)
        with self.timed("features"):
            anomaly_maps = self.feature_difference(pixels, reconstructions)
        with self.timed("post_processing"):
            anomaly_maps = gaussian_blur(anomaly_maps, self.config.smoothing_sigma)
            scores = anomaly_maps.flatten(1).amax(1)
        return scores, anomaly_maps
