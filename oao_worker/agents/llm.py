"""The ``llm`` agent kind: a tool-calling loop.

Each turn: PLAN (a model call offering the agent's tools); if the model asks for
tools, EXECUTE them (each a step), REVIEW, and plan again; a reply without tool calls
is the final answer (REVIEW → TERMINATE). A tool that raises an ordinary exception
returns ``error: ...`` to the model; policy violations and stale attempts stop the
node. More than ``max_turns`` turns is a ``PolicyViolation`` (rule ``max_turns``).
"""

from __future__ import annotations

import json
from typing import Any

from oao_common.errors import PolicyViolation
from oao_common.spec import LLMAgentSpec

from ..context import AgentContext
from ..lifecycle import AgentState


class LLMAgent:
    def __init__(self, name: str, spec: LLMAgentSpec) -> None:
        self.name = name
        self.spec = spec

    async def run(self, ctx: AgentContext) -> Any:
        s = self.spec
        lc = ctx.lifecycle
        messages: list[dict[str, Any]] = []
        if s.system:
            messages.append({"role": "system", "content": s.system})
        messages.append({"role": "user", "content": ctx.task})
        for _turn in range(s.max_turns):
            lc.enter(AgentState.PLAN)
            reply = await ctx.llm(
                messages,
                model=s.model,
                tools=s.tools,
                max_tokens=s.max_tokens,
                temperature=s.temperature,
            )
            messages.append(reply.assistant_message())
            if not reply.tool_calls:
                lc.enter(AgentState.REVIEW)
                lc.terminate()
                return reply.content
            lc.enter(AgentState.EXECUTE)
            for call in reply.tool_calls:
                ok, value = await ctx.try_tool(call.name, call.args)
                if not ok:  # a tool's own failure goes back to the model
                    content = f"error: {value}"
                else:
                    content = value if isinstance(value, str) else json.dumps(value)
                messages.append({"role": "tool", "tool_call_id": call.id, "content": content})
            lc.enter(AgentState.REVIEW)
        raise PolicyViolation(
            "max_turns", s.max_turns, s.max_turns + 1, detail="no final answer within max_turns"
        )
