"""Backtest speed: 30 simulated days of the demo's scenario, three policies, on this machine.

Run: ``.venv/bin/python -m benchmarks.bench_backtest [--drift concept] [--days 30]
[--policies static,nightly,triggers] [--threads N]`` (the active use case's scenario:
``LOOPLINE_USECASE=delivery`` for the delivery demo's, judged on MAE).

Self-contained: ``orchestration.backtest`` generates the scenario (40 burn-in and 28 warm-up
days before the first champion, drift 5 days after it), computes features, applies the Feast
repo in a temporary home and replays every policy through training, gate and triggers.

Figures: wall time (scenario and features; the whole run), simulated seconds per wall second
(30 days for every policy at once), and two anchors: the demo's accelerated clock
(``orchestration.cli_loop.DemoPlan.speed``, 2400x for fraud), and the wall time of one retraining (candidate, baseline and
their evaluation), i.e. how many retrainings the whole backtest costs. Retrainings shared
between policies (same step, same options) run once; their count is printed.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--drift", default="concept", choices=("none", "covariate", "concept"))
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--policies", default="static,nightly,triggers")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads while training")
    args = parser.parse_args()

    from orchestration.backtest import PolicySpec, demo_config, run_backtest, summary_markdown
    from orchestration.cli_loop import DemoPlan

    demo_clock = DemoPlan.of_active().speed

    specs = [PolicySpec.parse(p) for p in args.policies.split(",")]
    config = demo_config(args.drift, seed=args.seed, days=args.days, torch_threads=args.threads)
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


if __name__ == "__main__":
    main()
