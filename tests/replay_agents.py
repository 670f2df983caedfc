"""Agents and tools of the replay tests (importable as ``replay_agents``).

``VARIANT`` stands for the agent code a team deploys next: the tests set it to
``"edited"`` to play a code change that sends different tool arguments, ``"fewer"``
(one turn less) and ``"extra"`` (one more step); a process started by a test gets
it from ``OAO_TEST_AGENT_VARIANT``.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

VARIANT = os.environ.get("OAO_TEST_AGENT_VARIANT", "original")


def words(text: str) -> dict[str, Any]:
    """Real work on the text: its word count and a digest; also counted in the file
    named by OAO_TEST_LEDGER (when set), so a test sees every real execution."""
    path = os.environ.get("OAO_TEST_LEDGER")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"words {text[:40]!r}\n")
    return {"words": len(text.split()), "sha": hashlib.sha256(text.encode()).hexdigest()[:10]}


async def researcher(ctx: Any) -> dict[str, Any]:
    """Time, randomness and an id through the context; a growing conversation with the
    model; a tool call with real work after each reply."""
    started = await ctx.now()
    pick = await ctx.random()
    ident = await ctx.uuid()
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You research a topic in three turns."},
        {"role": "user", "content": ctx.task},
    ]
    notes = []
    for i in range(2 if VARIANT == "fewer" else 3):
        reply = await ctx.llm(messages)
        messages.append({"role": "assistant", "content": reply.content})
        text = f"{reply.content} {i} {pick:.6f}"
        if VARIANT == "edited":
            text = text.upper()
        found = await ctx.tool("words", text=text)
        notes.append(found)
        messages.append({"role": "user", "content": f"found {found['words']} words"})
    if VARIANT == "extra":
        await ctx.now()
    return {"notes": notes, "pick": round(pick, 6), "id": ident, "t": started}


async def writer(ctx: Any) -> str:
    """One model call over the dependencies' outputs and one tool call."""
    reply = await ctx.llm(f"write from {sorted(ctx.deps)} about {ctx.task}")
    counted = await ctx.tool("words", text=reply.content)
    stamp = await ctx.now()
    return f"{reply.content} ({counted['words']} words, at {stamp:.3f})"


def summarize(task: str) -> dict[str, Any]:
    """A plain (non step-aware) agent: one recorded invoke step."""
    return {"output": f"summary of {task[:60]}"}
