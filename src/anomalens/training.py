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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from anomalens.backbones.clip import CLIPBackbone
from anomalens.datasets import open_dataset
from anomalens.images import ImageLoadError, load_image
from anomalens.prompts import build_prompt_set

logger = logging.getLogger(__name__)


def focal_loss(probabilities: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Binary focal loss (Lin et al., 2017) of probabilities against soft targets in [0, 1]."""
    probabilities = probabilities.clamp(1e-6, 1 - 1e-6)
    positive = -targets * (1 - probabilities) ** gamma * torch.log(probabilities)
    negative = -(1 - targets) * probabilities**gamma * torch.log(1 - probabilities)
    return (positive + negative).mean()


def dice_loss(probabilities: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Soft dice loss of ``(B, N)`` probabilities against ``(B, N)`` targets."""
    intersection = (probabilities * targets).sum(1)
    return (1 - (2 * intersection + 1) / (probabilities.sum(1) + targets.sum(1) + 1)).mean()


def train_patchclip(
    dataset: str,
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    backbone: str = "ViT-L-14-336",
    pretrained: str | None = "openai",
    layers: Sequence[int] = (5, 11, 17, 23),
    categories: Sequence[str] | None = None,
    epochs: int = 1,
    learning_rate: float = 1e-3,
    batch_size: int = 8,
    seed: int = 0,
    weights_dir: str | os.PathLike | None = None,
    progress: Callable[[int, float], Any] | None = None,
) -> Path:
    """Train PatchCLIP projections on a dataset's labelled test images and save them as safetensors.

    Args:
        dataset / root: The auxiliary dataset (see :func:`anomalens.datasets.open_dataset`).
        out: Output ``.safetensors`` file (written atomically); metadata records the CLIP model and layers.
        backbone / pretrained: The open_clip model the projections are for.
        layers: 0-based blocks (negative from the end), as in CLIPFusion's ``clip_layers``.
        categories: Categories to train on (default: all).
        epochs / learning_rate / batch_size / seed: Optimisation settings (Adam).
        progress: Called after each step with (images done, loss).

    Returns:
        The path written.
    """
    from safetensors.torch import save_file

    from anomalens.methods.clipfusion import PatchCLIPProjections

    torch_generator = torch.Generator().manual_seed(seed)
    data = open_dataset(dataset, root)
    chosen = list(categories) if categories else data.categories()
    samples = [sample for category in chosen for sample in data.test_samples(category)]
    if not samples:
        raise ValueError(f"no labelled images in {dataset} at {root} for categories {chosen}")
    clip = CLIPBackbone(backbone, pretrained, weights_dir=weights_dir, method_hint="clipfusion", init_seed=seed)
    depth = clip.depth
    layer_indices = [layer % depth for layer in layers]
    projections = PatchCLIPProjections(len(layer_indices), clip.visual.transformer.width, clip.embed_dim)
    with torch.no_grad():  # start from CLIP's own output projection
        for projection in projections.layers:
            projection.weight.copy_(clip.visual.proj.T)
            projection.bias.zero_()
    prompt_set = build_prompt_set()
    with torch.no_grad():
        texts = {category: clip.text_embeddings(category, prompt_set) for category in chosen}
    optimiser = torch.optim.Adam(projections.parameters(), lr=learning_rate)
    height, width = clip.grid
    done = 0
    for epoch in range(epochs):
        order = torch.randperm(len(samples), generator=torch_generator).tolist()
        for start in range(0, len(order), batch_size):
            batch = [samples[index] for index in order[start : start + batch_size]]
            images, masks, categories_of = [], [], []
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
                categories_of.append(sample.category)
            if not images:
                continue
            with torch.no_grad():
                tokens = clip.encode_image(clip.preprocess(images), layers=layer_indices).layer_tokens
            targets = torch.stack(
                [F.adaptive_avg_pool2d(mask[None, None], (height, width)).flatten() for mask in masks]
            )  # (B, N) soft targets
            text = torch.stack([texts[category] for category in categories_of])  # (B, 2, E)
            optimiser.zero_grad()
            loss = torch.zeros(())
            for joint in projections(tokens):
                logits = clip.logit_scale * torch.einsum("bne,bke->bnk", F.normalize(joint, dim=-1), text)
                probabilities = logits.softmax(-1)[..., 1]
                loss = loss + focal_loss(probabilities, targets) + dice_loss(probabilities, targets)
            loss.backward()
            optimiser.step()
            done += len(images)
            if progress is not None:
                progress(done, float(loss.detach()))
        logger.info("epoch %d of %d done", epoch + 1, epochs)
    metadata = {
        "format": "anomalens-patchclip",
        "backbone": backbone,
        "pretrained": str(pretrained),
        "layers": json.dumps(layer_indices),
        "dataset": dataset,
        "categories": json.dumps(chosen),
        "epochs": str(epochs),
    }
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp")
    save_file(
        {k: v.detach().contiguous() for k, v in projections.state_dict().items()}, str(temporary), metadata=metadata
    )
    os.replace(temporary, target)
    return target
