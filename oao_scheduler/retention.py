"""Retention: finished runs and run endings leave Redis after a while.

``oao-scheduler serve --retention 3d`` runs :class:`Retention` next to the reaper. Every
few seconds it

1. trims the stream of run endings (``<p>:runs:finished``) of entries older than the
   retention, but never one the escalation consumer group (``oao-escalation``) has not
   handled: nothing at or after its first pending entry or its first undelivered one;
2. deletes, in batches of ``batch`` runs per ``prune.lua`` call, every finished run whose
   ``finished_at`` is older than the retention (from the finished-runs index
   ``<p>:runs:done``), holding back runs whose ending escalation has not handled yet.

Both steps are idempotent, so several ``serve`` processes may run them at once. A Redis
error is logged and retried with backoff; it never ends the loop.
See docs/guarantees.md, "Retention".
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from redis import exceptions as redis_exc

from oao_common.broker import Broker
from oao_common.log import get_logger
from oao_common.retry import LOOP_ERRORS, Backoff

from .escalation import GROUP

#: A run whose ending may still be escalated is kept while its finished_at is within
#: this many ms of the first stream entry escalation needs (the Lua clock and the
#: stream's id clock are read at slightly different moments).
ESCALATION_MARGIN_MS = 1000


@dataclass(frozen=True, order=True, slots=True)
class StreamId:
    """A Redis stream entry id ``<ms>-<seq>``, ordered as Redis orders them."""

    ms: int
    seq: int = 0

    @classmethod
    def parse(cls, text: str) -> StreamId:
        """``"1700000000000-3"`` → ``StreamId(1700000000000, 3)``; raises ``ValueError``."""
        ms, _, seq = text.partition("-")
        return cls(int(ms), int(seq or 0))

    def __str__(self) -> str:
        return f"{self.ms}-{self.seq}"


async def escalation_floor(broker: Broker) -> StreamId | None:
    """The first entry of the run-endings stream that escalation has not handled yet:
    the smaller of its group's first pending entry and the first entry after the
    group's last-delivered id. ``None`` when it needs none: every entry is handled, or
    there is no stream or no group (no escalator has run; an ending whose run is pruned
    could not be escalated anyway)."""
    r = broker.redis
    key = broker.keys.finished
    try:
        groups = await r.xinfo_groups(key)
    except redis_exc.ResponseError as e:
        if "no such key" in str(e).lower():
            return None
        raise
    group = next((g for g in groups if g.get("name") == GROUP), None)
    if group is None:
        return None
    needed: list[StreamId] = []
    after = await r.xrange(key, f"({group['last-delivered-id']}", "+", count=1)
    if after:
        needed.append(StreamId.parse(str(after[0][0])))
    if int(group.get("pending") or 0) > 0:
        summary = await r.xpending(key, GROUP)
        if summary.get("min"):
            needed.append(StreamId.parse(str(summary["min"])))
    return min(needed) if needed else None


async def trim_endings(broker: Broker, before_ms: int, floor: StreamId | None) -> int:
    """Delete the run endings older than ``before_ms`` (ms since the epoch) that are
    also below ``floor`` (see :func:`escalation_floor`; ``None``: no such bound).
    Returns the number of entries deleted."""
    minid = StreamId(before_ms, 0) if floor is None else min(StreamId(before_ms, 0), floor)
    if minid <= StreamId(0, 0):
        return 0
    return int(await broker.redis.xtrim(broker.keys.finished, minid=str(minid), approximate=False))


def prune_cutoff(before_ms: int, floor: StreamId | None) -> int:
    """The newest ``finished_at`` (ms) a run may have to be pruned: ``before_ms``, moved
    earlier when escalation has not yet handled the endings from ``floor`` on."""
    if floor is None:
        return before_ms
    return min(before_ms, floor.ms - ESCALATION_MARGIN_MS)


@dataclass(slots=True)
class Pruned:
    """Totals of :func:`prune_finished`: runs and keys deleted."""

    runs: int = 0
    keys: int = 0


async def prune_finished(
    broker: Broker, cutoff_ms: int, batch: int = 100, max_batches: int = 100, max_keys: int = 20_000
) -> Pruned:
    """Delete finished runs that ended at or before ``cutoff_ms``, ``batch`` runs (and at
    most about ``max_keys`` keys) per script call, up to ``max_batches`` calls; the rest
    waits for the next call. Raises ``redis.RedisError``."""
    total = Pruned()
    for _ in range(max_batches):
        r = await broker.prune_runs(cutoff_ms, most=batch, max_keys=max_keys)
        total.runs += r.runs
        total.keys += r.keys
        if r.runs == 0:
            break
        await asyncio.sleep(0)  # let the reaper and the escalator run between batches
    return total


@dataclass(slots=True)
class RetentionStats:
    passes: int = 0
    runs: int = 0
    keys: int = 0
    endings: int = 0
    failures: int = 0


class Retention:
    """Prunes runs finished more than ``retention_s`` seconds ago and trims old run
    endings, every ``interval_s`` seconds (default: a quarter of the retention, between
    0.5 and 5 s). ``batch`` is the number of runs one ``prune.lua`` call deletes."""

    def __init__(
        self, broker: Broker, retention_s: float, interval_s: float | None = None, batch: int = 100
    ) -> None:
        if retention_s <= 0:
            raise ValueError("retention_s must be > 0 (0 means keep forever: do not run Retention)")
        self.broker = broker
        self.retention_ms = int(retention_s * 1000)
        self.interval_s = interval_s if interval_s is not None else min(5.0, max(0.5, retention_s / 4))
        self.batch = batch
        self.stats = RetentionStats()
        self.log = get_logger(component="retention")

    async def tick(self) -> tuple[Pruned, int]:
        """One pass: trim old run endings, prune old finished runs. Returns what was
        pruned and the number of stream entries trimmed. Raises ``redis.RedisError``."""
        self.stats.passes += 1
        before = await self.broker.server_time_ms() - self.retention_ms
        floor = await escalation_floor(self.broker)
        endings = await trim_endings(self.broker, before, floor)
        pruned = await prune_finished(self.broker, prune_cutoff(before, floor), batch=self.batch)
        self.stats.runs += pruned.runs
        self.stats.keys += pruned.keys
        self.stats.endings += endings
        if pruned.runs or endings:
            self.log.info("retention.pruned", runs=pruned.runs, keys=pruned.keys, endings=endings)
        return pruned, endings

    async def run(self, stop: asyncio.Event) -> None:
        """Tick every ``interval_s`` until ``stop`` is set. Every Redis error is logged
        and retried with backoff: the loop never ends on one."""
        backoff = Backoff(self.log, "retention", base_s=self.interval_s, cap_s=30.0)
        while not stop.is_set():
            try:
                await self.tick()
                backoff.ok()
                wait = self.interval_s
            except LOOP_ERRORS as e:
                self.stats.failures += 1
                wait = backoff.failed(e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=wait)
