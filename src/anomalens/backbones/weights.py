"""One resolver for every pretrained component, and a checked state-dict loader.

A weight reference can be:

- a registered component name (``"taef2_encoder"``, ``"wide_resnet50_2"``; see :data:`WEIGHTS`),
  looked up in order in the ``weights_dir`` argument, ``$ANOMALENS_WEIGHTS_DIR``, the cache
  (``$ANOMALENS_CACHE``, default ``~/.cache/anomalens``), then downloaded on a connected machine;
- a local file (``.pth``, ``.pt``, ``.bin``, ``.safetensors``) or folder, or such a file's bare name found in a
  weights folder (e.g. PatchCLIP projections from ``anomalens train patchclip`` kept beside the other weights);
- a Hugging Face repo id for diffusers / transformers components (``"stabilityai/stable-diffusion-2-1-base"``,
  optionally ``"hf:ORG/NAME"``), resolved through the Hugging Face cache;
- an open_clip model and pretrained tag (``"open_clip:ViT-B-16-plus-240/laion400m_e31"``).

Every kind is looked up first in the weights folders (``--weights-dir``, then ``$ANOMALENS_WEIGHTS_DIR``, then the
cache), laid out as::

    DIR/taef2_encoder.pth                      a registered component: its file name, at the top or in any
    DIR/taef2/taef2_encoder.pth                direct sub-folder
    DIR/open_clip/ViT-B-16/laion400m_e32/      an open_clip model and tag: a folder holding one checkpoint
    DIR/ViT-B-16-laion400m_e32.safetensors     ... or one file named MODEL-TAG (.safetensors, .bin, .pt, .pth)
    DIR/stabilityai/stable-diffusion-2-1-base/ a Hugging Face repo: a folder holding the repo's files
    DIR/hub/models--ORG--NAME/                 ... or a Hugging Face cache (``huggingface-cli download --cache-dir
                                               DIR/hub``; DIR itself may be such a cache too)

Offline (``HF_HUB_OFFLINE=1`` or ``ANOMALENS_OFFLINE=1``) nothing is downloaded, and a missing weight
raises :class:`WeightsNotFoundError` naming the component, the folders searched and both ways to supply it.
Online, a host that cannot be reached within a few seconds fails at once, instead of a minute of retries.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from anomalens.io.outputs import honour_umask, sha256_file

logger = logging.getLogger(__name__)

WEIGHTS_DIR_ENV = "ANOMALENS_WEIGHTS_DIR"
CACHE_ENV = "ANOMALENS_CACHE"
OFFLINE_ENVS = ("ANOMALENS_OFFLINE", "HF_HUB_OFFLINE")


@dataclass(frozen=True)
class WeightSource:
    """Where a registered pretrained component comes from."""

    component: str  # registry key, used in messages and as a cache sub-folder
    filename: str  # file name searched for in weights folders and the cache
    url: str  # direct download address for connected machines
    sha256: str | None  # expected digest of the file (None: not pinned upstream)
    size_mb: float  # download size, for messages
    licence: str  # licence of the weights


_TAESD_COMMIT = "5cccb12dc72074a4be35680c3b108548a7c69978"


def _taesd(component: str, sha256: str) -> WeightSource:
    return WeightSource(
        component=component,
        filename=f"{component}.pth",
        url=f"https://github.com/madebyollin/taesd/raw/{_TAESD_COMMIT}/{component}.pth",
        sha256=sha256,
        size_mb=2.7,
        licence="MIT",
    )


def _torchvision(component: str, filename: str, size_mb: float) -> WeightSource:
    return WeightSource(
        component=component,
        filename=filename,
        url=f"https://download.pytorch.org/models/{filename}",
        sha256=None,  # torchvision pins the first 8 hex digits in the file name only
        size_mb=size_mb,
        licence="BSD-3-Clause (torchvision)",
    )


WEIGHTS: dict[str, WeightSource] = {
    "taef2_encoder": _taesd("taef2_encoder", "10a4e1021e89d7551eaf161352da8dbd0b1aa83872ae28b150c1df1ce2f147b6"),
    "taef2_decoder": _taesd("taef2_decoder", "0a44a31e1ae59eb9dbf9359d24942fd3ef5928162c1800d97a28c61d51be0ab5"),
    "wide_resnet50_2": _torchvision("wide_resnet50_2", "wide_resnet50_2-32ee1156.pth", 263.0),
    "resnet18": _torchvision("resnet18", "resnet18-f37072fd.pth", 44.7),
    "vgg16_bn": _torchvision("vgg16_bn", "vgg16_bn-6c64b313.pth", 528.0),
    "dino_vits8": WeightSource(
        component="dino_vits8",
        filename="dino_deitsmall8_pretrain.pth",
        url="https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth",
        sha256=None,
        size_mb=82.7,
        licence="Apache-2.0 (facebookresearch/dino)",
    ),
}


class WeightsNotFoundError(FileNotFoundError):
    """A pretrained component is neither on disk nor downloadable; the message says how to supply it."""


def is_offline() -> bool:
    """Whether downloads are disabled by ``ANOMALENS_OFFLINE`` or ``HF_HUB_OFFLINE``."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in OFFLINE_ENVS)


