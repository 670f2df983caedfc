"""Agent kinds: ``python`` (callables, ``invoke(task)`` objects, ``async def run(ctx)``)
and ``llm`` (the built-in tool-calling loop)."""

from __future__ import annotations

from typing import Any, Protocol

from oao_common.spec import AgentSpec, LLMAgentSpec
from oao_common.trust import DEFAULT_TRUST, TrustPolicy

from ..context import AgentContext


class Agent(Protocol):
    async def run(self, ctx: AgentContext) -> Any:
        """Run the node; return its output (JSON-serializable)."""
        ...


def build_agent(name: str, spec: AgentSpec, trust: TrustPolicy = DEFAULT_TRUST) -> Agent:
    """The runnable agent for agent ``name`` of a spec; raises ``PermanentError`` if its
    entrypoint cannot be imported (``TrustError`` if ``trust`` does not allow it)."""
    if isinstance(spec, LLMAgentSpec):
        from .llm import LLMAgent

        return LLMAgent(name, spec)
    from .python import PythonAgent

    return PythonAgent(name, spec, trust)


__all__ = ["Agent", "build_agent"]
