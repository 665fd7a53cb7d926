"""Dual-Image Enhanced CLIP: pairing, visual map, synthesis, test-time adaptation, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from anomalens.cli import main
from anomalens.methods.dual_image_clip import pair_partners
from anomalens.methods.synthesis import perlin_mask, perlin_noise, synthesize_anomaly

from conftest import TINY_CLIP, bilinear_upsample, plant_defect, textured_image, tiny_detector


@pytest.mark.parametrize(("count", "partners"), [(2, 1), (5, 1), (5, 3), (7, 2), (3, 5), (8, 1), (9, 2)])
def test_pairing_is_mutual_covers_every_image_and_is_seeded(count, partners):
    pairs = pair_partners(count, partners, seed=4)
    r = min(partners, count - 1)
    assert len(pairs) == count
    for image, mates in enumerate(pairs):
        assert image not in mates and len(mates) == len(set(mates))
        assert r <= len(mates) <= 2 * r  # r partners; an image of the last group has up to r more
        assert all(image in pairs[mate] for mate in mates)  # mutual
    # the partner relation splits the pool into groups (cliques) of r + 1 images, the last one larger
    groups = {tuple(sorted([image, *mates])) for image, mates in enumerate(pairs)}
    assert sum(len(group) for group in groups) == count
    assert sorted(len(group) for group in groups)[:-1] == [r + 1] * (len(groups) - 1)
    assert pair_partners(count, partners, seed=4) == pairs
    if count > 3:
        assert pair_partners(count, partners, seed=5) != pairs
    with pytest.raises(ValueError, match="at least two images"):
        pair_partners(1, 1, 0)


def test_predict_pools_are_seeded_shuffles_of_the_input():
    """predict(batch_size=2) on 6 images: the pools are the pairs of pool_order's permutation, not neighbours,
    and the results come back in input order (each equal to its image scored in that pool alone)."""
    from anomalens.detector import pool_order

    rng = np.random.default_rng(5)
    images = [textured_image(rng, 48, 48) for _ in range(6)]
    detector = tiny_detector("dual_image_clip", tta=False).fit(class_name="widget")
    results = detector.predict(images, batch_size=2)
    order = pool_order(6, detector.config.seed)
    assert order != list(range(6)) and sorted(order) == list(range(6))
    for start in (0, 2, 4):
        pool = order[start : start + 2]
        alone = detector.predict_arrays([images[index] for index in pool])
        for index, expected in zip(pool, alone):
            assert results[index].score == pytest.approx(expected.score, abs=1e-6)


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


def _write_textures(folder, colours):
    from PIL import Image

    folder.mkdir()
    for index, colour in enumerate(colours):
        Image.fromarray(np.full((30, 40, 3), colour, np.uint8)).save(folder / f"texture{index}.png")
    return folder


@pytest.mark.parametrize("textures", ["procedural", "pool", "folder"])
def test_pseudo_anomalies_keep_their_originals_outside_the_mask(textures, tmp_path):
    if textures == "folder":
        textures = str(_write_textures(tmp_path / "textures", [(0, 200, 0), (250, 250, 250)]))
    detector = tiny_detector("dual_image_clip", tta_textures=textures, tta_pseudo_share=0.75)
    pixels01 = torch.rand(4, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    images, masks, originals = detector.pseudo_anomalies(pixels01, torch.Generator().manual_seed(1))
    assert images.shape == (3, 3, 48, 48) and masks.shape == (3, 48, 48) and len(set(originals.tolist())) == 3
    for image, mask, original in zip(images, masks, originals.tolist()):
        assert torch.equal(image[:, mask == 0], pixels01[original][:, mask == 0])
        assert mask.sum() > 0 and not torch.equal(image[:, mask == 1], pixels01[original][:, mask == 1])
    again = detector.pseudo_anomalies(pixels01, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip((images, masks, originals), again))


def test_texture_folder_is_used_and_checked(tmp_path):
    """A folder holding one pure green texture: inside the mask the fill is green under some augmentation, so the
    pseudo-anomaly's change there is the same at every pixel of a constant image; and bad folders are refused."""
    folder = _write_textures(tmp_path / "green", [(0, 200, 0)])
    detector = tiny_detector("dual_image_clip", tta_textures=str(folder), tta_pseudo_share=1.0)
    constant = torch.full((2, 3, 48, 48), 0.5)
    images, masks, _ = detector.pseudo_anomalies(constant, torch.Generator().manual_seed(2))
    for image, mask in zip(images, masks):
        inside = image[:, mask == 1]
        assert torch.allclose(inside, inside[:, :1].expand_as(inside), atol=1e-5)  # one colour: a constant texture
    with pytest.raises(ValueError, match="texture folder '.*missing' is not a folder"):
        tiny_detector("dual_image_clip", tta_textures=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="texture folder '.*empty' holds no image"):
        tiny_detector("dual_image_clip", tta_textures=str(tmp_path / "empty"))


