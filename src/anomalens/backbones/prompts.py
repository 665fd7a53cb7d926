"""Text prompts as data: WinCLIP's compositional prompt ensemble and user-supplied variants.

A prompt is a template (``"a photo of a {}."``) filled with a state phrase (``"damaged {}"``) that is itself
filled with the class name (``"bottle"``): ``"a photo of a damaged bottle."``. The ensemble is every
(state, template) pair; each state's text embedding is the normalised mean over its prompts.

The state words and templates below are those listed in the WinCLIP paper (Jeong et al., CVPR 2023).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

WINCLIP_NORMAL_STATES = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)

WINCLIP_ANOMALOUS_STATES = (
    "damaged {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)

WINCLIP_TEMPLATES = (
    "a cropped photo of the {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)

# anomalib 2.x's WinCLIP prompt templates (anomalib/models/image/winclip/prompting.py), derived from the list above:
# it lacks "a cropped photo of a {}." and has "a jpeg corrupted photo of the {}." twice where the list above has the
# "a" and the "the" form, so that template weighs double in its ensemble mean. 21 templates.
ANOMALIB_WINCLIP_TEMPLATES = tuple(
    "a jpeg corrupted photo of the {}." if template == "a jpeg corrupted photo of a {}." else template
    for template in WINCLIP_TEMPLATES
    if template != "a cropped photo of a {}."
)

DEFAULT_CLASS_NAME = "object"


@dataclass(frozen=True)
class PromptSet:
    """State phrases and templates for one prompt ensemble (all ``{}``-formatted strings)."""

    normal_states: tuple[str, ...] = WINCLIP_NORMAL_STATES
    anomalous_states: tuple[str, ...] = WINCLIP_ANOMALOUS_STATES
    templates: tuple[str, ...] = WINCLIP_TEMPLATES

    def __post_init__(self) -> None:
        for name in ("normal_states", "anomalous_states", "templates"):
            phrases = getattr(self, name)
            if not phrases:
                raise ValueError(f"prompt set {name} must not be empty")
            bad = [phrase for phrase in phrases if phrase.count("{}") != 1]
            if bad:
                raise ValueError(f"each of {name} must contain exactly one '{{}}' placeholder; got {bad}")

    def with_defects(self, defect_words: Sequence[str]) -> PromptSet:
        """Add ``"{} with <defect>"`` anomalous states, e.g. for ``["scratch", "crack"]``."""
        extra = tuple(f"{{}} with {word.strip()}" for word in defect_words if word.strip())
        return PromptSet(self.normal_states, self.anomalous_states + extra, self.templates)

    def prompts(self, class_name: str) -> tuple[list[str], list[str]]:
        """The normal and the anomalous prompts for ``class_name``."""
        name = class_name.replace("_", " ").strip() or DEFAULT_CLASS_NAME

        def fill(states: Sequence[str]) -> list[str]:
            return [template.format(state.format(name)) for state in states for template in self.templates]

        return fill(self.normal_states), fill(self.anomalous_states)


def build_prompt_set(
    normal_states: Sequence[str] | None = None,
    anomalous_states: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    defect_words: Sequence[str] = (),
) -> PromptSet:
    """WinCLIP's ensemble, with any part replaced by the user's own and optional defect words added."""
    prompt_set = PromptSet(
        tuple(normal_states) if normal_states else WINCLIP_NORMAL_STATES,
        tuple(anomalous_states) if anomalous_states else WINCLIP_ANOMALOUS_STATES,
        tuple(templates) if templates else WINCLIP_TEMPLATES,
    )
    return prompt_set.with_defects(defect_words) if defect_words else prompt_set
