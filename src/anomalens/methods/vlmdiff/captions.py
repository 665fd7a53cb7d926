"""Captions of normal images for VLMDiff: a VLM captioner, a content-hash cache, caption files and a template.

Captions are looked up in this order: a user caption file, the cache, the captioner (whose answers are
appended to the cache at once, so an interrupted run resumes where it stopped), then the template
``"a photo of a {class_name}"``.

The cache is a JSONL file; each line is ``{"sha256": ..., "captioner": ..., "caption": ...}``, keyed by the
SHA-256 of the image file's bytes and the captioner's identity (model id + prompt), so moving or renaming
images keeps their captions and a different model or prompt never reuses another's answers.

Caption files map images to captions as JSON (``{"name or path or sha256": "caption"}``), JSONL
(``{"image": ..., "caption": ...}`` per line) or CSV (``image,caption`` with that header).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from anomalens.io.images import load_image

logger = logging.getLogger(__name__)

# The authors' captioning prompt for MVTec AD / VisA / Real-IAD ("pd" in their captioner), verbatim.
DEFAULT_PROMPT = (
    "Describe the visual features of image in detail with a focus on the main object, with around 60 words and "
    "maybe 4 or 5 sentences."
)
DEFAULT_TEMPLATE = "a photo of a {class_name}"


def image_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of an image file's bytes (the cache key)."""
    from anomalens.backbones.weights import sha256_of

    return sha256_of(path)


def template_caption(class_name: str | None, template: str = DEFAULT_TEMPLATE) -> str:
    """The fallback caption, e.g. ``"a photo of a bottle"``; underscores in class names become spaces."""
    name = (class_name or "object").replace("_", " ")
    try:
        return template.format(class_name=name)
    except (KeyError, IndexError) as error:
        raise ValueError(f"caption template {template!r} may only use the field {{class_name}}") from error


class CaptionCache:
    """Append-only JSONL cache of captions keyed by (image SHA-256, captioner identity)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._entries: dict[tuple[str, str], str] = {}
        if self.path.exists():
            for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    self._entries[(entry["sha256"], entry["captioner"])] = entry["caption"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    # A line cut short by an interrupted write: keep the rest.
                    logger.warning("caption cache %s: ignored unreadable line %d", self.path, number)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, sha256: str, captioner: str) -> str | None:
        return self._entries.get((sha256, captioner))

    def add(self, sha256: str, captioner: str, caption: str) -> None:
        """Record a caption; the line is flushed to disk before returning."""
        self._entries[(sha256, captioner)] = caption
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"sha256": sha256, "captioner": captioner, "caption": caption}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def read_caption_file(path: str | os.PathLike) -> dict[str, str]:
    """Read a JSON, JSONL or CSV caption file into ``{key: caption}`` (keys: path, file name or SHA-256).

    Raises:
        ValueError: The file is missing, empty, or not in one of the three layouts (the message says which).
    """
    source = Path(path)
    if not source.is_file():
        raise ValueError(f"caption file {source} does not exist")
    text = source.read_text(encoding="utf-8")
    captions: dict[str, str] = {}
    if source.suffix.lower() == ".json":
        data = json.loads(text)
        if not isinstance(data, dict) or not all(isinstance(value, str) for value in data.values()):
            raise ValueError(f"caption file {source} must hold a JSON object mapping image names to caption strings")
        captions = dict(data)
    elif source.suffix.lower() == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            entry = json.loads(line)
            key = entry.get("image") or entry.get("sha256") if isinstance(entry, dict) else None
            if not key or not isinstance(entry.get("caption"), str):
                raise ValueError(f"caption file {source} line {number}: expected {{'image': ..., 'caption': ...}}")
            captions[str(key)] = entry["caption"]
    elif source.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
            raise ValueError(f"caption file {source} needs the CSV header 'image,caption', got {reader.fieldnames}")
        captions = {row["image"]: row["caption"] for row in reader}
    else:
        raise ValueError(f"caption file {source}: unknown format {source.suffix!r}; use .json, .jsonl or .csv")
    if not captions:
        raise ValueError(f"caption file {source} holds no captions")
    return captions


def lookup_caption(captions: dict[str, str], path: str | os.PathLike, sha256: str | None = None) -> str | None:
    """A caption for ``path`` from a caption file's mapping: by full path, relative path tail, name or hash."""
    image = Path(path)
    for key in (str(path), image.as_posix(), image.name, image.stem, sha256):
        if key and key in captions:
            return captions[key]
    for key, caption in captions.items():  # keys like "bottle/train/good/000.png"
        if image.as_posix().endswith("/" + key.lstrip("./")):
            return caption
    return None


