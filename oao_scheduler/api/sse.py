"""A run's event log as Server-Sent Events, with the live text of streaming models.

Each SSE message with an ``id:`` is one entry of the run's Redis stream: ``id:`` is the
stream id, ``event:`` the event type, ``data:`` the event as JSON (``Event.to_dict``). A
client resumes with ``Last-Event-ID`` and gets exactly the events after that id. The
stream ends after the run's end event (``RUN_SUCCEEDED``, ``RUN_FAILED``,
``RUN_CANCELLED``, ``RUN_PARTIAL``). While nothing happens a comment line is sent every
``block_ms`` to keep proxies from closing the connection.

Interleaved with them, unless the client opted out, ``event: MODEL_DELTA`` messages carry
the text of a streaming model call as it comes, ``data: {"node", "attempt", "seq",
"offset", "text"}``, with **no** ``id:`` line: they are not in the event log, so they do
not move ``Last-Event-ID`` and a resumed stream does not repeat them. The run's delta
channel is subscribed before the backlog is read, so a delta published after the client
connected is sent (during the catch-up too, between pages); the deltas of a model call
reach the client before the call's ``STEP_COMPLETED``. Deltas are best-effort: a slow
client, a Redis outage or a worker's failed publish loses some (``offset`` shows gaps).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

from oao_common.broker import Broker
from oao_common.events import Event, EventType
from oao_common.log import get_logger
from oao_common.retry import LOOP_ERRORS, Backoff
from oao_common.states import RunState

from .deltas import DeltaHub, DeltaSubscription

END_TYPES = frozenset(
    {EventType.RUN_SUCCEEDED, EventType.RUN_FAILED, EventType.RUN_CANCELLED, EventType.RUN_PARTIAL}
)
STREAM_ID = re.compile(r"^\d{1,20}(-\d{1,20})?$")
PAGE = 500


def format_event(ev: Event) -> str:
    """One SSE message (ends with the blank line)."""
    data = json.dumps(ev.to_dict(), separators=(",", ":"), default=str)
    return f"id: {ev.id}\nevent: {ev.type}\ndata: {data}\n\n"


def format_delta(delta: dict[str, Any]) -> str:
    """One ``MODEL_DELTA`` SSE message: no ``id:`` (it is not in the event log)."""
    data = json.dumps(delta, separators=(",", ":"))
    return f"event: {EventType.MODEL_DELTA}\ndata: {data}\n\n"


async def event_stream(
    broker: Broker, run_id: str, after: str, block_ms: int = 1000, deltas: DeltaHub | None = None
) -> AsyncIterator[str]:
    """SSE text of ``run_id``'s events after stream id ``after`` (``"0-0"``: from the
    start) until its end event (or until the run is deleted), with the run's model
    deltas from ``deltas`` (None: without). Redis errors are waited out with backoff (a
    comment line is sent meanwhile); the stream then resumes after the last event sent.
    The caller checked that the run exists."""
    sub = await deltas.subscribe(run_id, confirm_s=block_ms / 1000) if deltas is not None else None
    try:
        async for text in _stream(broker, run_id, after, block_ms, sub):
            yield text
    finally:
        if sub is not None:
            sub.close()


async def _stream(
    broker: Broker, run_id: str, after: str, block_ms: int, sub: DeltaSubscription | None
) -> AsyncIterator[str]:
    last = after
    key = broker.keys.events(run_id)
    backoff = Backoff(get_logger(component="api", run_id=run_id), "sse")
    getter: asyncio.Task[dict[str, Any]] | None = None  # the next delta, while waiting
    xread: asyncio.Task[Any] | None = None

    def received() -> list[dict[str, Any]]:
        """The deltas received and not sent yet, in order."""
        nonlocal getter
        out: list[dict[str, Any]] = []
        if getter is not None and getter.done():
            out.append(getter.result())
            getter = None
        return out + (sub.drain() if sub is not None else [])

    try:
        while True:
            # catch up: the status first, then a page of events
            try:
                # the end status and the end event are written together (one script), so
                # a run seen ended here has its end event in the page read next
                status = await broker.redis.hget(broker.keys.run(run_id), "status")
                page = await broker.events(run_id, after=last, count=PAGE)
                backoff.ok()
            except LOOP_ERRORS as e:
                yield ": redis unavailable, retrying\n\n"
                await backoff.sleep_after(e)
                continue
            for d in received():
                yield format_delta(d)
            for ev in page:
                yield format_event(ev)
                last = ev.id
                if ev.type in END_TYPES:
                    return
            if len(page) == PAGE:
                continue
            if status is None or (status in RunState.__members__ and RunState(status).terminal):
                return  # deleted, or a resume after the end event: nothing more comes
            # live: new events straight from XREAD, in the order they came with the
            # deltas; when it times out, only the status is checked
            while True:
                xread = asyncio.create_task(broker.redis.xread({key: last}, block=block_ms, count=PAGE))
                while sub is not None and not xread.done():
                    if getter is None:
                        getter = asyncio.create_task(sub.queue.get())
                    await asyncio.wait({xread, getter}, return_when=asyncio.FIRST_COMPLETED)
                    for d in received():
                        yield format_delta(d)
                try:
                    res = await xread
                    backoff.ok()
                except LOOP_ERRORS as e:
                    yield ": redis unavailable, retrying\n\n"
                    await backoff.sleep_after(e)
                    break
                finally:
                    xread = None
                entries = [e for _key, es in res or [] for e in es]
                if not entries:
                    yield ": keep-alive\n\n"
                    try:  # deleted or ended meanwhile (without an end event read here)?
                        status = await broker.redis.hget(broker.keys.run(run_id), "status")
                        backoff.ok()
                    except LOOP_ERRORS as e:
                        yield ": redis unavailable, retrying\n\n"
                        await backoff.sleep_after(e)
                        break
                    if status is None or (status in RunState.__members__ and RunState(status).terminal):
                        break  # catch up: what is left, then the end
                    continue
                if sub is not None:
                    # a delta read from the other connection in the same loop turn came
                    # first (Redis sent it before this reply): let it be queued
                    await asyncio.sleep(0)
                    for d in received():
                        yield format_delta(d)
                for eid, fields in entries:
                    ev = Event.from_stream(eid, fields)
                    yield format_event(ev)
                    last = ev.id
                    if ev.type in END_TYPES:
                        return
                if len(entries) == PAGE:
                    break  # more may be waiting: catch up
    finally:
        for task in (getter, xread):
            if task is not None and not task.done():
                task.cancel()
