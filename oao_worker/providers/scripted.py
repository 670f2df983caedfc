"""The ``scripted`` provider: a deterministic offline model for examples and tests.

Reply ``k`` of a node (its k-th call to this model, from 0) is ``by_node[node][k]`` or
``replies[k]``; past the end the last reply repeats, or the list cycles with
``cycle: true``. Reply text and tool-call arguments are sandboxed Jinja templates over
``task``, ``inputs``, ``nodes``, ``node_id``, ``turn`` (k), ``last`` (the last message's
content) and ``tool_results`` (the values returned by the tools called since the last
assistant turn), so a scripted agent can show the results of the real tools it called.

Content is streamed in pieces of ``chunk_tokens`` tokens (4 characters each), with
``stream_delay_s`` before each piece and ``reply_delay_s`` before the first.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from oao_common.spec import ScriptedModelSpec, ScriptedReply
from oao_common.templating import render, render_value

from .base import (
    ChunkCallback,
    ModelReply,
    ModelRequest,
    Provider,
    ToolCall,
    Usage,
    attach_usage,
    estimate_message_tokens,
    estimate_tokens,
)


def _parse(content: str) -> Any:
    """A tool message's content as the value the tool returned (JSON), else the text."""
    try:
        return json.loads(content)
    except ValueError:
        return content


class ScriptedProvider(Provider):
    def __init__(self, name: str, spec: ScriptedModelSpec) -> None:
        self.name = name
        self.spec = spec

    def _pick(self, node_id: str, k: int) -> ScriptedReply:
        script = self.spec.by_node.get(node_id) or self.spec.replies
        if not script:
            return ScriptedReply(content="")
        i = k % len(script) if self.spec.cycle else min(k, len(script) - 1)
        r = script[i]
        return ScriptedReply(content=r) if isinstance(r, str) else r

    async def complete(self, request: ModelRequest, on_chunk: ChunkCallback) -> ModelReply:
        c = request.context
        k = int(c.get("call_index", 0))
        node_id = str(c.get("node_id", ""))
        tool_results: list[Any] = []
        for m in reversed(request.messages):
            if m.get("role") == "assistant":
                break
            if m.get("role") == "tool":
                tool_results.insert(0, _parse(str(m.get("content") or "")))
        variables: dict[str, Any] = {
            "task": c.get("task", ""),
            "inputs": c.get("inputs", {}),
            "nodes": c.get("nodes", {}),
            "node_id": node_id,
            "turn": k,
            "last": str(request.messages[-1].get("content") or "") if request.messages else "",
            "tool_results": tool_results,
        }
        where = f"models.{self.name} reply {k}"
        reply = self._pick(node_id, k)
        text = render(reply.content, variables, where)
        calls = [
            ToolCall(
                id=f"call_{k}_{i}",
                name=str(tc.get("name", "")),
                args=render_value(dict(tc.get("args") or {}), variables, where),
            )
            for i, tc in enumerate(reply.tool_calls)
        ]
        if self.spec.reply_delay_s:
            await asyncio.sleep(self.spec.reply_delay_s)
        step = self.spec.chunk_tokens * 4
        produced = ""
        for i in range(0, len(text), step):
            if self.spec.stream_delay_s:
                await asyncio.sleep(self.spec.stream_delay_s)
            piece = text[i : i + step]
            produced += piece
            try:
                await on_chunk(piece, estimate_tokens(produced))
            except Exception as exc:  # a budget stop: what was streamed counts
                attach_usage(exc, Usage(estimate_message_tokens(request.messages), estimate_tokens(produced)))
                raise
        out_tokens = estimate_tokens(text) + sum(estimate_tokens(str(t.args)) for t in calls)
        return ModelReply(
            content=text,
            tool_calls=calls,
            usage=Usage(estimate_message_tokens(request.messages), out_tokens),
            model=f"scripted:{self.name}",
            finish_reason="tool_calls" if calls else "stop",
        )
