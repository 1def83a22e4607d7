"""Flow-map training objectives and (s, t) samplers: oracle values, state round trips, teachers."""

import copy
import math

import pytest
import torch
from safetensors.torch import load, save

from flowmatch.losses import (
    MapDistillationObjective,
    MeanFlowObjective,
    ProgressiveMapDistillationObjective,
    SelfDistillationObjective,
    TerminalVelocityObjective,
    esd,
    eulerian_map_distillation_loss,
    lagrangian_map_distillation_loss,
    lsd,
    psd_midpoint,
    psd_uniform,
)
from flowmatch.nets import MLP, FlowMapNet
from flowmatch.oracles import GaussianOracle
from flowmatch.paths import AffinePath, CondOTSchedule
from flowmatch.paths.time_pairs import DiagonalSplitTimePairs, LogitNormalTimePairs

MEAN = torch.tensor([1.0, -2.0], dtype=torch.float64)
COV = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
PATH = AffinePath(CondOTSchedule())


def _normal_cdf(x):
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def test_diagonal_split_pairs():
    g = torch.Generator().manual_seed(0)
    pairs = DiagonalSplitTimePairs(0.75)(100, generator=g)
    n = pairs.num_diagonal
    assert n == 75 and pairs.s.shape == pairs.t.shape == (100,)
    assert torch.equal(pairs.s[:n], pairs.t[:n])
    assert (pairs.s[n:] < pairs.t[n:]).all()
    assert pairs.s.min() >= 0 and pairs.t.max() <= 1
    both = DiagonalSplitTimePairs(0.0, both_orders=True)(4000, generator=g)
    backward = (both.s > both.t).double().mean()
    assert abs(backward - 0.5) < 0.04  # binomial, 4000 draws: 5 standard errors
    # Off the diagonal, (min, max) of two uniforms: E[t - s] = 1/3.
    gaps = DiagonalSplitTimePairs(0.0)(40000, generator=g)
    assert abs((gaps.t - gaps.s).mean() - 1 / 3) < 0.006  # std 0.236 / sqrt(4e4): 5 s.e.
    again = DiagonalSplitTimePairs(0.75)(100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.s, pairs.s) and torch.equal(again.t, pairs.t)


def test_logit_normal_pairs_are_meanflow_pairs_in_flowmatch_time():
    n = 40000
    pairs = LogitNormalTimePairs(mean=0.4, std=1.0, diagonal_fraction=0.25)(
        n, generator=torch.Generator().manual_seed(1)
    )
    d = pairs.num_diagonal
    assert d == n // 4 and torch.equal(pairs.s[:d], pairs.t[:d])
    assert (pairs.s <= pairs.t).all()
    # t = max of two sigmoid(N(0.4, 1)) draws: P(t <= 1/2) = Phi(-0.4)^2 = 0.1187;
    # s = min: P(s <= 1/2) = 1 - (1 - Phi(-0.4))^2 = 0.5705. In MeanFlow time (1 - t) the
    # draws are lognorm(-0.4, 1), the paper's ImageNet default.
    p_t, p_s = _normal_cdf(-0.4) ** 2, 1 - (1 - _normal_cdf(-0.4)) ** 2
    off_t, all_s = pairs.t[d:], pairs.s
    # Binomial proportions: 5 standard errors.
    assert abs((off_t <= 0.5).double().mean() - p_t) < 5 * math.sqrt(p_t * (1 - p_t) / (n - d))
    assert abs((all_s <= 0.5).double().mean() - p_s) < 5 * math.sqrt(p_s * (1 - p_s) / n)


