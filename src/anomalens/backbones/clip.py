"""A thin wrapper over open_clip: image, patch, window and text embeddings, plus v-v attention.

Nothing of open_clip is copied: models are built with ``open_clip.create_model`` (any model name and
pretrained tag, a checkpoint file, or random weights), intermediate tokens come from the vision tower's
``forward_intermediates``, and v-v attention is added by :func:`add_vv_attention`, which swaps chosen
transformer blocks for a wrapper and can be undone.

Token layouts: ``(B, N, C)`` patch tokens (``N = h * w`` patches, row-major, class token removed) at the
transformer width ``C``; projected tokens and embeddings are ``(…, E)`` in the joint image-text space.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anomalens.backbones.prompts import PromptSet
from anomalens.backbones.weights import resolve
from anomalens.io.images import images_to_tensor
from anomalens.nn.maps import gaussian_blur
from anomalens.nn.offload import ParkedTensors
from anomalens.nn.state import EmbeddingCache

logger = logging.getLogger(__name__)


def _sequence_major(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook of a batch-first ``nn.MultiheadAttention``: hand it its self-attention input stored
    sequence-major, so the ``(L, B, C)`` view it takes internally is contiguous.

    PyTorch's CPU linear in bfloat16/float16 is ~300x slower on that transposed view than on contiguous input
    (torch 2.15, ViT-L/14 at 336 px, batch 2: 3.2 s instead of 0.01 s per block). Only reduced-precision CPU
    passes are relaid: in float32 the copy costs more than it saves. The values, and the outputs, are unchanged.
    """
    if not getattr(module, "batch_first", False) or len(args) < 3 or not (args[0] is args[1] is args[2]):
        return None
    tokens = args[0]
    reduced = tokens.dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled(tokens.device.type)
    if tokens.ndim != 3 or tokens.shape[0] == 1 or tokens.device.type != "cpu" or not reduced:
        return None
    relaid = tokens.transpose(0, 1).contiguous().transpose(0, 1)
    return (relaid, relaid, relaid, *args[3:]), kwargs


