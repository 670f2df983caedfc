"""The fleet's state read from Redis for ``serve``'s gauges and ``oao-scheduler top``:
queue depths by queue, priority band and state, workers, runs in flight.

Cost per :meth:`FleetStats.depths` call: one pipelined ``LLEN`` per known ready list
and one ``depths.lua`` call (delayed retries, active jobs of registered workers and
parked jobs, each attributed to its node's queue and band by one ``HGET``, at most
``most_lookups`` of them). Ready lists are found from the workers' queues, the lists
seen before and, every ``scan_every`` calls, a ``SCAN`` of ``<p>:q:*`` (which walks
the keyspace, so it is not done on every call).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from . import metrics
from .broker import Broker
from .keys import BANDS, ready_name
from .metrics import split_band

Depths = dict[tuple[str, str, str], int]
"""``{(queue, band, state): jobs}``, state ``ready``, ``delayed``, ``active``, ``parked``."""


@dataclass(slots=True)
class FleetSnapshot:
    """One reading: depths, workers (``Broker.workers`` records plus ``heartbeat_age_s``),
    runs in flight, server time (s)."""

    depths: Depths
    workers: list[dict[str, Any]]
    runs_in_flight: int
    server_time_s: float
    took_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class FleetStats:
    """Reads the fleet's state; keeps the ready lists it has seen between calls."""

    def __init__(self, broker: Broker, scan_every: int = 12, most_lookups: int = 5000) -> None:
        self.broker = broker
        self.scan_every = scan_every
        self.most_lookups = most_lookups
        self._ready_lists: set[str] = set()
        self._calls = 0
        self._seen: set[tuple[str, str, str]] = set()

    async def snapshot(self) -> FleetSnapshot:
        """Depths, workers and runs in flight, in a few round trips."""
        t0 = time.perf_counter()
        b = self.broker
        workers = await b.workers()
        sec, usec = await b.redis.time()
        now = int(sec) + int(usec) / 1e6
        for w in workers:
            w["heartbeat_age_s"] = max(0.0, now - float(w["last_heartbeat"]))
        if self._calls % self.scan_every == 0:
            self._ready_lists |= set(await b.all_queue_lengths())
        self._calls += 1
        for w in workers:
            for q in str(w.get("queues") or "").split(","):
                if q:
                    self._ready_lists.update(ready_name(q, band) for band in BANDS)
        outside = await b.depths(self.most_lookups)
        self._ready_lists.update(r for _, r, _ in outside if r != "?")
        names = sorted(self._ready_lists)
        async with b.redis.pipeline(transaction=False) as p:
            for name in names:
                p.llen(b.keys.queue(name))
            p.zcard(b.keys.runs)
            p.zcard(b.keys.done)
            res = await p.execute()
        depths: Depths = {}
        for name, n in zip(names, res[: len(names)], strict=True):
            q, band = split_band(name)
            depths[(q, band, "ready")] = int(n)
        for state, ready, n in outside:
            q, band = split_band(ready)
            depths[(q, band, state)] = depths.get((q, band, state), 0) + n
        runs_total, runs_done = int(res[-2]), int(res[-1])
        return FleetSnapshot(
            depths, workers, max(0, runs_total - runs_done), now, took_s=time.perf_counter() - t0
        )

    async def update_gauges(self) -> FleetSnapshot:
        """Take a snapshot and set ``serve``'s gauges from it (queue depths, workers by
        state, oldest live heartbeat, slots, runs in flight)."""
        snap = await self.snapshot()
        for q, band, _ in list(snap.depths):
            for state in metrics.DEPTH_STATES:
                snap.depths.setdefault((q, band, state), 0)
        metrics.set_queue_depths(snap.depths, self._seen)
        self._seen |= set(snap.depths)
        alive = [w for w in snap.workers if w["alive"]]
        metrics.WORKERS.labels("alive").set(len(alive))
        metrics.WORKERS.labels("dead").set(len(snap.workers) - len(alive))
        metrics.FLEET_HEARTBEAT_AGE.set(max((w["heartbeat_age_s"] for w in alive), default=0.0))
        metrics.FLEET_SLOTS.labels("busy").set(sum(len(w["active"]) for w in alive))
        metrics.FLEET_SLOTS.labels("total").set(sum(int(w.get("concurrency") or 0) for w in alive))
        metrics.RUNS_IN_FLIGHT.set(snap.runs_in_flight)
        metrics.DEPTH_SCAN_SECONDS.set(snap.took_s)
        return snap
