"""One contract every registered method honours: shapes, determinism, save/load, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

import anomalens

from conftest import TINY_CONFIGS, BrightnessDetector, plant_defect, textured_image, tiny_detector

METHODS = anomalens.list_methods()


def test_every_method_has_a_tiny_config():
    assert sorted(TINY_CONFIGS) == METHODS


def _references_and_queries():
    rng = np.random.default_rng(0)
    references = [textured_image(rng, 40, 48) for _ in range(3)]
    normal = textured_image(rng, 40, 48)
    defective, _ = plant_defect(textured_image(rng, 40, 48), 10, 12, 12)
    odd_size = textured_image(rng, 23, 61)  # another resolution and aspect ratio in the same batch
    return references, [normal, defective, odd_size]


def _fit(detector, references, threshold=None):
    return detector.fit(references if detector.few_shot else None, class_name="widget", threshold=threshold)


@pytest.mark.parametrize("method", METHODS)
def test_output_type_and_shapes(method):
    references, queries = _references_and_queries()
    detector = _fit(tiny_detector(method), references)
    results = detector.predict(queries)
    assert len(results) == 3
    for result, query in zip(results, queries):
        assert isinstance(result, anomalens.AnomalyResult)
        assert isinstance(result.score, float) and np.isfinite(result.score)
        assert result.anomaly_map.dtype == np.float32 and result.anomaly_map.shape == query.shape[:2]
        assert np.isfinite(result.anomaly_map).all()
        assert result.label is None  # no threshold yet
    assert len(detector.predict(queries[0])) == 1  # a single image is accepted too


@pytest.mark.parametrize("method", METHODS)
def test_deterministic_under_seed(method):
    references, queries = _references_and_queries()
    first = _fit(tiny_detector(method, seed=3), references).predict(queries)
    second = _fit(tiny_detector(method, seed=3), references).predict(queries)
    for a, b in zip(first, second):
        assert a.score == b.score and np.array_equal(a.anomaly_map, b.anomaly_map)


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip(method, tmp_path):
    references, queries = _references_and_queries()
    detector = _fit(tiny_detector(method), references)
    detector.threshold = 1.25
    detector.save(tmp_path / "saved")
    meta = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert meta["method"] == method and meta["class_name"] == "widget" and meta["threshold"] == 1.25
    restored = anomalens.load(tmp_path / "saved")
    assert type(restored) is type(detector) and restored.is_fitted and restored.threshold == 1.25
    for a, b in zip(detector.predict(queries), restored.predict(queries)):
        assert a.score == pytest.approx(b.score, rel=1e-6) and np.allclose(a.anomaly_map, b.anomaly_map, atol=1e-6)
        assert b.label == (b.score > 1.25)
    detector.save(tmp_path / "saved")  # saving again over a saved detector replaces it
    assert anomalens.load(tmp_path / "saved").is_fitted


@pytest.mark.parametrize("method", METHODS)
def test_copies_and_pickles_score_the_same(method):
    import copy
    import pickle

    references, queries = _references_and_queries()
    detector = _fit(tiny_detector(method), references)
    expected = detector.predict(queries)
    for duplicate in (copy.deepcopy(detector), pickle.loads(pickle.dumps(detector))):
        for a, b in zip(expected, duplicate.predict(queries), strict=True):
            assert a.score == b.score and np.array_equal(a.anomaly_map, b.anomaly_map)


def test_copied_torchvision_backbones_stay_in_eval_mode():
    """torch.fx feature extractors come back from deepcopy in training mode (batch norm on batch statistics)."""
    import copy
    import pickle

    references, queries = _references_and_queries()
    detector = anomalens.create("patchcore", backbone="resnet18", pretrained=None, image_size=32).fit(references)
    expected = [result.score for result in detector.predict(queries)]
    for duplicate in (copy.deepcopy(detector), pickle.loads(pickle.dumps(detector))):
        assert not any(module.training for module in duplicate.backbone.model.modules())
        assert [result.score for result in duplicate.predict(queries)] == expected


@pytest.mark.parametrize("method", METHODS)
def test_errors_are_clear(method, tmp_path):
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['no_such_option'\].*valid options: "):
        anomalens.create(method, no_such_option=1)
    detector = tiny_detector(method)
    with pytest.raises(RuntimeError, match="not fitted"):
        detector.predict([np.zeros((8, 8, 3), np.uint8)])
    if not detector.zero_shot:
        with pytest.raises(ValueError, match="needs at least one normal reference image"):
            detector.fit(None)
    _fit(detector, _references_and_queries()[0])
    with pytest.raises(anomalens.ImageLoadError, match="missing.png"):
        detector.predict([tmp_path / "missing.png"])
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="not a saved anomalens detector"):
        anomalens.load(tmp_path / "junk")
    with pytest.raises(ValueError, match="exists and is not a saved detector"):
        detector.save(tmp_path / "junk")


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown method 'nope'; valid methods: .*patchcore"):
        anomalens.create("nope")


def test_register_third_party_method():
    anomalens.register_method(BrightnessDetector)
    try:
        assert "brightness_test" in anomalens.list_methods()
        detector = anomalens.create("brightness_test").fit()
        result = detector.predict([np.full((16, 20, 3), 10, np.uint8)])[0]
        assert result.score == 10.0 and result.anomaly_map.shape == (16, 20)
        with pytest.raises(ValueError, match="zero-shot and takes no reference images"):
            detector.fit([np.zeros((4, 4, 3), np.uint8)])
    finally:
        from anomalens import registry

        registry._REGISTERED.pop("brightness_test")
    with pytest.raises(ValueError, match="must be a Detector subclass"):
        anomalens.register_method(int)


@pytest.mark.parametrize("method", METHODS)
def test_follows_to_dtype_after_fit(method):
    """Fitted state (cached prompt embeddings, memory banks) follows ``.to()``: a bfloat16 detector still scores."""
    import torch

    references, queries = _references_and_queries()
    detector = _fit(tiny_detector(method), references)
    full = detector.predict(queries)
    detector.to(torch.bfloat16)
    assert detector.weights_dtype == torch.bfloat16
    half = detector.predict(queries)
    for a, b, query in zip(full, half, queries):
        assert b.anomaly_map.dtype == np.float32 and b.anomaly_map.shape == query.shape[:2]
        assert np.isfinite(b.score) and np.isfinite(b.anomaly_map).all()
        if method == "ensemble":  # fused scores are in units of the members' held-out spread: compare the members
            for name, score in b.extras["members"].items():
                assert score == pytest.approx(a.extras["members"][name], abs=0.05)
            continue
        assert b.score == pytest.approx(a.score, abs=0.05)  # bfloat16 keeps ~3 significant digits
    detector.to(torch.float32)
    for result in detector.predict(queries):  # and back: the float32 weights were rounded once
        assert np.isfinite(result.score)


@pytest.mark.parametrize("method", METHODS)
def test_score_does_not_depend_on_the_rest_of_the_batch(method):
    """An image scores the same alone and second in a batch; pooled methods (images are each other's references)
    score a pool the same in any order."""
    references, queries = _references_and_queries()
    detector = _fit(tiny_detector(method), references)
    if detector.pooled:
        forward = [result.score for result in detector.predict(queries)]
        backward = [result.score for result in detector.predict(queries[::-1])][::-1]
        assert forward == pytest.approx(backward, rel=1e-5, abs=1e-6)
        return
    alone = detector.predict([queries[1]])[0]
    second = detector.predict([queries[0], queries[1]])[1]
    third = detector.predict([queries[2], queries[0], queries[1]])[2]
    for other in (second, third):
        assert other.score == pytest.approx(alone.score, rel=1e-5, abs=1e-6)
        assert np.allclose(other.anomaly_map, alone.anomaly_map, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", [name for name in METHODS if anomalens.get_method(name).few_shot
                                    and name != "ensemble"])  # its own brute force: test_ensemble.py
def test_leave_one_out_threshold_matches_refitting_per_fold(method):
    """``fit(threshold="leave-one-out")`` equals the brute-force rule (refit from the images on all but one,
    score the one held out, take the maximum) while running each reference through the backbone only twice
    (once encoded, once held out), not once per fold. (PatchCore keeps every patch here, where leaving a
    reference's entries out of one fit is exactly a fit on the others; with a coreset the holes are refilled,
    checked by hand in test_thresholds.py.)"""
    references, _ = _references_and_queries()
    references = references + [textured_image(np.random.default_rng(7), 40, 48)]
    options = {"coreset_ratio": 1.0} if method == "patchcore" else {}
    brute_force = []
    for index in range(len(references)):
        detector = _fit(tiny_detector(method, **options), references[:index] + references[index + 1 :])
        brute_force.append(detector.predict([references[index]])[0].score)
    detector = tiny_detector(method, **options)
    encoded_images, scored_images = [], []
    encode, predict = detector._encode_references, detector._predict_batch
    detector._encode_references = lambda images: encoded_images.extend(images) or encode(images)
    detector._predict_batch = lambda images: scored_images.extend(images) or predict(images)
    steps = []
    detector.fit(references, class_name="widget", threshold="leave-one-out",
                 progress=lambda done, total: steps.append((done, total)))  # fmt: skip
    assert detector.threshold == pytest.approx(max(brute_force), rel=1e-5)
    assert detector.threshold_source == "leave-one-out"
    assert len(encoded_images) == len(references) and len(scored_images) == len(references)
    assert steps[-1] == (2 * len(references), 2 * len(references))
    auto = _fit(tiny_detector(method, **options), references, threshold="auto")
    assert auto.threshold == pytest.approx(detector.threshold, rel=1e-5)
    single = _fit(tiny_detector(method), references[:1], threshold="auto")
    assert single.threshold is None and single.threshold_source == "none"


@pytest.mark.parametrize("threshold", [float("nan"), float("inf"), "max", True, "1.0"])
def test_fit_refuses_a_bad_threshold(threshold):
    detector = BrightnessDetector(BrightnessDetector.config_class())
    with pytest.raises(ValueError, match="threshold="):
        detector.fit(None, threshold=threshold)
    assert not detector.is_fitted
