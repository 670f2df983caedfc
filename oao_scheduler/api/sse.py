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
from oao_common.states import RunState

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
    start) until its end event (or until the run is deleted). Redis errors are waited
    out with backoff (a comment line is sent meanwhile); the stream then resumes after
    the last event sent. The caller checked that the run exists."""
    last = after
    backoff = Backoff(get_logger(component="api", run_id=run_id), "sse")
    while True:
        try:
            # the end status and the end event are written together (one script), so a
            # run seen ended here has its end event in the page read next
            status = await broker.redis.hget(broker.keys.run(run_id), "status")
            page = await broker.events(run_id, after=last, count=PAGE)
            backoff.ok()
        except LOOP_ERRORS as e:
            yield ": redis unavailable, retrying\n\n"
            await backoff.sleep_after(e)
            continue
        for ev in page:
            yield format_event(ev)
            last = ev.id
            if ev.type in END_TYPES:
                return
        if len(page) == PAGE:
            continue
        if status is None or (status in RunState.__members__ and RunState(status).terminal):
            return  # deleted, or a resume after the end event: nothing more comes
        try:
            res = await broker.redis.xread({broker.keys.events(run_id): last}, block=block_ms, count=1)
            backoff.ok()
        except LOOP_ERRORS as e:
            yield ": redis unavailable, retrying\n\n"
            await backoff.sleep_after(e)
            continue
        if not res:
            yield ": keep-alive\n\n"
        # new events (res) are read by the XRANGE above, with the status first
