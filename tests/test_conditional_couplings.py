"""Condition-aware minibatch OT (C2OT): pairs within labels, or a cost with a condition term."""

import itertools

import pytest
import torch

from flowmatch.app.objectives import OBJECTIVES
from flowmatch.couplings import ExactOTCoupling, IndependentCoupling, SinkhornCoupling
from flowmatch.losses.flow_matching import FlowMatchingObjective
from flowmatch.paths import AffinePath, CondOTSchedule


def _batch(n, seed, dims=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dims, generator=g), torch.randn(n, dims, generator=g) * 2 + 1


def _perm_of(x0, paired):
    """The permutation with ``paired == x0[perm]`` (rows of x0 are distinct)."""
    return torch.cdist(paired, x0).argmin(1)


def _cost(x0, x1, perm, extra=None):
    total = (x0[perm] - x1).square().sum()
    if extra is not None:
        total = total + extra[torch.arange(len(perm)), perm].sum()
    return float(total)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_labels_pair_within_each_label_at_the_brute_force_optimum(seed):
    x0, x1 = _batch(7, seed)
    labels = torch.tensor([2, 0, 2, 1, 0, 2, 0])
    perm = _perm_of(x0, ExactOTCoupling()(x0, x1, condition=labels))
    assert sorted(perm.tolist()) == list(range(7))
    assert torch.equal(labels[perm], labels)  # no pair crosses a label
    best = min(
        _cost(x0, x1, torch.tensor(p))
        for p in itertools.permutations(range(7))
        if all(labels[j] == labels[i] for i, j in enumerate(p))
    )
    assert _cost(x0, x1, perm) == pytest.approx(best, rel=1e-6)
    # Ignoring the labels finds a cheaper pairing that crosses them (what C2OT avoids).
    plain = _perm_of(x0, ExactOTCoupling()(x0, x1))
    assert _cost(x0, x1, plain) <= best + 1e-6


def test_plain_ot_crosses_labels_where_c2ot_does_not():
    x0, x1 = _batch(64, 3)
    labels = torch.arange(64) % 4
    plain = _perm_of(x0, ExactOTCoupling()(x0, x1))
    assert not torch.equal(labels[plain], labels)
    aware = _perm_of(x0, ExactOTCoupling()(x0, x1, condition=labels))
    assert torch.equal(labels[aware], labels)


@pytest.mark.parametrize("weight", [0.3, 5.0])
def test_float_condition_adds_a_weighted_cost_at_the_brute_force_optimum(weight):
    x0, x1 = _batch(6, 4)
    context = torch.linspace(-1, 1, 6)[torch.tensor([3, 0, 5, 1, 4, 2])][:, None]
    extra = weight * torch.cdist(context, context).square()
    perm = _perm_of(x0, ExactOTCoupling(condition_weight=weight)(x0, x1, condition=context))
    best = min(_cost(x0, x1, torch.tensor(p), extra) for p in itertools.permutations(range(6)))
    assert _cost(x0, x1, perm, extra) == pytest.approx(best, rel=1e-6)


def test_condition_weight_interpolates_between_ot_and_within_condition_pairing():
    x0, x1 = _batch(40, 5)
    labels = torch.arange(40) % 5
    as_float = labels.double()[:, None]
    zero = ExactOTCoupling(condition_weight=0.0)(x0, x1, condition=as_float)
    assert torch.equal(zero, ExactOTCoupling()(x0, x1))
    heavy = ExactOTCoupling(condition_weight=1e4)(x0, x1, condition=as_float)
    assert torch.equal(heavy, ExactOTCoupling()(x0, x1, condition=labels))


