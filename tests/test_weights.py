"""The weights resolver and checked loading, with checkpoints written in the real on-disk formats."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from anomalens.backbones import FeatureBackbone
from anomalens.backbones.taef2 import taef2_encoder
from anomalens.backbones.weights import WeightsNotFoundError, load_state_dict_checked, read_checkpoint, resolve


def _write_taef2_checkpoint(path):
    """A random TAEF2 encoder saved like the real file: a plain fp16 state dict written by torch.save."""
    torch.manual_seed(7)
    encoder = taef2_encoder()
    torch.save({key: value.half() for key, value in encoder.state_dict().items()}, path)
    return encoder


def test_registered_component_in_weights_dir_env_and_cache(tmp_path, monkeypatch):
    folder = tmp_path / "weights" / "taef2"
    folder.mkdir(parents=True)
    (folder / "taef2_encoder.pth").write_bytes(b"x")
    assert resolve("taef2_encoder", weights_dir=folder) == folder / "taef2_encoder.pth"
    assert resolve("taef2_encoder", weights_dir=tmp_path / "weights") == folder / "taef2_encoder.pth"  # sub-folder
    monkeypatch.setenv("ANOMALENS_WEIGHTS_DIR", str(tmp_path / "weights"))
    assert resolve("taef2_encoder") == folder / "taef2_encoder.pth"
    monkeypatch.delenv("ANOMALENS_WEIGHTS_DIR")
    monkeypatch.setenv("ANOMALENS_CACHE", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "weights" / "taef2_encoder" / "taef2_encoder.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert resolve("taef2_encoder") == cached


def test_missing_weight_offline_names_component_and_both_ways(tmp_path):
    with pytest.raises(WeightsNotFoundError) as caught:
        resolve("taef2_encoder", weights_dir=tmp_path, method_hint="patchcore --backbone taef2")
    message = str(caught.value)
    assert "'taef2_encoder'" in message and "offline" in message
    assert "anomalens weights download patchcore --backbone taef2" in message
    assert "--weights-dir" in message and "ANOMALENS_WEIGHTS_DIR" in message


def test_local_files_folders_and_unknown_references(tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"x")
    assert resolve(checkpoint) == checkpoint and resolve(tmp_path) == tmp_path
    with pytest.raises(WeightsNotFoundError, match="neither a registered component"):
        resolve("no such thing at all")


def test_hub_repo_id_from_local_hugging_face_cache(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    snapshot = hub / "models--acme--tiny-unet" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (hub / "models--acme--tiny-unet" / "refs").mkdir()
    (hub / "models--acme--tiny-unet" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    assert resolve("acme/tiny-unet") == snapshot
    assert resolve("hf:acme/tiny-unet") == snapshot
    with pytest.raises(WeightsNotFoundError, match="'acme/absent'.*offline"):
        resolve("acme/absent")


def test_open_clip_reference_offline(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="open_clip:ViT-B-16-plus-240/laion400m_e31.*offline"):
        resolve("open_clip:ViT-B-16-plus-240/laion400m_e31", method_hint="winclip")
    with pytest.raises(ValueError, match="valid tags"):
        resolve("open_clip:ViT-B-16-plus-240/no_such_tag")


def test_taef2_checkpoint_round_trip(tmp_path):
    path = tmp_path / "taef2_encoder.pth"
    source = _write_taef2_checkpoint(path)
    backbone = FeatureBackbone("taef2", pretrained=str(path))
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = source.half().float()[:10](images)  # fp16-rounded weights, up to block 9
    assert torch.allclose(backbone(images)[0], expected, atol=1e-5)
    # The same through the registry name and --weights-dir.
    by_name = FeatureBackbone("taef2", pretrained="default", weights_dir=tmp_path)
    assert torch.equal(by_name(images)[1], backbone(images)[1])


def test_torchvision_checkpoint_round_trip(tmp_path):
    import torchvision

    torch.manual_seed(3)
    classifier = torchvision.models.resnet18(weights=None).eval()
    torch.save(classifier.state_dict(), tmp_path / "resnet18.pth")
    backbone = FeatureBackbone("resnet18", layers=("layer2",), pretrained=str(tmp_path / "resnet18.pth"))
    images = torch.rand(1, 3, 64, 64)
    normalised = (images - backbone.mean) / backbone.std
    stem = torch.nn.Sequential(*list(classifier.children())[:6])  # conv1 .. layer2
    with torch.no_grad():
        assert torch.allclose(backbone(images)[0], stem(normalised), atol=1e-5)


def test_checkpoint_wrappers_and_safetensors(tmp_path):
    state = {"weight": torch.ones(2, 2)}
    torch.save({"state_dict": {"module.weight": torch.ones(2, 2)}}, tmp_path / "wrapped.ckpt")
    assert read_checkpoint(tmp_path / "wrapped.ckpt").keys() == {"weight"}
    save_file(state, str(tmp_path / "plain.safetensors"))
    assert torch.equal(read_checkpoint(tmp_path / "plain.safetensors")["weight"], state["weight"])
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        read_checkpoint(tmp_path / "junk.pth")


def test_checked_loading_reports_every_problem():
    module = torch.nn.Linear(3, 2)
    state = {"weight": torch.zeros(2, 4), "extra": torch.zeros(1)}
    with pytest.raises(ValueError) as caught:
        load_state_dict_checked(module, state, source="demo.pth")
    message = str(caught.value)
    assert "demo.pth" in message and "missing keys: bias" in message and "unexpected keys: extra" in message
    assert "weight: checkpoint (2, 4) vs model (2, 3)" in message


def test_fp16_checkpoint_is_cast_to_model_dtype():
    module = torch.nn.Linear(2, 2)
    load_state_dict_checked(module, {"weight": torch.ones(2, 2).half(), "bias": torch.zeros(2).half()}, source="x")
    assert module.weight.dtype == torch.float32 and module.weight.sum() == 4


def test_download_checks_digest_and_fills_cache(tmp_path, monkeypatch):
    from dataclasses import replace

    import anomalens.backbones.weights as weights

    payload = tmp_path / "upstream.pth"
    payload.write_bytes(b"weights!")
    good = replace(weights.SOURCES["taef2_encoder"], url=payload.as_uri(), sha256=weights.sha256_of(payload))
    monkeypatch.setitem(weights.SOURCES, "taef2_encoder", good)
    monkeypatch.delenv("ANOMALENS_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    path = resolve("taef2_encoder")
    assert path.read_bytes() == b"weights!" and path.parent.name == "taef2_encoder"
    assert resolve("taef2_encoder") == path  # second time from the cache
    path.unlink()
    monkeypatch.setitem(weights.SOURCES, "taef2_encoder", replace(good, sha256="0" * 64))
    with pytest.raises(WeightsNotFoundError, match="checksum mismatch") as caught:
        resolve("taef2_encoder", method_hint="patchcore --backbone taef2")
    assert "anomalens weights download patchcore --backbone taef2" in str(caught.value)
    assert not list(path.parent.iterdir())  # no partial file left behind


def _fake_hub_cache(cache, repo_id: str):
    """A Hugging Face cache entry as ``huggingface-cli download`` leaves it (refs/main -> snapshots/<commit>)."""
    entry = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = entry / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("0123abcd")
    return snapshot


def test_weights_dir_serves_hub_repos_in_both_layouts(tmp_path):
    plain = tmp_path / "plain" / "acme" / "tiny-sd"
    plain.mkdir(parents=True)
    (plain / "model_index.json").write_text("{}")
    assert resolve("acme/tiny-sd", weights_dir=tmp_path / "plain") == plain
    snapshot = _fake_hub_cache(tmp_path / "cached" / "hub", "acme/tiny-sd")
    assert resolve("acme/tiny-sd", weights_dir=tmp_path / "cached") == snapshot
    with pytest.raises(WeightsNotFoundError) as caught:
        resolve("acme/absent", weights_dir=tmp_path / "plain", method_hint="clipfusion")
    message = str(caught.value)
    assert (
        str(tmp_path / "plain") in message
        and "DIR/acme/absent/" in message
        and "weights download clipfusion" in message
    )


def test_weights_dir_serves_open_clip_checkpoints_in_both_layouts(tmp_path):
    tagged = tmp_path / "a" / "open_clip" / "ViT-B-32" / "openai"
    tagged.mkdir(parents=True)
    (tagged / "model.safetensors").write_bytes(b"x")
    assert resolve("open_clip:ViT-B-32/openai", weights_dir=tmp_path / "a") == tagged / "model.safetensors"
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "ViT-B-32-openai.pt").write_bytes(b"x")
    assert resolve("open_clip:ViT-B-32/openai", weights_dir=tmp_path / "b") == tmp_path / "b" / "ViT-B-32-openai.pt"
    with pytest.raises(WeightsNotFoundError, match="DIR/open_clip/ViT-B-32/openai/"):
        resolve("open_clip:ViT-B-32/openai", weights_dir=tmp_path / "c")


def test_unreachable_hub_fails_at_once(tmp_path, monkeypatch):
    """Online but the hub is unreachable: one quick probe, not a minute of retries."""
    import time

    import anomalens.backbones.weights as weights

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("ANOMALENS_OFFLINE")
    monkeypatch.setattr(weights, "_reachable", {"huggingface.co:443": False})
    started = time.perf_counter()
    with pytest.raises(WeightsNotFoundError, match="huggingface.co cannot be reached"):
        resolve("acme/absent-repo", weights_dir=tmp_path)
    assert time.perf_counter() - started < 5


def test_clipfusion_loads_stable_diffusion_from_the_weights_dir(tmp_path):
    """A diffusers repo folder under --weights-dir DIR/ORG/NAME is what CLIPFusion loads (weights compared)."""
    from anomalens.backbones.diffusion import DiffusionBackbone

    from conftest import tiny_detector

    built = DiffusionBackbone(None, architecture="tiny", init_seed=5)
    repo = tmp_path / "weights" / "acme" / "tiny-sd"
    built.unet.save_pretrained(repo / "unet")
    built.vae.save_pretrained(repo / "vae")
    built.text_encoder.save_pretrained(repo / "text_encoder")
    detector = tiny_detector("clipfusion", diffusion="acme/tiny-sd", weights_dir=tmp_path / "weights")
    loaded = detector.diffusion.unet.state_dict()
    for name, tensor in built.unet.state_dict().items():
        assert torch.equal(loaded[name], tensor), name


def test_pretrained_none_builds_every_network_at_random(capsys):
    """No weights anywhere (offline, empty weights folders): `--pretrained none` still builds each method."""
    import anomalens
    from anomalens.cli import main

    for method in anomalens.list_methods():
        assert main(["weights", "download", method, "--pretrained", "none"]) == 0, method
        assert "needs no pretrained weights" in capsys.readouterr().out
