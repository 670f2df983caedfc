"""Fleet-wide rate limits: token buckets and concurrency leases shared through Redis.

Every worker process calls :meth:`RateLimiter.acquire_wait` before a model call (per
model and/or provider limiter, e.g. ``"model:gpt-4o"``, ``"provider:openai"``) or a tool
call (``"tool:search"``), and :meth:`RateLimiter.settle` (or :meth:`RateLimiter.release`
when the call failed) afterwards. The state lives in Redis and changes only inside
``oao_common/lua/ratelimit.lua``, one atomic script, so every worker sees the same
limits and no two workers can both take the last unit of one.

Algorithm: a token bucket per tier with continuous refill (the committed-rate bucket
of RFC 2697's single-rate meter, refilled continuously rather than per tick; see
https://en.wikipedia.org/wiki/Token_bucket). A tier with limit ``L`` per window ``W``
is a bucket of capacity ``L`` that refills at ``L / W`` units per second and starts
full, so it admits bursts up to ``L`` and ``L`` per ``W`` sustained. Levels are
fractional and refilled lazily on access from the last refill time. Concurrency is a
set of leases (lease id -> expiry) with a time to live, so a crashed worker's slot
frees itself. All times are the Redis server's clock (``TIME`` in Lua), never a
worker's: workers' clocks drift, the server's is the one all of them share.

Token tiers are charged by reservation: a call takes its worst case (input tokens +
max output tokens) up front, then :meth:`RateLimiter.settle` gives back the part it
did not use. Charging only after the call would let N workers start N calls against
the last tokens of a minute; the provider would then answer 429 to most of them.
"""

from __future__ import annotations

import asyncio
import email.utils
import inspect
import math
import random
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from redis.asyncio import Redis

from .errors import PermanentError, TransientError
from .keys import Keys
from .limits import PositiveCount
from .scripts import Scripts

#: Tier name of :class:`RateLimitSpec` -> (unit, window in seconds).
TIER_WINDOWS: dict[str, tuple[Literal["requests", "tokens"], float]] = {
    "rpm": ("requests", 60.0),
    "rph": ("requests", 3600.0),
    "rpd": ("requests", 86400.0),
    "tpm": ("tokens", 60.0),
    "tpd": ("tokens", 86400.0),
}

OnWait = Callable[[float], Awaitable[None] | None]


class RateLimitSpec(BaseModel):
    """The tiers of one limiter, each optional: requests per minute / hour / day, tokens
    per minute / day, and a cap on concurrent calls (in flight at once, fleet-wide).

    Every worker must use the same spec for the same limiter name (a bucket whose limit
    differs between workers is clamped to the capacity of whoever touches it).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    rpm: PositiveCount | None = None
    rph: PositiveCount | None = None
    rpd: PositiveCount | None = None
    tpm: PositiveCount | None = None
    tpd: PositiveCount | None = None
    max_concurrent: PositiveCount | None = None

    def tiers(self) -> Tiers:
        """The buckets of this spec with their windows (:data:`TIER_WINDOWS`)."""
        buckets = []
        for name, (unit, window_s) in TIER_WINDOWS.items():
            limit = getattr(self, name)
            if limit is not None:
                buckets.append(Bucket(name, unit, limit, window_s))
        return Tiers(tuple(buckets), self.max_concurrent)


@dataclass(frozen=True, slots=True)
class Bucket:
    """One token bucket: capacity ``limit`` (requests or tokens), refilled continuously
    at ``limit / window_s`` per second. ``name`` is its field in the limiter's hash."""

    name: str
    unit: Literal["requests", "tokens"]
    limit: float
    window_s: float

    def __post_init__(self) -> None:
        if self.limit <= 0 or self.window_s <= 0:
            raise ValueError(f"bucket {self.name!r}: limit and window_s must be > 0")
        if ":" in self.name:
            raise ValueError(f"bucket {self.name!r}: name must not contain ':'")


@dataclass(frozen=True, slots=True)
class Tiers:
    """Buckets plus an optional concurrency cap: the low-level form of a
    :class:`RateLimitSpec`, which also allows windows other than minute / hour / day."""

    buckets: tuple[Bucket, ...] = ()
    max_concurrent: int | None = None

    def __post_init__(self) -> None:
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ValueError("max_concurrent must be >= 1")


