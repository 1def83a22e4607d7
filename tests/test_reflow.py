"""Reflow: reproducible teacher pairs, their cache, the objective, and straightness."""

import json
import math

import pytest
import torch

from flowmatch.nets import MLP
from flowmatch.oracles import GaussianMixtureOracle, GaussianOracle
from flowmatch.paths import AffinePath, CondOTSchedule
from flowmatch.reflow import (
    ReflowObjective,
    ReflowPairs,
    cached_reflow_pairs,
    generate_reflow_pairs,
    load_reflow_pairs,
    straightness,
)

MEAN = torch.tensor([1.0, -2.0], dtype=torch.float64)
COV = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
PATH = AffinePath(CondOTSchedule())


def _generate(oracle, seed, n=300, **kw):
    settings = {"teacher_id": "gaussian-oracle", "steps": 20, "chunk_size": 128}
    return generate_reflow_pairs(
        oracle.velocity, n, (2,), seed=seed, dtype=torch.float64, **settings, **kw
    )


def test_pairs_are_reproducible_from_their_seed_and_follow_the_teacher():
    oracle = GaussianOracle(MEAN, COV)
    a, b, c = _generate(oracle, 0), _generate(oracle, 0), _generate(oracle, 1)
    assert torch.equal(a.x0, b.x0) and torch.equal(a.x1, b.x1)
    assert not torch.allclose(a.x0, c.x0)
    # Chunk k depends on (seed, k) only: a shorter run reproduces the leading chunk.
    prefix = _generate(oracle, 0, n=128)
    assert torch.equal(prefix.x1, a.x1[:128])
    # x1 is the teacher's ODE solution from x0: the exact map m + S^{1/2} x0 up to RK4's
    # error with 20 steps (~1e-7 here).
    n = a.x0.shape[0]
    exact = oracle.flow_map(a.x0, torch.zeros(n), torch.ones(n))
    assert (a.x1 - exact).abs().max() < 1e-5
    assert a.x0.std() == pytest.approx(1.0, abs=0.1)
    assert a.metadata["seed"] == 0 and a.metadata["n"] == 300 and a.metadata["steps"] == 20


def test_cache_round_trip_and_mismatch(tmp_path):
    oracle = GaussianOracle(MEAN, COV)
    labels = torch.arange(300) % 3
    kw = {"seed": 4, "teacher_id": "gaussian-oracle", "steps": 8, "chunk_size": 100}

    def teacher(x, t, y):  # a conditional teacher: labels travel as y
        return oracle.velocity(x, t) + y[:, None].to(x)

    stem = tmp_path / "cache" / "pairs"
    made = cached_reflow_pairs(stem, teacher, 300, (2,), labels=labels, **kw)
    sidecar = json.loads((tmp_path / "cache" / "pairs.json").read_text())
    assert sidecar["seed"] == 4 and sidecar["teacher_id"] == "gaussian-oracle"
    assert sidecar["method"] == "rk4" and sidecar["labels"] is True and sidecar["shape"] == [2]

    def must_not_run(x, t, y):
        raise AssertionError("the cache should have been used")

    loaded = cached_reflow_pairs(stem, must_not_run, 300, (2,), labels=labels, **kw)
    for got in (loaded, load_reflow_pairs(stem)):
        assert torch.equal(got.x0, made.x0) and torch.equal(got.x1, made.x1)
        assert torch.equal(got.y, labels)
    with pytest.raises(ValueError, match="seed"):
        cached_reflow_pairs(stem, must_not_run, 300, (2,), labels=labels, **{**kw, "seed": 5})
    with pytest.raises(ValueError, match="labels"):
        cached_reflow_pairs(stem, must_not_run, 300, (2,), labels=labels.flip(0), **kw)


