"""`sample` / `eval` with the stochastic samplers: Euler-Maruyama (--diffusion,
--diffusion-schedule) and re-noised flow-map jumps (--gamma), wired to the run's path."""

import json

import numpy as np
import pytest
import torch

from flowmatch.app.config import SamplerNoise
from flowmatch.app.evaluation import generate
from flowmatch.app.runs import load_run
from flowmatch.cli.main import main
from flowmatch.solvers import VanishingDiffusion, integrate

TINY = ["model.hidden=32", "model.depth=2", "train.batch_size=64", "train.log_every=10"]


@pytest.fixture(scope="module")
def velocity_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "gmm"
    assert main(["train", "--preset", "gmm", "--out", str(out), "--max-steps", "20", *TINY]) == 0
    return out


@pytest.fixture(scope="module")
def flow_map_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "gmm-flowmap"
    argv = ["train", "--preset", "gmm-flowmap", "--out", str(out), "--max-steps", "20", *TINY]
    assert main(argv) == 0
    return out


def _samples(run_dir, tmp_path, name, *flags):
    out = tmp_path / f"{name}.npz"
    argv = ["sample", str(run_dir), "--n", "64", "--steps", "4", "--out", str(out), *flags]
    assert main(argv) == 0
    return np.load(out)["samples"]


def test_euler_maruyama_through_sample(velocity_run, tmp_path, capsys):
    euler = _samples(velocity_run, tmp_path, "euler", "--solver", "euler")
    em = ["--solver", "euler_maruyama"]
    # diffusion 0 is exactly Euler; the default (vanishing, scale 1) draws noise, from --seed.
    assert np.array_equal(_samples(velocity_run, tmp_path, "zero", *em, "--diffusion", "0"), euler)
    noisy = _samples(velocity_run, tmp_path, "noisy", *em)
    assert not np.allclose(noisy, euler, atol=1e-3)
    assert np.array_equal(_samples(velocity_run, tmp_path, "again", *em), noisy)
    other_seed = _samples(velocity_run, tmp_path, "seed", *em, "--seed", "1")
    assert not np.allclose(other_seed, noisy, atol=1e-3)
    assert "4 NFE" in capsys.readouterr().out
    # The same draw as the library's sampler on the run's schedule, noise after the source.
    run = load_run(velocity_run)
    generator = torch.Generator().manual_seed(0)
    x0 = run.source(64, generator)
    expected = integrate(
        run.velocity(),
        x0,
        "euler_maruyama",
        steps=4,
        schedule=run.path.schedule,
        diffusion=VanishingDiffusion(1.0),
        generator=generator,
    )
    with torch.inference_mode():
        assert torch.equal(torch.as_tensor(noisy), expected.x)


def test_eval_rows_of_euler_maruyama(velocity_run, capsys):
    argv = ["eval", str(velocity_run), "--solver", "euler_maruyama", "--steps", "1,3"]
    argv += ["--diffusion", "0.5", "--diffusion-schedule", "constant", "--n", "100", "--no-nll"]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "euler_maruyama"
    assert report["sampler"] == "euler_maruyama-constant0.5"
    assert report["noise"] == {"diffusion": 0.5, "diffusion_schedule": "constant", "gamma": None}
    assert [(r["steps"], r["nfe"]) for r in report["quality"]] == [(1, 1), (3, 3)]
    assert (velocity_run / "eval-euler_maruyama-constant0.5-1-3.json").is_file()


