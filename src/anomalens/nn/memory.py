"""Nearest-neighbour memory of reference features, with greedy k-center coreset subsampling.

This is the one memory module of the project: PatchCore's memory bank, and the vision-guided maps
of the CLIP and diffusion methods, all search through :class:`NearestNeighbourMemory`.
The search is an exact chunked matrix product, so its memory footprint is bounded by ``max_chunk_bytes``
whatever the number of queries and bank entries.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from anomalens.nn.state import ResizableBuffers

logger = logging.getLogger(__name__)

METRICS = ("l2", "cosine")


CANDIDATES = 2048  # points tracked between two passes of greedy_coreset_indices (speed only, not the picks)
REFRESH_GROUPS = 8  # matrix products per refresh, grouping points by how far behind the selection they are
REFRESH_BLOCK = 2**24  # distances per matrix product in a refresh (64 MB in float32), whatever the picks' count
QUERY_BLOCK = 4096  # queries per distance block of a search (4096 x 512 float32 = 8 MB, reduced while in cache;
BANK_BLOCK = 512  # the best of a sweep on a 2-core EPYC: 71% of the fp32 matmul peak, memory-search-round3.json)


def greedy_coreset_indices(
    features: torch.Tensor,
    count: int,
    *,
    projection_dim: int | None = 128,
    generator: torch.Generator | None = None,
    candidates: int = CANDIDATES,
) -> torch.Tensor:
    """Greedy k-center selection (Gonzalez, 1985; Sener & Savarese, 2018), as used by PatchCore.

    Starting from a random point, repeatedly add the point farthest from everything selected so far.
    Distances are computed on a Gaussian random projection to ``projection_dim`` dimensions
    (Johnson-Lindenstrauss), which preserves them approximately at a fraction of the cost.

    The picks are the one-at-a-time loop's (only exact float32 ties may break differently), computed without its
    one memory-bound pass over all points per pick (85.6k passes over 856k points on full-shot bottle):

    - Batches: only the ``candidates`` points farthest from the selection are tracked exactly, pick by pick. Every
      other point is at most ``tau`` away (the farthest distance among them, which picks only lower), so while the
      farthest candidate is farther than ``tau`` it is the greedy pick. Once none is, new candidates are drawn.
    - Lazy distances: each point keeps an upper bound on its distance to the selection (its distance to the
      selection as it was when last refreshed). Drawing candidates refreshes only the points whose bound is among
      the largest, as matrix products against the picks they have not seen, until the refreshed points' distances
      provably include the farthest ``candidates + 1``. Points well covered early are never refreshed again.

    Args:
        features: ``(N, D)`` features.
        count: How many to select (``1 <= count <= N``).
        projection_dim: Width of the random projection; ``None`` or ``>= D`` uses the features as they are.
        generator: Seeds the projection and the starting point.
        candidates: Points tracked between refreshes (a speed setting: any value gives the same picks).

    Returns:
        ``(count,)`` int64 indices into ``features``, in selection order, without repeats.
    """
    return greedy_coreset(features, count, projection_dim=projection_dim, generator=generator,
                          candidates=candidates, with_radius=False).indices


@dataclass(frozen=True)
class Coreset:
    """A greedy k-center selection and what an incremental update needs afterwards."""

    indices: torch.Tensor  # (count,) int64 picks, in selection order
    radius: float | None  # the largest distance from any feature to its nearest pick, in the selection's space
    projection: torch.Tensor | None  # (D, projection_dim) Gaussian projection the selection measured in; None: none


def project(features: torch.Tensor, projection: torch.Tensor | None) -> torch.Tensor:
    """``(N, D)`` features in the space a coreset selection measures in: ``features @ P / sqrt(p)`` for a
    ``(D, p)`` projection ``P`` (Johnson-Lindenstrauss: distances kept approximately), else the features."""
    features = features.float()
    if projection is None or projection.numel() == 0:
        return features
    return features @ projection.to(features.device) / math.sqrt(projection.shape[1])


def greedy_coreset(
    features: torch.Tensor,
    count: int,
    *,
    projection_dim: int | None = 128,
    generator: torch.Generator | None = None,
    candidates: int = CANDIDATES,
    with_radius: bool = True,
) -> Coreset:
    """:func:`greedy_coreset_indices` (same picks), with the coverage radius and the projection.

    The coverage radius is exact in the selection's space (:func:`project`); the greedy rule keeps it within twice
    the smallest radius any ``count`` of the points could achieve (Gonzalez, 1985). ``with_radius=False`` skips
    it (one more pass over the farthest points).
    """
    total = features.shape[0]
    if not 1 <= count <= total:
        raise ValueError(f"coreset size must be in [1, {total}], got {count}")
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    projection = None
    if projection_dim is not None and projection_dim < features.shape[1]:
        projection = torch.randn(features.shape[1], projection_dim, generator=generator, dtype=torch.float32)
        projection = projection.to(features.device)
    points = project(features, projection)
    start = int(torch.randint(total, (1,), generator=generator))
    farthest = _FarthestPoints(points)
    indices = farthest.select(start, count, candidates)
    return Coreset(indices, farthest.radius() if with_radius else None, projection)


class _FarthestPoints:
    """The state of one greedy k-center selection over ``(N, d)`` points (see :func:`greedy_coreset_indices`)."""

    def __init__(self, points: torch.Tensor):
        self.points = points
        self.squared_norms = (points * points).sum(1)
        total = points.shape[0]
        self.bounds = torch.full((total,), float("inf"), device=points.device)  # >= squared distance to selection
        self.seen = torch.zeros(total, dtype=torch.long, device=points.device)  # picks folded into each bound
        self.selected = torch.empty(0, dtype=torch.long, device=points.device)

    def radius(self) -> float:
        """The largest distance from any point to the selection (after :meth:`select`; exact)."""
        if self.selected.shape[0] >= self.points.shape[0]:
            return 0.0
        _, distances, _ = self._draw(1)
        return math.sqrt(max(float(distances[0]), 0.0))

    def select(self, start: int, count: int, candidates: int) -> torch.Tensor:
        picks = [start]
        while True:
            self.selected = torch.cat([self.selected, torch.tensor(picks, device=self.points.device)])
            if self.selected.shape[0] == count:
                return self.selected.cpu()
            indices, distances, tau = self._draw(candidates)
            picks = self._pick(indices, distances, tau, count - self.selected.shape[0])

    def _draw(self, candidates: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The ``candidates`` points farthest from the selection, their squared distances, and ``tau``: no other
        point is farther."""
        total = self.points.shape[0]
        tracked = min(candidates, total)
        refreshed = min(4 * tracked, total)
        while True:
            bounds, order = torch.topk(self.bounds, min(refreshed + 1, total))
            # every point left unrefreshed is at most `beyond` away
            beyond = float(bounds[refreshed]) if refreshed < total else float("-inf")
            self._refresh(order[:refreshed])
            self.bounds[self.selected] = -1.0  # never picked again
            distances, best = torch.topk(self.bounds[order[:refreshed]], min(tracked + 1, refreshed))
            nearest_left = float(distances[tracked]) if distances.shape[0] > tracked else float("-inf")
            if nearest_left >= beyond or refreshed == total:
                return order[:refreshed][best[:tracked]], distances[:tracked].clone(), max(nearest_left, beyond)
            refreshed = min(2 * refreshed, total)

    def _refresh(self, indices: torch.Tensor) -> None:
        """Fold the picks each of ``indices`` has not seen into its bound (exact distances afterwards)."""
        done = self.selected.shape[0]
        indices = indices[self.seen[indices] < done]
        seen, order = torch.sort(self.seen[indices])
        indices = indices[order]
        edges = torch.linspace(0, indices.shape[0], REFRESH_GROUPS + 1).long().tolist()
        for first, last in zip(edges[:-1], edges[1:]):
            if first == last:
                continue
            centres = self.selected[int(seen[first]) :]  # a few picks some points have seen already: harmless
            centre_points, centre_norms = self.points[centres], self.squared_norms[centres]
            rows = max(64, REFRESH_BLOCK // centres.shape[0])
            for row in range(first, last, rows):
                chunk = indices[row : min(row + rows, last)]
                # ||p - c||^2 = ||p||^2 - 2 p.c + ||c||^2 for a chunk of points against the picks at once
                distances = torch.addmm(centre_norms.unsqueeze(0), self.points[chunk], centre_points.T, alpha=-2.0)
                distances += self.squared_norms[chunk].unsqueeze(1)
                self.bounds[chunk] = torch.minimum(self.bounds[chunk], distances.amin(1))
        self.seen[indices] = done

    def _pick(self, indices: torch.Tensor, distances: torch.Tensor, tau: float, remaining: int) -> list[int]:
        """The greedy picks that provably come next among the candidates ``indices`` (at least one)."""
        candidate_points, candidate_norms = self.points[indices], self.squared_norms[indices]
        picks: list[int] = []
        while len(picks) < remaining:
            best = int(torch.argmax(distances))
            if picks and not float(distances[best]) > tau:
                break  # a point outside the candidates may be as far: refresh and draw again
            picks.append(int(indices[best]))
            to_pick = torch.addmv(candidate_norms, candidate_points, candidate_points[best], alpha=-2.0)
            to_pick += candidate_norms[best]
            torch.minimum(distances, to_pick, out=distances)
            distances[best] = -1.0
        return picks


@dataclass(frozen=True)
class _FoldSupport:
    """A coreset fit's features and where they went, for :meth:`NearestNeighbourMemory.without`."""

    features: torch.Tensor  # (N, D) every feature the memory was fitted on (as the bank keeps them)
    owners: torch.Tensor  # (N,) the reference of each
    assignment: torch.Tensor  # (N,) a bank entry within the coverage radius of each (its nearest, or near it)
    uncovered: torch.Tensor  # (N,) bool: no such entry was found (offered to every fold's refill)


EXACT_ASSIGNMENT_LIMIT = 2**31  # feature x entry pairs up to which the fold support's assignment is exact


def _fold_support(features: torch.Tensor, owners: torch.Tensor, coreset: Coreset, max_chunk_bytes: int) -> _FoldSupport:
    """Each feature's covering entry, in the selection's space. A fold's refill needs, for every feature, some bank
    entry within the coverage radius (if it is kept, the feature stays covered): the nearest one, found exactly up
    to :data:`EXACT_ASSIGNMENT_LIMIT` pairs, above it by the inverted lists (:class:`InvertedLists`, a tenth of
    the work on full-shot bottle); a feature whose entry found lies beyond the radius is marked uncovered and
    offered to every fold, so the refill's cover holds either way."""
    points = project(features, coreset.projection)
    entries = NearestNeighbourMemory("l2", max_chunk_bytes).fit(points[coreset.indices])
    approximate = InvertedLists() if points.shape[0] * len(entries) > EXACT_ASSIGNMENT_LIMIT else None
    distances, assignment = entries.search(points, approximate=approximate)
    radius = coreset.radius if coreset.radius is not None else float("inf")
    uncovered = distances[:, 0] > radius * (1 + 1e-4)  # beyond float rounding of the radius itself
    return _FoldSupport(features, owners.to(features.device, torch.long), assignment[:, 0], uncovered)


@dataclass(frozen=True)
class MemoryUpdate:
    """What :meth:`NearestNeighbourMemory.extend` did."""

    offered: int  # new features offered
    added: int  # of them, kept in the bank
    size_before: int  # bank entries before
    size_after: int  # and after
    radius_before: float  # coverage radius before (every feature the memory was fitted on is this close to it)
    radius_after: float  # after: the fitted and the offered features are all this close to the bank
    bounded: bool  # the max_memory bound stopped the additions (the radius grew)

    def to_dict(self) -> dict[str, float | int | bool]:
        return asdict(self)


def _unknown() -> torch.Tensor:
    return torch.tensor(float("nan"))


class NearestNeighbourMemory(ResizableBuffers, nn.Module):
    """A bank of ``(M, D)`` reference features searched exactly for nearest neighbours.

    The bank is a buffer, so a fitted memory is saved with its module's ``state_dict``. So are its coverage radius
    (every feature it was fitted on lies within it of a bank entry, measured where the coreset selection measures:
    :func:`project`) and the coreset's projection, which :meth:`extend` needs to grow the bank without a refit.

    Args:
        metric: ``"l2"`` (Euclidean distance) or ``"cosine"`` (``1 - cosine similarity``).
        max_chunk_bytes: Upper bound on the distance block held in memory at once.
    """

    resizable_buffers = ("bank", "projection")
    unscored_buffers = ("coverage", "projection")  # for updates only: left out of the detector's fingerprint
    # files saved before the coverage radius was kept: unknown radius, no projection
    added_buffers = {"coverage": _unknown, "projection": lambda: torch.empty(0, 0)}

    def __init__(self, metric: str = "l2", max_chunk_bytes: int = 256 * 2**20):
        super().__init__()
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; valid metrics: {', '.join(METRICS)}")
        self.metric = metric
        self.max_chunk_bytes = int(max_chunk_bytes)
        self.register_buffer("bank", torch.empty(0, 0))
        self.register_buffer("projection", torch.empty(0, 0))  # (D, p) of the coreset selection; (0, 0): none
        self.register_buffer("coverage", torch.tensor(0.0))  # the coverage radius; NaN: unknown (an older file)
        self.owners: torch.Tensor | None = None  # (M,) the reference each entry came from, while fitting (not saved)
        self._fold_support: _FoldSupport | None = None  # what without() needs to refill a coreset's holes
        self._ivf: _IVFIndex | None = None  # the approximate search's index, built on first use (not saved)

    def __len__(self) -> int:
        return int(self.bank.shape[0])

    def _apply(self, fn, recurse: bool = True):  # nn.Module's hook behind .to(), .cuda(), .half()
        """Follow device moves but keep the bank float32: ``.to(torch.bfloat16)`` would round the references
        and the expanded distances would cancel badly, so distances are always computed in float32."""
        super()._apply(fn, recurse)
        for name in ("bank", "projection", "coverage"):
            if getattr(self, name).dtype != torch.float32:
                setattr(self, name, getattr(self, name).float())
        return self

    @property
    def coverage_radius(self) -> float | None:
        """Every feature the bank was fitted on (and every feature :meth:`extend` was offered) lies within this
        distance of a bank entry, in the coreset selection's space (:func:`project`; the features themselves when
        they have at most ``projection_dim`` channels). 0 without subsampling; ``None`` if unknown (a memory
        saved before it was recorded)."""
        value = float(self.coverage)
        return None if math.isnan(value) else value

    def clear(self) -> NearestNeighbourMemory:
        """Empty the bank (a detector fitted zero-shot keeps no references)."""
        self.bank = self.bank.new_empty(0, 0)
        self.projection = self.projection.new_empty(0, 0)
        self.coverage = torch.zeros((), device=self.bank.device)
        return self.forget_owners()

    def forget_owners(self) -> NearestNeighbourMemory:
        """Drop what :meth:`without` needs (the owners, and with a coreset every fitted feature)."""
        self.owners, self._fold_support = None, None
        return self

    def fit(
        self,
        features: torch.Tensor,
        *,
        coreset_ratio: float = 1.0,
        projection_dim: int | None = 128,
        generator: torch.Generator | None = None,
        owners: torch.Tensor | None = None,
    ) -> NearestNeighbourMemory:
        """Store ``(N, D)`` features, keeping a greedy coreset of ``ceil(ratio * N)`` of them when ``ratio < 1``
        (for ``"cosine"``, of the unit-normalised features), and record the coverage radius.

        ``owners`` ``(N,)``: the reference each feature came from; the kept entries' owners are then known, so
        :meth:`without` can leave references out for a held-out fold (not saved with the memory)."""
        if features.ndim != 2 or features.shape[0] == 0:
            raise ValueError(f"memory features must be a non-empty (N, D) tensor, got shape {tuple(features.shape)}")
        if owners is not None and tuple(owners.shape) != (features.shape[0],):
            raise ValueError(f"owners must be ({features.shape[0]},), one per feature; got {tuple(owners.shape)}")
        if not 0.0 < coreset_ratio <= 1.0:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {coreset_ratio}")
        features = self._in_metric(features.float())
        projection, radius = None, 0.0
        self._fold_support = None
        if coreset_ratio < 1.0:
            count = max(1, math.ceil(coreset_ratio * features.shape[0]))
            coreset = greedy_coreset(features, count, projection_dim=projection_dim, generator=generator)
            logger.debug("coreset: kept %d of %d features, radius %.4g", count, features.shape[0], coreset.radius)
            if owners is not None:  # for refilling a fold's holes (without())
                self._fold_support = _fold_support(features, owners, coreset, self.max_chunk_bytes)
                owners = owners[coreset.indices.to(owners.device)]
            features, projection, radius = features[coreset.indices.to(features.device)], coreset.projection, \
                coreset.radius
        self.owners = owners.to(self.bank.device, torch.long) if owners is not None else None
        self.bank = features.contiguous().to(self.bank.device)
        self.projection = (projection if projection is not None else torch.empty(0, 0)).to(self.bank.device)
        self.coverage = torch.tensor(float(radius), device=self.bank.device)
        return self

    def _in_metric(self, features: torch.Tensor) -> torch.Tensor:
        """Features as the bank keeps them: unit-normalised for ``"cosine"``."""
        return torch.nn.functional.normalize(features, dim=1) if self.metric == "cosine" else features

    def extend(self, features: torch.Tensor, max_memory: int | None = None) -> MemoryUpdate:
        """Grow the bank with the ``(N, D)`` features that lie beyond its coverage radius, without a refit.

        The greedy k-center rule continues from the current bank: the offered feature farthest from the bank is
        added while it lies farther than the coverage radius ``r``, so afterwards every fitted and offered
        feature lies within ``r`` of the bank, as after a refit's selection (which, on all the features, finds a
        radius of its own, at most twice the best possible). Costs one search of the new features against the
        bank and one pass over them per addition, not a refit. With ``max_memory``, additions stop at that many
        entries and the reported radius grows to cover what was left out.

        A memory saved before coverage radii were recorded uses the smallest distance between two of its
        entries, which bounds a greedy selection's radius from above (each pick lay at least the final radius
        from all earlier ones).

        Raises:
            ValueError: Features of the wrong width, an empty memory, or ``max_memory`` below 1.
        """
        if len(self) == 0:
            raise ValueError("cannot extend an empty memory: fit it first")
        if features.ndim != 2 or features.shape[1] != self.bank.shape[1]:
            raise ValueError(f"new memory features must be (N, {self.bank.shape[1]}), got {tuple(features.shape)}")
        if max_memory is not None and (isinstance(max_memory, bool) or not isinstance(max_memory, int)
                                       or max_memory < 1):  # fmt: skip
            raise ValueError(f"max_memory={max_memory!r} must be an integer >= 1 or None")
        features = self._in_metric(features.to(self.bank.device, torch.float32))
        projection = self.projection if self.projection.numel() else None
        bank_points, new_points = project(self.bank, projection), project(features, projection)
        radius = self.coverage_radius
        if radius is None:
            radius = _smallest_gap(bank_points, self.max_chunk_bytes)
        distances = NearestNeighbourMemory("l2", self.max_chunk_bytes).fit(bank_points).search(new_points)[0][:, 0]
        room = (max_memory - len(self)) if max_memory is not None else features.shape[0]
        # Only features beyond the radius can be picked or keep the loop going, and distances only fall: the loop
        # follows those alone, dropping each once it is covered (the same picks, in the same order).
        active = (distances > radius).nonzero()[:, 0]
        points, remaining = new_points[active], distances[active]
        picks: list[int] = []
        while len(picks) < room and remaining.numel():
            best = int(torch.argmax(remaining))
            picks.append(int(active[best]))
            torch.minimum(remaining, (points - points[best]).norm(dim=1), out=remaining)
            beyond = remaining > radius
            if not bool(beyond.all()):
                active, points, remaining = active[beyond], points[beyond], remaining[beyond]
        left = float(remaining.max()) if remaining.numel() else 0.0
        bounded = left > radius
        before, size_before = radius, len(self)
        if picks:
            self.bank = torch.cat([self.bank, features[torch.tensor(picks, device=features.device)]]).contiguous()
            if self.owners is not None:  # added entries belong to no reference
                self.owners = torch.cat([self.owners, self.owners.new_full((len(picks),), -1)])
        after = max(radius, left)
        self.coverage = torch.tensor(after, device=self.bank.device)
        return MemoryUpdate(features.shape[0], len(picks), size_before, len(self), before, after, bounded)

    def leaves_entries_without(self, references: Iterable[int]) -> bool:
        """Whether entries of other references remain when ``references`` are left out (owners known)."""
        if self.owners is None:
            return False
        left_out = torch.tensor(sorted(set(references)), dtype=torch.long, device=self.owners.device)
        return bool((~torch.isin(self.owners, left_out)).any())

    @contextmanager
    def without(self, references: Iterable[int]) -> Iterator[NearestNeighbourMemory]:
        """Within the block, the memory is what the references other than ``references`` (the owners given to
        :meth:`fit`) put there: a held-out fold scored without a refit.

        - Without a coreset: their entries, in order; exactly the memory a fit on them would hold.
        - With a coreset: their entries, and the holes left by the removed entries refilled: the other references'
          features whose nearest entry was removed are offered to :meth:`extend`, which adds those beyond the
          coverage radius ``r``. Every feature of the other references then lies within ``r`` of the memory, as
          it does of a coreset fitted on them alone; so a held-out image's score ``d`` obeys the same bounds as a
          new image's against the full memory: ``d(x, features) <= d <= d(x, features) + r``.

        Raises:
            ValueError: The owners are unknown (fitted without them, or loaded from a file), or no entry would
                remain.
        """
        if self.owners is None:
            raise ValueError("this memory does not know which reference each entry came from (fit it with owners)")
        left_out = torch.tensor(sorted(set(references)), dtype=torch.long, device=self.owners.device)
        keep = ~torch.isin(self.owners, left_out)
        if not bool(keep.any()):
            raise ValueError(f"leaving out references {sorted(set(references))} would empty the memory")
        bank, owners, coverage = self.bank, self.owners, self.coverage
        self.bank, self.owners = bank[keep.to(bank.device)].contiguous(), owners[keep]
        try:
            support = self._fold_support
            if support is not None:
                removed = (~keep).to(support.assignment.device)
                holes = (removed[support.assignment] | support.uncovered) & ~torch.isin(
                    support.owners, left_out.to(support.owners.device))  # fmt: skip
                if bool(holes.any()):
                    self.extend(support.features[holes])
            yield self
        finally:
            self.bank, self.owners, self.coverage = bank, owners, coverage

    def search(self, queries: torch.Tensor, k: int = 1, exact: bool = True,
               approximate: InvertedLists | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """The k nearest neighbours of each query: exact, or with ``approximate`` (``k = 1`` only) among the bank
        entries of the lists nearest the query (:class:`InvertedLists`).

        Args:
            queries: ``(N, D)`` features.
            k: Neighbours per query (``<= len(self)``).
            exact: For ``"l2"``, recompute the chosen neighbours' distances as norms of differences. ``False``
                returns the expansion ``sqrt(max(|q|^2 - 2 q.b + |b|^2, 0))`` that found them, as anomalib does;
                it cancels in float32 for near neighbours beside large norms (about 1e-3 relative).
            approximate: Search only the ``probes`` inverted lists nearest each query (an exported graph searches
                exactly). The neighbour found is the nearest among those entries, its distance exact; where the
                true nearest lies in another list, the distance is larger (the recall is measured in
                ``benchmarks/approximate_search.py``).

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
            return self._search(queries.to(self.bank.device, torch.float32), k, exact, approximate)

    def _search(self, queries: torch.Tensor, k: int, exact: bool,
                approximate: InvertedLists | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        if self.metric == "cosine":
            queries = torch.nn.functional.normalize(queries, dim=1)
        # Rank by |b|^2 - 2 q.b (l2) or 1 - q.b (cosine): one fused addmm per block; |q|^2 is the same along a
        # row, so it never changes the ranking and is added to the k chosen values only.
        bias, alpha = ((self.bank * self.bank).sum(1), -2.0) if self.metric == "l2" else (
            torch.ones(len(self), device=self.bank.device), -1.0)  # fmt: skip
        tracing = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
        rows, columns = self._blocks(k, tracing)
        if k == 1 and not tracing and approximate is not None:
            distances, indices = approximate.nearest(self, queries, bias, alpha)
        elif k == 1 and not tracing:
            distances, indices = self._nearest(queries, bias, alpha, rows, columns)
        else:  # an exported graph: out= buffers and in-place updates do not trace, large functional blocks do
            distances, indices = self._k_nearest(queries, k, bias, alpha, rows, columns)
        if self.metric == "cosine":
            return distances, indices
        if not exact:
            return (distances + (queries * queries).sum(1, keepdim=True)).clamp_min(0.0).sqrt(), indices
        # The expansion finds the neighbours fast but cancels badly for near neighbours (small distances beside
        # large norms); recompute the k chosen distances exactly, block by block.
        recomputed = []
        for start in range(0, queries.shape[0], rows):
            neighbours = self.bank[indices[start : start + rows]]  # (n, k, D)
            recomputed.append((queries[start : start + rows, None, :] - neighbours).norm(dim=-1))
        distances, order = torch.cat(recomputed).sort(dim=1)
        return distances, indices.gather(1, order)

    def extra_repr(self) -> str:
        return f"metric={self.metric!r}, size={tuple(self.bank.shape)}"

    def _blocks(self, k: int, tracing: bool = False) -> tuple[int, int]:
        """Queries and bank entries per distance block: :data:`QUERY_BLOCK` x :data:`BANK_BLOCK` (a block that
        stays in cache while it is reduced), fewer to keep a block within ``max_chunk_bytes``; for a traced graph,
        blocks of up to ``max_chunk_bytes`` (few unrolled steps)."""
        columns = max(k, min(len(self), self.max_chunk_bytes // 4096 if tracing else BANK_BLOCK,
                             self.max_chunk_bytes // 4))  # fmt: skip
        if tracing:
            return max(1, self.max_chunk_bytes // (4 * columns)), columns
        rows = max(1, min(QUERY_BLOCK, self.max_chunk_bytes // (4 * columns)))
        return rows, columns

    def _nearest(self, queries: torch.Tensor, bias: torch.Tensor, alpha: float, rows: int,
                 columns: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Each query's smallest ``bias + alpha q.b`` and its index, ``(N, 1)`` each. Per block: one ``addmm`` into a
        reused buffer and its row minima into a ``(blocks, rows)`` table (no allocation, the block reduced while in
        cache); then one pass over the table."""
        count, device = queries.shape[0], self.bank.device
        starts = list(range(0, len(self), columns))
        offsets = torch.tensor(starts, device=device)
        block = torch.empty(min(rows, count), columns, device=device)
        minima = torch.empty(len(starts), min(rows, count), device=device)
        positions = torch.empty(len(starts), min(rows, count), dtype=torch.long, device=device)
        best, best_index = [], []
        for first in range(0, count, rows):
            query = queries[first : first + rows]
            height = query.shape[0]
            for number, start in enumerate(starts):
                width = min(columns, len(self) - start)
                out = block[:height, :width]
                torch.addmm(bias[start : start + width], query, self.bank[start : start + width].T, alpha=alpha,
                            out=out)  # fmt: skip
                torch.min(out, 1, out=(minima[number, :height], positions[number, :height]))
            low, which = minima[:, :height].min(0)  # the first block holding the minimum, as one pass would
            best.append(low)
            best_index.append(positions[:, :height].gather(0, which[None])[0] + offsets[which])
        return torch.cat(best)[:, None], torch.cat(best_index)[:, None]

    def _k_nearest(self, queries: torch.Tensor, k: int, bias: torch.Tensor, alpha: float, rows: int,
                   columns: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Each query's ``k`` smallest ``bias + alpha q.b``, ascending, and their indices: a running top-k."""
        all_values, all_indices = [], []
        for first in range(0, queries.shape[0], rows):
            query = queries[first : first + rows]
            kept_values = kept_indices = None
            for start in range(0, len(self), columns):
                width = min(columns, len(self) - start)
                block = torch.addmm(bias[start : start + width], query, self.bank[start : start + width].T,
                                    alpha=alpha)  # fmt: skip
                values, indices = block.topk(min(k, width), dim=1, largest=False)
                indices += start
                if kept_values is not None:
                    values, indices = torch.cat([kept_values, values], 1), torch.cat([kept_indices, indices], 1)
                    values, order = values.topk(k, dim=1, largest=False)
                    indices = indices.gather(1, order)
                kept_values, kept_indices = values, indices
            all_values.append(kept_values)
            all_indices.append(kept_indices)
        return torch.cat(all_values), torch.cat(all_indices)


def _smallest_gap(points: torch.Tensor, max_chunk_bytes: int) -> float:
    """The smallest distance between two of ``(M, d)`` points (0 with fewer than two)."""
    if points.shape[0] < 2:
        return 0.0
    return float(NearestNeighbourMemory("l2", max_chunk_bytes).fit(points).search(points, k=2)[0][:, 1].min())


@dataclass(frozen=True)
class InvertedLists:
    """Settings of the approximate search: the bank is split into ``lists`` clusters (k-means, seeded), and each
    query searches exactly the entries of the ``probes`` clusters whose centres are nearest it (an IVF index, as
    faiss's ``IndexIVFFlat``, in torch). Work per query: about ``probes / lists`` of the exact search's.

    The index is built on first use for a bank and kept with the memory until the bank changes (never saved).
    """

    lists: int = 0  # clusters; 0: round(sqrt(bank entries)), the usual choice for IVF indexes
    probes: int = 8  # clusters searched per query
    iterations: int = 10  # k-means (Lloyd) iterations when building
    seed: int = 0  # k-means's initial centres (drawn among the entries)

    def __post_init__(self) -> None:
        for name, low in (("lists", 0), ("probes", 1), ("iterations", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"approximate search {name}={value!r} must be an integer >= {low}")

    def nearest(self, memory: NearestNeighbourMemory, queries: torch.Tensor, bias: torch.Tensor,
                alpha: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Each query's smallest ``bias + alpha q.b`` over the entries of its ``probes`` nearest lists, and its
        index into the bank, ``(N, 1)`` each."""
        index = _ivf_index(memory, self)
        centres = NearestNeighbourMemory("l2", memory.max_chunk_bytes).fit(index.centres)
        probes = min(self.probes, index.centres.shape[0])
        chosen = centres.search(queries, k=probes, exact=False)[1]  # (N, probes)
        pairs = chosen.flatten()
        owners = torch.arange(queries.shape[0], device=queries.device).repeat_interleave(probes)
        order = torch.argsort(pairs, stable=True)
        pairs, owners = pairs[order], owners[order]
        counts = torch.bincount(pairs, minlength=index.centres.shape[0]).tolist()
        best = torch.full((queries.shape[0],), float("inf"), device=queries.device)
        best_index = torch.zeros(queries.shape[0], dtype=torch.long, device=queries.device)
        sorted_bias = bias[index.order]
        start_pair = 0
        for cluster, count in enumerate(counts):
            if count == 0:
                continue
            asking = owners[start_pair : start_pair + count]
            start_pair += count
            first, last = index.offsets[cluster], index.offsets[cluster + 1]
            if first == last:
                continue
            scores = torch.addmm(sorted_bias[first:last], queries[asking], index.entries[first:last].T, alpha=alpha)
            low, position = scores.min(1)
            better = low < best[asking]
            best[asking[better]] = low[better]
            best_index[asking[better]] = index.order[first + position[better]]
        return best[:, None], best_index[:, None]


@dataclass(frozen=True)
class _IVFIndex:
    bank: torch.Tensor  # the bank it was built for (the tensor itself: a bank replaced is a new tensor)
    key: tuple  # the settings it was built with
    centres: torch.Tensor  # (lists, D) cluster centres
    order: torch.Tensor  # (M,) bank indices sorted by cluster
    entries: torch.Tensor  # (M, D) the bank in that order
    offsets: list[int]  # cluster c holds entries[offsets[c]:offsets[c + 1]]


def _ivf_index(memory: NearestNeighbourMemory, settings: InvertedLists) -> _IVFIndex:
    """The memory's inverted lists for ``settings``: built by seeded k-means on first use, kept until the bank
    changes."""
    bank = memory.bank
    lists = min(len(memory), settings.lists or max(1, round(math.sqrt(len(memory)))))
    key = (lists, settings.iterations, settings.seed)
    cached = memory._ivf
    if cached is not None and cached.bank is bank and cached.key == key:  # the same tensor object: the same bank
        return cached
    generator = torch.Generator().manual_seed(settings.seed)
    centres = bank[torch.randperm(len(memory), generator=generator)[:lists].to(bank.device)].clone()
    def assign() -> torch.Tensor:  # each entry's nearest centre
        return NearestNeighbourMemory("l2", memory.max_chunk_bytes).fit(centres).search(bank, exact=False)[1][:, 0]

    for _ in range(settings.iterations):  # Lloyd: assign, then move each centre to its entries' mean
        assignment = assign()
        sums = torch.zeros_like(centres).index_add_(0, assignment, bank)
        counts = torch.bincount(assignment, minlength=lists).to(bank.dtype)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]  # an empty cluster keeps its centre
    assignment = assign()
    order = torch.argsort(assignment, stable=True)
    offsets = [0, *torch.cumsum(torch.bincount(assignment, minlength=lists), 0).tolist()]
    index = _IVFIndex(bank, key, centres, order, bank[order].contiguous(), offsets)
    memory._ivf = index
    logger.debug("inverted lists: %d clusters over %d entries", lists, len(memory))
    return index
