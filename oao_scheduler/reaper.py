"""The reaper and the delayed-retry promoter (run by ``oao-scheduler serve`` / ``run``).

Every ``interval_s`` it:

1. promotes due retries from the delayed set to their ready lists (``promote.lua``);
2. for each worker whose last heartbeat in the index is older than the heartbeat TTL,
   runs ``reap.lua``, which checks the heartbeat key itself (a worker is dead only
   when its key has expired) and moves its active jobs back to the front of their
   ready lists, dead-lettering nodes requeued more than ``max_requeues`` times.

Both scripts are atomic and idempotent, so any number of reapers may run at once:
the first to act wins and the others find nothing to do. No leader election needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from oao_common import metrics, tracing
from oao_common.broker import Broker, ReapResult
from oao_common.fleet_stats import FleetStats
from oao_common.keys import parse_job
from oao_common.log import get_logger
from oao_common.retry import LOOP_ERRORS, Backoff


@dataclass(slots=True)
class ReaperStats:
    passes: int = 0
    promoted: int = 0
    requeued: int = 0
    poisoned: int = 0
    reaped_workers: int = 0


class Reaper:
    """``heartbeat_ttl_s`` must match the workers'; detection takes at most
    ``heartbeat_ttl_s + interval_s`` after a worker's last heartbeat."""

    def __init__(
        self,
        broker: Broker,
        interval_s: float = 1.0,
        heartbeat_ttl_s: float = 5.0,
        max_requeues: int = 5,
        gauge_every: int = 5,
    ) -> None:
        self.broker = broker
        self.interval_s = interval_s
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.max_requeues = max_requeues
        self.stats = ReaperStats()
        self.gauge_every = gauge_every
        self.fleet = FleetStats(broker)
        self.log = get_logger(component="reaper")
        self._gauged_queues: set[str] = set()

    async def tick(self) -> list[ReapResult]:
        """One pass: promote due retries, reap dead workers. Returns what was reaped."""
        self.stats.passes += 1
        promoted = await self.broker.promote_due()
        self.stats.promoted += promoted
        if promoted:
            self.log.info("reaper.promoted", jobs=promoted)
        results = []
        for wid in await self.broker.stale_workers(self.heartbeat_ttl_s * 0.5):
            held = await self._attempts_of(wid) if tracing.ENABLED else []
            r = await self.broker.reap(wid, self.max_requeues)
            if r is None:
                continue
            self._end_dead_attempts(wid, held)
            results.append(r)
            self.stats.requeued += r.requeued
            self.stats.poisoned += r.poisoned
            metrics.REQUEUED.labels("worker_dead").inc(r.requeued)
            metrics.DEAD_LETTERED.inc(r.poisoned)
            self.stats.reaped_workers += 1
            self.log.warning(
                "reaper.worker_dead",
                dead_worker=wid,
                requeued=r.requeued,
                poisoned=r.poisoned,
                dropped=r.dropped,
            )
        if self.stats.passes % self.gauge_every == 1 or self.gauge_every == 1:
            await self.update_gauges()
        return results

    async def _attempts_of(self, wid: str) -> list[tuple[str, str, int, int, str]]:
        """(run id, node id, attempt, claimed_at ms, run traceparent) of the jobs in a
        worker's active list, read before it is reaped (tracing only)."""
        b = self.broker
        jobs = await b.redis.lrange(b.keys.active(wid), 0, -1)
        if not jobs:
            return []
        parsed = [parse_job(j) for j in jobs]
        async with b.redis.pipeline(transaction=False) as p:
            for rid, nid in parsed:
                p.hmget(b.keys.node(rid, nid), "attempt", "claimed_at", "lease")
                p.hget(b.keys.run(rid), "traceparent")
            res = await p.execute()
        out = []
        for i, (rid, nid) in enumerate(parsed):
            (attempt, claimed, lease), tp = res[2 * i], res[2 * i + 1]
            if tp and attempt and lease == wid:
                out.append((rid, nid, int(attempt), int(claimed or 0), str(tp)))
        return out

    def _end_dead_attempts(self, wid: str, held: list[tuple[str, str, int, int, str]]) -> None:
        """End the ``oao.node`` spans of a dead worker's attempts (their ids are derived,
        so the steps it exported before dying hang under them)."""
        now_ns = time.time_ns()
        for rid, nid, attempt, claimed_ms, tp in held:
            p = tracing.parse_traceparent(tp)
            if p is None:
                continue
            tracing.emit_finished_span(
                "oao.node",
                tp,
                claimed_ms * 1_000_000 or now_ns,
                now_ns,
                {
                    "oao.run.id": rid,
                    "oao.node.id": nid,
                    "oao.node.attempt": attempt,
                    "oao.worker.id": wid,
                    "oao.node.status": "worker_died",
                },
                error="the worker died (heartbeat expired); the job was requeued",
                as_child=True,
                span_id=tracing.attempt_span_id(p[0], nid, attempt),
            )

    async def update_gauges(self) -> None:
        """Queue depths by queue, band and state, workers, runs in flight
        (:class:`~oao_common.fleet_stats.FleetStats`), every ``gauge_every`` passes."""
        await self.fleet.update_gauges()

    async def run(self, stop: asyncio.Event) -> None:
        """Tick every ``interval_s`` until ``stop`` is set; any Redis error (outage, OOM,
        READONLY...) is logged and retried with backoff, never fatal."""
        backoff = Backoff(self.log, "reaper", base_s=self.interval_s, cap_s=10.0)
        while not stop.is_set():
            try:
                await self.tick()
                backoff.ok()
                wait = self.interval_s
            except LOOP_ERRORS as e:
                wait = backoff.failed(e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=wait)
