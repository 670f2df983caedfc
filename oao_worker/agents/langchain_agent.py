"""The ``langchain`` agent kind: a LangChain Runnable (an LCEL chain, an agent executor,
any ``Runnable``) as an OAO node (docs/frameworks.md).

The entrypoint names the Runnable, or a function returning one (called once per run, off
the event loop, with ``model=`` OAO's chat model and ``tools=`` the spec tools if it
declares them, and the agent's ``config``). Each attempt calls ``ainvoke`` with
``{input_key: task}`` (plus the dependency outputs under ``deps_key`` and the run inputs
under ``inputs_key``), or the task text itself for ``input_key: null``, and a
``RunnableConfig`` carrying OAO's callback handler and ``max_concurrency=1``. Every
model and tool call is an OAO step (``langchain_bridge``). The result follows the agent
executors' convention: ``{"output": X, ...}`` makes X the node's output; a message gives
its content; anything else is the output as JSON.
"""

from __future__ import annotations

from typing import Any

from langchain_core.messages import BaseMessage
from langchain_core.runnables import Runnable

from oao_common.errors import PermanentError
from oao_common.spec import LangChainAgentSpec
from oao_common.trust import TrustPolicy

from ..context import AgentContext
from ..tools import Tool, load_entrypoint
from .langchain_bridge import NodeBridge, OAOCallbackHandler, finish_lifecycle, runnable_from, to_jsonable
from .python import node_output


class LangChainAgent:
    """A LangChain Runnable run as one OAO node (module doc)."""

    def __init__(
        self, name: str, spec: LangChainAgentSpec, trust: TrustPolicy, tools: dict[str, Tool] | None = None
    ) -> None:
        self.name = name
        self.spec = spec
        target = load_entrypoint(spec.entrypoint, trust)
        runnable = runnable_from(target, name, spec.model, tools or {}, spec.tools, spec.config)
        if not isinstance(runnable, Runnable):
            raise PermanentError(
                f"agent {name!r}: {spec.entrypoint} gives a {type(runnable).__name__}, "
                "not a LangChain Runnable"
            )
        self.runnable = runnable

    def input_value(self, ctx: AgentContext) -> Any:
        """What the Runnable is invoked with (module doc)."""
        s = self.spec
        if s.input_key is None:
            return ctx.task
        value: dict[str, Any] = {s.input_key: ctx.task}
        if s.deps_key:
            value[s.deps_key] = dict(sorted(ctx.deps.items()))
        if s.inputs_key:
            value[s.inputs_key] = ctx.inputs
        return value

    async def run(self, ctx: AgentContext) -> Any:
        bridge = NodeBridge(ctx)
        config: Any = {
            "callbacks": [OAOCallbackHandler(bridge)],
            "max_concurrency": 1,
            "metadata": {"oao_run_id": ctx.run_id, "oao_node_id": ctx.node_id},
        }
        with bridge.bound():
            try:
                result = await self.runnable.ainvoke(self.input_value(ctx), config)
            except Exception:
                bridge.raise_fatal()  # OAO's error, whatever the runnable made of it
                raise
            bridge.raise_fatal()
        finish_lifecycle(ctx)
        out = node_output(result)
        if isinstance(out, BaseMessage):
            return to_jsonable(out.content)
        return to_jsonable(out)
