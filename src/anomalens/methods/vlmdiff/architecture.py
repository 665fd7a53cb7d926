"""What a VLMDiff model is built from: UNet sizes, guidance channels, autoencoders, and the architecture dataclass
written to every training run's ``vlmdiff.json``."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

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
GUIDANCE_LEVELS = ("deepest", "all")
HINT_NORMALISATIONS = ("imagenet", "none")
CAPTION_PROJECTIONS = ("auto", "linear")
# What a run trained before a field existed was trained with (a missing field in its vlmdiff.json gets this value).
TRAINED_BEFORE_THE_FIELD = {
    "guidance_levels": "all",
    "fusion": False,
    "unet_weights": None,
    "hint_normalisation": "none",
}


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
    unet_weights: str | None = "auto"  # initialise the UNet (and the guidance network, copied from its encoder)
    # from a diffusers repo / folder's unet/: "default" = sd_model (the authors' SD 1.5); "auto": "default" for the
    # sd-1-5 UNet, None (random: trained from scratch) for the others; resolved when the architecture is built
    image_size: int = 256  # training and inference resolution (a multiple of 8)
    max_caption_tokens: int = 77  # captions are padded / truncated to this many tokens
    # Where the guidance network's residuals enter the UNet. "deepest" (the authors' only_mid_control=True): the
    # middle block and the skips of the deepest level only. "all": every skip, a diffusers ControlNet's default,
    # which lets the guidance hand the decoder a full-resolution copy of the input (anomalies included).
    guidance_levels: str = "deepest"
    fusion: bool = True  # the authors' SFF block: zero-initialised stride-2 convs fuse the next-finer level's
    # guidance residuals into the deepest level's
    hint_normalisation: str = "imagenet"  # the guidance network's input: "imagenet" mean/std (the authors'), or
    # "none" ([0, 1] pixels)
    caption_projection: str = "auto"  # "auto": the text states go to the UNet as they are when their width is its
    # cross-attention width (the authors', SD 1.5's 77 x 768), else through a learned linear map; "linear": always

    def __post_init__(self) -> None:
        if self.unet not in UNET_SIZES:
            raise ValueError(f"unknown VLMDiff unet size {self.unet!r}; valid: {', '.join(UNET_SIZES)}")
        if self.autoencoder not in AUTOENCODERS:
            raise ValueError(f"unknown VLMDiff autoencoder {self.autoencoder!r}; valid: {', '.join(AUTOENCODERS)}")
        if self.image_size < 16 or self.image_size % 8:
            raise ValueError(f"VLMDiff image_size must be a multiple of 8 and >= 16, got {self.image_size}")
        if self.max_caption_tokens < 2:
            raise ValueError(f"VLMDiff max_caption_tokens must be >= 2, got {self.max_caption_tokens}")
        if self.hint_normalisation not in HINT_NORMALISATIONS:
            valid = ", ".join(HINT_NORMALISATIONS)
            raise ValueError(f"unknown VLMDiff hint_normalisation {self.hint_normalisation!r}; valid: {valid}")
        if self.caption_projection not in CAPTION_PROJECTIONS:
            valid = ", ".join(CAPTION_PROJECTIONS)
            raise ValueError(f"unknown VLMDiff caption_projection {self.caption_projection!r}; valid: {valid}")
        if self.guidance_levels not in GUIDANCE_LEVELS:
            raise ValueError(
                f"unknown VLMDiff guidance_levels {self.guidance_levels!r}; valid: {', '.join(GUIDANCE_LEVELS)}"
            )
        if self.unet_weights == "auto":
            self.unet_weights = "default" if self.unet == "sd-1-5" else None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> VLMDiffArchitecture:
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown VLMDiff architecture field(s) {unknown}; valid: {', '.join(sorted(known))}")
        return cls(**values)
