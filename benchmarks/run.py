"""Benchmark flowmatch against torchcfm and Meta's flow_matching on identical workloads.

    benchmarks/.venv/bin/python benchmarks/run.py [--workload checkerboard gmm mnist]
        [--repeats 5] [--steps 300] [--set eval_n=200 euler_steps=1,4] [--out benchmarks/results]
        [--smoke] [--profile]

Writes ``<out>/<workload>.json`` (raw repeats), ``<out>/report.md`` (ratio tables) and plots.
Libraries that are not importable in the running interpreter are skipped and marked as such
(``--smoke`` runs in the package's own venv, which has neither torchcfm nor flow_matching).
Sizes: ``measure.Settings``, updated by the workload's own (``Workload.settings``), then by
``--set``, ``--steps`` and ``--repeats``; ``--smoke`` starts from ``measure.SMOKE`` instead.
Every process runs torch on one thread: the machine is shared.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

import measure
import report
from measure import Settings, settings_for
from sides import SIDES, load_sides
from workloads import WORKLOADS, DataMissing, Workload

HERE = Path(__file__).resolve().parent


def machine_note() -> dict[str, object]:
    """CPU model, core count, versions of torch and of each library, date, thread setting."""
    cpu = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        models = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                  if ln.startswith("model name")]  # fmt: skip
        cpu = models[0] if models else cpu
    versions = {}
    for module in ("torch", "numpy", "scipy", "ot", "torchdiffeq", "torchcfm", "flow_matching",
                   "flowmatch"):  # fmt: skip
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            versions[module] = None
    return {
        "cpu": cpu,
        "nproc": len(__import__("os").sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "versions": versions,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


SECTIONS = ("train", "loop", "sampling", "quality", "likelihood", "ot", "flow_maps", "memory")


def run_workload(
    workload: Workload, side_names: list[str], settings: Settings, sections: tuple[str, ...]
) -> dict:
    """The chosen measurements of one workload; the raw per-repeat values, JSON-ready.

    ``sampling``, ``quality`` and ``likelihood`` use the networks of the first batch size's
    training runs, so they run ``train`` at that batch size too. Sections the workload leaves
    out (``Workload.unmeasured``) are listed under ``not_measured`` with the reason.
    """
    sides, skipped = load_sides(side_names)
    unmeasured = workload.unmeasured()
    out: dict[str, object] = {
        "workload": workload.name,
        "settings": dataclasses.asdict(settings),
        "sides": list(sides),
        "skipped": skipped,
        "not_measured": unmeasured,
        "metrics": workload.metric_labels,
    }
    sections = tuple(s for s in sections if s not in unmeasured)
    stamp = time.perf_counter()

    def log(what: str) -> None:
        print(f"[{workload.name}] {what} done at {time.perf_counter() - stamp:.0f} s", flush=True)

    needs_nets = {"sampling", "quality", "likelihood"} & set(sections)
    batches = settings.batches(workload)
    batches = batches if "train" in sections else batches[:1] if needs_nets else ()
    own_nets = {}
    if batches:
        out["train"] = {}
    for batch in batches:
        steps = settings.throughput_only_steps if own_nets else settings.steps
        variants = {name: (side, "independent") for name, side in sides.items()}
        runs = measure.train_runs(variants, workload, batch, steps, settings.repeats)
        out["train"][str(batch)] = {
            "steps": steps,
            "steps_per_s": runs.rates,
            "final_loss": runs.final_loss,
        }
        own_nets = own_nets or runs.nets  # quality and NLL use the first batch size's models
        log(f"training at batch {batch}")
    # Timing: one network for all sides (bare's, or the first side's when bare is not run).
    shared_net = own_nets.get("bare", next(iter(own_nets.values())))[0] if own_nets else None

    if "loop" in sections and "flowmatch" in sides:
        with tempfile.TemporaryDirectory() as run_root:
            out["loop"] = {
                "steps_per_s": measure.training_loop_rates(
                    sides["flowmatch"], workload, settings, Path(run_root)
                )
            }
        log("flowmatch training loop")

    if "sampling" in sections:
        out["sampling"] = {
            "nfe": settings.sampling_nfe,
            "n": settings.sampling_n,
            "samples_per_s": measure.sampling_rates(sides, shared_net, workload, settings),
        }
        log("sampling throughput")

    if "quality" in sections:
        out["quality"] = {
            name: measure.quality(side, own_nets[name], workload, settings.euler_steps, settings)
            for name, side in sides.items()
            if measure.offers(side, "sample")
        }
        out["metric_noise"] = measure.metric_noise(workload, settings.eval_n)
        log("quality against NFE")

    if "likelihood" in sections:
        out["likelihood"] = measure.likelihood_study(
            sides, shared_net, own_nets, workload, settings
        )
        log("likelihood")

    ot_variants = {
        f"{name}/{coupling}": (side, coupling)
        for name, side in sides.items()
        if len(side.couplings) > 1
        for coupling in side.couplings
    }
    if "ot" in sections and ot_variants:
        runs = measure.train_runs(
            ot_variants, workload, settings.ot_batch, settings.steps, settings.repeats
        )
        out["ot"] = {
            "batch": settings.ot_batch,
            "steps_per_s": runs.rates,
            "final_loss": runs.final_loss,
            "quality": {
                label: measure.quality(
                    side, runs.nets[label], workload, settings.ot_euler_steps, settings
                )
                for label, (side, _) in ot_variants.items()
            },
        }
        if "torchcfm" in sides:
            out["ot"]["torchcfm_distinct_fraction"] = measure.ot_pair_reuse(settings.ot_batch, 0)
        log("minibatch OT")

    if "flow_maps" in sections and "flowmatch" in sides:
        out["flow_maps"] = measure.flow_map_study(sides["flowmatch"], workload, settings)
        log("flow maps")

    if "memory" in sections:
        tasks = [("train", b) for b in settings.batches(workload)]
        tasks.append(("sample", settings.sampling_n))
        if "likelihood" not in unmeasured:
            tasks.append(("likelihood", settings.likelihood_n))
        out["memory"] = measure.memory_study(sides, workload, tasks, settings)
        log("peak memory")
    return out


def setting(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` for a field of ``Settings``, the value parsed as that field's type (a
    tuple of ints is comma-separated: ``euler_steps=1,2,4``)."""
    key, _, value = text.partition("=")
    if key not in Settings.__dataclass_fields__:
        raise argparse.ArgumentTypeError(f"{key!r} is not a field of measure.Settings")
    kind = Settings.__dataclass_fields__[key].type  # its annotation, a string
    if kind.startswith("tuple"):
        return key, tuple(int(v) for v in value.split(","))
    if kind == "bool":
        return key, value.lower() in ("1", "true", "yes")
    return key, {"int": int, "float": float}[kind](value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", nargs="+", choices=sorted(WORKLOADS),
                        default=["checkerboard", "gmm"])  # fmt: skip
    parser.add_argument("--sides", nargs="+", choices=list(SIDES), default=list(SIDES))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, well under a minute")
    parser.add_argument("--repeats", type=int, help="interleaved repeats (default 5)")
    parser.add_argument("--steps", type=int, help="training steps per run (default 300)")
    parser.add_argument("--set", nargs="+", type=setting, default=[], metavar="KEY=VALUE",
                        help="any other field of measure.Settings")  # fmt: skip
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="measure only these; merged into existing results")  # fmt: skip
    parser.add_argument("--profile", action="store_true",
                        help="also profile flowmatch's training step and sampling")  # fmt: skip
    parser.add_argument("--memory-probe", nargs=5, help=argparse.SUPPRESS,
                        metavar=("SIDE", "TASK", "BATCH", "STEPS", "TOL"))  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)

    if args.memory_probe:
        name, task, batch, steps, tol = args.memory_probe
        side = load_sides([name])[0][name]
        workload = WORKLOADS[args.workload[0]]()
        probe = measure.memory_probe(side, workload, task, int(batch), int(steps), float(tol))
        print(json.dumps(probe))
        return

    try:  # before any run: missing data stop here, with the command that fetches them
        workloads = {name: WORKLOADS[name]() for name in args.workload}
    except DataMissing as error:
        raise SystemExit(str(error)) from None
    overrides = dict(args.set)
    overrides.update({k: v for k, v in (("repeats", args.repeats), ("steps", args.steps)) if v})
    args.out.mkdir(parents=True, exist_ok=True)
    machine = machine_note()
    results = {}
    sections = tuple(args.sections)
    for name, workload in workloads.items():
        settings = settings_for(workload, args.smoke, overrides)
        path = args.out / f"{name}.json"
        merged = (
            json.loads(path.read_text()) if set(sections) != set(SECTIONS) and path.exists() else {}
        )
        merged.setdefault("machine", machine)
        merged.setdefault("runs", []).append({"date": machine["date"], "sections": sections})
        measured = run_workload(workload, args.sides, settings, sections)
        # A partial run keeps the sides measured before it (its sections list its own).
        measured["sides"] = list(dict.fromkeys([*merged.get("sides", []), *measured["sides"]]))
        merged.update(measured)
        results[name] = merged
        path.write_text(json.dumps(merged, indent=1))
        report.plot_quality(merged, args.out)
        if args.profile:
            import profiling

            profiling.profile_flowmatch(
                workload, args.out / f"profile_{name}.txt",
                batch=settings.batches(workload)[0], n=settings.sampling_n,
                nfe=settings.sampling_nfe,
            )  # fmt: skip
    # The report covers every workload measured into this folder, not only this run's.
    for path in sorted(args.out.glob("*.json")):
        if path.stem in WORKLOADS and path.stem not in results:
            results[path.stem] = json.loads(path.read_text())
    text = report.markdown(results)
    (args.out / "report.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
