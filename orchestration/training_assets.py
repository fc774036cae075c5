"""Training: candidate and baseline models, evaluation beside the champion, the blocking
validation gate, and the model registry.

training_set -> candidate_model, baseline_model -> evaluation_report (+ model_validation, a
blocking check) -> registered_model. Artifacts go under ``<home>/models/<run id>/``, the
registry is ``<home>/registry/registry.sqlite`` (a Postgres schema in the scale profile).

torch, Feast and the plotting stack are imported inside the assets that use them (the
values handed between assets are dataclasses from those modules, so those inputs carry no
annotation): every run process loads this code location, and an ingest run should not pay
for them.
"""

import math
from pathlib import Path

import dagster as dg
import polars as pl

from core.db import Location
from core.settings import REPO_ROOT
from core.usecase import active
from models.registry import CHAMPION, Registry
from models.spec import FeatureSpec, GatePolicy, Slicing, TrainConfig
from orchestration.resources import LooplineStorage, lane

GROUP = "training"
MODEL_NAME = f"{active().name}_model"

# The platform's defaults with the use case's `training:` and `gate:` declarations applied.
_TRAIN = active().declared("training", TrainConfig)
_GATE = active().declared("gate", GatePolicy)


class _TrainingRunConfig(dg.Config):
    seed: int = _TRAIN.seed
    epochs: int = _TRAIN.epochs
    batch_size: int = _TRAIN.batch_size
    patience: int = _TRAIN.patience
    device: str = _TRAIN.device
    # Each train row's loss weight halves per this many days of age; None weighs rows alike.
    recency_half_life_days: float | None = _TRAIN.recency_half_life_days

    def train_config(self) -> TrainConfig:
        return active().declared("training", TrainConfig, **self.model_dump())


class CandidateConfig(_TrainingRunConfig):
    """Hyperparameters of the candidate network; see models.spec.TrainConfig."""

    lr: float = _TRAIN.lr
    weight_decay: float = _TRAIN.weight_decay
    hidden: list[int] = list(_TRAIN.hidden)
    dropout: float = _TRAIN.dropout
    embedding_dim: int | None = _TRAIN.embedding_dim
    max_embedding_dim: int = _TRAIN.max_embedding_dim
    max_categories: int = _TRAIN.max_categories
    imbalance: str = _TRAIN.imbalance
    max_pos_weight: float = _TRAIN.max_pos_weight
    calibrate: bool = _TRAIN.calibrate


class BaselineConfig(_TrainingRunConfig):
    """The logistic-regression baseline; its step size is raised to at least 0.02."""


class GateConfig(dg.Config):
    """Thresholds of the champion/challenger gate; see models.gate.GatePolicy."""

    primary_metric: str = _GATE.primary_metric
    min_gain_over_baseline: float = _GATE.min_gain_over_baseline
    min_gain_over_champion: float = _GATE.min_gain_over_champion
    min_test_positives: int = _GATE.min_test_positives
    slice_tolerance: float = _GATE.slice_tolerance
    slice_min_support: int = _GATE.slice_min_support
    slice_min_positives: int = _GATE.slice_min_positives
    slice_alpha: float = _GATE.slice_alpha
    # "block" or "warn": what a verdict of "not enough support" (no slice compared) does.
    slices_unsupported: str = _GATE.slices_unsupported
    max_model_bytes: int = _GATE.max_model_bytes
    max_latency_ms_batch1: float = _GATE.max_latency_ms_batch1
    max_latency_ms_batch64: float = _GATE.max_latency_ms_batch64
    latency_repeats: int = _GATE.latency_repeats

    def policy(self) -> GatePolicy:
        return active().declared("gate", GatePolicy, **self.model_dump())


def feature_spec(home: Path, service_name: str) -> FeatureSpec:
    """The model's inputs: the FeatureService's features plus the request's own model inputs."""
    from feast import FeatureService

    from features.declarations import build_definitions
    from models.spec import feature_spec_of_service

    services = {d.name: d for d in build_definitions(home) if isinstance(d, FeatureService)}
    if service_name not in services:
        raise dg.Failure(f"unknown FeatureService {service_name!r}; known: {sorted(services)}")
    return feature_spec_of_service(services[service_name])


def _train_and_save(
    context: dg.AssetExecutionContext,
    storage: LooplineStorage,
    training_set,
    config: TrainConfig,
    kind: str,
) -> dg.Output:
    from models.artifact import save_training_result
    from models.train import train_baseline, train_model

    settings = storage.settings
    frame = pl.read_parquet(training_set.path)
    spec = feature_spec(settings.home, training_set.feature_service)
    result = (train_baseline if kind == "baseline" else train_model)(frame, spec, config)
    saved = save_training_result(
        result,
        settings.models / context.run_id / kind,
        golden_rows=frame.filter(pl.col("split") == "validation"),
        metadata={
            "model_name": MODEL_NAME,
            "dagster_run_id": context.run_id,
            "training_set": {
                "version": training_set.version,
                "path": training_set.path,
                "feature_service": training_set.feature_service,
                "batches": list(training_set.batches),
            },
        },
    )
    return dg.Output(saved, metadata=_training_metadata(result, saved, kind))


