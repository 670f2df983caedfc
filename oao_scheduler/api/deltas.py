"""Model text deltas for the API's event streams: one pub/sub connection per process.

Workers publish a streaming model's text on the run's channel (``Keys.deltas_channel``,
``oao_worker/deltas.py``). :class:`DeltaHub` subscribes to the channels of the runs
that SSE clients are watching, over a single connection whatever the number of clients,
and hands each message to every :class:`DeltaSubscription` of its run. The connection
exists only while someone watches; a Redis error is waited out with backoff
(``LOOP_ERRORS`` / ``Backoff``, as the event streams do) and the channels subscribed
again. Deltas are not durable: what is published while the connection is down is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from redis.asyncio.client import PubSub

from oao_common.broker import Broker
from oao_common.log import get_logger
from oao_common.retry import LOOP_ERRORS, Backoff

QUEUE_SIZE = 1000
"""Deltas held for one slow client; more are dropped (its ``dropped`` counts them)."""
READ_TIMEOUT_S = 1.0
"""How long the reader waits for a message before it checks whether anyone still watches."""

_FIELDS = (("node", str), ("attempt", int), ("seq", int), ("offset", int), ("text", str))


def parse_delta(raw: str) -> dict[str, Any] | None:
    """A published delta as ``{node, attempt, seq, offset, text}``; ``None`` if malformed."""
    try:
        d = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(d, dict):
        return None
    out: dict[str, Any] = {}
    for name, kind in _FIELDS:
        v = d.get(name)
        if not isinstance(v, kind) or isinstance(v, bool):
            return None
        out[name] = v
    return out


class DeltaSubscription:
    """The deltas of one run for one client, in arrival order (a bounded queue)."""

    def __init__(self, hub: DeltaHub, channel: str) -> None:
        self.hub = hub
        self.hub_loop = asyncio.get_running_loop()
        self.channel = channel
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE_SIZE)
        self.dropped = 0

    def put(self, delta: dict[str, Any]) -> None:
        try:
            self.queue.put_nowait(delta)
        except asyncio.QueueFull:
            self.dropped += 1

    def drain(self) -> list[dict[str, Any]]:
        """Every delta received so far (without waiting)."""
        out = []
        while not self.queue.empty():
            out.append(self.queue.get_nowait())
        return out

    def close(self) -> None:
        """Stop receiving (idempotent); the hub unsubscribes when nobody else watches."""
        self.hub.release(self)


class DeltaHub:
    """Subscribes to the delta channels of the runs being watched (see the module doc).

    Its state belongs to the event loop that used it last: an app served again from
    another loop (a test client per test) starts afresh there.
    """

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.log = get_logger(component="api")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reset()

    def _reset(self) -> None:
        self._subs: dict[str, set[DeltaSubscription]] = {}  # channel -> its subscriptions
        self._confirmed: dict[str, asyncio.Event] = {}  # channel -> SUBSCRIBE confirmed
        self._pubsub: PubSub | None = None
        self._lock = asyncio.Lock()  # one SUBSCRIBE / UNSUBSCRIBE / (re)connect at a time
        self._wanted = asyncio.Event()  # set while some channel is watched
        self._reader: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def channels(self) -> list[str]:
        """The channels watched now."""
        return list(self._subs)

    async def subscribe(self, run_id: str, confirm_s: float = 1.0) -> DeltaSubscription:
        """Watch ``run_id``'s deltas. Returns once Redis confirmed the subscription, or
        after ``confirm_s`` seconds (Redis unavailable: the reader subscribes when it is
        back). Never raises a Redis error."""
        if self._loop is not asyncio.get_running_loop():
            self._loop = asyncio.get_running_loop()
            self._reset()
        channel = self.broker.keys.deltas_channel(run_id)
        sub = DeltaSubscription(self, channel)
        first = channel not in self._subs
        self._subs.setdefault(channel, set()).add(sub)
        if first:
            self._confirmed[channel] = asyncio.Event()
        confirmed = self._confirmed[channel]
        self._wanted.set()
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read(), name="api-deltas")
        if first:
            with contextlib.suppress(*LOOP_ERRORS):
                async with self._lock:  # without a connection the reader subscribes all
                    if self._pubsub is not None and channel in self._subs:
                        await self._pubsub.subscribe(channel)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(confirmed.wait(), confirm_s)
        return sub

    def release(self, sub: DeltaSubscription) -> None:
        """Forget ``sub``; unsubscribe its channel if it was the last one watching."""
        subs = self._subs.get(sub.channel)
        if subs is None or sub not in subs or sub.hub_loop is not self._loop:
            return
        subs.discard(sub)
        if subs:
            return
        del self._subs[sub.channel]
        self._confirmed.pop(sub.channel, None)
        if not self._subs:
            self._wanted.clear()
        task = asyncio.get_running_loop().create_task(self._unsubscribe(sub.channel))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _unsubscribe(self, channel: str) -> None:
        with contextlib.suppress(*LOOP_ERRORS):
            async with self._lock:
                if self._pubsub is not None and channel not in self._subs:
                    await self._pubsub.unsubscribe(channel)

    async def _read(self) -> None:
        """While channels are watched: hold the pub/sub connection, dispatch messages,
        reconnect with backoff after a Redis error. Idle (no connection) otherwise."""
        backoff = Backoff(self.log, "api.deltas")
        while True:
            await self._wanted.wait()
            pubsub = self.broker.redis.pubsub()
            try:
                async with self._lock:
                    self._pubsub = pubsub
                    if self._subs:
                        await pubsub.subscribe(*self._subs)
                backoff.ok()
                while self._subs:
                    msg = await pubsub.get_message(timeout=READ_TIMEOUT_S)
                    if msg is not None:
                        self._dispatch(msg)
            except LOOP_ERRORS as e:
                self._pubsub = None
                await backoff.sleep_after(e)
            finally:
                self._pubsub = None
                for ev in self._confirmed.values():
                    ev.clear()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    def _dispatch(self, msg: dict[str, Any]) -> None:
        kind, channel = msg.get("type"), str(msg.get("channel"))
        if kind == "subscribe":
            if (ev := self._confirmed.get(channel)) is not None:
                ev.set()
        elif kind == "message" and (subs := self._subs.get(channel)):
            delta = parse_delta(str(msg.get("data")))
            if delta is not None:
                for sub in subs:
                    sub.put(delta)
