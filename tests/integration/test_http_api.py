"""The HTTP API over real sockets on 127.0.0.1: uvicorn serving ``create_app`` (in a
thread, or as a real ``oao-scheduler api`` process) against the test Valkey, runs
executed by an in-process fleet; SSE, auth, Redis outages and schemathesis fuzzing."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from apikit import LiveAPI, free_port
from oao_testkit import fleet, wait_until
from proc import BIN, ROOT, cli, env, stop

from oao_common.broker import Broker
from oao_common.connection import EmbeddedServer, connect

YAML_SPEC = """
name: api-yaml
agents:
  a: {kind: python, entrypoint: "oao_test_agents:noop"}
nodes:
  - {id: one, agent: a, task: first}
  - {id: two, agent: a, task: second, depends_on: [one]}
"""
JSON_SPEC: dict[str, Any] = {
    "name": "api-json",
    "agents": {"s": {"kind": "python", "entrypoint": "oao_test_agents:sleeper"}},
    "nodes": [{"id": "nap", "agent": "s", "task": "{{ inputs.secs }}"}],
    "inputs": {"secs": "30"},
}
BAD_SPEC = """
name: bad
agents:
  a: {kind: python, entrypoint: "oao_test_agents:noop"}
nodes:
  - {id: one, agent: a, colour: red}
  - {id: two, agent: a, priority: 99}