def cache_dir() -> Path:
    """The folder downloads are stored in (``$ANOMALENS_CACHE/weights`` or ``~/.cache/anomalens/weights``)."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "anomalens")
    return Path(root) / "weights"


def _search_folders(weights_dir: str | os.PathLike | None) -> list[Path]:
    folders = []
    if weights_dir:
        folders.append(Path(weights_dir))
    if os.environ.get(WEIGHTS_DIR_ENV):
        folders.append(Path(os.environ[WEIGHTS_DIR_ENV]))
    folders.append(cache_dir())
    return folders


def _find_in(folder: Path, source: WeightSource) -> Path | None:
    """Look for ``source.filename`` in ``folder``, ``folder/<component>`` or any direct sub-folder."""
    candidates = [folder / source.filename, folder / source.component / source.filename]
    if folder.is_dir():
        candidates += sorted(child / source.filename for child in folder.iterdir() if child.is_dir())
    return next((path for path in candidates if path.is_file()), None)


def _download_command(method_hint: str | None) -> str:
    return f"anomalens weights download {method_hint or 'METHOD'}"


def _how_to_supply(component: str, source: WeightSource | None, method_hint: str | None) -> str:
    filename = source.filename if source else component
    return (
        f"Supply it either (1) on a connected machine with `{_download_command(method_hint)}` "
        f"(fills {cache_dir()}), or "
        f"(2) by putting {filename} in a folder passed as --weights-dir DIR or set in {WEIGHTS_DIR_ENV}=DIR."
    )


sha256_of = sha256_file  # hex SHA-256 of a file (one implementation, in anomalens.io.outputs)


def download(source: WeightSource, destination: Path | None = None) -> Path:
    """Download a registered component into the cache (atomically, checking its SHA-256)."""
    destination = destination or cache_dir() / source.component / source.filename
    destination.parent.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s (%.1f MB) from %s", source.component, source.size_mb, source.url)
    handle, temporary = tempfile.mkstemp(prefix=".download.", dir=destination.parent)
    try:
        with os.fdopen(handle, "wb") as output, urllib.request.urlopen(source.url, timeout=60) as response:
            shutil.copyfileobj(response, output, length=1 << 20)
        if source.sha256 and sha256_of(temporary) != source.sha256:
            raise OSError(f"checksum mismatch for {source.url} (expected sha256 {source.sha256})")
        honour_umask(temporary)
        os.replace(temporary, destination)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return destination


_REPO_ID = re.compile(r"^(hf:)?[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(
    reference: str | os.PathLike,
    *,
    weights_dir: str | os.PathLike | None = None,
    method_hint: str | None = None,
    allow_download: bool = True,
) -> Path:
    """Find pretrained weights on disk, downloading them on a connected machine if needed.

    Args:
        reference: A registered component name, a local file or folder, a Hugging Face repo id,
            or ``"open_clip:MODEL/TAG"``.
        weights_dir: A folder searched before ``$ANOMALENS_WEIGHTS_DIR`` and the cache.
        method_hint: The method asking, named in the error's ``weights download`` command.
        allow_download: ``False`` never downloads, whatever the environment says.

    Returns:
        The path of the checkpoint file (or of the model folder, for hub repos).

    Raises:
        WeightsNotFoundError: Not found and not downloadable; the message names the component, the places
            searched, and both ways to supply it.
    """
    text = os.fspath(reference)
    online = allow_download and not is_offline()
    if text in WEIGHTS:
        source = WEIGHTS[text]
        searched = _search_folders(weights_dir)
        for folder in searched:
            found = _find_in(folder, source)
            if found is not None:
                return found
        reason = "downloads are disabled (offline)"
        if online:
            try:
                return download(source)
            except OSError as error:  # URLError is an OSError
                reason = f"the download from {source.url} failed ({error})"
        raise WeightsNotFoundError(
            f"pretrained weights for component {text!r} ({source.filename}, {source.size_mb:.1f} MB) were not found "
            f"in {', '.join(str(folder) for folder in searched)} and {reason}. "
            + _how_to_supply(text, source, method_hint)
        )
    path = Path(text).expanduser()
    if path.exists():
        return path
    folders = _search_folders(weights_dir)
    if text.startswith("open_clip:"):
        return _resolve_open_clip(text.removeprefix("open_clip:"), folders, online=online, method_hint=method_hint)
    if _REPO_ID.match(text):
        return _resolve_hub_repo(text.removeprefix("hf:"), folders, online=online, method_hint=method_hint)
    if path.name == text and path.suffix in CHECKPOINT_SUFFIXES:  # a bare file name: look in the weights folders
        for folder in folders:
            for candidate in (folder / text, *sorted(folder.glob(f"*/{text}"))):
                if candidate.is_file():
                    return candidate
    raise WeightsNotFoundError(
        f"weights {text!r} are neither a registered component ({', '.join(sorted(WEIGHTS))}), an existing "
        "file or folder, a file of that name in the weights folders "
        f"({', '.join(str(folder) for folder in folders)}), a Hugging Face repo id (ORG/NAME), nor open_clip:MODEL/TAG"
    )


CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_reachable: dict[str, bool] = {}  # host -> whether it answered, remembered for the process


def host_reachable(host: str, timeout: float = 3.0) -> bool:
    """Whether ``host`` accepts a TCP connection on port 443 within ``timeout`` seconds (asked once per process),
    so that an unreachable hub fails at once instead of after its client's retries."""
    if host not in _reachable:
        import socket

        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            _reachable[host] = True
        except OSError:
            _reachable[host] = False
    return _reachable[host]


