"""Agents and tools of the interop check (``bench/interop_openai.py``): a python agent
that makes one model call, and a dotted-name tool the model may call."""

from __future__ import annotations

from typing import Any


async def ask(ctx: Any) -> str:
    """One model call with the node's task as the prompt (the output is the reply)."""
    reply = await ctx.llm(ctx.task, max_tokens=int(ctx.inputs.get("max_tokens", 48)))
    return str(reply.content)


def search_notes(query: str) -> str:
    """Search the notes (a fixed answer: the check is about the call, not the search)."""
    return f"The notes say: the answer to {query!r} is 42."
