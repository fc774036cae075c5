"""The loop-latency anchor: a file sensor at Dagster's default interval starting a no-op run.

Loaded by ``dagster dev -f benchmarks/loop_anchor.py`` from ``benchmarks.bench_loop``; the
folder it watches is ``LOOP_ANCHOR_DIR``.
"""

import os

import dagster as dg


@dg.op
def noop() -> None:
    return None


@dg.job
def anchor_job() -> None:
    noop()


# No minimum_interval_seconds: Dagster's default (30 s) between evaluations.
@dg.sensor(job=anchor_job, default_status=dg.DefaultSensorStatus.RUNNING)
def anchor_landing(context: dg.SensorEvaluationContext):
    for name in sorted(os.listdir(os.environ["LOOP_ANCHOR_DIR"])):
        yield dg.RunRequest(run_key=name)


defs = dg.Definitions(jobs=[anchor_job], sensors=[anchor_landing])
