"""Measuring runs: peak resident memory of a code section, and a description of the machine."""

from __future__ import annotations

import os
import platform
import resource
import sys
import threading
import time

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux ``/proc``; else the lifetime peak)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE_SIZE
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def _reset_kernel_peak() -> bool:
    """Reset the kernel's record of this process's peak RSS (``VmHWM``, Linux >= 4.0); ``False`` where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _kernel_peak_bytes() -> int:
    """The kernel's peak RSS of this process (``VmHWM``) since the last reset, 0 where unknown."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def process_memory_mib(pid: int) -> dict[str, float]:
    """Another process's resident memory now (``VmRSS``) and its peak (``VmHWM``), in MiB (Linux ``/proc``), as
    ``{"rss_mib", "peak_rss_mib"}``: how a benchmark measures a server it started."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, value = line.split(":")
                fields[name] = int(value.split()[0]) / 1024
    return {"rss_mib": round(fields["VmRSS"], 1), "peak_rss_mib": round(fields["VmHWM"], 1)}


def process_peak_mb() -> float:
    """The whole process's peak RSS since it started (``ru_maxrss``), in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak if sys.platform == "darwin" else peak * 1024) / 2**20


class PeakMemory:
    """Context manager reporting the whole process's peak RSS during a section: the kernel's own peak (``VmHWM``,
    reset on entry, so short allocation spikes between samples count), else the largest RSS sampled every
    ``interval`` s.

    On CUDA the peak allocated device memory is reported as ``peak_device_mb`` too.
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak_bytes = 0
        self.peak_device_mb: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_bytes = max(self.peak_bytes, current_rss_bytes())

    def __enter__(self) -> PeakMemory:
        self._kernel = _reset_kernel_peak()
        self.peak_bytes = current_rss_bytes()
        torch = _torch()
        if torch is not None and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_bytes = max(self.peak_bytes, current_rss_bytes())
        if self._kernel:
            self.peak_bytes = max(self.peak_bytes, _kernel_peak_bytes())
        torch = _torch()
        if torch is not None and torch.cuda.is_available():
            self.peak_device_mb = torch.cuda.max_memory_allocated() / 2**20

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20


def _torch():
    """torch if it can be imported (the torch-free runtime measures itself with :class:`PeakMemory` too)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def machine_info() -> dict[str, object]:
    """What a benchmark ran on: CPU, cores, threads, memory, torch build, accelerator."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        memory_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        memory_gb = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": memory_gb,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "accelerator": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_benchmark_json(path: str, result: dict) -> dict:
    """Add the exact command line and the machine to a benchmark result and write it (atomically) as JSON."""
    import shlex
    from pathlib import Path

    from anomalens.io.outputs import atomic_write_json

    result = {
        **result,
        "command": "python3 " + " ".join(shlex.quote(part) for part in sys.argv),
        "machine": machine_info(),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, result)
    return result
