"""Promotion and rollback as intent, apply, confirm; and the reconciler that finishes them.

The registry's champion says which version should serve; TorchServe's default version is the
one that does. A release first writes its intent (``Registry.promote``/``rollback``: the
champion alias, an event and a pending release, in one transaction), then applies it
(``reconcile``: register the version from the model store if TorchServe lacks it, set-default),
then confirms it (read the default back, close the pending release). A crash or timeout at any
point leaves the registry's champion as the truth, so one later ``reconcile`` (at TorchServe
start, at the start of a deployment, on the reconcile sensor) converges: TorchServe serves the
champion, and no release is left pending. ``reconcile`` is idempotent; in sync, it only reads.

A served default that differs from the champion with no release pending was changed behind
the registry's back (by hand, through TorchServe's API): the reconciler puts the champion back
and records it as a ``reconciled`` deployment event of the champion (``drift``). A TorchServe
that does not know the model at all (just started, or joined by another use case) is not drift.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from models.registry import CHAMPION, Registry
from serving.client import TorchServeClient, TorchServeError
from serving.config import ServingConfig

Archive = Callable[[str], Any]


class ReconcileError(RuntimeError):
    """TorchServe could not be made to serve the registry's champion."""


@dataclass(frozen=True)
class Reconciliation:
    """What one ``reconcile`` found and did."""

    champion: str | None
    served_before: str | None
    served: str | None
    actions: list[str] = field(default_factory=list)
    confirmed: list[int] = field(default_factory=list)
    drift: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.actions)

    @property
    def in_sync(self) -> bool:
        return self.champion is None or self.served == self.champion

    def summary(self) -> str:
        if self.champion is None:
            return "no champion in the registry: TorchServe left as it is"
        done = "; ".join(self.actions) if self.actions else "nothing to change"
        return f"serving {self.served} (the champion; was {self.served_before}): {done}"

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "changed": self.changed, "in_sync": self.in_sync}


def from_model_store(registry: Registry, config: ServingConfig) -> Archive:
    """The archive lookup for ``reconcile``: a version's .mar in the model store, rebuilt from
    its registered files when absent (retention may have removed it)."""

    def archive(version: str) -> None:
        from serving.archive import archive_version  # torch: only when an archive is built

        archive_version(registry, version, config)

    return archive


def reconcile(
    registry: Registry,
    client: TorchServeClient,
    archive: Archive | None = None,
    *,
    attempts: int = 3,
) -> Reconciliation:
    """Make TorchServe's default version the registry's champion and close pending releases.

    ``archive(version)`` makes sure a version's .mar is in the model store before it is
    registered (None: it is assumed there). Another attempt is made when the champion or the
    default moved meanwhile (a concurrent release) or a set-default failed; a set-default that
    timed out but took effect is confirmed by the read-back. Raises ``ReconcileError`` when
    TorchServe still serves another version after ``attempts``.
    """
    served_before = client.default_version()
    pending = registry.releases(pending=True)
    actions: list[str] = []
    failure: TorchServeError | None = None
    champion = served = served_before
    for _ in range(attempts):
        champion = registry.get_alias(CHAMPION)
        if champion is None:
            return Reconciliation(None, served_before, served_before)
        failure = _apply(client, champion, archive, actions)
        served = client.default_version()
        closed = registry.confirm_served(champion) if served == champion else None
        if closed is None:
            continue
        drift = served_before not in (None, champion) and not pending
        result = Reconciliation(
            champion, served_before, served, actions, [r.id for r in closed], drift
        )
        if drift:
            registry.record_deployment(champion, "reconciled", True, result.to_dict())
        return result
    raise ReconcileError(
        f"TorchServe serves {served}, the registry's champion is {champion}, after {attempts} "
        f"attempts{f': {failure}' if failure else ''}"
    ) from failure


def _apply(
    client: TorchServeClient, version: str, archive: Archive | None, actions: list[str]
) -> TorchServeError | None:
    """Registers ``version`` if absent and makes it the default; a failed set-default is
    returned, not raised: the read-back that follows says whether it took effect."""
    versions = client.versions()
    if version not in versions:
        if archive is not None:
            archive(version)
        client.register(version)
        actions.append(f"registered {version} from the model store")
    if versions.get(version):
        return None
    try:
        client.set_default(version)
    except TorchServeError as exc:
        actions.append(f"set-default {version} failed: {exc}")
        return exc
    actions.append(f"set-default {version}")
    return None


def out_of_sync(registry: Registry, client: TorchServeClient) -> str | None:
    """Why a reconcile is due (None: TorchServe serves the champion and nothing is pending).
    Reads only: cheap enough for a sensor tick."""
    champion = registry.get_alias(CHAMPION)
    if champion is None:
        return None
    served = client.default_version()
    if served != champion:
        return f"TorchServe serves {served or 'nothing'}; the registry's champion is {champion}"
    pending = registry.releases(pending=True)
    if pending:
        moves = ", ".join(f"{r.kind} to {r.to_version}" for r in pending)
        return f"{len(pending)} release(s) not confirmed: {moves}"
    return None
