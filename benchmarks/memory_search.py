"""Exact nearest-neighbour search against the machine's fp32 matmul peak (issue 34, item 1).

The shape is full-shot PatchCore-TAEF2 on MVTec AD bottle: 4,096 patch queries per image (64 x 64) against a
memory of 85,607 entries of 128 channels (10% of 209 x 4,096), k = 1 with exact distances, i.e. 2 x 4096 x 85607 x
128 = 89.8 GFLOP per image. Random features of that shape (the FLOPs and the memory traffic are the data's).

- ``before``: the search as it was at b1a6c02, written out here: blocks of up to 1,024 queries x 65,536 entries
  (256 MB), ``|q|^2 - 2 q.b + |b|^2`` as three separate tensor passes, then top-k.
- ``after``: ``NearestNeighbourMemory.search`` now: blocks of 2,048 x 512 (4 MB, reduced while in cache), one fused
  ``addmm`` with the bank's norms per block into a reused buffer, a running minimum (``|q|^2`` only for the chosen
  neighbour), the same exact recomputation of the chosen distance.

Both run alternately in one process, ``--repeats`` times each, after a warm-up; the fp32 matmul peak is the best of
20 square 2048 products measured in the same process just before. The chosen neighbours must be identical.

    python3 benchmarks/memory_search.py [--repeats 7] [--out benchmarks/results/memory-search-round3.json]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from anomalens.evaluation.profiling import write_benchmark_json
from anomalens.evaluation.speed import matmul_peak
from anomalens.nn.memory import NearestNeighbourMemory

QUERIES, BANK, CHANNELS = 4096, 85_607, 128


def before(memory: NearestNeighbourMemory, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The search of b1a6c02 (k = 1, exact), for the comparison."""
    bank, max_chunk_bytes, k = memory.bank, memory.max_chunk_bytes, 1
    bank_norms = (bank * bank).sum(1)
    bank_chunk = max(k, min(len(bank), max_chunk_bytes // (4 * 1024)))
    query_chunk = max(1, max_chunk_bytes // (4 * bank_chunk))
    all_distances, all_indices = [], []
    for query_start in range(0, queries.shape[0], query_chunk):
        block = queries[query_start : query_start + query_chunk]
        block_norms = (block * block).sum(1, keepdim=True)
        best_distances = best_indices = None
        for bank_start in range(0, len(bank), bank_chunk):
            chunk = bank[bank_start : bank_start + bank_chunk]
            distances = block_norms - 2.0 * block @ chunk.T + bank_norms[bank_start : bank_start + bank_chunk]
            chunk_distances, chunk_indices = distances.topk(min(k, distances.shape[1]), dim=1, largest=False)
            chunk_indices += bank_start
            if best_distances is not None:
                chunk_distances = torch.cat([best_distances, chunk_distances], 1)
                chunk_indices = torch.cat([best_indices, chunk_indices], 1)
                chunk_distances, order = chunk_distances.topk(k, dim=1, largest=False)
                chunk_indices = chunk_indices.gather(1, order)
            best_distances, best_indices = chunk_distances, chunk_indices
        all_distances.append(best_distances)
        all_indices.append(best_indices)
    indices = torch.cat(all_indices)
    exact = (queries[:, None, :] - bank[indices]).norm(dim=-1)
    return exact, indices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="benchmarks/results/memory-search-round3.json")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    memory = NearestNeighbourMemory().fit(torch.randn(BANK, CHANNELS, generator=generator))
    queries = torch.randn(QUERIES, CHANNELS, generator=generator)
    gflop = 2 * QUERIES * BANK * CHANNELS / 1e9
    peak = matmul_peak("cpu", "float32")
    ways = {"before": lambda: before(memory, queries), "after": lambda: memory.search(queries, k=1)}
    results = {name: way() for name, way in ways.items()}  # warm-up, and the answers compared
    same = bool(torch.equal(results["before"][1], results["after"][1]))
    gap = float((results["before"][0] - results["after"][0]).abs().max())
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.repeats):
        for name, way in ways.items():  # alternately, so load drifting on the machine hits both
            started = time.perf_counter()
            way()
            seconds[name].append(time.perf_counter() - started)
    rows = {name: {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values),
                   "gflop_per_s": gflop / statistics.median(values),
                   "percent_of_peak": 100 * gflop / statistics.median(values) / peak} for name, values in
            seconds.items()}  # fmt: skip
    result = write_benchmark_json(args.out, {"shape": {"queries": QUERIES, "bank": BANK, "channels": CHANNELS},
                                             "gflop": gflop, "matmul_peak_gflops": peak, "repeats": args.repeats,
                                             "same_neighbours": same, "max_distance_difference": gap,
                                             "rows": rows, "speedup": rows["before"]["median_s"] /
                                             rows["after"]["median_s"]})  # fmt: skip
    lines = ["# Exact nearest-neighbour search: before and after (issue 34, item 1)", "", f"`{result['command']}`", "",
             f"{QUERIES} queries x {BANK:,} entries x {CHANNELS} channels, k = 1, exact distances ({gflop:.1f} GFLOP); "
             f"fp32 matmul peak {peak:.0f} GFLOP/s measured in the same process; {args.repeats} alternating repeats. "
             f"Same neighbours: {same}; largest distance difference {gap:.2e}.", "",
             "| search | median s | min / max s | GFLOP/s | % of peak |", "|---|---|---|---|---|"]  # fmt: skip
    for name, row in rows.items():
        lines.append(f"| {name} | {row['median_s']:.3f} | {row['min_s']:.3f} / {row['max_s']:.3f} | "
                     f"{row['gflop_per_s']:.0f} | {row['percent_of_peak']:.0f} |")  # fmt: skip
    lines.append(f"\nSpeed-up: {result['speedup']:.2f}x.")
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
