"""Nearest-neighbour memory of reference features, with greedy k-center coreset subsampling.

This is the one memory module of the project: PatchCore's memory bank, and the vision-guided maps
of the CLIP and diffusion methods, all search through :class:`NearestNeighbourMemory`.
The search is an exact chunked matrix product, so its memory footprint is bounded by ``max_chunk_bytes``
whatever the number of queries and bank entries.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from anomalens.nn.state import ResizableBuffers

logger = logging.getLogger(__name__)

METRICS = ("l2", "cosine")


def greedy_coreset_indices(
    features: torch.Tensor,
    count: int,
    *,
    projection_dim: int | None = 128,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Greedy k-center selection (Sener & Savarese, 2018), as used by PatchCore.

    Starting from a random point, repeatedly add the point farthest from everything selected so far.
    Distances are computed on a Gaussian random projection to ``projection_dim`` dimensions
    (Johnson-Lindenstrauss), which preserves them approximately at a fraction of the cost.

    Args:
        features: ``(N, D)`` features.
        count: How many to select (``1 <= count <= N``).
        projection_dim: Width of the random projection; ``None`` or ``>= D`` uses the features as they are.
        generator: Seeds the projection and the starting point.

    Returns:
        ``(count,)`` int64 indices into ``features``, in selection order, without repeats.
    """
    total = features.shape[0]
    if not 1 <= count <= total:
        raise ValueError(f"coreset size must be in [1, {total}], got {count}")
    points = features.float()
    if projection_dim is not None and projection_dim < points.shape[1]:
        projection = torch.randn(points.shape[1], projection_dim, generator=generator, dtype=torch.float32)
        points = points @ projection.to(points.device) / math.sqrt(projection_dim)
    squared_norms = (points * points).sum(1)
    # A column-major copy: MKL's matrix-vector product is ~2.7x faster on it than on row-major (N, D).
    points_column_major = points.T.contiguous().T
    start = int(torch.randint(total, (1,), generator=generator))
    selected = torch.empty(count, dtype=torch.long)
    min_distances = torch.full((total,), float("inf"), device=points.device)
    distances = torch.empty_like(min_distances)
    index = start
    for step in range(count):
        selected[step] = index
        # ||p - q||^2 = ||p||^2 - 2 p.q + ||q||^2, as one fused matrix-vector product.
        torch.addmv(squared_norms, points_column_major, points[index], alpha=-2.0, out=distances)
        distances += squared_norms[index]
        torch.minimum(min_distances, distances, out=min_distances)
        min_distances[index] = -1.0  # never pick a selected point again (its distance is 0 up to rounding)
        index = int(torch.argmax(min_distances))
    return selected


