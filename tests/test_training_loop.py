"""The training loop in one process: what it optimises, its random stream, bf16, divergence, the run
folder and resuming (the multi-process and kill-and-resume tests are in their own files)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from _train_worker import make_problem
from torch import Tensor, nn

from flowmatch.training import (
    CheckpointError,
    ConfigError,
    TrainConfig,
    TrainingDiverged,
    apply_overrides,
    config_to_dict,
    latest_checkpoint,
    load_checkpoint,
    micro_batch_seed,
    train,
)

A = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64)
NOISE_STD = 0.3


class RegressionSource:
    """Labelled data ``y = A x + 0.3 eps``, ``x, eps ~ N(0, I)``, as a dict batch."""

    def sample(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        x = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return {"x1": x, "y": x @ A.T + NOISE_STD * noise}


class LearnedWeightRegression(nn.Module):
    """``exp(-s) mse + s`` with a trainable log-variance ``s``: minimised by ``W = A`` and
    ``s = log E[mse] = log(0.3^2)`` (a learned loss weight, as uncertainty weighting uses)."""

    def __init__(self) -> None:
        super().__init__()
        self.log_var = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, model, batch, step, generator):
        mse = (model(batch["x1"]) - batch["y"]).square().mean(dim=1)
        return torch.exp(-self.log_var) * mse + self.log_var


def linear_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(2, 2, bias=False, dtype=torch.float64)


def config(**changes) -> TrainConfig:
    base = dict(steps=8, batch_size=16, lr=1e-2, log_every=4, checkpoint_every=4, device="cpu")
    return TrainConfig(**{**base, **changes})


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_optimises_model_and_objective_parameters_to_the_known_minimum(tmp_path):
    model, objective = linear_model(), LearnedWeightRegression()
    cfg = config(steps=400, batch_size=256, lr=5e-2, lr_schedule="cosine", log_every=400,
                 checkpoint_every=400, ema_decay=0.99)  # fmt: skip
    result = train(model, objective, RegressionSource(), cfg, tmp_path)
    # Tolerances: the minimiser is estimated from noisy batches of 256; with these settings the
    # errors over seeds 0-3 were at most 6e-3 on W and 7e-3 on s.
    torch.testing.assert_close(result.ema.module.weight, A, atol=1.5e-2, rtol=0)
    assert objective.log_var.item() == pytest.approx(math.log(NOISE_STD**2), abs=0.03)
    saved = load_checkpoint(result.checkpoint)
    assert torch.equal(saved.objective["log_var"], objective.log_var.detach())


def test_step_uses_the_documented_micro_batch_stream_and_loss_scaling(tmp_path):
    """Rebuild the first step's logged loss and gradient norm by hand: micro-batch j draws from
    a generator seeded with micro_batch_seed(seed, 0, j); the loss is the mean over all G."""
    model, objective = linear_model(), LearnedWeightRegression()
    reference_model, reference_objective = linear_model(), LearnedWeightRegression()
    cfg = config(steps=1, batch_size=8, micro_batch_size=2, seed=11, log_every=1)
    train(model, objective, RegressionSource(), cfg, tmp_path)
    (record,) = read_metrics(tmp_path)

    generator, loss = torch.Generator(), 0.0
    for j in range(4):
        generator.manual_seed(micro_batch_seed(11, 0, j))
        batch = RegressionSource().sample(2, generator)
        micro = reference_objective(reference_model, batch, 0, generator).mean() / 4
        micro.backward()
        loss += micro.item()
    grads = [reference_model.weight.grad, reference_objective.log_var.grad]
    grad_norm = torch.cat([g.reshape(-1) for g in grads]).norm().item()
    # float64 throughout; only the order of a few additions differs.
    assert record["loss"] == pytest.approx(loss, rel=1e-12)
    assert record["grad_norm"] == pytest.approx(grad_norm, rel=1e-12)
    assert record["lr"] == 1e-2


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    def run(seed, name):
        model, objective, source = make_problem()
        train(model, objective, source, config(seed=seed, micro_batch_size=4), tmp_path / name)
        return model.state_dict()

    first, again, other = run(0, "a"), run(0, "b"), run(1, "c")
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


class DtypeRecorder(nn.Module):
    """A linear model that records the dtype its layer computes in."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(2, 2, bias=False)
        self.seen: set[torch.dtype] = set()

    def forward(self, x):
        out = self.layer(x)
        self.seen.add(out.dtype)
        return out