@pytest.mark.parametrize("distill", [lsd, esd, psd_midpoint, psd_uniform])
@pytest.mark.parametrize("both_orders", [False, True])
def test_self_distillation_at_the_exact_map(float64, distill, both_orders):
    oracle = GaussianOracle(MEAN, COV)
    objective = SelfDistillationObjective(
        PATH, distill, learned_weight=False, both_orders=both_orders
    )
    batch = {"x1": oracle.sample(64, torch.Generator().manual_seed(2))}
    loss = objective(oracle, batch, step=0, generator=torch.Generator().manual_seed(3))
    assert loss.shape == (64,)
    # Off the diagonal every residual vanishes at the exact map (float64 round-off); on the
    # diagonal it is the conditional flow-matching loss at the exact velocity, which is not 0.
    assert loss[48:].max() < 1e-20
    assert loss[:48].mean() > 0.1
    # With the learned weight at initialisation (w = 0) the loss is unchanged.
    weighted = SelfDistillationObjective(
        PATH, distill, learned_weight=True, both_orders=both_orders
    )
    again = weighted(oracle, batch, step=0, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(again, loss, atol=1e-12)


def test_map_distillation_at_the_exact_map(float64):
    oracle = GaussianOracle(MEAN, COV)
    g = torch.Generator().manual_seed(3)
    batch = {"x1": oracle.sample(64, g)}
    for loss in (lagrangian_map_distillation_loss, eulerian_map_distillation_loss):
        objective = MapDistillationObjective(PATH, oracle.velocity, loss)
        assert objective(oracle, batch, 0, g).max() < 1e-20, loss.__name__
    # PFMM's phase-0 teacher map is two Euler half steps over a gap <= 2 tau0: the residual of
    # the exact map is O(tau0^2), its square O(tau0^4): halving tau0 divides it by about 16.
    values = []
    for tau0 in (1 / 16, 1 / 32):
        objective = ProgressiveMapDistillationObjective(PATH, oracle.velocity, tau0=tau0)
        values.append(objective(oracle, batch, 0, torch.Generator().manual_seed(4)).mean())
    assert 0 < values[1] < values[0] / 10


def _flow_map_net(num_classes=None):
    torch.manual_seed(0)
    config = {"hidden": 32, "depth": 2, "time_embed_dim": 8, "time_scale": 10.0}
    return FlowMapNet(MLP(2, num_times=2, num_classes=num_classes, **config))


def _teacher():
    torch.manual_seed(1)
    return MLP(2, hidden=32, depth=2, time_embed_dim=8, time_scale=10.0)


OBJECTIVES = {
    "lsd-learned": lambda: SelfDistillationObjective(PATH, lsd, learned_weight=True),
    "esd": lambda: SelfDistillationObjective(PATH, esd, learned_weight=False),
    "psd-uniform-both": lambda: SelfDistillationObjective(
        PATH, psd_uniform, learned_weight=True, both_orders=True
    ),
    "meanflow": lambda: MeanFlowObjective(PATH),
    "lmd": lambda: MapDistillationObjective(PATH, _teacher(), learned_weight=True),
    "emd": lambda: MapDistillationObjective(PATH, _teacher(), eulerian_map_distillation_loss),
    "pfmm": lambda: ProgressiveMapDistillationObjective(PATH, _teacher(), phase_steps=2),
    "tvm-ema-target": lambda: TerminalVelocityObjective(PATH, target_decay=0.5),
}


def _train(model, objective, optimizer, steps, x1):
    losses = []
    for step in steps:
        g = torch.Generator().manual_seed(1000 + step)  # randomness = f(seed, step)
        loss = objective(model, {"x1": x1}, step, g)
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_state_dict_round_trip_resumes_exactly(name):
    x1 = torch.randn(32, 2, generator=torch.Generator().manual_seed(5))

    def build():
        model, objective = _flow_map_net(), OBJECTIVES[name]()
        params = list(model.parameters()) + list(objective.parameters())
        return model, objective, torch.optim.Adam(params, lr=1e-2)

    model, objective, optimizer = build()
    _train(model, objective, optimizer, range(3), x1)
    # Checkpoint as the loop would: tensors through safetensors (no pickling).
    model_state, objective_state = save(model.state_dict()), save(objective.state_dict())
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    expected = _train(model, objective, optimizer, range(3, 7), x1)

    model, objective, optimizer = build()
    model.load_state_dict(load(model_state))
    objective.load_state_dict(load(objective_state))
    optimizer.load_state_dict(optimizer_state)
    resumed = _train(model, objective, optimizer, range(3, 7), x1)
    assert torch.equal(resumed, expected)
    if name == "tvm-ema-target":  # the copy was restored, not remade from the model
        assert "target.backbone.input.weight" in load(objective_state)
    if name == "pfmm":  # steps 3..6 cross phases 1 -> 2 -> 3: the copy and tau were restored
        assert objective.phase == 3 and "teacher_map.backbone.input.weight" in load(objective_state)


def test_teacher_is_frozen_and_not_part_of_the_objective():
    teacher = _teacher()
    objective = MapDistillationObjective(PATH, teacher)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert list(objective.parameters()) == [] and objective.state_dict() == {}
    pfmm = ProgressiveMapDistillationObjective(PATH, teacher, phase_steps=1)
    model = _flow_map_net()
    pfmm(model, {"x1": torch.randn(8, 2)}, 1, torch.Generator().manual_seed(0))
    state = pfmm.state_dict()
    assert list(pfmm.parameters()) == []
    assert not any(k.startswith(("teacher.", "net.")) for k in state)
    assert set(state) == {"phase"} | {f"teacher_map.{k}" for k in model.state_dict()}
    # The copy is frozen: a step on the model leaves the teacher map as it was.
    before = {k: v.clone() for k, v in state.items()}
    loss = pfmm(model, {"x1": torch.randn(8, 2)}, 1, torch.Generator().manual_seed(1))
    loss.mean().backward()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in pfmm.state_dict().items())


