"""The benchmark runner in ``--smoke`` mode, in this interpreter: it must run end to end, so the
suite cannot rot. Libraries missing here (torchcfm, flow_matching) must be reported as skipped.
The MNIST workload's code path runs on synthetic 28x28 images: no MNIST files, no network."""

import dataclasses
import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from flowmatch.data.images import ImageData

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def bench(name: str) -> ModuleType:
    """A module of ``benchmarks/`` (they import their siblings by plain name)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "run.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out, {w: json.loads((out / f"{w}.json").read_text()) for w in ("checkerboard", "gmm")}


def test_smoke_writes_results_and_report(smoke_run):
    out, results = smoke_run
    report = (out / "report.md").read_text()
    for workload, res in results.items():
        assert f"## {workload}" in report
        assert (out / f"quality_{workload}_energy.png").stat().st_size > 0
        assert {"bare", "flowmatch"} <= set(res["sides"])
        for name in ("torchcfm", "flow_matching"):
            installed = importlib.util.find_spec(name) is not None
            assert (name in res["sides"]) == installed
            assert (name in res["skipped"]) != installed
            if not installed:
                assert f"**Skipped: {name}**" in report
    assert "likelihood" in results["gmm"] and "likelihood" not in results["checkerboard"]


def test_smoke_measurements_are_consistent(smoke_run):
    _, results = smoke_run
    res = results["gmm"]
    repeats = res["settings"]["repeats"]
    for entry in res["train"].values():
        for rates in entry["steps_per_s"].values():
            assert len(rates) == repeats and all(r > 0 for r in rates)
        # bare and flowmatch draw x0 then t from one seeded stream and regress the same CondOT
        # target x1 - x0 with the same network and optimiser, so they train identically (up to
        # float rounding of alpha x1 + sigma x0 against t x1 + (1 - t) x0).
        losses = entry["final_loss"]
        assert losses["flowmatch"] == pytest.approx(losses["bare"], rel=1e-4)
    # Euler with K steps costs exactly K evaluations of the network, on every side.
    for methods in res["quality"].values():
        for method, entry in methods.items():
            if method.startswith("euler-"):
                assert set(entry["nfe"]) == {int(method.split("-")[1])}
    # On the same test points a model's mean NLL exceeds the target's own by the KL divergence
    # plus noise; a 12-step smoke model is far (about 1 nat) from the target.
    lik = res["likelihood"]
    assert min(lik["nll"]["flowmatch"]["exact"]) > lik["exact_nll"] + 0.1


def test_spread_verdict_needs_every_repeat():
    common = bench("common")
    Spread, interleaved, paired_ratio = common.Spread, common.interleaved, common.paired_ratio
    assert paired_ratio([2.0, 3.0], [1.0, 2.0]).verdict() == ">1"
    assert paired_ratio([0.5, 0.9], [1.0, 1.0]).verdict() == "<1"
    assert Spread.of([0.9, 1.2, 1.1]).verdict() == "~1"
    order: list[str] = []
    interleaved({n: lambda r, n=n: order.append(n) or 1.0 for n in "ab"}, repeats=3)
    assert order == ["a", "b", "b", "a", "a", "b"]


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """Every section of ``run_workload`` on the MNIST workload built from synthetic images
    (``image_workload``: same U-Net, pixel map, held-out split and LeNet metrics as MNIST)."""
    run, measure, report = bench("run"), bench("measure"), bench("report")
    generator = torch.Generator().manual_seed(0)

    def images(n: int) -> ImageData:
        pixels = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=generator)
        return ImageData(images=pixels, labels=None, levels=256)

    workload = bench("workloads").image_workload(images(256), images(64), name="images")
    settings = dataclasses.replace(
        measure.SMOKE,
        steps=4,
        sampling_n=16,
        eval_n=16,
        euler_steps=(1, 2),
        flow_map_steps=(1,),
        memory_steps=1,
    )
    res = run.run_workload(workload, list(bench("sides").SIDES), settings, run.SECTIONS)
    out = tmp_path_factory.mktemp("bench-images")
    report.plot_quality(res, out)
    return res, report.markdown({"images": res}), out


def test_image_workload_runs_every_side_on_images(image_run):
    res, report, out = image_run
    assert res["metrics"] == {"fd": "FD (lenet-mnist)", "kid": "KID (lenet-mnist)"}
    assert {"loop", "ot", "likelihood"} <= set(res["not_measured"])
    assert not {"loop", "ot", "likelihood"} & set(res)
    for name in ("torchcfm", "flow_matching"):
        assert (name in res["sides"]) == (importlib.util.find_spec(name) is not None)
    losses = res["train"]["64"]["final_loss"]
    assert losses["flowmatch"] == pytest.approx(losses["bare"], rel=1e-3)  # same draws, as gmm
    for methods in (*res["quality"].values(), res["flow_maps"]["quality"]):
        for method, entry in methods.items():
            assert set(entry) == {"fd", "kid", "nfe"}
            if method.startswith(("euler-", "flow_map-")):
                assert set(entry["nfe"]) == {int(method.split("-")[1])}
    # Random pixels: two disjoint held-out sets agree far better than 4-step models' samples.
    assert res["metric_noise"]["fd"] < min(res["quality"]["flowmatch"]["euler-2"]["fd"])
    assert set(res["memory"]) == {"train@64", "sample@16"}
    assert "## images" in report and "Not measured: likelihood" in report
    assert "FD (lenet-mnist) / KID (lenet-mnist)" in report
    assert (out / "quality_images_fd.png").stat().st_size > 0


def test_mnist_without_files_names_the_fetch_command(tmp_path):
    env = {**os.environ, "FLOWMATCH_MNIST_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "run.py"), "--smoke", "--workload", "mnist"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert done.stderr.count("\n") == 1
    assert f"flowmatch data fetch mnist --dir {tmp_path}" in done.stderr


def test_settings_on_the_command_line():
    run = bench("run")
    assert run.setting("euler_steps=1,4") == ("euler_steps", (1, 4))
    assert run.setting("batch_sizes=64") == ("batch_sizes", (64,))
    assert run.setting("tolerance=1e-3") == ("tolerance", 1e-3)
    assert run.setting("memory_in_fresh_process=false") == ("memory_in_fresh_process", False)


def _script(name: str, *args: str, tmp_path: Path) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCHMARKS), *sys.path])}
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_few_step_table_and_ot_quality_run_end_to_end(tmp_path):
    costs = tmp_path / "costs.txt"
    # LSD's default time derivative is a finite difference: its row is lsd:fd, not lsd (the JVP)
    rows = "| lsd | 4.00 [3-5] | 9 |\n| lsd:fd | 2.00 [1-3] | 9 |\n"
    costs.write_text("| objective | step time / fm's | peak RSS |\n" + rows)
    out = tmp_path / "few.json"
    args = ["--presets", "checkerboard", "--steps", "6", "--objectives", "lsd", "--costs"]
    table = _script("few_step_table.py", *args, str(costs), "--out", str(out), tmp_path=tmp_path)
    rows = json.loads(out.read_text())["checkerboard"][0]
    assert set(rows) == {"fm (Euler)", "fm exact-OT (Euler)", "lsd, equal steps (6)",
                         "lsd, equal time (3)"}  # fmt: skip
    assert all(set(cells) == {"1", "2", "4", "8"} for cells in rows.values())
    assert "| lsd, equal time (3) |" in table
    spec, out = "psd-mid:objective.diagonal_fraction=0.5", tmp_path / "spec.json"
    args = ["--presets", "checkerboard", "--steps", "6", "--objectives", spec, "--no-baselines"]
    _script("few_step_table.py", *args, "--out", str(out), tmp_path=tmp_path)
    rows = json.loads(out.read_text())["checkerboard"][0]
    assert set(rows) == {f"{spec}, equal steps (6)"}
    out = tmp_path / "distilled.json"
    args = ["--presets", "checkerboard", "--steps", "6", "--objectives", "scd", "--no-baselines"]
    args += ["--teacher-overrides", "model.time_scale=1", "--out", str(out)]
    _script("few_step_table.py", *args, tmp_path=tmp_path)
    rows = json.loads(out.read_text())["checkerboard"][0]
    assert set(rows) == {"scd, teacher 3 + 3, teacher model.time_scale=1"}
    args = ["--steps", "6", "--seeds", "0", "--presets", "checkerboard", "--block-sizes", "64"]
    quality = _script("ot_quality.py", *args, "--variants", "sorted block 64", tmp_path=tmp_path)
    assert "sorted block 64:" in quality
