"""Security properties a user relies on: weights never unpickled, SQL never spliced, landing
names never trusted, the UI on loopback, no secrets in the repository."""

from __future__ import annotations

import ast
import os
import pickle
import re
import subprocess
from pathlib import Path

import polars as pl
import pytest
import torch

from models.artifact import CHECKSUMS, GOLDEN, SIDECAR, WEIGHTS, load_model, save_model
from models.checksum import sha256_file
from models.registry import ModelRecord, Registry, Verdict
from models.train import train_model
from quality import contracts
from quality.ledger import BatchLedger
from tests.models.testkit import FAST, SPEC, make_training_set
from tests.orchestration.conftest import Platform
from usecases.fraud import simulator

REPO = Path(__file__).resolve().parents[2]
INJECTIONS = [
    "x' OR '1'='1",
    "'; DROP TABLE batches; --",
    '" OR ""="',
    "v0001' --",
    "%",
    "\x00",
]


class _Payload:
    """Unpickling this touches a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    result = train_model(make_training_set(600), SPEC, FAST)
    return save_model(result.model, result.preprocessor, tmp_path_factory.mktemp("m") / "m").path


def test_a_pickle_payload_in_model_pt_is_refused_without_running(saved_model, tmp_path):
    evil = tmp_path / "evil"
    evil.mkdir()
    for name in (SIDECAR, GOLDEN):
        (evil / name).write_bytes((saved_model / name).read_bytes())
    marker = tmp_path / "pwned"
    state = torch.load(saved_model / WEIGHTS, weights_only=True)
    torch.save({**state, "payload": _Payload(marker)}, evil / WEIGHTS)
    # The attacker rewrote the checksums too, so only weights_only stands in the way.
    sums = "".join(f"{sha256_file(evil / n)}  {n}\n" for n in (WEIGHTS, SIDECAR, GOLDEN))
    (evil / CHECKSUMS).write_text(sums)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_model(evil)
    assert not marker.exists()
    # Unchecked, the same file runs its payload: the refusal above is what protects.
    torch.load(evil / WEIGHTS, weights_only=False)
    assert marker.exists()
    # A tampered file under the original checksums is refused before torch sees it.
    (saved_model.parent / "tampered").mkdir()
    tampered = saved_model.parent / "tampered"
    for name in (SIDECAR, GOLDEN, CHECKSUMS):
        (tampered / name).write_bytes((saved_model / name).read_bytes())
    (tampered / WEIGHTS).write_bytes((evil / WEIGHTS).read_bytes())
    with pytest.raises(Exception, match="failed verification"):
        load_model(tampered)


def test_every_torch_load_in_the_product_is_weights_only():
    calls = []
    for package in ("models", "serving", "features", "quality", "orchestration"):
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "torch"
                ):
                    kw = {k.arg: k.value for k in node.keywords}
                    weights_only = kw.get("weights_only")
                    calls.append((str(path.relative_to(REPO)), node.lineno))
                    assert isinstance(weights_only, ast.Constant) and weights_only.value is True, (
                        path,
                        node.lineno,
                    )
    assert calls  # the model loader is among them


def test_ids_carrying_sql_are_simply_not_found(tmp_path, saved_model):
    ledger = BatchLedger(tmp_path / "ledger.sqlite")
    ledger.receive("b1", "transactions", tmp_path / "transactions-b1.csv")
    registry = Registry(tmp_path / "registry.sqlite")
    artifacts = {n: sha256_file(saved_model / n) for n in (WEIGHTS, SIDECAR, GOLDEN, CHECKSUMS)}
    record = ModelRecord(
        "fraud", str(saved_model), artifacts, "t", "fraud_model_v1", ["b1"], {}, {}, {}
    )
    version = registry.register(record, Verdict(True, None))
    for bad in INJECTIONS:
        assert ledger.get(bad) is None
        assert ledger.batches(dataset=bad) == [] and ledger.batches(status=bad) == []
        assert ledger.events(bad) == []
        with pytest.raises(KeyError):
            registry.get(bad)
        assert registry.events(bad) == []
        assert registry.get_alias(bad) is None
    # Stored as data when it is data: an id with quotes round-trips intact.
    ledger.receive(INJECTIONS[1], "transactions", tmp_path / "x.csv")
    assert ledger.get(INJECTIONS[1]).batch_id == INJECTIONS[1]
    assert [b.batch_id for b in ledger.batches(dataset="transactions")][-1] == "b1"
    assert registry.get(version).status == "challenger"
    assert len(ledger.batches()) == 2


def test_a_home_path_with_quotes_is_read_as_a_path_by_the_contract(tmp_path):
    folder = tmp_path / "it's'; select 1; --"
    folder.mkdir()
    frame = simulator.Simulator(simulator.ScenarioConfig(seed=2, rows_per_batch=50)).transactions(0)
    frame.write_parquet(folder / "batch.parquet")
    result = contracts.run_contract("transactions", folder / "batch.parquet")
    assert result.passed, result.reasons


UNSAFE_NAMES = [
    "transactions-a\x01b.parquet",
    "transactions-\n.parquet",
    "transactions- spaced.parquet",
    "-transactions.parquet",
    "transactions-\u00e9.parquet",
    "transactions-..%2f..%2fetc.parquet",
    "transactions-a\\..\\b.parquet",
    "transactions-\u202egnp.parquet",
]


def test_landing_names_that_could_traverse_or_confuse_are_quarantined_not_ingested(tmp_path):
    platform = Platform(tmp_path / "home")
    landing = platform.settings.landing
    outside = tmp_path / "outside.parquet"
    frame = simulator.Simulator(simulator.ScenarioConfig(seed=3, rows_per_batch=40)).transactions(0)
    frame.write_parquet(outside)
    for k, name in enumerate(UNSAFE_NAMES):
        frame.with_columns(pl.lit(f"t{k}").alias("transaction_id")).head(1).write_parquet(
            landing / name
        )
    # A link out of the landing folder: its target must not be read, copied or moved.
    os.symlink(outside, landing / "transactions-link.parquet")
    os.symlink("../../outside.parquet", landing / "transactions-rel.parquet")
    before = sorted(p.name for p in tmp_path.iterdir())
    outcomes = platform.ingest_all()
    assert outcomes == []  # nothing was ingested
    ledger = BatchLedger(platform.settings.ledger_path)
    quarantined = ledger.batches(status="quarantined")
    assert len(quarantined) == len(UNSAFE_NAMES) + 2
    assert all(
        "unsafe file name" in r.reason or "symbolic link" in r.reason for r in quarantined
    ), [r.reason for r in quarantined]
    assert list(landing.iterdir()) == []
    assert not list(platform.settings.raw.rglob("*.parquet"))
    # The linked file outside is untouched and no copy of it was taken into the home.
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert pl.read_parquet(outside).equals(frame)
    copies = [p for p in platform.settings.home.rglob("*") if p.is_file()]
    assert not any(p.read_bytes() == outside.read_bytes() for p in copies if p.suffix == ".parquet")


def test_the_dagster_webserver_binds_loopback_by_default(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from core.settings import Settings
    from orchestration import cli, cli_loop, platform

    started = {}

    class Recorder:
        def __init__(self, cmd, **kwargs):
            started["cmd"] = cmd
            self.pid = 0

        def poll(self) -> int:  # the log rotator's thread asks: exited at once
            return 0

    monkeypatch.setattr(platform.subprocess, "Popen", Recorder)
    platform.start_dagster(Settings(tmp_path / "home").ensure())
    cmd = started["cmd"]
    assert cmd[cmd.index("-h") + 1] == "127.0.0.1"
    run = cli.main.commands["run"]
    assert {p.name: p.default for p in run.params}["host"] == "127.0.0.1"
    assert "127.0.0.1" in CliRunner().invoke(cli.main, ["run", "--help"]).output
    assert cli_loop.LivePlatform.__dataclass_fields__["host"].default == "127.0.0.1"


# Fake credentials the tests use on purpose (never a real service), and the placeholder
# spellings of the docs.
_ALLOWED_PASSWORDS = {"password", "pw", "...", "p", "s3cret", "hunter2"}
_SECRET_PATTERNS = {
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "AWS access key": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"),
    "Slack token": re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    "OpenAI-style key": re.compile(r"\bsk-[A-Za-z0-9]{32,}\b"),
    "assigned secret": re.compile(
        r"""(?i)\b(api[_-]?key|secret[_-]?key|access[_-]?token|auth[_-]?token)\b\s*[:=]\s*["'][A-Za-z0-9/+_\-]{20,}["']"""
    ),
}
_URL_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@'\"]*:([^/\s@'\"]+)@")


