"""Governance against a real server: shared run budgets by reservation, mid-stream
limits, costs, allow/deny-lists, failure rules, and cancel that stops running nodes."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import pytest
from oao_testkit import fleet, make_spec, of_type, run_spec, wait_until

from oao_common.broker import Broker
from oao_scheduler.progress import wait_for_run
from oao_scheduler.submit import submit_spec

AGENTS = {
    "one": {"kind": "python", "entrypoint": "oao_test_agents:one_call", "model": "m"},
    "noop": {"kind": "python", "entrypoint": "oao_test_agents:noop"},
    "sleeper": {"kind": "python", "entrypoint": "oao_test_agents:sleeper"},
    "broken": {"kind": "python", "entrypoint": "oao_test_agents:broken"},
}
NO_RETRY = {"retry": {"max_retries": 0}}


def model(reply: str, delay: float = 0.0, **kw: object) -> dict[str, object]:
    return {"m": {"provider": "scripted", "replies": [reply], "reply_delay_s": delay, **kw}}


async def test_two_nodes_race_for_the_last_of_a_run_budget(broker: Broker) -> None:
    # each call reserves ~2 input + 200 output tokens; the run has room for one
    spec = make_spec(
        [{"id": "a", "agent": "one", "task": "200"}, {"id": "b", "agent": "one", "task": "200"}],
        agents=AGENTS,
        models=model("short answer", delay=0.3),
        policy={"max_tokens": 300},
        defaults=NO_RETRY,
    )
    rid = await run_spec(broker, spec, workers=2, concurrency=1)
    nodes = await broker.get_nodes(rid, ["a", "b"])
    assert sorted(n["status"] for n in nodes) == ["FAILED", "SUCCEEDED"]
    [failed] = [n for n in nodes if n["status"] == "FAILED"]
    err = json.loads(failed["error"])
    assert err["rule"] == "max_tokens" and err["scope"] == "run" and err["limit"] == 300
    assert err["value"] > 300
    assert "run budget" in err["reason"]
    run = await broker.get_run(rid)
    assert int(run["tokens_in"]) + int(run["tokens_out"]) <= 300
    assert int(run["res_in"]) == 0 and int(run["res_out"]) == 0  # settled, nothing leaked
    # both calls really overlapped: the loser was refused while the winner was in flight
    ev = await broker.events(rid)
    started = sorted(e.ts_ms for e in of_type(ev, "NODE_STARTED"))
    winner_done = of_type(ev, "NODE_SUCCEEDED")[0].ts_ms
    assert started[1] < winner_done


async def test_run_budget_stops_a_stream_midway(broker: Broker) -> None:
    long_reply = "word " * 2000  # ~2500 tokens, streamed in 8-token chunks
    spec = make_spec(
        [{"id": "a", "agent": "one", "task": "0"}],
        agents=AGENTS,
        models=model(long_reply),
        policy={"max_output_tokens": 1200},
        defaults=NO_RETRY,
    )
    rid = await run_spec(broker, spec)
    [n] = await broker.get_nodes(rid, ["a"])
    err = json.loads(n["error"])
    assert n["status"] == "FAILED" and err["rule"] == "max_output_tokens" and err["scope"] == "run"
    # the reservation was extended chunk by chunk (512 tokens each) and refused past 1200
    assert err["value"] == 1536
    ev = await broker.events(rid)
    assert of_type(ev, "POLICY_VIOLATION")[0].data["scope"] == "run"
    assert int((await broker.get_run(rid))["res_out"]) == 0


async def test_costs_are_recorded_and_capped(broker: Broker) -> None:
    priced = model("x" * 400, pricing={"input_usd_per_mtok": 1000.0, "output_usd_per_mtok": 2000.0})
    ok = make_spec([{"id": "a", "agent": "one", "task": "0"}], agents=AGENTS, models=priced)
    rid = await run_spec(broker, ok)
    [n] = await broker.get_nodes(rid, ["a"])
    # 100 output tokens at $2000/M + input tokens at $1000/M
    expected = (int(n["tokens_in"]) * 1000 + int(n["tokens_out"]) * 2000) / 1e6
    assert abs(float(n["cost_usd"]) - expected) < 1e-9 and float(n["cost_usd"]) > 0.2
    assert abs(float((await broker.get_run(rid))["cost_usd"]) - expected) < 1e-9
    capped = make_spec(
        [{"id": "a", "agent": "one", "task": "0", "policy": {"max_cost_usd": 0.1}}],
        agents=AGENTS,
        models=priced,
        defaults=NO_RETRY,
    )
    rid = await run_spec(broker, capped)
    [n] = await broker.get_nodes(rid, ["a"])
    err = json.loads(n["error"])
    assert n["status"] == "FAILED" and err["rule"] == "max_cost_usd" and err["value"] > 0.1


async def test_input_and_output_token_limits(broker: Broker) -> None:
    spec = make_spec(
        [{"id": "a", "agent": "one", "task": "0", "policy": {"max_output_tokens": 10}}],
        agents=AGENTS,
        models=model("y" * 400),
        defaults=NO_RETRY,
    )
    rid = await run_spec(broker, spec)
    [n] = await broker.get_nodes(rid, ["a"])
    assert json.loads(n["error"])["rule"] == "max_output_tokens"


async def test_deny_list_wins_over_allow_list(broker: Broker) -> None:
    spec = make_spec(
        [{"id": "a", "agent": "d"}],
        agents={
            "d": {
                "kind": "python",
                "entrypoint": "oao_test_agents:call_denied_tool",
                "tools": ["side_effect"],
                "deny_tools": ["side_effect"],
            }
        },
        defaults=NO_RETRY,
    )
    rid = await run_spec(broker, spec)
    [n] = await broker.get_nodes(rid, ["a"])
    err = json.loads(n["error"])
    assert err["rule"] == "tool_not_allowed" and "denied: side_effect" in err["reason"]


async def test_critical_node_failure_fails_run_and_stops_the_rest(broker: Broker) -> None:
    spec = make_spec(
        [
            {"id": "crit", "agent": "broken", "priority": 9},
            {"id": "slow", "agent": "sleeper", "task": "30"},
            {"id": "later", "agent": "noop", "depends_on": ["slow"]},
        ],
        agents=AGENTS,
        defaults=NO_RETRY,
    )
    async with fleet(broker, workers=1, concurrency=2) as [w]:
        s = await submit_spec(broker, spec)
        await wait_for_run(broker, s.run_id, interval_s=0.02, timeout_s=15)
        for _ in range(200):  # the running sleeper is stopped, not left to run 30 s
            if not w._inflight:
                break
            await asyncio.sleep(0.05)
        assert not w._inflight
    run = await broker.get_run(s.run_id)
    assert run["status"] == "FAILED"
    nodes = {n["id"]: n["status"] for n in await broker.get_nodes(s.run_id, ["crit", "slow", "later"])}
    assert nodes == {"crit": "FAILED", "slow": "CANCELLED", "later": "CANCELLED"}
    [ev] = of_type(await broker.events(s.run_id), "RUN_FAILED")
    assert ev.data["critical_node"] == "crit"
    assert await broker.redis.llen(broker.keys.active(w.id)) == 0


async def test_partial_completion_and_failure_ratio(broker: Broker) -> None:
    nodes = [{"id": "bad", "agent": "broken", "critical": False}] + [
        {"id": f"ok{i}", "agent": "noop"} for i in range(3)
    ]
    partial = make_spec(nodes, agents=AGENTS, defaults=NO_RETRY, failure={"allow_partial_completion": True})
    rid = await run_spec(broker, partial)
    assert (await broker.get_run(rid))["status"] == "PARTIAL"
    assert of_type(await broker.events(rid), "RUN_PARTIAL")
    strict = make_spec(nodes, agents=AGENTS, defaults=NO_RETRY)
    assert (await broker.get_run(await run_spec(broker, strict)))["status"] == "FAILED"
    ratio = make_spec(
        nodes,
        agents=AGENTS,
        defaults=NO_RETRY,
        failure={"allow_partial_completion": True, "max_failure_ratio": 0.2},
    )
    assert (await broker.get_run(await run_spec(broker, ratio)))["status"] == "FAILED"


async def test_cancel_stops_in_flight_nodes_without_waiting_for_their_step(broker: Broker) -> None:
    spec = make_spec(
        [{"id": "a", "agent": "one", "task": "0"}, {"id": "b", "agent": "one", "task": "0"}],
        agents=AGENTS,
        models=model("late", delay=60),
    )
    async with fleet(broker, workers=1, concurrency=2) as [w]:
        s = await submit_spec(broker, spec)
        await wait_until(lambda: w.inflight, 2, 10, "two nodes in flight")
        assert await broker.cancel(s.run_id) == 2

        async def inflight_and_active() -> tuple[int, int]:
            return w.inflight, await broker.redis.llen(broker.keys.active(w.id))

        # stopped inside a 60 s model call, and their jobs left the active list
        await wait_until(inflight_and_active, (0, 0), 10, "cancelled nodes to stop")
    assert [n["status"] for n in await broker.get_nodes(s.run_id, ["a", "b"])] == ["CANCELLED"] * 2
    assert int((await broker.get_run(s.run_id)).get("res_out") or 0) == 0


async def test_model_call_retries_inside_the_step(broker: Broker) -> None:
    from openai_server import OpenAIStubServer

    with OpenAIStubServer() as server:
        server.reply_error(503, "overloaded")
        server.reply_error(429, "slow down", retry_after="0")
        server.reply_text("finally")
        spec = make_spec(
            [{"id": "a", "agent": "one", "task": "50"}],
            agents=AGENTS,
            models={"m": {"provider": "openai", "model": "gpt-4o-mini", "base_url": server.base_url}},
            defaults={"retry": {"max_retries": 3, "retry_delay_s": 0.01, "jitter": False}},
        )
        rid = await run_spec(broker, spec)
    [n] = await broker.get_nodes(rid, ["a"])
    assert n["status"] == "SUCCEEDED" and json.loads(n["output"]) == "finally"
    assert n["attempt"] == "1" and n["retries"] == "0"  # the node never restarted
    retried = of_type(await broker.events(rid), "STEP_RETRIED")
    assert [e.data["retry"] for e in retried] == [1, 2]
    assert "503" in retried[0].data["error"] and "429" in retried[1].data["error"]
    assert float(n["cost_usd"]) > 0  # priced from the default table (gpt-4o-mini)


async def test_run_timeout_bounds_every_node(broker: Broker) -> None:
    spec = make_spec(
        [{"id": "s", "agent": "sleeper", "task": "30", "policy": {"timeout_s": 60}}],
        agents=AGENTS,
        policy={"timeout_s": 0.3},
        defaults=NO_RETRY,
    )
    rid = await run_spec(broker, spec)
    [n] = await broker.get_nodes(rid, ["s"])
    err = json.loads(n["error"])
    assert err["rule"] == "timeout_s" and err["scope"] == "run" and err["limit"] == 0.3


async def test_rate_limit_is_shared_by_the_fleet(broker: Broker) -> None:
    spec = make_spec(
        [{"id": f"n{i}", "agent": "one", "task": "20"} for i in range(4)],
        agents=AGENTS,
        models=model("ok", delay=0.2, rate_limit={"max_concurrent": 1}),
    )
    rid = await run_spec(broker, spec, workers=2, concurrency=2)
    assert (await broker.get_run(rid))["status"] == "SUCCEEDED"
    ev = await broker.events(rid)
    waits = of_type(ev, "RATE_LIMIT_WAIT")
    assert waits and all(w.data["key"] == "model:m" for w in waits)
    # one model call at a time across both workers: each call sleeps 200 ms, so when
    # they are serialized their ends are at least ~200 ms apart (sleep never shortens)
    ends = sorted(e.ts_ms for e in of_type(ev, "STEP_COMPLETED"))
    assert all(b - a >= 190 for a, b in itertools.pairwise(ends)), ends


async def test_open_circuit_fails_fast_without_calling_the_model(broker: Broker) -> None:
    from openai_server import OpenAIStubServer

    with OpenAIStubServer() as server:
        for _ in range(4):
            server.reply_error(500, "down")
        models = {
            "m": {
                "provider": "openai",
                "model": "gpt-4o-mini",
                "base_url": server.base_url,
                "circuit_breaker": {"min_calls": 2, "failure_ratio": 0.5, "cool_down_s": 60},
            }
        }
        spec = make_spec(
            [{"id": "a", "agent": "one", "task": "5"}],
            agents=AGENTS,
            models=models,
            defaults={"retry": {"max_retries": 1, "retry_delay_s": 0.01, "jitter": False}},
        )
        rid = await run_spec(broker, spec)
        # attempt 1: the call and its in-step retry both got 500, which opened the circuit;
        # attempt 2 (the node retry) was refused by the open circuit without a request
        assert len(server.requests) == 2
        # another run's node is refused at once too: the circuit is fleet-wide state
        other = make_spec(
            [{"id": "b", "agent": "one", "task": "5"}], agents=AGENTS, models=models, defaults=NO_RETRY
        )
        rid2 = await run_spec(broker, other)
        assert len(server.requests) == 2
    ev = await broker.events(rid)
    [sched] = of_type(ev, "NODE_RETRY_SCHEDULED")
    assert "500" in sched.data["error"]["message"]
    [a] = await broker.get_nodes(rid, ["a"])
    assert a["status"] == "FAILED" and a["attempt"] == "2"
    assert json.loads(a["error"])["type"] == "CircuitOpenError"
    [b] = await broker.get_nodes(rid2, ["b"])
    err = json.loads(b["error"])
    assert b["status"] == "FAILED" and err["type"] == "CircuitOpenError" and "model:m" in err["message"]


async def test_max_parallel_nodes_holds_across_workers(broker: Broker) -> None:
    spec = make_spec(
        [{"id": f"n{i}", "agent": "sleeper", "task": "0.15"} for i in range(6)],
        agents=AGENTS,
        policy={"max_parallel_nodes": 2},
    )
    rid = await run_spec(broker, spec, workers=2, concurrency=4)
    assert (await broker.get_run(rid))["status"] == "SUCCEEDED"
    ev = await broker.events(rid)
    running = peak = 0
    for e in ev:  # the stream is a total order of what happened
        if e.type == "NODE_STARTED":
            running += 1
            peak = max(peak, running)
        elif e.type == "NODE_SUCCEEDED":
            running -= 1
    assert peak == 2
    assert of_type(ev, "NODE_PARKED")  # held back, not spun on
    assert await broker.redis.llen(broker.keys.parked(rid)) == 0
    assert (await broker.get_run(rid))["running"] == "0"


@pytest.mark.parametrize(
    ("agent", "task", "policy", "rule", "executed"),
    [
        ("calls", "5", {"max_steps": 3}, "max_steps", 3),
        ("tools", "5", {"max_tool_calls": 2}, "max_tool_calls", 2),
        ("calls", "5", {"max_input_tokens": 20}, "max_input_tokens", 3),  # 6 tokens a call
    ],
)
async def test_node_limits_stop_before_the_step(
    broker: Broker,
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
    agent: str,
    task: str,
    policy: dict[str, int],
    rule: str,
    executed: int,
) -> None:
    monkeypatch.setenv("OAO_TEST_LEDGER", str(tmp_path / "ledger.txt"))
    spec = make_spec(
        [{"id": "n", "agent": agent, "task": task, "policy": policy}],
        agents={
            "calls": {"kind": "python", "entrypoint": "oao_test_agents:many_calls", "model": "m"},
            "tools": {"kind": "python", "entrypoint": "oao_test_agents:many_tools", "tools": ["side_effect"]},
        },
        models=model("fine"),
        defaults=NO_RETRY,
    )
    rid = await run_spec(broker, spec)
    [n] = await broker.get_nodes(rid, ["n"])
    err = json.loads(n["error"])
    assert n["status"] == "FAILED" and err["rule"] == rule, err
    assert n["executed_steps"] == str(executed)  # the violating step never ran
    if agent == "tools":
        assert (tmp_path / "ledger.txt").read_text().splitlines() == ["0", "1"]


async def test_run_cost_budget_is_shared(broker: Broker) -> None:
    priced = model("x" * 40, pricing={"input_usd_per_mtok": 10000.0, "output_usd_per_mtok": 10000.0})
    # each call reserves ~(2 + 50) tokens at $0.01/1k = ~$0.52; the run has room for one
    spec = make_spec(
        [{"id": "a", "agent": "one", "task": "50"}, {"id": "b", "agent": "one", "task": "50"}],
        agents=AGENTS,
        models={"m": {**priced["m"], "reply_delay_s": 0.3}},
        policy={"max_cost_usd": 0.8},
        defaults=NO_RETRY,
    )
    rid = await run_spec(broker, spec, workers=2, concurrency=1)
    nodes = await broker.get_nodes(rid, ["a", "b"])
    assert sorted(n["status"] for n in nodes) == ["FAILED", "SUCCEEDED"]
    [failed] = [n for n in nodes if n["status"] == "FAILED"]
    err = json.loads(failed["error"])
    assert err["rule"] == "max_cost_usd" and err["scope"] == "run"
    assert float((await broker.get_run(rid))["cost_usd"]) <= 0.8
