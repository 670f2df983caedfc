"""Agents and tools of bench/recovery.py (imported by worker processes)."""

from __future__ import annotations

import os
from typing import Any


def ext(label: str) -> str:
    """A side effect: one line per execution in the file named by OAO_BENCH_LEDGER."""
    from oao_worker.tools import current_call

    info = current_call()
    line = f"{info.run_id if info else '?'} {info.attempt if info else 0} {label}\n"
    fd = os.open(os.environ["OAO_BENCH_LEDGER"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
    return label


async def record_then_think(ctx: Any) -> str:
    """One recorded side effect, then a long model call (the node is RUNNING meanwhile)."""
    await ctx.tool("ext", label="effect")
    reply = await ctx.llm("think for a long time")
    return reply.content