def test_blocks_and_sinkhorn_keep_labels_and_use_every_sample_once():
    x0, x1 = _batch(60, 6)
    labels = torch.randint(0, 3, (60,), generator=torch.Generator().manual_seed(0))
    for coupling in (ExactOTCoupling(block_size=16), SinkhornCoupling(epsilon=0.05)):
        paired = coupling(x0, x1, condition=labels)
        perm = _perm_of(x0, paired)
        assert sorted(perm.tolist()) == list(range(60))
        assert torch.equal(labels[perm], labels)
        if isinstance(coupling, ExactOTCoupling):  # blocks of 16 stay blocks
            assert torch.equal(perm // 16, torch.arange(60) // 16)
        assert torch.equal(coupling(x0, x1, condition=labels), paired)  # reproducible
    assert torch.equal(IndependentCoupling()(x0, x1, condition=labels), x0)


def test_sinkhorn_float_condition_moves_pairs_towards_their_condition():
    x0, x1 = _batch(64, 7)
    context = torch.randn(64, 1, generator=torch.Generator().manual_seed(1))

    def mismatch(weight):
        perm = _perm_of(x0, SinkhornCoupling(condition_weight=weight)(x0, x1, condition=context))
        return float((context[perm] - context).square().mean())

    assert mismatch(100.0) < 0.2 * mismatch(0.0)


@pytest.mark.parametrize(
    "condition",
    [torch.zeros(5, dtype=torch.long), torch.zeros(6, 2, dtype=torch.long), torch.tensor(1.0)],
)
def test_bad_conditions_are_errors(condition):
    x0, x1 = _batch(6, 8)
    with pytest.raises(ValueError, match="condition"):
        ExactOTCoupling()(x0, x1, condition=condition)


def test_flow_matching_objective_passes_the_labels_to_the_coupling():
    seen = {}

    def spy(x0, x1, generator=None, condition=None):
        seen["condition"] = condition
        return x0

    objective = FlowMatchingObjective(AffinePath(CondOTSchedule()), coupling=spy)
    y = torch.tensor([0, 1, 1, 0])

    def model(x, t, y=None):
        return torch.zeros_like(x)

    objective(model, {"x1": torch.randn(4, 2), "y": y}, step=0)
    assert torch.equal(seen["condition"], y)
    objective(model, {"x1": torch.randn(4, 2)}, step=0)
    assert seen["condition"] is None


FLOW_MAP_OBJECTIVES = [name for name, entry in OBJECTIVES.items() if entry.is_flow_map]


@pytest.mark.parametrize("objective", FLOW_MAP_OBJECTIVES)
def test_flow_map_objectives_take_the_run_coupling(objective):
    from flowmatch.app.build import build_objective
    from flowmatch.app.config import RunConfig, with_overrides

    distils = OBJECTIVES[objective].teacher
    teacher = ["objective.teacher=RUN"] if distils else []

    def velocity(x, t, **kw):
        return torch.zeros_like(x)

    def build(overrides):
        config = with_overrides(RunConfig(), [f"objective={objective}", *teacher, *overrides])
        return build_objective(config, velocity if distils else None)

    built = build(["path.coupling=exact-ot"])
    assert isinstance(built.coupling, ExactOTCoupling) and built.condition_aware
    seen = []

    def spy(x0, x1, generator=None, condition=None):
        seen.append(condition)
        return x0.flip(0)

    built.coupling = spy
    x1, y = torch.randn(8, 2), torch.arange(8) % 2
    point, _, kw = built._draw({"x1": x1, "y": y}, torch.Generator().manual_seed(0))
    assert torch.equal(seen[-1], y) and torch.equal(kw["y"], y)
    built.coupling = None
    plain, _, _ = built._draw({"x1": x1, "y": y}, torch.Generator().manual_seed(0))
    # the same noise, reordered by the coupling (the path point differs unless s = 1)
    assert not torch.allclose(point.x_t, plain.x_t)
    built.coupling, built.condition_aware = spy, False
    built._draw({"x1": x1, "y": y}, torch.Generator().manual_seed(0))
    assert seen[-1] is None
    assert isinstance(build([]).coupling, IndependentCoupling)
