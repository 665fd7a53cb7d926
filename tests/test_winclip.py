"""WinCLIP / WinCLIP+ and the CLIP backbone on a tiny random open_clip model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import anomalens
from anomalens.backbones.clip import (
    CLIPBackbone,
    add_vv_attention,
    harmonic_window_aggregation,
    remove_vv_attention,
    sliding_windows,
)
from anomalens.backbones.prompts import WINCLIP_TEMPLATES, build_prompt_set
from anomalens.cli import main

from conftest import TINY_CLIP, bilinear_upsample, plant_defect, textured_image, tiny_detector


@pytest.fixture
def backbone():
    return CLIPBackbone(TINY_CLIP, None)


@pytest.mark.parametrize(("grid", "scale"), [((6, 6), 2), ((6, 6), 3), ((3, 5), 2), ((4, 7), 3), ((5, 5), 5)])
def test_windows_cover_every_patch(grid, scale):
    windows = sliding_windows(grid, scale)
    height, width = grid
    assert windows.shape == ((height - scale + 1) * (width - scale + 1), scale * scale)
    counts = torch.bincount(windows.reshape(-1), minlength=height * width)
    assert (counts > 0).all()
    expected = [
        min(r + 1, scale, height - r, height - scale + 1) * min(c + 1, scale, width - c, width - scale + 1)
        for r in range(height)
        for c in range(width)
    ]
    assert counts.tolist() == expected


@pytest.mark.parametrize(
    ("grid", "scale", "stride"), [((15, 15), 2, 2), ((15, 15), 3, 2), ((7, 9), 3, 3), ((6, 6), 2, 1)]
)
def test_strided_windows_are_the_listed_starts_and_cover_every_patch(grid, scale, stride):
    height, width = grid
    windows = sliding_windows(grid, scale, stride)
    # brute force: starts every `stride`, plus the last start if the stride skips it
    row_starts = sorted(set(range(0, height - scale + 1, stride)) | {height - scale})
    col_starts = sorted(set(range(0, width - scale + 1, stride)) | {width - scale})
    expected = [
        [(r + i) * width + c + j for i in range(scale) for j in range(scale)] for r in row_starts for c in col_starts
    ]
    assert windows.tolist() == expected
    assert (torch.bincount(windows.reshape(-1), minlength=height * width) > 0).all()
    for bad in (0, scale + 1):
        with pytest.raises(ValueError, match=rf"window stride must be in \[1, {scale}\].*got {bad}"):
            sliding_windows(grid, scale, bad)


def test_window_stride_and_tokens_per_call_options():
    image = [textured_image(np.random.default_rng(1), 48, 48)]
    create = anomalens.create
    base = create("winclip", backbone=TINY_CLIP, pretrained=None, image_size=48).fit()
    chunked = create("winclip", backbone=TINY_CLIP, pretrained=None, image_size=48, window_tokens_per_call=7).fit()
    strided = create("winclip", backbone=TINY_CLIP, pretrained=None, image_size=48, window_stride=2).fit()
    assert chunked.predict(image)[0].score == pytest.approx(base.predict(image)[0].score, rel=1e-5)
    assert all(len(strided.windows[s]) < len(base.windows[s]) for s in base.windows)
    assert np.isfinite(strided.predict(image)[0].anomaly_map).all()
    with pytest.raises(ValueError, match="window_stride"):
        create("winclip", backbone=TINY_CLIP, pretrained=None, window_stride=0)


def test_harmonic_aggregation_matches_a_direct_loop():
    grid, scale = (4, 5), 2
    windows = sliding_windows(grid, scale)
    scores = torch.rand(2, windows.shape[0], generator=torch.Generator().manual_seed(0)) + 0.05
    aggregated = harmonic_window_aggregation(scores, windows, 20)
    for batch in range(2):
        for patch in range(20):
            covering = [scores[batch, w].item() for w in range(windows.shape[0]) if patch in windows[w].tolist()]
            expected = len(covering) / sum(1.0 / value for value in covering)
            assert aggregated[batch, patch].item() == pytest.approx(expected, rel=1e-5)


def test_window_embedding_equals_masked_full_sequence(backbone):
    """Gathering a window's tokens gives the same class output as masking every other token."""
    pixels = backbone.preprocess([textured_image(np.random.default_rng(0), 48, 48)])
    embedded = backbone.encode_image(pixels, with_embedded=True).embedded
    windows = sliding_windows(backbone.grid, 3)
    gathered = backbone.window_embeddings(embedded, windows)
    for window in (0, 7, windows.shape[0] - 1):
        keep = torch.zeros(embedded.shape[1], dtype=torch.bool)
        keep[0] = True
        keep[windows[window] + 1] = True
        mask = torch.zeros(embedded.shape[1], embedded.shape[1])
        mask[:, ~keep] = float("-inf")
        with torch.no_grad():
            hidden = backbone.visual.transformer(embedded, attn_mask=mask)
            pooled, _ = backbone.visual._pool(hidden)
            expected = torch.nn.functional.normalize(pooled @ backbone.visual.proj, dim=-1)
        assert torch.allclose(gathered[0, window], expected[0], atol=1e-5)


