"""Backtest speed: 30 simulated days of the demo's scenario, three policies, on this machine.

Run: ``.venv/bin/python -m benchmarks.bench_backtest [--drift concept] [--days 30]
[--drift-after 5] [--policies static,nightly,triggers] [--threads N] [--smoke]`` (the active use
case's scenario: ``LOOPLINE_USECASE=delivery`` for the delivery demo's, judged on MAE).
``--burn-in-days`` and ``--warmup-days`` shorten the history before the first champion (the
use case's own by default); ``--smoke`` does so, with 3 served days and two policies.

Self-contained: ``orchestration.backtest`` generates the scenario (40 burn-in and 28 warm-up
days before the first champion, drift 5 days after it), computes features, applies the Feast
repo in a temporary home and replays every policy through training, gate and triggers.

Figures (also in the results file, ``benchmarks.results``): wall time (scenario and features; the whole run), simulated seconds per wall second
(30 days for every policy at once), and two anchors: the demo's accelerated clock
(``orchestration.cli_loop.DemoPlan.speed``, 2400x for fraud), and the wall time of one retraining (candidate, baseline and
their evaluation), i.e. how many retrainings the whole backtest costs. Retrainings shared
between policies (same step, same options) run once; their count is printed. Each policy's
post-drift mean metric is recorded against the static model's, and its time to recover in
label-maturity periods (goal for the retraining policies: at most 3; a policy that does not
recover within the served days has no figure, and the results file notes it).
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING

from benchmarks import results

if TYPE_CHECKING:
    from orchestration.backtest import BacktestResult

SMOKE = {
    "days": 3,
    "drift_after": 1,
    "burn_in_days": 7,
    "warmup_days": 14,
    "policies": "static,triggers",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--drift", default="concept", choices=("none", "covariate", "concept"))
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--policies", default="static,nightly,triggers")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads while training")
    parser.add_argument("--drift-after", type=int, default=5, help="served days before drift")
    parser.add_argument("--burn-in-days", type=int, help="(the use case's: 40 for fraud)")
    parser.add_argument("--warmup-days", type=int, help="(the use case's: 28 for fraud)")
    args, recording = results.parse_args(parser, "bench_backtest", SMOKE)

    from core.usecase import active
    from orchestration.backtest import PolicySpec, demo_config, run_backtest, summary_markdown
    from orchestration.cli_loop import DemoPlan

    demo_clock = DemoPlan.of_active().speed

    specs = [PolicySpec.parse(p) for p in args.policies.split(",")]
    config = demo_config(
        args.drift,
        seed=args.seed,
        days=args.days,
        drift_after=args.drift_after,
        burn_in_days=args.burn_in_days,
        warmup_days=args.warmup_days,
        torch_threads=args.threads,
    )
    started = time.perf_counter()
    result = run_backtest(config, specs)
    wall = time.perf_counter() - started
    per_training = result.training_seconds / max(result.trainings, 1)
    speed = result.simulated_seconds / wall
    print(f"backtest: {args.drift} drift, {args.days} simulated days, {len(specs)} policies")
    print(f"  torch threads                    {args.threads}")
    print(f"  scenario + features + join       {result.world_seconds:8.1f} s")
    print(f"  wall time                        {wall:8.1f} s")
    print(f"  distinct trainings               {result.trainings:8d}")
    print(f"  one retraining (mean)            {per_training:8.1f} s")
    print(f"  simulated s per wall s           {speed:8.0f}x")
    print(f"  vs the demo's clock ({demo_clock:.0f}x)      {speed / demo_clock:8.2f}x")
    print(f"  backtest / one retraining        {wall / per_training:8.1f} retrainings")
    print()
    print(summary_markdown(result))
    speed_figures = [
        results.Figure(name="wall time", value=wall, unit="s"),
        results.Figure(name="one retraining (mean)", value=per_training, unit="s"),
        results.compared(
            "backtest speed, simulated s per wall s",
            speed,
            "x real time",
            "the demo's accelerated clock",
            demo_clock,
            ratio_of="backtest / demo clock",
            headline=True,
        ),
    ]
    usecase = active().name
    recording.write(
        speed_figures + quality_figures(result),
        variant=None if usecase == "fraud" else usecase,
        notes=recovery_notes(result),
    )


def quality_figures(result: BacktestResult) -> list[results.Figure]:
    """Per policy: its post-drift mean metric against the static model's (when static ran),
    and its time to recover in label-maturity periods when there is drift (goal for all but
    the static model: at most 3)."""
    static = result.policies.get("static")
    out = []
    for name, policy in result.policies.items():
        s = policy.summary
        label = f"post-drift mean {s.metric}, {name}"
        if static is None or name == "static":
            out.append(results.Figure(name=label, value=s.post_drift_mean, unit=s.metric))
        else:
            out.append(
                results.compared(
                    label,
                    s.post_drift_mean,
                    s.metric,
                    "the static model",
                    static.summary.post_drift_mean,
                    ratio_of=f"{name} / static",
                    headline=True,
                )
            )
        if result.config.scenario.drift != "none" and s.recovery_periods is not None:
            out.append(
                results.Figure(
                    name=f"time to recover, {name}",
                    value=s.recovery_periods,
                    unit="label-maturity periods",
                    goal=None if name == "static" else results.Goal(op="<=", target=3, on="value"),
                )
            )
    return out


def recovery_notes(result: BacktestResult) -> list[str]:
    if result.config.scenario.drift == "none":
        return []
    steps = result.config.batches
    return [
        f"{name}: not recovered within the {steps} served steps"
        for name, policy in result.policies.items()
        if policy.summary.recovery_days is None
    ]


if __name__ == "__main__":
    main()
