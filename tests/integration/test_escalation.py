"""Escalation: a webhook on loopback receives the report of a failed run, with retries."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from oao_testkit import make_spec, of_type, run_spec, wait_until

from oao_common.broker import Broker
from oao_scheduler.escalation import Escalator
from oao_scheduler.retention import escalation_floor
from oao_scheduler.submit import submit_spec


class Hook:
    """A real HTTP server on 127.0.0.1 answering the queued statuses, then 200."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        hook = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers.get("content-length") or 0)
                hook.bodies.append(json.loads(self.rfile.read(n)))
                hook.headers.append({k.lower(): v for k, v in self.headers.items()})
                code = hook.statuses.pop(0) if hook.statuses else 200
                self.send_response(code)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *a: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook()
    yield h
    h.server.shutdown()


def failing_spec(url: str, **esc: Any) -> Any:
    return make_spec(
        [{"id": "bad", "agent": "broken"}, {"id": "ok", "agent": "noop"}],
        defaults={"retry": {"max_retries": 0}},
        escalation={"webhook": url, "headers": {"x-team": "agents"}, **esc},
    )


async def test_failed_run_is_escalated_with_retries(broker: Broker, hook: Hook) -> None:
    hook.statuses = [500, 503]  # then 200
    rid = await run_spec(broker, failing_spec(hook.url, max_attempts=5))
    esc = Escalator(broker, backoff_cap_s=0.01)
    assert await esc.poll() == 1
    assert len(hook.bodies) == 3  # two 5xx answers retried
    body = hook.bodies[-1]
    assert body["event"] == "oao.run.failed" and body["report"]["run_id"] == rid
    assert {n["id"]: n["status"] for n in body["report"]["nodes"]} == {"bad": "FAILED", "ok": "SUCCEEDED"}
    assert hook.headers[-1]["x-team"] == "agents"
    [ev] = of_type(await broker.events(rid), "ESCALATED")
    assert ev.data == {"webhook": hook.url, "ok": True, "http_status": 200, "attempts": 3}
    assert await esc.poll() == 0  # acknowledged: handled once


async def test_only_configured_endings_escalate(broker: Broker, hook: Hook) -> None:
    ok = make_spec([{"id": "a", "agent": "noop"}], escalation={"webhook": hook.url})
    await run_spec(broker, ok)
    rid = await run_spec(broker, failing_spec(hook.url, on=["PARTIAL"]))
    esc = Escalator(broker)
    assert await esc.poll() == 2  # both endings read and acknowledged
    assert hook.bodies == []  # a success, and a FAILED run that asked for PARTIAL only
    assert not of_type(await broker.events(rid), "ESCALATED")


async def test_webhook_giving_4xx_is_not_retried(broker: Broker, hook: Hook) -> None:
    hook.statuses = [404]
    rid = await run_spec(broker, failing_spec(hook.url))
    await Escalator(broker, backoff_cap_s=0.01).poll()
    [ev] = of_type(await broker.events(rid), "ESCALATED")
    assert ev.data["ok"] is False and ev.data["http_status"] == 404 and ev.data["attempts"] == 1


def test_run_command_escalates_before_exiting(hook: Hook, tmp_path: Any) -> None:
    from proc import cli

    spec = tmp_path / "esc.yaml"
    spec.write_text(
        "name: esc\nagents: {b: {kind: python, entrypoint: 'oao_test_agents:broken'}}\n"
        f"defaults: {{retry: {{max_retries: 0}}}}\nescalation: {{webhook: '{hook.url}'}}\n"
        "nodes: [{id: bad, agent: b}]\n"
    )
    r = cli("run", str(spec), "--json")
    assert r.returncode == 1
    assert len(hook.bodies) == 1 and hook.bodies[0]["report"]["status"] == "FAILED"


async def test_an_ending_that_cannot_be_handled_is_logged_and_acknowledged(
    broker: Broker, hook: Hook
) -> None:
    """A run submitted by an older release whose stored spec this one refuses (here
    ``max_retries: 5000``, over today's bound) ends: escalating it can never work. The
    escalator must log it and acknowledge it, not die: a dead loop ends ``serve``, its
    replacement would reclaim the same entry and die again, and an entry left pending
    holds back retention for every later run. The next ending is escalated as usual."""

    def spec(name: str) -> Any:
        esc = {"webhook": hook.url, "on": ["FAILED", "CANCELLED"]}
        return make_spec([{"id": "a", "agent": "noop"}], name=name, escalation=esc)

    old = (await submit_spec(broker, spec("old"))).run_id
    sk = broker.keys.spec(str(await broker.redis.hget(broker.keys.run(old), "spec_hash")))
    stored = json.loads(str(await broker.redis.hget(sk, "json")))
    stored["defaults"]["retry"]["max_retries"] = 5000
    await broker.redis.hset(sk, "json", json.dumps(stored))
    await broker.cancel(old)
    new = (await submit_spec(broker, spec("new"))).run_id
    await broker.cancel(new)

    esc = Escalator(broker, reclaim_idle_s=0)
    stop = asyncio.Event()
    loop = asyncio.create_task(esc.run(stop))
    try:
        await wait_until(lambda: len(hook.bodies), 1, 10, "the second ending to be escalated")
        assert not loop.done(), loop.exception()
        assert (esc.failed, esc.sent) == (1, 1)
        assert hook.bodies[0]["report"]["run_id"] == new
        assert await escalation_floor(broker) is None  # nothing pending: retention may go on
        assert await esc.poll() == 0  # the failed entry is not handed out again
    finally:
        stop.set()
        await asyncio.wait_for(loop, 5)