@dataclass(slots=True)
class Reservation:
    """An admitted call: what it took from limiter ``name``.

    ``tokens`` were reserved from every token bucket, ``requests`` from every request
    bucket; ``lease_id`` names its concurrency slot when ``holds_slot``. Hand it to
    :meth:`RateLimiter.settle` or :meth:`RateLimiter.release` exactly once (a second
    call is a no-op).
    """

    name: str
    lease_id: str
    requests: int
    tokens: int
    tiers: Tiers
    holds_slot: bool
    done: bool = field(default=False, compare=False)


@dataclass(frozen=True, slots=True)
class Throttled:
    """Not admitted, nothing taken: the limiter could admit the call in ``wait_s``
    seconds (the longest wait over the blocking tiers; for a full concurrency cap, a
    short poll interval since holders release at unknown times). ``blocked_by`` names
    the blocking bucket(s), ``"concurrency"`` and/or ``"penalty"``."""

    wait_s: float
    blocked_by: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class LimiterState:
    """A read of one limiter: bucket name -> current level (refilled to now; negative
    after an under-reserved settle), live concurrency leases, penalty left (seconds)."""

    levels: dict[str, float]
    in_flight: int
    penalty_s: float


class RateLimitTimeout(TransientError):
    """:meth:`RateLimiter.acquire_wait` would wait longer than ``max_wait_s``.

    Retriable; ``retry_after_s`` is the limiter's last estimate of when it could admit
    the call, ``blocked_by`` the tiers that blocked it.
    """

    def __init__(self, name: str, waited_s: float, retry_after_s: float, blocked_by: tuple[str, ...]) -> None:
        self.name = name
        self.waited_s = waited_s
        self.blocked_by = blocked_by
        super().__init__(
            f"rate limit {name!r}: not admitted after waiting {waited_s:.2f} s; next admission "
            f"in {retry_after_s:.2f} s (blocked by {', '.join(blocked_by)})",
            retry_after_s=retry_after_s,
        )


class RateLimitTooLarge(PermanentError):
    """One call costs more than a bucket's capacity (e.g. a reservation of 50 000 tokens
    under ``tpm: 30000``): it can never be admitted, so it is not retried."""

    def __init__(self, name: str, bucket: str, cost: int, limit: float) -> None:
        self.name = name
        self.bucket = bucket
        self.cost = cost
        self.limit = limit
        super().__init__(f"rate limit {name!r}: a call costing {cost} exceeds {bucket} = {limit:g}")


def _ms(seconds: float) -> int:
    return max(0, math.ceil(seconds * 1000))


