"""Training of VLMDiff (``anomalens train vlmdiff``): one model for the normal images of all chosen categories.

The run folder holds everything, written atomically:

- ``checkpoint.pt``: trained weights, optimiser, random-generator state, data order and loss history, saved
  every ``checkpoint_every`` steps; a run started again on the same folder resumes from it and continues
  bit-identically (same data order, noise and timesteps as an uninterrupted run);
- ``model.safetensors`` + ``vlmdiff.json``: the trained model and its architecture, usable at once as
  ``anomalens.create("vlmdiff", checkpoint=RUN_DIR)`` (rewritten at every checkpoint);
- ``losses.csv`` and ``loss.png``: the loss per optimiser step (raw and smoothed);
- ``captions.jsonl``: the captioner's answers, keyed by image content hash (only when a captioner is used).

Steps: images are resized to ``image_size``; the autoencoder is fine-tuned on them as the authors do (L1 +
perceptual + KL; by default for SD's VAE only, see ``autoencoder_finetune_steps``; losses in
``autoencoder_losses.csv``), then frozen; their latents are computed once and normalised with the
training set's mean and standard deviation; each step draws a batch (a fresh permutation every epoch), a
timestep and noise per image, and minimises the noise-prediction error of UNet + guidance network, with the
image's caption (replaced by the empty caption with probability ``caption_dropout``, so the model also
learns the caption-free condition used at test time).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomalens.distributed import DataParallel
from anomalens.io.datasets import list_datasets, open_dataset
from anomalens.io.images import images_to_tensor, readable_images
from anomalens.io.outputs import atomic_write_bytes, honour_umask, png_bytes
from anomalens.methods.vlmdiff.architecture import VLMDiffArchitecture
from anomalens.methods.vlmdiff.autoencoder import perceptual_distance
from anomalens.methods.vlmdiff.captions import (
    DEFAULT_PROMPT,
    DEFAULT_TEMPLATE,
    CaptionCache,
    VLMCaptioner,
    caption_images,
)
from anomalens.methods.vlmdiff.network import VLMDiffNet
from anomalens.methods.vlmdiff.run_files import RUN_CONFIG_FILE, RUN_WEIGHTS_FILE, upgrade_architecture

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
LOSS_CSV = "losses.csv"
LOSS_PLOT = "loss.png"
CAPTION_CACHE = "captions.jsonl"
AUTOENCODER_LOSS_CSV = "autoencoder_losses.csv"
DEFAULT_EPOCHS = 300  # the authors' training length on MVTec AD and VisA
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
# LPIPS's VGG layers (relu1_2 .. relu4_3; its relu5_3 lies beyond what CRAFT's VGG16-BN holds) in vgg16_bn's numbering
PERCEPTUAL_LAYERS = {"vgg16_bn": ("features.5", "features.12", "features.22", "features.32")}


@dataclass
class VLMDiffTrainConfig:
    """Settings of one VLMDiff training run (recorded in ``vlmdiff.json``)."""

    dataset: str = field(metadata={"choices": list_datasets})  # dataset layout
    root: str  # its root folder
    categories: tuple[str, ...] | None = None  # categories trained together, from any of the roots; None = all
    extra_roots: tuple[str, ...] = ()  # further roots of the same layout (e.g. MVTec AD and MPDD): one model
    # learns the chosen categories of every root together (a category name may appear in one root only)
    architecture: VLMDiffArchitecture = field(default_factory=VLMDiffArchitecture)  # the model to build
    steps: int | None = None  # optimiser steps in total (a resumed run continues up to this number); None: epochs
    epochs: int | None = None  # length in passes over the images instead, one step taking batch_size x
    # gradient_accumulation images; None with steps None: 300 (the authors' for MVTec AD / VisA; 100 for Real-IAD)
    batch_size: int = 12  # images per micro-batch (the authors: 12)
    gradient_accumulation: int = 4  # micro-batches per optimiser step (the authors: 4)
    learning_rate: float = 1e-5  # AdamW learning rate (the paper: 1e-5, fine-tuning SD; from scratch needs more)
    warmup_steps: int = 0  # linear learning-rate warm-up
    weight_decay: float = 0.0  # AdamW weight decay
    checkpoint_every: int = 500  # steps between checkpoints
    seed: int = 0  # model initialisation, data order, timesteps, noise and caption dropout
    caption_file: str | None = None  # user captions (JSON / JSONL / CSV); see anomalens.methods.vlmdiff.captions
    captioner: str | None = None  # transformers VLM / image-to-text model id or folder; None: no model
    caption_prompt: str = DEFAULT_PROMPT  # the question asked to the captioner
    caption_template: str = DEFAULT_TEMPLATE  # fallback caption for images without one
    caption_dropout: float = 0.1  # share of training captions replaced by "" (the test-time condition)
    mixed_precision: str = "auto"  # "auto" (bf16 on a GPU that has it, else none), "no", "bf16", "fp16"
    frozen_encoder: bool | None = None  # True: train only the guidance network and the UNet's decoder (the
    # authors', whose encoder is SD 1.5's pretrained one); False: the whole UNet; None: frozen when the UNet starts
    # from pretrained weights, trained when it starts random (a frozen random encoder costs 0.7 P-AUROC on bottle)
    # Fine-tuning of the autoencoder on the training images before the diffusion model trains (the authors always
    # fine-tune SD's KL-f8 VAE per dataset: L1 + LPIPS + KL, batch 1 x 8 accumulated, lr 4.5e-5)
    autoencoder_finetune_steps: int | None = None  # optimiser steps; None: 1000 epochs for SD's VAE (their trainer
    # sets no length: PyTorch Lightning's default max_epochs), none for TAEF2 / tiny (the authors never used them)
    autoencoder_learning_rate: float = 4.5e-5  # AdamW learning rate (the authors')
    autoencoder_batch_size: int = 1  # images per micro-batch (the authors')
    autoencoder_gradient_accumulation: int = 8  # micro-batches per step (the authors')
    autoencoder_perceptual: str | None = "vgg16_bn"  # backbone of the LPIPS-style term (weight 1, as LDM's kl-f8
    # loss); its relu1_2..relu4_3 layers with uniform channel weights (LPIPS's learned ones are not shipped); None:
    # L1 (+KL) only
    autoencoder_perceptual_weights: str | None = "default"  # its weights: "default" (torchvision's ImageNet
    # vgg16_bn), a file (e.g. CRAFT's craft_mlt_25k.pth, whose VGG16-BN layers load), or None (random: a guess)
    autoencoder_kl_weight: float = 1e-6  # weight of the KL term of a KL VAE (LDM's kl-f8 config)
    device: str = "auto"  # "auto": the first GPU (under torchrun: cuda:LOCAL_RANK) if present, else the CPU
    weights_dir: str | None = None  # folder searched first for pretrained weights

    def __post_init__(self) -> None:
        if isinstance(self.architecture, dict):
            self.architecture = VLMDiffArchitecture.from_dict(self.architecture)
        if self.frozen_encoder is None:  # resolved here, so a run records (and a resume compares) what it trained
            self.frozen_encoder = self.architecture.unet_weights is not None
        if self.categories is not None:
            self.categories = tuple(self.categories)
        self.extra_roots = tuple(str(root) for root in self.extra_roots)
        if self.steps is not None and self.epochs is not None:
            raise ValueError(f"train vlmdiff: give steps ({self.steps}) or epochs ({self.epochs}), not both")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"train vlmdiff option steps={self.steps!r} must be >= 1")
        for name in (
            "batch_size",
            "gradient_accumulation",
            "checkpoint_every",
            "autoencoder_batch_size",
            "autoencoder_gradient_accumulation",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"train vlmdiff option {name}={getattr(self, name)!r} must be >= 1")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"train vlmdiff option epochs={self.epochs!r} must be >= 1")
        for name in ("warmup_steps", "autoencoder_finetune_steps", "autoencoder_kl_weight"):
            if getattr(self, name) is not None and not getattr(self, name) >= 0:  # NaN is refused too
                raise ValueError(f"train vlmdiff option {name}={getattr(self, name)!r} must be >= 0")
        for name in ("learning_rate", "autoencoder_learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"train vlmdiff option {name}={getattr(self, name)!r} must be > 0")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"train vlmdiff option caption_dropout={self.caption_dropout!r} must be in [0, 1]")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"unknown mixed_precision {self.mixed_precision!r}; valid: {', '.join(MIXED_PRECISION)}")

    def autoencoder_steps(self, image_count: int) -> int:
        """Optimiser steps of autoencoder fine-tuning for ``image_count`` training images (see the field)."""
        if self.autoencoder_finetune_steps is not None:
            return self.autoencoder_finetune_steps
        if self.architecture.autoencoder != "sd":
            return 0
        return math.ceil(1000 * image_count / (self.autoencoder_batch_size * self.autoencoder_gradient_accumulation))

    def resumable_fields(self) -> dict[str, Any]:
        """Settings that must match for a resume (everything but the step budget, interval and device)."""
        values = asdict(self)
        for name in ("steps", "epochs", "checkpoint_every", "device", "weights_dir"):
            values.pop(name)
        return json.loads(json.dumps(values))


def _settings_that_matter(values: dict[str, Any]) -> dict[str, Any]:
    """Resumable settings without the autoencoder fine-tuning's when the run fine-tunes no autoencoder."""
    steps = values.get("autoencoder_finetune_steps")
    if steps == 0 or (steps is None and values.get("architecture", {}).get("autoencoder") != "sd"):
        return {name: value for name, value in values.items() if not name.startswith("autoencoder_")}
    return values


