"""A run's event log as Server-Sent Events.

Each SSE message is one entry of the run's Redis stream: ``id:`` is the stream id,
``event:`` the event type, ``data:`` the event as JSON (``Event.to_dict``). A client
resumes with ``Last-Event-ID`` and gets exactly the events after that id. The stream
ends after the run's end event (``RUN_SUCCEEDED``, ``RUN_FAILED``, ``RUN_CANCELLED``,
``RUN_PARTIAL``). While nothing happens a comment line is sent every ``block_ms`` to keep
proxies from closing the connection. Model text deltas are not streamed (yet).
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator

from oao_common.broker import Broker
from oao_common.events import Event, EventType
from oao_common.log import get_logger
from oao_common.retry import LOOP_ERRORS, Backoff

END_TYPES = frozenset(
    {EventType.RUN_SUCCEEDED, EventType.RUN_FAILED, EventType.RUN_CANCELLED, EventType.RUN_PARTIAL}
)
STREAM_ID = re.compile(r"^\d{1,20}(-\d{1,20})?$")
PAGE = 500


def format_event(ev: Event) -> str:
    """One SSE message (ends with the blank line)."""
    data = json.dumps(ev.to_dict(), separators=(",", ":"), default=str)
    return f"id: {ev.id}\nevent: {ev.type}\ndata: {data}\n\n"


async def event_stream(broker: Broker, run_id: str, after: str, block_ms: int = 1000) -> AsyncIterator[str]:
    """SSE text of ``run_id``'s events after stream id ``after`` (``"0-0"``: from the
    start) until its end event. Redis errors while following are waited out by
    :meth:`Broker.follow_events`; the caller checked the run exists."""
    last = after
    for _ in range(2):
        # catch up page by page; if the run has ended by then (the end event and the end
        # status are written together), catch up once more and stop: a resume after the
        # end event would otherwise wait for an event that never comes
        while True:
            page = await broker.events(run_id, after=last, count=PAGE)
            for ev in page:
                yield format_event(ev)
                last = ev.id
                if ev.type in END_TYPES:
                    return
            if len(page) < PAGE:
                break
        if not await broker.run_is_terminal(run_id):
            break
    else:
        return
    async for got in _follow(broker, run_id, last, block_ms):
        if got is None:
            yield ": keep-alive\n\n"
            continue
        yield format_event(got)
        if got.type in END_TYPES:
            return


async def _follow(broker: Broker, run_id: str, after: str, block_ms: int) -> AsyncIterator[Event | None]:
    """Events after ``after``; ``None`` after each ``block_ms`` without any (and after
    each Redis error, waited out with backoff: the stream resumes after the last event)."""
    last = after
    backoff = Backoff(get_logger(component="api", run_id=run_id), "sse")
    while True:
        try:
            res = await broker.redis.xread({broker.keys.events(run_id): last}, block=block_ms, count=PAGE)
            backoff.ok()
        except LOOP_ERRORS as e:
            await backoff.sleep_after(e)
            yield None
            continue
        got = False
        for _key, entries in res or []:
            for eid, fields in entries:
                got = True
                last = eid
                yield Event.from_stream(eid, fields)
        if not got:
            yield None
