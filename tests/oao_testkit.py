"""Helpers shared by integration and chaos tests."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import yaml

from oao_common.broker import Broker
from oao_common.events import Event
from oao_common.spec import Spec, parse_spec
from oao_scheduler.fleet import LocalFleet
from oao_worker.worker import Worker

TOOLS = {
    "side_effect": {"entrypoint": "oao_test_agents:side_effect"},
}


def make_spec(nodes: list[dict[str, Any]], **extra: Any) -> Spec:
    """A spec from node dicts; agents / models / tools / defaults may be overridden."""
    doc: dict[str, Any] = {
        "name": extra.pop("name", "test"),
        "models": extra.pop("models", {"m": {"provider": "scripted", "replies": ["hello"]}}),
        "agents": extra.pop(
            "agents",
            {
                "noop": {"kind": "python", "entrypoint": "oao_test_agents:noop"},
                "sleeper": {"kind": "python", "entrypoint": "oao_test_agents:sleeper"},
                "flaky": {"kind": "python", "entrypoint": "oao_test_agents:flaky"},
                "broken": {"kind": "python", "entrypoint": "oao_test_agents:broken"},
                "chatty": {"kind": "python", "entrypoint": "oao_test_agents:chatty"},
                "steps": {
                    "kind": "python",
                    "entrypoint": "oao_test_agents:two_tools_then_wait",
                    "tools": ["side_effect"],
                },
            },
        ),
        "tools": extra.pop("tools", TOOLS),
        "nodes": nodes,
    }
    doc.update(extra)  # e.g. defaults, policy, failure
    return parse_spec(yaml.safe_dump(doc), "test")


def local_fleet(
    broker: Broker, workers: int = 1, concurrency: int = 4, reaper: bool = True, **kw: Any
) -> LocalFleet:
    """The library's :class:`LocalFleet` on ``broker`` with quick test timings; ``kw`` go
    to each worker."""
    kw.setdefault("heartbeat_ttl_s", 2.0)
    kw.setdefault("claim_timeout_s", 0.2)
    kw.setdefault("grace_period_s", 1.0)
    return LocalFleet(
        broker=broker, workers=workers, concurrency=concurrency, reaper=reaper, reaper_interval_s=0.1, **kw
    )


@contextlib.asynccontextmanager
async def fleet(broker: Broker, **kw: Any) -> AsyncIterator[list[Worker]]:
    """In-process workers (and a reaper) until the block exits (:func:`local_fleet`)."""
    async with local_fleet(broker, **kw) as f:
        yield f.workers


async def run_spec(broker: Broker, spec: Spec, timeout_s: float = 30, **fleet_kw: Any) -> str:
    """Submit ``spec``, run it on an in-process fleet until it ends; returns the run id."""
    async with local_fleet(broker, **fleet_kw) as f:
        run_id, _status = await f.run(spec, timeout_s=timeout_s)
    return run_id


def of_type(events: list[Event], *types: str, node: str | None = None) -> list[Event]:
    return [e for e in events if e.type in types and (node is None or e.node == node)]


async def wait_until(probe: Callable[[], Any], want: Any, timeout_s: float, what: str = "a condition") -> Any:
    """Poll ``probe`` (sync or async) until it returns ``want`` (or ``want(value)`` is
    true); fail after ``timeout_s`` seconds with the last value. Returns the value."""
    deadline = time.monotonic() + timeout_s
    while True:
        v = probe()
        if inspect.isawaitable(v):
            v = await v
        ok = want(v) if callable(want) else v == want
        if ok:
            return v
        assert time.monotonic() < deadline, f"waited {timeout_s}s for {what}: last value {v!r}"
        await asyncio.sleep(0.02)
