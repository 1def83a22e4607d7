"""The benchmark runner in ``--smoke`` mode, in this interpreter: it must run end to end, so the
suite cannot rot. Libraries missing here (torchcfm, flow_matching) must be reported as skipped."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


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
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from common import Spread, interleaved, paired_ratio
    finally:
        sys.path.remove(str(BENCHMARKS))
    assert paired_ratio([2.0, 3.0], [1.0, 2.0]).verdict() == ">1"
    assert paired_ratio([0.5, 0.9], [1.0, 1.0]).verdict() == "<1"
    assert Spread.of([0.9, 1.2, 1.1]).verdict() == "~1"
    order: list[str] = []
    interleaved({n: lambda r, n=n: order.append(n) or 1.0 for n in "ab"}, repeats=3)
    assert order == ["a", "b", "b", "a", "a", "b"]
