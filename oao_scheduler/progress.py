"""Waiting for a run to finish, with live progress on a terminal.

On a terminal, a rich live table of node states (or state counts for large DAGs);
elsewhere, one line per node state change on stderr, so logs of CI jobs stay readable.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from oao_common.broker import Broker
from oao_common.errors import RedisUnavailable, WaitTimeout
from oao_common.log import get_logger
from oao_common.retry import LOOP_ERRORS, Backoff
from oao_common.states import RunState

from .report import STATUS_STYLE

TABLE_LIMIT = 40


async def _snapshot(broker: Broker, run_id: str, node_ids: list[str]) -> tuple[str, list[str]]:
    async with broker.redis.pipeline(transaction=False) as p:
        p.hget(broker.keys.run(run_id), "status")
        for nid in node_ids:
            p.hget(broker.keys.node(run_id, nid), "status")
        res = await p.execute()
    return str(res[0] or "?"), [str(s or "?") for s in res[1:]]


def _view(run_id: str, status: str, node_ids: list[str], states: list[str], t0: float) -> Group:
    elapsed = time.monotonic() - t0
    head = Text.from_markup(
        f"run [bold]{run_id}[/]: [{STATUS_STYLE.get(status, '')}]{status}[/] · {elapsed:.1f}s"
    )
    counts = Counter(states)
    summary = Text("  ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if len(node_ids) > TABLE_LIMIT:
        return Group(head, summary)
    t = Table(show_header=True, box=None, pad_edge=False)
    t.add_column("node")
    t.add_column("status")
    for nid, st in zip(node_ids, states, strict=True):
        t.add_row(nid, Text(st, style=STATUS_STYLE.get(st, "")))
    return Group(head, t)


async def wait_for_run(
    broker: Broker,
    run_id: str,
    console: Console | None = None,
    interval_s: float = 0.1,
    timeout_s: float | None = None,
) -> str:
    """Poll until the run is terminal; return its status. With ``console``, show
    progress (live on a terminal, change lines otherwise).

    Redis errors (an outage, a failover, OOM) are logged and waited out with backoff.
    Raises :class:`WaitTimeout` after ``timeout_s`` seconds, and
    :class:`RedisUnavailable` if the run disappears from Redis (pruned, or lost by a
    server that restarted without persistence): waiting would never end.
    """
    t0 = time.monotonic()
    deadline = None if timeout_s is None else t0 + timeout_s
    backoff = Backoff(get_logger(component="wait", run_id=run_id), "wait")
    node_ids: list[str] | None = None
    live: Live | None = None
    if console is not None and console.is_terminal:
        live = Live(console=console, refresh_per_second=8, transient=False)
        live.start()
    last: list[str] = []
    try:
        while True:
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(f"run {run_id} had not ended after {timeout_s:g} s (it goes on)")
            try:
                if node_ids is None:
                    run = await broker.get_run(run_id)
                    if not run:
                        raise RedisUnavailable(f"run {run_id} does not exist in Redis")
                    node_ids = [n for n in run.get("node_ids", "").split(",") if n]
                status, states = await _snapshot(broker, run_id, node_ids)
                backoff.ok()
            except LOOP_ERRORS as e:
                await backoff.sleep_after(e)
                continue
            if status == "?":
                raise RedisUnavailable(
                    f"run {run_id} is no longer in Redis (pruned, or lost by a server restart)"
                )
            if live is not None:
                live.update(_view(run_id, status, node_ids, states, t0))
            elif console is not None and len(node_ids) <= TABLE_LIMIT:
                for i, st in enumerate(states):
                    if not last or last[i] != st:
                        console.print(f"[{time.monotonic() - t0:7.2f}s] {node_ids[i]}: {st}", highlight=False)
            last = states
            if status in RunState.__members__ and RunState(status).terminal:
                return status
            await asyncio.sleep(interval_s)
    finally:
        if live is not None:
            live.stop()
