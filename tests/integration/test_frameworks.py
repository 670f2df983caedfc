"""The framework adapters (``kind: langgraph``, ``kind: langchain``) with the real
``langgraph`` and ``langchain-core`` packages, on a real server, with OAO's scripted model
wrapped as a LangChain chat model: every model and tool call of the graph is a governed,
recorded OAO step; budgets stop a graph mid-stream; denied and ungoverned calls are
refused; LangGraph's state, reducers, conditional edges, ``Send`` fan-out, subgraphs and
interrupts work; a full replay reproduces a LangGraph run with nothing live. The SIGKILL
case is in tests/chaos/test_frameworks_kill.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("langgraph")
pytest.importorskip("langchain_core")

from oao_testkit import fleet, make_spec, of_type, run_spec, wait_until
from proc import cli

from oao_common.broker import Broker
from oao_scheduler.replay import normalized_trace, replay, verify_replay

TOOLS = {
    "lookup": {"entrypoint": "lg_graphs:lookup", "idempotent": True},
}
REACT_REPLIES = [
    {"content": "", "tool_calls": [{"name": "lookup", "args": {"term": "governance"}}]},
    {"content": "", "tool_calls": [{"name": "word_count", "args": {"text": "{{ tool_results[0] }}"}}]},
    "Governance is {{ tool_results[0] }} words of control.",
]


@pytest.fixture(autouse=True)
def ledger_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "effects.log"
    monkeypatch.setenv("OAO_TEST_LEDGER", str(path))
    return path


def effects(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def scripted(replies: list[Any], **kw: Any) -> dict[str, Any]:
    return {"m": {"provider": "scripted", "replies": replies, **kw}}


def graph_agent(entrypoint: str, **kw: Any) -> dict[str, Any]:
    return {"g": {"kind": "langgraph", "entrypoint": entrypoint, "model": "m", **kw}}


async def node(broker: Broker, rid: str, nid: str = "a") -> dict[str, Any]:
    [n] = await broker.get_nodes(rid, [nid])
    return {
        **n,
        "output": json.loads(n.get("output") or "null"),
        "error": json.loads(n["error"]) if n.get("error") else None,
    }


async def steps(broker: Broker, rid: str, nid: str = "a") -> list[tuple[str, str]]:
    recs = await broker.get_steps(rid)
    keys = sorted(
        (k for k in recs if k.startswith(f"{nid}:") and k.count(":") == 1), key=lambda k: int(k[2:])
    )
    return [(recs[k]["kind"], recs[k]["name"]) for k in keys]


# ----------------------------------------------------------------- ReAct graph


async def test_react_graph_every_model_and_tool_call_is_a_recorded_step(
    broker: Broker, ledger_file: Path
) -> None:
    spec = make_spec(
        [{"id": "a", "agent": "g", "task": "What is governance?"}],
        models=scripted(REACT_REPLIES),
        agents=graph_agent("lg_graphs:react", output_key="messages"),
        tools=TOOLS,
    )
    rid = await run_spec(broker, spec)
    n = await node(broker, rid)
    assert n["status"] == "SUCCEEDED", n["error"]
    assert n["output"] == "Governance is 5 words of control."
    assert await steps(broker, rid) == [
        ("llm", "m"),
        ("tool", "lookup"),  # a spec tool handed to the graph factory
        ("llm", "m"),
        ("tool", "word_count"),  # the graph's own tool, governed
        ("llm", "m"),
    ]
    assert effects(ledger_file) == ["lookup governance", "word_count governance: a term of art"]
    recs = await broker.get_steps(rid)
    assert recs["a:4"]["result"] == {"ok": True, "value": {"content": "5", "status": "success"}}
    assert recs["a:4"]["idempotency_key"]
    events = await broker.events(rid)
    assert [e.data["graph_node"] for e in of_type(events, "GRAPH_NODE_COMPLETED")] == [
        "agent",
        "tools",
        "agent",
        "tools",
        "agent",
    ]
    states = [e.data["state"] for e in of_type(events, "STATE_ENTER")]
    assert states == [
        "INIT",
        "PLAN",
        "EXECUTE",
        "REVIEW",
        "PLAN",
        "EXECUTE",
        "REVIEW",
        "PLAN",
        "REVIEW",
        "TERMINATE",
    ]
    run = await broker.get_run(rid)
    assert (run["steps"], run["tool_calls"]) == ("5", "2")
    assert int(run["tokens_in"]) > 0 and int(run["tokens_out"]) > 0


async def test_parallel_tool_calls_of_one_reply_are_steps_in_call_order(
    broker: Broker, ledger_file: Path
) -> None:
    both = [
        {"name": "word_count", "args": {"text": "one two three"}},
        {"name": "lookup", "args": {"term": "fencing"}},
    ]
    spec = make_spec(
        [{"id": "a", "agent": "g", "task": "Do both"}],
        models=scripted([{"content": "", "tool_calls": both}, "{{ tool_results }}"]),
        agents=graph_agent("lg_graphs:react", output_key="messages"),
        tools=TOOLS,
    )
    rid = await run_spec(broker, spec)
    n = await node(broker, rid)
    assert n["status"] == "SUCCEEDED", n["error"]
    assert await steps(broker, rid) == [
        ("llm", "m"),
        ("tool", "word_count"),
        ("tool", "lookup"),
        ("llm", "m"),
    ]
    assert n["output"] == '[3, "fencing: a term of art"]'


async def test_sync_graph_nodes_run_their_calls_on_the_worker_loop(broker: Broker) -> None:
    spec = make_spec(
        [{"id": "a", "agent": "g", "task": "What is governance?"}],
        models=scripted([REACT_REPLIES[0], "Done: {{ tool_results[0] }}"]),
        agents=graph_agent("lg_graphs:sync_react", output_key="messages"),
        tools=TOOLS,
    )
    rid = await run_spec(broker, spec)
    n = await node(broker, rid)
    assert n["status"] == "SUCCEEDED", n["error"]
    assert n["output"] == "Done: governance: a term of art"
    assert await steps(broker, rid) == [("llm", "m"), ("tool", "lookup"), ("llm", "m")]


async def test_token_budget_stops_a_streaming_graph_mid_stream_and_is_not_retried(
    broker: Broker, ledger_file: Path
) -> None:
    long_reply = "word " * 200  # 1000 characters: 250 tokens, streamed 2 tokens a chunk
    spec = make_spec(
        [{"id": "a", "agent": "g", "task": "Explain", "policy": {"max_tokens": 120}}],
        models=scripted([REACT_REPLIES[0], long_reply], chunk_tokens=2),
        agents=graph_agent("lg_graphs:streaming_react"),
        tools=TOOLS,
        defaults={"retry": {"max_retries": 3, "retry_delay_s": 0.01}},
    )
    rid = await run_spec(broker, spec)
    n = await node(broker, rid)
    assert n["status"] == "FAILED"
    assert n["attempt"] == "1" and n["retries"] == "0"  # OAO does not retry it
    err = n["error"]
    assert (err["type"], err["rule"], err["limit"]) == ("PolicyViolation", "max_tokens", 120)
    assert 120 < err["value"] < 120 + 10  # stopped at the chunk that crossed, not at the end
    [v] = of_type(await broker.events(rid), "POLICY_VIOLATION")
    assert v.data["rule"] == "max_tokens"
    lines = effects(ledger_file)
    chunks = [ln for ln in lines if ln.startswith("chunk ") and ln != "chunk 0"]
    assert 0 < len(chunks) < 100, "the graph saw some of the stream, not all of it"
    # the graph's own RetryPolicy ran the node again (3 attempts of its second run): the
    # latched violation stopped each retry before any new model call
    assert lines.count("agent") == 1 + 3
    assert await steps(broker, rid) == [("llm", "m"), ("tool", "lookup")]
    assert lines.count("lookup governance") == 1


async def test_denied_tool_is_refused_with_a_policy_violation(broker: Broker, ledger_file: Path) -> None:
    spec = make_spec(
        [{"id": "a", "agent": "g", "task": "Clean up"}],
        models=scripted(
            [{"content": "", "tool_calls": [{"name": "delete_files", "args": {"path": "/"}}]}, "ok"]
        ),
        agents=graph_agent("lg_graphs:react", deny_tools=["delete_files"]),
        tools=TOOLS,
        defaults={"retry": {"max_retries": 3, "retry_delay_s": 0.01}},
    )
    rid = await run_spec(broker, spec)
    n = await node(broker, rid)
    assert n["status"] == "FAILED" and n["attempt"] == "1"
    assert (n["error"]["type"], n["error"]["rule"]) == ("PolicyViolation", "tool_not_allowed")
    assert "delete_files" in n["error"]["message"]
    assert effects(ledger_file) == []  # never ran
    assert await steps(broker, rid) == [("llm", "m")]


async def test_allow_list_refuses_the_other_tools(broker: Broker, ledger_file: Path) -> None:
    spec = make_spec(
        [{"id": "a", "agent": "g", "task": "What is governance?"}],
        models=scripted(REACT_REPLIES),
        agents=graph_agent("lg_graphs:react", tools=["lookup"]),
        tools=TOOLS,
    )
    rid = await run_spec(broker, spec)
    n = await node(broker, rid)
    assert n["status"] == "FAILED" and n["error"]["rule"] == "tool_not_allowed"
    assert effects(ledger_file) == ["lookup governance"]  # word_count is not on the list


async def test_a_chat_model_that_is_not_oaos_is_refused(broker: Broker) -> None:
    spec = make_spec(
        [{"id": "a", "agent": "g", "task": "Hi"}],
        models=scripted(["unused"]),
        agents=graph_agent("lg_graphs:ungoverned"),
    )
    rid = await run_spec(broker, spec)
    n = await node(broker, rid)
    assert n["status"] == "FAILED" and n["attempt"] == "1"
    assert (n["error"]["type"], n["error"]["rule"]) == ("PolicyViolation", "ungoverned_call")
    assert "GenericFakeChatModel" in n["error"]["message"]


# ----------------------------------------------------------------- LangGraph state


FANOUT_REPLIES = ["alpha\nbeta\ngamma", "Section on {{ last[19:] }} (call {{ turn }})"]


async def test_send_fan_out_runs_branches_in_a_deterministic_order(broker: Broker) -> None:
    spec = make_spec(
        [
            {"id": "a", "agent": "g", "task": "AI safety"},
            {"id": "b", "agent": "g", "task": "AI safety"},
        ],
        models=scripted(FANOUT_REPLIES),
        agents=graph_agent("lg_graphs:fanout", input_key="topic", output_key="summary"),
    )
    rid = await run_spec(broker, spec)
    a, b = await node(broker, rid, "a"), await node(broker, rid, "b")
    assert a["status"] == b["status"] == "SUCCEEDED", (a["error"], b["error"])
    assert a["output"] == (
        "3 sections: Section on alpha (call 1) | Section on beta (call 2) | Section on gamma (call 3)"
    )
    recs = await broker.get_steps(rid)
    # the sections were asked in Send order, in both nodes: same requests, same hashes
    assert [recs[f"a:{i}"]["result"]["content"] for i in (2, 3, 4)] == [
        "Section on alpha (call 1)",
        "Section on beta (call 2)",
        "Section on gamma (call 3)",
    ]
    assert [recs[f"a:{i}"]["request_hash"] for i in (1, 2, 3, 4)] == [
        recs[f"b:{i}"]["request_hash"] for i in (1, 2, 3, 4)
    ]
    events = await broker.events(rid)
    assert [e.data["graph_node"] for e in of_type(events, "GRAPH_NODE_COMPLETED", node="a")] == [
        "plan",
        "write",
        "write",
        "write",
        "combine",
    ]


async def test_pydantic_state_subgraph_and_conditional_edge(broker: Broker) -> None:
    spec = make_spec(
        [{"id": "a", "agent": "g", "task": "why govern agents"}],
        models=scripted(["notes on {{ last[10:] }}", "Answer: {{ last }}"]),
        agents=graph_agent("lg_graphs:nested", input_key="question", output_key="answer"),
    )
    rid = await run_spec(broker, spec)
    n = await node(broker, rid)
    assert n["status"] == "SUCCEEDED", n["error"]
    assert n["output"] == "Answer: Answer why govern agents from notes on why govern agents"
    events = await broker.events(rid)
    done = [(e.data["path"], e.data["graph_node"]) for e in of_type(events, "GRAPH_NODE_COMPLETED")]
    assert done == [("researcher", "research"), ("", "researcher"), ("", "answer")]


async def test_whole_state_output_is_json_without_message_ids(broker: Broker) -> None:
    spec = make_spec(
        [{"id": "a", "agent": "g", "task": "why"}],
        models=scripted(["notes", "final"]),
        agents=graph_agent("lg_graphs:nested", input_key="question"),
    )
    rid = await run_spec(broker, spec)
    n = await node(broker, rid)
    assert n["status"] == "SUCCEEDED", n["error"]
    assert n["output"] == {
        "question": "why",
        "notes": ["notes"],
        "messages": [{"role": "assistant", "content": "notes"}],
        "answer": "final",
    }


async def test_interrupts_fail_resume_or_end_the_node(broker: Broker) -> None:
    models = scripted(["done after {{ last }}"])
    nodes = [{"id": "a", "agent": "ask", "task": "deploy"}, {"id": "b", "agent": "yes", "task": "deploy"}]
    nodes.append({"id": "c", "agent": "out", "task": "deploy"})
    agents = {
        "ask": {"kind": "langgraph", "entrypoint": "lg_graphs:approval", "output_key": "result"},
        "yes": {
            "kind": "langgraph",
            "entrypoint": "lg_graphs:approval",
            "output_key": "result",
            "resume": ["yes"],
        },
        "out": {"kind": "langgraph", "entrypoint": "lg_graphs:approval", "on_interrupt": "output"},
    }
    rid = await run_spec(broker, make_spec(nodes, models=models, agents=agents))
    a, b, c = [await node(broker, rid, x) for x in "abc"]
    assert a["status"] == "FAILED" and a["error"]["type"] == "GraphInterrupted" and a["attempt"] == "1"
    assert b["status"] == "SUCCEEDED" and b["output"] == "done after yes: deploy"
    assert c["status"] == "SUCCEEDED"
    assert c["output"] == {"interrupted": [{"question": "approve deploy?"}], "state": {"task": "deploy"}}
    events = await broker.events(rid)
    assert [e.data for e in of_type(events, "GRAPH_INTERRUPTED", node="b")] == [
        {"value": {"question": "approve deploy?"}}
    ]
    assert [e.data for e in of_type(events, "GRAPH_RESUMED", node="b")] == [{"value": "yes"}]
    assert of_type(events, "GRAPH_INTERRUPTED", node="a")


# ----------------------------------------------------------------- LangChain runnables


async def test_langchain_chain_and_executor(broker: Broker, ledger_file: Path) -> None:
    nodes = [
        {"id": "a", "agent": "chain", "task": "Say hi"},
        {"id": "b", "agent": "exec", "task": "Look it up"},
    ]
    agents = {
        "chain": {"kind": "langchain", "entrypoint": "lg_graphs:chain", "model": "m"},
        "exec": {"kind": "langchain", "entrypoint": "lg_graphs:executor", "model": "m", "tools": ["lookup"]},
    }
    models = {
        "m": {
            "provider": "scripted",
            "by_node": {
                "a": ["hi ({{ last }})"],
                "b": [REACT_REPLIES[0], "Found: {{ tool_results[0] }}"],
            },
        }
    }
    rid = await run_spec(broker, make_spec(nodes, models=models, agents=agents, tools=TOOLS))
    a, b = await node(broker, rid, "a"), await node(broker, rid, "b")
    assert a["status"] == "SUCCEEDED" and a["output"] == "hi (Say hi)"
    assert b["status"] == "SUCCEEDED" and b["output"] == "Found: governance: a term of art"
    assert await steps(broker, rid, "b") == [("llm", "m"), ("tool", "lookup"), ("llm", "m")]
    assert effects(ledger_file) == ["lookup governance"]


# ----------------------------------------------------------------- replay


async def test_full_replay_of_a_langgraph_run_reproduces_it_with_nothing_live(
    broker: Broker, ledger_file: Path
) -> None:
    nodes = [
        {"id": "react", "agent": "react", "task": "What is governance?"},
        {"id": "fan", "agent": "fan", "task": "{{ nodes.react.output }}", "depends_on": ["react"]},
        {"id": "ok", "agent": "ok", "task": "ship it", "depends_on": ["react"]},
    ]
    agents = {
        "react": {
            "kind": "langgraph",
            "entrypoint": "lg_graphs:react",
            "model": "m",
            "output_key": "messages",
        },
        "fan": {"kind": "langgraph", "entrypoint": "lg_graphs:fanout", "input_key": "topic"},
        "ok": {"kind": "langgraph", "entrypoint": "lg_graphs:approval", "resume": ["approved"]},
    }
    models = {
        "m": {
            "provider": "scripted",
            "by_node": {"react": REACT_REPLIES, "fan": FANOUT_REPLIES, "ok": ["{{ last }}, done"]},
        }
    }
    rid = await run_spec(broker, make_spec(nodes, models=models, agents=agents, tools=TOOLS))
    assert (await broker.get_run(rid))["status"] == "SUCCEEDED"
    done = effects(ledger_file)
    assert len(done) == 2

    r = await replay(broker, rid)
    assert r.strict and r.seeded == {"react": 5, "fan": 4, "ok": 1}
    async with fleet(broker):
        await wait_until(lambda: broker.run_is_terminal(r.run_id), True, 30, "the replay to end")
    assert await verify_replay(broker, rid, r.run_id) == []
    assert effects(ledger_file) == done, "a tool ran live in the replay"
    run = await broker.get_run(r.run_id)
    assert run["status"] == "SUCCEEDED" and run["steps"] == "0"  # nothing new recorded
    for nid in ("react", "fan", "ok"):
        a, b = await node(broker, rid, nid), await node(broker, r.run_id, nid)
        assert a["output"] == b["output"]
        assert b["executed_steps"] == "0" and b["replayed_steps"] == a["executed_steps"]
    trace = normalized_trace(await broker.events(r.run_id))
    assert trace["fan"].count("GRAPH_NODE_COMPLETED") == 5
    assert "GRAPH_INTERRUPTED" in trace["ok"] and "GRAPH_RESUMED" in trace["ok"]
    assert (await node(broker, r.run_id, "ok"))["output"]["result"] == "approved: ship it, done"


def test_the_example_spec_runs() -> None:
    r = cli("run", "examples/langgraph_research.yaml", "--json", timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)
    assert report["status"] == "SUCCEEDED"
    nodes = {n["id"]: n for n in report["nodes"]}
    assert nodes["research"]["output"].startswith("AI governance in the notes (")
    assert nodes["write"]["output"].count("\n\n") == 3  # the title and three sections
    assert nodes["review"]["output"].startswith("Published (The editor said approved")
