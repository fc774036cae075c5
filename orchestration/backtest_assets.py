"""The backtest as a Dagster asset, so its table and plot sit in the UI beside the loop's.

Started by hand (no sensor or schedule): it replays a whole scenario through the engine in
``orchestration.backtest`` and takes minutes of CPU.
"""

import dagster as dg

GROUP = "backtest"


class BacktestRunConfig(dg.Config):
    """The scenario (the demo's shape) and the policies to replay through it side by side."""

    drift: str = "concept"
    drift_strength: float = 1.0
    # Fields of the use case simulator's ScenarioConfig, as KEY=VALUE.
    scenario: list[str] = []
    days: int = 30
    drift_after: int = 5
    seed: int = 3
    policies: list[str] = ["static", "nightly", "triggers"]


@dg.asset(group_name=GROUP, kinds={"pytorch", "polars"})
def backtest_report(
    context: dg.AssetExecutionContext, config: BacktestRunConfig
) -> dg.MaterializeResult:
    """Each retraining policy's live metric through a drifting scenario, in simulated time."""
    from core.simulation import scenario_options
    from models.plots import png_markdown
    from models.tasks import metric_label
    from orchestration import backtest as bt

    scenario = bt.demo_config(
        config.drift,
        drift_strength=config.drift_strength,
        scenario=scenario_options(config.scenario),
        seed=config.seed,
        days=config.days,
        drift_after=config.drift_after,
    )
    specs = [bt.PolicySpec.parse(p) for p in config.policies]
    result = bt.run_backtest(scenario, specs)
    context.log.info(f"backtest of {len(specs)} policies in {result.wall_seconds:.0f} s")
    metric = next(iter(result.policies.values())).summary.metric if result.policies else ""
    plot = png_markdown(bt.backtest_png(result), f"live {metric_label(metric)}")
    metadata: dict = {
        "table": dg.MetadataValue.md(bt.summary_markdown(result)),
        "plot": dg.MetadataValue.md(plot),
        "metric": metric,
        "wall_seconds": round(result.wall_seconds, 1),
        "drift_start": result.drift_start.isoformat(),
    }
    for name, r in result.policies.items():
        metadata[f"{name}/pre_drift_level"] = r.summary.pre_drift_level
        metadata[f"{name}/post_drift_mean"] = r.summary.post_drift_mean
        if r.summary.recovery_days is not None:
            metadata[f"{name}/recovery_days"] = r.summary.recovery_days
        metadata[f"{name}/retrainings"] = r.summary.retrainings
    return dg.MaterializeResult(metadata=metadata)


defs = dg.Definitions(assets=[backtest_report])
