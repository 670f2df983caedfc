"""Waiting for a run to end, with live progress: :func:`wait_for_run`, the one wait of
OAO (``run``, ``submit --wait``, ``RunHandle.wait``, the test kit, the benchmarks).

It follows the run's event stream (``XREAD BLOCK``) and keeps each node's state from its
``NODE_*`` events, so its cost grows with what happens, not with nodes x polls: the
nodes are read once at the start (and again only after a Redis error), never per tick.
On a terminal it shows a rich live table of node states (state counts for large DAGs);
elsewhere one line per node state change on stderr, so logs of CI jobs stay readable.
"""

from __future__ import annotations

import time
from collections import Counter

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from oao_common.broker import Broker
from oao_common.errors import RedisUnavailable, WaitTimeout
from oao_common.events import Event, EventType
from oao_common.log import get_logger
from oao_common.retry import LOOP_ERRORS, Backoff
from oao_common.states import NodeState, RunState

from .report import STATUS_STYLE

#: Above this many nodes the view shows counts by state, and no per-node lines.
TABLE_LIMIT = 40
#: The live view is redrawn at most this often (seconds).
LIVE_EVERY_S = 0.1

#: The node state each node event leaves behind (``docs/architecture.md``, section 3).
NODE_STATE_OF_EVENT: dict[str, str] = {
    EventType.NODE_READY: NodeState.READY,
    EventType.NODE_PARKED: NodeState.READY,  # held back by max_parallel_nodes, still READY
    EventType.NODE_STARTED: NodeState.RUNNING,
    EventType.NODE_SUCCEEDED: NodeState.SUCCEEDED,
    EventType.NODE_FAILED: NodeState.FAILED,
    EventType.NODE_SKIPPED: NodeState.SKIPPED,
    EventType.NODE_CANCELLED: NodeState.CANCELLED,
    EventType.NODE_RETRY_SCHEDULED: NodeState.PENDING,  # waiting out its retry delay
    EventType.NODE_REQUEUED: NodeState.READY,
    EventType.NODE_HANDED_BACK: NodeState.READY,
}
RUN_STATE_OF_EVENT: dict[str, str] = {
    EventType.RUN_STARTED: RunState.RUNNING,
    EventType.RUN_SUCCEEDED: RunState.SUCCEEDED,
    EventType.RUN_FAILED: RunState.FAILED,
    EventType.RUN_CANCELLED: RunState.CANCELLED,
    EventType.RUN_PARTIAL: RunState.PARTIAL,
}


def _terminal(status: str) -> bool:
    return status in RunState.__members__ and RunState(status).terminal


