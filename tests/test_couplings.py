"""Couplings: exact minibatch OT against brute force, permutations, Sinkhorn close to exact."""

import itertools
import sys

import numpy as np
import pytest
import torch

from flowmatch.couplings import (
    ExactOTCoupling,
    IndependentCoupling,
    SinkhornCoupling,
    ot_permutation,
    round_to_permutation,
    squared_distances,
)

F64 = torch.float64


def _cost(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """Total squared distance of the pairing ``(x0[i], x1[i])``."""
    return (x0 - x1).reshape(x0.shape[0], -1).square().sum()


def _is_permutation(perm: torch.Tensor, n: int) -> bool:
    return perm.dtype == torch.long and torch.equal(perm.sort().values, torch.arange(n))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_exact_ot_equals_brute_force(n):
    for seed in range(3):
        g = torch.Generator().manual_seed(10 * n + seed)
        x0, x1 = torch.randn(2, n, 2, 2, generator=g, dtype=F64)  # trailing shape [2, 2]
        perm = ot_permutation(x0, x1)
        assert _is_permutation(perm, n)
        best = min(_cost(x0[list(p)], x1) for p in itertools.permutations(range(n)))
        assert torch.allclose(_cost(x0[perm], x1), best, rtol=1e-12)


def test_exact_ot_never_worse_than_identity_and_keeps_x1():
    g = torch.Generator().manual_seed(0)
    coupling = ExactOTCoupling()
    for d in (2, 16):
        x0, x1 = torch.randn(2, 64, d, generator=g)
        x1_before = x1.clone()
        paired = coupling(x0, x1)
        assert torch.equal(x1, x1_before)
        assert _cost(paired, x1) <= _cost(x0, x1)
        # Same rows as x0, each used once.
        perm = ot_permutation(x0, x1)
        assert _is_permutation(perm, 64)
        assert torch.equal(paired, x0[perm])


def test_exact_ot_recovers_a_hidden_shift_permutation():
    # x1 is x0 shuffled and nudged by much less than the point spacing: OT undoes the shuffle.
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(32, 3, generator=g, dtype=F64)
    shuffle = torch.randperm(32, generator=g)
    x1 = x0[shuffle] + 1e-3 * torch.randn(32, 3, generator=g, dtype=F64)
    assert torch.equal(ot_permutation(x0, x1), shuffle)


def test_independent_coupling_returns_x0():
    x0, x1 = torch.randn(2, 8, 1, 4, 4)
    assert IndependentCoupling()(x0, x1) is x0


def test_image_shaped_batches():
    g = torch.Generator().manual_seed(2)
    x0, x1 = torch.randn(2, 16, 1, 4, 4, generator=g)
    for coupling in (ExactOTCoupling(), SinkhornCoupling()):
        paired = coupling(x0, x1)
        assert paired.shape == x0.shape
        rows = squared_distances(paired, x0).argmin(1)  # which x0 each output row is
        assert _is_permutation(rows, 16)
        assert torch.equal(paired, x0[rows])


def test_sinkhorn_is_a_permutation_close_to_exact_for_small_epsilon():
    # n = 32 in 2-D, epsilon 0.003 of the mean cost, 1000 iterations: on these seeds the rounded
    # plan is within 1% of the exact cost (the independent pairing is 80-250% above it).
    coupling = SinkhornCoupling(epsilon=0.003, iterations=1000)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x0 = torch.randn(32, 2, generator=g, dtype=F64)
        x1 = torch.randn(32, 2, generator=g, dtype=F64) + 1.0
        perm = coupling.permutation(x0, x1)
        assert _is_permutation(perm, 32)
        exact = _cost(x0[ot_permutation(x0, x1)], x1)
        assert _cost(x0[perm], x1) <= 1.02 * exact
        assert _cost(x0[perm], x1) < 0.8 * _cost(x0, x1)


def test_sinkhorn_plan_has_uniform_marginals():
    g = torch.Generator().manual_seed(3)
    x0, x1 = torch.randn(2, 24, 5, generator=g, dtype=F64)
    plan = SinkhornCoupling(epsilon=0.1, iterations=200).log_plan(x0, x1).exp()
    assert torch.allclose(plan.sum(0), torch.full((24,), 1 / 24, dtype=F64), atol=1e-10)
    assert torch.allclose(plan.sum(1), torch.full((24,), 1 / 24, dtype=F64), atol=1e-8)


def test_round_to_permutation():
    g = torch.Generator().manual_seed(4)
    hidden = torch.randperm(50, generator=g)
    # A score peaked on a permutation is rounded to it in one round.
    peaked = torch.randn(50, 50, generator=g)
    peaked[torch.arange(50), hidden] += 100.0
    assert torch.equal(round_to_permutation(peaked, rounds=1), hidden)
    # Every row preferring the same column (worst case for conflicts), all ties, or no greedy
    # rounds at all: still a permutation.
    same_column = torch.zeros(50, 50)
    same_column[:, 0] = 1.0
    for score, rounds in [(same_column, 3), (torch.zeros(50, 50), 4), (peaked, 0)]:
        assert _is_permutation(round_to_permutation(score, rounds), 50)
    # Ties go to the lowest row index: with equal scores row i gets column i.
    assert torch.equal(round_to_permutation(torch.zeros(6, 6), rounds=6), torch.arange(6))


def _greedy_reference(score: list[list[float]], rounds: int) -> list[int]:
    """The rounding of SinkhornCoupling written as plain loops (no ties in the scores)."""
    n = len(score)
    perm, free_columns = [-1] * n, set(range(n))
    for _ in range(rounds):
        proposals: dict[int, list[tuple[float, int]]] = {}
        for row in (r for r in range(n) if perm[r] < 0):
            column = max(free_columns, key=lambda c, row=row: score[row][c])
            proposals.setdefault(column, []).append((score[row][column], row))
        for column, offers in proposals.items():
            perm[max(offers)[1]] = column
            free_columns.remove(column)
    left = [r for r in range(n) if perm[r] < 0]
    for row, column in zip(left, sorted(free_columns), strict=True):
        perm[row] = column
    return perm


def test_round_to_permutation_matches_plain_loops():
    g = torch.Generator().manual_seed(5)
    for rounds in (1, 2, 3, 20):
        score = torch.randn(20, 20, generator=g, dtype=F64)
        expected = _greedy_reference(score.tolist(), rounds)
        assert round_to_permutation(score, rounds).tolist() == expected


def test_bad_inputs_raise():
    x = torch.randn(8, 2)
    for coupling in (IndependentCoupling(), ExactOTCoupling(), SinkhornCoupling()):
        with pytest.raises(ValueError):
            coupling(x, torch.randn(8, 3))
        with pytest.raises(ValueError):
            coupling(x, torch.randn(7, 2))
        with pytest.raises(ValueError):
            coupling(torch.randn(8), torch.randn(8))
    with pytest.raises(ValueError):
        SinkhornCoupling(epsilon=0.0)
    with pytest.raises(ValueError):
        round_to_permutation(torch.zeros(3, 4), rounds=1)


def test_block_ot_pairs_each_block_optimally_and_keeps_a_permutation():
    gen = torch.Generator().manual_seed(11)
    x0, x1 = torch.randn(20, 2, generator=gen), torch.randn(20, 2, generator=gen) + 1.0
    paired = ExactOTCoupling(block_size=8)(x0, x1)
    # A permutation of the whole batch: every x0 is used exactly once.
    match = torch.cdist(paired, x0) == 0
    assert match.sum(0).eq(1).all() and match.sum(1).eq(1).all()
    for start in (0, 8, 16):  # blocks of 8, 8 and 4, each an exact OT pairing of its own
        block = slice(start, start + 8)
        assert torch.equal(paired[block], ExactOTCoupling()(x0[block], x1[block]))
    whole = ((ExactOTCoupling()(x0, x1) - x1) ** 2).sum()
    independent = ((x0 - x1) ** 2).sum()
    assert whole <= ((paired - x1) ** 2).sum() <= independent


def test_assignment_solver_takes_over_if_the_simplex_stops_short(monkeypatch):
    import ot

    gen = torch.Generator().manual_seed(12)
    x0, x1 = torch.randn(6, 2, generator=gen), torch.randn(6, 2, generator=gen)
    expected = ot_permutation(x0, x1)
    # A plan that is not a vertex (uniform): its row argmax is not a permutation.
    monkeypatch.setattr(ot, "emd", lambda a, b, cost, **kw: np.full(cost.shape, 1 / 36))
    assert torch.equal(ot_permutation(x0, x1), expected)


def test_exact_ot_without_pot_gives_the_same_pairs(monkeypatch):
    import importlib.util

    gen = torch.Generator().manual_seed(13)
    x0, x1 = torch.randn(64, 3, generator=gen), torch.randn(64, 3, generator=gen)
    expected = ot_permutation(x0, x1)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ot" else find_spec(name, *a)
    )
    monkeypatch.setitem(sys.modules, "ot", None)  # an import of POT would fail
    assert torch.equal(ot_permutation(x0, x1), expected)


