"""The layering ARCHITECTURE.md draws: core imports no other Loopline package, and only
orchestration imports Dagster. Read from the source (every import, at any depth), so a lazy
import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("core", "quality", "features", "models", "serving", "orchestration", "usecases")


def _imports(package: str) -> dict[str, set[str]]:
    """Top-level modules imported by each file of ``package``."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


def test_core_imports_no_other_loopline_package():
    offenders = {
        path: sorted(names & set(PACKAGES) - {"core"})
        for path, names in _imports("core").items()
        if names & set(PACKAGES) - {"core"}
    }
    assert offenders == {}


@pytest.mark.parametrize("package", [p for p in PACKAGES if p != "orchestration"])
def test_only_orchestration_imports_dagster_or_orchestration(package: str):
    offenders = {
        path: sorted(names & {"dagster", "orchestration"})
        for path, names in _imports(package).items()
        if names & {"dagster", "orchestration"}
    }
    assert offenders == {}


def test_the_scan_sees_imports_at_any_depth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "x.py").write_text("def f():\n    from features import store\n")
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    assert _imports("core") == {"core/x.py": {"features"}}


def test_no_module_name_repeats_across_packages():
    # "monitoring.py" in two packages made every traceback and import ambiguous to a reader.
    seen: dict[str, list[str]] = {}
    for package in PACKAGES:
        for path in (ROOT / package).glob("*.py"):
            if path.name != "__init__.py":
                seen.setdefault(path.name, []).append(package)
    assert {name: where for name, where in seen.items() if len(where) > 1} == {}