def test_text_is_encoded_once_per_class(backbone):
    calls = []
    original = backbone.encode_text
    backbone.encode_text = lambda prompts, *args: calls.append(len(prompts)) or original(prompts, *args)
    prompt_set = build_prompt_set()
    first = backbone.text_embeddings("bottle", prompt_set)
    for _ in range(3):
        assert torch.equal(backbone.text_embeddings("bottle", prompt_set), first)
    assert calls == [7 * len(WINCLIP_TEMPLATES), 4 * len(WINCLIP_TEMPLATES)]
    backbone.text_embeddings("cable", prompt_set)
    assert len(calls) == 4
    assert first.shape == (2, 32) and torch.allclose(first.norm(dim=-1), torch.ones(2))


def test_prompt_sets():
    prompt_set = build_prompt_set(defect_words=["scratch", "crack"])
    normal, anomalous = prompt_set.prompts("metal_nut")
    assert "a photo of a metal nut." in normal and "a photo of a metal nut with scratch." in anomalous
    assert len(anomalous) == 6 * len(WINCLIP_TEMPLATES)
    custom = build_prompt_set(normal_states=["good {}"], anomalous_states=["bad {}"], templates=["{}"])
    assert custom.prompts("part") == (["good part"], ["bad part"])
    with pytest.raises(ValueError, match="exactly one '{}' placeholder"):
        build_prompt_set(templates=["a photo"])
    with pytest.raises(ValueError, match="placeholder"):
        anomalens.create("winclip", backbone=TINY_CLIP, pretrained=None, anomalous_states=("broken",))


def test_vv_attention_keeps_the_original_path(backbone):
    pixels = backbone.preprocess([textured_image(np.random.default_rng(1), 48, 48)])
    with torch.no_grad():
        before = backbone.encode_image(pixels, layers=[-1])
        state = add_vv_attention(backbone.visual, 2)
        after = backbone.encode_image(pixels, layers=[-1])
        vv_tokens = state["tokens"]
    assert torch.allclose(before.embedding, after.embedding, atol=1e-6)
    assert torch.allclose(before.layer_tokens[0], after.layer_tokens[0], atol=1e-6)
    assert vv_tokens.shape == (1, 1 + 36, 64)
    assert not torch.allclose(vv_tokens[:, 1:], after.layer_tokens[0], atol=1e-3)
    with pytest.raises(ValueError, match="already added"):
        add_vv_attention(backbone.visual, 1)
    remove_vv_attention(backbone.visual)
    assert not any(type(block).__name__ == "VVAttentionBlock" for block in backbone.visual.transformer.resblocks)
    with pytest.raises(ValueError, match=r"last_k must be in \[1, 3\]"):
        add_vv_attention(backbone.visual, 4)
    vv = CLIPBackbone(TINY_CLIP, None, vv_layers=2)
    with torch.no_grad():
        features = vv.encode_image(pixels, layers=[-1])
    assert sorted(features.vv_tokens) == [1, 2]
    assert torch.allclose(features.vv_tokens[2], vv_tokens[:, 1:], atol=1e-6)
    assert not torch.allclose(features.vv_tokens[1], features.vv_tokens[2])


