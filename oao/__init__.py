"""OAO's public Python API.

* :class:`Orchestrator`: ``run(agent=..., task=...)`` / ``await run_async(...)`` → a
  :class:`Report`; ``await submit(spec_or_graph, inputs=...)`` → a :class:`RunHandle`.
  Embedded (no ``redis_url``: Valkey, workers and reaper in this process) or against a
  fleet's Redis.
* :class:`StrictPolicy`: per-node limits (steps, tokens, tool calls, seconds, USD).
* :class:`Report`: the typed execution report (``json(indent=2)``, ``model_dump()``).
* :class:`TaskGraph`, :class:`TaskNode`, :class:`GraphExecutor` (also in
  :mod:`oao.runtime.dag`), :class:`MultiAgentOrchestrator` (:mod:`oao.runtime.multi_agent`).
* :func:`load_spec` (YAML) and ``Spec.from_graph`` give the same :class:`Spec`.

The agent contract: an object with ``invoke(task)`` (or a callable ``f(task)``, sync or
async, or an ``async def run(ctx)``). When ``invoke`` returns a dict with an
``"output"`` key, the node's output is that value (in templates, reports and the API);
a dict or list output renders in a task template as JSON. Errors are
:class:`oao_common.errors.OAOError` subclasses: ``SpecError`` (and
:class:`AgentNotImportable`), ``RedisUnavailable``, ``WaitTimeout``,
:class:`OrchestratorError`.
"""

from __future__ import annotations

from oao_common.errors import OAOError, RedisUnavailable, SpecError, WaitTimeout
from oao_common.events import Event
from oao_common.graph_spec import AgentNotImportable
from oao_common.spec import Spec, load_spec

from .graph import TaskGraph, TaskNode
from .orchestrator import Orchestrator, OrchestratorError, RunHandle
from .policy import StrictPolicy
from .report import Report, Tokens
from .runtime.dag import GraphExecutor
from .runtime.multi_agent import MultiAgentOrchestrator

__all__ = [
    "AgentNotImportable",
    "Event",
    "GraphExecutor",
    "MultiAgentOrchestrator",
    "OAOError",
    "Orchestrator",
    "OrchestratorError",
    "RedisUnavailable",
    "Report",
    "RunHandle",
    "Spec",
    "SpecError",
    "StrictPolicy",
    "TaskGraph",
    "TaskNode",
    "Tokens",
    "WaitTimeout",
    "load_spec",
]
