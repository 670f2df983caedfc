"""One task, several agents: ``MultiAgentOrchestrator``.

``run_multi_async(agents={name: agent}, task)`` runs each agent as its own OAO run (at
most ``max_concurrency`` at once, on one shared fleet) and returns ``dict`` name →
:class:`~oao.report.Report`, in the order of ``agents``: independent reports, so one
agent failing does not affect the others' status. ``run_multi`` is the sync form.
"""

from __future__ import annotations

import asyncio
from typing import Any

from oao.orchestrator import Orchestrator, run_sync
from oao.policy import StrictPolicy
from oao.report import Report


class MultiAgentOrchestrator:
    """Runs the same task on several agents; ``max_concurrency`` bounds the runs in flight
    (and the in-process workers' concurrency). Other arguments as :class:`Orchestrator`."""

    def __init__(
        self,
        max_concurrency: int = 4,
        policy: StrictPolicy | None = None,
        redis_url: str | None = None,
        workers: int | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        self.max_concurrency = max_concurrency
        self.orchestrator = Orchestrator(
            redis_url=redis_url, workers=workers, concurrency=max_concurrency, policy=policy
        )

    async def run_multi_async(
        self, agents: dict[str, Any], task: str, timeout_s: float | None = None
    ) -> dict[str, Report]:
        """Name → report of each agent's run on ``task``."""
        sem = asyncio.Semaphore(self.max_concurrency)

        async def one(agent: Any) -> Report:
            async with sem:
                return await self.orchestrator.run_async(agent, task, timeout_s=timeout_s)

        async with self.orchestrator._session():
            reports = await asyncio.gather(*(one(a) for a in agents.values()))
        return dict(zip(agents, reports, strict=True))

    def run_multi(
        self, agents: dict[str, Any], task: str, timeout_s: float | None = None
    ) -> dict[str, Report]:
        """Sync :meth:`run_multi_async`."""
        return run_sync(self.run_multi_async(agents, task, timeout_s), "run_multi_async")


__all__ = ["MultiAgentOrchestrator"]
