"""anomalens benchmark-speed (anomalens.evaluation.speed): the side-by-side timing harness, figures and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import anomalens
from anomalens.cli import main
from anomalens.evaluation.speed import (
    FULL_SIZE_SETTINGS,
    add_ratios,
    check_settings,
    count_flops,
    dominant_network,
    evenly_spaced,
    grouped_per_image,
    markdown,
    significant,
    stage_group,
)

from conftest import ASSETS, TINY_CLIP, TINY_CONFIGS, tiny_detector, write_noise_images


def test_full_size_settings_cover_every_registered_method():
    from anomalens.config import config_fields

    assert {setting["method"] for setting in FULL_SIZE_SETTINGS} == set(anomalens.list_methods())
    for setting in check_settings(FULL_SIZE_SETTINGS):  # options are real config fields of their method
        assert set(setting["options"]) - {"preset"} <= set(
            config_fields(anomalens.get_method(setting["method"]).config_class)
        )


def test_check_settings_names_the_bad_entry():
    with pytest.raises(ValueError, match=r"unknown method 'winclop'.*valid methods: .*winclip"):
        check_settings([{"method": "winclop"}])
    with pytest.raises(ValueError, match=r"settings\[1\] shots must be an integer >= 0, got -1"):
        check_settings([{"method": "winclip"}, {"method": "winclip", "shots": -1}])
    with pytest.raises(ValueError, match=r"settings\[0\] options must be an object"):
        check_settings([{"method": "winclip", "options": ["backbone"]}])
    with pytest.raises(ValueError, match=r"unknown keys \['shot'\]"):
        check_settings([{"method": "winclip", "shot": 1}])
    with pytest.raises(ValueError, match="non-empty list"):
        check_settings({"method": "winclip"})


def test_stage_grouping_and_subsets():
    assert stage_group("clip") == stage_group("features") == "image encoder"
    assert stage_group("memory_search") == "memory search" and stage_group("ddim") == "other"
    grouped = grouped_per_image({"clip": 4.0, "image_encoder": 2.0, "unet": 1.0, "ddim": 0.5}, images=2)
    assert grouped == {"image encoder": 3.0, "unet": 0.5, "other": 0.25}
    paths = [f"{index}.png" for index in range(10)]
    assert evenly_spaced(paths, 4) == ["0.png", "2.png", "5.png", "7.png"] and evenly_spaced(paths, 20) == paths
    with pytest.raises(ValueError, match="count must be >= 1, got 0"):
        evenly_spaced(paths, 0)


def test_dominant_network_is_the_one_with_most_flops_in_each_setting():
    # CLIPFusion's counted FLOPs per image (benchmarks/results/speed-cpu-2threads-final.json): SD at 512 px and 256 px
    assert dominant_network({"image encoder": 457.0, "vae": 1117.0, "unet": 607.0, "other": 5000.0}) == "vae"
    assert dominant_network({"image encoder": 457.0, "vae": 273.0, "unet": 144.0, "memory search": 900.0}) == (
        "image encoder"
    )
    assert dominant_network({"memory search": 1.0}) == dominant_network({}) == "image encoder"


def test_ratios_are_taken_within_the_run():
    records = [
        {"method": "winclip", "shots": 0, "variant": "", "precision": "float32",
         "batches": {"1": {"seconds_per_image": 2.0, "dominant_gflops_per_second": 50.0},
                     "8": {"seconds_per_image": 4.0, "dominant_gflops_per_second": 60.0}}},
        {"method": "winclip", "shots": 0, "variant": "bf16", "precision": "bfloat16",
         "batches": {"8": {"seconds_per_image": 1.0, "dominant_gflops_per_second": 200.0,
                           "networks_gflops_per_second": {"image encoder": 200.0, "unet": 125.0}}}},
        {"method": "clipfusion", "shots": 0, "variant": "", "precision": "float32",
         "batches": {"1": {"seconds_per_image": 5.0}, "8": {"seconds_per_image": 3.0}}},
    ]  # fmt: skip
    records[1]["matmul_peak_gflops"] = 250.0  # the bf16 setting's own peak, measured just before it was timed
    add_ratios(records, {"float32": 100.0, "bfloat16": 400.0})
    assert [records[0]["batches"][b]["ratio_to_winclip_zero_shot"] for b in ("1", "8")] == [1.0, 1.0]
    bf16 = records[1]["batches"]["8"]
    assert bf16["ratio_to_winclip_zero_shot"] == 0.25
    assert bf16["dominant_percent_of_peak"] == 80.0 and bf16["dominant_percent_of_run_peak"] == 50.0
    assert bf16["networks_percent_of_peak"] == {"image encoder": 80.0, "unet": 50.0}
    assert records[0]["batches"]["8"]["dominant_percent_of_peak"] == 60.0  # no own peak: the run's float32 one
    assert [records[2]["batches"][b]["ratio_to_winclip_zero_shot"] for b in ("1", "8")] == [2.5, 0.75]


def test_figures_keep_significant_digits_for_fast_methods():
    assert significant(0.000812345) == 0.0008123 and significant(12.9149) == 12.91 and significant(0.0) == 0.0
    assert significant(2181.34) == 2181.0 and significant(1 / 0.000812345) == 1231.0
    record = {"method": "patchcore", "shots": 0, "variant": "", "precision": "float16", "peak_rss_mb": 900.0,
              "matmul_peak_gflops": 500000.0,
              "batches": {"32": {"seconds_per_image": 0.0008123, "images_per_second": 1231.0,
                                 "gflops_per_image": 0.05123, "achieved_gflops_per_second": 63.07,
                                 "stages_seconds_per_image": {"image encoder": 0.0006012, "memory search": 2.1e-05},
                                 "dominant_network": "image encoder", "dominant_gflops_per_second": 80.0}}}  # fmt: skip
    table = markdown({"matmul_peak_gflops": {"float16": 500000.0}, "threads": 16, "device": "cuda", "count": 16,
                      "repeats": 5, "records": [record]})  # fmt: skip
    row = table.splitlines()[-1]
    assert "| 32 | 0.000812 | 1231 | – | 0.0512 |" in row  # not 0.001 s/img and 0.1 GFLOP
    assert "image encoder 0.000601, memory search 2.1e-05" in row


class _AttentionDetector(anomalens.Detector):
    """One nn.MultiheadAttention over a fixed token sequence per image: FLOPs known in closed form."""

    method_name = "attention_test"
    config_class = anomalens.DetectorConfig
    zero_shot, few_shot = True, False
    tokens, width = 20, 16

    def __init__(self):
        super().__init__(anomalens.DetectorConfig())
        self.attention = torch.nn.MultiheadAttention(self.width, 2, batch_first=True).eval()

    def _fit(self, reference_images, class_name):
        pass

    def _predict_batch(self, images):
        sequences = torch.ones(len(images), self.tokens, self.width)
        with self.timed("image_encoder"):
            attended, _ = self.attention(sequences, sequences, sequences, need_weights=False)
        return attended.mean((1, 2)), attended[..., :4].reshape(len(images), 4, -1)


def test_flops_of_fused_attention_are_counted():
    from torch.backends import mha

    detector = _AttentionDetector().fit(None)
    images = [np.zeros((8, 8, 3), dtype=np.uint8)] * 3
    tokens, width = _AttentionDetector.tokens, _AttentionDetector.width
    projections = 4 * 2 * tokens * width * width  # q, k, v and out
    attention = 2 * 2 * tokens * tokens * width  # q k^T and the weighted sum of v
    flops, stage_flops = count_flops(detector, images)
    assert flops == stage_flops["image_encoder"] == 3 * (projections + attention)
    assert mha.get_fastpath_enabled()  # switched back on for the timed batches


def test_the_memory_search_flops_are_counted_by_hand():
    """PatchCore's search: one fused addmm per block, 2 M D per query, for every patch (k = 1) and each image's
    re-weighting anchor (k = b); the exact recomputation of the chosen distances is no matrix product."""
    detector = tiny_detector("patchcore", coreset_ratio=1.0)
    rng = np.random.default_rng(0)
    detector.fit([(rng.random((32, 32, 3)) * 255).astype(np.uint8) for _ in range(2)], threshold=None)
    images = [(rng.random((32, 32, 3)) * 255).astype(np.uint8) for _ in range(3)]
    grid = detector.embed(torch.zeros(1, 3, 32, 32)).shape  # (1, h, w, D)
    bank, channels = detector.memory.bank.shape
    _, stage_flops = count_flops(detector, images)
    assert stage_flops["memory_search"] == 3 * (grid[1] * grid[2] + 1) * 2 * bank * channels


def test_benchmark_speed_times_every_setting_and_keeps_going_past_a_failure(capsys, tmp_path):
    images = write_noise_images(tmp_path / "images", 4, seed=0)
    (images / "9-broken.png").write_bytes(b"not a png")  # reported and skipped before any setting runs
    references = write_noise_images(tmp_path / "references", 1, seed=1)
    (references / "0-broken.png").write_bytes(b"")  # sorts first: without the check, 1-shot would fit on it
    settings = [
        {"method": "winclip", "shots": 0, "options": TINY_CONFIGS["winclip"]},
        {"method": "patchcore", "shots": 0, "variant": "bad",
         "options": {**TINY_CONFIGS["patchcore"], "image_size": -4}},
        {"method": "patchcore", "shots": 1, "options": TINY_CONFIGS["patchcore"]},
        {"method": "dual_image_clip", "shots": 0, "options": TINY_CONFIGS["dual_image_clip"]},
    ]  # fmt: skip
    settings_file = tmp_path / "settings.json"
    settings_file.write_text(json.dumps(settings))
    out = tmp_path / "speed.json"
    code = main(["-q", "benchmark-speed", "--settings-file", str(settings_file), "--images", str(images),
                 "--reference", str(references), "--count", "5", "--repeats", "2", "--batch-sizes", "1", "2",
                 "--threads", "1", "--open-clip-config", str(ASSETS / f"{TINY_CLIP}.json"), "--out", str(out),
                 "--timeout", "300"])  # fmt: skip
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    result = json.loads(out.read_text())
    assert result["command"] and result["machine"]["torch_threads"] and result["threads"] == 1
    assert result["count"] == 4 and len(result["images"]) == 4 and result["matmul_peak_gflops"]["float32"] > 0
    assert not any("broken" in path for path in result["images"])
    winclip, failed, patchcore, dual = result["records"]
    assert "image_size" in failed["error"] and failed["variant"] == "bad"  # recorded; the next settings still ran
    for record in (winclip, patchcore):
        assert record["peak_rss_mb"] > 100 and set(record["batches"]) == {"1", "2"} and record["matmul_peak_gflops"] > 0
        for figures in record["batches"].values():
            assert len(figures["timed_seconds_per_image"]) == 2 and figures["seconds_per_image"] > 0
            assert figures["images_per_second"] == pytest.approx(1 / figures["seconds_per_image"], rel=0.01)
            assert figures["gflops_per_image"] > 0 and figures["stages_gflops_per_image"]["image encoder"] > 0
            assert figures["dominant_network"] == "image encoder" and figures["dominant_percent_of_peak"] > 0
            assert figures["networks_percent_of_peak"]["image encoder"] == figures["dominant_percent_of_peak"]
    assert [winclip["batches"][b]["ratio_to_winclip_zero_shot"] for b in ("1", "2")] == [1.0, 1.0]
    stages = winclip["batches"]["2"]["stages_seconds_per_image"]
    assert stages["text encoder"] < stages["image encoder"]  # a cache lookup against a network's forward pass
    assert winclip["batches"]["2"]["stages_gflops_per_image"]["text encoder"] == 0  # prompts cached after warm-up
    assert "memory search" in patchcore["batches"]["2"]["stages_seconds_per_image"]
    assert patchcore["batches"]["2"]["networks_percent_of_peak"]["memory search"] > 0  # the search's % of peak too
    assert "skipped" in dual["batches"]["1"] and dual["batches"]["2"]["seconds_per_image"] > 0  # pooled
    table = out.with_suffix(".md").read_text()
    assert table == markdown(result) and "| patchcore (bad) | 0 | float32 | – | error:" in table
    assert table.count("| winclip | 0 | float32 |") == 2 and "results written to" in stdout


def test_benchmark_speed_errors_and_listing(capsys, tmp_path):
    assert main(["-q", "benchmark-speed", "--list"]) == 0
    listing = capsys.readouterr().out
    assert (
        listing.count("-shot") == len(FULL_SIZE_SETTINGS)
        and "clipfusion (preset fast-fp32: SD 256 px) 0-shot" in listing
    )
    assert main(["-q", "benchmark-speed", "--methods", "winclop"]) == 2
    assert "unknown method(s) ['winclop'] for benchmark-speed; valid: patchcore, winclip" in capsys.readouterr().err
    assert main(["-q", "benchmark-speed", "--settings", "99"]) == 2
    assert "--settings [99] out of range" in capsys.readouterr().err
    assert main(["-q", "benchmark-speed", "--settings", "0", "--shared", str(tmp_path)]) == 2
    assert "no MVTec AD bottle under" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["-q", "benchmark-speed", "--settings-file", str(tmp_path / "bad.json")]) == 2
    assert "cannot read settings file" in capsys.readouterr().err
