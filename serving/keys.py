"""Renewing TorchServe's keys before they expire, and when each one does.

TorchServe's inference and management keys stop working ``token_expiration_min`` after they
were made (a week by default); from then on every prediction, ping and management call is
refused. TorchServe's token API (``POST /token?type=inference|management`` on the management
address, authorized by the ``API`` key, which never expires) makes a new key, rewrites
``key_file.json`` and refuses the old key at once. Clients (``serving.client``) re-read the key
file when refused, so they follow a renewal by themselves.

A key is renewed once less than half of its lifetime is left, so a caller on a schedule much
shorter than that (the orchestration's sensor ticks every 30 s) renews each key well before it
expires, and calling it more often changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from serving.client import Keys, TorchServeClient
from serving.config import ServingConfig

APIS = ("inference", "management")


@dataclass(frozen=True)
class KeyStatus:
    """Each key's expiry (UTC) after a renewal check, and the keys that check renewed."""

    expires: dict[str, datetime]
    renewed: tuple[str, ...] = ()

    def remaining(self, now: datetime | None = None) -> dict[str, timedelta]:
        now = now or datetime.now(UTC)
        return {api: at - now for api, at in self.expires.items()}

    def describe(self) -> str:
        """One line for a sensor's tick or a log."""
        left = ", ".join(
            f"{api} key expires {at:%Y-%m-%d %H:%M:%S}Z" for api, at in self.expires.items()
        )
        return f"renewed {' and '.join(self.renewed)} key; {left}" if self.renewed else left


def key_expiry(config: ServingConfig) -> dict[str, datetime]:
    """When the running instance's inference and management keys expire (UTC), from its key
    file. Raises ``serving.client.NotRunning`` when there is no key file (nothing runs)."""
    return _expiry(Keys.read(config.key_file))


def renew_keys_if_due(
    config: ServingConfig,
    *,
    now: datetime | None = None,
    client: TorchServeClient | None = None,
) -> KeyStatus:
    """Renews each key with less than half of ``config.token_expiration_min`` left (or
    already expired) through TorchServe's token API; returns every key's expiry after it.
    ``config`` must be the running instance's (``TorchServeProcess.attach``): its ports and
    key lifetime. Raises ``TorchServeError`` when TorchServe refuses or does not answer."""
    client = client or TorchServeClient(config, timeout=10.0)
    half = timedelta(minutes=config.token_expiration_min) / 2
    now = now or datetime.now(UTC)
    expires = _expiry(Keys.read(config.key_file))
    renewed = tuple(api for api in APIS if api in expires and expires[api] - now < half)
    for api in renewed:
        expires = _expiry(client.renew_key(api))
    return KeyStatus(expires, renewed)


def _expiry(keys: Keys) -> dict[str, datetime]:
    found = {"inference": keys.inference_expires, "management": keys.management_expires}
    return {api: at for api, at in found.items() if at is not None}