def test_no_secrets_in_tracked_files():
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.split(b"\0")
    found = []
    scanned = 0
    for name in filter(None, files):
        path = REPO / name.decode()
        if not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        text = path.read_bytes().decode("utf-8", errors="ignore")
        scanned += 1
        for label, pattern in _SECRET_PATTERNS.items():
            found += [(str(path), label, m.group(0)[:40]) for m in pattern.finditer(text)]
        for m in _URL_PASSWORD.finditer(text):
            password = m.group(1)
            if password not in _ALLOWED_PASSWORDS and not password.startswith("{"):
                found.append((str(path), "URL with a password", m.group(0)[:60]))
    assert scanned > 50
    assert found == []


def test_the_secret_scan_catches_what_it_looks_for():
    # Assembled at run time, so this file holds none of them literally.
    planted = [
        "-----BEGIN OPENSSH " + "PRIVATE KEY-----",
        "AKIA" + "ABCDEFGHIJKLMNOP",
        "api_key = " + '"abcdEFGHijklMNOP' + 'qrstUVWX"',
    ]
    for text in planted:
        assert any(p.search(text) for p in _SECRET_PATTERNS.values()), text
    url = "postgresql://admin:" + "Tr0ub4dor" + "@db/x"
    assert _URL_PASSWORD.search(url).group(1) == "Tr0ub4dor"
