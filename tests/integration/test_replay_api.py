"""Replay and fork over the HTTP API (real socket on 127.0.0.1), and the CLI commands
through the real ``oao-scheduler`` binary."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from apikit import LiveAPI
from oao_testkit import run_spec
from proc import cli
from test_replay import run_spec_on, spec

from oao_common.broker import Broker


@pytest.fixture(autouse=True)
def ledger_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "effects.log"
    monkeypatch.setenv("OAO_TEST_LEDGER", str(path))
    return path


@pytest.fixture
def api(redis_url: str, prefix: str) -> Iterator[LiveAPI]:
    with LiveAPI(redis_url, prefix) as a:
        yield a


async def test_replay_and_fork_endpoints(api: LiveAPI, broker: Broker) -> None:
    rid = await run_spec(broker, spec(), concurrency=4)
    async with httpx.AsyncClient(base_url=api.url, timeout=20) as c:
        r = await c.post(f"/replay/{rid}")
        assert r.status_code == 200, r.text
        full = r.json()
        assert full["replay_of"] == rid and full["strict"] is True and full["point"] is None
        r = await c.post(f"/replay/{rid}", params={"from_step": "research:5"})
        assert r.status_code == 200 and r.json()["seeded"] == {"research": 4}
        r = await c.post(
            f"/fork/{rid}", json={"from_step": "draft:1", "sets": ["result.content=Forked."], "inputs": {}}
        )
        assert r.status_code == 200, r.text
        fork = r.json()
        assert fork["overrides"] == ['result.content="Forked."'] and fork["copied"] == ["research", "angle"]
        for bad, code in [
            (c.post("/replay/nope"), 404),
            (c.post(f"/replay/{rid}", params={"from_step": "ghost:1"}), 422),
            (c.post(f"/replay/{rid}", params={"from_step": "research:1", "live": "true"}), 422),
            (c.post(f"/replay/{rid}", params={"from_step": "no-seq"}), 422),
            (c.post(f"/fork/{rid}", json={"sets": ["nodes.draft.task=x"]}), 422),
        ]:
            res = await bad
            assert res.status_code == code, res.text
            assert res.json()["error"]["code"] in ("not_found", "invalid_replay", "invalid_request")
    assert await run_spec_on(broker, full["run_id"]) == "SUCCEEDED"
    assert await run_spec_on(broker, fork["run_id"]) == "SUCCEEDED"
    out = json.loads((await broker.get_nodes(fork["run_id"], ["draft"]))[0]["output"])
    assert out.startswith("Forked. (1 words")


async def test_replay_and_fork_commands(redis_url: str, prefix: str, broker: Broker) -> None:
    rid = await run_spec(broker, spec("AI governance [/not markup]"), concurrency=4)
    where = ["--redis-url", redis_url, "--prefix", prefix]
    res = cli("replay", rid, "--json", *where)
    assert res.returncode == 0, res.stderr
    made = json.loads(res.stdout)
    assert made["replay_of"] == rid and made["strict"] is True
    res = cli("fork", rid, "--from-step", "draft:1", "--set", "result.content=Hi", *where)
    assert res.returncode == 0, res.stderr
    forked = res.stdout.strip()
    assert f"replay of {rid} (from draft:1)" in res.stderr and "copied: research, angle" in res.stderr
    assert await run_spec_on(broker, forked) == "SUCCEEDED"
    status = cli("status", forked, *where)
    assert f'replay of {rid} from draft:1, changed: result.content="Hi"' in status.stdout
    shown = cli("step", rid, "research:6", "--json", *where)
    assert shown.returncode == 0, shown.stderr
    rec = json.loads(shown.stdout)
    assert rec["kind"] == "llm" and [m["role"] for m in rec["request"]["messages"]] == [
        "system",
        "user",
        "assistant",
        "user",
    ]
    text = cli("step", rid, "research:4", *where)
    assert text.returncode == 0 and "user: Research AI governance [/not markup]" in text.stdout, text.stdout
    for args, want in [
        (("step", rid, "research:99"), "has no recorded step research:99"),
        (("replay", "nope"), "error: no run 'nope'"),
        (("replay", rid, "--from-step", "draft"), "is not a step"),
        (("replay", rid, "--from-node", "draft", "--live"), "--live is for a full replay"),
        (("fork", rid, "--set", "x=1"), "a fork needs a point"),
        (("fork", rid, "--from-node", "draft", "--set", "agents.ghost.system=x"), "changed spec is invalid"),
    ]:
        res = cli(*args, *where)
        assert res.returncode == 2, (args, res.stderr)
        assert res.stderr.strip().startswith("error: ") and want in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