class NearestNeighbourMemory(ResizableBuffers, nn.Module):
    """A bank of ``(M, D)`` reference features searched exactly for nearest neighbours.

    The bank is a buffer, so a fitted memory is saved with its module's ``state_dict``.

    Args:
        metric: ``"l2"`` (Euclidean distance) or ``"cosine"`` (``1 - cosine similarity``).
        max_chunk_bytes: Upper bound on the distance block held in memory at once.
    """

    resizable_buffers = ("bank",)

    def __init__(self, metric: str = "l2", max_chunk_bytes: int = 256 * 2**20):
        super().__init__()
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; valid metrics: {', '.join(METRICS)}")
        self.metric = metric
        self.max_chunk_bytes = int(max_chunk_bytes)
        self.register_buffer("bank", torch.empty(0, 0))

    def __len__(self) -> int:
        return int(self.bank.shape[0])

    def _apply(self, fn, recurse: bool = True):  # nn.Module's hook behind .to(), .cuda(), .half()
        """Follow device moves but keep the bank float32: ``.to(torch.bfloat16)`` would round the references
        and the expanded distances would cancel badly, so distances are always computed in float32."""
        super()._apply(fn, recurse)
        if self.bank.dtype != torch.float32:
            self.bank = self.bank.float()
        return self

    def clear(self) -> NearestNeighbourMemory:
        """Empty the bank (a detector fitted zero-shot keeps no references)."""
        self.bank = self.bank.new_empty(0, 0)
        return self

    def fit(
        self,
        features: torch.Tensor,
        *,
        coreset_ratio: float = 1.0,
        projection_dim: int | None = 128,
        generator: torch.Generator | None = None,
    ) -> NearestNeighbourMemory:
        """Store ``(N, D)`` features, keeping a greedy coreset of ``ceil(ratio * N)`` of them when ``ratio < 1``."""
        if features.ndim != 2 or features.shape[0] == 0:
            raise ValueError(f"memory features must be a non-empty (N, D) tensor, got shape {tuple(features.shape)}")
        if not 0.0 < coreset_ratio <= 1.0:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {coreset_ratio}")
        features = features.float()
        if coreset_ratio < 1.0:
            count = max(1, math.ceil(coreset_ratio * features.shape[0]))
            indices = greedy_coreset_indices(features, count, projection_dim=projection_dim, generator=generator)
            logger.debug("coreset: kept %d of %d features", count, features.shape[0])
            features = features[indices.to(features.device)]
        if self.metric == "cosine":
            features = torch.nn.functional.normalize(features, dim=1)
        self.bank = features.contiguous().to(self.bank.device)
        return self

    def search(self, queries: torch.Tensor, k: int = 1, exact: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact k nearest neighbours of each query.

        Args:
            queries: ``(N, D)`` features.
            k: Neighbours per query (``<= len(self)``).
            exact: For ``"l2"``, recompute the chosen neighbours' distances as norms of differences. ``False``
                returns the expansion ``sqrt(max(|q|^2 - 2 q.b + |b|^2, 0))`` that found them, as anomalib does;
                it cancels in float32 for near neighbours beside large norms (about 1e-3 relative).

        Returns:
            ``distances`` ``(N, k)`` ascending and ``indices`` ``(N, k)`` into the bank.
        """
        if len(self) == 0:
            raise RuntimeError("the memory bank is empty: fit it with reference features first")
        if queries.ndim != 2 or queries.shape[1] != self.bank.shape[1]:
            raise ValueError(f"queries must be (N, {self.bank.shape[1]}), got shape {tuple(queries.shape)}")
        if not 1 <= k <= len(self):
            raise ValueError(f"k must be in [1, {len(self)}], got {k}")
        with torch.autocast(queries.device.type, enabled=False):  # distances in float32 under any autocast
            return self._search(queries.to(self.bank.device, torch.float32), k, exact)

    def _search(self, queries: torch.Tensor, k: int, exact: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if self.metric == "cosine":
            queries = torch.nn.functional.normalize(queries, dim=1)
        bank_norms = (self.bank * self.bank).sum(1)
        bank_chunk = max(k, min(len(self), self.max_chunk_bytes // (4 * 1024)))
        query_chunk = max(1, self.max_chunk_bytes // (4 * bank_chunk))
        all_distances, all_indices = [], []
        for query_start in range(0, queries.shape[0], query_chunk):
            block = queries[query_start : query_start + query_chunk]
            block_norms = (block * block).sum(1, keepdim=True)
            best_distances = best_indices = None
            for bank_start in range(0, len(self), bank_chunk):
                bank = self.bank[bank_start : bank_start + bank_chunk]
                if self.metric == "l2":
                    distances = block_norms - 2.0 * block @ bank.T + bank_norms[bank_start : bank_start + bank_chunk]
                else:
                    distances = 1.0 - block @ bank.T
                top = min(k, distances.shape[1])
                chunk_distances, chunk_indices = distances.topk(top, dim=1, largest=False)
                chunk_indices += bank_start
                if best_distances is not None:
                    chunk_distances = torch.cat([best_distances, chunk_distances], 1)
                    chunk_indices = torch.cat([best_indices, chunk_indices], 1)
                    chunk_distances, order = chunk_distances.topk(k, dim=1, largest=False)
                    chunk_indices = chunk_indices.gather(1, order)
                best_distances, best_indices = chunk_distances, chunk_indices
            all_distances.append(best_distances)
            all_indices.append(best_indices)
        distances, indices = torch.cat(all_distances), torch.cat(all_indices)
        if self.metric == "l2" and not exact:
            return distances.clamp_min(0.0).sqrt(), indices
        if self.metric == "l2":
            # The expansion finds the neighbours fast but cancels badly for near neighbours (small distances
            # beside large norms); recompute the k chosen distances exactly, chunk by chunk.
            exact = []
            for start in range(0, queries.shape[0], query_chunk):
                block = queries[start : start + query_chunk]
                neighbours = self.bank[indices[start : start + query_chunk]]  # (n, k, D)
                exact.append((block[:, None, :] - neighbours).norm(dim=-1))
            distances = torch.cat(exact)
            distances, order = distances.sort(dim=1)
            indices = indices.gather(1, order)
        return distances, indices

    def extra_repr(self) -> str:
        return f"metric={self.metric!r}, size={tuple(self.bank.shape)}"
