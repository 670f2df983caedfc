"""Set-up shared by ``bench/budget_stop.py``, ``bench/cancel.py`` and ``bench/recovery.py``:
a Redis for the run (the library's ``LocalFleet``: the given URL, else a private embedded
Valkey) with a fresh key prefix that is deleted afterwards, and real OAO processes that
are always stopped."""

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
from oao_scheduler.fleet import LocalFleet  # noqa: E402

BIN = Path(sys.executable).parent


@contextlib.asynccontextmanager
async def bench_redis(redis_url: str | None, name: str) -> AsyncIterator[tuple[str, Broker]]:
    """``(url, broker)`` under the prefix ``bench-<name>-<pid>``: the library's
    :class:`LocalFleet` without workers (the given URL, else a private embedded Valkey);
    the prefix's keys are deleted at the end."""
    async with LocalFleet(redis_url, prefix=f"bench-{name}-{os.getpid()}", workers=0) as fleet:
        broker = fleet.broker
        try:
            yield fleet.url or "", broker
        finally:
            async for key in broker.redis.scan_iter(match=f"{broker.keys.prefix}:*", count=1000):
                await broker.redis.delete(key)


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
