"""Agent kinds: ``python`` (callables, ``invoke(task)`` objects, ``async def run(ctx)``),
``llm`` (the built-in tool-calling loop), and the framework adapters ``langgraph`` and
``langchain`` (docs/frameworks.md; they need the ``frameworks`` extra)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from oao_common.errors import PermanentError
from oao_common.spec import AgentSpec, LangChainAgentSpec, LangGraphAgentSpec, LLMAgentSpec, PluginAgentSpec
from oao_common.trust import DEFAULT_TRUST, TrustPolicy

from ..context import AgentContext

if TYPE_CHECKING:
    from ..tools import Tool


class Agent(Protocol):
    async def run(self, ctx: AgentContext) -> Any:
        """Run the node; return its output (JSON-serializable)."""
        ...


def build_agent(
    name: str, spec: AgentSpec, trust: TrustPolicy = DEFAULT_TRUST, tools: dict[str, Tool] | None = None
) -> Agent:
    """The runnable agent for agent ``name`` of a spec; raises ``PermanentError`` if its
    entrypoint cannot be imported (``TrustError`` if ``trust`` does not allow it).
    ``tools`` are the run's spec tools, handed to a framework agent's graph factory."""
    if isinstance(spec, LLMAgentSpec):
        from .llm import LLMAgent

        return LLMAgent(name, spec)
    if isinstance(spec, LangGraphAgentSpec | LangChainAgentSpec):
        from .frameworks import build_framework_agent

        return build_framework_agent(name, spec, trust, tools or {})
    if isinstance(spec, PluginAgentSpec):  # built by the worker's plugins (oao_worker/runtime.py)
        raise PermanentError(f"agents.{name}: kind plugin ({spec.use}) is built by a worker plugin")
    from .python import PythonAgent

    return PythonAgent(name, spec, trust)


__all__ = ["Agent", "build_agent"]
