"""Parked weights (anomalens.nn.offload): CLIPFusion's text encoders leave memory once the class's prompts are cached,
and nothing a user sees changes: maps and scores, save/load, refitting to a new class, copying and pickling."""

from __future__ import annotations

import copy
import gc
import os
import pickle
import tempfile

import numpy as np
import pytest
import torch
from torch import nn

import anomalens
from anomalens.nn.offload import ParkedTensors, parked_sets

from conftest import plant_defect, textured_image, tiny_detector


class _Toy(nn.Module):
    """A module with a tied weight and a non-persistent buffer, the cases a naive state_dict round trip loses."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.embedding.weight  # tied
        self.other = nn.Linear(6, 6)
        self.register_buffer("offset", torch.arange(6.0), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.other(self.embedding(ids)) + self.offset)


@pytest.fixture
def temp_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_parked_tensors_leave_memory_and_come_back_bit_for_bit(temp_dir):
    torch.manual_seed(0)
    toy = _Toy()
    ids = torch.tensor([[1, 2, 3]])
    expected = toy(ids)
    parked = ParkedTensors(toy, "toy", exclude=("other.",))
    parked.park()
    assert parked.parked and [path.name.startswith("anomalens-parked-") for path in temp_dir.iterdir()] == [True]
    assert toy.embedding.weight.is_meta and toy.offset.is_meta and toy.head.weight is toy.embedding.weight
    assert not toy.other.weight.is_meta  # excluded prefixes stay
    with parked.resident():
        assert torch.equal(toy(ids), expected) and toy.head.weight is toy.embedding.weight
    assert toy.embedding.weight.is_meta  # parked again after the block
    parked.restore()
    assert torch.equal(toy(ids), expected) and not parked.parked
    del parked
    gc.collect()
    assert list(temp_dir.iterdir()) == []  # the file goes with its ParkedTensors


def test_parked_tensors_checks(temp_dir):
    toy = _Toy()
    with pytest.raises(ValueError, match=r"include=\('nothing\.',\).*select no tensor"):
        ParkedTensors(toy, "toy", include=("nothing.",))
    parked = ParkedTensors(toy, "toy")
    parked.park()
    with pytest.raises(RuntimeError, match="toy is parked"):
        pickle.dumps(parked)
    with pytest.raises(RuntimeError, match="restore"):
        parked.forget_file()


def test_parking_without_a_usable_temporary_folder_keeps_the_weights(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    toy = _Toy()
    parked = ParkedTensors(toy, "toy")
    with caplog.at_level("WARNING", logger="anomalens.nn.offload"):
        parked.park()
    assert not parked.parked and not toy.embedding.weight.is_meta
    assert "could not park toy" in caplog.text and "stays in memory" in caplog.text


def _images(count: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    images = [textured_image(rng, 40, 48) for _ in range(count)]
    images[-1] = plant_defect(images[-1], 10, 12, 10)[0]
    return images


def _text_tensors(detector) -> list[torch.Tensor]:
    return [detector.clip.model.token_embedding.weight, *detector.diffusion.text_encoder.parameters()]


def _assert_same(first, second) -> None:
    assert [result.score for result in first] == [result.score for result in second]
    for one, other in zip(first, second):
        np.testing.assert_array_equal(one.anomaly_map, other.anomaly_map)


def test_clipfusion_offloaded_text_encoders_change_nothing(temp_dir, tmp_path):
    images = _images()
    offloaded = tiny_detector("clipfusion").fit(images[:1], class_name="bottle")
    resident = tiny_detector("clipfusion", offload_text_encoders=False).fit(images[:1], class_name="bottle")
    assert all(tensor.is_meta for tensor in _text_tensors(offloaded))
    assert not any(tensor.is_meta for tensor in _text_tensors(resident))
    assert not any(tensor.is_meta for tensor in offloaded.clip.visual.parameters())
    _assert_same(offloaded.predict(images), resident.predict(images))

    # saved while parked: the file has the real text weights, and the loaded detector scores the same
    offloaded.save(tmp_path / "saved")
    assert len(parked_sets(offloaded)) == 2 and all(parked_set.parked for parked_set in parked_sets(offloaded))
    loaded = anomalens.load(tmp_path / "saved")
    _assert_same(loaded.predict(images), resident.predict(images))
    assert all(tensor.is_meta for tensor in _text_tensors(loaded))  # its first prompts parked them too

    # a new class name reads the encoders back for its prompts
    offloaded.fit(images[:1], class_name="cable")
    resident.fit(images[:1], class_name="cable")
    _assert_same(offloaded.predict(images), resident.predict(images))

    # copies and pickles carry the real weights
    _assert_same(copy.deepcopy(offloaded).predict(images), resident.predict(images))
    _assert_same(pickle.loads(pickle.dumps(offloaded)).predict(images), resident.predict(images))


def test_load_state_dict_into_a_parked_detector_replaces_its_text_weights(temp_dir):
    images = _images(2)
    parked = tiny_detector("clipfusion").fit(None, class_name="bottle")
    other = tiny_detector("clipfusion", offload_text_encoders=False)
    with torch.no_grad():  # other text weights, the same everything else
        for tensor in [*other.clip.model.transformer.parameters(), *other.diffusion.text_encoder.parameters()]:
            tensor.mul_(1.5)
    other.fit(None, class_name="bottle")
    path = parked.clip.text_weights._path
    parked.load_state_dict(other.state_dict())
    assert not os.path.exists(path)  # the stale file is dropped, not read back later
    assert torch.equal(parked.clip.model.transformer.resblocks[0].mlp.c_fc.weight,
                       other.clip.model.transformer.resblocks[0].mlp.c_fc.weight)  # fmt: skip
    parked.fit(None, class_name="bottle")  # prompts encoded again with the new weights, not taken from the cache
    assert all(tensor.is_meta for tensor in _text_tensors(parked))
    _assert_same(parked.predict(images), other.predict(images))


def test_moving_or_converting_a_parked_detector_converts_its_real_weights(temp_dir):
    images = _images(2)
    parked = tiny_detector("clipfusion").fit(None, class_name="bottle")
    resident = tiny_detector("clipfusion", offload_text_encoders=False).fit(None, class_name="bottle")
    path = parked.clip.text_weights._path
    parked.to("cpu")  # the user's `.to(device)` after fit: meta tensors cannot be copied, so they come back first
    assert not os.path.exists(path) and not any(tensor.is_meta for tensor in _text_tensors(parked))
    parked.to(torch.float64)  # a dtype change reaches the text encoders too, not a stale float32 file
    assert all(tensor.dtype == torch.float64 for tensor in _text_tensors(parked))
    parked.to(torch.float32)
    _assert_same(parked.predict(images), resident.predict(images))
    assert all(tensor.is_meta for tensor in _text_tensors(parked))  # parked again by the first prompts