def test_crop_mode_maps_back_to_the_original_geometry():
    detector = tiny_detector("winclip", resize_mode="crop").fit(class_name="bottle")
    wide = textured_image(np.random.default_rng(2), 30, 90)
    anomaly_map = detector.predict([wide])[0].anomaly_map
    assert anomaly_map.shape == (30, 90)
    assert np.allclose(anomaly_map[:, :30], anomaly_map[:, :1])  # left of the centred crop: edge replicated
    assert np.allclose(anomaly_map[:, 60:], anomaly_map[:, -1:])


def test_zero_and_few_shot_modes():
    rng = np.random.default_rng(3)
    references = [textured_image(rng, 48, 48) for _ in range(2)]
    defective, _ = plant_defect(textured_image(rng, 48, 48), 10, 10, 16)
    zero = tiny_detector("winclip").fit(class_name="widget")
    assert len(zero.memories["patch"]) == 0
    few = tiny_detector("winclip").fit(references, class_name="widget")
    assert len(few.memories["patch"]) == 2 * 36 and len(few.memories["window2"]) == 2 * 25
    assert len(few.memories["window3"]) == 2 * 16
    # A reference is its own nearest neighbour: its few-shot map is zero and its score halves.
    zero_score = zero.predict([references[0]])[0].score
    assert few.predict([references[0]])[0].score == pytest.approx(zero_score / 2, rel=1e-4)
    assert few.predict([defective])[0].score > few.predict([references[1]])[0].score
    with pytest.raises(ValueError, match="shots=0"):
        tiny_detector("winclip", shots=0).fit(references)
    with pytest.raises(ValueError, match="shots=2"):
        tiny_detector("winclip", shots=2).fit(None)


def test_default_weights_are_requested_by_name():
    from anomalens.methods.winclip import WinCLIP, WinCLIPConfig

    assert WinCLIP.required_weights(WinCLIPConfig()) == ["open_clip:ViT-B-16-plus-240/laion400m_e31"]
    with pytest.raises(
        anomalens.WeightsNotFoundError, match="ViT-B-16-plus-240/laion400m_e31.*weights download winclip"
    ):
        anomalens.create("winclip")
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-Z'; valid models: .*ViT-B-16"):
        anomalens.create("winclip", backbone="ViT-Z", pretrained=None)


FORMER_SCORING = {  # the scoring anomalens had before the compat fields
    "scale_aggregation": "mean", "zero_shot_image_score": "global_and_map_max", "prompt_normalisation": "per_prompt",
    "visual_distance": "full", "few_shot_window_aggregation": "mean", "patch_memory": "projected",
    "map_max": "smoothed",
}  # fmt: skip


