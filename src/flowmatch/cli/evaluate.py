"""``flowmatch eval``: sample quality against the number of steps, and the likelihood.

2-D runs: energy distance and W2 against fresh target samples (each with its noise level) and
the NLL beside the exact value where the target has a density. Image runs: Frechet distance,
KID and precision/recall in the features of the dataset's shipped classifier against the test
split, and bits/dim by the Hutchinson ODE likelihood on a fixed test subset.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import asdict

from flowmatch import plotting
from flowmatch.data import ImageDataset, load_image_set
from flowmatch.evaluation import (
    bits_per_dim_of_run,
    default_method,
    image_quality,
    likelihood,
    sample_quality,
)
from flowmatch.runs import Run, build_data, load_run


def _quality_rows(
    run: Run, method: str, counts: list, measure: Callable[[Run, str, int | None], dict]
) -> dict:
    """``quality`` rows of ``run`` at each step count; for a distilled flow map, also the
    ``teacher_euler`` rows: the teacher's Euler solver at the same NFE."""
    report = {"quality": [measure(run, method, s) for s in counts]}
    if method == "flow_map" and run.config.objective.teacher is not None:
        teacher = load_run(run.config.objective.teacher)
        report["teacher_euler"] = [measure(teacher, "euler", s) for s in counts]
    return report


def _vector_report(run: Run, args: argparse.Namespace, method: str, counts: list) -> dict:
    data = build_data(run.config)
    if data.target is None:
        raise ValueError(
            f"flowmatch eval measures 2-D toy runs and image runs; {run.config.data.name!r} "
            "has no target to compare with"
        )
    n = args.n or run.config.eval.samples

    def measure(of: Run, how: str, steps: int | None) -> dict:
        return asdict(sample_quality(of, data.target, how, steps, n, args.seed))

    report: dict = {"metric": "energy", **_quality_rows(run, method, counts, measure)}
    if not args.no_nll:
        n_nll = run.config.eval.nll_samples
        report["likelihood"] = asdict(likelihood(run, data.target, n_nll, args.seed))
        if run.is_flow_map and run.config.objective.both_orders:
            report["flow_map_likelihood"] = [
                {"jumps": k, **asdict(likelihood(run, data.target, n_nll, args.seed, jumps=k))}
                for k in (1, 4)
            ]
    return report


def _image_report(run: Run, args: argparse.Namespace, method: str, counts: list) -> dict:
    cfg = run.config.data
    test = load_image_set(cfg.name, cfg.path, "test")
    n = args.n or run.config.eval.samples

    def measure(of: Run, how: str, steps: int | None) -> dict:
        return asdict(
            image_quality(
                of, test.images, how, steps, n, args.seed, args.guidance, args.inception_weights
            )
        )

    report: dict = {"metric": "frechet_distance", **_quality_rows(run, method, counts, measure)}
    if not args.no_nll:
        bpd = bits_per_dim_of_run(run, ImageDataset(test), run.config.eval.nll_samples, args.seed)
        report["bits_per_dim"] = asdict(bpd)
    return report


def eval_command(args: argparse.Namespace) -> None:
    run = load_run(args.run_dir)
    method = args.solver or default_method(run)
    counts = [None] if method == "dopri5" else (args.steps or [run.config.eval.steps or 16])
    images = len(run.spec.shape) == 3
    build = _image_report if images else _vector_report
    report = {"run": str(run.run_dir), "step": run.step, "method": method}
    report.update(build(run, args, method, counts))
    name = f"eval-{method}" + (f"-{'-'.join(map(str, args.steps))}" if args.steps else "")
    (run.run_dir / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    rows, metric = report["quality"], report["metric"]
    if len(rows) > 1:
        noise = rows[0].get("energy_noise")
        curves = {method: {r["steps"]: r[metric] for r in rows}}
        if "teacher_euler" in report:
            curves["teacher euler"] = {r["steps"]: r[metric] for r in report["teacher_euler"]}
        plotting.plot_quality_vs_steps(
            curves,
            run.run_dir / f"{name}.png",
            metric_name=metric.replace("_", " "),
            noise_level=noise,
        )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)


def print_report(report: dict) -> None:
    rows = report["quality"]
    print(f"{report['run']} at step {report['step']}: {rows[0]['n']} samples per metric")
    if report["metric"] == "energy":
        print(f"{'steps':>6} {'NFE':>5} {'energy':>10} {'(noise)':>10} {'W2':>8} {'(noise)':>8}")
        for r in rows:
            steps = "-" if r["steps"] is None else r["steps"]
            print(
                f"{steps:>6} {r['nfe']:>5} {r['energy']:>10.5f} {r['energy_noise']:>10.5f} "
                f"{r['w2']:>8.4f} {r['w2_noise']:>8.4f}"
            )
    else:
        print(f"features: {rows[0]['extractor']}")
        print(f"{'steps':>6} {'NFE':>5} {'FD':>9} {'KID':>9} {'prec':>6} {'recall':>6}")
        for r in rows:
            steps = "-" if r["steps"] is None else r["steps"]
            print(
                f"{steps:>6} {r['nfe']:>5} {r['frechet_distance']:>9.3f} {r['kid']:>9.4f} "
                f"{r['precision']:>6.3f} {r['recall']:>6.3f}"
            )
    for r in report.get("teacher_euler", []):
        if report["metric"] == "energy":
            value = f"energy {r['energy']:.5f}, W2 {r['w2']:.4f}"
        else:
            value = f"FD {r['frechet_distance']:.3f}"
        print(f"teacher euler {r['steps']:>3} steps: {value}")
    if "likelihood" in report:
        lik = report["likelihood"]
        exact = "" if lik["exact_nll"] is None else f", exact {lik['exact_nll']:.4f}"
        print(
            f"NLL {lik['nll']:.4f} +- {lik['nll_stderr']:.4f} nats ({lik['nfe']} NFE, "
            f"{lik['n']} samples{exact})"
        )
    for lik in report.get("flow_map_likelihood", []):
        print(f"NLL through {lik['jumps']} flow-map jump(s): {lik['nll']:.4f} nats")
    if "bits_per_dim" in report:
        b = report["bits_per_dim"]
        print(
            f"bits/dim {b['bpd']:.4f} +- {b['bpd_stderr']:.4f} ({b['n']} test images, "
            f"Hutchinson, {b['nfe']} NFE)"
        )
