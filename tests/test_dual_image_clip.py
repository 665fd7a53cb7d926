"""Dual-Image Enhanced CLIP: pairing, visual map, synthesis, test-time adaptation, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from anomalens.cli import main
from anomalens.methods.dual_image_clip import pair_partners
from anomalens.methods.synthesis import perlin_mask, perlin_noise, synthesize_anomaly

from conftest import TINY_CLIP, plant_defect, textured_image, tiny_detector


@pytest.mark.parametrize(("count", "partners"), [(2, 1), (5, 1), (5, 3), (7, 2), (3, 5)])
def test_pairing_covers_every_image_and_is_seeded(count, partners):
    pairs = pair_partners(count, partners, seed=4)
    r = min(partners, count - 1)
    assert len(pairs) == count
    for image, mates in enumerate(pairs):
        assert len(mates) == r == len(set(mates)) and image not in mates
    served = np.bincount([mate for mates in pairs for mate in mates], minlength=count)
    assert (served == r).all()  # every image is a partner exactly r times
    assert pair_partners(count, partners, seed=4) == pairs
    if count > 3:
        assert pair_partners(count, partners, seed=5) != pairs
    with pytest.raises(ValueError, match="at least two images"):
        pair_partners(1, 1, 0)


def _pool(count=4, seed=0):
    rng = np.random.default_rng(seed)
    return [textured_image(rng, 48, 48) for _ in range(count)]


def test_identical_pair_gives_zero_visual_map():
    detector = tiny_detector("dual_image_clip", tta=False).fit(class_name="widget")
    image = _pool(1)[0]
    pixels = detector.clip.preprocess([image, image.copy()])
    _, tokens = detector._tokens(pixels)
    visual = detector._visual_patch_scores(tokens)
    assert visual.shape == (2, 36) and torch.allclose(visual, torch.zeros_like(visual), atol=1e-5)


def test_planted_difference_is_found_by_the_visual_map():
    detector = tiny_detector("dual_image_clip", tta=False).fit(class_name="widget")
    normal = _pool(1)[0]
    defective, mask = plant_defect(normal, 8, 8, 16)  # the same image with a patch painted over
    _, tokens = detector._tokens(detector.clip.preprocess([normal, defective]))
    visual = detector._visual_patch_scores(tokens)[1].reshape(6, 6)
    inside = visual[1:3, 1:3].mean()  # patches (8 px) fully inside the 16-px square at (8, 8)
    outside = visual[4:, 4:].mean()
    assert inside > 5 * outside


def test_perlin_masks_are_binary_and_non_empty():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        mask = perlin_mask((40, 56), generator)
        assert mask.shape == (40, 56) and mask.sum() > 0
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
    noise = perlin_noise((32, 32), (4, 4), torch.Generator().manual_seed(1))
    assert noise.abs().max() <= 1.5 and noise.std() > 0.05
    image = torch.rand(3, 40, 40, generator=generator)
    first = synthesize_anomaly(image, torch.Generator().manual_seed(3), texture_source=torch.rand(3, 20, 20))
    again = synthesize_anomaly(image, torch.Generator().manual_seed(3), texture_source=torch.rand(3, 20, 20))
    assert torch.equal(first[1], again[1])
    altered, mask = synthesize_anomaly(image, generator)
    assert 0 <= altered.min() and altered.max() <= 1
    assert torch.equal(altered[:, mask == 0], image[:, mask == 0]) and not torch.equal(altered, image)


def test_tta_runs_its_steps_and_changes_the_adapter():
    detector = tiny_detector("dual_image_clip", tta_steps=4).fit(class_name="widget")
    steps = []
    original_step = torch.optim.Adam.step

    def counting_step(self, *args, **kwargs):
        steps.append(1)
        return original_step(self, *args, **kwargs)

    torch.optim.Adam.step = counting_step
    try:
        detector.predict(_pool())
    finally:
        torch.optim.Adam.step = original_step
    assert len(steps) == 4
    assert not torch.allclose(detector.adapter.weight, torch.eye(32))
    assert detector.stage_seconds["tta"] > 0


def test_without_tta_the_output_is_the_zero_shot_joint_map():
    pool = _pool()
    detector = tiny_detector("dual_image_clip", tta=False).fit(class_name="widget")
    results = detector.predict(pool)
    text = detector.clip.text_embeddings("widget", detector.prompt_set)
    pixels = detector.clip.preprocess(pool)
    embeddings, tokens = detector._tokens(pixels)
    joint = 0.5 * detector._language_patch_scores(tokens, text) + 0.5 * detector._visual_patch_scores(tokens)
    expected = detector.clip.patch_scores_to_map(joint, detector.config.smoothing_sigma)
    for index, result in enumerate(results):
        assert np.allclose(result.anomaly_map, expected[index].numpy(), atol=1e-6)
    adapted = tiny_detector("dual_image_clip", tta=True, tta_steps=5, tta_lr=0.05).fit(class_name="widget")
    assert not np.allclose(adapted.predict(pool)[0].anomaly_map, results[0].anomaly_map, atol=1e-4)


def test_single_image_needs_references():
    detector = tiny_detector("dual_image_clip").fit(class_name="widget")
    with pytest.raises(ValueError, match="at least two images.*or one or more reference images"):
        detector.predict([_pool(1)[0]])
    detector.fit(_pool(2, seed=1), class_name="widget")
    assert detector.reference_tokens.shape == (2, 2, 36, 32)
    assert detector.predict([_pool(1)[0]])[0].anomaly_map.shape == (48, 48)


def test_results_are_deterministic_with_tta():
    pool = _pool()
    first = tiny_detector("dual_image_clip", seed=2).fit().predict(pool)
    second = tiny_detector("dual_image_clip", seed=2).fit().predict(pool)
    assert [r.score for r in first] == [r.score for r in second]


def test_cli_end_to_end(capsys, mvtec_root, tmp_path):
    tiny = ["--method", "dual_image_clip", "--backbone", TINY_CLIP, "--pretrained", "none", "--set", "layers=1,2"]
    test = str(mvtec_root / "widget" / "test")
    assert main(["-q", "predict", *tiny, "--class-name", "widget", test, "--out", str(tmp_path / "p")]) == 0
    assert "scored 6 image(s)" in capsys.readouterr().out
    for tta in ("true", "false"):
        out = tmp_path / f"bench-{tta}"
        args = ["-q", "benchmark", *tiny, "--set", f"tta={tta}", "--dataset", "mvtec", "--root", str(mvtec_root)]
        assert main([*args, "--shots", "0", "--out", str(out)]) == 0
        results = json.loads((out / "results.json").read_text())
        stages = results["categories"]["widget"]["stage_seconds_per_image"]
        assert ("tta" in stages) == (tta == "true") and stages["image_encoder"] > 0
