"""Agents used by the benchmarks (imported by ``oao-worker --app-dir <repo>`` as
``bench.agents:<name>``)."""

from __future__ import annotations

from typing import Any


async def wait_once(ctx: Any) -> str:
    """One model call, then done: with a scripted model whose ``reply_delay_s`` is 1.0,
    the node spends ~1 s waiting, like an agent waiting on a model API."""
    reply = await ctx.llm("Say ok.")
    return str(reply.content)


async def three_steps(ctx: Any) -> str:
    """Three recorded steps: a model call, a tool call (``echo``, so a begin-step marker
    and a record), another model call. With a scripted model of no delay the node's
    cost is the runtime's own: what ``bench/capacity.py`` measures per step."""
    first = await ctx.llm("Plan.")
    echoed = await ctx.tool("echo", text=str(first.content))
    final = await ctx.llm(f"Finish {echoed}.")
    return str(final.content)


def echo(text: str) -> str:
    """A tool that returns its argument (no side effect)."""
    return text


async def long_conversation(ctx: Any) -> str:
    """``int(task)`` model calls over one growing conversation: each turn adds a ~2 KB
    user message and the model's reply, and every call sends the whole history (what
    ``bench/ledger_growth.py`` measures the storage of)."""
    calls = int(ctx.task or 100)
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You are thorough. " * 8}]
    for i in range(calls):
        messages.append({"role": "user", "content": f"Turn {i}: " + ("evidence and notes " * 110)[:2000]})
        reply = await ctx.llm(messages)
        messages.append({"role": "assistant", "content": str(reply.content)})
    return f"{calls} calls"


async def many_calls(ctx: Any) -> str:
    """``int(task)`` model calls, each a recorded step (``bench/tracing.py``)."""
    reply = None
    for i in range(int(ctx.task or 1)):
        reply = await ctx.llm(f"call {i}")
    return str(reply.content if reply else "")
