"""Saving and loading detectors: one folder, written atomically, checked strictly when read back.

A saved detector is a folder::

    config.json        format and version, method, config and its hash, class name, the calibration's fields
                       (anomalens.thresholds.Calibration), the fitted state's fingerprint, anomalens' version, and
                       the SHA-256 of every other file of the folder
    model.safetensors  every tensor of the detector (backbone and fitted state), so loading needs no network

:func:`load_detector` checks the folder's format, each file's SHA-256, and every tensor's name and shape against
the method's architecture; anything wrong is one ``ValueError`` naming the file. Exported detectors (ONNX,
OpenVINO) are :mod:`anomalens.runtime`'s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from anomalens.backbones.weights import load_state_dict_checked
from anomalens.config import build_config
from anomalens.io.outputs import honour_umask, read_format_file, sha256_file
from anomalens.registry import get_method
from anomalens.thresholds import Calibration

logger = logging.getLogger(__name__)

FORMAT_NAME = "anomalens-detector"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
TENSORS_FILE = "model.safetensors"


def fingerprint(detector: Any) -> str:
    """16 hex digits that change when anything deciding a score changes, the threshold aside: the method, its
    config, the class name and every persistent buffer (the fitted state, e.g. memory banks built from the
    references). Weights are named by the config; a resumed run compares fingerprints."""
    digest = hashlib.sha256(f"{detector.config_hash}|{detector.class_name}".encode())
    parameters = {name for name, _ in detector.named_parameters()}
    parameters |= {f"{prefix}.{name}" if prefix else name for prefix, module in detector.named_modules()
                   for name in getattr(module, "unscored_buffers", ())}  # state that decides no score  # fmt: skip
    for name, tensor in detector.state_dict().items():
        if name in parameters:
            continue
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"|{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]


def save_detector(detector: Any, path: str | os.PathLike) -> Path:
    """Write ``detector`` to folder ``path`` (``config.json`` + ``model.safetensors``), atomically: a reader sees
    the old folder or the new one, never a mix.

    Raises:
        ValueError: ``path`` exists and is neither a saved detector nor an empty folder.
    """
    from safetensors.torch import save_file

    target = Path(path)
    if target.exists() and not (target / CONFIG_FILE).exists():
        if not target.is_dir() or any(target.iterdir()):
            raise ValueError(f"cannot save detector to {target}: it exists and is not a saved detector")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    honour_umask(staging, directory=True)
    try:
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in detector.state_dict().items()}
        save_file(_unshare(tensors), str(staging / TENSORS_FILE), metadata={"format": FORMAT_NAME})
        honour_umask(staging / TENSORS_FILE)  # safetensors writes 0600 whatever the umask
        meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **detector.describe(),
                "anomalens_version": _package_version(), "fingerprint": fingerprint(detector),
                "files_sha256": {TENSORS_FILE: sha256_file(staging / TENSORS_FILE)}}  # fmt: skip
        (staging / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _replace_folder(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("saved %s detector to %s", detector.method_name, target)
    return target


def _replace_folder(staging: Path, target: Path) -> None:
    if target.exists():
        backup = target.with_name(f".{target.name}.old")
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(target, backup)
        os.replace(staging, target)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(staging, target)


def config_from_saved(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check the ``config.json`` of a saved detector folder, and the SHA-256 of the files it lists.

    Raises:
        ValueError: Not a saved detector, an unreadable or newer ``config.json``, or a file whose SHA-256 differs
            from the one recorded (changed or damaged after saving); the message names the file.
    """
    folder = Path(path)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file() or not (folder / TENSORS_FILE).is_file():
        raise ValueError(f"{folder} is not a saved anomalens detector (expected {CONFIG_FILE} and {TENSORS_FILE})")
    meta = read_format_file(config_path, FORMAT_NAME, FORMAT_VERSION)
    recorded = meta.get("files_sha256")
    if recorded is None:
        logger.info("%s was saved before detectors recorded their files' SHA-256; not checked", folder)
    if not isinstance(recorded, (dict, type(None))):
        raise ValueError(f"{config_path}: files_sha256 must map file names to SHA-256 digests")
    for name, wanted in (recorded or {}).items():
        if not isinstance(name, str) or Path(name).name != name or name.startswith("."):
            raise ValueError(f"{config_path}: files_sha256 names {name!r}, not a file of the detector's folder")
        digest = sha256_file(folder / name) if (folder / name).is_file() else "missing"
        if digest != wanted:
            raise ValueError(f"{folder / name} does not match {CONFIG_FILE} (SHA-256 {digest[:16]}..., expected "
                             f"{wanted[:16]}...): the file was changed or damaged after saving; save it again")
    return meta


def load_detector(path: str | os.PathLike, expected: type | None = None, map_location: str | torch.device = "cpu"):
    """Load a detector written by :func:`save_detector`, checking its files and every tensor's name and shape.

    Args:
        path: The saved folder.
        expected: A detector class the saved method must be (or subclass); ``None`` accepts any method.
        map_location: The device to load onto.

    Raises:
        ValueError: See :func:`config_from_saved`; a method other than ``expected``; tensors that do not fit
            the method's architecture, or a tensors file that cannot be read (the message names the file).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = config_from_saved(path)
    method = get_method(meta["method"])
    if expected is not None and not issubclass(method, expected):
        raise ValueError(f"{path} holds a {meta['method']!r} detector, not {expected.method_name!r}")
    options = {key: value for key, value in meta["config"].items() if key != "device"}
    options.setdefault("tiling", None)  # saved before tiling existed: whole images, as it was fitted
    for key, value in method.config_class.saved_before_the_field.items():
        options.setdefault(key, value)
    detector = method(build_config(method.config_class, options, method=meta["method"]), load_pretrained=False)
    try:
        state = load_file(str(Path(path) / TENSORS_FILE), device="cpu")
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{Path(path) / TENSORS_FILE} cannot be read as safetensors: {error}") from None
    load_state_dict_checked(detector, state, source=str(path))
    detector.class_name = meta.get("class_name")
    detector.calibration = Calibration.from_dict(meta)
    detector.tiling_choice = meta.get("tiling_choice")
    detector.config.device = str(torch.device(map_location))
    return detector.to(map_location)


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Clone tensors that share storage, which safetensors refuses to write."""
    seen: dict[int, str] = {}
    result = {}
    for name, tensor in tensors.items():
        pointer = tensor.untyped_storage().data_ptr() if tensor.numel() else -id(tensor)
        result[name] = tensor.clone() if pointer in seen else tensor
        seen.setdefault(pointer, name)
    return result


def _package_version() -> str:
    from anomalens import __version__

    return __version__
