"""Python agents of the example workflows."""

from __future__ import annotations

from typing import Any


class Polisher:
    """A plain ``invoke(task)`` agent: turns a draft and its critique into the final post.

    The task holds the draft, then a line starting with ``Critique:`` and the critique.
    """

    def invoke(self, task: str) -> str:
        draft, _, critique = task.partition("Critique:")
        lines = [ln.strip() for ln in draft.splitlines() if ln.strip()]
        title = lines[0].rstrip(".") if lines else "Untitled"
        body = " ".join(lines[1:])
        note = " ".join(critique.split()).removeprefix("Critique:").strip()
        out = f"# {title}\n\n{body}\n"
        if note:
            out += f"\n> Editor's note: {note}\n"
        return out


async def runaway(ctx: Any) -> str:
    """A step-aware agent with a bug: it keeps asking the model to continue, forever.

    Its token budget stops it (PolicyViolation: Max Token Limit Exceeded).
    """
    text = ""
    while True:
        reply = await ctx.llm(f"Continue this text: {text[-200:]}")
        text += reply.content


async def noop(ctx: Any) -> str:
    """Does nothing; used by benchmarks to measure the runtime's own cost per node."""
    return "ok"