def _device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def _autocast_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        if choice in ("bf16", "fp16"):
            logger.warning("mixed precision %s applies on a GPU only; training in float32 on %s", choice, device)
        return None
    if choice == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]


def training_categories(config: VLMDiffTrainConfig) -> list[tuple[str, Any]]:
    """``(category, dataset)`` pairs to train on, looked up in ``root`` and every extra root.

    Raises:
        ValueError: A chosen category is in no root (the message lists each root's categories), or a category
            name is in two roots (the model could not tell them apart by name).
    """
    datasets = [open_dataset(config.dataset, root) for root in (config.root, *config.extra_roots)]
    found: dict[str, list[Any]] = {}
    for data in datasets:
        for category in data.categories():
            found.setdefault(category, []).append(data)
    chosen = list(config.categories) if config.categories else sorted(found)
    listing = "; ".join(f"{data.root}: {', '.join(data.categories()) or 'none'}" for data in datasets)
    missing = [category for category in chosen if category not in found]
    if missing:
        raise ValueError(f"train vlmdiff: categor{'y' if len(missing) == 1 else 'ies'} {missing} not found in the "
                         f"{config.dataset} root(s); available: {listing}")  # fmt: skip
    twice = [category for category in chosen if len(found[category]) > 1]
    if twice:
        raise ValueError(f"train vlmdiff: category {twice[0]!r} is in more than one root ({listing}); "
                         "train them apart or rename one")  # fmt: skip
    return [(category, found[category][0]) for category in chosen]


