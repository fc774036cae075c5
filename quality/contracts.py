"""Run a dataset's soda-core 4 data contract over one parquet batch.

Each dataset's contract is the file its use case declares (``usecases/fraud/contracts/`` for
the demo). Each run opens its own in-memory
DuckDB connection with a view named after the dataset over the parquet file, so no DuckDB
database file (and no file lock) is involved and runs can happen in parallel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import duckdb

from core.jsonutil import json_safe
from core.storage import duckdb_uri, register_filesystems
from core.usecase import active
from quality.schema import keys

DATA_SOURCE_NAME = "batch"

Outcome = Literal["passed", "failed", "not_evaluated"]

_OUTCOMES: dict[str, Outcome] = {
    "PASSED": "passed",
    "WARN": "passed",
    "FAILED": "failed",
    "NOT_EVALUATED": "not_evaluated",
    "EXCLUDED": "not_evaluated",
}


class ContractError(RuntimeError):
    """The contract itself could not be verified (unknown dataset, invalid YAML, engine error)."""


@dataclass(frozen=True)
class CheckOutcome:
    """One contract check as the pipeline and the UI show it."""

    name: str
    column: str | None
    outcome: Outcome
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON for asset metadata."""
        return {
            "name": self.name,
            "column": self.column,
            "outcome": self.outcome,
            "diagnostics": self.diagnostics,
        }


