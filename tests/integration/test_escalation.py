"""Escalation: a webhook on loopback receives the report of a failed run, with retries."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from oao_testkit import make_spec, of_type, run_spec

from oao_common.broker import Broker
from oao_scheduler.escalation import Escalator


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