def _training_metadata(result, saved, kind: str) -> dict:
    from models.plots import loss_curves_png, png_markdown

    summary = result.summary()
    best = summary["best_val_loss"]
    return {
        "best_val_loss": dg.MetadataValue.float(best) if best is not None else "no validation",
        "path": dg.MetadataValue.path(str(saved.path)),
        "size_bytes": saved.size_bytes,
        "parameters": summary["parameters"],
        "device": summary["train_device"],
        "epochs_run": summary["epochs_run"],
        "best_epoch": summary["best_epoch"],
        "stopped_early": summary["stopped_early"],
        "samples_per_s": dg.MetadataValue.float(summary["samples_per_s"]),
        "train_seconds": dg.MetadataValue.float(summary["train_seconds"]),
        "calibration": dg.MetadataValue.json(summary["calibration"]),
        "hyperparameters": dg.MetadataValue.json(summary["config"]),
        "weighting": dg.MetadataValue.json(summary["weighting"]),
        "loss_curves": dg.MetadataValue.md(
            png_markdown(loss_curves_png({kind: result.history}), "loss curves")
        ),
    }


@dg.asset(group_name=GROUP, kinds={"pytorch"})
def candidate_model(
    context: dg.AssetExecutionContext,
    config: CandidateConfig,
    storage: LooplineStorage,
    training_set,
) -> dg.Output:
    """The challenger: a tabular network trained on the training set (CUDA when present)."""
    return _train_and_save(context, storage, training_set, config.train_config(), "candidate")


@dg.asset(group_name=GROUP, kinds={"pytorch"})
def baseline_model(
    context: dg.AssetExecutionContext,
    config: BaselineConfig,
    storage: LooplineStorage,
    training_set,
) -> dg.Output:
    """Logistic regression on the same data and split: the bar every candidate must clear."""
    return _train_and_save(context, storage, training_set, config.train_config(), "baseline")


@dg.asset(
    group_name=GROUP,
    kinds={"pytorch"},
    check_specs=[
        dg.AssetCheckSpec(
            "model_validation",
            asset="evaluation_report",
            blocking=True,
            description="Champion/challenger gate: beats baseline and champion, no slice "
            "regression, reloads identically, within size and latency budgets.",
        )
    ],
)
def evaluation_report(
    context: dg.AssetExecutionContext,
    config: GateConfig,
    storage: LooplineStorage,
    training_set,
    candidate_model,
    baseline_model,
):
    """The candidate on the test split beside the baseline and the current champion, judged by the gate."""
    from models.release import Lineage, evaluate_candidate, git_code_version, register_candidate

    settings = storage.settings
    registry = Registry.for_settings(settings)
    champion_version = registry.get_alias(CHAMPION)
    champion = (
        (champion_version, registry.get(champion_version).artifact_dir)
        if champion_version
        else None
    )
    lineage = Lineage(
        training_set_version=training_set.version,
        feature_service=training_set.feature_service,
        training_batches=tuple(training_set.batches),
        training_set_path=training_set.path,
        dagster_run_id=context.run_id,
        code_version=git_code_version(REPO_ROOT),
    )
    evaluation = evaluate_candidate(
        pl.read_parquet(training_set.path),
        candidate_model,
        baseline_model,
        config.policy(),
        lineage,
        champion=champion,
        model_name=MODEL_NAME,
        slicing=Slicing.of(active()),
        intended_use=active().description,
    )
    decision = evaluation.decision
    check_metadata: dict = {
        "verdict": decision.verdict,
        **{f"slices_{k.replace(' ', '_')}": n for k, n in decision.slice_outcomes().items()},
        "champion": champion_version or "none",
        "checks": dg.MetadataValue.md(decision.to_markdown()),
        "reasons": dg.MetadataValue.md("\n".join(f"- {r}" for r in decision.reasons) or "none"),
        "warnings": dg.MetadataValue.md("\n".join(f"- {w}" for w in decision.warnings) or "none"),
        "policy": dg.MetadataValue.json(evaluation.policy.to_dict()),
    }
    if not decision.passed:
        # Registered with its rejection in one transaction: the registry keeps the candidate,
        # its card and every reason; it is never the challenger and the champion does not move.
        version = register_candidate(
            registry, evaluation, model_name=MODEL_NAME, dagster_run_id=context.run_id
        )
        check_metadata["rejected_version"] = version
        context.log.warning(f"{version} rejected: {'; '.join(decision.reasons)}")
    yield dg.Output(evaluation, metadata=_evaluation_metadata(evaluation))
    # A promotable "not enough support" verdict shows as a failed check of WARN severity,
    # which blocks nothing downstream; every other failure is an ERROR and blocks.
    yield dg.AssetCheckResult(
        check_name="model_validation",
        passed=decision.verdict == "passed",
        severity=dg.AssetCheckSeverity.WARN if decision.passed else dg.AssetCheckSeverity.ERROR,
        metadata=check_metadata,
        description=decision.verdict
        + (
            ": " + "; ".join(decision.reasons or decision.warnings)
            if decision.verdict != "passed"
            else ""
        ),
    )


