"""Live model text deltas, published on the run's pub/sub channel while a model streams.

While a provider streams a reply, ``ctx.llm`` hands each piece of text to a
:class:`DeltaStream`, which publishes it on ``Keys.deltas_channel(run_id)`` as one line
of JSON ``{"node", "attempt", "seq", "offset", "text"}``: ``seq`` is the step's sequence
number, ``offset`` the characters of this call's reply before ``text`` (a call that starts
over, an in-step retry, starts again at 0). The HTTP API relays them to its event-stream
subscribers as ``MODEL_DELTA`` messages. Deltas are best-effort and never stored: not in
the event log, not in the ledger; a replayed step publishes nothing.

What it costs, and how that is kept down (figures in docs/benchmarks.md):

* **Nobody listening.** :class:`DeltaPublisher` knows per run whether the channel has
  subscribers from a ``PUBSUB NUMSUB`` at most once per ``refresh_s`` (1 s), sent in the
  background, one command for every run due. With none, a chunk costs a dict lookup and
  nothing is sent. Until the first answer about a run, its calls hold their text back
  (then send or drop it), so a subscriber that came first misses nothing.
* **Someone listening.** Text is coalesced per call: the first piece goes at once, then
  at most one message per ``interval_s`` (50 ms), sooner when ``max_chars`` are waiting,
  and the rest when the call ends. One message in flight at a time per call, so they
  keep their order. One background task per worker sends them: whatever all calls
  queued meanwhile goes in one pipeline of ``PUBLISH`` commands. The step does not wait
  for it, except that a call that succeeded waits up to ``end_wait_s`` for its last
  message, so that subscribers get a reply's text before the step's record (and the
  node's end) reach the event log.
* **Failures.** A Redis error on publish (or on the ``NUMSUB``) is logged at debug level
  and the text dropped; it never fails or holds up the step.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from redis.asyncio import Redis

from oao_common.keys import Keys
from oao_common.log import get_logger
from oao_common.retry import describe

INTERVAL_S = 0.05
"""Shortest time between two messages of one call (seconds)."""
MAX_CHARS = 4096
"""Buffered characters that are sent without waiting for ``INTERVAL_S``."""
REFRESH_S = 1.0
"""How long a run's subscriber count is trusted before it is asked again (seconds)."""
END_WAIT_S = 0.5
"""Longest time the end of a successful call waits for its last message (seconds)."""
MAX_RUNS = 10_000
"""Runs whose subscriber count is cached before entries unused for a minute are dropped."""

_log = get_logger(component="deltas")


class DeltaPublisher:
    """A worker's publisher of model text deltas (one per worker, shared by its nodes).

    ``check_subscribers=False`` publishes whether or not anyone listens (for
    measurements). ``published`` and ``errors`` count messages sent and failed.
    """

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        *,
        check_subscribers: bool = True,
        interval_s: float = INTERVAL_S,
        max_chars: int = MAX_CHARS,
        refresh_s: float = REFRESH_S,
        end_wait_s: float = END_WAIT_S,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.check_subscribers = check_subscribers
        self.interval_s = interval_s
        self.max_chars = max_chars
        self.refresh_s = refresh_s
        self.end_wait_s = end_wait_s
        self.published = 0
        self.errors = 0
        self._listening: dict[str, tuple[float, bool]] = {}  # run -> (checked at, any subscriber)
        self._due: set[str] = set()
        self._waiting: dict[str, set[DeltaStream]] = {}  # run not asked yet -> streams holding text
        self._outbox: list[tuple[str, str, DeltaStream]] = []  # (channel, message, its stream)
        self._sender: asyncio.Task[None] | None = None
        self._refresh: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def stream(self, run_id: str, node_id: str, attempt: int, seq: int) -> DeltaStream:
        """The deltas of one try of one model call (step ``seq`` of a node's attempt)."""
        return DeltaStream(self, run_id, node_id, attempt, seq)

    def listening(self, run_id: str) -> bool | None:
        """Whether ``run_id``'s channel had subscribers when last asked (at most
        ``refresh_s`` ago; an older answer is used while a new one is fetched), or
        ``None`` before the first answer."""
        if not self.check_subscribers:
            return True
        entry = self._listening.get(run_id)
        if entry is None or time.monotonic() - entry[0] >= self.refresh_s:
            self._due.add(run_id)
            if self._refresh is None:
                self._refresh = self.spawn(self._refresh_due())
            if entry is None:
                return None
        return entry[1]

    def on_answer(self, run_id: str, stream: DeltaStream) -> None:
        """Call ``stream``'s pump when the first answer about ``run_id`` comes."""
        self._waiting.setdefault(run_id, set()).add(stream)

    def spawn(self, coro: Any) -> asyncio.Task[None]:
        """A background task, referenced until it ends."""
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _refresh_due(self) -> None:
        """Ask the subscriber counts of the runs due, one ``PUBSUB NUMSUB`` per batch."""
        try:
            while self._due:
                runs = list(self._due)
                self._due.clear()
                try:
                    counts = await self.redis.pubsub_numsub(*(self.keys.deltas_channel(r) for r in runs))
                    answers = [int(n) > 0 for _, n in counts]
                except Exception as e:  # nothing is published for a while; asked again later
                    _log.debug("deltas.numsub_failed", error=describe(e))
                    answers = [False] * len(runs)
                now = time.monotonic()
                for rid, yes in zip(runs, answers, strict=False):
                    self._listening[rid] = (now, yes)
                    for stream in self._waiting.pop(rid, ()):
                        stream.pump()
                if len(self._listening) > MAX_RUNS:
                    cutoff = now - 60.0
                    self._listening = {k: v for k, v in self._listening.items() if v[0] >= cutoff}
        finally:
            self._refresh = None

    async def aclose(self) -> None:
        """Cancel the messages still being sent (at worker shutdown)."""
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def send(self, channel: str, message: str, stream: DeltaStream) -> None:
        """Queue a message; ``stream.sent()`` is called once it went out (or failed)."""
        self._outbox.append((channel, message, stream))
        if self._sender is None:
            self._sender = self.spawn(self._send_all())

    async def _send_all(self) -> None:
        """Send what is queued, one pipeline per batch; a failure is logged at debug
        level and the batch dropped."""
        try:
            while self._outbox:
                batch, self._outbox = self._outbox, []
                try:
                    if len(batch) == 1:
                        await self.redis.publish(batch[0][0], batch[0][1])
                    else:
                        async with self.redis.pipeline(transaction=False) as pipe:
                            for channel, message, _ in batch:
                                pipe.publish(channel, message)
                            await pipe.execute()
                    self.published += len(batch)
                except Exception as e:
                    self.errors += len(batch)
                    _log.debug("deltas.publish_failed", messages=len(batch), error=describe(e))
                for _, _, stream in batch:
                    stream.sent()
        finally:
            self._sender = None


