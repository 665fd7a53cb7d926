"""Data-parallel training under torchrun (real processes, Gloo on the CPU): two processes train the weights one
process trains with the same global batch, and a two-process run resumes as a one-process run does."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from anomalens.distributed import DataParallel

from conftest import TINY_CLIP, write_mvtec


def _run(args: list[str], processes: int, cwd: Path, tiny_clip: bool = False) -> subprocess.CompletedProcess:
    """``anomalens ARGS`` (``python -m anomalens``; with ``tiny_clip``, the command with the tiny CLIP config
    registered) as one process, or under ``torchrun --standalone --nproc-per-node N``."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    program = [str(Path(__file__).parent / "cli_with_tiny_clip.py")] if tiny_clip else ["-m", "anomalens"]
    command = [*(launcher if processes > 1 else [sys.executable]), *program, *args]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=cwd, env=environment)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


def _losses(run: Path) -> list[float]:
    with open(run / "losses.csv") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def _assert_same_weights(one: dict, two: dict, tolerance: float) -> None:
    assert one.keys() == two.keys()
    for key in one:
        assert torch.allclose(one[key], two[key], atol=tolerance, rtol=0), (key, (one[key] - two[key]).abs().max())


def test_vlmdiff_two_processes_train_the_one_process_weights_and_resume(tmp_path):
    root = write_mvtec(tmp_path / "mvtec", n_train=7, size=(32, 32))
    tiny = ["train", "vlmdiff", "--dataset", "mvtec", "--root", str(root), "--unet", "tiny", "--autoencoder", "tiny",
            "--autoencoder-weights", "none", "--text-encoder", "tiny", "--text-encoder-weights", "none",
            "--image-size", "32", "--batch-size", "3", "--gradient-accumulation", "2", "--learning-rate", "0.003",
            "--caption-dropout", "0.3", "--frozen-encoder"]  # fmt: skip  (a frozen encoder leaves parameters unused)
    single = _run([*tiny, "--steps", "4", "--out", str(tmp_path / "one")], 1, tmp_path)
    first = _run([*tiny, "--steps", "2", "--out", str(tmp_path / "two")], 2, tmp_path)  # 3 images: shares 2 + 1
    assert first.stdout.count("trained VLMDiff in") == 1  # process 0 alone reports
    _run([*tiny, "--steps", "4", "--out", str(tmp_path / "two")], 2, tmp_path)  # resumed from step 2
    assert "trained VLMDiff in" in single.stdout
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    _assert_same_weights(one, two, 1e-4)  # Adam at lr 3e-3 turns 1e-7 gradient differences into ~1e-5 weights
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)


def test_patchclip_two_processes_train_the_one_process_projections(tmp_path):
    root = write_mvtec(tmp_path / "mvtec")
    common = ["train", "patchclip", "--dataset", "mvtec", "--root", str(root), "--backbone", TINY_CLIP,
              "--pretrained", "none", "--layers", "1", "2", "--epochs", "2", "--batch-size", "3"]  # fmt: skip
    _run([*common, "--out", str(tmp_path / "one.safetensors")], 1, tmp_path, tiny_clip=True)
    two = _run([*common, "--out", str(tmp_path / "two.safetensors")], 2, tmp_path, tiny_clip=True)
    assert two.stdout.count("saved PatchCLIP projections") == 1
    _assert_same_weights(load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors"), 1e-5)


@pytest.mark.parametrize("count", [0, 1, 2, 3, 7, 8])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shares_partition_the_batch_in_order(count, world_size):
    shares = [DataParallel(rank, world_size, torch.device("cpu")).share(count) for rank in range(world_size)]
    covered = [index for start, stop in shares for index in range(start, stop)]
    assert covered == list(range(count))  # contiguous, in rank order, each item once
    sizes = [stop - start for start, stop in shares]
    assert max(sizes) - min(sizes) <= 1


def test_wrapped_module_may_leave_parameters_out_of_the_loss(tmp_path):
    """A design can leave trainable parameters out of the loss (VLMDiff's small UNet guided at its deepest level
    never uses two of the guidance network's zero convolutions): DDP must take steps with them unused, as one
    process's optimiser does. A one-process Gloo group is enough for DDP's reducer to check it."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        module = torch.nn.ModuleDict({"used": torch.nn.Linear(3, 1), "unused": torch.nn.Linear(3, 1)})

        class Loss(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.parts = module

            def forward(self, x):
                return self.parts["used"](x).square().mean()

        wrapped = DataParallel(0, 2, torch.device("cpu")).wrap(Loss())
        optimiser = torch.optim.SGD(module.parameters(), lr=0.1)
        for _ in range(3):
            optimiser.zero_grad()
            wrapped(torch.randn(4, 3)).backward()
            optimiser.step()
        assert module["unused"].weight.grad is None and module["used"].weight.grad is not None
    finally:
        dist.destroy_process_group()
