"""``Orchestrator`` and ``RunHandle``: run agents, graphs and specs from Python.

``Orchestrator(redis_url=None, workers=N, concurrency=C, policy=StrictPolicy(...))``:

* without ``redis_url``, everything runs in this process: a private embedded Valkey
  (started on first use, stopped by :meth:`Orchestrator.close` or at exit), ``workers``
  real :class:`~oao_worker.worker.Worker` s and a :class:`~oao_scheduler.reaper.Reaper`
  (a :class:`~oao_scheduler.fleet.LocalFleet`, as ``oao-scheduler run`` uses), through
  the same protocol as a fleet. Agents may be plain Python objects
  (:mod:`oao._local` gives each one an entrypoint).
* with ``redis_url``, runs go to that Redis for a fleet of ``oao-worker`` processes
  (``workers`` defaults to 0 there). Agents must then be importable (``module:attr``):
  :class:`~oao_common.graph_spec.AgentNotImportable` (a ``SpecError``) names the one
  that is not, before anything is written.

Sync :meth:`Orchestrator.run` starts its own event loop: called inside a running loop it
raises :class:`OrchestratorError` (use ``await run_async(...)``). Workers live while a
call runs, or from the first :meth:`Orchestrator.submit` until :meth:`Orchestrator.aclose`
(``async with Orchestrator() as orch:``).

Errors: ``SpecError`` (bad spec or graph), ``RedisUnavailable`` (Redis unreachable),
``WaitTimeout`` (``timeout_s`` passed; the run goes on).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import re
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import structlog

from oao_common.broker import Broker
from oao_common.connection import EmbeddedServer
from oao_common.errors import OAOError
from oao_common.events import Event, EventType
from oao_common.graph_spec import agent_name
from oao_common.log import configure_logging
from oao_common.spec import ID_PATTERN, Spec, apply_inputs, load_spec
from oao_common.states import RunState
from oao_scheduler.fleet import LocalFleet
from oao_scheduler.progress import wait_for_run
from oao_scheduler.report import collect

from . import _local
from .graph import TaskGraph, TaskNode
from .policy import StrictPolicy
from .report import Report

T = TypeVar("T")

RUN_END_EVENTS = frozenset(
    {EventType.RUN_SUCCEEDED, EventType.RUN_FAILED, EventType.RUN_CANCELLED, EventType.RUN_PARTIAL}
)


class OrchestratorError(OAOError):
    """Misuse of the Python API (e.g. sync ``run()`` inside a running event loop)."""


def run_sync(coro: Coroutine[Any, Any, T], async_name: str) -> T:
    """Run ``coro`` on a new event loop; raises :class:`OrchestratorError` inside one."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    coro.close()
    raise OrchestratorError(
        f"called from inside a running event loop: use `await ...{async_name}(...)` instead"
    )


class RunHandle:
    """A submitted run: ``run_id``, and async ``status()``, ``events()``, ``wait()``,
    ``cancel()``, ``report()``. Valid while its orchestrator is open."""

    def __init__(self, broker: Broker, run_id: str, created: bool, sinks: list[str]) -> None:
        self.broker = broker
        self.run_id = run_id
        self.created = created
        self._sinks = sinks

    async def status(self) -> str:
        """The run state (``PENDING``, ``RUNNING``, ``SUCCEEDED``, ``FAILED``, ``PARTIAL``,
        ``CANCELLED``); raises ``KeyError`` if the run is unknown (pruned)."""
        run = await self.broker.get_run(self.run_id)
        if not run:
            raise KeyError(f"run {self.run_id} is unknown")
        return run["status"]

    async def events(self, after: str = "0-0") -> AsyncIterator[Event]:
        """The run's events (:class:`oao_common.events.Event`) from stream id ``after``,
        live; the iteration ends after the run's end event (``RUN_SUCCEEDED`` ...)."""
        async for ev in self.broker.follow_events(self.run_id, after=after, block_ms=500):
            yield ev
            if ev.type in RUN_END_EVENTS:
                return

    async def wait(self, timeout_s: float | None = None) -> str:
        """Wait for the run to end (following its event stream, no polling of nodes);
        returns its final state. Raises :class:`WaitTimeout` after ``timeout_s`` seconds,
        ``RedisUnavailable`` if the run is gone from Redis."""
        return await wait_for_run(self.broker, self.run_id, timeout_s=timeout_s)

    async def cancel(self) -> bool:
        """Cancel the run: True if this call cancelled it, False if it had already ended."""
        return await self.broker.cancel(self.run_id) >= 0

    async def report(self) -> Report:
        """The run's :class:`Report` now (final once :meth:`wait` returned)."""
        data = await collect(self.broker, self.run_id)
        if data is None:
            raise KeyError(f"run {self.run_id} is unknown")
        return Report.from_collected(data, self._sinks)


