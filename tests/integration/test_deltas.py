"""Live model text deltas, worker side, against a real server: what a streaming model
call publishes on the run's pub/sub channel, and what it does not (a replayed step,
a run nobody watches, a publish that fails or hangs). The HTTP side is in
test_http_api.py."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from oao_testkit import fleet, make_spec, wait_until
from redis import exceptions as redis_exc

from oao_common.broker import Broker
from oao_common.connection import connect
from oao_scheduler.progress import wait_for_run
from oao_scheduler.submit import submit_spec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the stub server's module
from openai_server import OpenAIStubServer

REPLY = "{{ node_id }} streams this reply in many small pieces; only the whole reply is recorded."
MODELS = {"m": {"provider": "scripted", "chunk_tokens": 2, "stream_delay_s": 0.002, "replies": [REPLY]}}
END = "end-of-test"


class Listener:
    """A raw subscriber of a run's delta channel (its own connection)."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []


@asynccontextmanager
async def listening(redis_url: str, broker: Broker, rid: str) -> AsyncIterator[Listener]:
    """Subscribed to ``rid``'s deltas until the block ends; on a normal exit it reads
    every message published before (up to a sentinel it publishes itself)."""
    channel = broker.keys.deltas_channel(rid)
    r = connect(redis_url)
    pubsub = r.pubsub()
    listener = Listener()
    await pubsub.subscribe(channel)
    assert (await pubsub.get_message(timeout=5))["type"] == "subscribe"
    try:
        yield listener
        await broker.redis.publish(channel, END)
        while True:
            msg = await asyncio.wait_for(pubsub.get_message(timeout=1), 10)
            if msg is None or msg["type"] != "message":
                continue
            if msg["data"] == END:
                break
            listener.messages.append(json.loads(msg["data"]))
    finally:
        await pubsub.aclose()
        await r.aclose()


def texts_by_node(messages: list[dict[str, Any]]) -> dict[str, str]:
    """Each node's deltas joined, checking that their offsets follow on."""
    out: dict[str, str] = {}
    for m in messages:
        text = out.get(m["node"], "")
        assert m["offset"] == len(text), (m, text)
        out[m["node"]] = text + m["text"]
    return out


async def test_deltas_of_a_streaming_call_are_published_and_nothing_is_stored(
    redis_url: str, broker: Broker
) -> None:
    spec = make_spec(
        [
            {"id": "draft", "agent": "writer", "task": "draft"},
            {"id": "polish", "agent": "writer", "task": "polish", "depends_on": ["draft"]},
        ],
        models=MODELS,
        agents={"writer": {"kind": "llm", "model": "m"}},
    )
    s = await submit_spec(broker, spec)
    async with listening(redis_url, broker, s.run_id) as sub, fleet(broker) as ws:
        await wait_for_run(broker, s.run_id, interval_s=0.02, timeout_s=30)
    nodes = await broker.get_nodes(s.run_id, ["draft", "polish"])
    outputs = {n: json.loads(f["output"]) for n, f in zip(["draft", "polish"], nodes, strict=True)}
    assert texts_by_node(sub.messages) == outputs
    for node in outputs:
        mine = [m for m in sub.messages if m["node"] == node]
        assert len(mine) >= 2  # the first piece at once, the rest when the call ended
        assert {(m["attempt"], m["seq"]) for m in mine} == {(1, 1)}
    assert ws[0].deltas is not None and ws[0].deltas.errors == 0
    # the event log and the ledger hold no delta
    raw = await broker.redis.xrange(broker.keys.events(s.run_id))
    assert "MODEL_DELTA" not in {f["type"] for _, f in raw}
    assert not any("offset" in f.get("data", "") for _, f in raw)
    assert sorted(await broker.redis.hkeys(broker.keys.steps(s.run_id))) == ["draft:1", "polish:1"]