@dataclass(frozen=True)
class ContractResult:
    """Verdict on one batch: whether it may pass, and why not in words a person can act on.

    ``schema_skew`` separates broken structure (quarantine: the batch cannot be used at all)
    from value problems (the batch is readable; the pipeline flags it instead).
    """

    passed: bool
    checks: list[CheckOutcome]
    reasons: list[str]
    schema_skew: bool
    dataset: str = ""

    @property
    def failed_checks(self) -> list[CheckOutcome]:
        """Checks that did not pass (failed or could not be evaluated)."""
        return [c for c in self.checks if c.outcome != "passed"]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON for asset metadata and the quarantine record."""
        return {
            "dataset": self.dataset,
            "passed": self.passed,
            "schema_skew": self.schema_skew,
            "reasons": list(self.reasons),
            "checks": [c.to_dict() for c in self.checks],
        }


def contract_path(dataset: str) -> Path:
    """The contract YAML of a dataset of the active use case; fails for datasets it lacks."""
    uc = active()
    if dataset not in uc.datasets:
        raise ContractError(f"unknown dataset {dataset!r}; expected one of {sorted(uc.datasets)}")
    return uc.contract_path(dataset)


def run_contract(
    dataset: str,
    parquet_path: Path,
    *,
    now: datetime | None = None,
    max_age_days: int | None = None,
    future_allowance_minutes: int | None = None,
) -> ContractResult:
    """Verify ``dataset``'s contract over one parquet batch, in-process.

    ``now`` is the validation time the time-sanity checks compare event times with (default:
    the current UTC time); passing it makes runs reproducible. ``max_age_days`` and
    ``future_allowance_minutes`` override the contract's defaults (120 days, 15 minutes).
    """
    os.environ.setdefault("SODA_CORE_TELEMETRY_ENABLED", "false")
    # soda-core starts its telemetry exporter when verify_api is imported, so import it late.
    from soda_core.contracts.api.verify_api import verify_contract_locally
    from soda_duckdb.common.data_sources.duckdb_data_source import DuckDBDataSourceImpl

    path = contract_path(dataset)
    variables = _variables(now, max_age_days, future_allowance_minutes)
    parquet = duckdb_uri(parquet_path).replace("'", "''")

    con = duckdb.connect(":memory:")
    try:
        register_filesystems(con, [parquet])
        con.execute(f"CREATE VIEW {dataset} AS SELECT * FROM read_parquet('{parquet}')")
        data_source = DuckDBDataSourceImpl.from_existing_cursor(con, name=DATA_SOURCE_NAME)
        session = verify_contract_locally(
            data_sources=[data_source], contract_file_path=str(path), variables=variables
        )
    finally:
        con.close()

    results = session.contract_verification_results
    if not results or not results[0].check_results:
        raise ContractError(f"contract {path.name} was not verified: {session.get_errors_str()}")
    return _to_result(dataset, results[0].check_results, session.get_errors())


def _variables(
    now: datetime | None, max_age_days: int | None, future_allowance_minutes: int | None
) -> dict[str, str]:
    if now is None:
        now = datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (event times are UTC instants)")
    variables = {"now": now.astimezone(UTC).isoformat()}
    if max_age_days is not None:
        variables["max_age_days"] = str(int(max_age_days))
    if future_allowance_minutes is not None:
        variables["future_allowance_minutes"] = str(int(future_allowance_minutes))
    return variables


def _to_result(dataset: str, check_results: list[Any], errors: list[str]) -> ContractResult:
    checks: list[CheckOutcome] = []
    reasons: list[str] = []
    schema_skew = False
    not_evaluated = 0
    for check_result in check_results:
        check = check_result.check
        outcome = _OUTCOMES[check_result.outcome.name]
        diagnostics = _diagnostics(check_result)
        checks.append(
            CheckOutcome(
                name=check.name or check.type,
                column=check.column_name,
                outcome=outcome,
                diagnostics=diagnostics,
            )
        )
        if check.type == "schema" and outcome != "passed":
            schema_skew = True
            reasons.extend(_schema_reasons(check_result, outcome))
        elif outcome == "failed":
            reasons.append(
                _value_reason(dataset, check.type, check.column_name, check, diagnostics)
            )
        elif outcome == "not_evaluated":
            not_evaluated += 1
    if not_evaluated:
        cause = (
            "because the schema does not match"
            if schema_skew
            else f"({'; '.join(errors) or 'no error reported'})"
        )
        reasons.append(f"{not_evaluated} checks could not be evaluated {cause}")
    passed = all(c.outcome == "passed" for c in checks)
    return ContractResult(
        dataset=dataset, passed=passed, checks=checks, reasons=reasons, schema_skew=schema_skew
    )


def _schema_reasons(check_result: Any, outcome: Outcome) -> list[str]:
    if outcome == "not_evaluated":
        return ["schema could not be read"]
    reasons = [f"missing column '{c}'" for c in check_result.expected_column_names_not_actual]
    reasons += [f"unexpected column '{c}'" for c in check_result.actual_column_names_not_expected]
    reasons += [
        f"column '{m.column}': expected type {m.get_expected().lower()}, got {m.get_actual().lower()}"
        for m in check_result.column_data_type_mismatches
    ]
    if check_result.are_columns_out_of_order:
        reasons.append("columns are out of order")
    return reasons


def _value_reason(
    dataset: str, check_type: str, column: str | None, check: Any, diagnostics: dict[str, Any]
) -> str:
    is_key = column == keys().get(dataset)
    if check_type == "missing":
        noun = "null keys" if is_key else "null values"
        return f"{column}: {diagnostics.get('missing_count')} {noun}"
    if check_type == "duplicate":
        noun = "duplicate keys" if is_key else "duplicate values"
        return f"{column}: {diagnostics.get('duplicate_count')} {noun}"
    if check_type == "invalid":
        return (
            f"{column}: {diagnostics.get('invalid_count')} invalid values (expected {check.name})"
        )
    if check_type == "row_count":
        return f"empty batch: {diagnostics.get('actual')} rows"
    if check_type == "failed_rows":
        return f"{diagnostics.get('failed_rows_count')} rows fail '{check.name}'"
    subject = f"{column}: " if column else ""
    return f"{subject}{check.name or check_type} failed (value {diagnostics.get('actual')})"


def _diagnostics(check_result: Any) -> dict[str, Any]:
    diagnostics = {
        k: json_safe(v) for k, v in (check_result.diagnostic_metric_values or {}).items()
    }
    diagnostics["actual"] = json_safe(check_result.threshold_value)
    threshold = check_result.check.threshold
    if threshold is not None:
        diagnostics["expected"] = {
            k: json_safe(v)
            for k, v in vars(threshold).items()
            if v is not None and k.startswith("must")
        }
    if check_result.check.type == "schema" and hasattr(check_result, "expected_columns"):
        diagnostics["missing_columns"] = list(check_result.expected_column_names_not_actual)
        diagnostics["extra_columns"] = list(check_result.actual_column_names_not_expected)
        diagnostics["type_mismatches"] = [
            {"column": m.column, "expected": m.get_expected(), "actual": m.get_actual()}
            for m in check_result.column_data_type_mismatches
        ]
    return diagnostics
