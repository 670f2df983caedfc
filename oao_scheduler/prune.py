"""``oao-scheduler prune``: delete finished runs on demand.

Candidates are the finished runs of the finished-runs index (``<p>:runs:done``) that
ended more than ``older_than_s`` ago, plus finished runs written before that index
existed (found by scanning the runs index; unless ``dry_run`` they are added to the
finished-runs index, so ``serve --retention`` handles them from then on). ``statuses``
narrows them to runs that ended in those states. Runs whose ending escalation has not
handled yet are held back, as in :mod:`oao_scheduler.retention`.

Keys are counted exactly by ``prune.lua``; bytes are estimated from ``MEMORY USAGE`` of a
random sample of the candidates (memory is freed by ``UNLINK`` in the background).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

from oao_common.broker import Broker
from oao_common.states import TERMINAL_RUN_STATES

from .retention import escalation_floor, prune_cutoff, trim_endings

CHUNK = 500
BATCH = 100


@dataclass(slots=True)
class PruneReport:
    """What ``prune`` removed (or, with ``dry_run``, would remove).

    ``runs``: runs deleted; ``keys``: keys deleted (estimated in a dry run), spec keys
    included; ``bytes``: estimated memory freed (``sampled`` runs measured);
    ``indexed``: finished runs from before the finished-runs index that were added to
    it; ``held_back``: matching runs kept because escalation has not handled their
    ending; ``endings``: entries trimmed from the run-endings stream (``None`` in a dry
    run). Times in ms since the epoch (server clock).
    """

    dry_run: bool
    older_than_s: float
    statuses: list[str]
    cutoff_ms: int
    runs: int = 0
    keys: int = 0
    bytes: int = 0
    sampled: int = 0
    indexed: int = 0
    held_back: int = 0
    endings: int | None = None
    run_ids: list[str] = field(default_factory=list)

    def to_dict(self, with_ids: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_ids:
            d.pop("run_ids")
        return d


def parse_statuses(text: str | None) -> list[str]:
    """``"succeeded,FAILED"`` → ``["SUCCEEDED", "FAILED"]``; ``None`` or ``""`` → ``[]``
    (any terminal state). Raises ``ValueError`` naming a state that is not terminal."""
    out: list[str] = []
    for part in (text or "").split(","):
        s = part.strip().upper()
        if not s:
            continue
        if s not in TERMINAL_RUN_STATES:
            known = ", ".join(sorted(TERMINAL_RUN_STATES))
            raise ValueError(f"--status {part.strip()!r}: not a finished run state (one of {known})")
        if s not in out:
            out.append(s)
    return out


async def _statuses(broker: Broker, rids: list[str]) -> list[tuple[str | None, str | None]]:
    """``(status, finished_at)`` of each run, in order."""
    out: list[tuple[str | None, str | None]] = []
    for i in range(0, len(rids), CHUNK):
        async with broker.redis.pipeline(transaction=False) as p:
            for rid in rids[i : i + CHUNK]:
                p.hmget(broker.keys.run(rid), "status", "finished_at")
            out.extend((s, f) for s, f in await p.execute())
    return out


async def _unindexed_finished(broker: Broker) -> list[tuple[str, str, int]]:
    """``(rid, status, finished_at_ms)`` of finished runs missing from the done index."""
    rids = [str(rid) async for rid, _ in broker.redis.zscan_iter(broker.keys.runs, count=1000)]
    out: list[tuple[str, str, int]] = []
    for i in range(0, len(rids), CHUNK):
        chunk = rids[i : i + CHUNK]
        async with broker.redis.pipeline(transaction=False) as p:
            for rid in chunk:
                p.zscore(broker.keys.done, rid)
                p.hmget(broker.keys.run(rid), "status", "finished_at")
            res = await p.execute()
        for j, rid in enumerate(chunk):
            score, (status, finished) = res[2 * j], res[2 * j + 1]
            if score is None and status in TERMINAL_RUN_STATES:
                out.append((rid, status, int(finished or 0)))
    return out


async def run_keys(broker: Broker, run_id: str) -> list[str]:
    """Every key run ``run_id`` owns (those ``prune.lua`` deletes), existing or not;
    the shared spec key is not one of them."""
    k = broker.keys
    node_ids = await broker.redis.hget(k.run(run_id), "node_ids") or ""
    return [
        k.run(run_id),
        k.events(run_id),
        k.steps(run_id),
        k.messages(run_id),
        k.reservations(run_id),
        k.parked(run_id),
        *(k.node(run_id, nid) for nid in node_ids.split(",") if nid),
    ]


async def measure_runs(broker: Broker, run_ids: list[str]) -> tuple[int, int]:
    """``(bytes, keys)`` the runs' keys hold now: ``MEMORY USAGE … SAMPLES 0`` summed
    over the keys that exist."""
    total_bytes = total_keys = 0
    for rid in run_ids:
        keys = await run_keys(broker, rid)
        async with broker.redis.pipeline(transaction=False) as p:
            for key in keys:
                p.memory_usage(key, samples=0)
            sizes = await p.execute()
        total_bytes += sum(int(s) for s in sizes if s is not None)
        total_keys += sum(1 for s in sizes if s is not None)
    return total_bytes, total_keys


async def prune_on_demand(
    broker: Broker,
    older_than_s: float = 0.0,
    statuses: list[str] | None = None,
    dry_run: bool = False,
    sample: int = 50,
) -> PruneReport:
    """Delete (or with ``dry_run`` only count) the finished runs that ended more than
    ``older_than_s`` seconds ago, in ``statuses`` if given (else any). Raises
    ``redis.RedisError``."""
    wanted = set(statuses or TERMINAL_RUN_STATES)
    before = await broker.server_time_ms() - int(older_than_s * 1000)
    floor = await escalation_floor(broker)
    cutoff = prune_cutoff(before, floor)
    report = PruneReport(dry_run, older_than_s, sorted(statuses or []), cutoff)

    indexed = await broker.redis.zrangebyscore(broker.keys.done, "-inf", before, withscores=True)
    ids = [str(rid) for rid, _ in indexed]
    states = await _statuses(broker, ids) if statuses else [(None, None)] * len(ids)
    matches = [
        (rid, int(score))
        for (rid, score), (status, _) in zip(indexed, states, strict=True)
        if not statuses or status in wanted
    ]
    legacy = await _unindexed_finished(broker)
    matches += [(rid, fin) for rid, status, fin in legacy if fin <= before and status in wanted]
    if legacy and not dry_run:
        await broker.redis.zadd(broker.keys.done, {rid: fin for rid, _, fin in legacy}, nx=True)
        report.indexed = len(legacy)

    doomed = [rid for rid, fin in matches if fin <= cutoff]
    report.held_back = len(matches) - len(doomed)
    picked = random.sample(doomed, min(sample, len(doomed)))
    if picked:
        sampled_bytes, sampled_keys = await measure_runs(broker, picked)
        report.bytes = round(sampled_bytes * len(doomed) / len(picked))
        report.keys = round(sampled_keys * len(doomed) / len(picked))
        report.sampled = len(picked)
    if dry_run:
        report.runs = len(doomed)
        report.run_ids = doomed
        return report

    report.keys = 0
    for i in range(0, len(doomed), BATCH):
        batch = doomed[i : i + BATCH]
        r = await broker.prune_runs(cutoff, most=len(batch), run_ids=batch)
        report.runs += r.runs
        report.keys += r.keys
        report.run_ids += r.run_ids
    report.endings = await trim_endings(broker, before, floor)
    return report