def test_augmented_procedural_textures_are_stronger_than_pool_tiles():
    """Inspection images of one product look alike (here: dark, nearly uniform, like bottle's background), so
    tiles of another pool image barely change them; the default augmented procedural textures do (mean |change|
    inside the mask over 12 seeds)."""
    generator = torch.Generator().manual_seed(3)
    pool = (0.2 + 0.03 * torch.rand(4, 3, 64, 64, generator=generator)).clamp(0, 1)
    strength = {}
    for textures in ("procedural", "pool"):
        detector = tiny_detector("dual_image_clip", tta_textures=textures, tta_pseudo_share=1.0)
        changes = []
        for seed in range(12):
            images, masks, originals = detector.pseudo_anomalies(pool, torch.Generator().manual_seed(seed))
            for image, mask, original in zip(images, masks, originals.tolist()):
                changes.append(float((image - pool[original]).abs()[:, mask == 1].mean()))
        strength[textures] = np.mean(changes)
    assert strength["procedural"] > 3 * strength["pool"], strength


def test_paper_objective_compares_each_pseudo_anomaly_with_its_original():
    """_joint_against by brute force, and the objectives differ: with "paper" the adapter learns from the
    pseudo-anomaly against its clean original; with "language" from its text similarity alone."""
    detector = tiny_detector("dual_image_clip").fit(class_name="widget")
    generator = torch.Generator().manual_seed(0)
    query = torch.nn.functional.normalize(torch.randn(2, 2, 36, 32, generator=generator), dim=-1)
    reference = torch.nn.functional.normalize(torch.randn(2, 2, 36, 32, generator=generator), dim=-1)
    text = detector.clip.text_embeddings("widget", detector.prompt_set)
    joint = detector._joint_against(query, reference, text).numpy()
    language = detector._language_patch_scores(query, text).numpy()
    for image in range(2):
        for patch in range(36):
            distances = [
                min(1 - float(query[image, layer, patch] @ reference[image, layer, other]) for other in range(36))
                for layer in range(2)
            ]
            expected = 0.5 * language[image, patch] + 0.5 * np.mean(distances)
            assert joint[image, patch] == pytest.approx(expected, abs=1e-5)
    adapters = {}
    for objective in ("paper", "language"):
        adapted = tiny_detector("dual_image_clip", tta_objective=objective, tta_steps=3, tta_lr=0.05)
        adapted.fit(class_name="widget").predict_arrays(_pool())
        adapters[objective] = adapted.adapter.weight.detach().clone()
    assert not torch.allclose(adapters["paper"], adapters["language"], atol=1e-4)


def test_a_detector_saved_before_the_pairing_and_tta_fields_keeps_its_behaviour(tmp_path):
    import anomalens

    former = tiny_detector("dual_image_clip", pairing="ring", tta_objective="language", tta_textures="pool",
                           tta_steps=2).fit(class_name="widget")  # fmt: skip
    former.save(tmp_path / "saved")
    config_file = next(path for path in (tmp_path / "saved").iterdir() if path.suffix == ".json")
    meta = json.loads(config_file.read_text())
    for name in ("pairing", "tta_objective", "tta_textures"):
        meta["config"].pop(name)
    config_file.write_text(json.dumps(meta))
    loaded = anomalens.load(tmp_path / "saved")
    assert (loaded.config.pairing, loaded.config.tta_objective, loaded.config.tta_textures) == (
        "ring",
        "language",
        "pool",
    )
    pool = _pool(5)
    assert [r.score for r in loaded.predict_arrays(pool)] == pytest.approx(
        [r.score for r in former.predict_arrays(pool)], abs=1e-6
    )


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