def find_hub_repo(repo_id: str, folders: list[Path]) -> Path | None:
    """A Hugging Face repo's files in one of ``folders``: ``DIR/ORG/NAME``, ``DIR/NAME``, or a hub cache at
    ``DIR/hub`` or ``DIR``."""
    name = repo_id.rsplit("/", 1)[-1]
    for folder in folders:
        for candidate in (folder / repo_id, folder / name):
            if candidate.is_dir() and any(candidate.iterdir()):
                return candidate
        for cache in (folder / "hub", folder):
            if (cache / f"models--{repo_id.replace('/', '--')}").is_dir():
                from huggingface_hub import snapshot_download

                try:
                    return Path(snapshot_download(repo_id, cache_dir=str(cache), local_files_only=True))
                except Exception:  # noqa: BLE001 - an incomplete cache: keep looking
                    continue
    return None


def find_open_clip(model_name: str, tag: str, config: Mapping, folders: list[Path]) -> Path | None:
    """An open_clip checkpoint in one of ``folders``: ``DIR/[open_clip/]MODEL/TAG/`` holding one checkpoint file,
    ``DIR/[open_clip/]MODEL-TAG.<suffix>``, or the file under its upstream name."""
    upstream = {os.path.basename(config.get("url", "")), os.path.basename(config.get("hf_hub", "").rstrip("/"))}
    for folder in folders:
        for base in (folder / "open_clip", folder):
            tagged = base / model_name / tag
            if tagged.is_dir():
                files = sorted(path for path in tagged.iterdir() if path.suffix in CHECKPOINT_SUFFIXES)
                if files:
                    return files[0]
            for suffix in CHECKPOINT_SUFFIXES:
                if (base / f"{model_name}-{tag}{suffix}").is_file():
                    return base / f"{model_name}-{tag}{suffix}"
            for filename in upstream - {""}:
                if "." in filename and (base / filename).is_file():
                    return base / filename
    return None


def _layout_advice(example: str) -> str:
    return (
        f"or (2) by placing them in a folder passed as --weights-dir DIR or {WEIGHTS_DIR_ENV}=DIR, as {example} "
        "(folder layouts: anomalens.backbones.weights)"
    )