class DeltaStream:
    """Coalesces and publishes the text of one model call (see the module doc).

    :meth:`add` each streamed piece; at the end :meth:`close` (sends the rest in the
    background), then, if the call succeeded, ``await`` :meth:`flushed`. Text waits in
    the buffer while a message is in flight, until ``interval_s`` has passed, or until
    the publisher knows whether anyone listens.
    """

    __slots__ = (
        "_buf",
        "_channel",
        "_closed",
        "_head",
        "_idle",
        "_in_flight",
        "_last",
        "_offset",
        "_pub",
        "_run_id",
        "_size",
        "_timer",
    )

    def __init__(self, pub: DeltaPublisher, run_id: str, node_id: str, attempt: int, seq: int) -> None:
        self._pub = pub
        self._run_id = run_id
        self._channel = pub.keys.deltas_channel(run_id)
        self._head: dict[str, Any] = {"node": node_id, "attempt": attempt, "seq": seq}
        self._buf: list[str] = []
        self._size = 0  # characters in _buf
        self._offset = 0  # characters of the reply before _buf
        self._last = float("-inf")  # loop time of the last message sent
        self._in_flight = False  # a message of this call is queued or being sent
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._idle: asyncio.Future[None] | None = None  # set when nothing is left to send

    def add(self, text: str) -> None:
        """One streamed piece of the reply (never blocks)."""
        if not text or self._closed:
            return
        if not self._buf and self._pub.listening(self._run_id) is False:
            self._offset += len(text)  # nobody listens: dropped, costs nothing
            return
        self._buf.append(text)
        self._size += len(text)
        self.pump()

    def close(self) -> None:
        """The call ended: what is buffered goes now (after a message in flight)."""
        self._closed = True
        self.pump()

    async def flushed(self) -> None:
        """Wait until every message of the call was sent (or failed, or dropped), at
        most ``end_wait_s`` seconds. Call after :meth:`close`."""
        if not self._in_flight and not self._buf:
            return
        self._idle = asyncio.get_running_loop().create_future()
        await asyncio.wait({self._idle}, timeout=self._pub.end_wait_s)

    def pump(self) -> None:
        """Send what is buffered if it is time, else arrange to be called again."""
        if self._in_flight:
            return
        if not self._buf:
            if self._idle is not None and not self._idle.done():
                self._idle.set_result(None)
            return
        state = self._pub.listening(self._run_id)
        if state is None:  # not known yet: hold the text until the answer
            self._pub.on_answer(self._run_id, self)
            return
        if state is False:  # nobody listens (any more): drop what is held
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._offset += self._size
            self._buf.clear()
            self._size = 0
            self.pump()
            return
        loop = asyncio.get_running_loop()
        wait = self._last + self._pub.interval_s - loop.time()
        if self._closed or wait <= 0 or self._size >= self._pub.max_chars:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            text = "".join(self._buf)
            self._buf.clear()
            self._size = 0
            message = json.dumps({**self._head, "offset": self._offset, "text": text}, separators=(",", ":"))
            self._offset += len(text)
            self._last = loop.time()
            self._in_flight = True
            self._pub.send(self._channel, message, self)
        elif self._timer is None:
            self._timer = loop.call_later(wait, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.pump()

    def sent(self) -> None:
        """The message in flight went out (or failed): on to the next."""
        self._in_flight = False
        self.pump()
