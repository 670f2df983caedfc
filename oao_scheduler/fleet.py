"""An OAO fleet inside this process: the one "start a server, workers, reaper; submit;
wait; report" of ``oao-scheduler run``, the Python API (``oao.Orchestrator``), the test
kit and the benchmarks.

``async with LocalFleet(redis_url, workers=2, concurrency=8) as fleet:`` connects to
Redis (a private embedded Valkey without a URL, discarded at exit), starts ``workers``
real :class:`~oao_worker.worker.Worker` s, a :class:`~oao_scheduler.reaper.Reaper` and,
if asked, an :class:`~oao_scheduler.escalation.Escalator` as tasks on the running event
loop, all on the same protocol as a distributed fleet. At exit the workers stop claiming,
let in-flight nodes finish within ``grace_period_s`` and hand the rest back.

``await fleet.run(spec)`` submits and waits (:func:`~oao_scheduler.progress.wait_for_run`,
which follows the run's event stream); :meth:`LocalFleet.submit`,
:meth:`LocalFleet.wait` and :meth:`LocalFleet.report` are the steps.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from rich.console import Console

from oao_common.broker import Broker
from oao_common.connection import EmbeddedServer, connect, ping
from oao_common.errors import RedisUnavailable
from oao_common.spec import Spec
from oao_common.trust import DEFAULT_TRUST, TrustPolicy
from oao_worker.worker import Worker

from .escalation import Escalator
from .progress import wait_for_run
from .reaper import Reaper
from .report import collect
from .submit import Submitted, submit_spec


class LocalFleet:
    """Workers, a reaper and an optional escalator running in this process.

    ``redis_url``: the Redis to use (``None``: a private embedded Valkey), or ``broker``:
    an existing connection and prefix (not closed at exit). ``workers`` (0 for none),
    ``concurrency``, ``queues``, ``heartbeat_ttl_s``, ``claim_timeout_s``,
    ``grace_period_s``, ``max_requeues`` and ``trust`` configure each worker (further
    :class:`Worker` options in ``worker_options``); ``reaper`` (default: when there are
    workers) runs one every ``reaper_interval_s``, with the workers' heartbeat TTL;
    ``escalator`` sends the webhooks of run endings, and :meth:`wait` lets it handle the
    run's own ending before returning.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        broker: Broker | None = None,
        prefix: str = "oao",
        workers: int = 1,
        concurrency: int = 8,
        queues: list[str] | None = None,
        heartbeat_ttl_s: float = 5.0,
        claim_timeout_s: float = 1.0,
        grace_period_s: float = 5.0,
        max_requeues: int = 5,
        trust: TrustPolicy = DEFAULT_TRUST,
        reaper: bool | None = None,
        reaper_interval_s: float = 0.5,
        escalator: bool = False,
        **worker_options: Any,
    ) -> None:
        if workers < 0 or concurrency < 1:
            raise ValueError("workers must be >= 0 and concurrency >= 1")
        if broker is not None and redis_url is not None:
            raise ValueError("give redis_url or broker, not both")
        self.redis_url = redis_url
        self.prefix = broker.keys.prefix if broker is not None else prefix
        self.worker_count = workers
        self.worker_options: dict[str, Any] = dict(
            queues=queues,
            concurrency=concurrency,
            heartbeat_ttl_s=heartbeat_ttl_s,
            claim_timeout_s=claim_timeout_s,
            grace_period_s=grace_period_s,
            max_requeues=max_requeues,
            trust=trust,
            **worker_options,
        )
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.max_requeues = max_requeues
        self.trust = trust
        self.with_reaper = workers > 0 if reaper is None else reaper
        self.reaper_interval_s = reaper_interval_s
        self.with_escalator = escalator
        self._broker = broker
        self._owns_broker = broker is None
        self._server: EmbeddedServer | None = None
        self.workers: list[Worker] = []
        self.escalator: Escalator | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------ lifecycle

    @property
    def broker(self) -> Broker:
        """The fleet's broker (valid once started)."""
        if self._broker is None:
            raise RuntimeError("LocalFleet used before start()")
        return self._broker

    @property
    def embedded(self) -> bool:
        """True when this fleet started its own embedded Valkey."""
        return self._server is not None

    @property
    def url(self) -> str | None:
        """The Redis URL in use (``None`` when given a broker)."""
        return self._server.url if self._server is not None else self.redis_url

    async def start(self) -> LocalFleet:
        """Connect (starting the embedded server if needed) and start the tasks; raises
        :class:`RedisUnavailable` if Redis cannot be reached."""
        self.loop = asyncio.get_running_loop()
        if self._broker is None:
            url = self.redis_url
            if url is None:
                self._server = await asyncio.to_thread(EmbeddedServer().start)
                url = self._server.url
            redis = connect(url)
            try:
                await ping(redis, url)
            except RedisUnavailable:
                await redis.aclose()
                await self._stop_server()
                raise
            self._broker = Broker(redis, self.prefix)
        broker = self._broker
        for _ in range(self.worker_count):
            w = Worker(broker, **self.worker_options)
            self.workers.append(w)
            self._tasks.append(asyncio.create_task(w.run(), name=f"fleet-{w.id}"))
        if self.with_reaper:
            reaper = Reaper(
                broker,
                interval_s=self.reaper_interval_s,
                heartbeat_ttl_s=self.heartbeat_ttl_s,
                max_requeues=self.max_requeues,
            )
            self._tasks.append(asyncio.create_task(reaper.run(self._stop), name="fleet-reaper"))
        if self.with_escalator:
            self.escalator = Escalator(broker, trust=self.trust)
            self._tasks.append(
                asyncio.create_task(self.escalator.run(self._stop, block_ms=100), name="fleet-escalator")
            )
        return self

    async def stop(self) -> None:
        """Stop the workers (in-flight nodes get their grace period, the rest is handed
        back), the reaper and the escalator; close what this fleet opened. Raises the
        first error a task ended with (after stopping everything)."""
        for w in self.workers:
            w.request_stop()
        self._stop.set()
        try:
            results = await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:
            self._tasks.clear()
            if self._owns_broker and self._broker is not None:
                await self._broker.redis.aclose()
                self._broker = None
            await self._stop_server()
        for r in results:
            if isinstance(r, Exception):
                raise r

    async def _stop_server(self) -> None:
        if self._server is not None:
            await asyncio.to_thread(self._server.stop)
            self._server = None

    async def __aenter__(self) -> LocalFleet:
        return await self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            await self.stop()
            return
        with contextlib.suppress(Exception):  # the error in flight is the one to see
            await self.stop()

    # ------------------------------------------------------------ runs

    async def submit(self, spec: Spec, idempotency_key: str | None = None) -> Submitted:
        """Write ``spec`` (validated) as a new run: ``submit_spec``."""
        return await submit_spec(self.broker, spec, idempotency_key=idempotency_key)

    async def wait(
        self,
        run_id: str,
        console: Console | None = None,
        timeout_s: float | None = None,
        interval_s: float = 1.0,
    ) -> str:
        """Wait for the run to end (progress on ``console``); returns its final status.
        With an escalator, the run's ending is escalated (if it must be) before this
        returns. Raises ``WaitTimeout`` and ``RedisUnavailable`` as
        :func:`~oao_scheduler.progress.wait_for_run` does."""
        status = await wait_for_run(self.broker, run_id, console, interval_s=interval_s, timeout_s=timeout_s)
        if self.escalator is not None:
            await self.escalator.poll()
        return status

    async def run(
        self, spec: Spec, console: Console | None = None, timeout_s: float | None = None
    ) -> tuple[str, str]:
        """Submit ``spec`` and wait for the end: ``(run_id, final status)``."""
        s = await self.submit(spec)
        return s.run_id, await self.wait(s.run_id, console, timeout_s)

    async def report(self, run_id: str, with_events: bool = True) -> dict[str, Any] | None:
        """The run's execution report (``None`` if the run is unknown)."""
        return await collect(self.broker, run_id, with_events=with_events)


__all__ = ["LocalFleet"]