class Orchestrator:
    """Runs agents, graphs and specs on an embedded or remote OAO fleet (module doc)."""

    def __init__(
        self,
        redis_url: str | None = None,
        workers: int | None = None,
        concurrency: int = 8,
        policy: StrictPolicy | None = None,
        prefix: str = "oao",
    ) -> None:
        self.redis_url = redis_url
        self.workers = (0 if redis_url else 1) if workers is None else workers
        if self.workers < 0 or concurrency < 1:
            raise ValueError("workers must be >= 0 and concurrency >= 1")
        if redis_url is None and self.workers == 0:
            raise ValueError("the embedded orchestrator needs workers >= 1")
        self.concurrency = concurrency
        self.policy = policy
        self.prefix = prefix
        self._server: EmbeddedServer | None = None
        self._fleet: LocalFleet | None = None
        self._persistent: LocalFleet | None = None  # the fleet that outlives calls (submit)
        if not structlog.is_configured():  # a library stays quiet: warnings on stderr
            configure_logging(level=os.environ.get("OAO_LOG_LEVEL", "warning"))

    # ------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        """The Redis URL in use (starts the embedded server if needed)."""
        if self.redis_url is not None:
            return self.redis_url
        if self._server is None:
            self._server = EmbeddedServer().start()
            atexit.register(self._server.stop)
        return self._server.url

    async def _start_fleet(self) -> LocalFleet:
        fleet = LocalFleet(
            self.url,
            prefix=self.prefix,
            workers=self.workers,
            concurrency=self.concurrency,
            claim_timeout_s=0.2,
            grace_period_s=1.0,
        )
        return await fleet.start()

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[LocalFleet]:
        loop = asyncio.get_running_loop()
        if self._fleet is not None and self._fleet.loop is loop:
            yield self._fleet
            return
        fleet = self._fleet = await self._start_fleet()
        try:
            yield fleet
        finally:
            if fleet is not self._persistent:
                self._fleet = None
                await fleet.stop()

    async def aclose(self) -> None:
        """Stop this process's workers and reaper (runs in flight are handed back)."""
        fleet, self._fleet = self._fleet, None
        self._persistent = None
        if fleet is not None:
            await fleet.stop()

    def close(self) -> None:
        """Stop the embedded server (after :meth:`aclose`); a later call starts a new one."""
        if self._server is not None:
            self._server.stop()
            self._server = None

    async def __aenter__(self) -> Orchestrator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
        self.close()

    # ------------------------------------------------------------ specs

    def _entrypoint(self, agent: Any) -> str:
        if isinstance(agent, str):
            return agent
        return _local.register(agent)

    def to_spec(
        self, spec_or_graph: Spec | TaskGraph | str | Path, inputs: dict[str, Any] | None = None
    ) -> Spec:
        """The :class:`Spec` of a spec, a graph or a YAML path, with ``inputs`` applied and
        this orchestrator's policy as the graph's default. Raises ``SpecError``."""
        if isinstance(spec_or_graph, Spec):
            return apply_inputs(spec_or_graph, inputs) if inputs else spec_or_graph
        if isinstance(spec_or_graph, str | Path):
            spec = load_spec(spec_or_graph)
            return apply_inputs(spec, inputs) if inputs else spec
        return Spec.from_graph(
            spec_or_graph,
            name="graph",
            inputs=inputs,
            defaults_policy=self.policy.spec_dict() if self.policy else None,
            entrypoint_of=None if self.redis_url else self._entrypoint,
        )

    def _single(self, agent: Any, policy: StrictPolicy | None) -> TaskGraph:
        name = agent_name(agent)
        nid = name if re.match(ID_PATTERN, name) else "agent"
        return TaskGraph([TaskNode(nid, agent, "{{ inputs.task }}", policy=policy)])

    # ------------------------------------------------------------ running

    async def submit(
        self,
        spec_or_graph: Spec | TaskGraph | str | Path,
        inputs: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> RunHandle:
        """Submit a run and return its :class:`RunHandle` at once. In-process workers (if
        any) keep running until :meth:`aclose`."""
        spec = self.to_spec(spec_or_graph, inputs)
        loop = asyncio.get_running_loop()
        if self._fleet is None or self._fleet.loop is not loop:
            self._fleet = await self._start_fleet()
        self._persistent = self._fleet
        return await self._submit(self._fleet, spec, idempotency_key)

    async def _submit(self, fleet: LocalFleet, spec: Spec, idempotency_key: str | None = None) -> RunHandle:
        s = await fleet.submit(spec, idempotency_key=idempotency_key)
        dependents = spec.dependents()
        sinks = [n.id for n in spec.nodes if not dependents[n.id]]
        return RunHandle(fleet.broker, s.run_id, s.created, sinks)

    async def run_spec_async(
        self,
        spec_or_graph: Spec | TaskGraph | str | Path,
        inputs: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> Report:
        """Submit, wait for the end, return the :class:`Report` (raises ``WaitTimeout``)."""
        spec = self.to_spec(spec_or_graph, inputs)
        async with self._session() as fleet:
            handle = await self._submit(fleet, spec)
            await handle.wait(timeout_s)
            return await handle.report()

    async def run_async(
        self,
        agent: Any,
        task: str,
        policy: StrictPolicy | None = None,
        timeout_s: float | None = None,
    ) -> Report:
        """Run one agent on ``task`` (passed verbatim, not a template) and return its
        :class:`Report`. ``policy`` overrides the orchestrator's for this run."""
        graph = self._single(agent, policy)
        return await self.run_spec_async(graph, {"task": task}, timeout_s)

    def run(
        self,
        agent: Any,
        task: str,
        policy: StrictPolicy | None = None,
        timeout_s: float | None = None,
    ) -> Report:
        """Sync :meth:`run_async` (own event loop; raises :class:`OrchestratorError` when
        called inside a running loop)."""
        return run_sync(self.run_async(agent, task, policy, timeout_s), "run_async")

    def run_spec(
        self,
        spec_or_graph: Spec | TaskGraph | str | Path,
        inputs: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> Report:
        """Sync :meth:`run_spec_async`."""
        return run_sync(self.run_spec_async(spec_or_graph, inputs, timeout_s), "run_spec_async")


def is_terminal(status: str) -> bool:
    """True for a final run state."""
    return status in {s.value for s in RunState if s.terminal}


__all__ = ["Orchestrator", "OrchestratorError", "RunHandle", "is_terminal"]
