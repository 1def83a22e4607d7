"""The time embedding's scale of each kind of run, TVM's target rate, the time derivative of
each objective, MeanFlow's adaptive weight.

Flow maps default to ``model.time_scale=1`` and the MeanFlow family to an unweighted loss
(``objective.adaptive_power=0``): docs/flow-maps.md has the measurements behind both.
"""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from flowmatch.app.build import build_objective
from flowmatch.app.objectives import time_derivative_of
from flowmatch.app.presets import preset_config
from flowmatch.app.runs import load_run, read_config
from flowmatch.cli.main import main
from flowmatch.losses import FusedLSDObjective, SelfDistillationObjective
from flowmatch.losses.flow_maps import adaptively_weighted
from flowmatch.training import latest_checkpoint, load_checkpoint

TINY = ["model.hidden=16", "model.depth=2", "train.batch_size=32", "train.log_every=5"]


def _train(out: Path, *extra: str) -> None:
    argv = ["train", "--preset", "gmm", "--out", str(out), "--max-steps", "4", *TINY, *extra]
    assert main(argv) == 0


def _recorded(run: Path) -> float:
    return json.loads((run / "config.json").read_text())["model"]["time_scale"]


def _embedding_scale(run: Path) -> float:
    model = load_run(run).model
    return next(m.scale for m in model.modules() if hasattr(m, "max_period"))


def test_each_run_records_the_time_scale_its_network_was_built_with(tmp_path):
    _train(tmp_path / "velocity")
    _train(tmp_path / "map", "objective=lsd")
    _train(tmp_path / "tvm", "objective=tvm")
    _train(tmp_path / "chosen", "objective=lsd", "model.time_scale=10")
    argv = ["distill", "--teacher", str(tmp_path / "velocity"), "--objective", "lmd"]
    assert main([*argv, "--out", str(tmp_path / "student"), "--max-steps", "2"]) == 0
    expected = {"velocity": 1000.0, "map": 1.0, "tvm": 1000.0, "chosen": 10.0, "student": 1000.0}
    for name, scale in expected.items():
        assert _recorded(tmp_path / name) == scale, name
        assert _embedding_scale(tmp_path / name) == scale, name


def test_a_run_written_before_the_key_reads_as_scale_1000(tmp_path):
    _train(tmp_path / "map", "objective=lsd")
    config_file = tmp_path / "map" / "config.json"
    record = json.loads(config_file.read_text())
    del record["model"]["time_scale"]
    config_file.write_text(json.dumps(record))
    assert read_config(tmp_path / "map").model.time_scale == 1000.0


def test_tvm_runs_record_their_target_rate_and_earlier_ones_read_as_the_current_parameters(
    tmp_path,
):
    _train(tmp_path / "ema", "objective=tvm")
    _train(tmp_path / "plain", "objective=tvm", "objective.target_ema=0")
    for name, rate in (("ema", 0.99), ("plain", 0.0)):
        assert (
            json.loads((tmp_path / name / "config.json").read_text())["objective"]["target_ema"]
            == rate
        )
    state = load_checkpoint(latest_checkpoint(tmp_path / "ema")).objective
    assert "target.step" in state  # the EMA copy is objective state
    assert "target.step" not in load_checkpoint(latest_checkpoint(tmp_path / "plain")).objective
    config_file = tmp_path / "plain" / "config.json"
    record = json.loads(config_file.read_text())
    del record["objective"]["target_ema"]  # written before the key: TVM used its parameters
    config_file.write_text(json.dumps(record))
    assert read_config(tmp_path / "plain").objective.target_ema == 0.0


def test_runs_record_their_time_derivative_and_earlier_ones_read_as_the_jvp(tmp_path):
    # LSD takes finite differences unless told otherwise or under bf16; the rest the JVP.
    _train(tmp_path / "lsd", "objective=lsd")
    _train(tmp_path / "bf16", "objective=lsd", "train.precision=bf16")
    _train(tmp_path / "chosen", "objective=lsd", "objective.time_derivative=jvp")
    _train(tmp_path / "meanflow", "objective=meanflow")
    expected = {"lsd": "finite_difference", "bf16": "jvp", "chosen": "jvp", "meanflow": "jvp"}
    for name, method in expected.items():
        config = read_config(tmp_path / name)
        assert config.objective.time_derivative == method, name
        if name != "meanflow":  # the objective built from the record takes it
            assert build_objective(config).distill.keywords["method"] == method, name
    # On an MLP, LSD's finite difference and its diagonal take one network call; not on a U-Net.
    config = read_config(tmp_path / "lsd")
    assert isinstance(build_objective(config), FusedLSDObjective)
    digits = preset_config("digits")
    unet = replace(digits, objective=replace(digits.objective, name="lsd"))
    assert unet.model.kind == "unet" and time_derivative_of(unet) == "finite_difference"
    assert type(build_objective(unet)) is SelfDistillationObjective
    config_file = tmp_path / "chosen" / "config.json"
    record = json.loads(config_file.read_text())
    del record["objective"]["time_derivative"]  # written before the key: every run took JVPs
    config_file.write_text(json.dumps(record))
    assert read_config(tmp_path / "chosen").objective.time_derivative == "jvp"


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_a_bad_time_scale_is_one_line(tmp_path, capsys, value):
    argv = ["train", "--preset", "gmm", "--out", str(tmp_path / "r"), f"model.time_scale={value}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "time_scale" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_the_power_one_weight_regresses_the_geometric_median_not_the_mean():
    # V: 90 % of the mass at 0, 10 % at 10. A constant c minimising the weighted loss is the
    # mean (1.0) at power 0 and the median (0) at power 1, MeanFlow's weight: the flow-matching
    # velocity, a conditional mean, is then biased.
    targets = torch.cat([torch.zeros(900, 1), torch.full((100, 1), 10.0)])
    found = {}
    for power in (0.0, 1.0):
        c = torch.zeros(1, requires_grad=True)
        optimiser = torch.optim.Adam([c], lr=0.05)
        for _ in range(800):
            loss = adaptively_weighted(((c - targets) ** 2).mean(1), power, 1e-3).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        found[power] = float(c.detach())
    assert abs(found[0.0] - 1.0) < 0.05
    assert abs(found[1.0]) < 0.1


@pytest.mark.parametrize("name", ["meanflow", "imf", "tvm", "sct"])
def test_objectives_with_a_time_derivative_take_the_configured_one(name):
    config = preset_config("checkerboard-flowmap")
    for method in ("jvp", "finite_difference"):
        objective = replace(config.objective, name=name, time_derivative=method)
        assert build_objective(replace(config, objective=objective)).time_derivative == method
