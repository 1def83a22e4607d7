"""Turn a run's raw repeats into Markdown ratio tables and quality-against-NFE plots.

Every timed figure is a paired ratio (repeat ``r`` of one side over repeat ``r`` of another, run
next to each other in time) shown as ``median [min-max]`` with a verdict: ``>1`` or ``<1`` only
when every repeat agrees, ``~1`` when the spread does not support either claim.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from flowmatch.plotting import plot_quality_vs_steps

from common import Spread, paired_ratio

REFERENCE = "flowmatch"
FLOOR = "bare"


def fmt(spread: Spread, digits: int = 2) -> str:
    return f"{spread.median:.{digits}f} [{spread.low:.{digits}f}-{spread.high:.{digits}f}]"


def fmt_ratio(spread: Spread) -> str:
    return f"{fmt(spread)} {spread.verdict()}"


def rate_table(rates: dict[str, list[float]], unit: str) -> list[str]:
    """Rows: each side against the bare floor and flowmatch against it, with the context rate."""
    header = f"| side | median {unit} (context) | side / bare | flowmatch / side |"
    lines = [header, "|---|---|---|---|"]
    for name, values in rates.items():
        floor = fmt_ratio(paired_ratio(values, rates[FLOOR])) if FLOOR in rates else "-"
        ours = (
            fmt_ratio(paired_ratio(rates[REFERENCE], values))
            if REFERENCE in rates and name != REFERENCE
            else "-"
        )
        lines.append(f"| {name} | {statistics.median(values):.1f} | {floor} | {ours} |")
    return lines


def metric_cell(entry: dict[str, list[float]], labels: dict[str, str]) -> str:
    """``m1 / m2 (NFE)``: the medians over repeats of the metrics in ``labels`` and the NFE."""
    values = " / ".join(f"{statistics.median(entry[key]):.4g}" for key in labels)
    return f"{values} ({statistics.median(entry['nfe']):g})"


def quality_table(
    quality: dict[str, dict], noise: dict[str, float] | None, labels: dict[str, str]
) -> list[str]:
    """Rows: solver settings; per side the median of each metric and the NFE spent; last, the
    metrics between two target sets (the noise level), if given."""
    names = list(quality)
    metric_names = " / ".join(labels.values())
    lines = [
        "| method | " + " | ".join(f"{n}: {metric_names} (NFE)" for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    methods = list(next(iter(quality.values())))
    for method in methods:
        cells = [metric_cell(quality[name][method], labels) for name in names]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if noise is not None:
        level = " / ".join(f"{noise[key]:.4g}" for key in labels)
        lines.append(f"| target vs target (noise level) | {level} |" + " |" * (len(names) - 1))
    return lines


def likelihood_lines(study: dict) -> list[str]:
    lines = [f"Time per {study['n']} samples on one shared network (dopri5, tol 1e-5):", ""]
    lines += ["| divergence | side | NFE | flowmatch / side (rate) |", "|---|---|---|---|"]
    for divergence, entry in study["rates"].items():
        rates = entry["samples_per_s"]
        for name in rates:
            ratio = (
                fmt_ratio(paired_ratio(rates[REFERENCE], rates[name]))
                if REFERENCE in rates and name != REFERENCE
                else "-"
            )
            lines.append(f"| {divergence} | {name} | {entry['nfe'][name]} | {ratio} |")
    lines += ["", f"NLL of each side's own networks; exact NLL {study['exact_nll']:.4f}:", ""]
    lines += ["| side | NLL (exact div.) | gap to exact | NLL (Hutchinson, 1 probe) |"]
    lines += ["|---|---|---|---|"]
    for name, entry in study["nll"].items():
        exact, hutch = Spread.of(entry["exact"]), Spread.of(entry["hutchinson"])
        gap = Spread.of([v - study["exact_nll"] for v in entry["exact"]])
        lines.append(f"| {name} | {fmt(exact, 4)} | {fmt(gap, 4)} | {fmt(hutch, 4)} |")
    return lines


def ot_lines(ot: dict, labels: dict[str, str]) -> list[str]:
    rates = ot["steps_per_s"]
    lines = [f"Batch {ot['batch']}. Steps/s ratios, paired by repeat:", ""]
    lines += ["| variant | / same library's independent | / torchcfm exact OT |", "|---|---|---|"]
    for label, values in rates.items():
        library = label.split("/")[0]
        indep = f"{library}/independent"
        own = fmt_ratio(paired_ratio(values, rates[indep])) if indep in rates else "-"
        ref = "torchcfm/exact_ot"
        cross = fmt_ratio(paired_ratio(values, rates[ref])) if ref in rates else "-"
        lines.append(f"| {label} | {own} | {cross} |")
    quality = ot["quality"]
    lines += ["", "Sample quality of each variant's networks (median over repeats):", ""]
    lines += quality_table(quality, None, labels)
    lines += ["", "Final training loss (median): " + ", ".join(
        f"{k} {statistics.median(v):.3f}" for k, v in ot["final_loss"].items()
    )]  # fmt: skip
    if "torchcfm_distinct_fraction" in ot:
        fr = ot["torchcfm_distinct_fraction"]
        lines += [
            "",
            f"torchcfm exact OT uses {fr['x0']:.0%} distinct x0 and {fr['x1']:.0%} "
            "distinct x1 per batch (pairs drawn from the plan, with replacement).",
        ]
    return lines


def memory_lines(memory: dict) -> list[str]:
    lines = ["| task | side | RSS before MiB | peak rise during task MiB |", "|---|---|---|---|"]
    for task, by_side in memory.items():
        for name, probe in by_side.items():
            rise = probe["peak_mib"] - probe["before_mib"]
            lines.append(f"| {task} | {name} | {probe['before_mib']:.0f} | {rise:.1f} |")
    return lines


def flow_map_lines(study: dict, labels: dict[str, str]) -> list[str]:
    lines = [f"| jumps | {' / '.join(labels.values())} (NFE) |", "|---|---|"]
    for method, entry in study["quality"].items():
        lines.append(f"| {method} | {metric_cell(entry, labels)} |")
    lines += ["", f"Final loss (median) {statistics.median(study['final_loss']):.3f}; training "
              f"{statistics.median(study['steps_per_s']):.1f} steps/s (context only: a different "
              "network and loss)."]  # fmt: skip
    return lines


def metric_labels(res: dict) -> dict[str, str]:
    """The quality metrics of a run's JSON (runs written before MNIST: the 2-D pair)."""
    return res.get("metrics", {"energy": "energy distance", "w2": "W2"})