def _reference_winclip(detector, images, references, options):
    """WinCLIP recomputed from open_clip's own forward passes and the paper's formulas, loop by loop in NumPy.

    Window embeddings come from the full token sequence with every other patch masked out of attention; patch
    tokens from open_clip's ``output_tokens``; text from its tokenizer and ``encode_text``. Returns scores and maps.
    """
    import open_clip

    model, visual = detector.clip.model, detector.clip.visual
    cfg = open_clip.get_model_preprocess_cfg(model)
    mean, std = np.array(cfg["mean"])[:, None, None], np.array(cfg["std"])[:, None, None]

    def pixels_of(batch):
        return torch.tensor(np.stack([(image.transpose(2, 0, 1) / 255.0 - mean) / std for image in batch])).float()

    def normalise(array):
        return array / np.linalg.norm(array, axis=-1, keepdims=True)

    grid_h, grid_w = detector.clip.grid
    patches = grid_h * grid_w

    def encode(batch):
        pixels = pixels_of(batch)
        with torch.no_grad():
            visual.output_tokens = True
            try:
                pooled, tokens = visual(pixels)
            finally:
                visual.output_tokens = False
            embedded = visual._embeds(pixels)
            windows = {}
            for scale in detector.config.scales:
                rows = []
                for top in range(grid_h - scale + 1):
                    for left in range(grid_w - scale + 1):
                        keep = np.zeros(1 + patches, dtype=bool)
                        keep[0] = True
                        for dy in range(scale):
                            for dx in range(scale):
                                keep[1 + (top + dy) * grid_w + left + dx] = True
                        mask = torch.zeros(1 + patches, 1 + patches)
                        mask[:, torch.from_numpy(~keep)] = float("-inf")
                        window_pooled, _ = visual._pool(visual.transformer(embedded, attn_mask=mask))
                        rows.append((window_pooled @ visual.proj).double().numpy())
                windows[scale] = np.stack(rows, axis=1)  # (B, W, E)
        tokens = tokens.double().numpy()
        if options["patch_memory"] == "projected":
            tokens = tokens @ visual.proj.double().numpy()
        return normalise(pooled.double().numpy()), normalise(tokens), {s: normalise(w) for s, w in windows.items()}

    tokenizer = open_clip.get_tokenizer(detector.clip.model_name)
    normal_prompts, anomalous_prompts = detector.prompt_set.prompts(detector.class_name or "object")
    text = []
    for prompts in (normal_prompts, anomalous_prompts):
        with torch.no_grad():
            raw = model.encode_text(tokenizer(prompts)).double().numpy()
        text.append(normalise((normalise(raw) if options["prompt_normalisation"] == "per_prompt" else raw).mean(0)))
    text = np.stack(text)
    scale_factor = options["temperature"] or float(model.logit_scale.exp())

    def probability(embeddings):
        logits = scale_factor * embeddings @ text.T
        return np.exp(logits[..., 1]) / np.exp(logits).sum(-1)

    def window_members(scale):
        return [
            [(top + dy) * grid_w + left + dx for dy in range(scale) for dx in range(scale)]
            for top in range(grid_h - scale + 1)
            for left in range(grid_w - scale + 1)
        ]

    def spread(window_scores, scale, rule):
        members = window_members(scale)
        out = np.zeros(patches)
        for patch in range(patches):
            covering = [window_scores[w] for w, member in enumerate(members) if patch in member]
            if rule == "harmonic":
                out[patch] = len(covering) / sum(1.0 / value for value in covering)
            else:
                out[patch] = sum(covering) / len(covering)
        return out

    memory = None
    if references:
        _, ref_tokens, ref_windows = encode(references)
        memory = {"patch": ref_tokens.reshape(-1, ref_tokens.shape[-1])}
        memory |= {s: w.reshape(-1, w.shape[-1]) for s, w in ref_windows.items()}
    size = detector.clip.image_size
    global_embedding, tokens, windows = encode(images)
    scores, maps = [], []
    for index in range(len(images)):
        global_probability = probability(global_embedding[index])
        per_scale = [np.full(patches, global_probability)]
        per_scale += [spread(probability(windows[s][index]), s, "harmonic") for s in detector.config.scales]
        per_scale = np.stack(per_scale)
        if options["scale_aggregation"] == "harmonic":
            language = len(per_scale) / (1.0 / per_scale).sum(0)
        else:
            language = per_scale.mean(0)
        language_map = bilinear_upsample(language.reshape(grid_h, grid_w), size)
        score = global_probability
        if options["zero_shot_image_score"] == "global_and_map_max":
            score = (global_probability + (language.max() if options["map_max"] == "grid" else language_map.max())) / 2
        if memory is None:
            scores.append(score)
            maps.append(language_map)
            continue
        factor = 0.5 if options["visual_distance"] == "half" else 1.0
        visual = [factor * (1 - (tokens[index] @ memory["patch"].T).max(1))]
        for s in detector.config.scales:
            distances = factor * (1 - (windows[s][index] @ memory[s].T).max(1))
            visual.append(spread(distances, s, options["few_shot_window_aggregation"]))
        visual = np.mean(visual, axis=0)
        visual_map = bilinear_upsample(visual.reshape(grid_h, grid_w), size)
        scores.append((score + (visual.max() if options["map_max"] == "grid" else visual_map.max())) / 2)
        maps.append((language_map + visual_map) / 2)
    return np.array(scores), np.stack(maps)


