"""Redis error classification, retry and backoff: the one module that owns them.

Redis fails in two ways. The connection breaks (refused, reset, timed out: redis-py's
``ConnectionError`` / ``TimeoutError``, or ``OSError``), or the server answers with an
error reply that says "not now": ``OOM`` (``maxmemory`` reached under ``noeviction``),
``READONLY`` (a demoted primary after a failover), ``MASTERDOWN`` (a replica that lost
its primary), ``LOADING`` (a restarted server reading its data), ``BUSY`` (a long
script), ``NOREPLICAS`` (``min-replicas-to-write`` unmet), ``MISCONF`` (a failing
``BGSAVE`` with ``stop-writes-on-bgsave-error``), ``TRYAGAIN`` / ``CLUSTERDOWN``.
Both kinds are :func:`transient`: the same call may succeed later. Everything else
(``WRONGTYPE``, a script bug, ``NOPERM``, wrong credentials) is a fault that waiting
does not fix.

Two policies use the classification:

* **Idempotent calls** (the fenced Lua writes, see ``docs/architecture.md``) are
  retried through transient errors by :func:`retry_transient` for a bounded time.
* **Long-lived loops** (claim, heartbeat, reaper, promoter, escalation, retention,
  progress) survive *any* Redis error: they log it, sleep a :class:`Backoff` delay and
  go on. A loop that dies anyway ends its process with a non-zero status
  (:func:`oao_common.supervise`), so a supervisor restarts it.

Backoff is capped exponential with "equal jitter" (half the delay fixed, half drawn
uniformly), after M. Brooker, "Exponential Backoff And Jitter", AWS Architecture Blog,
2015: retries of many clients spread out, but none fires immediately.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis import exceptions as redis_exc

from . import metrics

T = TypeVar("T")

#: First word of the error replies that mean "the server cannot do this now".
TRANSIENT_REPLY_CODES = frozenset(
    {"OOM", "READONLY", "MASTERDOWN", "LOADING", "BUSY", "NOREPLICAS", "MISCONF", "TRYAGAIN", "CLUSTERDOWN"}
)

#: The longest delay :func:`exponential_delay_s` returns without a cap (30 days, seconds).
MAX_DELAY_S = 30 * 24 * 3600.0

#: What a long-lived loop catches: every Redis failure, and socket errors below redis-py.
LOOP_ERRORS: tuple[type[BaseException], ...] = (redis_exc.RedisError, OSError)

# redis-py maps some reply codes to classes and strips the code from the message.
_TRANSIENT_CLASSES: tuple[type[BaseException], ...] = (
    redis_exc.ReadOnlyError,
    redis_exc.OutOfMemoryError,
    redis_exc.MasterDownError,
    redis_exc.TryAgainError,
    redis_exc.ClusterDownError,
    redis_exc.BusyLoadingError,
)


def reply_code(e: BaseException) -> str:
    """The error code of a Redis error reply (``"OOM"``, ``"READONLY"``...), else ``""``."""
    for cls in _TRANSIENT_CLASSES:
        if isinstance(e, cls):
            return {
                redis_exc.ReadOnlyError: "READONLY",
                redis_exc.OutOfMemoryError: "OOM",
                redis_exc.MasterDownError: "MASTERDOWN",
                redis_exc.TryAgainError: "TRYAGAIN",
                redis_exc.ClusterDownError: "CLUSTERDOWN",
                redis_exc.BusyLoadingError: "LOADING",
            }[cls]
    if isinstance(e, redis_exc.ResponseError):
        word = str(e).split(" ", 1)[0]
        return word if word.isupper() else ""
    return ""


def transient(e: BaseException) -> bool:
    """True if retrying the same Redis call later may succeed (see the module doc).

    Credentials and permission errors are not transient: they need an operator.
    """
    if isinstance(e, redis_exc.AuthenticationError | redis_exc.NoPermissionError):
        return False
    if isinstance(e, _TRANSIENT_CLASSES):
        return True
    if isinstance(e, redis_exc.ConnectionError | redis_exc.TimeoutError | OSError):
        return True  # builtin ConnectionError and TimeoutError are OSErrors
    return isinstance(e, redis_exc.ResponseError) and reply_code(e) in TRANSIENT_REPLY_CODES


def describe(e: BaseException) -> str:
    """One line for logs: ``"OOM: command not allowed..."`` or ``"ConnectionError: ..."``."""
    code = reply_code(e)
    text = str(e).splitlines()[0] if str(e) else ""
    if code and not text.startswith(code):
        return f"{code}: {text}"
    return text if code else f"{type(e).__name__}: {text}"


def exponential_delay_s(
    n: int,
    base_s: float,
    cap_s: float | None,
    factor: float = 2.0,
    jitter: bool = True,
    rng: random.Random | None = None,
) -> float:
    """Delay in seconds before retry ``n`` (1-based): ``base_s * factor ** (n - 1)``,
    capped at ``cap_s``, with equal jitter (``d/2 + U(0, d/2)``) when ``jitter``.

    Overflow-safe: a huge ``n`` or ``factor`` gives the cap, never ``inf``.
    """
    if not base_s > 0:
        return 0.0
    try:
        d = float(base_s) * float(factor) ** max(0, n - 1)
    except OverflowError:
        d = float("inf")
    d = min(d, MAX_DELAY_S if cap_s is None else float(cap_s))
    if d != d or d == float("inf"):  # nan, or an infinite cap
        d = MAX_DELAY_S
    if jitter and d > 0:
        return d / 2 + (rng or random).uniform(0, d / 2)
    return d


class Backoff:
    """Failure counter of one long-lived loop: :meth:`failed` logs and returns how long
    to sleep (capped exponential, equal jitter); :meth:`ok` logs the recovery.

    The first failure of an episode is logged as a warning, then every 10th, so an
    hour-long outage writes a few hundred lines, not thousands.
    """

    def __init__(self, log: Any, what: str, base_s: float = 0.1, cap_s: float = 10.0) -> None:
        self.log = log
        self.what = what
        self.base_s = base_s
        self.cap_s = cap_s
        self.failures = 0
        self.since = 0.0

    def failed(self, e: BaseException) -> float:
        """Count a failure; returns the delay (seconds) before the next try."""
        if not self.failures:
            self.since = time.monotonic()
        self.failures += 1
        delay = exponential_delay_s(self.failures, self.base_s, self.cap_s)
        metrics.REDIS_ERRORS.labels(self.what, reply_code(e) or type(e).__name__).inc()
        if self.failures == 1 or self.failures % 10 == 0:
            self.log.warning(
                f"{self.what}.redis_error",
                error=describe(e),
                transient=transient(e),
                failures=self.failures,
                retry_in_s=round(delay, 3),
            )
        return delay

    async def sleep_after(self, e: BaseException) -> None:
        """:meth:`failed`, then sleep the delay."""
        await asyncio.sleep(self.failed(e))

    def ok(self) -> None:
        """The loop's Redis call succeeded: log the recovery of a failure episode."""
        if self.failures:
            self.log.info(
                f"{self.what}.redis_recovered",
                failures=self.failures,
                after_s=round(time.monotonic() - self.since, 3),
            )
            self.failures = 0


async def retry_transient(
    call: Callable[[], Awaitable[T]],
    *,
    log: Any,
    what: str,
    for_s: float = 30.0,
    base_s: float = 0.05,
    cap_s: float = 2.0,
) -> T:
    """Run ``call`` and retry it through :func:`transient` errors for up to ``for_s``
    seconds with capped exponential backoff and jitter. Only for idempotent calls.

    Raises the last error when the time is up, and any non-transient error at once.
    Retries are logged (first, recovery, give-up) with ``what`` naming the call.
    """
    deadline = time.monotonic() + for_s
    n = 0
    while True:
        try:
            result = await call()
        except Exception as e:
            if not transient(e):
                raise
            n += 1
            if time.monotonic() >= deadline:
                log.error("redis.write_gave_up", call=what, retries=n, error=describe(e))
                raise
            if n == 1:
                log.warning("redis.write_retrying", call=what, error=describe(e), retry_for_s=for_s)
            await asyncio.sleep(exponential_delay_s(n, base_s, cap_s))
            continue
        if n:
            log.info("redis.write_recovered", call=what, retries=n)
        return result
