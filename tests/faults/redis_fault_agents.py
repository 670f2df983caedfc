"""Agents of the Redis fault tests (workers import them with ``--app-dir tests/faults``).

What must survive the worker processes goes to the file named by ``OAO_FAULT_LEDGER``
(one ``O_APPEND`` write per line, so lines of concurrent processes never interleave).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from typing import Any


def _ledger(line: str) -> None:
    path = os.environ.get("OAO_FAULT_LEDGER")
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


async def ledger_sleeper(ctx: Any) -> str:
    """Sleeps float(task) seconds; records ``start``/``end`` lines
    ``<what> <execution id> <node> <attempt> <worker> <unix time>`` and returns its
    execution id, so the node's output names the execution whose completion won."""
    exec_id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    _ledger(f"start {exec_id} {ctx.node_id} {ctx.attempt} {ctx.worker_id} {time.time():.6f}")
    await asyncio.sleep(float(ctx.task or 0))
    _ledger(f"end {exec_id} {ctx.node_id} {ctx.attempt} {ctx.worker_id} {time.time():.6f}")
    return exec_id


async def slow_first_attempt(ctx: Any) -> str:
    """Attempt 1 sleeps float(task) seconds, later attempts 0.05 s."""
    await asyncio.sleep(float(ctx.task or 0) if ctx.attempt == 1 else 0.05)
    return f"attempt {ctx.attempt}"


async def fail_first_attempt(ctx: Any) -> str:
    """Attempt 1 raises a (retryable) ``ConnectionError``; later attempts succeed."""
    if ctx.attempt == 1:
        raise ConnectionError(f"attempt 1 of {ctx.node_id} fails")
    return f"attempt {ctx.attempt}"
