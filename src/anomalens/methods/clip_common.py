"""Small pieces the CLIP methods (WinCLIP, CLIPFusion, Dual-Image CLIP) share: prompts, class name, weights,
the ``shots`` rule."""

from __future__ import annotations

from typing import Any

from anomalens.backbones.clip import clip_weights_reference
from anomalens.prompts import DEFAULT_CLASS_NAME, PromptSet, build_prompt_set


def prompt_set_of(config: Any) -> PromptSet:
    """The prompt ensemble of a config's ``normal_states``, ``anomalous_states``, ``templates`` and ``defect_words``."""
    return build_prompt_set(config.normal_states, config.anomalous_states, config.templates, config.defect_words)


def class_name_of(detector: Any) -> str:
    """The class name for prompts: from ``fit``, else the config's, else ``"object"``."""
    return detector.class_name or detector.config.class_name or DEFAULT_CLASS_NAME


def clip_weights_of(config: Any) -> list[str]:
    """The CLIP checkpoint reference of a config with ``backbone`` and ``pretrained`` (empty for random weights)."""
    reference = clip_weights_reference(config.backbone, config.pretrained)
    return [reference] if reference else []


def check_shots(method: str, shots: int | None, references: list) -> None:
    """``shots=0`` forbids references, ``shots=k`` requires them, ``None`` accepts what ``fit`` gets."""
    if shots == 0 and references:
        raise ValueError(f"this {method} detector has shots=0 (zero-shot) and takes no reference images")
    if shots and not references:
        raise ValueError(f"this {method} detector has shots={shots}: give fit() at least one reference image")
