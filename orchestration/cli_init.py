"""``loopline init <name>``: a new use case scaffolded from ``orchestration/templates/usecase``,
as ``feast init`` and Dagster's scaffolding do. The scaffold is a whole, working use case (demo
data, contracts, features, Feast repo, its own tests) for the user to reshape."""

from __future__ import annotations

import keyword
import re
import shutil
import tempfile
from pathlib import Path

import click
from rich.console import Console

from core.usecase import USECASES_DIR, load

TEMPLATE = Path(__file__).resolve().parent / "templates" / "usecase"
PLACEHOLDER = "{{name}}"
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")

console = Console()


def scaffold(name: str, parent: Path | None = None) -> Path:
    """Write the template as ``<parent>/<name>`` (``usecases/`` by default) with ``name`` filled
    in, and check the result loads. Refuses a name that is not a lowercase identifier and a
    folder that exists; a failure leaves nothing behind."""
    if not _NAME.match(name) or keyword.iskeyword(name):
        raise ValueError(
            f"{name!r}: a use case name is a lowercase identifier of up to 40 letters, digits "
            "and underscores, starting with a letter"
        )
    parent = Path(parent) if parent is not None else USECASES_DIR
    target = parent / name
    if target.exists():
        raise FileExistsError(f"{target} exists; choose another name or remove it")
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=parent) as tmp:
        staged = Path(tmp) / name
        shutil.copytree(TEMPLATE, staged, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for path in staged.rglob("*"):
            if path.is_file():
                path.write_text(path.read_text().replace(PLACEHOLDER, name))
        load(staged)  # the template must give a declaration that loads
        staged.rename(target)
    return target


@click.command()
@click.argument("name")
@click.option(
    "--path",
    "parent",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Create the use case in this folder instead of usecases/.",
)
def init(name: str, parent: Path | None) -> None:
    """Scaffold a new use case NAME: datasets, contracts, features, Feast repo, demo data and
    its own tests, ready to run and to reshape for your data."""
    try:
        target = scaffold(name, parent)
    except (ValueError, FileExistsError) as exc:
        raise click.ClickException(str(exc)) from exc
    selector = name if target.parent == USECASES_DIR else str(target)
    console.print(f"created [bold]{target}[/] (what each file declares: {target / 'README.md'})")
    console.print(f"  its tests:   .venv/bin/python -m pytest {target / 'tests'}")
    console.print(f"  run it:      LOOPLINE_USECASE={selector} make run")
    console.print(
        f"  your data:   landing/<dataset>-<anything>.parquet|csv, as declared in {target.name}/usecase.yaml"
    )
