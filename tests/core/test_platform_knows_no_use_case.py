"""Issue 15's acceptance: the platform packages import no use case and name none of the fraud
demo's datasets, entities, columns, features or vocabularies; everything specific to it is
declared in ``usecases/fraud/``. Read from the source: every import, identifier, attribute and
string literal (docstrings and comments are prose and may mention the demo as an example).

``NOT_YET`` is the ratchet that listed the modules still driving the demo's simulator by name
while they were made generic; it is empty now and must stay so."""

from __future__ import annotations

import ast
from pathlib import Path

from core.usecase import load

ROOT = Path(__file__).resolve().parents[2]
PLATFORM = ("core", "orchestration", "features", "models", "serving", "quality")
FRAUD = load(ROOT / "usecases" / "fraud")
# Names the platform owns, which the demo's declaration happens to use too: Feast's timestamp
# columns, the joined label, and "category", a request field type.
PLATFORM_NAMES = frozenset(
    {"event_timestamp", "created_timestamp", "timestamp", "label", "category"}
)
# Words that mark the demo wherever they stand inside a name or a string ("card" alone is the
# model card, "transaction" alone a database transaction).
MARKERS = (
    "fraud",
    "card_id",
    "card_stats",
    "merchant",
    "chargeback",
    "transaction_id",
    "transactions",
)


# Modules allowed a fraud name for now: none.
NOT_YET: frozenset[str] = frozenset()
# The use case a process runs when LOOPLINE_USECASE is unset: the demo, by its name.
DEFAULT_NAME = ("core/usecase.py", "fraud")


def _exact_names() -> frozenset[str]:
    """The demo's dataset, column, request-field, vocabulary and score names."""
    names = set(FRAUD.datasets) | set(FRAUD.vocabularies) | set(FRAUD.request.fields)
    for dataset in FRAUD.datasets.values():
        names |= set(dataset.columns)
    names |= {FRAUD.task.score, *FRAUD.evaluation.slices, *FRAUD.evaluation.buckets}
    return frozenset(names - PLATFORM_NAMES)


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def _words(path: Path) -> list[tuple[int, str, bool]]:
    """(line, text, is a string literal) of every identifier, attribute, argument and string
    literal of a file."""
    tree = ast.parse(path.read_text(), str(path))
    prose = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            found.append((node.lineno, node.id, False))
        elif isinstance(node, ast.Attribute):
            found.append((node.lineno, node.attr, False))
        elif isinstance(node, ast.arg):
            found.append((node.lineno, node.arg, False))
        elif isinstance(node, ast.keyword) and node.arg:
            found.append((node.value.lineno, node.arg, False))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, f"import {node.module}", False))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, f"import {a.name}", False) for a in node.names)
        elif isinstance(node, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef):
            found.append((node.lineno, node.name, False))
        elif (
            isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose
        ):
            found.append((node.lineno, node.value, True))
    return found


def _offences(path: Path) -> list[str]:
    exact = _exact_names()
    out = []
    for line, word, literal in _words(path):
        lowered = word.lower()
        # An exact name counts as a string ("labels" the dataset, not a variable of labels).
        hit = (literal and word in exact) or any(marker in lowered for marker in MARKERS)
        hit = hit or word == "import usecases" or word.startswith("import usecases.")
        if (str(path.relative_to(ROOT)), word) == DEFAULT_NAME:
            continue
        if hit:
            out.append(f"{path.relative_to(ROOT)}:{line}: {word[:60]!r}")
    return out


def _platform_files() -> list[Path]:
    return [path for package in PLATFORM for path in sorted((ROOT / package).rglob("*.py"))]


def test_the_platform_packages_name_nothing_of_the_fraud_demo():
    offences = [
        hit
        for path in _platform_files()
        if str(path.relative_to(ROOT)) not in NOT_YET
        for hit in _offences(path)
    ]
    assert offences == [], f"{len(offences)} fraud names in the platform:\n" + "\n".join(
        offences[:60]
    )


def test_the_scan_finds_a_fraud_name_in_a_string_an_identifier_and_an_attribute(tmp_path: Path):
    source = tmp_path / "x.py"
    source.write_text(
        '"""The fraud demo, named in prose: allowed."""\n'
        "from usecases.fraud import simulator\n"
        "def f(frame):\n"
        "    card_id = 1\n"
        '    return frame["is_fraud"], frame.merchant_id, card_id\n'
    )
    words = {w for _, w, _ in _words(source)}
    assert "The fraud demo, named in prose: allowed." not in words
    assert {"card_id", "is_fraud", "merchant_id", "import usecases.fraud"} <= words
    exact = _exact_names()
    assert {"card_id", "is_fraud", "transactions", "country", "fraud_probability"} <= exact


def test_every_module_not_yet_generic_still_needs_its_place_on_the_list():
    clean = sorted(
        name for name in NOT_YET if (ROOT / name).exists() and not _offences(ROOT / name)
    )
    assert clean == [], f"{clean} name nothing of the demo any more: take them off NOT_YET"
