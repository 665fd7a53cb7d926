"""Image input: every supported mode becomes RGB uint8; bad files raise errors naming them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from anomalens.io.images import ImageLoadError, find_images, load_image, load_mask


@pytest.fixture
def gradient():
    ramp = np.linspace(0, 255, 24, dtype=np.uint8)
    return np.stack([np.tile(ramp, (16, 1)), np.tile(ramp[::-1], (16, 1)), np.full((16, 24), 77, np.uint8)], -1)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".tif"])
def test_rgb_formats(tmp_path, gradient, suffix):
    path = tmp_path / f"image{suffix}"
    Image.fromarray(gradient).save(path, quality=100) if suffix == ".jpg" else Image.fromarray(gradient).save(path)
    loaded = load_image(path)
    assert loaded.shape == (16, 24, 3) and loaded.dtype == np.uint8
    tolerance = 12 if suffix == ".jpg" else 0
    assert np.abs(loaded.astype(int) - gradient.astype(int)).max() <= tolerance


def test_grayscale_palette_and_alpha(tmp_path, gradient):
    gray = Image.fromarray(gradient[:, :, 0])
    gray.save(tmp_path / "gray.png")
    assert np.array_equal(load_image(tmp_path / "gray.png")[:, :, 1], gradient[:, :, 0])
    Image.fromarray(gradient).quantize(16).save(tmp_path / "palette.png")
    palette = load_image(tmp_path / "palette.png")
    assert palette.shape == (16, 24, 3) and np.abs(palette.astype(int) - gradient.astype(int)).mean() < 20
    rgba = np.dstack([gradient, np.full((16, 24), 255, np.uint8)])
    rgba[:, :12, 3] = 0  # left half transparent: composited on black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    loaded = load_image(tmp_path / "rgba.png")
    assert loaded[:, :12].max() == 0 and np.array_equal(loaded[:, 12:], gradient[:, 12:])


def test_sixteen_bit_and_float(tmp_path):
    values = np.linspace(0, 65535, 16 * 24).reshape(16, 24).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    loaded = load_image(tmp_path / "deep.png")
    assert loaded[0, 0, 0] == 0 and loaded[-1, -1, 0] == 255
    assert np.abs(loaded[:, :, 0].astype(float) - values / 257.0).max() <= 1.0
    floats = np.linspace(0, 1, 16 * 24, dtype=np.float32).reshape(16, 24)
    Image.fromarray(floats, "F").save(tmp_path / "float.tif")
    loaded = load_image(tmp_path / "float.tif")
    assert loaded[-1, -1, 0] == 255 and loaded[0, 0, 0] == 0


def test_cmyk_jpeg(tmp_path, gradient):
    Image.fromarray(gradient).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    loaded = load_image(tmp_path / "cmyk.jpg")
    assert loaded.shape == (16, 24, 3)
    assert np.abs(loaded.astype(int) - gradient.astype(int)).mean() < 12


def test_exif_rotation_is_applied(tmp_path, gradient):
    image = Image.fromarray(gradient)
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise for display
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    loaded = load_image(tmp_path / "rotated.jpg")
    assert loaded.shape == (24, 16, 3)
    expected = np.rot90(gradient, k=-1)
    assert np.abs(loaded.astype(int) - expected.astype(int)).mean() < 8


def test_arrays_and_pil_images(gradient):
    assert load_image(gradient[:, :, 0]).shape == (16, 24, 3)
    assert np.array_equal(load_image(Image.fromarray(gradient)), gradient)
    with pytest.raises(ImageLoadError, match="zero-size"):
        load_image(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(ImageLoadError, match=r"\(2, 3, 7\)"):
        load_image(np.zeros((2, 3, 7), np.uint8))


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "empty file"), (b"this is not an image at all", "not a recognised image"), (None, "corrupt or truncated")],
)
def test_bad_files_name_the_file(tmp_path, gradient, content, reason):
    path = tmp_path / "bad.png"
    if content is None:
        Image.fromarray(gradient).save(path)
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(ImageLoadError, match=reason) as caught:
        load_image(path)
    assert str(path) in str(caught.value) and isinstance(caught.value, ValueError)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageLoadError, match="no such file"):
        load_image(tmp_path / "absent.png")
    with pytest.raises(ImageLoadError, match="is a directory"):
        load_image(tmp_path)


def test_find_images_recurses_and_keeps_named_files(tmp_path, gradient):
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.fromarray(gradient).save(tmp_path / "a" / "one.PNG")
    Image.fromarray(gradient).save(tmp_path / "a" / "b" / "two.jpg")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    found = find_images([tmp_path / "a", tmp_path / "a" / "notes.txt", tmp_path / "a" / "one.PNG"])
    assert [path.name for path in found] == ["two.jpg", "one.PNG", "notes.txt"]  # sorted by full path
    with pytest.raises(ValueError, match="does not exist"):
        find_images([tmp_path / "nowhere"])


def test_mask_size_must_match(tmp_path):
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "mask.png")
    assert load_mask(tmp_path / "mask.png", (8, 8)).all()
    with pytest.raises(ValueError, match="8x8 but its image is 9x8"):
        load_mask(tmp_path / "mask.png", (8, 9))
