"""The worker: claims nodes (atomic LMOVE in Lua, ADR 007), runs up to ``concurrency`` at once on
asyncio, heartbeats, and shuts down gracefully.

Claiming: with free slots, ``claim.lua`` moves up to that many ready jobs into this
worker's active list and makes them RUNNING attempts, in one round trip, taking the
worker's queues in order and each queue's priority bands high, normal, low. When it
finds nothing, the worker blocks in ``BLPOP`` on its queues' wake tokens (no polling)
until a push wakes it (ADR 007).

Heartbeat: ``SET <hb> PX ttl`` every ``ttl / 3``. If a refresh finds the key already
gone (the process was paused past its TTL and may have been reaped), the worker checks
its leases and abandons the nodes it lost; fencing rejects their writes anyway.

Shutdown (SIGTERM / SIGINT): stop claiming, give in-flight nodes ``grace_period_s`` to
finish, cancel the rest and hand every job of the active list back to the front of its
ready list (``handback.lua``), then deregister.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections import deque
from typing import Any

from redis import exceptions as redis_exc

from oao_common import metrics
from oao_common.broker import Broker, ClaimedJob
from oao_common.circuit import CircuitBreaker
from oao_common.errors import (
    PermanentError,
    PolicyViolation,
    StaleAttemptError,
    TransientError,
)
from oao_common.events import EventType, pending_event
from oao_common.log import get_logger
from oao_common.policy import backoff_delay_s
from oao_common.ratelimit import RateLimiter
from oao_common.templating import render
from oao_common.trust import DEFAULT_TRUST, TrustPolicy

from .budget import RunBudget
from .context import AgentContext
from .governance import Governor, StrictPolicy
from .guards import CallGuards
from .runtime import RuntimeCache

REDIS_ERRORS = (redis_exc.ConnectionError, redis_exc.TimeoutError, OSError)


def default_worker_id() -> str:
    """``<host>-<pid>-<4 hex>``: unique per process life, readable in ``workers``."""
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(2).hex()}"


def error_info(e: BaseException) -> dict[str, Any]:
    """The JSON error record stored on a node and in its events."""
    info: dict[str, Any] = {"type": type(e).__name__, "message": str(e)}
    if isinstance(e, PolicyViolation):
        info.update(e.to_dict())
    return info


class _Slots:
    """A counting semaphore that can also take "as many as are free" at once.

    ``release`` is synchronous so it is safe in ``finally`` blocks of cancelled tasks.
    """

    def __init__(self, n: int) -> None:
        self.free = n
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        while self.free <= 0:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            finally:
                if fut in self._waiters:
                    self._waiters.remove(fut)
        self.free -= 1

    def take_free(self, most: int) -> int:
        n = max(0, min(self.free, most))
        self.free -= n
        return n

    def release(self, n: int = 1) -> None:
        self.free += n
        while n > 0 and self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(None)
                n -= 1


class Worker:
    """One worker process' engine (``oao-worker`` runs one; ``run`` may run several).

    ``heartbeat_ttl_s``: seconds a heartbeat lives; the reaper treats a worker whose
    key expired as dead. ``claim_batch``: most extra jobs taken per claim round trip.
    ``trust``: what specs may import, read as API keys and connect to (docs/security.md).
    """

    def __init__(
        self,
        broker: Broker,
        queues: list[str] | None = None,
        concurrency: int = 10,
        worker_id: str | None = None,
        heartbeat_ttl_s: float = 5.0,
        grace_period_s: float = 30.0,
        claim_timeout_s: float = 1.0,
        claim_batch: int = 32,
        trust: TrustPolicy = DEFAULT_TRUST,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self.broker = broker
        self.queues = queues or ["default"]
        self.concurrency = concurrency
        self.id = worker_id or default_worker_id()
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.grace_period_s = grace_period_s
        # Idle waits stay well inside the heartbeat so a stopping worker exits promptly.
        self.claim_timeout_s = min(claim_timeout_s, heartbeat_ttl_s / 4)
        self.claim_batch = claim_batch
        self.runtimes = RuntimeCache(broker, trust=trust)
        self.call_guards = CallGuards(
            RateLimiter(broker.redis, broker.keys), CircuitBreaker(broker.redis, broker.keys)
        )
        self.log = get_logger(worker_id=self.id)
        self._slots = _Slots(concurrency)
        self._stop = asyncio.Event()
        self._inflight: dict[asyncio.Task[None], ClaimedJob] = {}
        self._cancelled: set[asyncio.Task[Any]] = set()
        self.completed = 0
        self.failed = 0

    # ------------------------------------------------------------------ lifecycle

    def request_stop(self) -> None:
        """Stop claiming and begin the graceful shutdown (safe from a signal handler)."""
        if not self._stop.is_set():
            self.log.info("worker.stopping", inflight=len(self._inflight))
            self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def run(self) -> None:
        """Run until :meth:`request_stop`; then drain, hand back and deregister."""
        info = {
            "host": socket.gethostname(),
            "pid": str(os.getpid()),
            "queues": ",".join(self.queues),
            "concurrency": str(self.concurrency),
            "started_at": f"{time.time():.3f}",
        }
        await self.broker.heartbeat(self.id, self.heartbeat_ttl_s, info)
        self.log.info("worker.started", queues=self.queues, concurrency=self.concurrency)
        hb = asyncio.create_task(self._heartbeat_loop(), name=f"{self.id}-heartbeat")
        control = asyncio.create_task(self._control_loop(), name=f"{self.id}-control")
        loops = [asyncio.create_task(self._claim_loop(), name=f"{self.id}-claim")]
        try:
            await self._stop.wait()
        finally:
            for t in loops:
                t.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            await self._drain()
            hb.cancel()
            control.cancel()
            await asyncio.gather(hb, control, return_exceptions=True)
            await self._leave()

    async def _drain(self) -> None:
        tasks = list(self._inflight)
        if tasks:
            self.log.info("worker.draining", inflight=len(tasks), grace_s=self.grace_period_s)
            _, pending = await asyncio.wait(tasks, timeout=self.grace_period_s)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _leave(self) -> None:
        for delay in (0.0, 0.2, 0.5, 1.0, 2.0):
            await asyncio.sleep(delay)
            try:
                n = await self.broker.handback(self.id)
                metrics.REQUEUED.labels("handback").inc(n)
                await self.broker.deregister(self.id)
                self.log.info("worker.stopped", handed_back=n, completed=self.completed, failed=self.failed)
                return
            except REDIS_ERRORS as e:
                self.log.warning("worker.handback_failed", error=str(e))
        self.log.error(
            "worker.handback_gave_up",
            note="the reaper will requeue this worker's jobs after its heartbeat expires",
        )

    # ------------------------------------------------------------------ heartbeat

    async def _heartbeat_loop(self) -> None:
        interval = self.heartbeat_ttl_s / 3
        while True:
            await asyncio.sleep(interval)
            try:
                alive = await self.broker.heartbeat(self.id, self.heartbeat_ttl_s)
                if not alive:
                    await self._check_leases()
            except REDIS_ERRORS as e:
                self.log.warning("worker.heartbeat_failed", error=str(e))

    async def _check_leases(self) -> None:
        """Our heartbeat had lapsed: abandon nodes whose attempt moved on."""
        items = list(self._inflight.items())
        if not items:
            return
        held = await self.broker.lease_holders([j for _, j in items])
        lost = [(t, j) for (t, j), ok in zip(items, held, strict=True) if not ok]
        self.log.warning("worker.heartbeat_lapsed", inflight=len(items), lost=len(lost))
        for t, j in lost:
            self.log.warning("node.lease_lost", run_id=j.run_id, node_id=j.node_id, attempt=j.attempt)
            t.cancel()

    # ------------------------------------------------------------------ control

    async def _control_loop(self) -> None:
        """Listen for fleet control messages (``cancel <rid>``) on the pub/sub channel.

        A message missed during a reconnect costs only latency: the cancelled nodes'
        next fenced write is rejected anyway.
        """
        failures = 0
        while True:
            pubsub = self.broker.redis.pubsub()
            try:
                await pubsub.subscribe(self.broker.keys.control_channel)
                failures = 0
                async for msg in pubsub.listen():
                    if msg.get("type") != "message":
                        continue
                    cmd, _, arg = str(msg["data"]).partition(" ")
                    if cmd == "cancel" and arg:
                        await self._cancel_run(arg)
            except REDIS_ERRORS as e:
                failures += 1
                self.log.warning("worker.control_channel_lost", error=str(e))
                await asyncio.sleep(min(10.0, 0.1 * 2 ** min(failures, 7)))
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def _cancel_run(self, run_id: str) -> None:
        """Stop this worker's in-flight nodes of a cancelled (or failed) run at once."""
        victims = [t for t, j in self._inflight.items() if j.run_id == run_id]
        if not victims:
            return
        self._cancelled.update(victims)
        for t in victims:
            t.cancel()
        await asyncio.gather(*victims, return_exceptions=True)
        self.log.info("run.cancelled_nodes_stopped", run_id=run_id, nodes=len(victims))
        with contextlib.suppress(*REDIS_ERRORS):
            await self._resync()  # their jobs leave the active list

    # ------------------------------------------------------------------ claiming

    async def _claim_loop(self) -> None:
        """Claim while there is work and a free slot; when a claim finds nothing, block
        on the queues' wake tokens (no polling). Claims are atomic moves in Lua."""
        failures = 0
        while not self._stop.is_set():
            await self._slots.acquire()
            taken = 1 + self._slots.take_free(self.claim_batch - 1)
            claimed: list[ClaimedJob] = []
            wanted = taken
            pause = 0.0
            try:
                claimed = await self.broker.claim(self.id, self.queues, taken)
                for cj in claimed:
                    t = asyncio.create_task(self._execute(cj), name=f"{cj.job}#{cj.attempt}")
                    self._inflight[t] = cj
                    t.add_done_callback(self._inflight.pop)
                taken -= len(claimed)
                if failures:
                    await self._resync()
                    failures = 0
            except REDIS_ERRORS as e:
                failures += 1
                pause = min(10.0, 0.05 * 2 ** min(failures, 8))
                self.log.warning("worker.redis_unavailable", error=str(e), retry_in_s=round(pause, 2))
            finally:
                self._slots.release(taken)
            if pause:
                await asyncio.sleep(pause)
            elif len(claimed) < wanted:
                # The lists were drained: a later push leaves a wake token, so waiting
                # now loses nothing and saves an empty claim round trip.
                try:
                    await self.broker.wait_for_work(self.queues, self.claim_timeout_s)
                except REDIS_ERRORS as e:
                    self.log.warning("worker.redis_unavailable", error=str(e))
                    await asyncio.sleep(0.5)

    async def _resync(self) -> None:
        """After a Redis error: hand back jobs in our active list that we are not running
        (a claim whose reply was lost)."""
        n = await self.broker.handback(self.id, keep=[j.job for j in self._inflight.values()])
        if n:
            self.log.warning("worker.resync_handed_back", jobs=n)

    # ------------------------------------------------------------------ executing

    async def _execute(self, job: ClaimedJob) -> None:
        log = self.log.bind(run_id=job.run_id, node_id=job.node_id, attempt=job.attempt)
        ctx: AgentContext | None = None
        started = time.monotonic()
        agent_type = "?"
        metrics.ACTIVE_AGENTS.inc()
        try:
            log.debug("node.started")
            rt = await self.runtimes.get(job.run_id)
            node = rt.spec.node(job.node_id)
            agent_spec = rt.spec.agents[node.agent]
            agent_type = agent_spec.kind
            policy = rt.spec.effective_policy(node)
            variables = {
                "inputs": rt.inputs,
                "nodes": {k: {"output": v} for k, v in job.dep_outputs.items()},
            }
            task = render(node.task, variables, f"nodes.{node.id}.task")
            ctx = AgentContext(
                broker=self.broker,
                worker_id=self.id,
                job=job,
                spec=rt.spec,
                inputs=rt.inputs,
                task=task,
                governor=Governor([StrictPolicy(policy, agent_spec.tools, agent_spec.deny_tools)]),
                providers=rt.providers,
                tools=rt.tools,
                default_model=rt.spec.default_model(node.agent),
                prices=rt.prices,
                budget=RunBudget(self.broker, job.run_id, rt.spec.policy, ttl_s=policy.timeout_s or 300.0),
                retry=rt.spec.effective_retry(node),
                call_guards=self.call_guards,
                guards=rt.guards,
            )
            agent = rt.agent(node.agent)
            limit, scope, run_elapsed = policy.timeout_s, "node", 0.0
            run_timeout = rt.spec.policy.timeout_s
            if run_timeout is not None and rt.started_at_ms:
                run_elapsed = max(0.0, time.time() - rt.started_at_ms / 1000)
                left = run_timeout - run_elapsed
                if left <= 0:
                    raise PolicyViolation("timeout_s", run_timeout, round(run_elapsed, 3), scope="run")
                if limit is None or left < limit:
                    limit, scope = left, "run"
            try:
                async with asyncio.timeout(limit):
                    output = await agent.run(ctx)
            except TimeoutError:
                elapsed = round(time.monotonic() - started, 3)
                if scope == "run":
                    raise PolicyViolation(
                        "timeout_s", run_timeout, round(run_elapsed + elapsed, 3), scope="run"
                    ) from None
                raise PolicyViolation("timeout_s", policy.timeout_s, elapsed) from None
            ok = await self.broker.complete(self.id, job, output, ctx.node_fields(), ctx.drain_events())
            outcome = "succeeded" if ok else "stale"
            metrics.EXECUTIONS.labels(outcome, agent_type).inc()
            metrics.EXECUTION_SECONDS.labels(agent_type).observe(time.monotonic() - started)
            if ok:
                self.completed += 1
                log.info(
                    "node.succeeded",
                    steps=ctx.governor.usage.steps,
                    replayed=ctx.replayed_steps,
                    duration_ms=int((time.monotonic() - started) * 1000),
                )
            else:
                metrics.STALE_WRITES.inc()
                log.warning("node.stale_completion_rejected")
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if me in self._cancelled:
                self._cancelled.discard(me)
                log.info("node.stopped", reason="run cancelled or failed")
            else:
                log.info("node.abandoned", reason="shutdown or lease lost")
                raise
        except StaleAttemptError as e:
            metrics.STALE_WRITES.inc()
            metrics.EXECUTIONS.labels("stale", agent_type).inc()
            log.warning("node.stale_attempt", error=str(e))
        except Exception as e:
            outcome = await self._fail(job, ctx, e, log)
            metrics.EXECUTIONS.labels(outcome, agent_type).inc()
            metrics.EXECUTION_SECONDS.labels(agent_type).observe(time.monotonic() - started)
        finally:
            metrics.ACTIVE_AGENTS.dec()
            self._slots.release()

    async def _fail(self, job: ClaimedJob, ctx: AgentContext | None, e: Exception, log: Any) -> str:
        """Record a failed attempt; returns the outcome label (retry, failed, stale, unrecorded)."""
        events = ctx.drain_events() if ctx else []
        if ctx and ctx.lifecycle.state != "TERMINATE":
            ctx.lifecycle.terminate()
            events += ctx.drain_events()
        fields = ctx.node_fields() if ctx else {}
        info = error_info(e)
        delay: float | None = None
        if isinstance(e, PolicyViolation):
            metrics.POLICY_VIOLATIONS.labels(e.rule, e.scope).inc()
            events.append(pending_event(EventType.POLICY_VIOLATION, e.to_dict()))
        elif not isinstance(e, PermanentError):
            try:
                rt = await self.runtimes.get(job.run_id)
                retry = rt.spec.effective_retry(rt.spec.node(job.node_id))
            except Exception:
                retry = None
            if retry is not None and job.retries < (retry.max_retries or 0):
                delay = backoff_delay_s(retry, job.retries + 1)
                if isinstance(e, TransientError) and e.retry_after_s:
                    delay = max(delay, e.retry_after_s)
        try:
            r = await self.broker.fail(self.id, job, info, delay, fields, events)
        except REDIS_ERRORS as re:
            log.error(
                "node.fail_not_recorded",
                error=str(re),
                note="the job stays in the active list; handback or the reaper requeues it",
            )
            return "unrecorded"
        if r == 2:
            metrics.RETRIES.labels("node").inc()
            log.warning(
                "node.retry_scheduled",
                error=info["message"],
                delay_s=round(delay or 0, 3),
                retry=job.retries + 1,
            )
            return "retry"
        if r == 1:
            self.failed += 1
            log.error("node.failed", error=info["message"], error_type=info["type"])
            return "failed"
        metrics.STALE_WRITES.inc()
        log.warning("node.stale_failure_rejected", error=info["message"])
        return "stale"
