"""CLIPFusion (Lee, Won, Lee and Shin, "CLIP Meets Diffusion: A Synergistic Approach to Anomaly Detection",
TMLR 2025): CLIP patch maps fused with Stable Diffusion cross-attention and feature maps.

    M = alpha * (M_CLIP_L + M_CLIP_V) + (1 - alpha) * (M_Diff_L + M_Diff_V)

Zero-shot uses the two language-guided maps (``_L``); with reference images the two vision-guided maps
(``_V``) join. ``components`` switches any of the four off (the paper's ablations).

- **PatchCLIP, M_CLIP_L.** Patch tokens of ``clip_layers`` are mapped into the joint space and compared with
  the normal / anomalous prompt-ensemble embeddings; the softmax gives each patch an anomaly probability,
  averaged over layers. The mapping is either ``"training_free"`` (CLIP's own ``ln_post`` + ``proj`` applied to
  v-v attention tokens) or ``"trained"`` (per-layer linear projections from ``anomalens train patchclip``).
- **PatchCLIP, M_CLIP_V.** Per layer, the cosine distance of each query patch token to its nearest neighbour
  among the reference tokens, averaged over layers.
- **MapDiff, M_Diff_L.** The query's VAE latent is noised to each of ``timesteps`` (``noise_draws`` seeded draws)
  and denoised once with the prompt ``anomaly_prompt`` (e.g. "a photo of a damaged bottle"); cross-attention
  probabilities of the UNet layers whose feature side is in ``attention_resolutions`` are captured, averaged
  over heads, layers, draws and timesteps. The map (``attention_map``) is the attention share of the
  anomaly-state words, ``A_state / (A_state + A_class)`` (our construction: the paper gives no formula), or the
  state words' attention probability itself (``"anomaly_token"``); with ``contrast``, the same map under
  ``normal_prompt`` is subtracted.
- **MapDiff, M_Diff_V.** Decoder features (``feature_blocks``) of the query compared with the references',
  as nearest-neighbour cosine distances, averaged over blocks.
- **Fusion** (``fusion_normalisation``; the paper does not say, both are guesses). ``"fixed"``: every component
  is put on [0, 1] by its definition, never by the data, so images stay comparable: probabilities and
  attention shares as they are, cosine distances halved (their range is [0, 2]), contrasted shares mapped from
  [-1, 1] by ``(x + 1) / 2``; one component can still dominate by its spread. ``"minmax"``: each component
  rescaled to [0, 1] per image. The fused map is upsampled to
  ``map_size`` and Gaussian-smoothed. Image score: the mean of CLIP's global image-text anomaly probability and
  the smoothed map's maximum.

Both vision-guided maps search :class:`~anomalens.nn.memory.NearestNeighbourMemory`, the module PatchCore uses.

Both text encoders run once per class name (their outputs are cached). With ``offload_text_encoders`` their
weights are then parked in a temporary file (:mod:`anomalens.nn.offload`), which keeps ~1.8 GB out of memory at
full size; maps and scores do not change.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anomalens.backbones.clip import CLIPBackbone
from anomalens.backbones.diffusion import (
    ARCHITECTURES,
    DEFAULT_REPO,
    ENCODERS,
    DiffusionBackbone,
    capture_block_outputs,
    capture_cross_attention,
    last_unet_block,
)
from anomalens.backbones.weights import read_checkpoint
from anomalens.checks import check_options
from anomalens.detector import Detector
from anomalens.io.images import images_to_tensor
from anomalens.methods.clip_base import CLIPConfig, check_shots, class_name_of, clip_weights_of, prompt_set_of
from anomalens.nn.maps import gaussian_blur
from anomalens.nn.memory import NearestNeighbourMemory
from anomalens.nn.offload import OffloadMixin

COMPONENTS = ("clip_language", "clip_vision", "diffusion_language", "diffusion_vision")
PROJECTIONS = ("auto", "training_free", "trained")
ATTENTION_MAPS = ("share", "anomaly_token")
FUSION_NORMALISATIONS = ("fixed", "minmax")


@dataclass
class CLIPFusionConfig(CLIPConfig):
    """Configuration of :class:`CLIPFusion` (the paper leaves layers, t, alpha and the SD version open).

    Common CLIP fields (backbone, pretrained, class name, prompt ensemble, temperature): see
    :class:`~anomalens.methods.clip_base.CLIPConfig`.
    """

    method: ClassVar[str] = "clipfusion"
    weight_fields: ClassVar[tuple[str, ...]] = ("pretrained", "diffusion", "tiny_autoencoder")
    # Named sets of fields (``preset=...``, ``--set preset=fast``); fields given beside a preset override it. At fp32
    # no setting that keeps the default maps is as fast as WinCLIP: CLIP and the UNet alone take longer
    # (benchmarks/results/speed-cpu-2threads-round2.md), so the fast presets change the maps, by the amounts the
    # README's map-resolution bound gives for SD at 256 px.
    PRESETS: ClassVar[dict[str, dict]] = {
        "paper": {},  # the defaults: SD at its native 512 px, float32
        "fast": {"diffusion_image_size": 256, "attention_resolutions": (8, 16), "precision": "bfloat16"},
        "fast-fp32": {"diffusion_image_size": 256, "attention_resolutions": (8, 16)},  # for CPUs without native bf16
        # and TAESD's encoder instead of SD's (latents approximated: maps differ beyond SD 256 px's)
        "fast-tiny": {"diffusion_image_size": 256, "attention_resolutions": (8, 16), "diffusion_encoder": "tiny"},
    }

    batch_size: int = 4  # images per forward pass
    clip_layers: tuple[int, ...] = (5, 11, 17, 23)  # 0-based blocks whose patch tokens are used (6/12/18/24 of 24)
    clip_projection: str = "auto"  # "trained" (the paper's: per-layer projections trained on an auxiliary set),
    # "training_free" (v-v tokens, CLIP's own projection), "auto": trained when clip_projection_weights is given
    clip_projection_weights: str | None = None  # safetensors file from `anomalens train patchclip` ("trained")
    clip_image_size: int | None = None  # CLIP input side; None = the model's own (336 for ViT-L-14-336); APRIL-GAN
    # trains and tests at 518
    diffusion: str | None = DEFAULT_REPO  # diffusers repo id or local folder; None builds diffusion_architecture
    diffusion_architecture: str = "sd-2-1-base"  # architecture built with random weights when diffusion is None
    diffusion_image_size: int | None = None  # SD input side; None = the model's native size (512 for SD 2.1-base)
    diffusion_encoder: str = "sd"  # what makes the latents: "sd" (the VAE's encoder, the paper's) or "tiny" (TAESD)
    tiny_autoencoder: str | None = "madebyollin/taesd"  # diffusers AutoencoderTiny for "tiny"; None = random weights
    timesteps: tuple[int, ...] = (100,)  # noise levels t of the single UNet pass (averaged when several)
    noise_draws: int = 1  # seeded noise draws per timestep (averaged)
    attention_resolutions: tuple[int, ...] = (16, 32)  # feature-map sides of captured cross-attention layers
    feature_blocks: tuple[str, ...] = ("up_blocks.1", "up_blocks.2")  # UNet decoder blocks for M_Diff_V
    anomaly_prompt: str = "a photo of a damaged {}"  # UNet prompt; "{}" is the class name
    anomaly_words: str = "damaged"  # the anomaly-state words of anomaly_prompt whose attention is read
    contrast: bool = False  # subtract the state-word attention share under normal_prompt
    normal_prompt: str = "a photo of a flawless {}"  # the prompt contrasted with, when contrast is on
    normal_words: str = "flawless"  # its normal-state words
    attention_map: str = "share"  # M_Diff_L: "share", A_state / (A_state + A_class) [our guess, the paper gives no
    # formula], or "anomaly_token": the state words' attention probability itself (small; pair with "minmax")
    fusion_normalisation: str = "fixed"  # each component on [0, 1] before fusion: "fixed" (by its definition, so
    # images stay comparable) [guess] or "minmax" (per image, so no component dominates by its range)
    alpha: float = 0.5  # weight of the CLIP maps; the diffusion maps get 1 - alpha
    components: tuple[str, ...] = COMPONENTS  # maps to use; vision maps need references
    shots: int | None = None  # 0 forces zero-shot, k >= 1 few-shot; None: as fit() is called
    map_size: int = 256  # side of the fused map before it is resized to each image (smoothing_sigma is at this size)
    offload_text_encoders: bool = True  # park both text encoders in a temp file once the class's prompts are cached

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.clip_projection == "auto":
            self.clip_projection = "trained" if self.clip_projection_weights else "training_free"
        for name in ("clip_layers", "timesteps", "attention_resolutions", "feature_blocks", "components"):
            setattr(self, name, tuple(getattr(self, name)))
        unknown = [name for name in self.components if name not in COMPONENTS]
        check_options(self.method, self, {
            "components": (bool(self.components) and not unknown, f"a non-empty subset of {', '.join(COMPONENTS)}"),
            "clip_projection": (self.clip_projection in PROJECTIONS, f"one of {', '.join(PROJECTIONS)}"),
            "clip_projection_weights": (
                self.clip_projection != "trained" or bool(self.clip_projection_weights),
                "a file from `anomalens train patchclip` when clip_projection='trained'",
            ),
            "diffusion_architecture": (
                self.diffusion_architecture in ARCHITECTURES,
                f"one of {', '.join(ARCHITECTURES)}",
            ),
            "timesteps": (bool(self.timesteps) and all(0 <= t < 1000 for t in self.timesteps), "in [0, 999]"),
            "noise_draws": (self.noise_draws >= 1, ">= 1"),
            "diffusion_encoder": (self.diffusion_encoder in ENCODERS, f"one of {', '.join(ENCODERS)}"),
            "alpha": (0.0 <= self.alpha <= 1.0, "in [0, 1]"),
            "attention_map": (self.attention_map in ATTENTION_MAPS, f"one of {', '.join(ATTENTION_MAPS)}"),
            "fusion_normalisation": (
                self.fusion_normalisation in FUSION_NORMALISATIONS, f"one of {', '.join(FUSION_NORMALISATIONS)}"
            ),
            "anomaly_prompt": (
                "{}" in self.anomaly_prompt and self.anomaly_words in self.anomaly_prompt,
                "a prompt with '{}' that contains anomaly_words",
            ),
            "normal_prompt": (
                "{}" in self.normal_prompt and self.normal_words in self.normal_prompt,
                "a prompt with '{}' that contains normal_words",
            ),
            "map_size": (self.map_size >= 8, ">= 8"),
            "shots": (self.shots is None or self.shots >= 0, ">= 0 or None"),
        })  # fmt: skip


class PatchCLIPProjections(nn.Module):
    """Per-layer linear maps from CLIP patch tokens ``(…, C)`` into the joint space ``(…, E)``."""

    def __init__(self, layers: int, width: int, embed_dim: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, embed_dim) for _ in range(layers))

    def forward(self, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        return [projection(layer_tokens) for projection, layer_tokens in zip(self.layers, tokens)]


class CLIPFusion(OffloadMixin, Detector):
    """Zero-shot (language maps) or few-shot (plus vision maps) CLIP + diffusion fusion."""

    method_name = "clipfusion"
    config_class = CLIPFusionConfig
    zero_shot = True
    few_shot = True
    cannot_export = ("its diffusion branch samples noise and reads the UNet's cross-attention through attention "
                     "processors, and the SD VAE + UNet exceed ONNX's 2 GB protobuf limit")
    cannot_update = None  # update() with references: the vision-guided memories grow

    def __init__(
        self, config: CLIPFusionConfig, *, weights_dir: str | os.PathLike | None = None, load_pretrained: bool = True
    ):
        super().__init__(config, weights_dir=weights_dir, load_pretrained=load_pretrained)
        depth = CLIPBackbone.depth_of(config.backbone)
        self.clip_layers = [layer % depth for layer in config.clip_layers]
        training_free = config.clip_projection == "training_free"
        self.clip = CLIPBackbone(
            config.backbone,
            config.pretrained if load_pretrained else None,
            image_size=config.clip_image_size,
            vv_layers=depth - min(self.clip_layers) if training_free else 0,
            weights_dir=weights_dir,
            method_hint="clipfusion",
            init_seed=config.seed,
        )
        self.projections = None
        if not training_free:
            width = self.clip.visual.transformer.width
            self.projections = PatchCLIPProjections(len(self.clip_layers), width, self.clip.embed_dim)
            if load_pretrained:
                state = _read_projections(config.clip_projection_weights, self.projections, weights_dir)
                self.projections.load_state_dict(state)
        self.diffusion = None
        if {"diffusion_language", "diffusion_vision"} & set(config.components):
            self.diffusion = DiffusionBackbone(
                config.diffusion if load_pretrained else None,
                architecture=config.diffusion_architecture,
                image_size=config.diffusion_image_size,
                weights_dir=weights_dir,
                method_hint="clipfusion",
                init_seed=config.seed,
                encoder=config.diffusion_encoder,
                tiny_autoencoder=config.tiny_autoencoder if load_pretrained else None,
            )
            sides = self.diffusion.cross_attention_layers()
            self.attention_layers = [name for name, side in sides.items() if side in config.attention_resolutions]
            if "diffusion_language" in config.components and not self.attention_layers:
                raise ValueError(
                    f"no cross-attention layer has a feature side in attention_resolutions="
                    f"{list(config.attention_resolutions)}; available sides: {sorted(set(sides.values()))}"
                )
        self.prompt_set = prompt_set_of(config)
        self.clip_memories = nn.ModuleList(NearestNeighbourMemory("cosine") for _ in self.clip_layers)
        self.diffusion_memories = nn.ModuleDict(
            {name.replace(".", "_"): NearestNeighbourMemory("cosine") for name in config.feature_blocks}
        )
        self.register_buffer("_few_shot", torch.tensor(False))

    @property
    def input_size(self) -> int:
        """CLIP's input side (``tiling=\"auto\"`` compares parts with it)."""
        return self.clip.image_size

    @classmethod
    def required_weights(cls, config: CLIPFusionConfig) -> list[str]:
        needed = clip_weights_of(config)
        if {"diffusion_language", "diffusion_vision"} & set(config.components):
            needed.append(config.diffusion)
            if config.diffusion_encoder == "tiny":
                needed.append(config.tiny_autoencoder)
        if config.clip_projection == "trained":
            needed.append(config.clip_projection_weights)
        return [reference for reference in needed if reference]

    @property
    def _class_name(self) -> str:
        return class_name_of(self)

    def _uses(self, component: str) -> bool:
        if component.endswith("vision") and not bool(self._few_shot):
            return False
        return component in self.config.components

    # ------------------------------------------------------------------ PatchCLIP
    def _clip_features(self, images: list[np.ndarray]) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Global embeddings ``(B, E)``, joint-space tokens ``(B, N, E)`` and raw tokens ``(B, N, C)`` per layer."""
        embeddings, joint, raw = [], [], []
        with self.timed("clip"):
            # Two images per pass: the v-v path keeps every block's tokens, ~45 MB per image at ViT-L/336, and a
            # CPU matmul over 2 x 577 tokens is already as efficient as over more.
            for pixels in self.clip.preprocess(images).split(2):
                features = self.clip.encode_image(pixels, layers=self.clip_layers)
                if self.projections is None:
                    projected = [self.clip.project(features.vv_tokens[layer]) for layer in self.clip_layers]
                else:
                    projected = self.projections(features.layer_tokens)
                embeddings.append(features.embedding)
                joint.append([F.normalize(tokens, dim=-1) for tokens in projected])
                raw.append(features.layer_tokens)
        joint_tokens = [torch.cat(layer) for layer in zip(*joint)]
        return torch.cat(embeddings), joint_tokens, [torch.cat(layer) for layer in zip(*raw)]

    def clip_language_map(self, joint_tokens: list[torch.Tensor]) -> torch.Tensor:
        """``(B, h, w)`` anomaly probability from projected tokens, averaged over layers."""
        text = self._encode_class_text()
        probability = torch.stack(
            [self.clip.anomaly_probability(tokens, text, self.config.temperature) for tokens in joint_tokens]
        ).mean(0)
        return probability.reshape(-1, *self.clip.grid)

    def clip_vision_map(self, raw_tokens: list[torch.Tensor]) -> torch.Tensor:
        """``(B, h, w)`` halved cosine distance to the reference tokens, averaged over layers."""
        batch, count, _ = raw_tokens[0].shape
        with self.timed("memory_search"):
            distances = [
                memory.search(tokens.flatten(0, 1))[0].reshape(batch, count)
                for memory, tokens in zip(self.clip_memories, raw_tokens)
            ]
        return (torch.stack(distances).mean(0) / 2).reshape(batch, *self.clip.grid)

    # ------------------------------------------------------------------ MapDiff
    def _diffusion_pass(self, images: list[np.ndarray], need_attention: bool, need_features: bool):
        """Run the UNet once per (timestep, draw); returns mean attention shares and decoder features."""
        diffusion = self.diffusion
        size = diffusion.image_size
        pixels = images_to_tensor(images, size, mode="bicubic")
        with self.timed("vae"):
            latents = diffusion.encode_images((pixels * 2 - 1).to(diffusion.device))  # once, reused for every t
        prompts, text_states = self._diffusion_prompts()
        generator = torch.Generator().manual_seed(self.config.seed)
        shares = {prompt: [] for prompt in prompts}
        features: dict[str, list[torch.Tensor]] = {block: [] for block in self.config.feature_blocks}
        attention_layers = self.attention_layers if need_attention else []
        feature_blocks = self.config.feature_blocks if need_features else ()
        stop_after = last_unet_block([*attention_layers, *feature_blocks])  # nothing after it is read
        for timestep in self.config.timesteps:
            for _ in range(self.config.noise_draws):
                noisy = diffusion.add_noise(latents, timestep, generator)
                for index, prompt in enumerate(prompts):
                    blocks = feature_blocks if index == 0 else ()
                    attention: dict[str, list[torch.Tensor]] = {name: [] for name in attention_layers}
                    outputs: dict[str, list[torch.Tensor]] = {block: [] for block in blocks}
                    # Two latents per UNet pass bound the activations (~100 MB per image at SD size); a CPU matmul
                    # over 2 x 4096 latent pixels is already as efficient as over more.
                    for chunk in noisy.split(2):
                        states = text_states[index : index + 1].expand(len(chunk), -1, -1)
                        with (
                            self.timed("unet"),
                            capture_cross_attention(diffusion.unet, attention_layers) as chunk_attention,
                            capture_block_outputs(diffusion.unet, blocks) as chunk_outputs,
                        ):
                            diffusion.denoise(chunk, timestep, states, stop_after=stop_after)
                        for store, captured in ((attention, chunk_attention), (outputs, chunk_outputs)):
                            for name, value in captured.items():
                                store[name].append(value)
                    attention = {name: torch.cat(values) for name, values in attention.items()}
                    outputs = {name: torch.cat(values) for name, values in outputs.items()}
                    if attention_layers:
                        shares[prompt].append(self._attention_share(prompt, index, attention))
                    for block in blocks:
                        features[block].append(outputs[block])
        return shares, {block: torch.stack(maps).mean(0) for block, maps in features.items() if maps}

    def _attention_share(self, prompt: str, index: int, attention: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, s, s)`` share of the state words' attention relative to state + class words, layers averaged."""
        words = self.config.anomaly_words if index == 0 else self.config.normal_words
        state = self.diffusion.token_positions(prompt, words)
        subject = self.diffusion.token_positions(prompt, self._class_name.replace("_", " "))
        side = max(self.config.attention_resolutions)
        layers = []
        for probabilities in attention.values():
            state_mass = probabilities[:, :, state].sum(-1)
            if self.config.attention_map == "anomaly_token":
                share = state_mass
            else:
                share = state_mass / (state_mass + probabilities[:, :, subject].sum(-1)).clamp_min(1e-12)
            grid = int(round(share.shape[1] ** 0.5))
            share = share.reshape(-1, 1, grid, grid)
            layers.append(F.interpolate(share, size=(side, side), mode="bilinear", align_corners=False)[:, 0])
        return torch.stack(layers).mean(0)

    def diffusion_language_map(self, shares: dict[str, list[torch.Tensor]]) -> torch.Tensor:
        """``(B, s, s)`` in [0, 1]: the anomaly-word share, or the contrast with the normal prompt's share."""
        anomalous, *normal = [torch.stack(values).mean(0) for values in shares.values()]
        return (anomalous - normal[0] + 1) / 2 if normal else anomalous

    def diffusion_vision_map(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, s, s)`` halved cosine distance of decoder features to the references', blocks averaged."""
        side = max(self.config.attention_resolutions)
        maps = []
        with self.timed("memory_search"):
            for block, feature in features.items():
                batch, channels, height, width = feature.shape
                queries = feature.permute(0, 2, 3, 1).reshape(-1, channels)
                distances = (
                    self.diffusion_memories[block.replace(".", "_")].search(queries)[0].reshape(batch, 1, height, width)
                )
                maps.append(F.interpolate(distances / 2, size=(side, side), mode="bilinear", align_corners=False)[:, 0])
        return torch.stack(maps).mean(0)

    # ------------------------------------------------------------------ detector hooks
    def _diffusion_prompts(self) -> tuple[list[str], torch.Tensor]:
        """The UNet prompts for the class (anomaly prompt, then the normal one with ``contrast``) and their
        ``(P, T, D)`` text-encoder states (cached by the backbone)."""
        name = self._class_name.replace("_", " ")
        prompts = [self.config.anomaly_prompt.format(name)]
        if self.config.contrast:
            prompts.append(self.config.normal_prompt.format(name))
        with self.timed("text_encoder"):
            return prompts, self.diffusion.encode_prompts(prompts)

    def _encode_class_text(self) -> torch.Tensor:
        """The class's ``(2, E)`` CLIP ensemble embeddings, with the UNet prompts' states cached too; afterwards
        both text encoders are parked when ``offload_text_encoders`` is on (a new class name reads them back)."""
        with self.timed("text_encoder"):
            text = self.clip.text_embeddings(self._class_name, self.prompt_set)
        if self.diffusion is not None:
            self._diffusion_prompts()
        if self.config.offload_text_encoders:
            self.clip.text_weights.park()
            if self.diffusion is not None:
                self.diffusion.text_weights.park()
        return text

    def _encode_references(self, reference_images: list[np.ndarray]) -> list[dict[str, torch.Tensor]]:
        """Per reference: raw CLIP tokens ``(N, C)`` per layer (``clip{i}``) and SD features ``(h*w, C)`` per block."""
        encoded: list[dict[str, torch.Tensor]] = [{} for _ in reference_images]
        for start in range(0, len(reference_images), self.config.batch_size):
            chunk = reference_images[start : start + self.config.batch_size]
            if "clip_vision" in self.config.components:
                _, _, tokens = self._clip_features(chunk)
                for layer, layer_tokens in enumerate(tokens):
                    for index in range(len(chunk)):
                        encoded[start + index][f"clip{layer}"] = layer_tokens[index]
            if "diffusion_vision" in self.config.components:
                _, features = self._diffusion_pass(chunk, need_attention=False, need_features=True)
                for block, feature in features.items():
                    rows = feature.permute(0, 2, 3, 1).flatten(1, 2)  # (B, h*w, C)
                    for index in range(len(chunk)):
                        encoded[start + index][block] = rows[index]
        return encoded

    def _fit_encoded(self, encoded: list[dict[str, torch.Tensor]], class_name: str | None) -> None:
        check_shots("CLIPFusion", self.config.shots, encoded)
        self._encode_class_text()
        self._few_shot.fill_(bool(encoded))
        for memory in [*self.clip_memories, *self.diffusion_memories.values()]:
            memory.clear()
        if not encoded:
            return
        for key, memory in self._memories_by_key():
            memory.fit(torch.cat([item[key] for item in encoded]),
                       owners=self._row_owners([item[key].shape[0] for item in encoded]))  # fmt: skip

    def _memories_by_key(self) -> list[tuple[str, NearestNeighbourMemory]]:
        """The few-shot memories the components use, each with its key in an encoded reference."""
        pairs: list[tuple[str, NearestNeighbourMemory]] = []
        if "clip_vision" in self.config.components:
            pairs += [(f"clip{layer}", memory) for layer, memory in enumerate(self.clip_memories)]
        if "diffusion_vision" in self.config.components:
            pairs += [(block, self.diffusion_memories[block.replace(".", "_")]) for block in self.config.feature_blocks]
        return pairs

    def _reference_memories(self) -> list[NearestNeighbourMemory]:
        return [memory for _, memory in self._memories_by_key()]

    def _extend_encoded(self, encoded: list[dict[str, torch.Tensor]], max_memory: int | None) -> dict[str, Any]:
        if not bool(self._few_shot):
            raise ValueError("CLIPFusion was fitted zero-shot: it keeps no references to add to (fit it with "
                             "references for the few-shot vision-guided maps)")  # fmt: skip
        return {key: memory.extend(torch.cat([item[key] for item in encoded]), max_memory)
                for key, memory in self._memories_by_key()}  # fmt: skip

    def _predict_batch(self, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        embedding, joint, raw = self._clip_features(images)
        text = self._encode_class_text()
        global_probability = self.clip.anomaly_probability(embedding, text, self.config.temperature)
        size = self.config.map_size
        clip_maps, diffusion_maps = [], []
        if self._uses("clip_language"):
            clip_maps.append(self.clip_language_map(joint))
        if self._uses("clip_vision"):
            clip_maps.append(self.clip_vision_map(raw))
        need_attention, need_features = self._uses("diffusion_language"), self._uses("diffusion_vision")
        if need_attention or need_features:
            shares, features = self._diffusion_pass(images, need_attention, need_features)
            if need_attention:
                diffusion_maps.append(self.diffusion_language_map(shares))
            if need_features:
                diffusion_maps.append(self.diffusion_vision_map(features))
        with self.timed("post_processing"):
            fused = fuse_maps(clip_maps, diffusion_maps, self.config.alpha, size, self.config.fusion_normalisation)
            fused = gaussian_blur(fused, self.config.smoothing_sigma)
            scores = (global_probability + fused.flatten(1).amax(1)) / 2
        return scores, fused


def fuse_maps(
    clip_maps: list[torch.Tensor],
    diffusion_maps: list[torch.Tensor],
    alpha: float,
    size: int,
    normalisation: str = "fixed",
) -> torch.Tensor:
    """``alpha * sum(clip_maps) + (1 - alpha) * sum(diffusion_maps)``, each ``(B, h, w)`` resized to ``size``.

    ``normalisation="minmax"`` first rescales each map, per image, to [0, 1] (a constant map becomes 0), so a
    component with a wide range cannot dominate; ``"fixed"`` takes the maps as they are (each already on [0, 1]
    by its definition).

    Returns:
        ``(B, size, size)``.

    Raises:
        ValueError: No map at all (every component switched off or unavailable).
    """
    if not clip_maps and not diffusion_maps:
        raise ValueError("no component map to fuse: enable at least one available component")

    if normalisation not in FUSION_NORMALISATIONS:
        raise ValueError(f"unknown fusion normalisation {normalisation!r}; valid: {', '.join(FUSION_NORMALISATIONS)}")

    def rescaled(anomaly_map: torch.Tensor) -> torch.Tensor:
        if normalisation == "fixed":
            return anomaly_map
        low = anomaly_map.flatten(1).amin(1)[:, None, None]
        high = anomaly_map.flatten(1).amax(1)[:, None, None]
        return (anomaly_map - low) / (high - low).clamp_min(1e-12)

    def total(maps: list[torch.Tensor]) -> torch.Tensor | float:
        resized = [
            F.interpolate(rescaled(m)[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
            for m in maps
        ]
        return torch.stack(resized).sum(0) if resized else 0.0

    fused = alpha * total(clip_maps) + (1 - alpha) * total(diffusion_maps)
    return fused


def _read_projections(
    path: str | None, projections: PatchCLIPProjections, weights_dir: str | os.PathLike | None = None
) -> dict[str, torch.Tensor]:
    """Read and check a PatchCLIP projection file against the model's layer count and widths."""
    from anomalens.backbones.weights import load_state_dict_checked, resolve

    if not path:
        raise ValueError("clip_projection='trained' needs clip_projection_weights (from `anomalens train patchclip`)")
    state = read_checkpoint(resolve(path, weights_dir=weights_dir))
    probe = PatchCLIPProjections(
        len(projections.layers), projections.layers[0].in_features, projections.layers[0].out_features
    )
    load_state_dict_checked(probe, state, source=str(path))
    return probe.state_dict()
