"""The results file and the tables generated from it (issue 20): what a reader of the README and
RESULTS.md sees comes from the newest full-size results file of each benchmark, links it, shows
its command, and is the same however often it is generated."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from benchmarks import report, results

README = """# Project

Intro text.

## Benchmarks

Words before.

<!-- bench:begin -->
| stale | hand-typed | row |
<!-- bench:end -->

## Layout

Words after.
"""
RESULTS_MD = """# Benchmark results

<!-- bench:begin -->
<!-- bench:end -->

## Validation and profiling (issue 2)

Details.
"""
MACHINE = results.Machine(
    cores=2,
    cpu_model="Test CPU",
    memory_gb=8.0,
    os="Linux",
    python="3.11.7",
    packages={"torch": "2.13.0"},
    gpu=None,
    git_commit="abcdef1234567890",
    git_dirty=False,
)


def result(benchmark: str, when: datetime, figures, *, smoke=False, variant=None, skipped=()):
    return results.BenchResult(
        benchmark=benchmark,
        variant=variant,
        smoke=smoke,
        command=f".venv/bin/python -m benchmarks.{benchmark}" + (" --smoke" if smoke else ""),
        date=when,
        duration_s=12.0,
        load_average={"start": [1.5, 1.0, 1.0], "end": [2.5, 1.0, 1.0]},
        machine=MACHINE,
        parameters={"rows": 1000},
        figures=figures,
        skipped=list(skipped),
    )


def validation_figure(value: float, floor: float = 100.0) -> results.Figure:
    return results.compared(
        "validate + profile a batch",
        value,
        "ms",
        "one DuckDB scan",
        floor,
        ratio_of="loopline / floor",
        goal=results.Goal(op="<=", target=3),
    )


@pytest.fixture
def docs(tmp_path: Path) -> tuple[Path, Path, Path]:
    readme, results_md = tmp_path / "README.md", tmp_path / "benchmarks" / "RESULTS.md"
    results_md.parent.mkdir()
    readme.write_text(README)
    results_md.write_text(RESULTS_MD)
    out = tmp_path / "benchmarks" / "results"
    day = datetime(2026, 12, 7, 10, tzinfo=UTC)
    results.write(result("bench_validation", day, [validation_figure(400.0)]), out)
    newer = day.replace(hour=11)
    results.write(result("bench_validation", newer, [validation_figure(250.0)]), out)
    smoke = day.replace(hour=12)
    results.write(result("bench_validation", smoke, [validation_figure(999.0)], smoke=True), out)
    serving = [
        results.compared(
            "serving p50, 32 client(s)",
            15.0,
            "ms",
            "no-op handler",
            10.0,
            ratio=1.58,
            ratios=[1.65, 1.51],
            goal=results.Goal(op="<=", target=1.5),
        ),
        results.Figure(name="loopline, 1 client(s): rps", value=84.0, unit="req/s"),
    ]
    skipped = ["peer: no --peer-python"]
    results.write(result("bench_serving", newer, serving, variant="delivery", skipped=skipped), out)
    return readme, results_md, out


def generate(docs, *extra: str) -> int:
    readme, results_md, out = docs
    args = ["--results-dir", str(out), "--readme", str(readme), "--results-md", str(results_md)]
    return report.main([*args, *extra])


def table(path: Path) -> str:
    text = path.read_text()
    return text[text.index(report.BEGIN) : text.index(report.END)]


def test_readme_table_shows_the_newest_full_size_run_of_each_benchmark(docs) -> None:
    readme, _, _ = docs
    assert generate(docs) == 0
    rows = table(readme)
    assert "| stale | hand-typed | row |" not in rows
    validation = next(r for r in rows.splitlines() if r.startswith("| validate + profile"))
    # the newer full-size run (250 ms), not the older one (400) nor the smoke run (999)
    assert "250 ms vs 100 ms: 2.50x (loopline / floor)" in validation
    assert "<= 3x: met" in validation
    assert "[2026-12-07](benchmarks/results/bench_validation-20261207T110000Z.json)" in validation
    assert "`.venv/bin/python -m benchmarks.bench_validation`" in validation
    serving = next(r for r in rows.splitlines() if r.startswith("| [delivery]"))
    # the median of the rounds' ratios against the goal, every round shown
    assert serving.startswith("| [delivery] serving p50, 32 client(s) | no-op handler | 15.0 ms")
    assert "1.58x" in serving and "rounds 1.65x, 1.51x" in serving and "<= 1.5x: missed" in serving
    # a figure with neither goal nor headline stays in the file, out of the README
    assert "1 client(s): rps" not in rows


def test_benchmarks_not_yet_measured_keep_their_published_figure(docs) -> None:
    readme, results_md, _ = docs
    generate(docs)
    rows = table(readme)
    published = {p.key: p for p in report.load_published()}
    loop = published["bench_loop"]
    assert f"| {loop.result} |" in rows
    assert f"{report.NOT_YET}: [{loop.date}](benchmarks/RESULTS.md#loop-latency-issue-6)" in rows
    # measured benchmarks lose their old rows; delivery serving's own old row goes too
    assert published["bench_validation"].result not in rows
    assert published["bench_serving[delivery]"].result not in rows
    assert published["bench_serving"].result in rows
    summary = table(results_md)
    assert (
        f"| `bench_loop` | {report.NOT_YET}; before: [{loop.date}](#loop-latency-issue-6)"
        in summary
    )


def test_results_summary_says_where_each_run_ran_and_what_it_missed(docs) -> None:
    _, results_md, _ = docs
    generate(docs)
    summary = table(results_md)
    row = next(r for r in summary.splitlines() if r.startswith("| `bench_serving[delivery]`"))
    assert "[2026-12-07](results/bench_serving-delivery-20261207T110000Z.json)" in row
    assert "2 cores, Test CPU, load <= 2.5, commit abcdef1" in row
    assert "0 of 1 met; missed: serving p50, 32 client(s)" in row
    assert "peer: no --peer-python" in row


def test_generation_is_idempotent_and_touches_nothing_outside_the_markers(docs) -> None:
    readme, results_md, _ = docs
    assert generate(docs, "--check") == 1
    generate(docs)
    first = readme.read_text(), results_md.read_text()
    assert generate(docs, "--check") == 0
    generate(docs)
    assert (readme.read_text(), results_md.read_text()) == first
    head, tail = README.split(report.BEGIN)[0], README.split(report.END)[1]
    assert first[0].startswith(head) and first[0].endswith(tail)
    assert first[1].endswith(RESULTS_MD.split(report.END)[1])


def test_a_document_without_its_markers_is_refused(docs) -> None:
    readme, _, _ = docs
    readme.write_text("# Project\n\nno markers\n")
    with pytest.raises(ValueError, match="needs one <!-- bench:begin -->"):
        generate(docs)


def test_met_is_computed_from_the_figure_not_taken_from_the_file(tmp_path: Path) -> None:
    day = datetime(2026, 12, 7, tzinfo=UTC)
    path = results.write(result("bench_validation", day, [validation_figure(400.0)]), tmp_path)
    data = json.loads(path.read_text())
    data["figures"][0]["met"] = True  # ratio 4.0 against a goal of <= 3
    path.write_text(json.dumps(data))
    assert results.read(path).figures[0].met is False
    path.write_text('{"benchmark": "x"}')
    with pytest.raises(ValueError, match="is not a benchmark results file"):
        results.read(path)


def test_smoke_sizes_are_defaults_an_explicit_option_overrides() -> None:
    def parse(argv):
        parser = argparse.ArgumentParser()
        parser.add_argument("--rows", type=int, default=1_000_000)
        parser.add_argument("--repeats", type=int, default=3)
        args, recording = results.parse_args(parser, "bench_x", {"rows": 20, "repeats": 1}, argv)
        return args, recording

    args, _ = parse(["--smoke", "--rows", "50"])
    assert (args.rows, args.repeats, args.smoke) == (50, 1, True)
    args, recording = parse([])
    assert (args.rows, args.repeats, args.smoke) == (1_000_000, 3, False)
    assert recording.command.endswith("-m benchmarks.bench_x")
    with pytest.raises(ValueError, match="unknown options"):
        results.parse_args(argparse.ArgumentParser(), "bench_x", {"rowz": 1}, [])


def test_published_figures_link_sections_that_exist() -> None:
    headings = {
        report.slug(line.lstrip("#"))
        for line in report.RESULTS_MD.read_text().splitlines()
        if line.startswith("#")
    }
    for p in report.load_published():
        assert report.slug(p.section) in headings, p.section


def test_the_repository_tables_are_what_its_results_files_say() -> None:
    """The README's and RESULTS.md's tables are regenerated, never edited by hand."""
    assert report.main(["--check"]) == 0, "run `python -m benchmarks.report`"


def test_a_goal_held_in_every_round_is_missed_when_one_round_misses_it() -> None:
    """The serving p50 goal holds in every run, not just the median (issue 20): a median
    within the bound with one round past it is missed, and the table says which bound."""
    goal = results.Goal(op="<=", target=1.5, every=True)

    def figure(ratios: list[float]) -> results.Figure:
        return results.compared(
            "serving p50", 10.0, "ms", "floor", 8.0, ratio=sorted(ratios)[1], ratios=ratios,
            goal=goal,
        )  # fmt: skip

    assert figure([1.2, 1.3, 1.4]).met is True
    assert figure([1.2, 1.3, 1.6]).met is False  # median 1.3 within, one round past
    assert results.Goal(op="<=", target=1.5).text("ms") == "<= 1.5x"
    assert goal.text("ms") == "<= 1.5x in every round"
    saved = results.Figure.model_validate_json(figure([1.2, 1.3, 1.6]).model_dump_json())
    assert saved.goal == goal and saved.met is False