def _reference_dual_image(detector, pool):
    """Dual-Image CLIP without TTA recomputed from the weights with NumPy: the original path's block inputs from a
    copy of the vision tower without v-v wrappers, the v-v path (CLIP Surgery: ``out_proj(softmax(v v^T / sqrt(d))
    v)`` of ``ln_1`` of each block's input, summed from the first wrapped block's input), ``ln_post`` and ``proj``,
    text from open_clip's tokenizer and ``encode_text``, nearest-patch cosine distances by brute force, the joint
    map upsampled and smoothed with scipy. Returns image scores and maps."""
    import copy

    import open_clip
    from scipy import ndimage

    from anomalens.backbones.clip import remove_vv_attention
    from anomalens.methods.dual_image_clip import content_order, pair_partners

    visual = copy.deepcopy(detector.clip.visual)
    remove_vv_attention(visual)
    cfg = open_clip.get_model_preprocess_cfg(detector.clip.model)
    mean, std = np.array(cfg["mean"])[:, None, None], np.array(cfg["std"])[:, None, None]
    pixels = torch.tensor(np.stack([(image.transpose(2, 0, 1) / 255.0 - mean) / std for image in pool])).float()
    with torch.no_grad():
        hidden = visual._embeds(pixels)
        inputs = []
        for block in visual.transformer.resblocks:
            inputs.append(hidden.double().numpy())
            hidden = block(hidden)
        global_embedding = (visual._pool(hidden)[0] @ visual.proj).double().numpy()

    def numpy_of(tensor):
        return tensor.detach().double().numpy()

    def layer_norm(x, module):
        centred = x - x.mean(-1, keepdims=True)
        return centred / np.sqrt((centred**2).mean(-1, keepdims=True) + module.eps) * numpy_of(module.weight) + (
            numpy_of(module.bias)
        )

    def normalise(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    depth = len(visual.transformer.resblocks)
    first = detector.layer_indices[0]
    running, vv = None, {}
    for index in range(first, depth):
        block = visual.transformer.resblocks[index]
        width, heads = inputs[index].shape[-1], block.attn.num_heads
        values = layer_norm(inputs[index], block.ln_1) @ numpy_of(block.attn.in_proj_weight[2 * width :]).T
        values = values + numpy_of(block.attn.in_proj_bias[2 * width :])
        batch, length, _ = values.shape
        head_values = values.reshape(batch, length, heads, width // heads).transpose(0, 2, 1, 3)
        logits = head_values @ head_values.transpose(0, 1, 3, 2) / np.sqrt(width // heads)
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        mixed = (weights @ head_values).transpose(0, 2, 1, 3).reshape(batch, length, width)
        mixed = mixed @ numpy_of(block.attn.out_proj.weight).T + numpy_of(block.attn.out_proj.bias)
        running = (inputs[index] if running is None else running) + mixed
        vv[index] = running
    tokens = np.stack(
        [normalise(layer_norm(vv[i][:, 1:], visual.ln_post) @ numpy_of(visual.proj)) for i in detector.layer_indices],
        axis=1,
    )  # (B, L, N, E)

    tokenizer = open_clip.get_tokenizer(detector.clip.model_name)
    text = []
    for prompts in detector.prompt_set.prompts("widget"):
        with torch.no_grad():
            raw = numpy_of(detector.clip.model.encode_text(tokenizer(prompts)))
        text.append(normalise(normalise(raw).mean(0)))
    text = np.stack(text)
    scale = float(detector.clip.model.logit_scale.exp())

    def probability(embeddings):
        logits = scale * embeddings @ text.T
        return np.exp(logits[..., 1]) / np.exp(logits).sum(-1)

    language = probability(tokens).mean(1)  # (B, N)
    count = len(pool)
    order = content_order(torch.from_numpy(tokens)).tolist()
    ranked = pair_partners(count, detector.config.partners, detector.config.seed)
    partners = [[] for _ in range(count)]
    for rank, image in enumerate(order):
        partners[image] = [order[mate] for mate in ranked[rank]]
    visual_scores = np.zeros_like(language)
    for image in range(count):
        similarities = [tokens[image] @ tokens[mate].transpose(0, 2, 1) for mate in partners[image]]  # (L, N, N)
        per_partner = [(1 - similarity.max(-1)).mean(0) for similarity in similarities]
        visual_scores[image] = np.min(per_partner, 0)
    joint = 0.5 * language + 0.5 * visual_scores
    grid_h, grid_w = detector.clip.grid
    size = detector.clip.image_size
    upsampled = [bilinear_upsample(patch_scores.reshape(grid_h, grid_w), size) for patch_scores in joint]
    maps = np.stack([ndimage.gaussian_filter(m, 4.0, mode="nearest", truncate=4.0) for m in upsampled])
    scores = (probability(normalise(global_embedding)) + maps.reshape(count, -1).max(1)) / 2
    return scores, maps


def test_without_tta_scores_and_maps_match_an_independent_recomputation():
    pool = _pool(4)
    pool[2] = plant_defect(pool[2], 10, 14, 14)[0]
    detector = tiny_detector("dual_image_clip", tta=False).fit(class_name="widget")
    results = detector.predict_arrays(pool)
    expected_scores, expected_maps = _reference_dual_image(detector, pool)
    assert np.allclose([r.score for r in results], expected_scores, rtol=0, atol=1e-5)
    for result, expected in zip(results, expected_maps):
        assert np.abs(result.anomaly_map - expected).max() < 1e-5
    adapted = tiny_detector("dual_image_clip", tta=True, tta_steps=5, tta_lr=0.05).fit(class_name="widget")
    assert not np.allclose(adapted.predict_arrays(pool)[0].anomaly_map, results[0].anomaly_map, atol=1e-4)


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
