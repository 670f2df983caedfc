"""The ``python`` agent kind.

The entrypoint (``module:attr``) may be:

* an ``async def run(ctx)`` function, or an object / class whose ``run`` is one:
  step-aware, it calls ``ctx.llm`` / ``ctx.tool`` and drives ``ctx.lifecycle`` itself
  (the runner enters PLAN before and REVIEW, TERMINATE after);
* an object with ``invoke(task)``, a class of such objects (instantiated with the
  agent's ``config`` as keyword arguments), or a plain callable ``f(task)``, sync or
  async: the call is one recorded step (kind ``invoke``), so a resumed node does not
  run it again once it has finished. A returned ``{"output": X, ...}`` makes X the
  node's output (:func:`node_output`).

Sync code runs in the worker's bounded executor (``ctx.run_sync``), so it cannot stall
the worker's event loop, and its time limit counts from when its thread starts.
Building the agent (importing the entrypoint, instantiating a class) is blocking too:
the worker does it off the loop as well (``RunRuntime.agent``).
"""

from __future__ import annotations

import inspect
from typing import Any

from oao_common.errors import PermanentError
from oao_common.spec import PythonAgentSpec
from oao_common.trust import DEFAULT_TRUST, TrustPolicy

from ..context import AgentContext
from ..lifecycle import AgentState
from ..tools import load_entrypoint


def _is_step_aware(fn: Any) -> bool:
    if not inspect.iscoroutinefunction(fn):
        return False
    params = list(inspect.signature(fn).parameters)
    return bool(params) and params[0] == "ctx"


class PythonAgent:
    def __init__(self, name: str, spec: PythonAgentSpec, trust: TrustPolicy = DEFAULT_TRUST) -> None:
        self.name = name
        target = load_entrypoint(spec.entrypoint, trust)
        if inspect.isclass(target):
            try:
                target = target(**spec.config)
            except TypeError as e:
                raise PermanentError(f"agent {name!r}: cannot create {spec.entrypoint}: {e}") from None
        run = getattr(target, "run", None)
        invoke = getattr(target, "invoke", None)
        self._run = run if _is_step_aware(run) else (target if _is_step_aware(target) else None)
        self._call: Any = invoke if callable(invoke) else (target if callable(target) else None)
        if self._run is None and self._call is None:
            raise PermanentError(
                f"agent {name!r}: {spec.entrypoint} is neither callable, nor has invoke(task) "
                "or async run(ctx)"
            )

    async def run(self, ctx: AgentContext) -> Any:
        lc = ctx.lifecycle
        lc.enter(AgentState.PLAN)
        if self._run is not None:
            result = await self._run(ctx)
            if lc.state != AgentState.TERMINATE:
                lc.enter(AgentState.REVIEW)
                lc.terminate()
            return result
        lc.enter(AgentState.EXECUTE)
        call = self._call

        async def invoke() -> Any:
            if inspect.iscoroutinefunction(call):
                return await call(ctx.task)
            return await ctx.run_sync(call, ctx.task)

        result = await ctx.invoke(self.name, invoke)
        lc.enter(AgentState.REVIEW)
        lc.terminate()
        return node_output(result)


def node_output(result: Any) -> Any:
    """The node output of an ``invoke(task)`` / callable agent's return value.

    The rule (the seeds' and LangChain executors' contract): a ``dict`` that has an
    ``"output"`` key is unwrapped, the node's output being ``result["output"]`` (its other
    keys, e.g. LangChain's ``"input"``, are dropped); anything else is the output as is.
    The step ledger keeps the whole return value, so a replay unwraps the same way.
    ``async def run(ctx)`` agents are not unwrapped: what they return is the output.
    """
    if isinstance(result, dict) and "output" in result:
        return result["output"]
    return result