class Float32Regression:
    def __call__(self, model, batch, step, generator):
        return (model(batch["x1"].float()) - batch["y"].float()).square().mean(dim=1)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bf16_runs_the_forward_under_autocast_and_still_converges(tmp_path, precision):
    model = DtypeRecorder()
    cfg = config(steps=400, batch_size=128, lr=5e-2, lr_schedule="cosine", precision=precision,
                 log_every=100, checkpoint_every=400, ema_decay=0.9)  # fmt: skip
    result = train(model, Float32Regression(), RegressionSource(), cfg, tmp_path)
    expected = torch.bfloat16 if precision == "bf16" else torch.float32
    assert model.seen == {expected} and model.layer.weight.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: the fit is good to ~1e-2 relative to |A| ~ 3.
    torch.testing.assert_close(result.ema.module.layer.weight, A.float(), atol=5e-2, rtol=0)
    assert result.loss == pytest.approx(NOISE_STD**2, rel=0.2)  # mean over steps 301-400


class NaNAt:
    """Regression whose loss (or only its gradient) becomes NaN from step ``step`` on."""

    def __init__(self, step: int, where: str) -> None:
        self.step, self.where = step, where

    def __call__(self, model, batch, step, generator):
        loss = (model(batch["x1"]) - batch["y"]).square().mean(dim=1)
        if step >= self.step and self.where == "loss":
            return loss * math.nan
        if step == self.step and self.where == "gradient":  # d/dx sqrt(x) at 0 is infinite
            return loss + torch.sqrt(model.weight.sum() * 0)
        return loss


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_non_finite_values_stop_training_and_keep_the_last_good_checkpoint(tmp_path, where):
    # NaN loss from step 7 is seen at the sync point of step 10. A NaN gradient at step 9 leaves
    # the loss finite but the weights NaN: the check before writing checkpoint 10 catches it.
    cfg = config(steps=20, log_every=5 if where == "loss" else 10, checkpoint_every=5)
    objective = NaNAt(7 if where == "loss" else 9, where)
    with pytest.raises(TrainingDiverged, match=r"at step 10: .*not finite.*ckpt-000005") as error:
        train(linear_model(), objective, RegressionSource(), cfg, tmp_path)
    assert error.value.step == 10
    assert latest_checkpoint(tmp_path).name == "ckpt-000005.safetensors"
    saved = load_checkpoint(latest_checkpoint(tmp_path))
    assert saved.step == 5 and torch.isfinite(saved.model["weight"]).all()
    assert all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path) if "loss" in r)


def test_run_folder_metrics_and_validation_on_the_ema_model(tmp_path, capsys):
    seen = []

    def validate(module):
        seen.append(module)
        return 0.25

    model, objective, source = make_problem()
    cfg = config(steps=8, log_every=2, val_every=4, checkpoint_every=8)
    result = train(model, objective, source, cfg, tmp_path, validate=validate)
    assert seen == [result.ema.module, result.ema.module] and result.val_loss == 0.25
    assert json.loads((tmp_path / "config.json").read_text()) == {"train": config_to_dict(cfg)}
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["world_size"] == 1 and meta["versions"]["torch"] == torch.__version__
    assert {"start_time", "command", "git_commit"} <= meta.keys()
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    assert [r.get("val_loss") for r in records] == [None, 0.25, None, 0.25]
    assert {"loss", "lr", "grad_norm", "steps_per_sec"} <= records[0].keys()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "ckpt-000008.safetensors"
    ]
    # stderr is not a terminal under pytest: plain lines, one per log step.
    assert capsys.readouterr().err.count("step ") == 4


def test_resume_from_an_earlier_checkpoint_is_bit_identical(tmp_path):
    cfg = config(steps=12, log_every=2, checkpoint_every=4, keep_checkpoints=None)
    model, objective, source = make_problem()
    train(model, objective, source, cfg, tmp_path / "full")
    # A run that crashed after writing checkpoint 4 and the metrics up to step 10:
    shutil.copytree(tmp_path / "full", tmp_path / "crashed")
    for step in (8, 12):
        (tmp_path / "crashed" / "checkpoints" / f"ckpt-{step:06d}.safetensors").unlink()
    with open(tmp_path / "crashed" / "metrics.jsonl", "a") as f:
        f.write('{"step": 14, "lo')  # a line cut short

    resumed, objective, source = make_problem()
    train(resumed, objective, source, cfg, tmp_path / "crashed", resume=True)
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters(), strict=True)
    )
    full, crashed = (
        load_checkpoint(latest_checkpoint(tmp_path / "full")),
        load_checkpoint(latest_checkpoint(tmp_path / "crashed")),
    )
    for part in ("ema", "model"):
        assert all(torch.equal(getattr(full, part)[k], getattr(crashed, part)[k]) for k in full.ema)

    def without_speed(records):
        return [{k: v for k, v in r.items() if k != "steps_per_sec"} for r in records]

    assert without_speed(read_metrics(tmp_path / "crashed")) == without_speed(
        read_metrics(tmp_path / "full")
    )
    meta = json.loads((tmp_path / "crashed" / "meta.json").read_text())
    assert [r["step"] for r in meta["resumes"]] == [4]