@pytest.mark.parametrize("shots", [0, 1])
@pytest.mark.parametrize(
    ("compat", "overrides"),
    [("anomalib", {}), ("paper", {"smoothing_sigma": 0.0}), ("paper", {**FORMER_SCORING, "smoothing_sigma": 0.0})],
    ids=["anomalib", "paper", "former"],
)
def test_scores_and_maps_match_an_independent_recomputation(compat, overrides, shots):
    from anomalens.methods.winclip import WINCLIP_COMPAT

    rng = np.random.default_rng(7)
    images = [textured_image(rng, 48, 48), plant_defect(textured_image(rng, 48, 48), 12, 20, 12)[0]]
    references = [textured_image(rng, 48, 48), textured_image(rng, 48, 48)][:shots]
    detector = tiny_detector("winclip", compat=compat, **overrides).fit(references or None, class_name="bottle")
    results = detector.predict(images)
    options = {**WINCLIP_COMPAT[compat], **overrides}
    expected_scores, expected_maps = _reference_winclip(detector, images, references, options)
    assert np.allclose([r.score for r in results], expected_scores, rtol=0, atol=1e-5)
    for result, expected in zip(results, expected_maps):
        assert np.abs(result.anomaly_map - expected).max() < 1e-5
    assert expected_scores[0] != pytest.approx(expected_scores[1], abs=1e-4)  # the images are told apart


def test_compat_presets_and_fields():
    from anomalens.methods.winclip import WinCLIPConfig

    paper, anomalib = WinCLIPConfig(), WinCLIPConfig(compat="anomalib")
    assert paper.temperature is None and paper.smoothing_sigma == 4.0 and paper.zero_shot_image_score == "global"
    assert anomalib.temperature == pytest.approx(1 / 0.07) and anomalib.smoothing_sigma == 0.0
    assert anomalib.prompt_normalisation == "ensemble" and paper.prompt_normalisation == "per_prompt"
    assert WinCLIPConfig(compat="anomalib", smoothing_sigma=2.0).smoothing_sigma == 2.0  # a field beats the preset
    with pytest.raises(ValueError, match="unknown winclip compat 'anomalib1'; valid: paper, anomalib"):
        WinCLIPConfig(compat="anomalib1")
    with pytest.raises(ValueError, match="winclip option map_max='peak' must be grid or smoothed"):
        WinCLIPConfig(map_max="peak")


def test_a_detector_saved_before_the_compat_fields_keeps_its_scoring(tmp_path):
    rng = np.random.default_rng(11)
    image, reference = textured_image(rng, 48, 48), textured_image(rng, 48, 48)
    former = tiny_detector("winclip", **FORMER_SCORING, smoothing_sigma=4.0).fit([reference], class_name="bottle")
    former.save(tmp_path / "saved")
    config_file = next(path for path in (tmp_path / "saved").iterdir() if path.suffix == ".json")
    saved = json.loads(config_file.read_text())
    config = saved.get("config", saved)
    for name in [*FORMER_SCORING, "compat"]:
        config.pop(name)
    config_file.write_text(json.dumps(saved))
    loaded = anomalens.Detector.load(tmp_path / "saved")
    assert loaded.config.patch_memory == "projected" and loaded.config.map_max == "smoothed"
    assert loaded.predict([image])[0].score == pytest.approx(former.predict([image])[0].score, abs=1e-6)


TINY = ["--method", "winclip", "--backbone", TINY_CLIP, "--pretrained", "none"]


def test_cli_zero_and_one_shot(capsys, mvtec_root, tmp_path):
    test = str(mvtec_root / "widget" / "test")
    assert main(["-q", "predict", *TINY, "--class-name", "widget", test, "--out", str(tmp_path / "zero")]) == 0
    assert "scored 6 image(s), none flagged (no threshold)" in capsys.readouterr().out
    reference = str(mvtec_root / "widget" / "train" / "good" / "000.png")
    args = [
        "-q",
        "predict",
        *TINY,
        test,
        "--reference",
        reference,
        "--threshold",
        "0.3",
        "--out",
        str(tmp_path / "one"),
    ]
    assert main(args) == 0
    records = [json.loads(line) for line in (tmp_path / "one" / "scores.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(r["label"] in ("normal", "anomalous") for r in records)
    for shots in ("0", "1"):
        out = tmp_path / f"bench{shots}"
        bench = ["-q", "benchmark", *TINY, "--dataset", "mvtec", "--root", str(mvtec_root), "--shots", shots]
        assert main([*bench, "--out", str(out)]) == 0
        results = json.loads((out / "results.json").read_text())
        assert results["shots"] == int(shots) and 0.0 <= results["mean"]["pixel_aupro"] <= 1.0