def markdown(results: dict[str, dict]) -> str:
    """The report of every workload in ``results`` (workload name -> JSON of a run); sections
    that were not measured are left out."""
    lines: list[str] = []
    for name, res in results.items():
        s, labels = res["settings"], metric_labels(res)
        lines += [f"## {name}", ""]
        lines += [f"{s['repeats']} interleaved repeats; {s['steps']} training steps per run at the "
                  "first batch size (its networks are the ones evaluated)."]  # fmt: skip
        for side, why in res["skipped"].items():
            lines.append(f"**Skipped: {side}** ({why}).")
        for section, why in res.get("not_measured", {}).items():
            lines.append(f"Not measured: {section} ({why}).")
        for batch, entry in res.get("train", {}).items():
            lines += ["", f"### Training steps/s, batch {batch} ({entry['steps']} steps)", ""]
            lines += rate_table(entry["steps_per_s"], "steps/s")
            lines += ["", "Final training loss (median): " + ", ".join(
                f"{k} {statistics.median(v):.3f}" for k, v in entry["final_loss"].items()
            )]  # fmt: skip
        if "loop" in res:
            rates = res["loop"]["steps_per_s"]
            ratio = paired_ratio(rates["flowmatch.training.train"], rates["flowmatch step"])
            lines += ["", "### flowmatch.training.train against the hand-written step", ""]
            lines += [
                f"Steps/s ratio loop / step: {fmt_ratio(ratio)} (the loop adds per-step draws "
                "from an ArrayDataset, EMA, set-up, one log and one checkpoint)."
            ]
        if "sampling" in res:
            smp = res["sampling"]
            lines += ["", f"### Sampling throughput, Euler NFE {smp['nfe']}, {smp['n']} samples"]
            lines += ["", *rate_table(smp["samples_per_s"], "samples/s")]
        if "quality" in res:
            lines += ["", f"### Sample quality against NFE ({' / '.join(labels.values())}, "
                      f"{s['eval_n']} samples)", ""]  # fmt: skip
            lines += quality_table(res["quality"], res["metric_noise"], labels)
        if "flow_maps" in res:
            lines += ["", "### flowmatch flow maps (LSD self-distillation), quality per jumps", ""]
            lines += flow_map_lines(res["flow_maps"], labels)
        if "likelihood" in res:
            lines += ["", "### Likelihood", "", *likelihood_lines(res["likelihood"])]
        if "ot" in res:
            lines += ["", "### Minibatch OT training", "", *ot_lines(res["ot"], labels)]
        if "memory" in res:
            where = "a fresh process" if s["memory_in_fresh_process"] else "this process"
            lines += ["", f"### Peak memory (each task in {where})", ""]
            lines += memory_lines(res["memory"])
        lines.append("")
    return "\n".join(lines)


def plot_quality(res: dict, out: Path) -> None:
    """``quality_<workload>_<metric>.png`` for each metric (``energy``, ``w2``; ``fd``, ``kid``):
    median metric against NFE, Euler curves per side, dopri5 as one point at its median NFE,
    flowmatch's flow maps as a curve over jumps."""
    if "quality" not in res:
        return
    curves = dict(res["quality"])
    if "flow_maps" in res:
        curves["flowmatch"] = {**curves.get("flowmatch", {}), **res["flow_maps"]["quality"]}
    for metric, label in metric_labels(res).items():
        table: dict[str, dict[int, float]] = {}
        for name, methods in curves.items():
            for method, entry in methods.items():
                key = f"{name} {method.split('-')[0]}"
                nfe = round(statistics.median(entry["nfe"]))
                table.setdefault(key, {})[nfe] = statistics.median(entry[metric])
        plot_quality_vs_steps(
            table,
            out / f"quality_{res['workload']}_{metric}.png",
            label,
            noise_level=res["metric_noise"][metric],
            title=f"{res['workload']}: {label} against NFE",
            steps_name="NFE (function evaluations)",
        )
