"""The benchmark suite, end to end: ``python -m bench`` (or ``.ci/run bench``).

    python -m bench [--quick] [--only latency,memory] [--repeats N] [--claude PATH]

Runs each section in turn (never two at once: they measure CPU on the same cores), then writes
``bench/results/<section>.json``, ``bench/results/SUMMARY.md`` (the machine, the CLI version, the
command, every section's tables and the issue's goals as met/missed rows) and PNG plots when
matplotlib (the ``bench`` extra) is installed. ``--quick`` is the smoke test CI runs: small sizes,
the whole suite in under 3 minutes; its results go to ``bench/results/quick/`` so a smoke run never
overwrites published numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
import time
from pathlib import Path
from types import ModuleType

import orjson

from bench.pool_bench import find_claude
from bench.suite import RESULTS, Options, Report, cli_version, machine, table

# Section name -> module; run in this order.
SECTIONS = {
    "latency": "bench.latency_bench",
    "memory": "bench.memory_bench",
    "cost": "bench.cost_bench",
    "overhead": "bench.overhead_bench",
    "idle": "bench.idle_bench",
    "scale": "bench.scale_bench",
    "soak": "bench.soak_bench",
}


def plot_all(modules: dict[str, ModuleType], reports: list[Report], out_dir: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plots", file=sys.stderr)
        return []
    paths: list[Path] = []
    for report in reports:
        plot = getattr(modules[report.name], "plot", None)
        if plot is not None:
            paths.extend(plot(report, out_dir))
    return paths


def summary(reports: list[Report], opts: Options, command: str, wall_s: float, plots: list[Path]) -> str:
    m = machine()
    lines = ["# Benchmark summary", "",
             f"Machine: {m['cpus']} CPUs, {m['ram_gib']} GiB RAM, Linux {m['kernel']}, Python {m['python']}; "
             f"CLI {cli_version(opts.claude)}. Command: `{command}` ({wall_s / 60:.1f} min).", ""]
    checks = [(r.name, *c) for r in reports for c in r.checks]
    if checks:
        lines += ["## Goals", "", table(["section", "goal", "met", "measured"],
                                        [[s, g, "yes" if ok else "**no**", v] for s, g, ok, v in checks]), ""]
    for report in reports:
        lines += [f"## {report.name}", "", report.markdown.strip(), ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines).rstrip() + "\n"


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes (under 3 minutes in all)")
    parser.add_argument("--only", default="", help="comma-separated sections: " + ",".join(SECTIONS))
    parser.add_argument("--repeats", type=int, default=0, help="repeats per measurement (default 1 quick, 3 full)")
    parser.add_argument("--claude", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    chosen = [s for s in args.only.split(",") if s] or list(SECTIONS)
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; known: {list(SECTIONS)}")
    out_dir = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    opts = Options(quick=args.quick, claude=find_claude(args.claude),
                   repeats=args.repeats or (1 if args.quick else 3), out_dir=out_dir)
    modules = {name: importlib.import_module(SECTIONS[name]) for name in chosen}
    reports: list[Report] = []
    t0 = time.perf_counter()
    for name, module in modules.items():
        print(f"==> {name}", file=sys.stderr, flush=True)
        s0 = time.perf_counter()
        report: Report = await module.run(opts)
        report.data["wall_s"] = round(time.perf_counter() - s0, 1)
        (out_dir / f"{name}.json").write_bytes(orjson.dumps(report.data, option=orjson.OPT_INDENT_2))
        print(report.markdown, flush=True)
        reports.append(report)
    plots = plot_all(modules, reports, out_dir)
    command = "python -m bench " + " ".join(sys.argv[1:])
    (out_dir / "SUMMARY.md").write_text(summary(reports, opts, command.strip(), time.perf_counter() - t0, plots))
    print(f"wrote {out_dir / 'SUMMARY.md'}", file=sys.stderr)
    missed = [c for r in reports for c in r.checks if not c[1]]
    # A missed goal is a result, not a crash: the summary says so; only a section that fails exits non-zero.
    print(f"{len(missed)} goal(s) missed", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
