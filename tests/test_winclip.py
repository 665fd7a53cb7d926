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

from conftest import TINY_CLIP, plant_defect, textured_image, tiny_detector


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
    backbone.encode_text = lambda prompts: calls.append(len(prompts)) or original(prompts)
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


def test_golden_value():
    rng = np.random.default_rng(42)
    image = textured_image(rng, 48, 48)
    result = tiny_detector("winclip", seed=0).fit(class_name="bottle").predict([image])[0]
    assert result.score == pytest.approx(GOLDEN_SCORE, rel=1e-4)
    assert float(result.anomaly_map.mean()) == pytest.approx(GOLDEN_MAP_MEAN, rel=1e-4)


GOLDEN_SCORE = 0.4533737599849701
GOLDEN_MAP_MEAN = 0.4514349699020386

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
