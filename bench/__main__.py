"""`python -m bench` (`make bench`): run every benchmark, print the table, write bench/RESULTS.md.

Exits 0 whatever the numbers (a missed target is reported, never an error); 1 only if a benchmark could
not run at all. `--only api,cpu` runs a subset (and still writes the file, with only those rows).
`--quick` runs every benchmark at its smallest size with one repetition, to prove it works end to end:
its figures mean nothing, so it writes a file only when `--output` names one.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

from bench import api_economy, cpu, delivery, failover, latency, memory, startup
from bench.common import ROOT, Row, Section, machine

#: Each module has a docstring saying what it measures and `run(ctx) -> Section`; `ctx` carries figures
#: one benchmark hands to a later one (the SDK loop's peak RSS, for the memory row).
BENCHMARKS: dict[str, ModuleType] = {
    "latency": latency,
    "api": api_economy,
    "cpu": cpu,
    "memory": memory,
    "delivery": delivery,
    "startup": startup,
    "replicas": failover,
}
HEADERS = ("Figure", "batch-poller", "Alternative", "Ratio", "Target", "Met")
OUTPUT = ROOT / "bench" / "RESULTS.md"


def _met(row: Row) -> str:
    return "—" if row.met is None else "yes" if row.met else "**no**"


def _cells(row: Row) -> tuple[str, ...]:
    return (row.figure, row.poller, row.alternative, row.ratio, row.target, _met(row))


def text_table(rows: list[Row]) -> str:
    cells = [HEADERS, *(tuple(c.replace("**", "") for c in _cells(r)) for r in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(HEADERS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(sections: list[tuple[str, Section]], info: dict[str, str], total: float) -> str:
    rows = [r for _, s in sections for r in s.rows]
    out = [
        "# batch-poller benchmarks",
        "",
        "Written by `make bench` (`python -m bench`); every figure is from one run on the machine below, on",
        "loopback against the package's Batch API simulator (`poller.sim`, in a process of its own",
        "wherever CPU or latency is measured). Benchmarks are not tests: they report, and never fail on a timing.",
        "Where runs are short the figure is the median of a few repetitions (see the notes).",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in info.items()),
        "",
        "## Results",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "---|" * len(HEADERS),
        *("| " + " | ".join(c.replace("|", "\\|") for c in _cells(r)) + " |" for r in rows),
        "",
    ]
    missed = [r for r in rows if r.met is False]
    if missed:
        out += [
            "Targets missed: "
            + "; ".join(f"{r.figure}: {r.poller}, ratio {r.ratio} (target {r.target})" for r in missed)
            + ".",
            "The notes of the benchmark concerned say what limits it.",
            "",
        ]
    out += ["## What each benchmark measures, and notes", ""]
    for key, section in sections:
        out += [f"### {section.name}", "", _paragraphs(BENCHMARKS[key].__doc__ or ""), ""]
        if section.error:
            out += ["**The benchmark failed:**", "", "```", section.error.strip(), "```", ""]
        out += [f"- {note}" for note in section.notes]
        out += [f"- Took {section.seconds:.0f} s.", ""]
    out += [f"All benchmarks took {total:.0f} s.", ""]
    return "\n".join(out)


def _paragraphs(doc: str) -> str:
    """A module docstring as Markdown, without the "Benchmark N, name: " the section heading already says."""
    text = doc.strip()
    if text.startswith("Benchmark") and ":" in text:
        text = text.split(":", 1)[1].strip()
        text = text[:1].upper() + text[1:]
    return text


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--output", type=Path, help=f"the Markdown file to write (default {OUTPUT.relative_to(ROOT)})")
    parser.add_argument(
        "--quick", action="store_true", help="smallest sizes, one repetition: a smoke run (writes only --output)"
    )
    args = parser.parse_args()
    output: Path | None = args.output or (None if args.quick else OUTPUT)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    info = machine()
    print("batch-poller benchmarks on " + ", ".join(f"{k}: {v}" for k, v in info.items()), flush=True)
    ctx: dict[str, Any] = {"quick": args.quick}
    sections: list[tuple[str, Section]] = []
    started = time.perf_counter()
    for name in names:
        module = BENCHMARKS[name]
        title = (module.__doc__ or name).strip().splitlines()[0]
        print(f"\n== {title}", flush=True)
        t0 = time.perf_counter()
        try:
            section: Section = module.run(ctx)
        except Exception:
            section = Section(title.split(":")[0].split(", ", 1)[-1], error=traceback.format_exc())
            print(section.error, file=sys.stderr, flush=True)
        section.seconds = time.perf_counter() - t0
        sections.append((name, section))
        if section.rows:
            print(text_table(section.rows), flush=True)
    total = time.perf_counter() - started
    rows = [r for _, s in sections for r in s.rows]
    print("\n" + text_table(rows))
    if output is None:
        print(f"\nquick run: nothing written ({total:.0f} s)")
    else:
        output.write_text(markdown(sections, info, total))
        print(f"\nwritten to {output} ({total:.0f} s)")
    return 1 if any(s.error for _, s in sections) else 0


if __name__ == "__main__":
    sys.exit(main())
