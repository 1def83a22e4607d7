"""``flowmatch eval``: sample quality against the number of steps, and the likelihood."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from flowmatch import plotting
from flowmatch.evaluation import default_method, likelihood, sample_quality
from flowmatch.runs import build_data, load_run


def eval_command(args: argparse.Namespace) -> None:
    run = load_run(args.run_dir)
    method = args.solver or default_method(run)
    data = build_data(run.config)
    if data.target is None:
        raise ValueError(
            "flowmatch eval measures 2-D toy runs against their target distribution; "
            f"this run trains on {run.config.data.name!r}"
        )
    n = args.n or run.config.eval.samples
    step_counts = [None] if method == "dopri5" else (args.steps or [run.config.eval.steps or 16])
    rows = [sample_quality(run, data.target, method, s, n, args.seed) for s in step_counts]
    report: dict = {"run": str(run.run_dir), "step": run.step, "quality": [asdict(r) for r in rows]}
    if not args.no_nll:
        report["likelihood"] = asdict(
            likelihood(run, data.target, run.config.eval.nll_samples, args.seed)
        )
    name = f"eval-{method}" + (f"-{'-'.join(map(str, args.steps))}" if args.steps else "")
    (run.run_dir / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    if len(rows) > 1:
        plotting.plot_quality_vs_steps(
            {method: {r.steps: r.energy for r in rows}},
            run.run_dir / f"{name}.png",
            metric_name="energy distance",
            noise_level=rows[0].energy_noise,
        )
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{run.run_dir} at step {run.step}: {n} samples per metric, solver {method}")
    print(f"{'steps':>6} {'NFE':>5} {'energy':>10} {'(noise)':>10} {'W2':>8} {'(noise)':>8}")
    for r in rows:
        steps = "-" if r.steps is None else str(r.steps)
        print(
            f"{steps:>6} {r.nfe:>5} {r.energy:>10.5f} {r.energy_noise:>10.5f} "
            f"{r.w2:>8.4f} {r.w2_noise:>8.4f}"
        )
    if "likelihood" in report:
        lik = report["likelihood"]
        exact = "" if lik["exact_nll"] is None else f", exact {lik['exact_nll']:.4f}"
        print(
            f"NLL {lik['nll']:.4f} +- {lik['nll_stderr']:.4f} nats ({lik['nfe']} NFE, "
            f"{lik['n']} samples{exact})"
        )
