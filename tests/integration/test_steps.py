"""The step loop against a real server: ledger replay (resume from the first
incomplete step), non-determinism detection, the llm agent with real tools."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from oao_testkit import fleet, make_spec, of_type, run_spec, wait_until

from oao_common.broker import Broker
from oao_common.spec import load_spec
from oao_scheduler.progress import wait_for_run
from oao_scheduler.submit import submit_spec


async def node_field(broker: Broker, rid: str, nid: str, field: str) -> str | None:
    return (await broker.get_nodes(rid, [nid]))[0].get(field)


async def _count(broker: Broker, rid: str, type_: str) -> int:
    return len(of_type(await broker.events(rid), type_))


async def test_resume_from_first_incomplete_step(broker: Broker, redis_url: str, tmp_path: Path) -> None:
    from proc import env, start_worker, stop

    ledger = tmp_path / "ledger.txt"
    marker = tmp_path / "block"
    marker.touch()
    spec = make_spec([{"id": "s", "agent": "steps"}, {"id": "t", "agent": "noop", "depends_on": ["s"]}])
    s = await submit_spec(broker, spec)

    # worker A (a real process) records two side-effect steps, then waits at the crash point
    extra = {"OAO_TEST_LEDGER": str(ledger), "OAO_TEST_BLOCK_MARKER": str(marker)}
    a = start_worker(
        redis_url, broker.keys.prefix, "--worker-id", "A", "--heartbeat-ttl", "1", extra_env=extra
    )
    try:
        await wait_until(lambda: node_field(broker, s.run_id, "s", "steps_recorded"), "2", 20)
        # A freezes (SIGSTOP): its heartbeat expires, and the reaper requeues its node
        a.send_signal(signal.SIGSTOP)
        await wait_until(lambda: broker.redis.exists(broker.keys.heartbeat("A")), 0, 10)
        assert (await broker.reap("A", max_requeues=5)).requeued == 1  # type: ignore[union-attr]

        # worker B resumes the node: steps 1-2 come from the ledger, step 3 runs live
        marker.unlink()
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env(**extra).items():
                if k.startswith("OAO_TEST_"):
                    mp.setenv(k, v)
            async with fleet(broker, workers=1):
                await wait_for_run(broker, s.run_id, interval_s=0.02, timeout_s=20)
        # A's frozen attempt wakes up now: every write it tries is fenced off
        a.send_signal(signal.SIGCONT)
        await wait_until(
            lambda: _count(broker, s.run_id, "STALE_ATTEMPT_REJECTED"), lambda n: n >= 1, 10, "a stale write"
        )
    finally:
        stop(a)

    assert ledger.read_text().splitlines() == ["a", "b", "c"]  # each side effect exactly once
    [node] = await broker.get_nodes(s.run_id, ["s"])
    assert node["status"] == "SUCCEEDED" and node["attempt"] == "2"
    assert node["replayed_steps"] == "2" and node["executed_steps"] == "1"
    assert json.loads(node["output"]) == "abc"
    ev = await broker.events(s.run_id)
    replayed = of_type(ev, "STEP_REPLAYED", node="s")
    assert [(e.attempt, e.data["seq"]) for e in replayed] == [(2, 1), (2, 2)]
    completed = of_type(ev, "STEP_COMPLETED", node="s")
    assert [(e.attempt, e.data["seq"]) for e in completed] == [(1, 1), (1, 2), (2, 3)]
    # the zombie's late step / completion was rejected, not applied
    assert of_type(ev, "STALE_ATTEMPT_REJECTED", node="s")
    assert len(of_type(ev, "NODE_SUCCEEDED", node="s")) == 1
    assert (await broker.get_run(s.run_id))["status"] == "SUCCEEDED"


async def test_nondeterminism_is_detected(broker: Broker) -> None:
    spec = make_spec([{"id": "c", "agent": "chatty"}])
    s = await submit_spec(broker, spec)
    [cj] = await broker.claim("w", "default", 1)
    # a previous attempt recorded step 1 with a different request
    assert await broker.record_step(
        "w", cj, 1, {"kind": "llm", "request_hash": "0" * 64, "result": {"content": "x"}}
    )
    await broker.handback("w")
    from oao_testkit import fleet

    from oao_scheduler.progress import wait_for_run

    async with fleet(broker):
        await wait_for_run(broker, s.run_id, interval_s=0.02, timeout_s=20)
    [node] = await broker.get_nodes(s.run_id, ["c"])
    err = json.loads(node["error"])
    assert node["status"] == "FAILED" and err["type"] == "NonDeterminismError"
    assert "c#1" in err["message"] and node["retries"] == "0"


async def test_llm_agent_blog_example(broker: Broker) -> None:
    spec = load_spec("examples/blog_post.yaml")
    rid = await run_spec(broker, spec, workers=2)
    assert (await broker.get_run(rid))["status"] == "SUCCEEDED"
    nodes = {n["id"]: n for n in await broker.get_nodes(rid, ["research", "draft", "critique", "polish"])}
    research = json.loads(nodes["research"]["output"])
    # the real notes.search tool found these sentences in examples/notes
    assert "Budgets cap the tokens, tool calls, wall time and money an agent may spend." in research
    assert json.loads(nodes["polish"]["output"]).startswith("# Why AI governance needs guardrails")
    assert nodes["research"]["tool_calls"] == "1" and nodes["research"]["steps"] == "3"
    assert nodes["research"]["state_history"] == "INIT,PLAN,EXECUTE,REVIEW,PLAN,REVIEW,TERMINATE"
    steps = await broker.get_steps(rid)
    tool_step = steps["research:2"]
    assert tool_step["kind"] == "tool" and tool_step["name"] == "notes.search"
    assert tool_step["result"]["ok"] and len(tool_step["result"]["value"]) == 4
    ev = await broker.events(rid)
    assert len(of_type(ev, "STATE_ENTER", node="research")) == 7
    run = await broker.get_run(rid)
    assert int(run["tokens_in"]) > 0 and run["tool_calls"] == "3" and run["steps"] == "10"


async def test_tool_outside_allow_list_is_a_policy_violation(broker: Broker) -> None:
    spec = make_spec(
        [{"id": "x", "agent": "caller"}],
        models={
            "m": {
                "provider": "scripted",
                "replies": [{"content": "", "tool_calls": [{"name": "side_effect", "args": {"label": "z"}}]}],
            }
        },
        agents={"caller": {"kind": "llm", "model": "m", "tools": []}},
    )
    rid = await run_spec(broker, spec)
    [node] = await broker.get_nodes(rid, ["x"])
    err = json.loads(node["error"])
    assert node["status"] == "FAILED" and err["rule"] == "tool_not_allowed"


async def _interrupted_tool_call(broker: Broker, tool: str) -> str:
    """Submit a one-node run whose agent calls ``tool``; an earlier attempt wrote the
    step's started-marker and died before recording a result (modelled with the
    broker's own calls); the job is then back in its ready list."""
    spec = make_spec(
        [{"id": "n", "agent": "eff", "task": tool}],
        agents={
            "eff": {
                "kind": "python",
                "entrypoint": "oao_test_agents:one_effect",
                "tools": ["ext", "ext_idem"],
            }
        },
        tools={
            "ext": {"entrypoint": "oao_test_agents:ext_ledger"},
            "ext_idem": {"entrypoint": "oao_test_agents:ext_ledger", "idempotent": True},
        },
        defaults={"retry": {"max_retries": 0}},
    )
    s = await submit_spec(broker, spec)
    [c] = await broker.claim("dead", "default", 1)
    marker = {"kind": "tool", "name": tool, "request_hash": "h", "attempt": 1, "idempotent": False}
    assert await broker.begin_step("dead", c, 1, marker)
    assert await broker.handback("dead") == 1
    return s.run_id