async def test_an_openai_stream_is_published_too(
    redis_url: str, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with OpenAIStubServer() as server:
        server.reply_slow_stream(12, 0.005, piece="token ")
        spec = make_spec(
            [{"id": "ask", "agent": "chat", "task": "hi"}],
            models={"m": {"provider": "openai", "model": "gpt-test", "base_url": server.base_url}},
            agents={"chat": {"kind": "llm", "model": "m"}},
        )
        s = await submit_spec(broker, spec)
        async with listening(redis_url, broker, s.run_id) as sub, fleet(broker):
            await wait_for_run(broker, s.run_id, interval_s=0.02, timeout_s=30)
    (node,) = await broker.get_nodes(s.run_id, ["ask"])
    assert json.loads(node["output"]) == "token " * 12
    assert texts_by_node(sub.messages) == {"ask": "token " * 12} and len(sub.messages) >= 2


async def test_a_replayed_step_publishes_nothing(redis_url: str, broker: Broker) -> None:
    spec = make_spec(
        [{"id": "n", "agent": "a", "retry": {"max_retries": 1, "retry_delay_s": 0.01}}],
        models=MODELS,
        agents={"a": {"kind": "python", "entrypoint": "oao_test_agents:stream_then_fail_once", "model": "m"}},
    )
    s = await submit_spec(broker, spec)
    async with listening(redis_url, broker, s.run_id) as sub, fleet(broker):
        await wait_for_run(broker, s.run_id, interval_s=0.02, timeout_s=30)
    (node,) = await broker.get_nodes(s.run_id, ["n"])
    assert node["status"] == "SUCCEEDED" and node["attempt"] == "2" and node["replayed_steps"] == "1"
    assert {m["attempt"] for m in sub.messages} == {1}  # attempt 2 replayed the call
    assert texts_by_node(sub.messages) == {"n": json.loads(node["output"])}


async def test_nobody_watching_means_nothing_published(broker: Broker) -> None:
    spec = make_spec(
        [
            {"id": "a", "agent": "writer"},
            {"id": "b", "agent": "writer", "depends_on": ["a"]},
            {"id": "c", "agent": "writer", "depends_on": ["b"]},
        ],
        models=MODELS,
        agents={"writer": {"kind": "llm", "model": "m"}},
    )
    async with fleet(broker) as ws:
        s = await submit_spec(broker, spec)
        await wait_for_run(broker, s.run_id, interval_s=0.02, timeout_s=30)
    pub = ws[0].deltas
    assert pub is not None
    # 3 calls of ~22 pieces each, and nothing sent: the first pieces waited for the
    # first subscriber count, then were dropped
    assert pub.published == 0 and pub.errors == 0
    assert pub.listening(s.run_id) is False


class BrokenPublish:
    """A Redis client whose PUBLISH fails (``error``) or never answers (``hang``)."""

    def __init__(self, redis: Any, mode: str) -> None:
        self.redis, self.mode, self.calls = redis, mode, 0

    async def pubsub_numsub(self, *channels: str) -> list[tuple[str, int]]:
        return [(c, 1) for c in channels]  # always "someone listens"

    async def publish(self, channel: str, message: str) -> int:
        self.calls += 1
        if self.mode == "error":
            raise redis_exc.ConnectionError("publish refused")
        await asyncio.Event().wait()  # hangs
        return 0

    def pipeline(self, transaction: bool = True) -> BrokenPipeline:
        return BrokenPipeline(self)


class BrokenPipeline:
    """A pipeline of ``PUBLISH`` commands that fails or hangs like its client."""

    def __init__(self, client: BrokenPublish) -> None:
        self.client, self.messages = client, 0

    async def __aenter__(self) -> BrokenPipeline:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def publish(self, channel: str, message: str) -> None:
        self.messages += 1

    async def execute(self) -> list[int]:
        await self.client.publish("", "")
        return []


@pytest.mark.parametrize("mode", ["error", "hang"])
async def test_a_failing_publish_never_fails_the_step(broker: Broker, mode: str) -> None:
    spec = make_spec(
        [{"id": "a", "agent": "writer"}, {"id": "b", "agent": "writer", "depends_on": ["a"]}],
        models=MODELS,
        agents={"writer": {"kind": "llm", "model": "m"}},
    )
    async with fleet(broker) as ws:
        pub = ws[0].deltas
        assert pub is not None
        broken = BrokenPublish(pub.redis, mode)
        pub.redis = broken  # type: ignore[assignment]
        s = await submit_spec(broker, spec)
        status = await wait_for_run(broker, s.run_id, interval_s=0.02, timeout_s=30)
        assert status == "SUCCEEDED"
        assert broken.calls >= 1 and pub.published == 0  # a hung send holds up the rest, not the steps
        if mode == "error":
            await wait_until(lambda: pub.errors, lambda n: n >= broken.calls, 5, "the failures counted")
