"""The command line end to end on a tiny 2-D run, and its one-line errors for bad input."""

import json
from functools import partial

import numpy as np
import pytest
import safetensors.torch
import torch

import flowmatch
from flowmatch.app.build import DataSpec, build_model
from flowmatch.app.presets import PRESETS, preset_config
from flowmatch.app.runs import load_run
from flowmatch.app.training import settle_config
from flowmatch.cli.main import main
from flowmatch.solvers import log_likelihood, sample

TINY = ["model.hidden=32", "model.depth=2", "train.batch_size=64", "train.log_every=10"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "gmm"
    # Overrides on both sides of the options.
    argv = ["train", TINY[0], "--preset", "gmm", "--out", str(out), "--max-steps", "30", *TINY[1:]]
    code = main(argv)
    assert code == 0
    return out


def test_presets_lists_every_preset(capsys):
    assert main(["presets"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in PRESETS)


def test_small_mnist_preset_builds_the_network_it_describes():
    config = preset_config("mnist-small")
    net = build_model(config, DataSpec((1, 28, 28), levels=256))
    assert sum(p.numel() for p in net.parameters()) == 177_505  # "178k" in its description
    assert "178k" in PRESETS["mnist-small"].description


def test_train_writes_a_run_folder(run_dir):
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.json", "meta.json", "metrics.jsonl", "spec.json", "loss.png"} <= names
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20, 30]
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["world_size"] == 1 and "torch" in meta["versions"]


def test_load_run_gives_a_velocity_for_sample_and_likelihood(run_dir):
    run = flowmatch.load_run(run_dir)
    assert run.step == 30 and not run.is_flow_map
    x = sample(run.velocity(), run.source(8), "euler", steps=4)
    assert x.shape == (8, 2) and torch.isfinite(x).all()
    res = log_likelihood(run.velocity(), x, method="rk4", steps=4)
    assert torch.isfinite(res.log_prob).all()


def test_sample_writes_npz_and_pictures(run_dir, capsys):
    out = run_dir / "s.npz"
    args = ["sample", str(run_dir), "--n", "100", "--solver", "rk4", "--steps", "3"]
    assert main([*args, "--out", str(out), "--trajectories"]) == 0
    arrays = np.load(out)
    assert arrays["samples"].shape == (100, 2) and arrays["trajectory"].shape == (4, 100, 2)
    assert out.with_suffix(".png").stat().st_size > 0
    assert (run_dir / "trajectories.png").stat().st_size > 0


def test_eval_reports_quality_per_step_count_and_nll(run_dir, capsys):
    args = ["eval", str(run_dir), "--solver", "euler", "--steps", "1,4", "--n", "200", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert [row["steps"] for row in report["quality"]] == [1, 4]
    assert all(row["energy_noise"] < 0.05 for row in report["quality"])
    lik = report["likelihood"]
    assert lik["exact_nll"] is not None and lik["nfe"] > 0
    assert (run_dir / "eval-euler-1-4.png").exists()


def test_export_writes_safetensors_that_match_the_ema(run_dir):
    assert main(["export", str(run_dir), "--out", str(run_dir / "export")]) == 0
    weights = safetensors.torch.load_file(str(run_dir / "export" / "model.safetensors"))
    model = load_run(run_dir).model
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--preset", "nope"], "unknown preset"),
        (["train", "--preset", "gmm", "model.hiden=3"], "valid keys"),
        (["train", "--preset", "gmm", "train.lr=fast"], "train.lr must be float"),
        (["train", "--preset", "gmm", "objective=magic"], "objective.name must be one of"),
        (
            ["train", "--preset", "gmm", "objective.time_derivative=fast"],
            "objective.time_derivative must be one of jvp, finite_difference (none: the default)",
        ),
        (["train", "--preset", "gmm", "data.name=array"], "data.path"),
    ],
)
def test_bad_config_is_a_one_line_error(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_existing_run_needs_resume_and_is_left_untouched(run_dir, capsys):
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    # Another data set into the same folder: refused before its spec.json is written.
    assert main(["train", "--preset", "digits", "--out", str(run_dir)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_init_from_starts_a_new_run_from_a_finished_runs_weights(run_dir, tmp_path, capsys):
    out = tmp_path / "more"
    argv = ["train", "--preset", "gmm", "--out", str(out), *TINY, f"model.init_from={run_dir}"]
    # Two steps of lr 1e-20 move no weight by more than 1e-19: they stay those it started from.
    constant = ["train.lr=1e-20", "train.lr_schedule=constant", "train.warmup_steps=0"]
    assert main([*argv, "--max-steps", "2", *constant]) == 0
    start, run = load_run(run_dir).model.state_dict(), load_run(out)
    for name, weight in run.model.state_dict().items():
        torch.testing.assert_close(weight, start[name], rtol=0, atol=1e-18)
    capsys.readouterr()
    assert main([*argv, "model.hidden=16", "--out", str(tmp_path / "wide")]) == 2
    err = capsys.readouterr().err
    assert "model.init_from" in err and "(32,) there, (16,) here" in err
    assert len(err.strip().splitlines()) == 1


def test_a_flow_map_started_from_a_velocity_run_starts_at_its_euler_step(run_dir, tmp_path):
    out = tmp_path / "map"
    argv = ["train", "--preset", "gmm", "--out", str(out), *TINY, f"model.init_from={run_dir}"]
    constant = ["train.lr=1e-20", "train.lr_schedule=constant", "train.warmup_steps=0"]
    assert main([*argv, "objective=shortcut", "--max-steps", "2", *constant]) == 0
    velocity, flow_map = load_run(run_dir), load_run(out)
    # the velocity run's time embedding (1000), not a flow map's default (1)
    assert flow_map.config.model.time_scale == velocity.config.model.time_scale == 1000.0
    x, s, t = torch.randn(64, 2), torch.rand(64), torch.rand(64)
    expected = x + (t - s)[:, None] * velocity.model(x, s)
    torch.testing.assert_close(flow_map.model(x, s, t), expected, rtol=1e-5, atol=1e-5)


def test_corrupt_or_foreign_checkpoints_are_one_line_errors(run_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("config.json", "spec.json"):
        (bad / name).write_text((run_dir / name).read_text())
    (bad / "checkpoints").mkdir()
    ckpt = sorted((run_dir / "checkpoints").iterdir())[-1]
    data = ckpt.read_bytes()
    (bad / "checkpoints" / ckpt.name).write_bytes(data[: len(data) // 2])  # truncated
    assert main(["sample", str(bad), "--n", "4"]) == 2
    err = capsys.readouterr().err
    assert "truncated or corrupt" in err and len(err.strip().splitlines()) == 1
    # A checkpoint of a network of another size: a foreign checkpoint for this run.
    other = tmp_path / "other"
    assert (
        main(
            [
                "train",
                "--preset",
                "gmm",
                "--out",
                str(other),
                "--max-steps",
                "10",
                *TINY,
                "model.hidden=16",
            ]
        )
        == 0
    )
    (bad / "checkpoints" / ckpt.name).write_bytes(
        sorted((other / "checkpoints").iterdir())[-1].read_bytes()
    )
    capsys.readouterr()
    assert main(["sample", str(bad), "--n", "4"]) == 2
    err = capsys.readouterr().err
    assert "another config" in err and len(err.strip().splitlines()) == 1
    assert main(["sample", str(tmp_path), "--n", "4"]) == 2  # not a run folder


def test_flow_map_run_samples_in_any_number_of_jumps(tmp_path, capsys):
    out = tmp_path / "fm"
    argv = ["train", "--preset", "gmm-flowmap", "--out", str(out), "--max-steps", "20", *TINY]
    assert main(argv) == 0
    run = load_run(out)
    assert run.is_flow_map
    x0 = run.source(16)
    assert torch.equal(run.model(x0, torch.zeros(16), torch.zeros(16)), x0)  # X(x, t, t) = x
    capsys.readouterr()
    assert main(["eval", str(out), "--steps", "1,2", "--n", "100", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "flow_map" and [r["nfe"] for r in report["quality"]] == [1, 2]
    # gmm-flowmap trains both time orders, so the few-step likelihood is reported too.
    assert [r["jumps"] for r in report["flow_map_likelihood"]] == [1, 4]


@pytest.mark.parametrize("objective", ["lmd", "reflow"])
def test_distill_from_a_teacher_run(run_dir, tmp_path, objective, capsys):
    out = tmp_path / objective
    extra = ["objective.reflow_pairs=256", "objective.teacher_solver=euler"]
    argv = ["distill", "--teacher", str(run_dir), "--objective", objective, "--out", str(out)]
    assert main([*argv, "--max-steps", "10", *extra]) == 0
    run = load_run(out)
    assert run.config.objective.teacher == str(run_dir)
    assert run.config.objective.warm_start  # distill starts from the teacher's weights
    assert run.is_flow_map == (objective == "lmd")
    if objective == "lmd":
        capsys.readouterr()
        assert main(["eval", str(out), "--steps", "1,2", "--n", "100", "--no-nll", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert [r["nfe"] for r in report["teacher_euler"]] == [1, 2]
    else:
        assert (out / "reflow-pairs.safetensors").exists()


def test_warm_start_without_a_teacher_is_a_one_line_error(tmp_path, capsys):
    argv = ["train", "--preset", "gmm-flowmap", "--out", str(tmp_path / "r")]
    assert main([*argv, "objective.warm_start=true"]) == 2
    err = capsys.readouterr().err
    assert "flowmatch distill" in err and len(err.strip().splitlines()) == 1


def test_user_array_trains_with_a_validation_loss(tmp_path):
    data = torch.randn(500, 3).numpy() * 2 + 1
    np.save(tmp_path / "data.npy", data)
    out = tmp_path / "arr"
    argv = ["train", "--preset", "gmm", "--out", str(out), "--max-steps", "20", *TINY]
    assert main([*argv, "data.name=array", f"data.path={tmp_path / 'data.npy'}"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["val_loss"] > 0 for r in records)
    assert load_run(out).spec.shape == (3,)


def test_wrong_array_shape_is_a_one_line_error(tmp_path, capsys):
    np.save(tmp_path / "flat.npy", np.arange(10.0))
    argv = ["train", "--preset", "gmm", "--out", str(tmp_path / "r")]
    assert main([*argv, "data.name=array", f"data.path={tmp_path / 'flat.npy'}"]) == 2
    err = capsys.readouterr().err
    assert "flat.npy" in err and len(err.strip().splitlines()) == 1


def test_conditional_digits_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "digits"
    tiny_unet = ["model.channels=8", "model.num_groups=4", "train.batch_size=16"]
    argv = ["train", "--preset", "digits", "--out", str(out), "--max-steps", "4", *tiny_unet]
    assert main([*argv, "data.conditional=true", "eval.nll_samples=4", "train.log_every=2"]) == 0
    run = load_run(out)
    assert run.spec.num_classes == 10 and run.spec.levels == 17
    args = ["sample", str(out), "--n", "20", "--solver", "euler", "--steps", "2"]
    assert main([*args, "--guidance", "2.0"]) == 0
    assert (out / "samples.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["eval", str(out), "--solver", "euler", "--steps", "2", "--n", "40", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    quality = report["quality"][0]
    assert quality["extractor"] == "lenet-digits" and quality["frechet_distance"] > 0
    bpd = report["bits_per_dim"]
    assert bpd["n"] == 4 and 0 < bpd["bpd"] < 50
    # A flow map distilled from it is evaluated beside the teacher's Euler steps.
    fm = tmp_path / "digits-lmd"
    argv = ["distill", "--teacher", str(out), "--objective", "lmd", "--out", str(fm)]
    assert (
        main([*argv, "--max-steps", "2", "train.batch_size=8", "objective.teacher_guidance=2"]) == 0
    )
    assert load_run(fm).config.objective.teacher_guidance == 2.0  # the guided teacher's flow
    capsys.readouterr()
    assert main(["eval", str(fm), "--steps", "1,2", "--n", "40", "--no-nll", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "flow_map"
    assert [r["nfe"] for r in report["teacher_euler"]] == [1, 2]
    assert all(r["frechet_distance"] > 0 for r in report["teacher_euler"])


def test_digits_flowmap_preset_is_the_run_the_few_step_table_measured():
    # BENCHMARKS.md's digits rows: the digits preset, objective=esd, --max-steps 1000.
    settle = partial(settle_config, config_file=None, resume=None)
    measured = settle(preset="digits", overrides=["objective=esd"], max_steps=1000)
    assert settle(preset="digits-flowmap", overrides=[], max_steps=None) == measured
