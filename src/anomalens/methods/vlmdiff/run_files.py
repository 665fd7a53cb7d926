"""A VLMDiff training run folder: ``vlmdiff.json`` (architecture, settings, progress) and ``model.safetensors``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anomalens.methods.vlmdiff.network import VLMDiffNet

RUN_CONFIG_FILE = "vlmdiff.json"
RUN_WEIGHTS_FILE = "model.safetensors"


def read_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``vlmdiff.json`` of a training run folder (architecture, training settings, progress)."""
    folder = Path(run_dir)
    path = folder / RUN_CONFIG_FILE
    if not path.is_file() or not (folder / RUN_WEIGHTS_FILE).is_file():
        raise ValueError(
            f"{folder} is not a VLMDiff training run (expected {RUN_CONFIG_FILE} and {RUN_WEIGHTS_FILE}; "
            "write one with `anomalens train vlmdiff --out DIR`)"
        )
    run = json.loads(path.read_text())
    if "architecture" in run:
        run["architecture"] = upgrade_architecture(run["architecture"])
    return run


def upgrade_architecture(recorded: dict[str, Any]) -> dict[str, Any]:
    """A run's recorded architecture with the fields added since it was written, at the values it was trained
    with (``TRAINED_BEFORE_THE_FIELD``: e.g. guidance at every level, before the authors' design was followed)."""
    from dataclasses import asdict

    from anomalens.methods.vlmdiff.architecture import TRAINED_BEFORE_THE_FIELD, VLMDiffArchitecture

    return asdict(VLMDiffArchitecture.from_dict({**TRAINED_BEFORE_THE_FIELD, **recorded}))


def load_run_weights(net: VLMDiffNet, run_dir: str | os.PathLike) -> None:
    """Load a run's trained tensors (UNet, guidance, projection, latent statistics, a fine-tuned autoencoder)."""
    from safetensors.torch import load_file

    from anomalens.backbones.weights import load_state_dict_checked

    path = Path(run_dir) / RUN_WEIGHTS_FILE
    state = load_file(str(path), device="cpu")
    parts = dict(net.trainable_modules())
    if any(key.startswith("autoencoder.") for key in state):  # the run fine-tuned its autoencoder
        parts["autoencoder"] = net.autoencoder
    for name, module in parts.items():
        prefix = f"{name}."
        part = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
        load_state_dict_checked(module, part, source=f"{path} ({name})")
    for name in ("latent_shift", "latent_scale"):
        if name not in state:
            raise ValueError(f"{path} lacks the tensor {name!r}")
        getattr(net, name).copy_(state[name])
