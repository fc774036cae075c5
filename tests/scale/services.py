"""Private Postgres and Redis servers on loopback ports, in temporary directories.

`make test` installs Debian's packages (Makefile `services`); these helpers start one server
each, wait until it answers, and stop it and remove its directory on exit. Postgres refuses to
run as root, so as root its directory is handed to the `postgres` user (created by Debian's
package) and its commands run through `runuser`. The benchmarks use them too.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _postgres_bin(name: str) -> str:
    """Debian keeps the server binaries in /usr/lib/postgresql/<major>/bin, not on PATH."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    path = found[0] if found else shutil.which(name)
    if not path:
        raise RuntimeError(f"{name} not found: run `make services` (Debian's postgresql)")
    return path


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _wait(ready, what: str, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            if ready():
                return
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{what} did not come up within {timeout:.0f} s\n{tail}")
        time.sleep(0.1)


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A fresh cluster (password auth, fsync off); yields its SQLAlchemy URL
    (``postgresql+psycopg2://...``, the form LOOPLINE_POSTGRES_URL takes)."""
    base = Path(tempfile.mkdtemp(prefix="loopline-pg-"))
    data, log, pwfile = base / "data", base / "postgres.log", base / "pw"
    password, port = secrets.token_hex(12), free_port()
    pwfile.write_text(password + "\n")
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
        shutil.chown(pwfile, "postgres", "postgres")
    pg_ctl = _postgres_bin("pg_ctl")
    try:
        subprocess.run(
            _as_postgres(
                [_postgres_bin("initdb"), "-D", str(data), "-U", "loopline", "-E", "UTF8"]
                + ["--auth=scram-sha-256", f"--pwfile={pwfile}", "--no-sync"]
            ),
            check=True,
            capture_output=True,
        )
        options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(
            _as_postgres([pg_ctl, "-D", str(data), "-l", str(log), "-o", options, "-w", "start"]),
            check=True,
            capture_output=True,
        )
        url = f"postgresql://loopline:{password}@127.0.0.1:{port}/postgres"
        _wait(lambda: psycopg2.connect(url).close() is None, "postgres", log)
        yield url.replace("postgresql://", "postgresql+psycopg2://", 1)
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(
                _as_postgres([pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"]),
                capture_output=True,
            )
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """redis-server without persistence, with a password; yields ``redis://:pw@host:port/0``."""
    exe = shutil.which("redis-server")
    if not exe:
        raise RuntimeError("redis-server not found: run `make services` (Debian's redis-server)")
    base = Path(tempfile.mkdtemp(prefix="loopline-redis-"))
    log = base / "redis.log"
    password, port = secrets.token_hex(12), free_port()
    # The password goes in through stdin (a config file), not the command line `ps` shows.
    cmd = [exe, "-", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    cmd += ["--appendonly", "no", "--dir", str(base), "--logfile", str(log)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        assert proc.stdin is not None
        proc.stdin.write(f"requirepass {password}\n".encode())
        proc.stdin.close()
        url = f"redis://:{password}@127.0.0.1:{port}/0"
        _wait(lambda: redis.Redis.from_url(url).ping(), "redis-server", log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(base, ignore_errors=True)


# The variables s3fs (botocore) and Polars both read: one endpoint and key for both readers.
S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@contextlib.contextmanager
def s3_server(bucket: str = "loopline-lake") -> Iterator[str]:
    """An S3 API on a loopback port (moto's server, in this process) with one bucket; yields
    ``s3://<bucket>`` with the endpoint and a key in the environment, as a user of MinIO or
    AWS would set them, and restores the environment on exit."""
    import boto3
    from moto.server import ThreadedMotoServer
    from s3fs import S3FileSystem

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {name: os.environ.get(name) for name in S3_ENV}
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="loopline",
        AWS_SECRET_ACCESS_KEY=secrets.token_hex(16),
        AWS_DEFAULT_REGION="us-east-1",
    )
    S3FileSystem.clear_instance_cache()  # no client made for another endpoint
    try:
        boto3.client("s3").create_bucket(Bucket=bucket)
        yield f"s3://{bucket}"
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        S3FileSystem.clear_instance_cache()
        server.stop()
