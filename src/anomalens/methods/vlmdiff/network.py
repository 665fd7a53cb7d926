"""VLMDiff's network: frozen autoencoder and caption encoder, a caption-conditioned UNet and a guidance network,
with the noise-prediction training loss and deterministic DDIM reconstruction.

Shapes: images ``(B, 3, S, S)`` in [0, 1] with ``S = image_size``; latents ``(B, C, S/8, S/8)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anomalens.backbones import IMAGENET_MEAN, IMAGENET_STD
from anomalens.backbones.diffusion import per_image_noise, require_diffusers, sd_noise_scheduler
from anomalens.backbones.text import TextEncoder
from anomalens.methods.vlmdiff.architecture import GUIDANCE_EMBEDDING_CHANNELS, UNET_SIZES, VLMDiffArchitecture
from anomalens.methods.vlmdiff.autoencoder import LatentAutoencoder


def ddim_timesteps(noise_level: int, steps: int) -> list[int]:
    """``steps`` decreasing timesteps from ``noise_level`` towards 0 (evenly spaced, first = noise_level)."""
    if steps < 1:
        raise ValueError(f"ddim_steps must be >= 1, got {steps}")
    if noise_level < 1:
        raise ValueError(f"noise_level must be >= 1, got {noise_level}")
    return [int(round(value)) for value in np.linspace(noise_level, 0, steps, endpoint=False)]


def ddim_step(sample: torch.Tensor, predicted_noise: torch.Tensor, alpha: float, alpha_previous: float) -> torch.Tensor:
    """One deterministic DDIM update (eta = 0) from cumulative alpha ``alpha`` to ``alpha_previous``.

    The cumulative alphas are diffusers' (:func:`~anomalens.backbones.diffusion.sd_noise_scheduler`). The update is
    written out because diffusers' ``DDIMScheduler.step`` derives the previous timestep as ``t - 1000 // steps``, so
    it cannot start at an arbitrary ``noise_level`` (VLMDiff's t = 500, say) with evenly spaced steps down to 0.
    """
    predicted_clean = (sample - (1.0 - alpha) ** 0.5 * predicted_noise) / alpha**0.5
    return alpha_previous**0.5 * predicted_clean + (1.0 - alpha_previous) ** 0.5 * predicted_noise


def pretrained_unet(architecture: VLMDiffArchitecture, size: dict, channels: int, weights_dir) -> nn.Module:
    """The UNet of a diffusers repo or folder (``unet/``), checked against the architecture's size and latent
    channels, so that a mismatch is an error naming both, not a shape error deep in a forward pass."""
    from anomalens.backbones.weights import resolve

    diffusers = require_diffusers()
    reference = architecture.sd_model if architecture.unet_weights == "default" else architecture.unet_weights
    folder = resolve(reference, weights_dir=weights_dir, method_hint="vlmdiff")
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    expected = {"in_channels": channels, "out_channels": channels, **size}
    found = {key: unet.config[key] for key in expected}
    if {key: tuple(value) if isinstance(value, list) else value for key, value in found.items()} != {
        key: tuple(value) if isinstance(value, list) else value for key, value in expected.items()
    }:
        raise ValueError(
            f"the UNet in {folder} does not match VLMDiff unet={architecture.unet!r} with {channels} latent channels: "
            f"it has {found}, expected {expected}"
        )
    return unet


def residual_levels(block_out_channels: tuple[int, ...], layers_per_block: int) -> list[tuple[int, int]]:
    """``(channels, level)`` of each down residual a diffusers UNet / ControlNet passes to its decoder, in order:
    the input convolution, then per block its resnets and (except the last block) its downsampler, whose output
    belongs to the next, coarser level. Level 0 is the latent's own resolution."""
    levels = [(block_out_channels[0], 0)]
    for block, channels in enumerate(block_out_channels):
        levels += [(channels, block)] * layers_per_block
        if block < len(block_out_channels) - 1:
            levels.append((channels, block + 1))
    return levels


class SpatialFeatureFusion(nn.Module):
    """The authors' SFF block: each residual of the deepest level gets, from every residual of the next-finer
    level, a zero-initialised 3x3 stride-2 convolution, instance norm and SiLU, all summed with it through a SiLU:
    ``fused_j = silu(r_j + sum_i silu(norm(conv_ij(r_i))))``. Zero at initialisation, like the residuals it fuses.

    Args:
        levels: ``(channels, level)`` per down residual (:func:`residual_levels`).
    """

    def __init__(self, levels: list[tuple[int, int]]):
        super().__init__()
        deepest = max(level for _, level in levels)
        self.targets = [index for index, (_, level) in enumerate(levels) if level == deepest]
        self.sources = [index for index, (_, level) in enumerate(levels) if level == deepest - 1]
        self.paths = nn.ModuleList()
        for target in self.targets:
            for source in self.sources:
                conv = nn.Conv2d(levels[source][0], levels[target][0], 3, stride=2, padding=1, bias=False)
                nn.init.zeros_(conv.weight)
                self.paths.append(nn.Sequential(conv, nn.InstanceNorm2d(levels[target][0]), nn.SiLU()))

    def forward(self, residuals: list[torch.Tensor]) -> list[torch.Tensor]:
        """``residuals``: the down residuals ``(B, C_i, h_i, w_i)``; returns them with the deepest level fused."""
        fused = list(residuals)
        paths = iter(self.paths)
        for target in self.targets:
            total = residuals[target]
            for source in self.sources:
                total = total + next(paths)(residuals[source])
            fused[target] = F.silu(total)
        return fused


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
            if architecture.unet_weights is not None and load_pretrained:
                self.unet = pretrained_unet(architecture, size, channels, weights_dir)
            else:
                self.unet = diffusers.UNet2DConditionModel(
                    sample_size=architecture.image_size // 8, in_channels=channels, out_channels=channels, **size
                )
            self.guidance = diffusers.ControlNetModel.from_unet(
                self.unet, conditioning_embedding_out_channels=GUIDANCE_EMBEDDING_CHANNELS[architecture.unet]
            )
            same_width = self.text_encoder.width == size["cross_attention_dim"]
            if architecture.caption_projection == "auto" and same_width:
                self.caption_projection: nn.Module = nn.Identity()
            else:
                self.caption_projection = nn.Linear(self.text_encoder.width, size["cross_attention_dim"])
            levels = residual_levels(size["block_out_channels"], size["layers_per_block"])
            self.fusion = SpatialFeatureFusion(levels) if architecture.fusion else None
        deepest = len(size["block_out_channels"]) - 1
        # Which of the guidance network's down residuals reach the UNet (all, or the deepest level's).
        self.register_buffer(
            "residual_mask",
            torch.tensor([architecture.guidance_levels == "all" or level == deepest for _, level in levels]),
            persistent=False,
        )
        self.autoencoder.eval().requires_grad_(False)
        self.register_buffer("hint_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("hint_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("latent_shift", torch.zeros(()))
        self.register_buffer("latent_scale", torch.ones(()))
        self.noise_scheduler = sd_noise_scheduler()
        self.register_buffer("alphas_cumprod", self.noise_scheduler.alphas_cumprod.double(), persistent=False)

    def trainable_modules(self) -> dict[str, nn.Module]:
        """The parts training updates (and a run's ``model.safetensors`` stores)."""
        modules = {"unet": self.unet, "guidance": self.guidance, "caption_projection": self.caption_projection}
        if self.fusion is not None:
            modules["fusion"] = self.fusion
        return modules

    def unet_encoder(self) -> list[nn.Module]:
        """The UNet's encoder: input convolution, time embedding, down blocks and middle block. The authors train
        it frozen (under ``no_grad``): only the guidance network and the decoder learn."""
        return [self.unet.conv_in, self.unet.time_embedding, *self.unet.down_blocks, self.unet.mid_block]

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
        if self.architecture.hint_normalisation == "imagenet":
            guidance_images = (guidance_images - self.hint_mean) / self.hint_std
        down_residuals, mid_residual = self.guidance(
            noisy_latents,
            timesteps,
            encoder_hidden_states=condition,
            controlnet_cond=guidance_images,
            return_dict=False,
        )
        down_residuals = list(down_residuals)
        if self.fusion is not None:
            down_residuals = self.fusion(down_residuals)
        down_residuals = [
            residual if keep else torch.zeros_like(residual)
            for residual, keep in zip(down_residuals, self.residual_mask.tolist())
        ]
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
        generator: torch.Generator | None = None,
        *,
        draws: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Noise-prediction MSE for normalised ``latents`` of ``images`` conditioned on ``captions``.

        Timesteps and noise are drawn from ``generator`` (on the CPU, :meth:`draw_noise`), so training is
        reproducible; or given as ``draws`` (``(B,)`` timesteps, noise shaped like ``latents``): a data-parallel
        process's share of the global batch's draws.
        """
        timesteps, noise = draws if draws is not None else self.draw_noise(tuple(latents.shape), generator)
        noise = noise.to(latents)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps.to(latents.device))
        condition = self.condition(captions)
        predicted = self.predict_noise(noisy, timesteps.to(latents.device), condition, images)
        return F.mse_loss(predicted.float(), noise.float())

    def draw_noise(self, shape: tuple[int, ...],
                   generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """A training batch's random draws for latents of ``shape`` ``(B, C, h, w)``: ``(B,)`` timesteps, then noise
        of ``shape`` (in that order, from ``generator``; on the CPU)."""
        timesteps = torch.randint(0, self.alphas_cumprod.numel(), (shape[0],), generator=generator)
        return timesteps, torch.randn(shape, generator=generator)

    @torch.no_grad()
    def reconstruct(
        self,
        images: torch.Tensor,
        *,
        caption: str | Sequence[str] = "",
        guidance_scale: float = 1.0,
        noise_level: int = 999,
        ddim_steps: int = 10,
        generator: torch.Generator | None = None,
        timed: Callable[[str], AbstractContextManager] | None = None,
    ) -> torch.Tensor:
        """Noise the images' latents to ``noise_level`` and denoise them with DDIM, guided by the images.

        Args:
            images: ``(B, 3, S, S)`` in [0, 1].
            caption: Text condition: one for every image, or one per image ("" = none).
            guidance_scale: Classifier-free guidance: the noise estimate is ``e("") + scale * (e(caption) -
                e(""))``, both with the image guidance (as ControlNet samples); 1 uses the caption alone.
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
        count = images.shape[0]
        captions = [caption] * count if isinstance(caption, str) else list(caption)
        if len(captions) != count:
            raise ValueError(f"got {len(captions)} captions for {count} images")
        guided = guidance_scale != 1.0
        timed = timed or (lambda stage: nullcontext())
        with timed("vae"):
            latents = self.encode_latents(images)
        noise = per_image_noise(latents, generator)  # the same for every image: scores independent of the batch
        timesteps = ddim_timesteps(noise_level, ddim_steps)
        alphas = self.alphas_cumprod.double().cpu()
        alpha = float(alphas[timesteps[0]])
        sample = alpha**0.5 * latents + (1.0 - alpha) ** 0.5 * noise
        with timed("text_encoder"):
            condition = self.condition(captions + [""] * count if guided else captions)
        hints = torch.cat([images, images]) if guided else images
        with timed("unet"):
            for index, timestep in enumerate(timesteps):
                alpha = float(alphas[timestep])
                alpha_previous = float(alphas[timesteps[index + 1]]) if index + 1 < len(timesteps) else 1.0
                inputs = torch.cat([sample, sample]) if guided else sample
                step = torch.full((inputs.shape[0],), timestep, device=images.device, dtype=torch.long)
                predicted = self.predict_noise(inputs, step, condition, hints)
                if guided:
                    with_caption, without = predicted.chunk(2)
                    predicted = without + guidance_scale * (with_caption - without)
                sample = ddim_step(sample, predicted.to(sample.dtype), alpha, alpha_previous)
        with timed("vae"):
            return self.decode_latents(sample)
