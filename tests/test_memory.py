"""Nearest-neighbour memory and coreset against brute-force computations; smoothing against scipy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from anomalens.nn.maps import gaussian_blur
from anomalens.nn.memory import NearestNeighbourMemory, greedy_coreset_indices


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("max_chunk_bytes", [2**9, 2**12, 2**28])  # tiny blocks exercise the running merges
@pytest.mark.parametrize("k", [1, 3])  # k = 1: the blocked running minimum; k > 1: the running top-k
def test_search_matches_brute_force(metric, max_chunk_bytes, k):
    generator = torch.Generator().manual_seed(1)
    bank = torch.randn(1300, 16, generator=generator)  # more than one bank block of the default size
    queries = torch.randn(70, 16, generator=generator)
    memory = NearestNeighbourMemory(metric=metric, max_chunk_bytes=max_chunk_bytes).fit(bank)
    distances, indices = memory.search(queries, k=k)
    if metric == "l2":
        expected = torch.cdist(queries.double(), bank.double())
    else:
        normalised = torch.nn.functional.normalize
        expected = 1 - normalised(queries.double(), dim=1) @ normalised(bank.double(), dim=1).T
    expected_distances, expected_indices = expected.topk(k, dim=1, largest=False)
    assert torch.allclose(distances.double(), expected_distances, atol=1e-4)
    assert torch.equal(indices, expected_indices)


def test_expansion_distances_are_anomalibs_arithmetic_and_exact_ones_are_exact():
    """Near neighbours beside large norms: the float32 expansion |q|^2 - 2 q.b + |b|^2 loses digits that the exact
    recomputation keeps; exact=False returns the expansion, wrong by no more than float32 rounding of the norms."""
    rng = np.random.default_rng(0)
    bank = (rng.normal(0, 1, (200, 512)) + 40.0).astype(np.float32)  # norms ~900, neighbour distances ~0.3
    queries = (bank[:50] + rng.normal(0, 0.01, (50, 512))).astype(np.float32)
    memory = NearestNeighbourMemory("l2").fit(torch.from_numpy(bank))
    exact, exact_indices = memory.search(torch.from_numpy(queries), k=1)
    expanded, expanded_indices = memory.search(torch.from_numpy(queries), k=1, exact=False)
    truth = np.sqrt(((queries.astype(np.float64) - bank[:50].astype(np.float64)) ** 2).sum(1))
    assert exact_indices[:, 0].tolist() == list(range(50)) == expanded_indices[:, 0].tolist()
    assert np.abs(exact[:, 0].double().numpy() - truth).max() < 1e-5
    assert np.abs(expanded[:, 0].numpy() - truth).max() > 10 * np.abs(exact[:, 0].double().numpy() - truth).max()
    # the expansion's error is float32 rounding of the norms: |d^2 - truth^2| within a few ulps of |q|^2 + |b|^2
    norms = (queries.astype(np.float64) ** 2).sum(1) + (bank[:50].astype(np.float64) ** 2).sum(1)
    bound = 64 * np.finfo(np.float32).eps * norms
    assert (np.abs(expanded[:, 0].double().numpy() ** 2 - truth**2) <= bound).all()


def test_search_validates_inputs():
    memory = NearestNeighbourMemory()
    with pytest.raises(RuntimeError, match="empty"):
        memory.search(torch.zeros(1, 4))
    memory.fit(torch.zeros(5, 4))
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        memory.search(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="k must be"):
        memory.search(torch.zeros(2, 4), k=6)
    with pytest.raises(ValueError, match="unknown metric 'manhattan'"):
        NearestNeighbourMemory(metric="manhattan")


def _brute_force_greedy(points: torch.Tensor, count: int, start: int) -> list[int]:
    selected = [start]
    for _ in range(count - 1):
        distances = torch.cdist(points.double(), points[selected].double()).min(1).values
        selected.append(int(distances.argmax()))
    return selected


def test_coreset_is_greedy_k_center():
    generator = torch.Generator().manual_seed(3)
    points = torch.randn(200, 8, generator=generator)
    indices = greedy_coreset_indices(points, 25, projection_dim=None, generator=torch.Generator().manual_seed(0))
    assert indices.tolist() == _brute_force_greedy(points, 25, int(indices[0]))
    assert len(set(indices.tolist())) == 25


@pytest.mark.parametrize("candidates", [1, 2, 7, 64, 5000])
@pytest.mark.parametrize(("total", "count"), [(300, 60), (40, 40), (1, 1)])
def test_batched_lazy_coreset_picks_what_the_one_at_a_time_loop_picks(candidates, total, count):
    # Clustered points (blobs of different spreads), so batches, refreshes and their bounds are all exercised.
    generator = torch.Generator().manual_seed(total + candidates)
    centres = torch.randn(6, 5, generator=generator) * 4
    points = centres[torch.arange(total) % 6] + torch.randn(total, 5, generator=generator) * torch.rand(
        total, 1, generator=generator
    )
    indices = greedy_coreset_indices(points, count, projection_dim=None, candidates=candidates,
                                     generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert indices.tolist() == _brute_force_greedy(points, count, int(indices[0]))
    with pytest.raises(ValueError, match="candidates must be >= 1, got 0"):
        greedy_coreset_indices(points, 1, candidates=0)


def test_coreset_is_seeded_and_projected():
    points = torch.randn(500, 64, generator=torch.Generator().manual_seed(0))
    first = greedy_coreset_indices(points, 40, projection_dim=8, generator=torch.Generator().manual_seed(5))
    again = greedy_coreset_indices(points, 40, projection_dim=8, generator=torch.Generator().manual_seed(5))
    other = greedy_coreset_indices(points, 40, projection_dim=8, generator=torch.Generator().manual_seed(6))
    assert torch.equal(first, again) and not torch.equal(first, other)
    with pytest.raises(ValueError, match=r"\[1, 500\]"):
        greedy_coreset_indices(points, 501)


def test_coreset_covers_better_than_random():
    points = torch.randn(1000, 4, generator=torch.Generator().manual_seed(0))
    coreset = greedy_coreset_indices(points, 50, projection_dim=None, generator=torch.Generator().manual_seed(0))
    random_subset = torch.randperm(1000, generator=torch.Generator().manual_seed(0))[:50]
    radius = torch.cdist(points, points[coreset]).min(1).values.max()
    random_radius = torch.cdist(points, points[random_subset]).min(1).values.max()
    assert radius < random_radius


def test_fit_with_ratio_and_state_dict_round_trip():
    memory = NearestNeighbourMemory().fit(torch.randn(100, 6), coreset_ratio=0.1)
    assert len(memory) == 10
    restored = NearestNeighbourMemory()
    from anomalens.backbones.weights import load_state_dict_checked

    load_state_dict_checked(restored, memory.state_dict(), source="test")
    assert torch.equal(restored.bank, memory.bank)
    with pytest.raises(ValueError, match=r"coreset_ratio must be in \(0, 1\], got 0"):
        memory.fit(torch.randn(4, 6), coreset_ratio=0)


@pytest.mark.parametrize("sigma", [0.7, 2.0, 4.0])
def test_gaussian_blur_matches_scipy(sigma):
    maps = np.random.default_rng(0).random((2, 20, 13)).astype(np.float32)
    smoothed = gaussian_blur(torch.from_numpy(maps), sigma).numpy()
    for index in range(2):
        expected = ndimage.gaussian_filter(maps[index].astype(np.float64), sigma, mode="nearest", truncate=4.0)
        assert np.allclose(smoothed[index], expected, atol=1e-5)
    assert torch.equal(gaussian_blur(torch.from_numpy(maps), 0), torch.from_numpy(maps))
    for border in ("nearest", "reflect", "mirror"):  # the one-pass 2-D kernel (anomalib's arithmetic) as well
        one_pass = gaussian_blur(torch.from_numpy(maps), sigma, border=border, separable=False).numpy()
        for index in range(2):
            expected = ndimage.gaussian_filter(maps[index].astype(np.float64), sigma, mode=border, truncate=4.0)
            assert np.allclose(one_pass[index], expected, atol=1e-5)


def test_memory_leaves_a_references_entries_out_and_restores_them():
    """``without`` keeps exactly the entries of other owners, in order, and puts the bank back even on an error;
    extended entries belong to no reference; unknown owners and an emptied memory are refused."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(12, 5, generator=generator)
    owners = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 3, 3, 3, 3])
    memory = NearestNeighbourMemory("l2").fit(features, owners=owners)
    bank = memory.bank.clone()
    with memory.without([1, 3]):
        assert torch.equal(memory.bank, features[[0, 1, 5, 6, 7]])
        distances = memory.search(features[2:3])[0][0, 0]
        assert float(distances) == pytest.approx(float(torch.cdist(features[2:3], features[[0, 1, 5, 6, 7]]).min()))
    assert torch.equal(memory.bank, bank)
    with pytest.raises(RuntimeError, match="inside"):
        with memory.without([0]):
            raise RuntimeError("inside")
    assert torch.equal(memory.bank, bank) and memory.leaves_entries_without([0, 1, 2])
    assert not memory.leaves_entries_without([0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"leaving out references \[0, 1, 2, 3\] would empty the memory"):
        with memory.without([0, 1, 2, 3]):
            pass
    memory.extend(features[:2] + 100.0)
    assert memory.owners.tolist() == owners.tolist() + [-1, -1]
    with pytest.raises(ValueError, match="does not know which reference"):
        with NearestNeighbourMemory("l2").fit(features).without([0]):
            pass
    with pytest.raises(ValueError, match=r"owners must be \(12,\)"):
        NearestNeighbourMemory("l2").fit(features, owners=owners[:3])


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_approximate_search_finds_the_nearest_entry_of_the_probed_lists(metric):
    """Inverted lists: every returned entry is, by brute force (torch.cdist), the nearest among the entries whose
    nearest centre is one of the query's ``probes`` nearest centres; its distance is never below the exact one;
    probing every list is the exact search."""
    from anomalens.nn.memory import InvertedLists, _ivf_index

    generator = torch.Generator().manual_seed(1)
    centres = torch.randn(12, 16, generator=generator) * 4
    bank = centres[torch.randint(12, (600,), generator=generator)] + torch.randn(600, 16, generator=generator)
    queries = centres[torch.randint(12, (200,), generator=generator)] + torch.randn(200, 16, generator=generator)
    memory = NearestNeighbourMemory(metric).fit(bank)
    settings = InvertedLists(lists=10, probes=3)
    distances, indices = memory.search(queries, approximate=settings)
    exact_distances, exact_indices = memory.search(queries)
    assert (distances[:, 0] >= exact_distances[:, 0] - 1e-5).all()
    index = _ivf_index(memory, settings)
    entries = memory.bank
    unit = torch.nn.functional.normalize(queries, dim=1) if metric == "cosine" else queries
    home = torch.cdist(entries, index.centres).argmin(1)  # each entry's list, by brute force
    probed = torch.cdist(unit, index.centres).topk(3, largest=False).indices
    for row in range(queries.shape[0]):
        allowed = torch.isin(home, probed[row]).nonzero()[:, 0]
        nearest = allowed[torch.cdist(unit[row : row + 1], entries[allowed])[0].argmin()]
        assert int(indices[row, 0]) == int(nearest)
    recall = float((indices[:, 0] == exact_indices[:, 0]).float().mean())
    assert recall > 0.8  # clustered data: most nearest neighbours lie in the probed lists
    everything = memory.search(queries, approximate=InvertedLists(lists=10, probes=10))[1]
    assert torch.equal(everything, exact_indices)
    with pytest.raises(ValueError, match=r"approximate search probes=0 must be an integer >= 1"):
        InvertedLists(probes=0)


@pytest.mark.parametrize("limit", [2**31, 0])  # the exact assignment, and the inverted lists' (large fits)
def test_a_fold_without_its_references_still_covers_the_others_within_the_radius(monkeypatch, limit):
    """After a reference's coreset entries are left out and the holes refilled, every feature of the other
    references lies within the coverage radius of the memory (brute force, torch.cdist), as it does of a coreset
    fitted on them; the held-out reference's own features never enter."""
    import anomalens.nn.memory as memory_module

    monkeypatch.setattr(memory_module, "EXACT_ASSIGNMENT_LIMIT", limit)
    generator = torch.Generator().manual_seed(2)
    centres = torch.randn(20, 8, generator=generator) * 3
    features = centres[torch.randint(20, (900,), generator=generator)] + torch.randn(900, 8, generator=generator)
    owners = torch.arange(900) // 100  # nine references of 100 features each
    memory = NearestNeighbourMemory("l2").fit(features, coreset_ratio=0.1, owners=owners)
    radius = memory.coverage_radius
    assert float(torch.cdist(features, memory.bank).min(1).values.max()) <= radius + 1e-5
    for reference in range(9):
        with memory.without([reference]):
            others = features[owners != reference]
            assert float(torch.cdist(others, memory.bank).min(1).values.max()) <= radius + 1e-5
            own = features[owners == reference]
            assert not bool((torch.cdist(memory.bank, own).min(1).values == 0).any())
