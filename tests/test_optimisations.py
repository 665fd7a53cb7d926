"""Every speed or memory optimisation against the unoptimised computation, within a stated tolerance.

- UNet early exit (CLIPFusion): what is read (cross-attention, block outputs) is bit-identical.
- Chunked, channels-last VAE encoding: latents equal the plain whole-batch encode to 1e-5.
- Reduced-precision autocast (``precision="bfloat16"``): every method's maps stay close to float32's.
- Nearest-neighbour distances stay float32 under autocast.
- Channels-last CNN features (PatchCore's and VLMDiff's backbones, VLMDiff's TAEF2 autoencoder): equal to the
  NCHW computation to 1e-5.
- WinCLIP's window embeddings in calls of a bounded number of tokens: equal to one call to 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import anomalens
from anomalens.backbones.diffusion import (
    DiffusionBackbone,
    capture_block_outputs,
    capture_cross_attention,
    last_unet_block,
)
from anomalens.nn.memory import NearestNeighbourMemory

from conftest import TINY_CONFIGS, plant_defect, textured_image, tiny_detector

METHODS = anomalens.list_methods()


@pytest.fixture(scope="module")
def tiny_diffusion():
    return DiffusionBackbone(None, architecture="tiny", init_seed=0)


def test_last_unet_block_orders_down_mid_up():
    assert last_unet_block(["down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"]) == "down_blocks.1"
    assert last_unet_block(["down_blocks.3", "mid_block.attentions.0"]) == "mid_block"
    assert last_unet_block(["up_blocks.2", "up_blocks.1.attentions.1", "down_blocks.2"]) == "up_blocks.2"
    assert last_unet_block(["up_blocks.10", "up_blocks.9"]) == "up_blocks.10"  # numeric, not text, order
    assert last_unet_block([]) is None  # nothing read: run everything
    assert last_unet_block(["up_blocks.1", "conv_out"]) is None  # a module after the blocks is read


def test_unet_early_exit_reads_the_same_attention_and_features(tiny_diffusion):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    states = tiny_diffusion.encode_prompts(["a photo of a damaged widget"]).expand(2, -1, -1)
    attention_layers = [name for name in tiny_diffusion.cross_attention_layers() if name.startswith("down_blocks")]
    blocks = ["down_blocks.1", "up_blocks.0"]
    stop_after = last_unet_block([*attention_layers, *blocks])
    assert stop_after == "up_blocks.0"
    captured = []
    for stop in (None, stop_after):
        with (
            torch.inference_mode(),
            capture_cross_attention(tiny_diffusion.unet, attention_layers) as attention,
            capture_block_outputs(tiny_diffusion.unet, blocks) as outputs,
        ):
            prediction = tiny_diffusion.denoise(latents, 100, states, stop_after=stop)
        captured.append(({**attention}, {**outputs}, prediction))
    (full_attention, full_outputs, full_prediction), (early_attention, early_outputs, early_prediction) = captured
    assert full_prediction is not None and early_prediction is None
    assert full_attention.keys() == early_attention.keys() and len(full_attention) == len(attention_layers)
    for name in attention_layers:
        assert torch.equal(full_attention[name], early_attention[name])
    for name in blocks:
        assert torch.equal(full_outputs[name], early_outputs[name])
    # the hook is gone: a later full pass returns a prediction again
    with torch.inference_mode():
        assert tiny_diffusion.denoise(latents, 100, states) is not None


def test_chunked_channels_last_vae_matches_whole_batch(tiny_diffusion):
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.inference_mode():
        plain = tiny_diffusion.vae.encode(images).latent_dist.mean * tiny_diffusion.vae.config.scaling_factor
        for chunk_size in (1, 2, 3):
            latents = tiny_diffusion.encode_images(images, chunk_size=chunk_size)
            assert latents.shape == plain.shape and latents.is_contiguous()
            torch.testing.assert_close(latents, plain, atol=1e-5, rtol=1e-5)
    assert tiny_diffusion.vae.decoder is None  # only the encoder is kept


def test_clipfusion_maps_unchanged_by_the_early_exit(monkeypatch):
    import anomalens.methods.clipfusion.model as clipfusion

    rng = np.random.default_rng(0)
    references = [textured_image(rng, 40, 48) for _ in range(2)]
    queries = [plant_defect(textured_image(rng, 40, 48), 8, 8, 10)[0], textured_image(rng, 40, 48)]
    optimised = tiny_detector("clipfusion").fit(references, class_name="widget").predict(queries)
    monkeypatch.setattr(clipfusion, "last_unet_block", lambda names: None)  # the whole UNet, as before
    full = tiny_detector("clipfusion").fit(references, class_name="widget").predict(queries)
    for a, b in zip(optimised, full):
        assert a.score == b.score and np.array_equal(a.anomaly_map, b.anomaly_map)


def test_memory_search_stays_float32_under_autocast():
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(500, 64, generator=generator) * 30
    queries = bank[:50] + 0.01 * torch.randn(50, 64, generator=generator)  # near neighbours: cancellation-prone
    memory = NearestNeighbourMemory("l2").fit(bank)
    expected = memory.search(queries, k=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        distances, indices = memory.search(queries.bfloat16(), k=3)
    assert distances.dtype == torch.float32
    assert torch.equal(indices, expected[1])
    # the queries themselves were rounded to bfloat16 by the caller; the search adds no error of its own
    torch.testing.assert_close(distances, memory.search(queries.bfloat16().float(), k=3)[0])


# Maps under bfloat16 autocast versus float32, on the image with a planted defect (a normal image's map is nearly
# flat with random tiny models, so its shape is rounding noise): the map keeps its shape (Pearson correlation)
# and its level (largest difference as a share of the map's largest value), and every image score stays within
# the same share of the largest score. PatchCore is looser: its L2 nearest-neighbour distances are small
# differences of features rounded to bfloat16.
BFLOAT16_TOLERANCE = {"min_correlation": 0.99, "max_relative_difference": 0.03}
BFLOAT16_TOLERANCE_PER_METHOD = {"patchcore": {"min_correlation": 0.97, "max_relative_difference": 0.06}}
# the ensemble's map is a weighted sum of its members' (PatchCore among them): no closer than its loosest member's
BFLOAT16_TOLERANCE_PER_METHOD["ensemble"] = BFLOAT16_TOLERANCE_PER_METHOD["patchcore"]


@pytest.mark.parametrize("method", METHODS)
def test_bfloat16_autocast_maps_close_to_float32(method):
    rng = np.random.default_rng(1)
    references = [textured_image(rng, 40, 48) for _ in range(3)]
    queries = [plant_defect(textured_image(rng, 40, 48), 10, 12, 12)[0], textured_image(rng, 40, 48)]
    results = {}
    for precision in ("float32", "bfloat16"):
        detector = tiny_detector(method, precision=precision)
        detector.fit(references if detector.few_shot else None, class_name="widget")
        results[precision] = detector.predict(queries)
    tolerance = BFLOAT16_TOLERANCE_PER_METHOD.get(method, BFLOAT16_TOLERANCE)
    exact, fast = results["float32"][0], results["bfloat16"][0]
    assert fast.anomaly_map.dtype == np.float32
    reference, approximate = exact.anomaly_map.ravel(), fast.anomaly_map.ravel()
    scale = float(np.abs(reference).max())
    assert float(np.corrcoef(reference, approximate)[0, 1]) >= tolerance["min_correlation"]
    if method == "ensemble":  # fused values are in units of each member's held-out spread, set in bfloat16 too:
        for exact, fast in zip(results["float32"], results["bfloat16"]):  # the members' own scores are compared
            for name, score in exact.extras["members"].items():
                member_tolerance = BFLOAT16_TOLERANCE_PER_METHOD.get(name.split(":")[1], BFLOAT16_TOLERANCE)
                assert abs(fast.extras["members"][name] - score) <= member_tolerance["max_relative_difference"] * max(
                    abs(item.extras["members"][name]) for item in results["float32"])
        return
    assert float(np.abs(reference - approximate).max()) <= tolerance["max_relative_difference"] * scale
    largest_score = max(abs(result.score) for result in results["float32"])
    for exact, fast in zip(results["float32"], results["bfloat16"]):
        assert abs(fast.score - exact.score) <= tolerance["max_relative_difference"] * largest_score
    assert not np.array_equal(reference, approximate)  # bfloat16 did run


def test_unknown_precision_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"precision='fp8' must be one of float32, bfloat16, float16"):
        anomalens.create("patchcore", **{**TINY_CONFIGS["patchcore"], "precision": "fp8"})


def test_vlmdiff_chunked_channels_last_vae_matches_whole_batch():
    from anomalens.methods.vlmdiff.autoencoder import LatentAutoencoder

    autoencoder = LatentAutoencoder("tiny", weights=None)
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        whole_latents = autoencoder.vae.encode(images * 2.0 - 1.0).latent_dist.mean
        whole_images = ((autoencoder.vae.decode(whole_latents).sample + 1.0) / 2.0).clamp(0.0, 1.0)
        latents = autoencoder.encode(images)  # 2 + 2 + 1 images, channels-last
        decoded = autoencoder.decode(latents)
    assert autoencoder.vae_chunk_size < len(images)
    torch.testing.assert_close(latents, whole_latents, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decoded, whole_images, atol=1e-5, rtol=1e-5)


def test_sequence_major_attention_changes_layout_not_values(monkeypatch):
    import contextlib

    from torch import nn

    import anomalens.backbones.clip as clip_module

    from conftest import TINY_CLIP

    clip = clip_module.CLIPBackbone(TINY_CLIP, None)
    pixels = torch.rand(3, 3, clip.image_size, clip.image_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        relaid = clip.encode_image(pixels, layers=(1,))
        monkeypatch.setattr(clip_module, "sequence_major_attention", lambda model: contextlib.nullcontext())
        plain = clip.encode_image(pixels, layers=(1,))
    torch.testing.assert_close(relaid.embedding, plain.embedding, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(relaid.layer_tokens[0], plain.layer_tokens[0], atol=2e-2, rtol=2e-2)
    attention_modules = [module for module in clip.visual.modules() if isinstance(module, nn.MultiheadAttention)]
    assert attention_modules and all(not module._forward_pre_hooks for module in attention_modules)  # removed


@pytest.mark.parametrize("name", ["wide_resnet50_2", "taef2", "vgg16_bn"])
def test_channels_last_backbones_match_nchw(name):
    import copy

    from anomalens.backbones import FeatureBackbone

    backbone = FeatureBackbone(name, pretrained=None)
    conv_weights = [tensor for tensor in backbone.model.state_dict().values() if tensor.dim() == 4]
    assert conv_weights and all(weight.is_contiguous(memory_format=torch.channels_last) for weight in conv_weights)
    nchw = (
        copy.deepcopy(backbone.model).to(memory_format=torch.contiguous_format).eval()
    )  # fx copies come back in train mode
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        features = backbone(images)
        expected = nchw(((images - backbone.mean) / backbone.std).contiguous())
    for feature, reference in zip(features, expected, strict=True):
        torch.testing.assert_close(feature, reference, atol=1e-5 * float(reference.abs().max()), rtol=1e-5)


def test_vlmdiff_channels_last_taef2_autoencoder_matches_nchw():
    import copy

    from anomalens.methods.vlmdiff.autoencoder import LatentAutoencoder

    autoencoder = LatentAutoencoder("taef2", weights=None)
    encoder = copy.deepcopy(autoencoder.encoder).to(memory_format=torch.contiguous_format)
    decoder = copy.deepcopy(autoencoder.decoder).to(memory_format=torch.contiguous_format)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        latents = autoencoder.encode(images)
        decoded = autoencoder.decode(latents)
        expected_latents = encoder(images)
        expected_images = decoder(expected_latents).clamp(0.0, 1.0)
    assert latents.is_contiguous() and decoded.is_contiguous()  # NCHW again for what follows
    torch.testing.assert_close(latents, expected_latents, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decoded, expected_images, atol=1e-5, rtol=1e-5)


def test_window_embeddings_in_bounded_calls_match_one_call():
    from anomalens.backbones.clip import CLIPBackbone
    from anomalens.methods.winclip import sliding_windows

    from conftest import TINY_CLIP

    clip = CLIPBackbone(TINY_CLIP, None)
    pixels = torch.rand(4, 3, clip.image_size, clip.image_size, generator=torch.Generator().manual_seed(3))
    windows = sliding_windows(clip.grid, 2)
    with torch.inference_mode():
        embedded = clip.encode_image(pixels, with_embedded=True).embedded
        one_call = clip.window_embeddings(embedded, windows, tokens_per_call=10**9)
        default = clip.window_embeddings(embedded, windows)
        small = clip.window_embeddings(embedded, windows, tokens_per_call=7)  # 1 window of 5 tokens per call
    torch.testing.assert_close(default, one_call, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(small, one_call, atol=1e-5, rtol=1e-5)
