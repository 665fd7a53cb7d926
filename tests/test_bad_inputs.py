"""A corpus of hostile and awkward image files, run through every entry point: ``predict`` (local engine),
``serve`` and the Ray engine. For each: no crash, every good image scored, every bad one reported under its own
name with the reason, and memory bounded by the header checks (not by luck)."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalens.cli import main
from anomalens.io.images import ImageLoadError, estimate_memory, load_image

from conftest import textured_image

TINY = ["--method", "patchcore", "--backbone", "taef2", "--pretrained", "none", "--set", "image_size=32"]


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` but whose pixel data is a few bytes."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def _encoded(image: Image.Image, kind: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=kind, **options)
    return buffer.getvalue()


# name -> fragment of the reason it must be refused with
BAD = {
    "bomb-30000x30000-1bit.png": "900000000 pixels, which exceeds the limit",  # 109 KB on disk
    "strip-1x2500000.png": "a side exceeds the limit of 65535",  # 9.8 KB; it took 6.7 GB to resize before
    "strip-1x39000000-1bit.png": "a side exceeds the limit of 65535",
    "square-6000x6000-1bit.png": "would need about",  # under the pixel cap, over the memory estimate
    "header-lies-100000x100000.png": "exceeds the limit",  # a header with almost no data behind it
    "truncated.png": "corrupt or truncated",
    "text.png": "not a recognised image format",
    "empty.png": "empty file",
    "animation.png": "GIF is not accepted",  # a GIF under a PNG name: judged by content
}
GOOD = ["rgb.png", "gray16.png", "palette-alpha.png", "cmyk.jpg", "rotated.jpg", "float.tif", "bitmap.bmp",
        "strip-1x60000.png", "same-name/rgb.png"]  # fmt: skip


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(textured_image(rng, 40, 48))
    files = {
        "rgb.png": _encoded(rgb, "PNG"),
        "same-name/rgb.png": _encoded(Image.fromarray(textured_image(rng, 40, 48)), "PNG"),
        "gray16.png": _encoded(Image.fromarray((rng.integers(0, 65535, (40, 48))).astype(np.uint16)), "PNG"),
        "palette-alpha.png": _encoded(rgb.convert("RGBA").convert("P"), "PNG", transparency=0),
        "cmyk.jpg": _encoded(rgb.convert("CMYK"), "JPEG"),
        "float.tif": _encoded(Image.fromarray(rng.random((40, 48)).astype(np.float32)), "TIFF"),
        "bitmap.bmp": _encoded(rgb, "BMP"),
        "strip-1x2500000.png": _encoded(Image.new("RGB", (1, 2_500_000), (120, 130, 140)), "PNG"),  # 9.8 KB
        "strip-1x60000.png": _encoded(Image.new("RGB", (1, 60_000), (120, 130, 140)), "PNG"),
        "square-6000x6000-1bit.png": _encoded(Image.new("1", (6000, 6000)), "PNG"),
        "bomb-30000x30000-1bit.png": _encoded(Image.new("1", (30000, 30000)), "PNG"),
        "strip-1x39000000-1bit.png": _encoded(Image.new("1", (1, 39_000_000)), "PNG"),
        "header-lies-100000x100000.png": _png_header_only(100_000, 100_000),
        "truncated.png": _encoded(rgb, "PNG")[:300],
        "text.png": b"this is not an image",
        "empty.png": b"",
        "animation.png": _encoded(rgb, "GIF"),
    }
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: displayed 40 wide, 48 high
    files["rotated.jpg"] = _encoded(rgb, "JPEG", exif=exif.tobytes())
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def _check_run(out: Path, corpus: Path) -> None:
    """Every good file scored once, every bad one in errors.jsonl with its reason, run complete."""
    records = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert sorted(Path(record["path"]).relative_to(corpus).as_posix() for record in records) == sorted(GOOD)
    reasons = {Path(error["path"]).relative_to(corpus).as_posix(): error["error"] for error in errors}
    assert reasons.keys() == BAD.keys()
    for name, fragment in BAD.items():
        assert fragment in reasons[name], (name, reasons[name])
    assert all(np.isfinite(record["score"]) for record in records)
    assert json.loads((out / "run.json").read_text())["status"] == "complete"


def test_loader_refuses_before_decoding(corpus):
    for name, fragment in BAD.items():
        with pytest.raises(ImageLoadError, match=fragment) as caught:
            load_image(corpus / name)
        assert str(corpus / name) in str(caught.value)  # the error names its file
    assert load_image(corpus / "rotated.jpg").shape == (48, 40, 3)
    assert estimate_memory(6000, 6000, "1") > 2 * 2**30 > estimate_memory(5000, 5000, "1")  # why the square is refused
    if os.path.exists("/dev/zero"):
        (corpus.parent / "device.png").unlink(missing_ok=True)
        (corpus.parent / "device.png").symlink_to("/dev/zero")
        with pytest.raises(ImageLoadError, match="not a regular file"):
            load_image(corpus.parent / "device.png")


def test_predict_scores_the_good_and_reports_the_bad(corpus, tmp_path, capsys):
    references = tmp_path / "references"
    references.mkdir()
    for index in range(2):
        Image.fromarray(textured_image(np.random.default_rng(index), 40, 48)).save(references / f"{index}.png")
    args = ["-q", "predict", *TINY, str(corpus), "--reference", str(references), "--out", str(tmp_path / "out")]
    assert main(args) == 0
    _check_run(tmp_path / "out", corpus)
    assert f"skipped {len(BAD)};" in capsys.readouterr().out


def test_resizing_a_strip_shrinks_the_long_side_first():
    """The two-step resize equals torch's one-step antialiased resize (brute force) but never builds the
    (H, size) intermediate that made a 1 x 2,500,000 strip cost 6.7 GB."""
    import torch
    import torch.nn.functional as F

    from anomalens.io.images import images_to_tensor

    rng = np.random.default_rng(3)
    for shape in [(3000, 7, 3), (9, 2000, 3), (300, 200, 3)]:
        image = rng.integers(0, 255, shape, dtype=np.uint8)
        reference = F.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255, size=(32, 32),
                                  mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)  # fmt: skip
        torch.testing.assert_close(images_to_tensor([image], 32, mode="bicubic"), reference, atol=2e-6, rtol=0)


def test_serve_scores_the_good_and_rejects_the_bad(corpus):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from anomalens.engines.serve import create_app

    from conftest import tiny_detector

    detector = tiny_detector("patchcore").fit([corpus / "rgb.png"])
    names = [*GOOD, *BAD]
    files = [("files", (name, (corpus / name).read_bytes(), "image/png")) for name in names]
    with TestClient(create_app(detector), base_url="http://127.0.0.1") as client:
        response = client.post("/v1/predict", files=files)
        assert response.status_code == 200
        body = response.json()
        scored = [names[item["index"]] for item in body["results"]]
        assert sorted(scored) == sorted(GOOD)
        rejected = {names[item["index"]]: item for item in body["rejected"]}
        assert rejected.keys() == BAD.keys()
        for name, fragment in BAD.items():
            assert fragment in rejected[name]["error"] and 400 <= rejected[name]["status"] < 500
            assert rejected[name]["name"] == Path(name).name
        assert "Traceback" not in response.text and "allocate" not in response.text
        assert client.get("/healthz").json()["status"] == "ok"


@pytest.mark.heavy
def test_ray_engine_scores_the_good_and_reports_the_bad(corpus, tmp_path):
    ray = pytest.importorskip("ray")
    from conftest import predict_ray, tiny_detector

    detector = tiny_detector("patchcore").fit([corpus / "rgb.png"])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = predict_ray(detector, [corpus], tmp_path / "out", batch_size=4)
    finally:
        ray.shutdown()
    assert (summary.scored, summary.skipped) == (len(GOOD), len(BAD))
    _check_run(tmp_path / "out", corpus)


def test_predict_limits_are_options(corpus, tmp_path, capsys):
    """`--max-pixels` tightens (or loosens) the header check: every 40 x 48 image is now over it, reported."""
    out = tmp_path / "out"
    args = ["-q", "predict", *TINY, str(corpus / "rgb.png"), str(corpus / "bitmap.bmp"), "--max-pixels", "1000"]
    assert main([*args, "--reference", str(corpus / "rgb.png"), "--out", str(out)]) == 0
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert len(errors) == 2 and all("1920 pixels exceeds the limit of 1000" in item["error"] for item in errors)