def _where(location: Location) -> dg.MetadataValue:
    """A registry file as a path in the UI; a Postgres schema as text (no password in it)."""
    if isinstance(location, Path):
        return dg.MetadataValue.path(str(location))
    return dg.MetadataValue.text(str(location))


def _evaluation_metadata(evaluation) -> dict:
    from models.evaluate import evaluation_markdown
    from models.plots import calibration_png, png_markdown, pr_curve_png, slice_metric_png
    from models.tasks import of as task_of

    reports = evaluation.reports
    challenger = evaluation.challenger
    task = task_of(challenger.task)
    metadata: dict = {
        name: dg.MetadataValue.float(float(challenger.metrics[name]))
        for name in (*task.headline, "ece")
        if math.isfinite(challenger.metrics.get(name, math.nan))
    }
    if task.has_threshold:
        metadata["threshold"] = dg.MetadataValue.float(challenger.threshold)
        metadata["pr_curve"] = dg.MetadataValue.md(png_markdown(pr_curve_png(reports), "PR curve"))
    metadata.update(
        {
            "test_rows": challenger.support,
            "champion": evaluation.champion_version or "none",
            "gate_passed": evaluation.decision.passed,
            "gate_verdict": evaluation.decision.verdict,
            "report": dg.MetadataValue.md(evaluation_markdown(reports)),
            "model_card": dg.MetadataValue.md(evaluation.card),
            "calibration": dg.MetadataValue.md(png_markdown(calibration_png(reports), "calib")),
            "infra": dg.MetadataValue.json(evaluation.infra.to_dict()),
        }
    )
    for column in active().evaluation.slices:
        if any(s.column == column for s in challenger.slices):
            png = slice_metric_png(reports, column)
            metadata[f"slices_{column}"] = dg.MetadataValue.md(png_markdown(png, column))
    return metadata


@dg.asset(group_name=GROUP, kinds={"sqlite"})
def registered_model(
    context: dg.AssetExecutionContext,
    storage: LooplineStorage,
    candidate_model,
    evaluation_report,
) -> dg.Output[str]:
    """The validated candidate in the model registry with its lineage and verdict: the
    challenger. Only the deployment asset changes what serves (decision 51)."""
    from models.release import register_candidate
    from models.tasks import of as task_of

    evaluation = evaluation_report
    if Path(evaluation.candidate.path) != Path(candidate_model.path):
        raise dg.Failure(
            f"evaluation_report judged {evaluation.candidate.path}, not the current "
            f"candidate_model {candidate_model.path}; materialize evaluation_report first"
        )
    if not evaluation.decision.passed:
        raise dg.Failure(
            "the gate rejected this candidate: " + "; ".join(evaluation.decision.reasons)
        )
    registry = Registry.for_settings(storage.settings)
    version = register_candidate(
        registry, evaluation, model_name=MODEL_NAME, dagster_run_id=context.run_id
    )
    context.log.info(
        f"{version} registered as the challenger to {evaluation.champion_version or 'no champion'}"
        "; the deployment asset takes it to serving"
    )
    registered = registry.get(version)
    return dg.Output(
        version,
        metadata={
            "version": version,
            "status": registered.status,
            "aliases": ", ".join(registered.aliases) or "none",
            "registry": _where(registry.location),
            "artifact_dir": dg.MetadataValue.path(registered.artifact_dir),
            **{
                metric: dg.MetadataValue.float(float(registered.metrics[metric]))
                for metric in [_GATE.primary_metric or task_of(active().task.type).primary_metric]
                if metric in registered.metrics
            },
            "lineage": dg.MetadataValue.json(registered.lineage()),
        },
    )


training_job = dg.define_asset_job(
    "training_job",
    selection=dg.AssetSelection.assets("training_set") | dg.AssetSelection.groups(GROUP),
    executor_def=dg.in_process_executor,  # one step at a time anyway (decision 36)
    tags=lane("training"),
    description="Rebuild the training set, then train, evaluate, validate and register a "
    "challenger (materialize `deployment`, or run continuous_training, to serve it).",
)

defs = dg.Definitions(
    assets=[candidate_model, baseline_model, evaluation_report, registered_model],
    jobs=[training_job],
)