def load_training_images(config: VLMDiffTrainConfig) -> tuple[torch.Tensor, list[str], list[str]]:
    """The normal training images of the chosen categories, resized: uint8 ``(N, 3, S, S)``, paths, categories.

    Unreadable images are reported and skipped.
    """
    chosen = training_categories(config)
    size = config.architecture.image_size
    pixels, paths, categories = [], [], []
    for category, data in chosen:
        for path, image in readable_images([sample.image_path for sample in data.train_samples(category)]):
            pixels.append((images_to_tensor([image], size)[0] * 255.0).round().to(torch.uint8))
            paths.append(str(path))
            categories.append(category)
    if not pixels:
        roots, names = [config.root, *config.extra_roots], [category for category, _ in chosen]
        raise ValueError(f"no readable normal training image in {config.dataset} at {roots} for {names}")
    return torch.stack(pixels), paths, categories


def perceptual_network(config: VLMDiffTrainConfig) -> torch.nn.Module | None:
    """The frozen backbone of the autoencoder's perceptual loss, or ``None`` when it has none."""
    if config.autoencoder_perceptual is None:
        return None
    from anomalens.backbones import FeatureBackbone

    layers = PERCEPTUAL_LAYERS.get(config.autoencoder_perceptual)
    return FeatureBackbone(
        config.autoencoder_perceptual,
        layers,
        pretrained=config.autoencoder_perceptual_weights,
        weights_dir=config.weights_dir,
        method_hint="train vlmdiff --autoencoder-perceptual-weights",
        init_seed=config.seed,
    )


