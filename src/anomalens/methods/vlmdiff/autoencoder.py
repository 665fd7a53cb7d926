"""The latent autoencoder of VLMDiff: SD's KL-f8 VAE, TAEF2, or a tiny random VAE for tests."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from anomalens.backbones.diffusion import SD_VAE_CONFIG, TINY_VAE_CONFIG, require_diffusers, vae_encode_in_chunks
from anomalens.methods.vlmdiff.architecture import SD15_REPO


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
            from anomalens.backbones.weights import load_state_dict_checked, read_checkpoint, resolve

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
                from anomalens.backbones.weights import resolve

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
        """Reconstruction ``decode(encode(images))``, clamped to [0, 1]."""
        return self.decode(self.encode(images))

    def training_reconstruction(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What fine-tuning optimises: the reconstruction ``(B, 3, S, S)`` (about [0, 1], unclamped so gradients
        flow) and, for a KL VAE, each image's KL divergence from the unit Gaussian ``(B,)`` (else ``None``).

        A KL VAE decodes a latent sampled from its posterior (drawn from ``generator``), as Stable Diffusion's
        autoencoder was trained; TAEF2 is deterministic and has no KL term.
        """
        if self.kind == "taef2":
            return self.decoder(self.encoder(images)), None
        posterior = self.vae.encode(images * 2.0 - 1.0).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(posterior.mean)
        latents = posterior.mean + posterior.std * noise
        return (self.vae.decode(latents).sample + 1.0) / 2.0, posterior.kl()


def perceptual_distance(features: list[torch.Tensor], other_features: list[torch.Tensor]) -> torch.Tensor:
    """LPIPS's distance with uniform channel weights (its ``lpips=False`` variant): per layer, each position's
    feature vector is divided by its L2 norm, the squared differences are summed over channels and averaged over
    positions; the layers are summed. Features ``[(B, C_l, H_l, W_l)]`` of two image batches; returns ``(B,)``.
    """
    total = 0.0
    for first, second in zip(features, other_features, strict=True):
        first, second = first.float(), second.float()
        first = first / (first.norm(dim=1, keepdim=True) + 1e-10)
        second = second / (second.norm(dim=1, keepdim=True) + 1e-10)
        total = total + (first - second).pow(2).sum(1).mean((1, 2))
    return total