"""
END = ("RUN_SUCCEEDED", "RUN_FAILED", "RUN_CANCELLED", "RUN_PARTIAL")


@pytest.fixture
def api(redis_url: str, prefix: str) -> Iterator[LiveAPI]:
    with LiveAPI(redis_url, prefix) as a:
        yield a


def client(api: LiveAPI, token: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(base_url=api.url, headers=headers, timeout=20)


async def status_of(c: httpx.AsyncClient, run_id: str) -> str:
    r = await c.get(f"/runs/{run_id}")
    assert r.status_code == 200, r.text
    return str(r.json()["status"])


async def read_sse(
    c: httpx.AsyncClient,
    run_id: str,
    last_event_id: str | None = None,
    timeout_s: float = 20,
    out: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Every SSE message of the run's event stream until the server closes it (also
    appended to ``out`` as they come)."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    out = [] if out is None else out

    async def consume() -> None:
        async with c.stream("GET", f"/runs/{run_id}/events", headers=headers) as r:
            assert r.status_code == 200, await r.aread()
            assert r.headers["content-type"].startswith("text/event-stream")
            msg: dict[str, Any] = {}
            async for line in r.aiter_lines():
                if line == "":
                    if "id" in msg:
                        out.append(msg)
                    msg = {}
                elif not line.startswith(":"):
                    field, _, value = line.partition(": ")
                    msg[field] = json.loads(value) if field == "data" else value

    await asyncio.wait_for(consume(), timeout_s)
    return out


async def test_submit_yaml_and_json_specs_run_to_their_reports(api: LiveAPI, broker: Broker) -> None:
    async with client(api) as c, fleet(broker, concurrency=4):
        r = await c.post("/runs", json={"spec": YAML_SPEC, "idempotency_key": "k1"})
        assert r.status_code == 200, r.text
        yaml_run = r.json()
        assert yaml_run["created"] is True and len(yaml_run["exec_hash"]) == 64
        again = (await c.post("/runs", json={"spec": YAML_SPEC, "idempotency_key": "k1"})).json()
        assert again == {**yaml_run, "created": False}

        r = await c.post("/runs", json={"spec": JSON_SPEC, "inputs": {"secs": "0.05"}})
        assert r.status_code == 200, r.text
        json_run = r.json()["run_id"]

        for rid in (yaml_run["run_id"], json_run):
            await wait_until(lambda rid=rid: status_of(c, rid), "SUCCEEDED", 20, f"run {rid} to succeed")
        report = (await c.get(f"/runs/{yaml_run['run_id']}/report")).json()
        assert report["name"] == "api-yaml" and report["status"] == "SUCCEEDED"
        assert [(n["id"], n["status"], n["output"]) for n in report["nodes"]] == [
            ("one", "SUCCEEDED", "ok"),
            ("two", "SUCCEEDED", "ok"),
        ]
        assert report["events"] == len(await broker.events(yaml_run["run_id"]))
        json_report = (await c.get(f"/runs/{json_run}/report")).json()
        assert json_report["nodes"][0]["output"] == "slept 0.05"

        listed = (await c.get("/runs", params={"limit": 10})).json()
        assert {x["id"] for x in listed} == {yaml_run["run_id"], json_run}
        workers = (await c.get("/workers")).json()
        assert len(workers) == 1 and workers[0]["alive"] is True
        assert (await c.get("/queues")).json() == {"queues": {}}  # empty lists do not exist
        health = await c.get("/healthz")
        assert health.status_code == 200 and health.json() == {"status": "ok"}


async def test_bad_spec_is_422_with_the_cli_messages(api: LiveAPI, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_SPEC)
    res = cli("validate", str(path))
    assert res.returncode == 2
    cli_problems = [line.removeprefix(f"error: {path}: ") for line in res.stderr.splitlines()]
    assert len(cli_problems) == 2, res.stderr
    async with client(api) as c:
        for spec, want in [
            (BAD_SPEC, cli_problems),
            (yaml.safe_load(BAD_SPEC), [re.sub(r" \(line \d+\)", "", p) for p in cli_problems]),
        ]:
            r = await c.post("/runs", json={"spec": spec})
            assert r.status_code == 422, r.text
            err = r.json()["error"]
            assert err["code"] == "invalid_spec"
            assert err["problems"] == want
        r = await c.post("/runs", json={"spec": "name: [unclosed"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_spec"
        r = await c.post("/runs", json={})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
        r = await c.post("/run", json={"entrypoint": "not an entrypoint", "policy": {"max_steps": -1}})
        assert r.status_code == 422
        problems = r.json()["error"]["problems"]
        assert any("entrypoint" in p for p in problems) and any("max_steps" in p for p in problems), problems
    assert await status_count(api) == 0


async def status_count(api: LiveAPI) -> int:
    async with client(api) as c:
        return len((await c.get("/runs")).json())


async def test_unknown_run_is_404(api: LiveAPI) -> None:
    async with client(api) as c:
        for method, path in [
            ("GET", "/runs/nope"),
            ("GET", "/runs/nope/report"),
            ("GET", "/runs/nope/events"),
            ("POST", "/runs/nope/cancel"),
            ("GET", "/no/such/path"),
        ]:
            r = await c.request(method, path)
            assert r.status_code == 404, (path, r.text)
            assert r.json()["error"]["code"] == "not_found"


async def test_cancel_a_running_run(api: LiveAPI, broker: Broker) -> None:
    async with client(api) as c, fleet(broker):
        rid = (await c.post("/runs", json={"spec": JSON_SPEC})).json()["run_id"]  # sleeps 30 s
        await wait_until(lambda: status_of(c, rid), "RUNNING", 20, "the run to start")
        r = await c.post(f"/runs/{rid}/cancel")
        assert r.status_code == 200, r.text
        assert r.json() == {"run_id": rid, "cancelled": True, "nodes_cancelled": 1, "status": "CANCELLED"}
        again = (await c.post(f"/runs/{rid}/cancel")).json()
        assert again["cancelled"] is False and again["status"] == "CANCELLED"
        events = await read_sse(c, rid)
        assert events[-1]["event"] == "RUN_CANCELLED"


async def test_sse_streams_until_the_run_ends_and_resumes_after_last_event_id(
    api: LiveAPI, broker: Broker
) -> None:
    async with client(api) as c:
        rid = (await c.post("/runs", json={"spec": YAML_SPEC})).json()["run_id"]
        queued = (await c.get("/queues")).json()["queues"]
        assert sum(queued.values()) == 1, queued  # the root node waits for a worker
        reader = asyncio.create_task(read_sse(c, rid))  # connected before anything ran
        await wait_until(lambda: reader.done(), False, 1, "the reader to be running")
        async with fleet(broker):
            live = await asyncio.wait_for(reader, 20)
        stored = await broker.events(rid)
        assert [m["id"] for m in live] == [e.id for e in stored]
        assert [m["event"] for m in live] == [e.type for e in stored]
        assert live[-1]["event"] == "RUN_SUCCEEDED"
        assert live[0]["event"] == "RUN_SUBMITTED" and live[0]["data"]["id"] == live[0]["id"]
        assert {"NODE_STARTED", "NODE_SUCCEEDED"} <= {m["event"] for m in live}

        for k in (0, len(live) // 2, len(live) - 2):
            resumed = await read_sse(c, rid, last_event_id=live[k]["id"])
            assert [m["id"] for m in resumed] == [m["id"] for m in live[k + 1 :]]
        assert await read_sse(c, rid, last_event_id=live[-1]["id"]) == []
        r = await c.get(f"/runs/{rid}/events", headers={"Last-Event-ID": "not-an-id"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_last_event_id"


async def test_sse_resume_mid_run_gets_exactly_the_rest(api: LiveAPI, broker: Broker) -> None:
    spec = {**JSON_SPEC, "inputs": {"secs": "0.5"}}
    async with client(api) as c, fleet(broker):
        rid = (await c.post("/runs", json={"spec": spec})).json()["run_id"]
        await wait_until(lambda: status_of(c, rid), "RUNNING", 20, "the run to start")
        first = await broker.events(rid)
        rest = await read_sse(c, rid, last_event_id=first[-1].id)
    assert rest and rest[-1]["event"] == "RUN_SUCCEEDED"
    assert [m["id"] for m in rest] == [e.id for e in await broker.events(rid, after=first[-1].id)]


async def test_run_one_agent_and_several(api: LiveAPI, broker: Broker) -> None:
    async with client(api) as c, fleet(broker, concurrency=4):
        r = await c.post(
            "/run",
            params={"wait": "true", "timeout_s": 20},
            json={"entrypoint": "oao_test_agents:sleeper", "task": "0.01", "policy": {"max_steps": 5}},
        )
        assert r.status_code == 200, r.text
        one = r.json()
        assert one["status"] == "SUCCEEDED"
        assert one["report"]["nodes"][0]["output"] == "slept 0.01"
        r = await c.post(
            "/run-multi",
            params={"wait": "true", "timeout_s": 20},
            json={"agents": {"r": "oao_test_agents:sleeper", "c": "oao_test_agents:broken"}, "task": "0"},
        )
        assert r.status_code == 200, r.text
        runs = r.json()["runs"]
        assert runs["r"]["status"] == "SUCCEEDED" and runs["c"]["status"] == "FAILED"
        assert runs["r"]["run_id"] != runs["c"]["run_id"]
        assert "always broken" in json.dumps(runs["c"]["report"]["nodes"][0]["error"])
        r = await c.post("/run", json={"entrypoint": "oao_test_agents:noop"})
        assert r.status_code == 200 and r.json()["status"] is None
        await wait_until(lambda: status_of(c, r.json()["run_id"]), "SUCCEEDED", 20, "the run to succeed")


async def test_bearer_tokens(redis_url: str, prefix: str) -> None:
    with LiveAPI(redis_url, prefix, tokens=["tok-one", "tok-two"]) as a:
        for token in (None, "wrong", "tok-one-and-more"):
            async with client(a, token) as c:
                r = await c.get("/runs")
                assert r.status_code == 401, r.text
                assert r.json()["error"]["code"] == "unauthorized"
                assert (await c.post("/runs", json={"spec": YAML_SPEC})).status_code == 401
        for token in ("tok-one", "tok-two"):
            async with client(a, token) as c:
                assert (await c.get("/runs")).status_code == 200
        async with client(a) as c:
            assert (await c.get("/healthz")).status_code == 200  # for load balancers
            schema = (await c.get("/openapi.json")).json()
            assert "HTTPBearer" in schema["components"]["securitySchemes"]


def test_api_process_auth_and_usage_errors(redis_url: str, prefix: str, tmp_path: Path) -> None:
    res = cli("api", "--host", "0.0.0.0", "--port", str(free_port()), timeout=30)
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and "token" in res.stderr, res.stderr

    tokens = tmp_path / "tokens"
    tokens.write_text("# ops\nfile-token-123\n")
    port = free_port()
    log = tmp_path / "api.log"
    args = [str(BIN / "oao-scheduler"), "--log-level", "info", "api", "--host", "0.0.0.0"]
    args += ["--port", str(port)]
    args += ["--tokens-file", str(tokens), "--redis-url", redis_url, "--prefix", prefix]
    with open(log, "wb") as out:
        p = subprocess.Popen(
            args,
            cwd=ROOT,
            env=env(OAO_API_TOKENS="env-token-456"),
            stdout=out,
            stderr=out,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                health = httpx.get(f"{base}/healthz", timeout=2)
                break
            except httpx.TransportError:
                assert p.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        assert health.status_code == 200
        assert httpx.get(f"{base}/runs", timeout=5).status_code == 401
        for tok in ("file-token-123", "env-token-456"):
            r = httpx.get(f"{base}/runs", headers={"Authorization": f"Bearer {tok}"}, timeout=5)
            assert r.status_code == 200, r.text
        assert httpx.get(f"{base}/docs", timeout=5).status_code == 200
    finally:
        stop(p)
    text = log.read_text()
    assert "GET /runs" in text  # the access log is there ...
    assert "file-token-123" not in text and "env-token-456" not in text  # ... without tokens


async def test_redis_going_away_is_503_never_500(prefix: str) -> None:
    # an ephemeral port: the embedded servers of other test sessions on this machine pick
    # the first free port from 16379 up, and could take this one once it is stopped
    server = EmbeddedServer(port=free_port()).start()
    try:
        with LiveAPI(server.url, prefix) as a:
            async with client(a) as c:
                assert (await c.get("/healthz")).status_code == 200
                rid = (await c.post("/runs", json={"spec": YAML_SPEC})).json()["run_id"]
                server.stop()
                for method, path, body in [
                    ("GET", "/healthz", None),
                    ("GET", "/runs", None),
                    ("GET", f"/runs/{rid}", None),
                    ("GET", f"/runs/{rid}/report", None),
                    ("GET", f"/runs/{rid}/events", None),
                    ("POST", f"/runs/{rid}/cancel", None),
                    ("POST", "/runs", {"spec": YAML_SPEC}),
                    ("GET", "/workers", None),
                    ("GET", "/queues", None),
                ]:
                    r = await c.request(method, path, json=body)
                    assert r.status_code == 503, (path, r.status_code, r.text)
                    assert r.json()["error"]["code"] == "redis_unavailable"
    finally:
        server.stop()


def test_schemathesis_finds_no_server_errors_nor_undocumented_answers(
    redis_url: str, prefix: str, broker: Broker
) -> None:
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.checks import (
        content_type_conformance,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [not_a_server_error, status_code_conformance, content_type_conformance]
    checks.append(response_schema_conformance)

    with LiveAPI(redis_url, prefix) as a:
        schema = schemathesis.openapi.from_url(f"{a.url}/openapi.json")
        failures: list[str] = []
        calls = 0
        for result in schema.get_all_operations():
            op = result.ok()

            @given(case=op.as_strategy())
            @settings(
                max_examples=int(os.environ.get("OAO_FUZZ_EXAMPLES", "15")),
                deadline=None,
                database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def fuzz(case: Any) -> None:
                nonlocal calls
                if case.query and "wait" in case.query:
                    case.query["wait"] = "false"  # no workers here: a wait would only time out
                calls += 1
                try:  # no 5xx; status, content type and body as the schema documents them
                    case.call_and_validate(base_url=a.url, timeout=10, checks=checks)
                except Exception as e:
                    failures.append(f"{case.method} {case.path}: {str(e)[:500]}")

            fuzz()
        assert calls >= 50
        assert failures == []


async def test_sse_rides_out_a_redis_restart(prefix: str, tmp_path: Path) -> None:
    server = EmbeddedServer(data_dir=str(tmp_path / "valkey"), appendonly=True, port=free_port()).start()
    redis = connect(server.url)
    broker = Broker(redis, prefix)
    try:
        with LiveAPI(server.url, prefix) as a:
            async with client(a) as c:
                rid = (await c.post("/runs", json={"spec": JSON_SPEC})).json()["run_id"]
                seen: list[dict[str, Any]] = []
                reader = asyncio.create_task(read_sse(c, rid, timeout_s=60, out=seen))
                n0 = len(await broker.events(rid))
                await wait_until(lambda: len(seen), n0, 10, "the events so far")
                server.stop()
                await wait_until(
                    lambda: c.get("/healthz"), lambda r: r.status_code == 503, 10, "Redis to be gone"
                )
                server.start()
                await wait_until(lambda: c.get("/healthz"), lambda r: r.status_code == 200, 20, "Redis back")
                assert not reader.done()
                assert await broker.cancel(rid) >= 0
                got = await asyncio.wait_for(reader, 30)
        assert got[-1]["event"] == "RUN_CANCELLED"
        assert [m["id"] for m in got] == [e.id for e in await broker.events(rid)]  # none lost or repeated
    finally:
        await redis.aclose()
        server.stop()