def autoencoder_loss(
    net: VLMDiffNet,
    images: torch.Tensor,
    perceptual: torch.nn.Module | None,
    kl_weight: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """The authors' autoencoder loss on ``(B, 3, S, S)`` images in [0, 1]: mean L1 + perceptual distance (weight 1)
    + ``kl_weight`` x KL (KL VAEs only), averaged over the batch; a scalar."""
    reconstruction, kl = net.autoencoder.training_reconstruction(images, generator)
    loss = (reconstruction.float() - images.float()).abs().mean((1, 2, 3))
    if perceptual is not None:
        loss = loss + perceptual_distance(perceptual(images), perceptual(reconstruction))
    if kl is not None:
        loss = loss + kl_weight * kl.float()
    return loss.mean()


@torch.no_grad()
def encode_dataset(net: VLMDiffNet, images: torch.Tensor, device: torch.device, batch_size: int = 16) -> torch.Tensor:
    """Raw latents of all images ``(N, C, S/8, S/8)`` (float32, on the CPU)."""
    latents = []
    for start in range(0, images.shape[0], batch_size):
        batch = images[start : start + batch_size].to(device).float() / 255.0
        latents.append(net.autoencoder.encode(batch).float().cpu())
    return torch.cat(latents)


def write_loss_csv(path: Path, history: list[dict[str, float]]) -> None:
    """``step,loss,learning_rate,seconds`` per optimiser step, written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["step", "loss", "learning_rate", "seconds"])
    writer.writeheader()
    writer.writerows(history)
    atomic_write_bytes(path, buffer.getvalue().encode())


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` values (shorter at the start)."""
    result, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        result.append(total / min(index + 1, window))
    return result


def plot_losses(path: Path, steps: list[int], losses: list[float], title: str = "VLMDiff training loss") -> None:
    """A PNG line plot of the losses (raw in light grey, moving average in blue), log-scaled y, drawn with Pillow."""
    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 900, 500, 80, 20, 40, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 12), title, fill="black")
    if not losses:
        atomic_write_bytes(path, png_bytes(np.asarray(image)))
        return
    positive = [max(value, 1e-8) for value in losses]
    low, high = math.log10(min(positive)), math.log10(max(positive))
    if high - low < 1e-6:
        low, high = low - 0.5, high + 0.5
    first, last = steps[0], max(steps[-1], steps[0] + 1)

    def point(step: float, value: float) -> tuple[float, float]:
        x = left + (step - first) / (last - first) * (width - left - right)
        y = top + (high - math.log10(max(value, 1e-8))) / (high - low) * (height - top - bottom)
        return x, y

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for fraction in np.linspace(0, 1, 5):
        value = 10 ** (high - fraction * (high - low))
        y = top + fraction * (height - top - bottom)
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((4, y - 6), f"{value:.3g}", fill="black")
        step = first + fraction * (last - first)
        x = left + fraction * (width - left - right)
        draw.line([x, height - bottom, x, height - bottom + 4], fill="black")
        draw.text((x - 12, height - bottom + 8), f"{int(step)}", fill="black")
    draw.text((width // 2 - 20, height - 18), "step", fill="black")
    if len(losses) > 1:
        draw.line([point(s, v) for s, v in zip(steps, positive)], fill=(200, 200, 200), width=1)
        window = max(1, len(losses) // 50)
        draw.line([point(s, v) for s, v in zip(steps, smooth(positive, window))], fill=(31, 119, 180), width=2)
        draw.text((width - right - 260, top + 8), f"grey: per step; blue: mean of {window}", fill="black")
    atomic_write_bytes(path, png_bytes(np.asarray(image)))


def save_run_model(
    net: VLMDiffNet, out: Path, config: VLMDiffTrainConfig, meta: dict[str, Any], *, with_autoencoder: bool = False
) -> None:
    """Write ``model.safetensors`` (trained tensors, the fine-tuned autoencoder's with ``with_autoencoder``) and
    ``vlmdiff.json`` atomically."""
    from safetensors.torch import save_file

    parts = dict(net.trainable_modules())
    if with_autoencoder:
        parts["autoencoder"] = net.autoencoder
    tensors = {
        f"{name}.{key}": value.detach().cpu().contiguous()
        for name, module in parts.items()
        for key, value in module.state_dict().items()
    }
    tensors["latent_shift"] = net.latent_shift.detach().cpu().clone()
    tensors["latent_scale"] = net.latent_scale.detach().cpu().clone()
    temporary = out / f".{RUN_WEIGHTS_FILE}.tmp"
    save_file(tensors, str(temporary), metadata={"format": "anomalens-vlmdiff-run"})
    honour_umask(temporary)  # safetensors writes 0600 whatever the umask
    os.replace(temporary, out / RUN_WEIGHTS_FILE)
    record = {
        "format": "anomalens-vlmdiff-run",
        "architecture": asdict(config.architecture),
        "training": json.loads(json.dumps(asdict(config), default=str)),
        **meta,
    }
    atomic_write_bytes(out / RUN_CONFIG_FILE, (json.dumps(record, indent=2) + "\n").encode())


class EpochSampler:
    """Batches of image indices: a fresh permutation each epoch, drawn from ``generator``; batches may span epochs.

    ``order`` and ``position`` are the whole state (with the generator's), so a checkpoint can restore it.
    """

    def __init__(self, count: int, generator: torch.Generator):
        self.count = count
        self.generator = generator
        self.order = torch.randperm(count, generator=generator)
        self.position = 0

    def next(self, batch_size: int) -> torch.Tensor:
        """The next ``batch_size`` indices ``(batch_size,)``."""
        chosen, taken = [], 0
        while taken < batch_size:
            if self.position >= len(self.order):
                self.order, self.position = torch.randperm(self.count, generator=self.generator), 0
            take = min(batch_size - taken, len(self.order) - self.position)
            chosen.append(self.order[self.position : self.position + take])
            self.position += take
            taken += take
        return torch.cat(chosen)


def _learning_rate(config: VLMDiffTrainConfig, step: int) -> float:
    if config.warmup_steps and step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    return config.learning_rate


def train_vlmdiff(
    config: VLMDiffTrainConfig,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    progress: Callable[[int, int, float], Any] | None = None,
    caption_progress: Callable | None = None,
    stop_after: int | None = None,
) -> Path:
    """Train (or resume training) a VLMDiff model into the run folder ``out``.

    Args:
        config: The run's settings.
        out: Run folder. If it holds a checkpoint of a run with the same settings, training resumes from it.
        overwrite: Start afresh even if ``out`` holds a checkpoint.
        progress: Called after every optimiser step with ``(step, total steps, loss)``.
        caption_progress: Wraps the captioning loop (e.g. ``tqdm``).
        stop_after: Stop (after checkpointing) once this step is reached, as an interruption would; for tests.

    Launched by ``torchrun`` (several processes), training is data-parallel (:mod:`anomalens.distributed`): each
    process takes its share of every global batch of ``batch_size`` images, and the weights are those one
    process would train (to float tolerance); process 0 writes the run folder.

    Returns:
        The run folder.

    Raises:
        ValueError: ``out`` holds a checkpoint of a run with different settings (the message names them), or
            ``batch_size`` is smaller than the number of processes.
    """
    out = Path(out)
    parallel = DataParallel.from_environment(config.device)
    try:
        if config.batch_size < parallel.world_size:
            raise ValueError(f"train vlmdiff option batch_size={config.batch_size} (the global batch) must be at least "
                             f"the {parallel.world_size} data-parallel processes")  # fmt: skip
        if parallel.is_main:
            out.mkdir(parents=True, exist_ok=True)
            resume = _read_resume(config, out, overwrite)
        parallel.barrier()
        if not parallel.is_main:  # after process 0 has cleared the run (overwrite) or checked it
            resume = _read_resume(config, out, overwrite=False) if not overwrite else None
        trainer = _Trainer(config, out, resume, caption_progress if parallel.is_main else None, parallel)
        trainer.run(progress if parallel.is_main else None, stop_after)
    finally:
        parallel.close()
    return out


def _write_checkpoint(out: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to the run's ``checkpoint.pt`` atomically."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(out / CHECKPOINT_FILE, buffer.getvalue())


def _read_resume(config: VLMDiffTrainConfig, out: Path, overwrite: bool) -> dict[str, Any] | None:
    """The checkpoint to resume from (checked against ``config``), or ``None``; ``overwrite`` clears the run."""
    checkpoint_path = out / CHECKPOINT_FILE
    if checkpoint_path.exists() and not overwrite:
        resume = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        saved = resume["config"]
        if "architecture" in saved:  # written by an earlier version: its new fields at the values it trained with
            saved = {**saved, "architecture": upgrade_architecture(saved["architecture"])}
        saved, current = _settings_that_matter(saved), _settings_that_matter(config.resumable_fields())
        # a field added since the checkpoint was written counts as equal when it has its default now
        defaults = VLMDiffTrainConfig(dataset="", root="").resumable_fields()
        different = sorted(
            key for key in set(saved) | set(current) if saved.get(key, defaults.get(key)) != current.get(key)
        )
        if different:
            raise ValueError(
                f"{out} holds a checkpoint of a run with other settings ({', '.join(different)}); "
                "use another --out, the same settings, or --overwrite"
            )
        if resume.get("phase") == "autoencoder":
            logger.info("resuming %s: autoencoder fine-tuning from step %d", out, resume["autoencoder_step"])
        else:
            logger.info("resuming %s from step %d", out, resume["step"])
        return resume
    if overwrite:
        for name in (CHECKPOINT_FILE, LOSS_CSV, LOSS_PLOT, RUN_WEIGHTS_FILE, RUN_CONFIG_FILE, AUTOENCODER_LOSS_CSV):
            (out / name).unlink(missing_ok=True)
    return None


class _NoiseLoss(torch.nn.Module):
    """The training loss as a module's forward, for DistributedDataParallel to wrap (its parameters: the net's)."""

    def __init__(self, net: VLMDiffNet):
        super().__init__()
        self.net = net

    def forward(self, latents: torch.Tensor, images: torch.Tensor, captions: list[str], timesteps: torch.Tensor,
                noise: torch.Tensor) -> torch.Tensor:  # fmt: skip
        return self.net.training_loss(latents, images, captions, draws=(timesteps, noise))


class _Trainer:
    """One training run: data, captions, model, optimiser and the training loop, resumable from a checkpoint.

    The seeded CPU generator is used in a fixed order (autoencoder fine-tuning, data order, caption dropout,
    timesteps and noise), and its state is checkpointed, so a resumed run continues bit for bit.
    """

    def __init__(self, config: VLMDiffTrainConfig, out: Path, resume: dict | None, caption_progress: Callable | None,
                 parallel: DataParallel | None = None):  # fmt: skip
        self.config, self.out, self.resume = config, out, resume
        self.parallel = parallel or DataParallel(0, 1, _device(config.device))
        self.device = self.parallel.device
        self.autocast_dtype = _autocast_dtype(config.mixed_precision, self.device)
        self.images, self.paths, self.categories = load_training_images(config)
        if self.parallel.is_main:
            logger.info("training on %d normal image(s) of %s", len(self.paths), sorted(set(self.categories)))
        for main_turn in (True, False):  # process 0 captions (and fills the cache) first, the others read the cache
            if self.parallel.is_main == main_turn:
                self.captions = self._captions(caption_progress)
            self.parallel.barrier()
        self.net = VLMDiffNet(config.architecture, weights_dir=config.weights_dir, init_seed=config.seed)
        self.net.to(self.device)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.latents = self._prepare_latents()
        self._prepare_optimiser()

    def _captions(self, caption_progress: Callable | None) -> list[str]:
        config = self.config
        captioner = VLMCaptioner(config.captioner, config.caption_prompt) if config.captioner else None
        return caption_images(
            self.paths,
            class_names=self.categories,
            caption_file=config.caption_file,
            captioner=captioner,
            cache=CaptionCache(self.out / CAPTION_CACHE) if captioner is not None else None,
            template=config.caption_template,
            progress=caption_progress,
        )

    def _prepare_latents(self) -> torch.Tensor:
        """Fine-tune (or restore) the autoencoder, then encode the images and fit the latent statistics."""
        net = self.net
        self.autoencoder_steps = self.config.autoencoder_steps(len(self.paths))
        if self.autoencoder_steps > 0:
            if self.resume is not None and self.resume.get("phase", "diffusion") == "diffusion":
                net.autoencoder.load_state_dict(self.resume["autoencoder"])
            else:
                self._finetune_autoencoder()
        raw_latents = encode_dataset(net, self.images, self.device)
        net.latent_shift.fill_(float(raw_latents.mean()))
        net.latent_scale.fill_(float(raw_latents.std()))
        return (raw_latents - net.latent_shift.cpu()) / net.latent_scale.cpu()

    def _finetune_autoencoder(self) -> None:
        """Fine-tune the autoencoder on the training images (:func:`autoencoder_loss`), checkpointed every
        ``checkpoint_every`` steps so an interrupted fine-tuning resumes bit for bit; then freeze it."""
        config, net, total = self.config, self.net, self.autoencoder_steps
        autoencoder = net.autoencoder
        autoencoder.train().requires_grad_(True)
        perceptual = perceptual_network(config)
        if perceptual is not None:
            perceptual.to(self.device)
        optimiser = torch.optim.AdamW(autoencoder.parameters(), lr=config.autoencoder_learning_rate)
        step, history = 0, []
        if self.resume is not None:  # interrupted while fine-tuning the autoencoder
            autoencoder.load_state_dict(self.resume["autoencoder"])
            optimiser.load_state_dict(self.resume["autoencoder_optimiser"])
            self.generator.set_state(self.resume["generator"])
            step, history = self.resume["autoencoder_step"], self.resume["autoencoder_history"]
            self.resume = None  # the diffusion model starts afresh
        logger.info("fine-tuning the autoencoder: step %d of %d", step, total)
        began = time.perf_counter() - (history[-1]["seconds"] if history else 0.0)
        while step < total:
            optimiser.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for _ in range(config.autoencoder_gradient_accumulation):
                count = min(config.autoencoder_batch_size, len(self.paths))
                indices = torch.randint(0, len(self.paths), (count,), generator=self.generator)
                batch = self.images[indices].to(self.device).float() / 255.0
                loss = autoencoder_loss(net, batch, perceptual, config.autoencoder_kl_weight, self.generator)
                (loss / config.autoencoder_gradient_accumulation).backward()
                loss_sum += float(loss.detach()) / config.autoencoder_gradient_accumulation
            optimiser.step()
            step += 1
            history.append({"step": step, "loss": loss_sum, "learning_rate": config.autoencoder_learning_rate,
                            "seconds": time.perf_counter() - began})  # fmt: skip
            if step % config.checkpoint_every == 0 or step == total:
                state = {
                    "config": config.resumable_fields(),
                    "phase": "autoencoder",
                    "autoencoder": autoencoder.state_dict(),
                    "autoencoder_optimiser": optimiser.state_dict(),
                    "generator": self.generator.get_state(),
                    "autoencoder_step": step,
                    "autoencoder_history": history,
                }
                if self.parallel.is_main:  # every process fine-tunes the same autoencoder; process 0 writes
                    _write_checkpoint(self.out, state)
                    write_loss_csv(self.out / AUTOENCODER_LOSS_CSV, history)
                    logger.info("autoencoder step %d/%d: loss %.4f", step, total, loss_sum)
                self.parallel.barrier()
        autoencoder.eval().requires_grad_(False)

    def _prepare_optimiser(self) -> None:
        """AdamW over the trainable parts, the data sampler, and the resumed state where there is one."""
        config, net = self.config, self.net
        if config.frozen_encoder:
            for module in net.unet_encoder():
                module.requires_grad_(False)
        parameters = [
            parameter
            for module in net.trainable_modules().values()
            for parameter in module.parameters()
            if parameter.requires_grad
        ]
        self.optimiser = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
        net.requires_grad_(False)  # only what the optimiser updates takes gradients (DDP averages exactly those)
        for parameter in parameters:
            parameter.requires_grad_(True)
        self.model = self.parallel.wrap(_NoiseLoss(net))
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
        self.step, self.history = 0, []
        self.sampler = EpochSampler(len(self.paths), self.generator)
        if self.resume is not None:
            for name, module in net.trainable_modules().items():
                module.load_state_dict(self.resume["modules"][name])
            self.optimiser.load_state_dict(self.resume["optimiser"])
            self.generator.set_state(self.resume["generator"])
            self.step, self.history = self.resume["step"], self.resume["history"]
            self.sampler.order, self.sampler.position = self.resume["order"], self.resume["position"]

    def checkpoint(self) -> None:
        """Write the resumable state, the run's model and its loss curve (each file atomically; process 0 only,
        the others waiting for it)."""
        if self.parallel.is_main:
            self._save_files()
        self.parallel.barrier()

    def _save_files(self) -> None:
        config, net = self.config, self.net
        state = {
            "config": config.resumable_fields(),
            "modules": {name: module.state_dict() for name, module in net.trainable_modules().items()},
            "optimiser": self.optimiser.state_dict(),
            "generator": self.generator.get_state(),
            "step": self.step,
            "history": self.history,
            "order": self.sampler.order,
            "position": self.sampler.position,
        }
        if self.autoencoder_steps > 0:
            state["autoencoder"] = net.autoencoder.state_dict()
        _write_checkpoint(self.out, state)
        meta = {"steps_done": self.step, "images": len(self.paths), "categories": sorted(set(self.categories)),
                "captions": sorted(set(self.captions))[:20]}  # fmt: skip
        save_run_model(net, self.out, config, meta, with_autoencoder=self.autoencoder_steps > 0)
        write_loss_csv(self.out / LOSS_CSV, self.history)
        steps = [row["step"] for row in self.history]
        plot_losses(self.out / LOSS_PLOT, steps, [row["loss"] for row in self.history])

    def optimiser_step(self) -> tuple[float, float]:
        """One optimiser step over ``gradient_accumulation`` micro-batches; returns (loss, learning rate).

        Every process draws each global micro-batch whole (indices, caption dropout, timesteps, noise: the one
        generator, in one order) and computes the loss of its share, weighted by the share's size so that DDP's
        gradient average is the gradient of the global batch's mean loss."""
        config, parallel = self.config, self.parallel
        learning_rate = _learning_rate(config, self.step)
        for group in self.optimiser.param_groups:
            group["lr"] = learning_rate
        self.optimiser.zero_grad(set_to_none=True)
        first, last = parallel.share(config.batch_size)
        share = (last - first) / config.batch_size
        total = 0.0
        for micro in range(config.gradient_accumulation):
            indices = self.sampler.next(config.batch_size)
            keep = torch.rand(len(indices), generator=self.generator) >= config.caption_dropout
            timesteps, noise = self.net.draw_noise((len(indices), *self.latents.shape[1:]), self.generator)
            indices, keep = indices[first:last], keep[first:last]
            captions = [self.captions[i] if kept else "" for i, kept in zip(indices.tolist(), keep.tolist())]
            latents = self.latents[indices].to(self.device)
            images = self.images[indices].to(self.device).float() / 255.0
            dtype = self.autocast_dtype
            syncing = parallel.world_size == 1 or micro == config.gradient_accumulation - 1
            with contextlib.nullcontext() if syncing else self.model.no_sync():  # all-reduce once per step
                with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
                    loss = self.model(latents, images, captions, timesteps[first:last], noise[first:last])
                loss = loss * (share * parallel.world_size / config.gradient_accumulation)
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += float(loss.detach()) / parallel.world_size
        total = parallel.sum(total)
        if self.scaler:
            self.scaler.step(self.optimiser)
            self.scaler.update()
        else:
            self.optimiser.step()
        return total, learning_rate

    def run(self, progress: Callable[[int, int, float], Any] | None, stop_after: int | None) -> None:
        """Train up to ``total_steps`` (or ``stop_after``), checkpointing every ``checkpoint_every`` steps."""
        config, total = self.config, self.total_steps
        self.net.train()
        self.net.autoencoder.eval()
        began = time.perf_counter() - (self.history[-1]["seconds"] if self.history else 0.0)
        session_began, start_step = time.perf_counter(), self.step
        while self.step < total:
            loss, learning_rate = self.optimiser_step()
            self.step += 1
            self.history.append({"step": self.step, "loss": loss, "learning_rate": learning_rate,
                                 "seconds": time.perf_counter() - began})  # fmt: skip
            if progress is not None:
                progress(self.step, total, loss)
            if self.step % config.checkpoint_every == 0 or self.step == total or self.step == stop_after:
                self.checkpoint()
                self._log_progress((time.perf_counter() - session_began) / (self.step - start_step))
            if stop_after is not None and self.step >= stop_after:
                break
        if self.step == start_step:
            self.checkpoint()
        self.net.eval()

    @property
    def total_steps(self) -> int:
        """Optimiser steps of the whole run: ``steps``, or ``epochs`` passes over the training images."""
        config = self.config
        if config.steps is not None:
            return config.steps
        epochs = DEFAULT_EPOCHS if config.epochs is None else config.epochs
        return math.ceil(epochs * len(self.paths) / (config.batch_size * config.gradient_accumulation))

    def _log_progress(self, seconds_per_step: float) -> None:
        if not self.parallel.is_main:
            return
        recent = [row["loss"] for row in self.history[-self.config.checkpoint_every :]]
        logger.info(
            "step %d/%d: mean loss %.4f over the last %d steps, %.0f s elapsed, about %.0f s left; checkpointed",
            self.step, self.total_steps, sum(recent) / len(recent), len(recent), self.history[-1]["seconds"],
            seconds_per_step * (self.total_steps - self.step),
        )  # fmt: skip
