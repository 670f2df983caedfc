"""DAG execution: ``TaskGraph``, ``TaskNode``, ``GraphExecutor``.

``GraphExecutor(graph, orchestrator=None).execute(task)`` runs the graph as one OAO run
(``task`` becomes the run's ``inputs.task``) and returns a ``dict`` node id →
:class:`~oao.report.Report` of that node, in the graph's order; the run's own report is
then in ``executor.report``. ``execute_async`` is the same for a running event loop
(``execute`` raises :class:`~oao.orchestrator.OrchestratorError` inside one). Errors:
``SpecError`` (bad graph), ``WaitTimeout`` (``timeout_s``).
"""

from __future__ import annotations

from oao.graph import TaskGraph, TaskNode
from oao.orchestrator import Orchestrator, run_sync
from oao.report import Report


class GraphExecutor:
    """Runs a :class:`TaskGraph` on ``orchestrator`` (default: an embedded one)."""

    def __init__(self, graph: TaskGraph, orchestrator: Orchestrator | None = None) -> None:
        self.graph = graph
        self.orchestrator = orchestrator or Orchestrator()
        self.report: Report | None = None

    async def execute_async(self, task: str = "", timeout_s: float | None = None) -> dict[str, Report]:
        """Run the graph; node id → node report (see the module doc)."""
        inputs = {"task": task} if task else None
        self.report = await self.orchestrator.run_spec_async(self.graph, inputs, timeout_s)
        return dict(self.report.nodes)

    def execute(self, task: str = "", timeout_s: float | None = None) -> dict[str, Report]:
        """Sync :meth:`execute_async`."""
        return run_sync(self.execute_async(task, timeout_s), "execute_async")


__all__ = ["GraphExecutor", "TaskGraph", "TaskNode"]