def test_resume_checks_the_config_and_a_fresh_start_refuses_old_checkpoints(tmp_path):
    model, objective, source = make_problem()
    train(model, objective, source, config(steps=4), tmp_path)
    with pytest.raises(FileExistsError, match="already has checkpoints"):
        train(*make_problem(), config(steps=4), tmp_path)
    with pytest.raises(
        CheckpointError, match=r"another config: train\.lr: 0\.01 there, 0\.02 here"
    ):
        train(*make_problem(), config(steps=4, lr=2e-2), tmp_path, resume=True)
    # Logging and checkpoint intervals may change; a finished run has nothing left to do.
    result = train(*make_problem(), config(steps=4, log_every=1), tmp_path, resume=True)
    assert result.step == 4 and result.loss is None
    with pytest.raises(CheckpointError, match="the model state lacks bias; it belongs to another"):
        train(nn.Linear(2, 3), make_problem()[1], make_problem()[2], config(steps=4), tmp_path,
              resume=True)  # fmt: skip


def test_the_callers_context_is_saved_whole_and_checked_on_resume(tmp_path):
    cfg, context = config(steps=4), {"model": {"hidden": 16}}
    train(*make_problem(), cfg, tmp_path, context=context)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved == {"train": config_to_dict(cfg), "model": {"hidden": 16}}
    assert load_checkpoint(latest_checkpoint(tmp_path)).config["model"] == {"hidden": 16}
    # The train section's logging interval may change on resume, the context may not.
    more_logs = apply_overrides(cfg, ["log_every=1"])
    train(*make_problem(), more_logs, tmp_path, resume=True, context=context)
    with pytest.raises(CheckpointError, match=r"model\.hidden: 16 there, 32 here"):
        train(*make_problem(), cfg, tmp_path, resume=True, context={"model": {"hidden": 32}})
    # unless the caller names the key as one that leaves the stream of updates as it is
    wider = {"model": {"hidden": 32}}
    train(
        *make_problem(),
        cfg,
        tmp_path,
        resume=True,
        context=wider,
        resumable_context=["model.hidden"],
    )
    assert json.loads((tmp_path / "config.json").read_text())["model"] == {"hidden": 32}
    with pytest.raises(ValueError, match="must not have a 'train' section"):
        train(*make_problem(), cfg, tmp_path / "other", context={"train": {}})


def test_micro_batches_must_split_evenly_over_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")  # checked before any process group is joined
    with pytest.raises(
        ConfigError, match="batch_size 8 in micro-batches of 2 does not split over 3"
    ):
        train(*make_problem(), config(batch_size=8, micro_batch_size=2), tmp_path)
    with pytest.raises(ConfigError, match=r"batch_size 8 .* does not split over 3 processes"):
        train(*make_problem(), config(batch_size=8), tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_without_micro_batch_size_each_process_takes_its_share():
    assert config(batch_size=512).micro_size(world_size=4) == 128
    assert config(batch_size=512, micro_batch_size=64).micro_size(world_size=4) == 64


@pytest.mark.slow  # 15-30 s: inductor compiles C++ kernels on the CPU
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_model_trains_like_the_eager_one(tmp_path):
    results = {}
    for compile_ in (False, True):
        model, objective, source = make_problem(dtype=torch.float64)
        cfg = config(steps=20, compile=compile_, checkpoint_every=20, log_every=20)
        result = train(model, objective, source, cfg, tmp_path / str(compile_))
        results[compile_] = (model, result.loss)
    (eager, eager_loss), (compiled, compiled_loss) = results[False], results[True]
    # float64: fused kernels change the rounding of a few operations (~1e-16), which 20 Adam
    # steps amplify by far less than 1e-9.
    for a, b in zip(eager.parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-9)
