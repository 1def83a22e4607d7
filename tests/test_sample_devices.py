"""`sample` and `eval` on a chosen device in chunks of a chosen size."""

import json

import numpy as np
import pytest
import torch

from flowmatch.app.evaluation import Placement, generate, likelihood
from flowmatch.app.runs import load_run
from flowmatch.cli.main import main
from flowmatch.data import TOY_DATASETS

TINY = [
    "model.hidden=32",
    "model.depth=2",
    "train.batch_size=32",
    "train.log_every=5",
    "eval.nll_samples=48",
]
# float32 sums of O(1) terms in another order: measured up to 2.4e-7 (2 ulp at |x| ~ 2.8)
ROUNDING = 1e-6


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A velocity run and a flow-map run, a few steps each (the weights need not be good)."""
    root = tmp_path_factory.mktemp("runs")
    for preset in ("gmm", "gmm-flowmap"):
        argv = ["train", "--preset", preset, "--out", str(root / preset), "--max-steps", "5"]
        assert main([*argv, *TINY]) == 0
    return root


@pytest.mark.parametrize(("preset", "method"), [("gmm", "euler"), ("gmm-flowmap", "flow_map")])
def test_chunked_generation_equals_one_batch(runs, preset, method):
    run = load_run(runs / preset)
    whole = generate(run, 50, method=method, steps=3, seed=4, return_trajectory=True)
    for size in (10, 7):
        chunked = generate(
            run,
            50,
            method=method,
            steps=3,
            seed=4,
            return_trajectory=True,
            placement=Placement(batch_size=size),
        )
        assert chunked.nfe == whole.nfe == 3
        assert chunked.trajectory is not None and whole.trajectory is not None
        assert chunked.trajectory.shape == (4, 50, 2)
        # The same draws: equal up to the last bits, which the CPU's matrix kernels may sum
        # in another order for another number of rows (on some CPUs for chunks of 10 too);
        # other noise would move the points by O(1).
        assert torch.allclose(chunked.trajectory, whole.trajectory, rtol=0.0, atol=ROUNDING)
        assert torch.equal(chunked.x, chunked.trajectory[-1])


def test_chunked_likelihood_matches_one_batch(runs):
    run = load_run(runs / "gmm-flowmap")
    target = TOY_DATASETS["gmm"]()
    whole = likelihood(run, target, 40, seed=1, jumps=2)
    chunked = likelihood(run, target, 40, seed=1, jumps=2, placement=Placement(batch_size=16))
    assert chunked.n == 40 and chunked.nfe == whole.nfe
    assert chunked.nll == pytest.approx(whole.nll, rel=1e-6)
    assert chunked.nll_stderr == pytest.approx(whole.nll_stderr, rel=1e-5)
    # dopri5 adapts its steps to each chunk: equal to the solver's tolerance, not bit for bit.
    ode_whole = likelihood(run, target, 40, seed=1)
    ode_chunked = likelihood(run, target, 40, seed=1, placement=Placement(batch_size=16))
    assert ode_chunked.nll == pytest.approx(ode_whole.nll, abs=1e-3)


def test_cli_sample_and_eval_take_device_and_batch_size(runs, tmp_path, capsys):
    run_dir = runs / "gmm"
    one, chunked = tmp_path / "one.npz", tmp_path / "chunked.npz"
    base = ["sample", str(run_dir), "--n", "30", "--solver", "rk4", "--steps", "2"]
    assert main([*base, "--out", str(one)]) == 0
    assert main([*base, "--out", str(chunked), "--device", "cpu", "--batch-size", "4"]) == 0
    assert np.allclose(np.load(one)["samples"], np.load(chunked)["samples"], rtol=0, atol=ROUNDING)
    capsys.readouterr()
    argv = [
        "eval",
        str(run_dir),
        "--n",
        "40",
        "--solver",
        "rk4",
        "--steps",
        "2",
        "--batch-size",
        "16",
        "--json",
    ]
    assert main([*argv, "--device", "auto"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["quality"][0]["n"] == 40 and report["likelihood"]["n"] == 48


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--device", "tpu:x"], "device must be auto, cpu, cuda"),
        (["--device", f"cuda:{torch.cuda.device_count()}"], "cuda:"),
    ],
)
@pytest.mark.parametrize("command", ["sample", "eval"])
def test_bad_device_or_batch_size_is_one_line_before_any_work(
    runs, tmp_path, command, flags, message, capsys
):
    out = tmp_path / "never.npz"
    extra = ["--out", str(out)] if command == "sample" else []
    before = sorted(p.name for p in (runs / "gmm").iterdir())
    assert main([command, str(runs / "gmm"), *extra, *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and sorted(p.name for p in (runs / "gmm").iterdir()) == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_generation_on_cuda_matches_the_cpu(runs):
    run = load_run(runs / "gmm-flowmap")
    cpu = generate(run, 64, steps=2, seed=3)
    cuda = generate(run, 64, steps=2, seed=3, placement=Placement(torch.device("cuda"), 16))
    assert cuda.x.device.type == "cpu"
    assert torch.allclose(cuda.x, cpu.x, atol=1e-5)
    nll = likelihood(run, TOY_DATASETS["gmm"](), 32, placement=Placement(torch.device("cuda"), 8))
    assert np.isfinite(nll.nll)