def test_sorted_blocks_cover_both_batches_and_pair_each_block_optimally():
    from flowmatch.couplings import aligned_blocks

    gen = torch.Generator().manual_seed(12)
    x0, x1 = torch.randn(37, 3, generator=gen), torch.randn(37, 3, generator=gen) * 2.0 + 1.0
    blocks = aligned_blocks(x0, x1, 8)
    rows0, rows1 = torch.cat([a for a, _ in blocks]), torch.cat([b for _, b in blocks])
    assert _is_permutation(rows0, 37) and _is_permutation(rows1, 37)
    assert all(a.numel() == b.numel() <= 8 for a, b in blocks)
    paired = ExactOTCoupling(block_size=8, blocks="sorted")(x0, x1)
    assert torch.equal(paired.sort(dim=0).values, x0.sort(dim=0).values)  # every x0 once
    for a, b in blocks:  # each block is an exact OT pairing of its own
        assert torch.equal(paired[b], ExactOTCoupling()(x0[a], x1[b]))
    # A batch that fits one block is the whole batch's exact OT.
    whole = ExactOTCoupling(block_size=64, blocks="sorted")(x0, x1)
    assert torch.equal(whole, ExactOTCoupling()(x0, x1))


def test_sorted_blocks_come_closer_to_the_whole_batch_plan_on_clustered_data():
    # Eight well-separated clusters: consecutive blocks of 64 from a batch of 512 force noise
    # to cross to clusters far from it; blocks of corresponding regions do so less. Mean
    # transport cost over 4 batches: whole-batch OT <= sorted blocks < consecutive blocks.
    gen = torch.Generator().manual_seed(13)
    angles = torch.arange(8) * (2 * torch.pi / 8)
    centres = 2.5 * torch.stack([angles.cos(), angles.sin()], dim=1)
    costs = {"whole": 0.0, "sorted": 0.0, "consecutive": 0.0}
    for _ in range(4):
        x1 = centres[torch.randint(8, (512,), generator=gen)] + 0.1 * torch.randn(
            512, 2, generator=gen
        )
        x0 = torch.randn(512, 2, generator=gen)
        costs["whole"] += float(_cost(ExactOTCoupling()(x0, x1), x1))
        for blocks in ("sorted", "consecutive"):
            paired = ExactOTCoupling(block_size=64, blocks=blocks)(x0, x1)
            costs[blocks] += float(_cost(paired, x1))
    assert costs["whole"] <= costs["sorted"] < 0.97 * costs["consecutive"]
