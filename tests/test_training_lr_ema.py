"""Learning-rate schedules and the EMA of weights, against their closed forms."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from flowmatch.training import EMA, learning_rate
from flowmatch.training.lr import LR_FLOOR

PEAK, STEPS, WARMUP = 1e-3, 101, 20


def lrs(schedule: str, warmup: int = WARMUP) -> list[float]:
    return [
        learning_rate(k, peak=PEAK, steps=STEPS, warmup_steps=warmup, schedule=schedule)
        for k in range(STEPS)
    ]


@pytest.mark.parametrize("schedule", ["constant", "cosine", "poly"])
def test_linear_warmup_from_floor_to_peak(schedule):
    rates = lrs(schedule)
    assert rates[0] == LR_FLOOR and rates[WARMUP] == PEAK
    # Linear: constant increments (relative tolerance: float rounding of k / W).
    steps = [b - a for a, b in itertools.pairwise(rates[: WARMUP + 1])]
    assert max(steps) - min(steps) < 1e-12 * PEAK
    assert lrs(schedule, warmup=0)[0] == PEAK


def test_poly_decays_linearly_to_floor_at_the_last_step():
    rates = lrs("poly")
    assert rates[-1] == pytest.approx(LR_FLOOR, abs=1e-18)
    decay = rates[WARMUP:]
    steps = [b - a for a, b in itertools.pairwise(decay)]
    assert all(s < 0 for s in steps) and max(steps) - min(steps) < 1e-12 * PEAK
    assert steps[0] == pytest.approx((LR_FLOOR - PEAK) / (STEPS - 1 - WARMUP), rel=1e-9)


def test_cosine_and_constant():
    rates = lrs("cosine")
    middle = WARMUP + (STEPS - 1 - WARMUP) // 2  # p = 1/2 exactly: cos(pi / 2) = 0
    assert rates[middle] == pytest.approx((PEAK + LR_FLOOR) / 2, rel=1e-12)
    assert rates[-1] == pytest.approx(LR_FLOOR, abs=1e-18)
    assert all(a >= b for a, b in itertools.pairwise(rates[WARMUP:]))
    assert set(lrs("constant")[WARMUP:]) == {PEAK}
    with pytest.raises(ValueError, match="unknown lr schedule"):
        learning_rate(50, peak=1.0, steps=100, warmup_steps=0, schedule="step")


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, 4, dtype=torch.float64), nn.BatchNorm1d(4, dtype=torch.float64)
    )


def test_ema_matches_geometric_closed_form():
    model = make_model()
    ema = EMA(model, decay=0.9, warmup=False)
    w0 = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():  # the model jumps to new weights w and stays there
        for p in model.parameters():
            p.add_(1.0)
    for k in range(7):
        ema.update(k)
    # theta_ema = w + d^k (w0 - w) after k updates towards a constant w; float64 rounding only.
    for mine, start, target in zip(ema.module.parameters(), w0, model.parameters(), strict=True):
        expected = target + 0.9**7 * (start - target)
        torch.testing.assert_close(mine, expected, rtol=1e-13, atol=1e-13)


def test_ema_warmup_decay_and_product():
    model = make_model()
    ema = EMA(model, decay=0.999, warmup=True)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(10**6) == 0.999
    start = next(model.parameters()).detach().clone()
    with torch.no_grad():
        next(model.parameters()).mul_(-2.0)
    for k in range(5):
        ema.update(k)
    remaining = math.prod(ema.decay_at(k) for k in range(5))  # weight left on the start value
    target = next(model.parameters())
    torch.testing.assert_close(
        next(ema.module.parameters()), target + remaining * (start - target), rtol=1e-13, atol=0
    )


def test_ema_copies_buffers_and_round_trips():
    model = make_model()
    ema = EMA(model, decay=0.5)
    model.train()(torch.randn(8, 3, dtype=torch.float64))  # changes the BatchNorm statistics
    ema.update(100)
    torch.testing.assert_close(ema.module[1].running_mean, model[1].running_mean, rtol=0, atol=0)
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())

    other = make_model()
    restored = EMA(other, decay=0.5)
    restored.load_state_dict(ema.state_dict())
    restored.copy_to(other)
    for a, b in zip(other.state_dict().values(), ema.module.state_dict().values(), strict=True):
        assert torch.equal(a, b)
