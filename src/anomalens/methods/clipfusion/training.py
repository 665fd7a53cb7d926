"""Training the few learned parts: PatchCLIP's per-layer projections (``anomalens train patchclip``).

PatchCLIP's trained variant maps the patch tokens of each chosen CLIP layer into the joint image-text
space with a small linear projection, trained on an auxiliary dataset that has pixel labels. The paper's
protocol trains on MVTec AD when testing on VisA and the reverse, so the target classes are never seen.
Each projection starts as CLIP's own output projection; the loss is focal + dice between each layer's
patch anomaly probabilities and the masks averaged down to the patch grid.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anomalens.backbones.clip import CLIPBackbone
from anomalens.backbones.prompts import build_prompt_set
from anomalens.config import check_options
from anomalens.io.datasets import open_dataset
from anomalens.io.images import ImageLoadError, load_image
from anomalens.io.outputs import honour_umask
from anomalens.nn.losses import dice_loss, focal_loss

logger = logging.getLogger(__name__)


@dataclass
class PatchCLIPTrainConfig:
    """Settings of ``anomalens train patchclip`` (recorded in the output file's metadata)."""

    dataset: str = ""  # auxiliary dataset with pixel labels: mvtec, visa, realiad or folder (required)
    root: str = ""  # its root folder (required)
    out: str = ""  # output .safetensors file (required)
    backbone: str = "ViT-L-14-336"  # open_clip model the projections are for
    pretrained: str | None = "openai"  # its pretrained tag, a checkpoint path, or none (random weights)
    layers: tuple[int, ...] = (5, 11, 17, 23)  # 0-based CLIP blocks (negative: from the end), as clip_layers
    categories: tuple[str, ...] | None = None  # categories to train on (default: all)
    epochs: int = 1  # passes over the labelled images
    learning_rate: float = 1e-3  # Adam learning rate
    batch_size: int = 8  # images per optimiser step
    seed: int = 0  # data order and random initialisation
    weights_dir: str | None = None  # folder with pretrained weights, searched first

    def __post_init__(self) -> None:
        self.layers = tuple(int(layer) for layer in self.layers)
        check_options("train patchclip", self, {
            "dataset": (bool(self.dataset), "a dataset layout (--dataset mvtec|visa|realiad|folder)"),
            "root": (bool(self.root), "the dataset's root folder (--root DIR)"),
            "out": (bool(self.out), "an output .safetensors file (--out FILE)"),
            "layers": (bool(self.layers), "one or more block indices"),
            "epochs": (self.epochs >= 1, ">= 1"),
            "learning_rate": (self.learning_rate > 0, "> 0"),
            "batch_size": (self.batch_size >= 1, ">= 1"),
        })  # fmt: skip


def train_patchclip(config: PatchCLIPTrainConfig, progress: Callable[[int, float], Any] | None = None) -> Path:
    """Train PatchCLIP projections on a dataset's labelled test images and save them as safetensors.

    Args:
        config: What to train on and how (see :class:`PatchCLIPTrainConfig`).
        progress: Called after each step with (images done, loss).

    Returns:
        The path written (atomically); its metadata records the CLIP model and layers.
    """
    data = open_dataset(config.dataset, config.root)
    chosen = list(config.categories) if config.categories else data.categories()
    samples = [sample for category in chosen for sample in data.test_samples(category)]
    if not samples:
        raise ValueError(f"no labelled images in {config.dataset} at {config.root} for categories {chosen}")
    clip = CLIPBackbone(config.backbone, config.pretrained, weights_dir=config.weights_dir, method_hint="clipfusion",
                        init_seed=config.seed)  # fmt: skip
    layer_indices = [layer % clip.depth for layer in config.layers]
    projections = _initial_projections(clip, len(layer_indices))
    with torch.no_grad():
        texts = {category: clip.text_embeddings(category, build_prompt_set()) for category in chosen}
    optimiser = torch.optim.Adam(projections.parameters(), lr=config.learning_rate)
    generator = torch.Generator().manual_seed(config.seed)
    done = 0
    for epoch in range(config.epochs):
        order = torch.randperm(len(samples), generator=generator).tolist()
        for start in range(0, len(order), config.batch_size):
            batch = _load_labelled([samples[index] for index in order[start : start + config.batch_size]])
            if batch is None:
                continue
            loss = _step(clip, projections, optimiser, layer_indices, texts, *batch)
            done += len(batch[0])
            if progress is not None:
                progress(done, loss)
        logger.info("epoch %d of %d done", epoch + 1, config.epochs)
    return _save_projections(projections, config, layer_indices, chosen)


def _initial_projections(clip: CLIPBackbone, count: int) -> nn.Module:
    """One projection per layer, each starting as CLIP's own output projection."""
    from anomalens.methods.clipfusion.model import PatchCLIPProjections

    projections = PatchCLIPProjections(count, clip.visual.transformer.width, clip.embed_dim)
    with torch.no_grad():
        for projection in projections.layers:
            projection.weight.copy_(clip.visual.proj.T)
            projection.bias.zero_()
    return projections


def _load_labelled(batch: list) -> tuple[list[np.ndarray], list[torch.Tensor], list[str]] | None:
    """Images, float masks and categories of the readable, labelled samples (unreadable ones are reported)."""
    images, masks, categories = [], [], []
    for sample in batch:
        try:
            image = load_image(sample.image_path)
            mask = sample.mask(image.shape[:2])
        except (ImageLoadError, ValueError) as error:
            logger.warning("skipped %s: %s", sample.image_path, error)
            continue
        if mask is None:
            continue
        images.append(image)
        masks.append(torch.from_numpy(mask.astype(np.float32)))
        categories.append(sample.category)
    return (images, masks, categories) if images else None


def _step(clip, projections, optimiser, layer_indices, texts, images, masks, categories) -> float:
    """One optimiser step of focal + dice between each layer's patch probabilities and the pooled masks."""
    height, width = clip.grid
    with torch.no_grad():
        tokens = clip.encode_image(clip.preprocess(images), layers=layer_indices).layer_tokens
    targets = torch.stack([F.adaptive_avg_pool2d(mask[None, None], (height, width)).flatten() for mask in masks])
    text = torch.stack([texts[category] for category in categories])  # (B, 2, E)
    optimiser.zero_grad()
    loss = torch.zeros(())
    for joint in projections(tokens):
        logits = clip.logit_scale * torch.einsum("bne,bke->bnk", F.normalize(joint, dim=-1), text)
        probabilities = logits.softmax(-1)[..., 1]
        loss = loss + focal_loss(probabilities, targets) + dice_loss(probabilities, targets)
    loss.backward()
    optimiser.step()
    return float(loss.detach())


def _save_projections(projections: nn.Module, config: PatchCLIPTrainConfig, layers: list[int], chosen: list) -> Path:
    from safetensors.torch import save_file

    metadata = {
        "format": "anomalens-patchclip",
        "backbone": config.backbone,
        "pretrained": str(config.pretrained),
        "layers": json.dumps(layers),
        "dataset": config.dataset,
        "categories": json.dumps(chosen),
        "epochs": str(config.epochs),
    }
    target = Path(config.out)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp")
    state = {key: value.detach().contiguous() for key, value in projections.state_dict().items()}
    save_file(state, str(temporary), metadata=metadata)
    honour_umask(temporary)  # safetensors writes 0600 whatever the umask
    os.replace(temporary, target)
    return target
