"""A small backtest of the delivery demo in its own process (``LOOPLINE_USECASE=delivery``:
the backtest reads its use case's task and declarations at import), printed as JSON for
``tests/orchestration/test_backtest_regression.py`` to judge: rain (concept drift) three days
into 20 served days, the first model left alone against retraining policies.

    LOOPLINE_USECASE=delivery python -m tests.usecases.delivery.backtest_run [policy ...]
"""

from __future__ import annotations

import json
import sys

from core.usecase import active
from orchestration.backtest import PolicySpec, demo_config, run_backtest, summary_markdown

DAYS, DRIFT_AFTER = 20, 3


def main(policies: list[str]) -> dict:
    if active().name != "delivery":
        raise SystemExit("run with LOOPLINE_USECASE=delivery")
    config = demo_config("concept", days=DAYS, drift_after=DRIFT_AFTER)
    result = run_backtest(config, [PolicySpec.parse(p) for p in policies])
    columns = ("step", "version", "rows", "count", "value", "estimate", "smoothed_value")
    return {
        "label_maturity_days": config.label_maturity.total_seconds() / 86400,
        "training_set": config.training_set.suffix,
        "drift_step": config.drift_step,
        "wall_seconds": result.wall_seconds,
        "trainings": result.trainings,
        "notes": list(result.notes),
        "policies": {
            name: {
                "summary": r.summary.to_dict(),
                "series": r.series.select(columns).to_dicts(),
                "retrainings": [t.to_dict() for t in r.retrainings],
            }
            for name, r in result.policies.items()
        },
        "table": summary_markdown(result),
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:] or ["static", "nightly", "triggers"]), default=str))
