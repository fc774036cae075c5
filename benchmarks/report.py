"""Generates the README's benchmark table and the summary at the top of benchmarks/RESULTS.md
from the newest full-size results file of each benchmark (``benchmarks/results/``).

Run: ``.venv/bin/python -m benchmarks.report [--check]`` (``make bench`` runs it last).

Each table lives between ``<!-- bench:begin -->`` and ``<!-- bench:end -->``; nothing outside
the markers is touched, and a second run over the same files changes nothing. Every row links
its results file and shows the command that made it. Smoke runs are never shown (``--include-
smoke`` shows them, to try the generator). A benchmark (and variant) with no full-size results
file yet keeps the figure published before results files existed
(``benchmarks/published_before.yaml``), marked "not yet measured with ``make bench``", with its
date and section in RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import yaml

from benchmarks.results import RESULTS_DIR, ROOT, BenchResult, Figure, read
from core.storage import write_bytes_atomic

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
README = ROOT / "README.md"
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
PUBLISHED = ROOT / "benchmarks" / "published_before.yaml"
# Row order: `make bench`'s; a variant follows its benchmark.
ORDER = (
    "bench_validation",
    "bench_training",
    "bench_features",
    "bench_drift",
    "bench_backtest",
    "bench_serving",
    "bench_scale",
    "bench_ingest",
    "bench_first_model",
    "bench_loop",
    "bench_release",
)
NOT_YET = "not yet measured with `make bench`"


@dataclass(frozen=True)
class Published:
    """A README row from before results files: shown until its benchmark has one."""

    key: str
    benchmark: str
    anchor: str
    result: str
    goal: str
    date: date
    section: str


@dataclass(frozen=True)
class Latest:
    """The newest results file of one benchmark and variant."""

    path: Path
    result: BenchResult


def load_published(path: Path = PUBLISHED) -> list[Published]:
    return [Published(**row) for row in yaml.safe_load(path.read_text()) or []]


def newest(directory: Path, *, include_smoke: bool = False) -> dict[str, Latest]:
    """Per benchmark key, its newest results file (smoke runs left out unless asked)."""
    latest: dict[str, Latest] = {}
    for path in sorted(directory.glob("*.json")):
        result = read(path)
        if result.smoke and not include_smoke:
            continue
        seen = latest.get(result.key)
        if seen is None or result.date > seen.result.date:
            latest[result.key] = Latest(path, result)
    return latest


def sort_key(key: str) -> tuple[int, str]:
    name = key.split("[", 1)[0]
    return (ORDER.index(name) if name in ORDER else len(ORDER), key)


def slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def readme_table(
    latest: dict[str, Latest], published: list[Published], doc: Path, results_md: Path
) -> str:
    """One row per figure that has an anchor and a goal, or is a headline; published rows for
    benchmarks not yet measured, linking their section of ``results_md``."""
    rows = ["| benchmark | anchor | result | goal | measured |", "|---|---|---|---|---|"]
    details = os.path.relpath(results_md, doc.parent)
    for key in sorted({*latest, *(p.key for p in published)}, key=sort_key):
        if key in latest:
            run = latest[key]
            measured = _measured(run, doc)
            prefix = f"[{run.result.variant}] " if run.result.variant else ""
            for f in run.result.figures:
                if f.headline or (f.anchor is not None and f.goal is not None):
                    anchor = f.anchor.name if f.anchor else "-"
                    rows.append(_row(prefix + f.name, anchor, _result(f), _goal(f), measured))
            continue
        for p in (p for p in published if p.key == key):
            link = f"[{p.date}]({details}#{slug(p.section)})"
            rows.append(_row(p.benchmark, p.anchor, p.result, p.goal, f"{NOT_YET}: {link}"))
    return "\n".join(rows) + "\n"


def summary_table(latest: dict[str, Latest], published: list[Published], doc: Path) -> str:
    """One row per benchmark and variant: its newest run, where it ran, its goals met or
    missed, what it skipped and its command; benchmarks not yet measured link their section."""
    rows = [
        "| benchmark | measured | machine | goals | skipped | command |",
        "|---|---|---|---|---|---|",
    ]
    for key in sorted({*latest, *(p.key for p in published)}, key=sort_key):
        if key not in latest:
            links = {f"[{p.date}](#{slug(p.section)})" for p in published if p.key == key}
            before = f"{NOT_YET}; before: {', '.join(sorted(links))}"
            rows.append(_row(f"`{key}`", before, "-", "-", "-", "-"))
            continue
        run = latest[key].result
        m = run.machine
        load = max(run.load_average.get("start", [0])[0], run.load_average.get("end", [0])[0])
        machine = f"{m.cores} cores, {m.cpu_model}" + (f", {m.gpu}" if m.gpu else "")
        machine += f", load <= {load:.1f}, commit {(m.git_commit or '?')[:7]}"
        machine += " (uncommitted changes)" if m.git_dirty else ""
        goals = [f for f in run.figures if f.goal is not None]
        missed = [f.name for f in goals if f.met is False]
        unmeasured = sum(f.met is None for f in goals)
        tally = f"{sum(f.met is True for f in goals)} of {len(goals)} met"
        tally += f"; missed: {', '.join(missed)}" if missed else ""
        tally += f"; {unmeasured} not measured" if unmeasured else ""
        rows.append(
            _row(
                f"`{key}`",
                _measured(latest[key], doc, command=False),
                machine,
                tally if goals else "-",
                "; ".join(run.skipped) or "-",
                f"`{run.command}`",
            )
        )
    return "\n".join(rows) + "\n"


def replace_between(text: str, body: str, where: str = "the document") -> str:
    """``text`` with what lies between the markers replaced by ``body``."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"{where} needs one {BEGIN} followed by one {END}")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{body}{END}{tail}"


