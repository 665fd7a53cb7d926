"""Dataset readers on synthetic trees in every supported layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from anomalens.io.datasets import list_datasets, open_dataset

from conftest import write_mvtec


def _image(path, size=(8, 8), value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(path)


def _mask(path, size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros(size, np.uint8)
    mask[2:4, 2:4] = 255
    Image.fromarray(mask).save(path)


def test_mvtec_layout(mvtec_root):
    dataset = open_dataset("mvtec", mvtec_root)
    assert dataset.categories() == ["widget"]
    assert len(dataset.train_samples("widget")) == 4
    test = dataset.test_samples("widget")
    assert [sample.label for sample in test] == [0, 0, 0, 1, 1, 1]
    anomalous = test[-1]
    assert anomalous.defect_type == "scratch" and anomalous.mask_path.name == "002_mask.png"
    assert anomalous.mask((40, 48)).sum() == 100 and not test[0].mask((40, 48)).any()
    # The category folder itself also works as the root.
    assert open_dataset("mvtec", mvtec_root / "widget").categories() == ["widget"]


def test_mvtec_missing_and_mismatched_masks(mvtec_root):
    (mvtec_root / "widget" / "ground_truth" / "scratch" / "001_mask.png").unlink()
    with pytest.raises(ValueError, match=r"anomalous image .*scratch/001.png has no mask"):
        open_dataset("mvtec", mvtec_root).test_samples("widget")
    _mask(mvtec_root / "widget" / "ground_truth" / "scratch" / "001_mask.png", size=(5, 5))
    sample = open_dataset("mvtec", mvtec_root).test_samples("widget")[4]
    with pytest.raises(ValueError, match="is 5x5 but its image is 48x40"):
        sample.mask((40, 48))


def test_btad_and_mvtec_ad2_variants(tmp_path):
    btad = tmp_path / "btad" / "01"
    _image(btad / "train" / "ok" / "0000.bmp")
    _image(btad / "test" / "ok" / "0001.bmp")
    _image(btad / "test" / "ko" / "0002.bmp")
    _mask(btad / "ground_truth" / "ko" / "0002.png")
    dataset = open_dataset("mvtec", tmp_path / "btad")
    assert dataset.categories() == ["01"] and len(dataset.train_samples("01")) == 1
    assert [(s.label, s.mask_path.name if s.mask_path else None) for s in dataset.test_samples("01")] == [
        (1, "0002.png"),
        (0, None),
    ]
    ad2 = tmp_path / "ad2" / "can"
    _image(ad2 / "train" / "good" / "000.png")
    _image(ad2 / "test_public" / "good" / "000.png")
    _image(ad2 / "test_public" / "bad" / "000.png")
    _mask(ad2 / "test_public" / "ground_truth" / "bad" / "000_mask.png")
    samples = open_dataset("mvtec", tmp_path / "ad2").test_samples("can")
    assert sorted(s.label for s in samples) == [0, 1]


def test_visa_split_csv(tmp_path):
    root = tmp_path / "visa"
    _image(root / "candle" / "Data" / "Images" / "Normal" / "0000.JPG")
    _image(root / "candle" / "Data" / "Images" / "Normal" / "0001.JPG")
    _image(root / "candle" / "Data" / "Images" / "Anomaly" / "0002.JPG")
    _mask(root / "candle" / "Data" / "Masks" / "Anomaly" / "0002.png")
    (root / "split_csv").mkdir()
    (root / "split_csv" / "1cls.csv").write_text(
        "object,split,label,image,mask\n"
        "candle,train,normal,candle/Data/Images/Normal/0000.JPG,\n"
        "candle,test,normal,candle/Data/Images/Normal/0001.JPG,\n"
        "candle,test,anomaly,candle/Data/Images/Anomaly/0002.JPG,candle/Data/Masks/Anomaly/0002.png\n"
    )
    dataset = open_dataset("visa", root)
    assert dataset.categories() == ["candle"]
    assert len(dataset.train_samples("candle")) == 1
    assert [s.label for s in dataset.test_samples("candle")] == [0, 1]
    (root / "candle" / "Data" / "Masks" / "Anomaly" / "0002.png").unlink()
    with pytest.raises(ValueError, match="0002.JPG has no mask file"):
        dataset.test_samples("candle")


def test_realiad_json_split(tmp_path):
    root = tmp_path / "realiad"
    images = root / "realiad_256" / "audiojack"
    _image(images / "OK" / "S0001" / "a_OK_C1.jpg")
    _image(images / "OK" / "S0002" / "b_OK_C1.jpg")
    _image(images / "NG" / "AK" / "S0003" / "c_NG_C1.jpg")
    _mask(images / "NG" / "AK" / "S0003" / "c_NG_C1.png")
    split = {
        "meta": {"prefix": "", "normal_class": "OK", "pre_transform": False},
        "train": [{"category": "audiojack", "anomaly_class": "OK", "image_path": "OK/S0001/a_OK_C1.jpg",
                   "mask_path": None}],
        "test": [
            {"category": "audiojack", "anomaly_class": "OK", "image_path": "OK/S0002/b_OK_C1.jpg", "mask_path": None},
            {"category": "audiojack", "anomaly_class": "AK", "image_path": "NG/AK/S0003/c_NG_C1.jpg",
             "mask_path": "NG/AK/S0003/c_NG_C1.png"},
        ],
    }  # fmt: skip
    (root / "realiad_jsons").mkdir(parents=True)
    (root / "realiad_jsons" / "audiojack.json").write_text(json.dumps(split))
    dataset = open_dataset("realiad", root)
    assert dataset.categories() == ["audiojack"]
    test = dataset.test_samples("audiojack")
    assert [(s.label, s.defect_type) for s in test] == [(0, "good"), (1, "AK")]
    assert test[1].image_path.is_file() and test[1].mask((8, 8)).sum() == 4


def test_folder_dataset(tmp_path):
    root = tmp_path / "parts"
    for index in range(6):
        _image(root / "good" / f"g{index}.png")
    _image(root / "dent" / "d0.png")
    dataset = open_dataset("folder", root)
    pool, test = dataset.train_samples("parts"), dataset.test_samples("parts")
    normal_test = [s for s in test if s.label == 0]
    assert len(pool) + len(normal_test) == 6 and not {s.image_path for s in pool} & {s.image_path for s in test}
    assert test[-1].label == 1 and test[-1].mask((8, 8)) is None  # no masks folder: pixel metrics unknown
    _mask(root / "masks" / "dent" / "d0_mask.png")
    _image(root / "reference" / "r0.png")
    dataset = open_dataset("folder", root)
    assert [s.image_path.name for s in dataset.train_samples("parts")] == ["r0.png"]
    assert len(dataset.test_samples("parts")) == 7 and dataset.test_samples("parts")[-1].mask((8, 8)).any()


def test_unknown_names_list_valid_ones(mvtec_root):
    with pytest.raises(ValueError, match="valid datasets: folder, mvtec, realiad, visa"):
        open_dataset("kolektor", mvtec_root)
    with pytest.raises(ValueError, match="valid: widget"):
        open_dataset("mvtec", mvtec_root).test_samples("bottle")
    assert list_datasets() == ["folder", "mvtec", "realiad", "visa"]


def test_second_category_is_listed(tmp_path):
    write_mvtec(tmp_path, "alpha")
    write_mvtec(tmp_path, "beta", seed=1)
    assert open_dataset("mvtec", tmp_path).categories() == ["alpha", "beta"]
