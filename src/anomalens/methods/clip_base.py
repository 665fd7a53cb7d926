"""What the CLIP methods (WinCLIP, CLIPFusion, Dual-Image CLIP) share: their common config fields, validated in
one place, and small helpers for prompts, class name, weights and the ``shots`` rule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from anomalens.backbones.clip import clip_weights_reference
from anomalens.backbones.prompts import DEFAULT_CLASS_NAME, PromptSet, build_prompt_set
from anomalens.checks import check_options
from anomalens.config import DetectorConfig


@dataclass
class CLIPConfig(DetectorConfig):
    """The fields every CLIP method's config has (on top of :class:`~anomalens.config.DetectorConfig`)."""

    weight_fields: ClassVar[tuple[str, ...]] = ("pretrained",)

    backbone: str = "ViT-L-14-336"  # open_clip model name
    pretrained: str | None = "openai"  # open_clip pretrained tag, a checkpoint path, or None (random init)
    class_name: str | None = None  # product name for the prompts when fit() is given none ("object" if neither)
    normal_states: tuple[str, ...] | None = None  # normal state phrases with one "{}"; None = WinCLIP's
    anomalous_states: tuple[str, ...] | None = None  # anomalous state phrases with one "{}"; None = WinCLIP's
    templates: tuple[str, ...] | None = None  # prompt templates with one "{}"; None = WinCLIP's 22
    defect_words: tuple[str, ...] = ()  # extra anomalous states "{} with <word>", e.g. ("scratch", "crack")
    temperature: float | None = None  # 1/tau: text cosine similarities are multiplied by it before the softmax;
    # None = CLIP's learned logit scale (100 for the released models)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.defect_words = tuple(self.defect_words)
        check_options(
            self.method,
            self,
            {
                "backbone": (isinstance(self.backbone, str) and bool(self.backbone), "an open_clip model name"),
                "temperature": (self.temperature is None or self.temperature > 0, "> 0 or None"),
            },
        )
        prompt_set_of(self)  # fails early, naming the phrase, if a placeholder is missing


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
