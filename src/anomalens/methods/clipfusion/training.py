"""Training the few learned parts: PatchCLIP's per-layer projections (``anomalens train patchclip``).

PatchCLIP's trained variant maps the patch tokens of each chosen CLIP layer into the joint image-text
space with a small linear projection, trained on an auxiliary dataset that has pixel labels. The paper's
protocol trains on MVTec AD when testing on VisA and the reverse, so the target classes are never seen.
Each projection starts as CLIP's own output projection.

The defaults follow APRIL-GAN (Chen et al., VAND 2023 challenge, github ByChelsea/VAND-APRIL-GAN; CLIPFusion's
PatchCLIP descends from it): images at 518 px, masks binarised at 0.5, focal + dice between each layer's
anomaly probabilities upsampled to the image (bilinear, corners aligned) and the mask, Adam with betas
(0.5, 0.999) at lr 1e-3, 3 epochs (their MVTec AD -> VisA run; 15 for VisA -> MVTec AD), and a mosaic of four
images of one category replacing an image with probability 0.2 (their MVTec AD run; 0 for VisA). Their batch is
64; ours defaults to 8 for a CPU's memory. ``loss_resolution="patch"`` and ``binarise_masks=False`` give the
former recipe (soft masks averaged down to the patch grid).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anomalens.backbones.clip import CLIPBackbone
from anomalens.backbones.prompts import build_prompt_set
from anomalens.checks import check_options
from anomalens.distributed import DataParallel
from anomalens.io.datasets import list_datasets, open_dataset
from anomalens.io.images import ImageLoadError, load_image
from anomalens.io.outputs import honour_umask
from anomalens.nn.losses import dice_loss, focal_loss

logger = logging.getLogger(__name__)


@dataclass
class PatchCLIPTrainConfig:
    """Settings of ``anomalens train patchclip`` (recorded in the output file's metadata)."""

    dataset: str = field(default="", metadata={"choices": list_datasets})  # auxiliary dataset with pixel labels
    root: str = ""  # its root folder (required)
    out: str = ""  # output .safetensors file (required)
    backbone: str = "ViT-L-14-336"  # open_clip model the projections are for
    pretrained: str | None = "openai"  # its pretrained tag, a checkpoint path, or none (random weights)
    layers: tuple[int, ...] = (5, 11, 17, 23)  # 0-based CLIP blocks (negative: from the end), as clip_layers
    categories: tuple[str, ...] | None = None  # categories to train on (default: all)
    epochs: int = 3  # passes over the labelled images (APRIL-GAN: 3 on MVTec AD, 15 on VisA)
    learning_rate: float = 1e-3  # Adam learning rate (APRIL-GAN's)
    betas: tuple[float, float] = (0.5, 0.999)  # Adam betas (APRIL-GAN's; torch's default is (0.9, 0.999))
    batch_size: int = 8  # images per optimiser step (APRIL-GAN: 64)
    image_size: int | None = 518  # CLIP input side while training (APRIL-GAN's 518); None = the model's own
    binarise_masks: bool = True  # masks > 0.5 become 1, the rest 0 (APRIL-GAN); False keeps soft masks
    loss_resolution: str = "image"  # "image": probabilities upsampled to image_size against the mask (APRIL-GAN);
    # "patch": the mask averaged down to the patch grid
    mosaic_rate: float = 0.2  # chance an image is replaced by a 2 x 2 mosaic of four of its category (APRIL-GAN
    # on MVTec AD: 0.2; on VisA: 0)
    seed: int = 0  # data order and random initialisation
    weights_dir: str | None = None  # folder with pretrained weights, searched first
    device: str = "auto"  # "auto": cuda:LOCAL_RANK where CUDA is there, else the CPU; or a device name

    def __post_init__(self) -> None:
        self.layers = tuple(int(layer) for layer in self.layers)
        check_options("train patchclip", self, {
            "dataset": (bool(self.dataset), f"a dataset layout (--dataset: one of {', '.join(list_datasets())})"),
            "root": (bool(self.root), "the dataset's root folder (--root DIR)"),
            "out": (bool(self.out), "an output .safetensors file (--out FILE)"),
            "layers": (bool(self.layers), "one or more block indices"),
            "epochs": (self.epochs >= 1, ">= 1"),
            "learning_rate": (self.learning_rate > 0, "> 0"),
            "batch_size": (self.batch_size >= 1, ">= 1"),
            "betas": (len(self.betas) == 2 and all(0 <= beta < 1 for beta in self.betas), "two numbers in [0, 1)"),
            "image_size": (self.image_size is None or self.image_size >= 16, ">= 16 or None"),
            "loss_resolution": (self.loss_resolution in ("image", "patch"), "image or patch"),
            "mosaic_rate": (0.0 <= self.mosaic_rate <= 1.0, "in [0, 1]"),
        })  # fmt: skip
        self.betas = tuple(float(beta) for beta in self.betas)


def train_patchclip(config: PatchCLIPTrainConfig, progress: Callable[[int, float], Any] | None = None) -> Path:
    """Train PatchCLIP projections on a dataset's labelled test images and save them as safetensors.

    Args:
        config: What to train on and how (see :class:`PatchCLIPTrainConfig`).
        progress: Called after each step with (images done, loss).

    Launched by ``torchrun`` (several processes), training is data-parallel (:mod:`anomalens.distributed`): every
    process loads each global batch of ``batch_size`` images (and draws its mosaics) as one process would, and
    computes the loss of its share; the projections are those one process would train (to float tolerance).
    Process 0 writes the file.

    Returns:
        The path written (atomically); its metadata records the CLIP model and layers.
    """
    parallel = DataParallel.from_environment(config.device)
    try:
        return _train(config, parallel, progress if parallel.is_main else None)
    finally:
        parallel.close()


def _train(config: PatchCLIPTrainConfig, parallel: DataParallel, progress: Callable[[int, float], Any] | None) -> Path:
    data = open_dataset(config.dataset, config.root)
    chosen = list(config.categories) if config.categories else data.categories()
    samples = [sample for category in chosen for sample in data.test_samples(category)]
    if not samples:
        raise ValueError(f"no labelled images in {config.dataset} at {config.root} for categories {chosen}")
    clip = CLIPBackbone(
        config.backbone, config.pretrained, image_size=config.image_size, weights_dir=config.weights_dir,
        method_hint="clipfusion", init_seed=config.seed,
    )  # fmt: skip
    clip.to(parallel.device)
    layer_indices = [layer % clip.depth for layer in config.layers]
    projections = _initial_projections(clip, len(layer_indices)).to(parallel.device)
    with torch.no_grad():
        texts = {category: clip.text_embeddings(category, build_prompt_set()) for category in chosen}
    optimiser = torch.optim.Adam(projections.parameters(), lr=config.learning_rate, betas=config.betas)
    model = parallel.wrap(projections)
    generator = torch.Generator().manual_seed(config.seed)
    by_category: dict[str, list] = {}
    for sample in samples:
        by_category.setdefault(sample.category, []).append(sample)
    done = 0
    for epoch in range(config.epochs):
        order = torch.randperm(len(samples), generator=generator).tolist()
        for start in range(0, len(order), config.batch_size):
            batch = _load_labelled([samples[index] for index in order[start : start + config.batch_size]])
            if batch is None:
                continue
            batch = _with_mosaics(batch, by_category, config.mosaic_rate, generator)
            count = len(batch[0])
            first, last = parallel.share(count)
            # a process whose share is empty (a batch smaller than the job) still joins the gradient average, with
            # one image at weight 0
            mine = [part[first:last] if last > first else part[:1] for part in batch]
            weight = (last - first) * parallel.world_size / count
            loss = _step(clip, model, optimiser, layer_indices, texts, *mine, config=config, weight=weight)
            loss = parallel.sum(loss * weight) / parallel.world_size
            done += count
            if progress is not None:
                progress(done, loss)
        if parallel.is_main:
            logger.info("epoch %d of %d done", epoch + 1, config.epochs)
    path = Path(config.out)
    if parallel.is_main:
        path = _save_projections(projections, config, layer_indices, chosen)
    parallel.barrier()
    return path


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


def mosaic(images: list[np.ndarray], masks: list[torch.Tensor]) -> tuple[np.ndarray, torch.Tensor]:
    """Four ``(H, W, 3)`` images and their ``(H, W)`` masks tiled 2 x 2 (row-major), each resized to the first's
    size: a ``(2H, 2W, 3)`` image and its ``(2H, 2W)`` mask (APRIL-GAN's MVTec AD augmentation)."""
    from PIL import Image

    if len(images) != 4 or len(masks) != 4:
        raise ValueError(f"a mosaic takes 4 images and 4 masks, got {len(images)} and {len(masks)}")
    height, width = images[0].shape[:2]
    tiles, mask_tiles = [], []
    for image, mask in zip(images, masks):
        if image.shape[:2] != (height, width):
            image = np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))
            mask = F.interpolate(mask[None, None], size=(height, width), mode="nearest")[0, 0]
        tiles.append(image)
        mask_tiles.append(mask)
    image = np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0)
    mask = torch.cat([torch.cat(mask_tiles[:2], 1), torch.cat(mask_tiles[2:], 1)], 0)
    return image, mask


