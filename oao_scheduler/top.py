"""``oao-scheduler top``: a live terminal view of the fleet (rich), refreshed every
``--refresh`` seconds; ``q`` quits (Ctrl-C too).

What it shows, all read from Redis (no worker needs ``--metrics-port``):

- queues: jobs by queue and priority band, ready / delayed / active / parked
  (:class:`~oao_common.fleet_stats.FleetStats`, as ``serve``'s gauges);
- workers: state, heartbeat age (s), load (running nodes / slots), queues;
- runs in flight (the 200 newest runs are looked at): progress, failures, tokens, cost;
- tokens and USD per minute over the runs it follows (deltas of their counters);
  policy violations, requeues and retries in the last minute and since ``top`` began
  (read from the followed runs' event logs, at most 1,000 events per run per refresh).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from oao_common.broker import Broker
from oao_common.fleet_stats import FleetSnapshot, FleetStats

RUNS_LOOKED_AT = 200
RUNS_SHOWN = 12
WINDOW_S = 60.0
EVENTS_PER_RUN = 1000
COUNTED = {
    "POLICY_VIOLATION": "violations",
    "NODE_REQUEUED": "requeues",
    "NODE_RETRY_SCHEDULED": "retries",
    "STEP_RETRIED": "retries",
}


@dataclass
class TopState:
    """What ``top`` carries between refreshes."""

    totals: dict[str, tuple[int, float]] = field(default_factory=dict)  # run -> (tokens, usd)
    event_ids: dict[str, str] = field(default_factory=dict)  # run -> last event id read
    samples: deque[tuple[float, int, float]] = field(default_factory=deque)  # (t, tokens, usd)
    tokens: int = 0  # cumulative since start, over followed runs
    usd: float = 0.0
    seen: deque[tuple[float, str]] = field(default_factory=deque)  # (t, counter) events
    since_start: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTED.values(), 0))
    first: bool = True


@dataclass
class Frame:
    snap: FleetSnapshot
    runs: list[dict[str, Any]]
    tokens_per_min: float
    usd_per_min: float
    last_min: dict[str, int]
    since_start: dict[str, int]
    prefix: str


async def collect(broker: Broker, fleet: FleetStats, st: TopState) -> Frame:
    """One refresh: the fleet snapshot, runs in flight, rates and event counts."""
    snap = await fleet.snapshot()
    r, k = broker.redis, broker.keys
    newest = await r.zrevrange(k.runs, 0, RUNS_LOOKED_AT - 1)
    fields = (
        "name",
        "status",
        "nodes_total",
        "nodes_done",
        "nodes_failed",
        "tokens_in",
        "tokens_out",
        "cost_usd",
    )
    async with r.pipeline(transaction=False) as p:
        for rid in newest:
            p.hmget(k.run(rid), *fields)
        res = await p.execute()
    runs = []
    now = time.monotonic()
    for rid, vals in zip(newest, res, strict=True):
        run = dict(zip(fields, vals, strict=True))
        if not run.get("status"):
            continue
        run["id"] = rid
        tokens = int(run.get("tokens_in") or 0) + int(run.get("tokens_out") or 0)
        usd = float(run.get("cost_usd") or 0)
        prev = st.totals.get(rid)
        if prev is not None or not st.first:  # a run first seen later counts from 0
            pt, pu = prev or (0, 0.0)
            st.tokens += max(0, tokens - pt)
            st.usd += max(0.0, usd - pu)
        st.totals[rid] = (tokens, usd)
        if run["status"] in ("PENDING", "RUNNING"):
            runs.append(run)
    st.first = False
    st.samples.append((now, st.tokens, st.usd))
    while len(st.samples) > 1 and now - st.samples[0][0] > WINDOW_S:
        st.samples.popleft()
    t0, tok0, usd0 = st.samples[0]
    span = max(now - t0, 1e-9)
    tpm = (st.tokens - tok0) / span * 60 if len(st.samples) > 1 else 0.0
    upm = (st.usd - usd0) / span * 60 if len(st.samples) > 1 else 0.0
    await _count_events(broker, [x["id"] for x in runs], st, now)
    last_min = dict.fromkeys(COUNTED.values(), 0)
    for _, name in st.seen:
        last_min[name] += 1
    return Frame(snap, runs, tpm, upm, last_min, dict(st.since_start), k.prefix)


async def _count_events(broker: Broker, run_ids: list[str], st: TopState, now: float) -> None:
    r, k = broker.redis, broker.keys
    new_runs = [rid for rid in run_ids if rid not in st.event_ids]
    if new_runs:  # start at their current end: count what happens from now on
        async with r.pipeline(transaction=False) as p:
            for rid in new_runs:
                p.xrevrange(k.events(rid), count=1)
            last = await p.execute()
        for rid, items in zip(new_runs, last, strict=True):
            st.event_ids[rid] = items[0][0] if items else "0-0"
    followed = [rid for rid in run_ids if rid in st.event_ids]
    if followed:
        async with r.pipeline(transaction=False) as p:
            for rid in followed:
                p.xrange(k.events(rid), min=f"({st.event_ids[rid]}", count=EVENTS_PER_RUN)
            got = await p.execute()
        for rid, items in zip(followed, got, strict=True):
            for eid, f in items:
                st.event_ids[rid] = eid
                name = COUNTED.get(f.get("type", ""))
                if name:
                    st.seen.append((now, name))
                    st.since_start[name] += 1
    for rid in [x for x in st.event_ids if x not in run_ids]:
        st.event_ids.pop(rid, None)
    while st.seen and now - st.seen[0][0] > WINDOW_S:
        st.seen.popleft()


def render(f: Frame) -> Group:
    """The screen for one frame."""
    s = f.snap
    head = Text.assemble(
        ("OAO top", "bold"),
        f"  prefix {f.prefix}  ·  {time.strftime('%H:%M:%S', time.gmtime(s.server_time_s))} UTC  ·  ",
        f"{s.runs_in_flight} runs in flight  ·  ",
        ("q", "bold"),
        " quits",
    )
    queues = Table(title="queues (jobs)", title_justify="left", expand=False)
    for c in ("queue", "band", "ready", "delayed", "active", "parked"):
        queues.add_column(c, justify="right" if c not in ("queue", "band") else "left")
    by_qb: dict[tuple[str, str], dict[str, int]] = {}
    for (q, band, state), n in s.depths.items():
        by_qb.setdefault((q, band), {})[state] = n
    order = {"high": 0, "normal": 1, "low": 2}
    for (q, band), d in sorted(by_qb.items(), key=lambda x: (x[0][0], order.get(x[0][1], 3))):
        queues.add_row(q, band, *(str(d.get(k, 0)) for k in ("ready", "delayed", "active", "parked")))
    workers = Table(title="workers", title_justify="left")
    for c in ("worker", "state", "heartbeat", "load", "queues"):
        workers.add_column(c)
    for w in sorted(s.workers, key=lambda w: str(w["id"])):
        conc = int(w.get("concurrency") or 0)
        busy = len(w["active"])
        workers.add_row(
            str(w["id"]),
            "[green]alive[/]" if w["alive"] else "[red]dead[/]",
            f"{w['heartbeat_age_s']:.1f}s",
            f"{busy}/{conc}" if conc else str(busy),
            str(w.get("queues", "")),
        )
    runs = Table(title=f"runs in flight (newest {RUNS_SHOWN})", title_justify="left")
    for c in ("run", "name", "status", "progress", "done", "failed", "tokens", "USD"):
        runs.add_column(c)
    for run in f.runs[:RUNS_SHOWN]:
        total = int(run.get("nodes_total") or 0)
        done = int(run.get("nodes_done") or 0)
        runs.add_row(
            run["id"],
            str(run.get("name") or ""),
            str(run.get("status")),
            ProgressBar(total=max(total, 1), completed=done, width=20),
            f"{done}/{total}",
            str(run.get("nodes_failed") or 0),
            str(int(run.get("tokens_in") or 0) + int(run.get("tokens_out") or 0)),
            f"{float(run.get('cost_usd') or 0):.4f}",
        )
    rates = Text.assemble(
        ("tokens/min ", "bold"),
        f"{f.tokens_per_min:,.0f}   ",
        ("USD/min ", "bold"),
        f"{f.usd_per_min:.4f}   ",
        *(
            part
            for name in ("violations", "requeues", "retries")
            for part in ((f"{name} ", "bold"), f"{f.last_min[name]} last min, {f.since_start[name]} total   ")
        ),
    )
    return Group(head, queues, workers, runs, rates)


async def run_top(
    broker: Broker, refresh_s: float = 1.0, once: bool = False, console: Console | None = None
) -> int:
    """Show the view until ``q`` (or Ctrl-C, or stdin closing); ``once``: print one frame."""
    console = console or Console()
    fleet = FleetStats(broker)
    st = TopState()
    if once:
        console.print(render(await collect(broker, fleet, st)))
        return 0
    quit_ = asyncio.Event()
    loop = asyncio.get_running_loop()
    restore = _keys(loop, quit_)
    try:
        with Live(
            render(await collect(broker, fleet, st)), console=console, screen=True, auto_refresh=False
        ) as live:
            while not quit_.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(quit_.wait(), timeout=refresh_s)
                if quit_.is_set():
                    break
                live.update(render(await collect(broker, fleet, st)), refresh=True)
    finally:
        restore()
    return 0


def _keys(loop: asyncio.AbstractEventLoop, quit_: asyncio.Event) -> Any:
    """Read single keys from a terminal's stdin (cbreak mode); ``q`` sets ``quit_``.
    Returns the function that restores the terminal."""
    fd = sys.stdin.fileno() if sys.stdin and not sys.stdin.closed else -1
    if fd < 0 or not os.isatty(fd):
        return lambda: None
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def on_key() -> None:
        try:
            data = os.read(fd, 64)
        except OSError:
            data = b""
        if not data or b"q" in data.lower():
            quit_.set()

    loop.add_reader(fd, on_key)

    def restore() -> None:
        loop.remove_reader(fd)
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)

    return restore
