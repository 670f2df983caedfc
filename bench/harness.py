"""Set-up shared by ``bench/budget_stop.py``, ``bench/cancel.py`` and ``bench/recovery.py``:
a Redis for the run (the given URL, else a private embedded Valkey) with a fresh key
prefix that is deleted afterwards, and real OAO processes that are always stopped."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from oao_common.broker import Broker  # noqa: E402
from oao_common.connection import EmbeddedServer, connect  # noqa: E402

BIN = Path(sys.executable).parent


@contextlib.asynccontextmanager
async def bench_redis(redis_url: str | None, name: str) -> AsyncIterator[tuple[str, Broker]]:
    """``(url, broker)`` under the prefix ``bench-<name>-<pid>``; keys deleted at the end."""
    server = None if redis_url else EmbeddedServer().start()
    url = redis_url or (server.url if server else "")
    r = connect(url)
    broker = Broker(r, f"bench-{name}-{os.getpid()}")
    try:
        yield url, broker
    finally:
        async for key in r.scan_iter(match=f"{broker.keys.prefix}:*", count=1000):
            await r.delete(key)
        await r.aclose()
        if server:
            server.stop()


def oao_process(
    command: str,
    url: str,
    broker: Broker,
    *args: str,
    env: dict[str, str] | None = None,
    log: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``oao-worker ARGS`` (``command="worker"``) or ``oao-scheduler serve ARGS``."""
    exe = [str(BIN / "oao-worker")] if command == "worker" else [str(BIN / "oao-scheduler"), "serve"]
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(
        [*exe, "--redis-url", url, "--prefix", broker.keys.prefix, *args],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})),
        stdout=out,
        stderr=out,
    )


def stop_all(procs: Iterable[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every process still running, SIGKILL after 10 s."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


async def wait_for_workers(broker: Broker, n: int) -> None:
    """Until ``n`` workers have a live heartbeat."""
    while sum(1 for w in await broker.workers() if w["alive"]) < n:
        await asyncio.sleep(0.05)