def _with_mosaics(batch: tuple, by_category: dict[str, list], rate: float, generator: torch.Generator) -> tuple:
    """Replace each image, with probability ``rate``, by a mosaic of four random images of its category."""
    images, masks, categories = (list(part) for part in batch)
    if rate <= 0:
        return images, masks, categories
    for index, category in enumerate(categories):
        if float(torch.rand(1, generator=generator)) >= rate:
            continue
        pool = by_category[category]
        picks = [pool[int(torch.randint(len(pool), (1,), generator=generator))] for _ in range(4)]
        loaded = _load_labelled(picks)
        if loaded is None or len(loaded[0]) != 4:
            continue  # an unreadable pick (reported): keep the image
        images[index], masks[index] = mosaic(loaded[0], loaded[1])
    return images, masks, categories


def _step(clip, projections, optimiser, layer_indices, texts, images, masks, categories, *, config,
          weight: float = 1.0) -> float:  # fmt: skip
    """One optimiser step of focal + dice between each layer's anomaly probabilities and the masks, at the image's
    resolution (probabilities upsampled) or the patch grid's (masks averaged down), per ``config``; the gradient
    is that of ``weight`` x the loss (a data-parallel process's share). Returns the loss, unweighted."""
    height, width = clip.grid
    size = clip.image_size
    with torch.no_grad():
        tokens = clip.encode_image(clip.preprocess(images), layers=layer_indices).layer_tokens
    if config.loss_resolution == "image":
        resized = [
            F.interpolate(mask[None, None], size=(size, size), mode="bilinear", align_corners=False) for mask in masks
        ]
        targets = torch.cat(resized)[:, 0].flatten(1)  # (B, S*S)
    else:
        targets = torch.stack([F.adaptive_avg_pool2d(mask[None, None], (height, width)).flatten() for mask in masks])
    if config.binarise_masks:
        targets = (targets > 0.5).float()
    targets = targets.to(tokens[0].device)
    text = torch.stack([texts[category] for category in categories])  # (B, 2, E)
    optimiser.zero_grad()
    loss = torch.zeros((), device=targets.device)
    for joint in projections(tokens):
        logits = clip.logit_scale * torch.einsum("bne,bke->bnk", F.normalize(joint, dim=-1), text)  # (B, N, 2)
        if config.loss_resolution == "image":  # upsample the logits, then softmax (APRIL-GAN's order)
            grid = logits.permute(0, 2, 1).reshape(-1, 2, height, width)
            logits = (
                F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=True).flatten(2).transpose(1, 2)
            )
        probabilities = logits.softmax(-1)[..., 1]
        loss = loss + focal_loss(probabilities, targets) + dice_loss(probabilities, targets)
    (loss * weight).backward()
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
        "recipe": json.dumps(
            {
                name: getattr(config, name)
                for name in (
                    "image_size",
                    "binarise_masks",
                    "loss_resolution",
                    "mosaic_rate",
                    "betas",
                    "learning_rate",
                    "batch_size",
                )
            }
        ),
    }
    target = Path(config.out)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp")
    state = {key: value.detach().contiguous() for key, value in projections.state_dict().items()}
    save_file(state, str(temporary), metadata=metadata)
    honour_umask(temporary)  # safetensors writes 0600 whatever the umask
    os.replace(temporary, target)
    return target