@contextmanager
def sequence_major_attention(model: nn.Module) -> Iterator[None]:
    """Install :func:`_sequence_major` on every ``nn.MultiheadAttention`` of ``model`` for the ``with`` block;
    the hooks are always removed on exit."""
    handles = [
        module.register_forward_pre_hook(_sequence_major, with_kwargs=True)
        for module in model.modules()
        if isinstance(module, nn.MultiheadAttention)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


RESIZE_MODES = ("resize", "crop")


def _open_clip():
    try:
        import open_clip
    except ImportError as error:
        raise ImportError("CLIP methods need open_clip: pip install 'open_clip_torch>=2.32'") from error
    return open_clip


def clip_weights_reference(model_name: str, pretrained: str | None) -> str | None:
    """The weights reference :func:`anomalens.backbones.weights.resolve` takes for ``(model_name, pretrained)``."""
    if pretrained is None:
        return None
    if os.path.exists(pretrained):
        return pretrained
    return f"open_clip:{model_name}/{pretrained}"


class VVAttentionBlock(nn.Module):
    """A transformer block wrapper that also computes a parallel value-value attention path.

    The wrapped block's output is returned unchanged. Alongside, the wrapper adds
    ``out_proj(softmax(v v^T / sqrt(d)) v)`` of the block's normalised input to ``state["tokens"]``,
    the v-v path's running sum (CLIP Surgery, Li et al. 2023): the first wrapped block starts it from its
    input, later ones add to it. After a forward pass ``state["tokens"]`` holds ``(B, 1 + N, C)`` tokens and
    ``state["blocks"][i]`` the running sum after block ``i``.
    """

    def __init__(self, block: nn.Module, state: dict, index: int, first: bool, batch_first: bool):
        super().__init__()
        self.block = block
        self.state = state
        self.index = index
        self.first = first
        self.batch_first = batch_first

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        tokens = x if self.batch_first else x.transpose(0, 1)  # (B, L, C)
        attention = self.block.attn
        width = tokens.shape[-1]
        heads = attention.num_heads
        weight = attention.in_proj_weight[2 * width :]
        bias = attention.in_proj_bias[2 * width :] if attention.in_proj_bias is not None else None
        values = F.linear(self.block.ln_1(tokens), weight, bias)  # (B, L, C)
        batch, length, _ = values.shape
        values = values.reshape(batch, length, heads, width // heads).transpose(1, 2)  # (B, H, L, d)
        mixed = F.scaled_dot_product_attention(values, values, values)
        mixed = attention.out_proj(mixed.transpose(1, 2).reshape(batch, length, width))
        start = tokens if self.first else self.state["tokens"]
        self.state["tokens"] = start + mixed
        if self.first:
            self.state["blocks"] = {}
        self.state["blocks"][self.index] = self.state["tokens"]
        return self.block(x, *args, **kwargs)


def add_vv_attention(visual: nn.Module, last_k: int) -> dict:
    """Add a v-v attention path to the last ``last_k`` blocks of an open_clip vision transformer.

    The original path's outputs (image embedding, intermediate tokens) are unchanged. After each forward
    pass, the returned ``state["tokens"]`` holds the v-v path's ``(B, 1 + N, C)`` tokens, better localised
    than the original ones; project them with the vision tower's ``ln_post`` and ``proj``.

    Args:
        visual: ``model.visual`` of an open_clip ``CLIP`` model (a ``VisionTransformer``).
        last_k: How many final blocks get the parallel path (``1 <= last_k <= depth``).

    Returns:
        The state dict written on every forward. Undo with :func:`remove_vv_attention`.
    """
    blocks = visual.transformer.resblocks
    if not 1 <= last_k <= len(blocks):
        raise ValueError(f"last_k must be in [1, {len(blocks)}], got {last_k}")
    if any(isinstance(block, VVAttentionBlock) for block in blocks):
        raise ValueError("v-v attention is already added to this model; remove it first")
    state: dict = {"tokens": None, "blocks": {}}
    batch_first = getattr(visual.transformer, "batch_first", True)
    start = len(blocks) - last_k
    for index in range(start, len(blocks)):
        blocks[index] = VVAttentionBlock(blocks[index], state, index, first=index == start, batch_first=batch_first)
    return state


def remove_vv_attention(visual: nn.Module) -> None:
    """Put back the original blocks swapped by :func:`add_vv_attention`."""
    blocks = visual.transformer.resblocks
    for index, block in enumerate(blocks):
        if isinstance(block, VVAttentionBlock):
            blocks[index] = block.block


@dataclass
class ImageFeatures:
    """What one vision forward pass yields for a batch."""

    embedding: torch.Tensor  # (B, E) global image embedding, L2-normalised
    layer_tokens: list[torch.Tensor]  # per requested layer: (B, N, C) patch tokens, class token removed
    vv_tokens: dict[int, torch.Tensor]  # block index -> (B, N, C) v-v path patch tokens, when v-v attention is on
    embedded: torch.Tensor | None  # (B, 1 + N, C) transformer input tokens, if asked for (window embeddings)


class CLIPBackbone(nn.Module):
    """An open_clip model with the pieces anomaly methods need.

    Args:
        model_name: An open_clip model name (see ``open_clip.list_models()``).
        pretrained: An open_clip pretrained tag (e.g. ``"laion400m_e31"``, ``"openai"``), a checkpoint path,
            or ``None`` for random weights (seeded by ``init_seed``) with the real architecture.
        image_size: Input side; ``None`` takes the model's.
        resize_mode: ``"resize"`` squashes the whole image to the square input; ``"crop"`` resizes the shorter
            side and centre-crops, and maps are placed back in the crop's region (edges replicated outside).
        vv_layers: Add v-v attention to this many final blocks (0: off); their v-v tokens come back per block.
        weights_dir: Searched first for checkpoint files.
        method_hint: The method asking, named in a missing-weights error.
        init_seed: Seed of the random initialisation when ``pretrained`` is ``None``.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: str | None,
        *,
        image_size: int | None = None,
        resize_mode: str = "resize",
        vv_layers: int = 0,
        weights_dir: str | os.PathLike | None = None,
        method_hint: str | None = None,
        init_seed: int = 0,
    ):
        super().__init__()
        open_clip = _open_clip()
        if model_name not in open_clip.list_models():
            raise ValueError(
                f"unknown open_clip model {model_name!r}; valid models: {', '.join(open_clip.list_models())}"
            )
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"unknown resize_mode {resize_mode!r}; valid modes: {', '.join(RESIZE_MODES)}")
        self.model_name = model_name
        reference = clip_weights_reference(model_name, pretrained)
        path = str(resolve(reference, weights_dir=weights_dir, method_hint=method_hint)) if reference else None
        extra = {"force_image_size": image_size} if image_size else {}
        quick_gelu = pretrained == "openai"  # OpenAI's weights use QuickGELU; same FLOPs either way
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            self.model = open_clip.create_model(model_name, pretrained=path, force_quick_gelu=quick_gelu, **extra)
        self.model.eval().requires_grad_(False)
        self.visual = self.model.visual
        if not hasattr(self.visual, "forward_intermediates") or not hasattr(self.visual, "_embeds"):
            raise ValueError(f"{model_name!r} is not an open_clip VisionTransformer; CLIP methods need one")
        self.tokenizer = open_clip.get_tokenizer(model_name)
        preprocess = open_clip.get_model_preprocess_cfg(self.model)
        size = preprocess["size"]
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.resize_mode = resize_mode
        self.register_buffer("mean", torch.tensor(preprocess["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocess["std"]).view(1, 3, 1, 1), persistent=False)
        patch = self.visual.patch_size
        self.grid = (self.image_size // patch[0], self.image_size // patch[1])
        self.depth = len(self.visual.transformer.resblocks)
        self.embed_dim = int(self.visual.proj.shape[1]) if self.visual.proj is not None else self.visual.output_dim
        self.vv_state = add_vv_attention(self.visual, vv_layers) if vv_layers else None
        self.text_cache = EmbeddingCache()  # (class name, prompt set) -> (2, E), follows .to() like the weights
        # The text tower, parkable in a temporary file once a method's prompts are cached (see anomalens.nn.offload).
        self.text_weights = ParkedTensors(
            self.model, f"{model_name} text tower", exclude=("visual.", "logit_scale", "logit_bias"),
            device_module=self.visual,
        )  # fmt: skip

    @staticmethod
    def depth_of(model_name: str) -> int:
        """Number of vision transformer blocks of open_clip model ``model_name``, from its config alone."""
        config = _open_clip().get_model_config(model_name)
        if not config:
            valid = ", ".join(_open_clip().list_models())
            raise ValueError(f"unknown open_clip model {model_name!r}; valid models: {valid}")
        return int(config["vision_cfg"]["layers"])

    # ------------------------------------------------------------------ images
    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """``(H, W, 3)`` uint8 images to the normalised ``(B, 3, S, S)`` model input."""
        size = self.image_size
        if self.resize_mode != "crop":
            pixels = images_to_tensor(list(images), size, mode="bicubic").to(self.mean.device)
            return (pixels - self.mean) / self.std
        batch = []
        for image in images:
            tensor = torch.from_numpy(image).permute(2, 0, 1)[None].float().div_(255.0)
            height, width = tensor.shape[-2:]
            scale = size / min(height, width)
            resized = (max(size, round(height * scale)), max(size, round(width * scale)))
            tensor = F.interpolate(tensor, size=resized, mode="bicubic", antialias=True, align_corners=False)
            top, left = (resized[0] - size) // 2, (resized[1] - size) // 2
            batch.append(tensor[:, :, top : top + size, left : left + size])
        pixels = torch.cat(batch).clamp_(0.0, 1.0).to(self.mean.device)
        return (pixels - self.mean) / self.std

    def patch_scores_to_map(self, patch_scores: torch.Tensor, smoothing_sigma: float) -> torch.Tensor:
        """``(B, N)`` patch scores to Gaussian-smoothed ``(B, S, S)`` maps at the model's input size."""
        height, width = self.grid
        size = self.image_size
        grid = patch_scores.reshape(-1, 1, height, width)
        maps = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        return gaussian_blur(maps, smoothing_sigma)

    def restore_map(self, anomaly_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Map an ``(S, S)`` map on the model input back onto the original ``(H, W)`` image."""
        height, width = size
        if self.resize_mode != "crop":
            return F.interpolate(anomaly_map[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
        side = min(height, width)  # the crop covers a centred side x side square of the original
        square = F.interpolate(anomaly_map[None, None], size=(side, side), mode="bilinear", align_corners=False)
        top, left = (height - side) // 2, (width - side) // 2
        padding = (left, width - side - left, top, height - side - top)
        return F.pad(square, padding, mode="replicate")[0, 0]

    def encode_image(
        self, pixels: torch.Tensor, layers: Sequence[int] = (), with_embedded: bool = False
    ) -> ImageFeatures:
        """One vision forward pass.

        Args:
            pixels: ``(B, 3, S, S)`` from :meth:`preprocess`.
            layers: Block indices (0-based, negative from the end) whose patch tokens to return.
            with_embedded: Also return the transformer's input tokens (for :meth:`window_embeddings`).

        Returns:
            :class:`ImageFeatures`.
        """
        indices = [layer % self.depth for layer in layers]
        embedded = self.visual._embeds(pixels) if with_embedded else None
        with sequence_major_attention(self.visual):
            output = self.visual.forward_intermediates(pixels, indices=indices or [self.depth - 1], output_fmt="NLC")
        tokens = output["image_intermediates"] if indices else []
        vv_tokens = {}
        if self.vv_state is not None:
            vv_tokens = {index: tokens[:, 1:] for index, tokens in self.vv_state["blocks"].items()}
            self.vv_state["tokens"], self.vv_state["blocks"] = None, {}
        embedding = F.normalize(output["image_features"], dim=-1)
        return ImageFeatures(embedding=embedding, layer_tokens=list(tokens), vv_tokens=vv_tokens, embedded=embedded)

    def project(self, tokens: torch.Tensor, projection: bool = True) -> torch.Tensor:
        """``(…, C)`` transformer tokens through the tower's own ``ln_post`` and (``projection``) ``proj``:
        ``(…, E)``, or ``(…, C)`` without the projection."""
        projected = self.visual.ln_post(tokens)
        if projection and self.visual.proj is not None:
            projected = projected @ self.visual.proj
        return projected

    def window_embeddings(
        self, embedded: torch.Tensor, windows: torch.Tensor, tokens_per_call: int = 2048
    ) -> torch.Tensor:
        """CLIP image embeddings of windows: each window's patch tokens plus the class token, alone.

        Args:
            embedded: ``(B, 1 + N, C)`` transformer input tokens (positional embeddings included).
            windows: ``(W, k)`` patch indices of each window (``k`` patches, indices into ``N``).
            tokens_per_call: Tokens per transformer call, in whole windows. About 2,048 keeps a call's activations
                within a CPU's last-level cache at ViT-B width: a batch of 8 then runs ~20% faster per image than
                in one call, as fast as a single image (``benchmarks/results/speed-*``).

        Returns:
            ``(B, W, E)`` L2-normalised window embeddings.
        """
        batch, _, width = embedded.shape
        count, size = windows.shape
        index = torch.cat([torch.zeros(count, 1, dtype=torch.long), windows + 1], dim=1).to(embedded.device)
        sequences = embedded[:, index].reshape(batch * count, size + 1, width)  # token gathering, no masks
        outputs = []
        chunk = max(1, tokens_per_call // (size + 1))
        with sequence_major_attention(self.visual):
            for start in range(0, sequences.shape[0], chunk):
                hidden = self.visual.transformer(sequences[start : start + chunk])
                pooled, _ = self.visual._pool(hidden)
                outputs.append(pooled @ self.visual.proj if self.visual.proj is not None else pooled)
        if self.vv_state is not None:
            self.vv_state["tokens"], self.vv_state["blocks"] = None, {}
        return F.normalize(torch.cat(outputs), dim=-1).reshape(batch, count, -1)

    # ------------------------------------------------------------------ text
    @property
    def logit_scale(self) -> float:
        """CLIP's learned temperature, ``exp(logit_scale)`` (100 for the released models)."""
        return float(self.model.logit_scale.exp())

    def encode_text(self, prompts: Sequence[str], normalise: bool = True) -> torch.Tensor:
        """``(P, E)`` embeddings of ``prompts`` (L2-normalised when ``normalise``), encoded 32 at a time (a WinCLIP
        ensemble has 250 prompts; at once their activations would take ~0.5 GB at ViT-L size)."""
        tokens = self.tokenizer(list(prompts)).to(self.mean.device)
        with self.text_weights.resident(), sequence_major_attention(self.model):
            embeddings = torch.cat([self.model.encode_text(chunk) for chunk in tokens.split(32)])
        return F.normalize(embeddings, dim=-1) if normalise else embeddings

    def text_embeddings(self, class_name: str, prompt_set: PromptSet, normalise_prompts: bool = True) -> torch.Tensor:
        """``(2, E)``: the normal and the anomalous ensemble embedding of ``class_name``, cached.

        Each is the normalised mean of its prompts' embeddings, each prompt's normalised first when
        ``normalise_prompts`` (CLIP's prompt ensembling), raw otherwise. The cache key is
        ``(model, class name, prompt set, normalise_prompts)``, so scoring N images encodes the text once.
        """
        key = (class_name, prompt_set) if normalise_prompts else (class_name, prompt_set, "raw")
        if key not in self.text_cache:
            normal, anomalous = prompt_set.prompts(class_name)
            embeddings = [
                F.normalize(self.encode_text(prompts, normalise_prompts).mean(0), dim=-1)
                for prompts in (normal, anomalous)
            ]
            self.text_cache.put(key, torch.stack(embeddings))
            logger.debug("encoded %d prompts for %r", len(normal) + len(anomalous), class_name)
        return self.text_cache.get(key)[0]

    def anomaly_probability(self, embeddings: torch.Tensor, text: torch.Tensor, temperature: float | None = None):
        """Softmax probability of the anomalous state: ``(…, E)`` normalised embeddings -> ``(…)``."""
        scale = self.logit_scale if temperature is None else temperature
        logits = scale * embeddings @ text.T  # (…, 2)
        return logits.softmax(dim=-1)[..., 1]


def sliding_windows(grid: tuple[int, int], scale: int, stride: int = 1) -> torch.Tensor:
    """Patch indices of the ``scale x scale`` windows over an ``(h, w)`` grid, row-major: ``(W, scale**2)``.

    Windows start every ``stride`` patches; the last row and column of windows are always included, so every patch
    is covered whatever the stride (with ``stride=1``: every window)."""
    height, width = grid
    if not 1 <= scale <= min(height, width):
        raise ValueError(f"window scale must be in [1, {min(height, width)}] for a {height}x{width} grid, got {scale}")
    if not 1 <= stride <= scale:
        raise ValueError(f"window stride must be in [1, {scale}] (the window side; larger leaves patches uncovered), "
                         f"got {stride}")  # fmt: skip

    def starts_along(side: int) -> torch.Tensor:
        starts = torch.arange(0, side - scale + 1, stride)
        return starts if int(starts[-1]) == side - scale else torch.cat([starts, torch.tensor([side - scale])])

    rows, cols = starts_along(height), starts_along(width)
    offsets = (torch.arange(scale)[:, None] * width + torch.arange(scale)[None, :]).reshape(-1)
    starts = (rows[:, None] * width + cols[None, :]).reshape(-1)
    return starts[:, None] + offsets[None, :]


def window_incidence(windows: torch.Tensor, num_patches: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(W, N)`` matrix with 1 where window ``w`` covers patch ``n``: spreading window scores onto patches is then
    one matrix product (exportable to ONNX, unlike ``index_add_`` with repeated indices)."""
    incidence = torch.zeros(windows.shape[0], num_patches, dtype=dtype, device=windows.device)
    incidence.scatter_(1, windows.long(), 1.0)
    return incidence


def harmonic_window_aggregation(window_scores: torch.Tensor, windows: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Each patch's score as the harmonic mean of the scores of the windows that cover it.

    Args:
        window_scores: ``(B, W)`` positive scores.
        windows: ``(W, k)`` patch indices.
        num_patches: ``N``, the grid's patch count.

    Returns:
        ``(B, N)``; a patch no window covers gets 0.
    """
    reciprocal = 1.0 / window_scores.clamp_min(1e-12)  # (B, W)
    incidence = window_incidence(windows.to(reciprocal.device), num_patches, reciprocal.dtype)  # (W, N)
    sums = reciprocal @ incidence
    counts = incidence.sum(0)
    return torch.where(counts > 0, counts / sums.clamp_min(1e-30), torch.zeros_like(sums))
