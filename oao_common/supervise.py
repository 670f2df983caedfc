"""Supervision of a process' long-lived loops (reaper, promoter, escalation, retention).

A half-alive process is the worst kind: it looks up to its supervisor while the loop
that mattered is gone. Every loop survives Redis errors by itself
(:class:`oao_common.retry.Backoff`); if one ends anyway, :func:`supervise` stops the
others and raises :class:`~oao_common.errors.LoopDied`, and the command exits with
status 5 so that Kubernetes (or systemd) restarts it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from .errors import LoopDied
from .log import get_logger
from .retry import describe


async def supervise(loops: dict[str, Coroutine[Any, Any, Any]], stop: asyncio.Event) -> None:
    """Run the named ``loops`` (each returns once ``stop`` is set) until ``stop`` is set.

    Raises :class:`LoopDied` naming the first loop that raised or returned early,
    after setting ``stop`` and waiting for the others to end.
    """
    tasks = {asyncio.create_task(c, name=n): n for n, c in loops.items()}
    stopper = asyncio.create_task(stop.wait())
    died: str | None = None
    try:
        pending = set(tasks)
        while pending and not stop.is_set():
            done, pending = await asyncio.wait([*pending, stopper], return_when=asyncio.FIRST_COMPLETED)
            pending.discard(stopper)
            for t in done:
                if t is stopper or died:
                    continue
                e = t.exception() if not t.cancelled() else None
                if e is None and stop.is_set():
                    continue  # it returned because the stop was requested (same wake-up)
                died = f"the {tasks[t]} loop ended: {describe(e) if e else 'returned early'}"
                get_logger(component="supervise").error("process.loop_died", loop=tasks[t], reason=died)
                stop.set()
    finally:
        stopper.cancel()
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    if died:
        raise LoopDied(died)