def test_labels_reach_the_model_and_edge_splits_run():
    model = _flow_map_net(num_classes=3)
    x1 = torch.randn(16, 2, generator=torch.Generator().manual_seed(6))
    y0, y1 = torch.zeros(16, dtype=torch.long), torch.ones(16, dtype=torch.long)
    for objective in (SelfDistillationObjective(PATH), MeanFlowObjective(PATH)):
        a = objective(model, {"x1": x1, "y": y0}, 0, torch.Generator().manual_seed(0))
        b = objective(model, {"x1": x1, "y": y1}, 0, torch.Generator().manual_seed(0))
        assert not torch.allclose(a, b)
    model = _flow_map_net()
    for fraction in (0.0, 1.0):
        objective = SelfDistillationObjective(PATH, diagonal_fraction=fraction)
        loss = objective(model, {"x1": x1}, 0, torch.Generator().manual_seed(0))
        assert loss.shape == (16,) and torch.isfinite(loss).all()


def _loss_and_grads(model, objective, x1, autocast=False):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = objective(model, {"x1": x1}, 0, torch.Generator().manual_seed(3)).mean()
    loss.backward()
    return loss.detach().float(), [p.grad.clone() for p in model.parameters()]


JVP_OBJECTIVES = ["lsd-learned", "esd", "meanflow", "lmd", "emd"]


@pytest.mark.parametrize("name", JVP_OBJECTIVES)
def test_jvp_objectives_under_bf16_autocast(name):
    # The training loop's bf16 path: the forward (and jvp tangents) in bf16, 8 bits of mantissa.
    x1 = torch.randn(256, 2, generator=torch.Generator().manual_seed(5))
    model, objective = _flow_map_net(), OBJECTIVES[name]()
    loss32, grads32 = _loss_and_grads(model, objective, x1)
    loss16, grads16 = _loss_and_grads(model, objective, x1, autocast=True)
    assert torch.isfinite(loss16) and all(g.isfinite().all() for g in grads16)
    # bf16 rounding (2^-8 relative per operation) moves the loss by ~1 %, not by its size.
    assert loss16 == pytest.approx(loss32.item(), rel=0.05)
    flat32, flat16 = (
        torch.cat([g.flatten() for g in grads32]),
        torch.cat([g.flatten() for g in grads16]),
    )
    assert torch.nn.functional.cosine_similarity(flat32, flat16, dim=0) > 0.95


@pytest.mark.slow  # inductor compiles C++ kernels on the CPU
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", ["lsd-learned", "meanflow"])
def test_jvp_objectives_through_a_compiled_model(name):
    # The training loop compiles the network in place; the objective calls its methods (and jvp).
    from torch._dynamo.utils import counters

    x1 = torch.randn(64, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    model, objective = _flow_map_net().double(), OBJECTIVES[name]().double()
    eager_loss, eager_grads = _loss_and_grads(model, objective, x1)
    counters.clear()
    model.compile()
    loss, grads = _loss_and_grads(model, objective, x1)
    assert loss.item() == pytest.approx(eager_loss.item(), rel=1e-9)
    for a, b in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # LSD's diagonal term calls the network outside jvp: that call runs compiled. (MeanFlow
    # calls it only under jvp, which TorchDynamo leaves to eager mode.)
    assert (counters["stats"]["unique_graphs"] > 0) == (name == "lsd-learned")
