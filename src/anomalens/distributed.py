"""Data-parallel training across processes and devices, on PyTorch's own engine: ``torch.distributed`` with
:class:`~torch.nn.parallel.DistributedDataParallel`, launched by ``torchrun``.

``anomalens train vlmdiff`` and ``anomalens train patchclip`` read the launcher's environment (``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); without it they run as one process, as before::

    torchrun --nproc-per-node 2 -m anomalens train vlmdiff --dataset mvtec --root DATA --out RUN ...
    torchrun --nnodes 2 --node-rank 0 --master-addr HOST --nproc-per-node 4 -m anomalens train vlmdiff ...

How a step is split, so that ``N`` processes train the same weights as one (to float tolerance): every process
draws the whole global batch from the same seeded generator (indices, caption dropout, timesteps, noise,
augmentations), keeps its own contiguous share, and weighs its loss by its share of the batch; DDP averages the
gradients, so the step's gradient is the one-process gradient of the global batch. The global batch is the
configured ``batch_size``, whatever the number of processes. Process 0 alone writes files and reports progress.

Backends: NCCL with one GPU per process where CUDA is there (the device ``cuda:LOCAL_RANK``), else Gloo on CPUs.
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)


def launched_processes() -> int:
    """The number of processes a launcher (``torchrun``) started for this job: ``WORLD_SIZE``, else 1."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        count = int(value)
    except ValueError:
        raise ValueError(f"WORLD_SIZE={value!r} must be a positive integer (set by torchrun)") from None
    if count < 1:
        raise ValueError(f"WORLD_SIZE={value!r} must be a positive integer (set by torchrun)")
    return count


def is_main_process() -> bool:
    """Whether this is process 0 of a launched job (or the only process)."""
    return os.environ.get("RANK", "0") == "0"


@dataclass
class DataParallel:
    """This process's place in a data-parallel job, and the few collective operations training needs."""

    rank: int  # this process's index, 0 .. world_size - 1
    world_size: int  # processes in the job
    device: torch.device  # where this process computes
    owns_group: bool = False  # whether this object started the process group (and so ends it)

    @classmethod
    def from_environment(cls, device: str = "auto") -> DataParallel:
        """Join the job ``torchrun`` started, or stand alone (one process) without one.

        Args:
            device: ``"auto"`` (``cuda:LOCAL_RANK`` where CUDA is there, else the CPU) or a device name; with
                several processes, a bare ``"cuda"`` also becomes ``cuda:LOCAL_RANK``.
        """
        world_size = launched_processes()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        chosen = torch.device(device)
        if world_size > 1 and chosen.type == "cuda" and chosen.index is None:
            chosen = torch.device("cuda", local_rank)
        if chosen.type == "cuda":
            torch.cuda.set_device(chosen)
        if world_size == 1:
            return cls(0, 1, chosen)
        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
        rank = dist.get_rank()
        logger.info("data-parallel process %d of %d on %s (%s)", rank, world_size, chosen, dist.get_backend())
        return cls(rank, world_size, chosen, owns)

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and reports progress."""
        return self.rank == 0

    def share(self, count: int) -> tuple[int, int]:
        """This process's contiguous share ``[start, stop)`` of ``count`` items (sizes differ by at most one)."""
        base, extra = divmod(count, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` in DistributedDataParallel with several processes (gradients averaged in backward), else as
        it is. Buffers are not broadcast at each forward: every process builds them identically, and a buffer
        cached by input size (a text encoder's mask for the longest caption of a share) differs between shares.
        Parameters that take no part in the loss (a design's unused guidance level) are found at each step, as
        one process's optimiser skips them."""
        if self.world_size == 1:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel
        # torch 2.14 renamed the per-forward buffer sync (buffers are still synced once at construction: harmless)
        no_buffer_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(
            ddp.__init__).parameters else {"broadcast_buffers": False}  # fmt: skip
        return ddp(module, device_ids=ids, find_unused_parameters=True, **no_buffer_sync)

    def sum(self, value: float) -> float:
        """``value`` summed over the processes (itself with one)."""
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return float(tensor[0])

    def barrier(self) -> None:
        """Wait until every process gets here (nothing with one)."""
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        """End the process group this object started."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False