class RateLimiter:
    """Fleet-wide rate limiters of one Redis connection (``decode_responses=True``).

    ``lease_ttl_s``: default life of a concurrency slot (seconds); a holder that crashes
    frees its slot after it; a call that may run longer should :meth:`extend` it.
    ``concurrency_poll_s``: longest wait reported while a concurrency cap is full.
    ``jitter``: :meth:`acquire_wait` sleeps ``wait_s * (1 + U(0, jitter))`` so waiters
    released at the same instant do not all retry at once.
    """

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        *,
        lease_ttl_s: float = 300.0,
        concurrency_poll_s: float = 0.05,
        jitter: float = 0.1,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.scripts = Scripts(redis, keys)
        self.lease_ttl_s = lease_ttl_s
        self.concurrency_poll_s = concurrency_poll_s
        self.jitter = jitter

    async def _call(
        self,
        name: str,
        op: str,
        tiers: Tiers | None,
        *,
        lease: str = "",
        requests: int = 0,
        tokens: int = 0,
        ms: int = 0,
        max_conc: int = 0,
    ) -> Any:
        argv: list[Any] = [op, lease, requests, tokens, ms, max_conc, _ms(self.concurrency_poll_s)]
        for b in tiers.buckets if tiers else ():
            argv += [b.name, "r" if b.unit == "requests" else "t", repr(float(b.limit)), _ms(b.window_s)]
        return await self.scripts.call(
            "ratelimit", [self.keys.ratelimit(name), self.keys.ratelimit_slots(name)], argv
        )

    async def acquire(
        self,
        name: str,
        tiers: RateLimitSpec | Tiers,
        *,
        requests: int = 1,
        tokens: int = 0,
        lease_ttl_s: float | None = None,
    ) -> Reservation | Throttled:
        """Take ``requests`` from every request bucket, ``tokens`` (input + max output)
        from every token bucket and one concurrency slot (if capped) of limiter ``name``:
        all of them, or nothing. Returns the :class:`Reservation`, or :class:`Throttled`
        with the wait (seconds) after which it could be admitted.

        Raises :class:`RateLimitTooLarge` if the cost exceeds a bucket's capacity.
        """
        t = tiers.tiers() if isinstance(tiers, RateLimitSpec) else tiers
        lease = secrets.token_hex(8) if t.max_concurrent else ""
        ttl = self.lease_ttl_s if lease_ttl_s is None else lease_ttl_s
        r = await self._call(
            name,
            "acquire",
            t,
            lease=lease,
            requests=requests,
            tokens=tokens,
            ms=_ms(ttl),
            max_conc=t.max_concurrent or 0,
        )
        if r[0] == 1:
            return Reservation(name, lease, requests, tokens, t, bool(lease))
        if r[0] == -1:
            bucket = next(b for b in t.buckets if b.name == r[1])
            cost = requests if bucket.unit == "requests" else tokens
            raise RateLimitTooLarge(name, bucket.name, cost, bucket.limit)
        return Throttled(int(r[1]) / 1000, tuple(r[2]))

    async def acquire_wait(
        self,
        name: str,
        tiers: RateLimitSpec | Tiers,
        tokens: int = 0,
        max_wait_s: float = 60.0,
        *,
        requests: int = 1,
        on_wait: OnWait | None = None,
        lease_ttl_s: float | None = None,
    ) -> Reservation:
        """:meth:`acquire`, waiting while throttled: each time it must wait it calls
        ``on_wait(wait_s)`` (sync or async; for an event or metric), sleeps about
        ``wait_s`` and tries again.

        Raises :class:`RateLimitTimeout` as soon as the next wait would end after
        ``max_wait_s`` seconds from the start (measured on this process's monotonic
        clock: it is the caller's patience, not limiter state), and
        :class:`RateLimitTooLarge` as :meth:`acquire` does.
        """
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + max_wait_s
        while True:
            r = await self.acquire(name, tiers, requests=requests, tokens=tokens, lease_ttl_s=lease_ttl_s)
            if isinstance(r, Reservation):
                return r
            remaining = deadline - loop.time()
            if r.wait_s > remaining:
                raise RateLimitTimeout(name, loop.time() - start, r.wait_s, r.blocked_by)
            if on_wait is not None:
                res = on_wait(r.wait_s)
                if inspect.isawaitable(res):
                    await res
            pause = r.wait_s * (1 + random.uniform(0, self.jitter))
            await asyncio.sleep(max(0.001, min(pause, deadline - loop.time())))

    async def settle(self, reservation: Reservation, actual_tokens: int) -> None:
        """The call is over and used ``actual_tokens`` (input + output): give back
        ``reserved - actual`` tokens to every token bucket (never above capacity; a
        call that used more than it reserved is charged the difference) and free the
        concurrency slot. No-op if the reservation was already settled or released."""
        await self._finish(reservation, reservation.tokens - actual_tokens)

    async def release(self, reservation: Reservation, *, call_made: bool = True) -> None:
        """The call failed before using tokens: give back all reserved tokens and free
        the slot. The request stays counted (it reached the provider, or may have)
        unless ``call_made=False``: the call was never attempted (e.g. a circuit breaker
        refused it after admission), so its requests are given back too."""
        await self._finish(reservation, reservation.tokens, 0 if call_made else reservation.requests)

    async def _finish(self, reservation: Reservation, refund: int, requests_back: int = 0) -> None:
        if reservation.done:
            return
        # Marked first: if the script's reply is lost and the caller retries, tokens are
        # not refunded twice (the slot frees itself when its lease ends).
        reservation.done = True
        t = reservation.tiers
        await self._call(
            reservation.name, "settle", t, lease=reservation.lease_id, requests=requests_back, tokens=refund
        )

    async def extend(self, reservation: Reservation, lease_ttl_s: float | None = None) -> bool:
        """Renew the reservation's concurrency slot: its lease now ends ``lease_ttl_s``
        seconds from now (server time), for a long or streaming call. Returns ``False``
        if the lease had already expired (the slot may be someone else's now) or the
        reservation holds no slot."""
        if not reservation.holds_slot or reservation.done:
            return False
        ttl = self.lease_ttl_s if lease_ttl_s is None else lease_ttl_s
        r = await self._call(reservation.name, "extend", None, lease=reservation.lease_id, ms=_ms(ttl))
        return bool(r[0])

    async def penalize(self, name: str, retry_after_s: float) -> None:
        """Provider feedback (a 429's ``Retry-After``, see :func:`retry_after_from_headers`):
        admit nothing on limiter ``name`` until server time + ``retry_after_s`` seconds.
        A longer penalty already in place is kept."""
        if retry_after_s > 0:
            await self._call(name, "penalize", None, ms=_ms(retry_after_s))

    async def state(self, name: str, tiers: RateLimitSpec | Tiers) -> LimiterState:
        """Read limiter ``name`` without changing it (levels as of now, server time)."""
        t = tiers.tiers() if isinstance(tiers, RateLimitSpec) else tiers
        levels, live, penalty_ms = await self._call(name, "peek", t)
        return LimiterState(
            {b.name: float(v) for b, v in zip(t.buckets, levels, strict=True)},
            int(live),
            int(penalty_ms) / 1000,
        )


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