async def test_unrecorded_non_idempotent_call_is_not_repeated(
    broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OAO_TEST_LEDGER", str(tmp_path / "ledger.txt"))
    rid = await _interrupted_tool_call(broker, "ext")
    async with fleet(broker):
        await wait_for_run(broker, rid, interval_s=0.02, timeout_s=20)
    [n] = await broker.get_nodes(rid, ["n"])
    err = json.loads(n["error"])
    assert n["status"] == "FAILED" and err["type"] == "UncertainSideEffect"
    assert "may have happened" in err["message"]
    assert not (tmp_path / "ledger.txt").exists()  # not executed a second time


async def test_unrecorded_idempotent_call_runs_again_with_the_same_key(
    broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from oao_worker.context import tool_idempotency_key

    ledger = tmp_path / "ledger.txt"
    monkeypatch.setenv("OAO_TEST_LEDGER", str(ledger))
    rid = await _interrupted_tool_call(broker, "ext_idem")
    async with fleet(broker):
        await wait_for_run(broker, rid, interval_s=0.02, timeout_s=20)
    [n] = await broker.get_nodes(rid, ["n"])
    assert n["status"] == "SUCCEEDED"
    key, attempt, _step, label = ledger.read_text().split()
    assert key == tool_idempotency_key(rid, "n", "ext_idem", {"label": "once"}, 1)
    assert (attempt, label) == ("2", "once")
    started = of_type(await broker.events(rid), "STEP_STARTED")
    assert [e.data["retry_of_attempt"] for e in started] == [1]
