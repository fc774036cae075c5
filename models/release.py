"""From a trained candidate to a registry entry: judge it, document it, record its lineage.

The orchestration layer calls these in order (evaluate_candidate, then register_candidate
for a rejected or an accepted model); they hold the logic so the Dagster assets stay thin.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import polars as pl

from core.jsonutil import json_safe
from models.artifact import SavedModel, load_model, read_sidecar
from models.card import model_card
from models.checksum import file_checksums
from models.evaluate import EvaluationReport, evaluate_model
from models.gate import GateDecision, GatePolicy, InfraReport, infra_validate, validate_challenger
from models.registry import ModelRecord, Registry, Verdict
from models.spec import NO_SLICES, FeatureSpec, Slicing

CARD = "MODEL_CARD.md"
EVALUATION = "evaluation.json"
INFRA_SAMPLE_ROWS = 64


@dataclass(frozen=True)
class Lineage:
    """Where a candidate came from: the training set (version, batches, features) and the code."""

    training_set_version: str
    feature_service: str
    training_batches: tuple[str, ...]
    training_set_path: str
    dagster_run_id: str | None = None
    code_version: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["training_batches"] = list(self.training_batches)
        return data


@dataclass(frozen=True)
class Evaluation:
    """One candidate judged: its reports beside baseline and champion, infra facts, the verdict."""

    candidate: SavedModel
    baseline: SavedModel
    champion_version: str | None
    reports: dict[str, EvaluationReport]
    infra: InfraReport
    decision: GateDecision
    policy: GatePolicy
    lineage: Lineage
    card: str

    @property
    def challenger(self) -> EvaluationReport:
        return self.reports["challenger"]

    def to_dict(self) -> dict[str, Any]:
        return json_safe(
            {
                "candidate_dir": str(self.candidate.path),
                "baseline_dir": str(self.baseline.path),
                "champion_version": self.champion_version,
                "reports": {name: r.to_dict() for name, r in self.reports.items()},
                "infra": self.infra.to_dict(),
                "decision": self.decision.to_dict(),
                "policy": self.policy.to_dict(),
                "lineage": self.lineage.to_dict(),
            }
        )


def evaluate_saved(
    model_dir: str | Path, frame: pl.DataFrame, name: str, slicing: Slicing = NO_SLICES
) -> EvaluationReport:
    """Reloads a saved model (checksums verified) and evaluates it on the test split."""
    module, preprocessor = load_model(model_dir)
    return evaluate_model(module, preprocessor, frame, name=name, slicing=slicing)


def evaluate_candidate(
    frame: pl.DataFrame,
    candidate: SavedModel,
    baseline: SavedModel,
    policy: GatePolicy,
    lineage: Lineage,
    *,
    champion: tuple[str, str | Path] | None = None,
    model_name: str = "model",
    slicing: Slicing = NO_SLICES,
    intended_use: str = "",
) -> Evaluation:
    """Challenger, baseline and champion (version, directory) on one split, then the gate.

    All three are reloaded from disk, so what is judged is what would be served.
    """
    reports = {
        "challenger": evaluate_saved(candidate.path, frame, "challenger", slicing),
        "baseline": evaluate_saved(baseline.path, frame, "baseline", slicing),
    }
    if champion is not None:
        reports["champion"] = evaluate_saved(champion[1], frame, "champion", slicing)
    sample = frame.filter(pl.col("split") == reports["challenger"].split).head(INFRA_SAMPLE_ROWS)
    infra = infra_validate(candidate.path, sample, policy)
    decision = validate_challenger(
        reports["challenger"], reports["baseline"], reports.get("champion"), infra, policy
    )
    sidecar = read_sidecar(candidate.path)
    card_lineage = {
        **lineage.to_dict(),
        "champion_at_evaluation": champion[0] if champion else None,
    }
    card = model_card(
        name=model_name,
        version=None,
        spec=FeatureSpec.from_dict(sidecar["preprocessor"]["spec"]),
        training=sidecar["metadata"]["training"],
        reports=reports,
        decision=decision,
        lineage=card_lineage,
        intended_use=intended_use,
    )
    return Evaluation(
        candidate=candidate,
        baseline=baseline,
        champion_version=champion[0] if champion else None,
        reports=reports,
        infra=infra,
        decision=decision,
        policy=policy,
        lineage=lineage,
        card=card,
    )


def write_documents(evaluation: Evaluation) -> dict[str, Path]:
    """Stores the model card and the evaluation beside the weights, once.

    A document already there is kept: the registry may hold its checksum, and a model
    directory must not change under a registered version.
    """
    root = Path(evaluation.candidate.path)
    docs = {
        CARD: evaluation.card,
        EVALUATION: json.dumps(evaluation.to_dict(), indent=1, sort_keys=True),
    }
    written = {}
    for name, text in docs.items():
        target = root / name
        if not target.exists():
            _write_atomic(target, text)
        written[name] = target
    return written


def model_record(
    evaluation: Evaluation,
    *,
    model_name: str,
    dagster_run_id: str | None,
) -> ModelRecord:
    """The registry record of the candidate: every file with its checksum, and full lineage."""
    sidecar = read_sidecar(evaluation.candidate.path)
    training = dict(sidecar["metadata"]["training"])
    config = training.pop("config")
    window = training.pop("data_window")
    lineage = evaluation.lineage
    challenger = evaluation.challenger
    return ModelRecord(
        model_name=model_name,
        artifact_dir=str(evaluation.candidate.path),
        artifacts=file_checksums(evaluation.candidate.path),
        training_set_version=lineage.training_set_version,
        feature_service=lineage.feature_service,
        training_batches=lineage.training_batches,
        hyperparameters=config,
        metrics={
            **challenger.metrics,
            "threshold": challenger.threshold,
            "split": challenger.split,
            "threshold_split": challenger.threshold_split,
        },
        data_window=window,
        dagster_run_id=dagster_run_id,
        code_version=lineage.code_version,
        extra={
            "training_set_path": lineage.training_set_path,
            "evaluation_run_id": lineage.dagster_run_id,
            "training_run_id": sidecar["metadata"].get("dagster_run_id"),
            "baseline_artifact_dir": str(evaluation.baseline.path),
            "champion_at_evaluation": evaluation.champion_version,
            "compared": {n: r.metrics for n, r in evaluation.reports.items() if n != "challenger"},
            "score_ks_vs_champion": score_ks_vs_champion(evaluation),
            "gate": evaluation.decision.to_dict(),
            "infra": evaluation.infra.to_dict(),
            "policy": evaluation.policy.to_dict(),
            "feature_spec": sidecar["preprocessor"]["spec"],
            "training": training,
        },
    )


def score_ks_vs_champion(evaluation: Evaluation) -> float | None:
    """How far apart the challenger's and the champion's scores of the gate's test split lie
    (two-sample KS; None without a champion or its row-level scores). The shadow lets live
    scores move as far (decision 55): a retrain on a drifted world, or one whose Platt scaling
    met another fraud rate, scores differently by design, and the gate judged it so."""
    from quality.drift import ks_statistic

    champion = evaluation.reports.get("champion")
    challenger = evaluation.challenger
    if champion is None or champion.rows is None or challenger.rows is None:
        return None
    return round(ks_statistic(champion.rows.predictions, challenger.rows.predictions), 4)


def verdict_of(evaluation: Evaluation) -> Verdict:
    """The gate's decision as the registry records it, with the champion it was judged against."""
    decision = evaluation.decision
    return Verdict(
        passed=decision.passed,
        champion=evaluation.champion_version,
        reasons=tuple(decision.reasons),
        words=decision.verdict,
        detail={"warnings": list(decision.warnings)},
    )


def register_candidate(
    registry: Registry, evaluation: Evaluation, *, model_name: str, dagster_run_id: str | None
) -> str:
    """Documents the candidate and registers it with the gate's verdict, in one transaction
    (idempotent: same files, same version)."""
    write_documents(evaluation)
    record = model_record(evaluation, model_name=model_name, dagster_run_id=dagster_run_id)
    return registry.register(record, verdict_of(evaluation))


def git_code_version(repo: str | Path) -> str | None:
    """HEAD's commit, suffixed "+dirty" when tracked files differ; None outside a git checkout."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}+dirty" if dirty else sha


def _write_atomic(target: Path, text: str) -> None:
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