PROXIED_HEADER_PREFIXES = ("llm_provider-",)
"""Prefixes under which proxies pass on the upstream provider's response headers."""


def _duration_s(v: str) -> float | None:
    """``"6m0s"``, ``"1.5s"``, ``"20ms"``, ``"12"`` -> seconds."""
    v = v.strip()
    try:
        return float(v)
    except ValueError:
        pass
    parts = _DURATION.findall(v)
    if not parts or "".join(n + u for n, u in parts) != v:
        return None
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


def retry_after_from_headers(headers: Mapping[str, str]) -> float | None:
    """The wait (seconds) a 429 / 503 response asks for, from its headers, or ``None``.

    In order of preference: ``retry-after-ms``; ``retry-after`` (seconds, or an HTTP
    date taken relative to the response's ``date`` header, else to this clock);
    the longest ``x-ratelimit-reset-*`` duration (OpenAI style ``"6m0s"``, ``"20ms"``)
    among the tiers whose ``x-ratelimit-remaining-*`` is 0, or among all of them if
    none says 0. Header names are matched case-insensitively. A proxy's copy of the
    upstream provider's headers (LiteLLM's ``llm_provider-retry-after``, any
    :data:`PROXIED_HEADER_PREFIXES`) counts when the unprefixed header is absent.
    """
    h = {k.lower(): v for k, v in headers.items()}
    for k, v in list(h.items()):
        for prefix in PROXIED_HEADER_PREFIXES:
            if k.startswith(prefix):
                h.setdefault(k[len(prefix) :], v)
    if "retry-after-ms" in h:
        try:
            return max(0.0, float(h["retry-after-ms"]) / 1000)
        except ValueError:
            pass
    if "retry-after" in h:
        secs = _duration_s(h["retry-after"])
        if secs is not None:
            return max(0.0, secs)
        try:
            when = email.utils.parsedate_to_datetime(h["retry-after"]).timestamp()
            ref = email.utils.parsedate_to_datetime(h["date"]).timestamp() if "date" in h else time.time()
            return max(0.0, when - ref)
        except (TypeError, ValueError, IndexError):
            pass
    prefix = "x-ratelimit-reset-"
    resets = {
        k[len(prefix) :]: d
        for k, v in h.items()
        if k.startswith(prefix) and (d := _duration_s(v)) is not None
    }
    exhausted = [v for k, v in resets.items() if h.get(f"x-ratelimit-remaining-{k}", "").strip() == "0"]
    candidates = exhausted or list(resets.values())
    return max(candidates) if candidates else None