class _Progress:
    """The run as the view knows it: its status, and (with a console) each node's state
    and the counts by state, kept from events. Prints state changes or drives the live
    view."""

    def __init__(self, run_id: str, console: Console | None) -> None:
        self.run_id = run_id
        self.console = console
        self.t0 = time.monotonic()
        self.status = "?"
        self.nodes: dict[str, str] = {}
        self.counts: Counter[str] = Counter()
        self.small = True
        self.live: Live | None = None
        self._drawn = 0.0
        if console is not None and console.is_terminal:
            self.live = Live(console=console, refresh_per_second=8, transient=False)
            self.live.start()

    @property
    def tracks_nodes(self) -> bool:
        return self.console is not None

    def reset(self, status: str, node_ids: list[str], states: list[str | None]) -> None:
        """A fresh snapshot (start, or after a Redis error)."""
        self.status = status
        self.small = len(node_ids) <= TABLE_LIMIT
        for nid, st in zip(node_ids, states, strict=True):
            self._set(nid, st or "?")

    def apply(self, ev: Event) -> None:
        run_state = RUN_STATE_OF_EVENT.get(ev.type)
        if run_state is not None:
            self.status = run_state
        elif self.tracks_nodes and ev.node:
            st = NODE_STATE_OF_EVENT.get(ev.type)
            if st is not None and ev.node in self.nodes:
                self._set(ev.node, st)

    def _set(self, nid: str, st: str) -> None:
        old = self.nodes.get(nid)
        if old == st:
            return
        if old is not None:
            self.counts[old] -= 1
            if not self.counts[old]:
                del self.counts[old]
        self.counts[st] += 1
        self.nodes[nid] = st
        if self.live is None and self.console is not None and self.small:
            self.console.print(f"[{time.monotonic() - self.t0:7.2f}s] {nid}: {st}", highlight=False)

    def draw(self, force: bool = False) -> None:
        if self.live is None:
            return
        now = time.monotonic()
        if force or now - self._drawn >= LIVE_EVERY_S:
            self._drawn = now
            self.live.update(self._view(now))

    def _view(self, now: float) -> Group:
        style = STATUS_STYLE.get(self.status, "")
        head = Text.from_markup(
            f"run [bold]{self.run_id}[/]: [{style}]{self.status}[/] · {now - self.t0:.1f}s"
        )
        if not self.small:
            return Group(head, Text("  ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))))
        t = Table(show_header=True, box=None, pad_edge=False)
        t.add_column("node")
        t.add_column("status")
        for nid, st in self.nodes.items():
            t.add_row(nid, Text(st, style=STATUS_STYLE.get(st, "")))
        return Group(head, t)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()


async def _sync(broker: Broker, view: _Progress, first: bool) -> str:
    """Where to follow the stream from, and the state there: the newest event's id is
    read *before* the run and its nodes, so no change after the snapshot is missed
    (events already reflected in it are applied again, harmlessly, in order)."""
    after = await broker.last_event_id(view.run_id)
    if view.tracks_nodes:
        run = await broker.get_run(view.run_id)
        status = run.get("status")
        node_ids = [n for n in run.get("node_ids", "").split(",") if n]
        states = await broker.node_statuses(view.run_id, node_ids) if status else []
    else:
        status, node_ids, states = await broker.run_status(view.run_id), [], []
    if status is None:
        raise RedisUnavailable(
            f"run {view.run_id} does not exist in Redis"
            if first
            else f"run {view.run_id} is no longer in Redis (pruned, or lost by a server restart)"
        )
    view.reset(status, node_ids, states)
    return after


async def wait_for_run(
    broker: Broker,
    run_id: str,
    console: Console | None = None,
    interval_s: float = 1.0,
    timeout_s: float | None = None,
) -> str:
    """Follow the run's events until it ends; return its final status. With ``console``,
    show progress (live on a terminal, a line per node state change otherwise).

    ``interval_s`` is the longest wait on the stream before the run itself is checked
    (a run that was deleted sends no more events). Redis errors (an outage, a failover,
    OOM) are logged and waited out with backoff, then the view is read afresh. Raises
    :class:`WaitTimeout` after ``timeout_s`` seconds, and :class:`RedisUnavailable` if
    the run does not exist or disappears from Redis (pruned, or lost by a server that
    restarted without persistence): waiting would never end.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    backoff = Backoff(get_logger(component="wait", run_id=run_id), "wait")
    view = _Progress(run_id, console)
    block_s = interval_s if view.live is None else min(interval_s, 0.25)
    after: str | None = None  # None: (re)read the run and its nodes first
    first = True
    try:
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise WaitTimeout(f"run {run_id} had not ended after {timeout_s:g} s (it goes on)")
            events: list[Event] = []
            try:
                if after is None:
                    after = await _sync(broker, view, first)
                    first = False
                else:
                    wait_s = block_s if left is None else min(block_s, left)
                    events = await broker.next_events(run_id, after, int(wait_s * 1000), with_data=False)
                    if events:
                        after = events[-1].id
                    else:  # quiet: is the run still there (and not over)?
                        status = await broker.run_status(run_id)
                        if status is None:
                            raise RedisUnavailable(
                                f"run {run_id} is no longer in Redis (pruned, or lost by a server restart)"
                            )
                        view.status = status
                backoff.ok()
            except LOOP_ERRORS as e:
                after = None  # the server may have restarted or failed over: read afresh
                await backoff.sleep_after(e)
                continue
            for ev in events:
                view.apply(ev)
                if _terminal(view.status):
                    break
            done = _terminal(view.status)
            view.draw(force=done)
            if done:
                return view.status
    finally:
        view.close()
