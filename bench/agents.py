"""Agents used by the benchmarks (imported by ``oao-worker --app-dir <repo>`` as
``bench.agents:<name>``)."""

from __future__ import annotations

from typing import Any


async def wait_once(ctx: Any) -> str:
    """One model call, then done: with a scripted model whose ``reply_delay_s`` is 1.0,
    the node spends ~1 s waiting, like an agent waiting on a model API."""
    reply = await ctx.llm("Say ok.")
    return str(reply.content)