class VLMCaptioner:
    """Captions images with any transformers image-to-text or image-text-to-text (VLM) model.

    Args:
        model: Repo id or local folder.
        prompt: The question asked (VLMs); image-to-text models ignore it.
        max_new_tokens: Caption length limit.
        device: Torch device for the pipeline (``None``: CPU, or the first GPU if present).
    """

    def __init__(self, model: str, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 120, device: str | None = None):
        self.model = model
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.device = device
        self._pipeline = None
        self._task = ""

    @property
    def identity(self) -> str:
        """What the cache keys captions by: model and a hash of the prompt."""
        return f"{self.model}#{hashlib.sha256(self.prompt.encode()).hexdigest()[:12]}"

    def _load(self) -> None:
        from transformers import pipeline

        from anomalens.backbones.weights import resolve

        source = str(resolve(self.model, method_hint="vlmdiff"))
        errors = []
        for task in ("image-text-to-text", "image-to-text"):
            try:
                self._pipeline = pipeline(task, model=source, device=self.device)
                self._task = task
                return
            except Exception as error:  # noqa: BLE001 - transformers raises many types for a wrong task
                errors.append(f"{task}: {error}")
        raise ValueError(
            f"cannot load captioner {self.model!r} as an image-text-to-text or image-to-text model: {errors}"
        )

    def __call__(self, image: str | os.PathLike | np.ndarray) -> str:
        """The caption of an image file or an ``(H, W, 3)`` uint8 array."""
        from PIL import Image

        if self._pipeline is None:
            self._load()
        image = Image.fromarray(image if isinstance(image, np.ndarray) else load_image(image))  # header checks
        if self._task == "image-text-to-text":
            content = [{"type": "image", "image": image}, {"type": "text", "text": self.prompt}]
            try:
                output = self._pipeline(
                    text=[{"role": "user", "content": content}],
                    max_new_tokens=self.max_new_tokens,
                    return_full_text=False,
                )
            except ValueError as error:  # a model without a chat template takes the prompt as plain text
                if "chat template" not in str(error):
                    raise
                output = self._pipeline(
                    images=image, text=self.prompt, max_new_tokens=self.max_new_tokens, return_full_text=False
                )
        else:
            output = self._pipeline(image, max_new_tokens=self.max_new_tokens)
        first = output[0] if isinstance(output, list) else output
        text = first.get("generated_text", "") if isinstance(first, dict) else str(first)
        if isinstance(text, list):  # chat output: the assistant's last message
            text = text[-1].get("content", "") if text and isinstance(text[-1], dict) else str(text)
        return " ".join(str(text).split())


def caption_images(
    image_paths: Sequence[str | os.PathLike],
    *,
    class_names: Sequence[str | None] | None = None,
    caption_file: str | os.PathLike | None = None,
    captioner: Callable[[str | os.PathLike], str] | None = None,
    captioner_identity: str | None = None,
    cache: CaptionCache | None = None,
    template: str = DEFAULT_TEMPLATE,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> list[str]:
    """One caption per image: caption file, else cache, else captioner (cached at once), else template.

    Args:
        image_paths: The images.
        class_names: Each image's class, for the template (``None``: "object").
        caption_file: A user caption file (see :func:`read_caption_file`); images it lacks fall through.
        captioner: Callable ``path -> caption`` (e.g. :class:`VLMCaptioner`); ``None`` uses no model.
        captioner_identity: The cache key part naming the captioner (defaults to its ``identity``).
        cache: Where captioner answers are stored and looked up.
        template: The fallback caption.
        progress: Wraps the iteration (e.g. ``tqdm``) for a progress bar.

    Returns:
        Captions in the order of ``image_paths``.
    """
    names = list(class_names) if class_names is not None else [None] * len(image_paths)
    if len(names) != len(image_paths):
        raise ValueError(f"got {len(names)} class names for {len(image_paths)} images")
    from_file = read_caption_file(caption_file) if caption_file else {}
    identity = captioner_identity or getattr(captioner, "identity", None) or repr(captioner)
    captions: list[str] = []
    counts = {"file": 0, "cache": 0, "captioner": 0, "template": 0}
    indices: Iterable[int] = range(len(image_paths))
    if progress is not None:
        indices = progress(indices)
    for index in indices:
        path = image_paths[index]
        digest = image_sha256(path) if (from_file or captioner is not None) else None
        caption = lookup_caption(from_file, path, digest) if from_file else None
        if caption is not None:
            counts["file"] += 1
        elif captioner is not None:
            caption = cache.get(digest, identity) if cache is not None else None
            if caption is not None:
                counts["cache"] += 1
            else:
                caption = captioner(path)
                counts["captioner"] += 1
                if cache is not None:
                    cache.add(digest, identity, caption)
        if caption is None:
            caption = template_caption(names[index], template)
            counts["template"] += 1
        captions.append(caption)
    logger.info("captions: %s", ", ".join(f"{count} from {where}" for where, count in counts.items() if count))
    return captions
