"""Agents and tools of the plugin and middleware tests (importable as ``plugin_agents``)."""

from __future__ import annotations

from typing import Any


async def shell_once(ctx: Any) -> str:
    """One call of the ``shell`` tool with the task as the command."""
    return str(await ctx.tool("shell", cmd=ctx.task))


def shell(cmd: str) -> str:
    """Pretends to run ``cmd`` (the test checks it is never called for a forbidden one)."""
    return f"ran {cmd}"


async def ask_then_tool(ctx: Any) -> str:
    """A model call, then a tool call with the reply."""
    reply = await ctx.llm("hello")
    return str(await ctx.tool("shell", cmd=reply.content))


_failed: dict[str, int] = {}


async def ask_then_fail_once(ctx: Any) -> str:
    """A model call, then (first attempt per task only) a transient failure: the retry
    replays the model call from the ledger."""
    reply = await ctx.llm("hello")
    if not _failed.get(ctx.task):
        _failed[ctx.task] = 1
        raise ConnectionError("flaky after the model call")
    return str(reply.content)
