"""Escalation: tell people when a run ends badly (webhook + ``ESCALATED`` event).

Every run ending is announced by the Lua that ends it on the stream
``<p>:runs:finished``. The escalator reads it through a consumer group, so any number
of ``serve`` processes share the work and each ending is handled once; an entry left
pending by a crashed consumer is reclaimed (``XAUTOCLAIM``) after ``reclaim_idle_s``.
For a run whose spec has ``escalation`` and whose status is in ``escalation.on``, it
POSTs the execution report (JSON) to the webhook, retrying network errors and HTTP 5xx
/ 429 with exponential backoff (1, 2, 4 ... s, capped at 30 s), then appends an
``ESCALATED`` event with the outcome and acknowledges the entry.

The webhook must pass the fleet's trust policy (docs/security.md): never a link-local or
cloud-metadata address, checked on the URL and again on every address its host resolves
to at connect time (:mod:`oao_common.safe_http`); redirects are not followed. A refused
webhook is not retried: the ``ESCALATED`` event says why (``ok: false``, ``error``).

An ending that cannot be handled for a reason other than Redis (the run's stored spec
no longer validates under this release, say) is logged (``escalator.ending_not_handled``)
and acknowledged: left pending, it would end the loop, and so ``serve``, in every
replacement process, and hold back retention for good (docs/guarantees.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from typing import Any

import httpx
from redis import exceptions as redis_exc

from oao_common import tracing
from oao_common.broker import Broker
from oao_common.errors import TrustError
from oao_common.events import EventType
from oao_common.log import get_logger
from oao_common.retry import LOOP_ERRORS, Backoff, exponential_delay_s
from oao_common.safe_http import BlockedDestination, guarded_client
from oao_common.spec import EscalationSpec, Spec
from oao_common.trust import DEFAULT_TRUST, TrustPolicy

from .report import collect

GROUP = "oao-escalation"


class Escalator:
    """Consumes run endings and escalates the ones the spec asks for; ``trust`` decides
    which webhook addresses may be reached."""

    def __init__(
        self,
        broker: Broker,
        reclaim_idle_s: float = 60.0,
        backoff_cap_s: float = 30.0,
        trust: TrustPolicy = DEFAULT_TRUST,
    ):
        self.broker = broker
        self.trust = trust
        self.consumer = f"{socket.gethostname()}-{os.getpid()}"
        self.reclaim_idle_s = reclaim_idle_s
        self.backoff_cap_s = backoff_cap_s
        self.sent = 0
        #: Run endings that could not be handled and were acknowledged anyway (logged).
        self.failed = 0
        self._group_ready = False
        self.log = get_logger(component="escalator")

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            await self.broker.redis.xgroup_create(self.broker.keys.finished, GROUP, id="0", mkstream=True)
        except redis_exc.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._group_ready = True

    async def run(self, stop: asyncio.Event, block_ms: int = 500) -> None:
        """Handle run endings until ``stop`` is set (noticed within ``block_ms``); any
        Redis error is logged and retried with backoff, never fatal."""
        backoff = Backoff(self.log, "escalator", base_s=0.2, cap_s=10.0)
        while not stop.is_set():
            try:
                await self.poll(block_ms=block_ms)
                backoff.ok()
            except LOOP_ERRORS as e:
                await backoff.sleep_after(e)

    async def poll(self, block_ms: int = 0) -> int:
        """Handle what is pending (reclaimed or new); returns the number handled."""
        await self._ensure_group()
        r = self.broker.redis
        key = self.broker.keys.finished
        _, reclaimed, *_ = await r.xautoclaim(
            key, GROUP, self.consumer, int(self.reclaim_idle_s * 1000), "0-0", count=50
        )
        entries = list(reclaimed)
        res = await r.xreadgroup(GROUP, self.consumer, {key: ">"}, count=50, block=block_ms or None)
        for _stream, items in res or []:
            entries.extend(items)
        for entry_id, fields in entries:
            run_id, status = fields.get("rid", ""), fields.get("status", "")
            try:
                await self.handle(run_id, status)
            except LOOP_ERRORS:
                raise  # Redis: the entry stays pending and is handled again later
            except Exception as e:
                # Waiting cannot fix it (a stored spec this release no longer accepts,
                # data it cannot read). Unacknowledged, the entry would kill this loop
                # again in every replacement process, and hold back retention for good.
                self.failed += 1
                error = " | ".join(line.strip() for line in str(e).splitlines() if line.strip())
                self.log.error(
                    "escalator.ending_not_handled",
                    run_id=run_id,
                    status=status,
                    error=f"{type(e).__name__}: {error}"[:2000],
                )
            await r.xack(key, GROUP, entry_id)
        return len(entries)

    async def handle(self, run_id: str, status: str) -> None:
        if tracing.ENABLED:
            await self.run_span(run_id, status)
        spec_json, _, _ = await self.broker.get_spec_json(run_id)
        if not spec_json:
            return
        esc = Spec.from_stored_json(spec_json).escalation
        if esc is None or status not in esc.on:
            return
        report = await collect(self.broker, run_id)
        outcome = await self.post(esc, {"event": "oao.run." + status.lower(), "report": report})
        await self.broker.append_run_event(run_id, EventType.ESCALATED, {"webhook": esc.webhook, **outcome})
        self.sent += 1
        self.log.info("escalator.escalated", run_id=run_id, status=status, **outcome)

    async def run_span(self, run_id: str, status: str) -> None:
        """Write the run's ``oao.run`` span (ids fixed at submit, from ``created_at`` to
        ``finished_at``): every run ending passes here exactly once."""
        run = await self.broker.get_run(run_id)
        tp = run.get("traceparent")
        if not tp:
            return
        created = int(run.get("created_at") or 0)
        finished = int(run.get("finished_at") or created)
        attrs = {
            "oao.run.id": run_id,
            "oao.run.name": run.get("name"),
            "oao.run.status": status,
            "oao.run.nodes_total": int(run.get("nodes_total") or 0),
            "oao.run.nodes_succeeded": int(run.get("nodes_succeeded") or 0),
            "oao.run.nodes_failed": int(run.get("nodes_failed") or 0),
            "oao.run.steps": int(run.get("steps") or 0),
            "gen_ai.usage.input_tokens": int(run.get("tokens_in") or 0),
            "gen_ai.usage.output_tokens": int(run.get("tokens_out") or 0),
            "oao.cost_usd": float(run.get("cost_usd") or 0),
        }
        tracing.emit_finished_span(
            "oao.run",
            tp,
            created * 1_000_000,
            finished * 1_000_000,
            attrs,
            parent_span_hex=run.get("trace_parent_span", ""),
            error=None if status == "SUCCEEDED" else f"run ended {status}",
        )

    async def post(self, esc: EscalationSpec, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body``; returns ``{"ok", "http_status", "attempts", "error"}``.

        A webhook the trust policy refuses is not contacted (``attempts`` 0) and an
        address refused at connect time is not retried; a redirect is not followed
        (its 3xx status is the outcome)."""
        payload = json.dumps(body, default=str).encode()
        headers = {"content-type": "application/json", **esc.headers}
        last: dict[str, Any] = {}
        try:
            self.trust.check_url(esc.webhook, "escalation.webhook")
        except TrustError as e:
            return {"ok": False, "http_status": None, "attempts": 0, "error": str(e)}
        async with guarded_client(self.trust, "escalation.webhook", timeout=esc.timeout_s) as client:
            for attempt in range(1, esc.max_attempts + 1):
                try:
                    resp = await client.post(esc.webhook, content=payload, headers=headers)
                    last = {"ok": resp.is_success, "http_status": resp.status_code, "attempts": attempt}
                    if resp.is_success or (resp.status_code < 500 and resp.status_code != 429):
                        return last
                except BlockedDestination as e:
                    return {"ok": False, "http_status": None, "attempts": attempt, "error": str(e)}
                except httpx.HTTPError as e:
                    last = {"ok": False, "http_status": None, "attempts": attempt, "error": str(e)}
                if attempt < esc.max_attempts:
                    await asyncio.sleep(exponential_delay_s(attempt, 1.0, self.backoff_cap_s, jitter=False))
        return last