def _resolve_hub_repo(repo_id: str, folders: list[Path], *, online: bool, method_hint: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as error:  # pragma: no cover - huggingface_hub is a dependency of transformers
        raise ImportError("resolving hub repos needs huggingface_hub: pip install huggingface_hub") from error
    found = find_hub_repo(repo_id, folders)
    if found is not None:
        return found
    reason = "downloads are disabled (offline)"
    if online and not host_reachable("huggingface.co"):
        reason, online = "huggingface.co cannot be reached", False
    try:
        with _quiet_hub():
            return Path(snapshot_download(repo_id, local_files_only=not online, etag_timeout=10))
    except Exception as error:  # noqa: BLE001 - hub errors have many types; all mean "not available"
        if online:
            reason = f"the download failed ({type(error).__name__})"
        raise WeightsNotFoundError(
            f"pretrained weights for component {repo_id!r} (Hugging Face repo) were not found in "
            f"{', '.join(str(folder) for folder in folders)} or the Hugging Face cache, and {reason}. "
            f"Supply them either (1) on a connected machine with `{_download_command(method_hint)}`, "
            + _layout_advice(f"DIR/{repo_id}/ holding the repo's files")
        ) from None


def _resolve_open_clip(name_and_tag: str, folders: list[Path], *, online: bool, method_hint: str | None) -> Path:
    if "/" not in name_and_tag:
        raise ValueError(f"open_clip weights must be given as open_clip:MODEL/TAG, got {name_and_tag!r}")
    model_name, tag = name_and_tag.split("/", 1)
    import open_clip

    config = open_clip.get_pretrained_cfg(model_name, tag)
    if not config:
        valid = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none (unknown model)"
        raise ValueError(f"unknown open_clip pretrained tag {tag!r} for {model_name!r}; valid tags: {valid}")
    found = find_open_clip(model_name, tag, config, folders)
    open_clip_cache = cache_dir() / "open_clip"
    found = found or _open_clip_cached(config, open_clip_cache)
    if found is not None:
        return found
    reason = "downloads are disabled (offline)"
    host = "huggingface.co" if config.get("hf_hub") else urllib.parse.urlparse(config.get("url", "")).hostname or ""
    if online and host and not host_reachable(host):
        reason, online = f"{host} cannot be reached", False
    try:
        if not online:
            raise OSError(reason)
        with _quiet_hub():
            return Path(open_clip.download_pretrained(config, cache_dir=str(open_clip_cache)))
    except Exception as error:  # noqa: BLE001
        if online:
            reason = f"the download failed ({type(error).__name__})"
        raise WeightsNotFoundError(
            f"pretrained weights for component 'open_clip:{model_name}/{tag}' were not found in "
            f"{', '.join(str(folder) for folder in folders)} or the open_clip cache, and {reason}. "
            f"Supply them either (1) on a connected machine with `{_download_command(method_hint)}`, "
            + _layout_advice(f"DIR/open_clip/{model_name}/{tag}/ holding the checkpoint file")
        ) from None


@contextmanager
def _quiet_hub():
    """Keep the hub client's own retry warnings out of the output for the length of one download attempt (the
    outcome is reported once, by us)."""
    loggers = [logging.getLogger(name) for name in ("huggingface_hub", "urllib3")]
    levels = [item.level for item in loggers]
    for item in loggers:
        item.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for item, level in zip(loggers, levels):
            item.setLevel(level)


def _open_clip_cached(config: Mapping, open_clip_cache: Path) -> Path | None:
    """An open_clip checkpoint already on disk (Hugging Face cache or open_clip's URL cache), if any."""
    hub_entry = config.get("hf_hub", "")
    if hub_entry:
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = (
            os.path.split(hub_entry.rstrip("/")) if not hub_entry.endswith("/") else (hub_entry[:-1], "")
        )
        for name in [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]:
            for folder in (str(open_clip_cache), None):
                found = try_to_load_from_cache(repo_id, name, cache_dir=folder)
                if isinstance(found, str) and os.path.isfile(found):
                    return Path(found)
    url = config.get("url", "")
    if url:
        candidate = open_clip_cache / os.path.basename(url)
        if candidate.is_file():
            return candidate
    return None


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` file or a torch pickle (read with ``weights_only=True``).

    Nested ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers and ``module.`` prefixes are removed.

    Raises:
        ValueError: The file holds no tensor dictionary.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001
        raise ValueError(f"cannot read checkpoint {path}: {error}") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(f"checkpoint {path} does not hold a dictionary of tensors")
    return {key.removeprefix("module."): value for key, value in state.items()}


def load_state_dict_checked(module: nn.Module, state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Load ``state`` into ``module``, checking that every key and shape matches.

    Buffers of :class:`~anomalens.nn.state.ResizableBuffers` sub-modules (e.g. a memory bank) take the saved shape.
    Floating-point tensors are cast to the module's dtype (so fp16 checkpoints load into fp32 models).

    Raises:
        ValueError: Missing, unexpected or mis-shaped keys; the message lists them and names ``source``.
    """
    from anomalens.nn.state import ResizableBuffers

    for prefix, submodule in module.named_modules():
        if isinstance(submodule, ResizableBuffers):
            submodule.resize_buffers_for(state, f"{prefix}." if prefix else "")
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in sorted(set(expected) & set(state))
        if tuple(state[key].shape) != tuple(expected[key].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        ):
            if items:
                shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
                parts.append(f"{title}: {shown}")
        raise ValueError(f"weights {source} do not fit {type(module).__name__}: " + "; ".join(parts))
    converted = {
        key: value.to(expected[key].dtype) if value.is_floating_point() else value for key, value in state.items()
    }
    module.load_state_dict(converted, strict=True)