def test_pairs_are_a_data_source_and_the_objective_uses_their_noise():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(500, 2, generator=g)
    shift = torch.tensor([1.5, -0.5])
    pairs = ReflowPairs(x0=x0, x1=x0 + shift, metadata={}, y=torch.arange(500))
    batch = pairs.sample(64, torch.Generator().manual_seed(1))
    assert pairs.shape == (2,) and set(batch) == {"x0", "x1", "y"}
    assert torch.equal(batch["x0"], x0[batch["y"]])  # rows stay paired (y = row index here)
    again = pairs.sample(64, torch.Generator().manual_seed(1))
    assert torch.equal(again["x1"], batch["x1"])
    del batch["y"]

    def zero(x, t):
        return torch.zeros_like(x)

    # Every pair has x1 - x0 = shift: with the pair's x0 a zero velocity's loss is exactly
    # mean(shift^2) = 1.25 (fresh noise would give a random value); one-step likewise.
    for mode in ("flow_matching", "one_step"):
        objective = ReflowObjective(PATH, mode=mode)
        loss = objective(zero, batch, 0, torch.Generator().manual_seed(2))
        assert loss.shape == (64,) and torch.allclose(loss, torch.full((64,), 1.25))
        # The straight field v = shift is exact for both modes.
        loss = objective(lambda x, t: shift.expand_as(x), batch, 0, g)
        assert loss.max() < 1e-12
    assert objective.state_dict() == {}
    with pytest.raises(ValueError, match="x0"):
        objective(zero, {"x1": batch["x1"]}, 0, g)


def test_straightness_closed_form(float64):
    z = torch.randn(64, 3, generator=torch.Generator().manual_seed(2))
    # v = x: Z_t = e^t Z0, S = E|Z0|^2 int_0^1 (e - 1 - e^t)^2 dt = E|Z0|^2 ((e^2-1)/2 - (e-1)^2).
    expected = z.pow(2).mean() * ((math.e**2 - 1) / 2 - (math.e - 1) ** 2)
    measured = straightness(lambda x, t: x, z, steps=400)
    # Trapezoid error h^2 (f'(1) - f'(0)) / 12 with f' jumping by 6.87 on an integral of 0.242:
    # relative 2.4 h^2 = 1.5e-5 at h = 1/400 (RK4's own error is far smaller).
    assert measured == pytest.approx(expected.item(), rel=5e-5)
    assert straightness(lambda x, t: torch.ones_like(x), z, steps=5) < 1e-24


def test_reflow_straightens_a_mixture_teacher():
    """One reflow round (short run): the model trained on the teacher's pairs has far straighter
    paths than the teacher; the same training on shuffled (independent) pairs does not."""
    mixture = GaussianMixtureOracle(
        torch.tensor([0.5, 0.5]),
        torch.tensor([[-2.0, 0.0], [2.0, 0.0]]),
        torch.stack([0.1 * torch.eye(2), 0.1 * torch.eye(2)]),
    )
    pairs = generate_reflow_pairs(mixture.velocity, 2048, (2,), seed=0, teacher_id="mix", steps=16)

    def train(pairs):
        torch.manual_seed(0)
        net = MLP(2, hidden=64, depth=2, time_embed_dim=16, time_scale=10.0)
        objective = ReflowObjective(PATH)
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        for step in range(300):
            g = torch.Generator().manual_seed(step)
            loss = objective(net, pairs.sample(256, g), step, g)
            opt.zero_grad()
            loss.mean().backward()
            opt.step()
        return net

    perm = torch.randperm(2048, generator=torch.Generator().manual_seed(1))
    shuffled = ReflowPairs(x0=pairs.x0[perm], x1=pairs.x1, metadata={})
    z = torch.randn(1000, 2, generator=torch.Generator().manual_seed(9))
    teacher = straightness(mixture.velocity, z, 16)
    reflowed = straightness(train(pairs), z, 16)
    independent = straightness(train(shuffled), z, 16)
    # Measured: teacher 0.59, reflowed 0.026, independent coupling 0.50.
    assert reflowed < 0.25 * teacher
    assert independent > 0.5 * teacher