def test_gamma_jumps_through_sample_and_eval(flow_map_run, tmp_path, capsys):
    jumps = _samples(flow_map_run, tmp_path, "jumps")
    assert np.array_equal(_samples(flow_map_run, tmp_path, "g0", "--gamma", "0"), jumps)
    renoised = _samples(flow_map_run, tmp_path, "g1", "--gamma", "0.7")
    assert not np.allclose(renoised, jumps, atol=1e-3)
    run = load_run(flow_map_run)
    generator = torch.Generator().manual_seed(0)
    x0 = run.source(64, generator)
    with torch.inference_mode():
        expected = integrate(
            run.model,
            x0,
            "flow_map",
            steps=4,
            schedule=run.path.schedule,
            gamma=0.7,
            generator=generator,
        )
        assert torch.equal(torch.as_tensor(renoised), expected.x)
    capsys.readouterr()
    argv = ["eval", str(flow_map_run), "--steps", "1,2", "--gamma", "0.5", "--n", "100"]
    assert main([*argv, "--no-nll", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sampler"] == "flow_map-gamma0.5"
    assert [r["nfe"] for r in report["quality"]] == [1, 2]
    assert (flow_map_run / "eval-flow_map-gamma0.5-1-2.json").is_file()


def test_generate_takes_the_noise(flow_map_run):
    run = load_run(flow_map_run)
    noise = SamplerNoise(gamma=1.0)
    a = generate(run, 32, steps=3, seed=2, noise=noise).x
    assert torch.equal(a, generate(run, 32, steps=3, seed=2, noise=noise).x)
    assert not torch.allclose(a, generate(run, 32, steps=3, seed=2).x, atol=1e-3)


def test_a_consistency_model_re_noises_between_its_jumps_unless_told(tmp_path, capsys):
    # sCT trains only the jumps to the data end: its default sampler is gamma = 1 (Song et al.
    # 2023, Algorithm 1), the same draw as --gamma 1; --gamma 0 chains the untrained X_{s,t<1}.
    out = tmp_path / "sct"
    argv = ["train", "--preset", "gmm-flowmap", "--out", str(out), "--max-steps", "5", *TINY]
    assert main([*argv, "objective=sct", "objective.both_orders=false"]) == 0
    default = _samples(out, tmp_path, "default")
    assert np.array_equal(_samples(out, tmp_path, "g1", "--gamma", "1"), default)
    assert not np.allclose(_samples(out, tmp_path, "g0", "--gamma", "0"), default, atol=1e-3)
    capsys.readouterr()
    assert main(["eval", str(out), "--steps", "1,2", "--n", "50", "--no-nll", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sampler"] == "flow_map-gamma1.0" and report["noise"]["gamma"] == 1.0
    assert (out / "eval-flow_map-gamma1.0-1-2.json").is_file()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--solver", "euler", "--diffusion", "1"], "--diffusion applies to --solver"),
        (["--solver", "rk4", "--diffusion-schedule", "constant"], "--diffusion-schedule applies"),
        (["--solver", "euler_maruyama", "--diffusion", "-1"], "finite number >= 0"),
        (["--solver", "euler_maruyama", "--diffusion", "nan"], "finite number >= 0"),
        (["--solver", "euler", "--gamma", "0.5"], "--gamma applies to --solver flow_map"),
        (["--solver", "flow_map", "--gamma", "0.5"], "needs a flow-map run"),
    ],
)
@pytest.mark.parametrize("command", ["sample", "eval"])
def test_bad_noise_flags_are_one_line_errors(velocity_run, command, flags, message, capsys):
    before = sorted(p.name for p in velocity_run.iterdir())
    assert main([command, str(velocity_run), "--n", "50", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in velocity_run.iterdir()) == before


@pytest.mark.parametrize("gamma", ["-0.1", "1.5"])
def test_gamma_out_of_range(flow_map_run, gamma, capsys):
    assert main(["sample", str(flow_map_run), "--n", "8", "--gamma", gamma]) == 2
    assert "--gamma must lie in [0, 1]" in capsys.readouterr().err


def test_config_solvers_stay_deterministic():
    from flowmatch.app.config import EvalConfig
    from flowmatch.training.config import ConfigError

    with pytest.raises(ConfigError, match="solver must be one of"):
        EvalConfig(solver="euler_maruyama")