def render(
    results_dir: Path, readme: Path, results_md: Path, *, include_smoke: bool = False
) -> dict[Path, str]:
    """The new text of each document."""
    latest = newest(results_dir, include_smoke=include_smoke)
    published = load_published()
    note = (
        "Generated by `python -m benchmarks.report` from the newest full-size results file of "
        "each benchmark; do not edit by hand.\n\n"
    )
    return {
        readme: replace_between(
            readme.read_text(),
            note + readme_table(latest, published, readme, results_md),
            str(readme),
        ),
        results_md: replace_between(
            results_md.read_text(),
            note + summary_table(latest, published, results_md),
            str(results_md),
        ),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--results-md", type=Path, default=RESULTS_MD)
    parser.add_argument("--check", action="store_true", help="exit 1 if a table is out of date")
    parser.add_argument("--include-smoke", action="store_true", help="to try the generator")
    args = parser.parse_args(argv)
    documents = render(
        args.results_dir, args.readme, args.results_md, include_smoke=args.include_smoke
    )
    stale = [path for path, text in documents.items() if path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path}: its benchmark table is not what the results files say", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        write_bytes_atomic(documents[path].encode(), path)
        print(f"regenerated {path}")
    return 0


def _measured(run: Latest, doc: Path, *, command: bool = True) -> str:
    link = os.path.relpath(run.path, doc.parent)
    when = f"[{run.result.date:%Y-%m-%d}]({link})" + (" (smoke)" if run.result.smoke else "")
    return f"{when}: `{run.result.command}`" if command else when


def _result(f: Figure) -> str:
    text = _number(f.value, f.unit)
    if f.anchor is not None and f.anchor.value is not None:
        text += f" vs {_number(f.anchor.value, f.anchor.unit or f.unit)}"
    if f.ratio is not None:
        text += f": {f.ratio:.2f}x" + (f" ({f.ratio_of})" if f.ratio_of else "")
    if f.ratios and len(f.ratios) > 1:
        text += "; rounds " + ", ".join(f"{r:.2f}x" for r in f.ratios)
    return text


def _goal(f: Figure) -> str:
    if f.goal is None:
        return "(report)"
    return f"{f.goal.text(f.unit)}: " + ("met" if f.met else "missed" if f.met is False else "-")


def _number(value: float | None, unit: str) -> str:
    if value is None:
        return "not measured"
    size = abs(value)
    text = f"{value:,.0f}" if size >= 100 else f"{value:.1f}" if size >= 10 else f"{value:.3g}"
    return f"{text} {unit}"


def _row(*cells: str) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


if __name__ == "__main__":
    sys.exit(main())
