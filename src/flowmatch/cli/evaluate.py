"""Printing the report of ``flowmatch eval`` (see ``flowmatch.app.evaluation.evaluate_run``)."""

from __future__ import annotations


def print_report(report: dict) -> None:
    rows = report["quality"]
    print(
        f"{report['run']} at step {report['step']}, {report['sampler']}: "
        f"{rows[0]['n']} samples per metric"
    )
    if report["metric"] == "energy":
        print(f"against: {rows[0]['reference']}")
        print(
            f"{'steps':>6} {'NFE':>5} {'energy':>10} {'(noise)':>10} {'W2':>8} {'(noise)':>8} "
            f"{'MMD':>9} {'(noise)':>9}"
        )
        for r in rows:
            steps = "-" if r["steps"] is None else r["steps"]
            w2 = "-" if r["w2"] is None else f"{r['w2']:.4f}"
            w2_noise = "-" if r["w2_noise"] is None else f"{r['w2_noise']:.4f}"
            print(
                f"{steps:>6} {r['nfe']:>5} {r['energy']:>10.5f} {r['energy_noise']:>10.5f} "
                f"{w2:>8} {w2_noise:>8} {r['mmd']:>9.5f} {r['mmd_noise']:>9.5f}"
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
    if "per_context" in report:
        print(f"per context (exact std {report['per_context'][0]['exact_std']:.3f}):")
        print(
            f"{'context':>16} {'steps':>6} {'|mean err|':>10} {'std':>7} {'W2':>8} {'(noise)':>8}"
        )
        for r in report["per_context"]:
            context = ",".join(f"{c:g}" for c in r["context"])
            steps = "-" if r["steps"] is None else r["steps"]
            print(
                f"{context:>16} {steps:>6} {r['mean_error']:>10.4f} {r['std']:>7.3f} "
                f"{r['w2']:>8.4f} {r['w2_noise']:>8.4f}"
            )
    for r in report.get("teacher_euler", []):
        if report["metric"] == "energy":
            value = f"energy {r['energy']:.5f}, MMD {r['mmd']:.5f}"
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
