"""A LangGraph agent whose real ``oao-worker`` process is SIGKILLed mid-run resumes on
another worker without repeating a recorded model call: the model is an OpenAI-compatible
HTTP server in the test process, so every call the fleet makes is counted where it lands.

Bounded in time: every wait has a deadline."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

pytest.importorskip("langgraph")

import yaml
from oao_testkit import of_type, wait_until
from openai_server import OpenAIStubServer
from proc import start_serve, start_worker, stop

from oao_common.broker import Broker
from oao_common.connection import connect
from oao_common.spec import parse_spec
from oao_scheduler.progress import wait_for_run
from oao_scheduler.submit import submit_spec

pytestmark = pytest.mark.chaos

HB = "1.0"  # heartbeat TTL, seconds
KEY_ENV = "OAOTEST_OPENAI_API_KEY"


async def test_sigkilled_graph_resumes_without_repeating_a_recorded_model_call(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    ledger, marker = tmp_path / "effects.log", tmp_path / "block"
    marker.touch()
    env = {"OAO_TEST_LEDGER": str(ledger), "OAO_TEST_BLOCK_MARKER": str(marker), KEY_ENV: "sk-test"}
    with OpenAIStubServer() as server:
        server.reply_tool_calls([("call_1", "lookup", {"term": "fencing"})])
        server.reply_tool_calls([("call_2", "slow_lookup", {"term": "ledger"})])
        server.reply_text("Fencing and the ledger keep runs exact.")
        doc = {
            "name": "lg-kill",
            "defaults": {"retry": {"max_retries": 2, "retry_delay_s": 0.1}, "policy": {"timeout_s": 60}},
            "models": {
                "gpt": {
                    "provider": "openai",
                    "model": "stub",
                    "base_url": server.base_url,
                    "api_key_env": KEY_ENV,
                }
            },
            "agents": {
                "g": {
                    "kind": "langgraph",
                    "entrypoint": "lg_graphs:react",
                    "model": "gpt",
                    "output_key": "messages",
                }
            },
            "tools": {
                "lookup": {"entrypoint": "lg_graphs:lookup"},
                "slow_lookup": {"entrypoint": "lg_graphs:slow_lookup", "idempotent": True},
            },
            "nodes": [{"id": "a", "agent": "g", "task": "How do runs stay exact?"}],
        }
        serve = start_serve(
            redis_url, prefix, "--reaper-interval", "0.2", "--heartbeat-ttl", HB, log=tmp_path / "serve.log"
        )
        args = ("--heartbeat-ttl", HB, "--grace-period", "1")
        w1 = start_worker(redis_url, prefix, *args, extra_env=env, log=tmp_path / "w1.log")
        w2 = None
        r = connect(redis_url)
        broker = Broker(r, prefix)
        try:
            s = await submit_spec(broker, parse_spec(yaml.safe_dump(doc), "lg-kill"))
            key = broker.keys.node(s.run_id, "a")
            # model call 1, lookup, model call 2 recorded; slow_lookup (step 4) started, blocked
            await wait_until(lambda: r.hget(key, "steps_started"), "4", 60, "the slow tool to start")
            assert await r.hget(key, "steps_recorded") == "3"
            assert len(server.requests) == 2
            w1.send_signal(signal.SIGKILL)
            w1.wait(10)
            marker.unlink()
            w2 = start_worker(redis_url, prefix, *args, extra_env=env, log=tmp_path / "w2.log")
            await wait_for_run(broker, s.run_id, interval_s=0.1, timeout_s=60)

            [n] = await broker.get_nodes(s.run_id, ["a"])
            assert n["status"] == "SUCCEEDED", n.get("error")
            assert n["output"] == '"Fencing and the ledger keep runs exact."'
            assert n["attempt"] == "2" and n["requeues"] == "1"
            assert (n["replayed_steps"], n["executed_steps"]) == ("3", "2")
            # three model calls in all: the two recorded ones were served from the ledger
            assert len(server.requests) == 3
            steps = await broker.get_steps(s.run_id)
            assert [(steps[f"a:{i}"]["kind"], steps[f"a:{i}"]["attempt"]) for i in range(1, 6)] == [
                ("llm", 1),
                ("tool", 1),
                ("llm", 1),
                ("tool", 2),
                ("llm", 2),
            ]
            # the third request carried the whole conversation, tool results included
            last = server.requests[2].body["messages"]
            assert [m["role"] for m in last] == ["user", "assistant", "tool", "assistant", "tool"]
            assert last[-1]["content"] == "ledger: looked up slowly"
            assert ledger.read_text().splitlines() == ["lookup fencing", "slow_lookup ledger"]
            events = await broker.events(s.run_id)
            replayed = [(e.attempt, e.data["seq"]) for e in of_type(events, "STEP_REPLAYED")]
            assert replayed == [(2, 1), (2, 2), (2, 3)]
        finally:
            stop(serve, w1, *([w2] if w2 else []))
            await r.aclose()
