"""Pure pieces of the framework adapters: spec validation of the new agent kinds, JSON
conversion of framework values, the stream sink's prefix rule, subgraph paths, and the
objects' behaviour outside an OAO node (no Redis)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import yaml

pytest.importorskip("langgraph")

from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel

from oao_common.errors import PermanentError, SpecError, TransientError
from oao_common.spec import LangChainAgentSpec, LangGraphAgentSpec, parse_spec
from oao_common.trust import DEFAULT_TRUST
from oao_worker.agents import build_agent
from oao_worker.agents.langchain_bridge import (
    OAOChatModel,
    _StreamSink,
    governed,
    openai_message,
    to_jsonable,
)
from oao_worker.agents.langgraph_agent import LangGraphAgent, path_of


def spec_doc(agent: dict[str, Any], **extra: Any) -> str:
    doc = {"name": "t", "agents": {"g": agent}, "nodes": [{"id": "a", "agent": "g"}], **extra}
    return yaml.safe_dump(doc)


def test_framework_agents_validate_and_may_name_their_own_tools() -> None:
    spec = parse_spec(
        spec_doc(
            {
                "kind": "langgraph",
                "entrypoint": "lg_graphs:react",
                "tools": ["word_count"],
                "deny_tools": ["delete_files"],
                "resume": ["yes", {"n": 1}],
                "on_interrupt": "output",
            }
        )
    )
    agent = spec.agents["g"]
    assert isinstance(agent, LangGraphAgentSpec) and agent.tools == ["word_count"]
    assert agent.recursion_limit == 25 and agent.input_key is None
    lc = parse_spec(spec_doc({"kind": "langchain", "entrypoint": "lg_graphs:chain", "input_key": None}))
    assert isinstance(lc.agents["g"], LangChainAgentSpec) and lc.agents["g"].input_key is None
    assert lc.agents["g"].tools is None  # every tool the runnable has


@pytest.mark.parametrize(
    ("agent", "problem"),
    [
        ({"kind": "langgraph", "entrypoint": "nocolon"}, "agents.g.entrypoint"),
        ({"kind": "langgraph", "entrypoint": "m:g", "on_interrupt": "ignore"}, "agents.g.on_interrupt"),
        ({"kind": "langgraph", "entrypoint": "m:g", "recursion_limit": 0}, "agents.g.recursion_limit"),
        ({"kind": "langchain", "entrypoint": "m:g", "resume": []}, "agents.g.resume"),
        ({"kind": "langgraph", "entrypoint": "m:g", "model": "nope"}, "unknown model 'nope'"),
        ({"kind": "python", "entrypoint": "m:g", "tools": ["nope"]}, "unknown tool 'nope'"),
    ],
)
def test_bad_framework_agents_are_refused_with_their_place(agent: dict[str, Any], problem: str) -> None:
    with pytest.raises(SpecError) as e:
        parse_spec(spec_doc(agent))
    assert any(problem in p for p in e.value.problems), e.value.problems


def test_an_entrypoint_that_is_not_a_graph_is_a_permanent_error() -> None:
    spec = LangGraphAgentSpec(kind="langgraph", entrypoint="lg_graphs:chain")
    with pytest.raises(PermanentError, match="not a compiled LangGraph graph"):
        build_agent("g", spec, DEFAULT_TRUST, {})
    bad = LangGraphAgentSpec(kind="langgraph", entrypoint="lg_graphs:react", config={"surprise": 1})
    with pytest.raises(PermanentError, match="cannot call the entrypoint"):
        build_agent("g", bad, DEFAULT_TRUST, {})


def test_input_key_defaults_to_the_first_task_key_of_the_state() -> None:
    def key(entrypoint: str) -> str:
        return LangGraphAgent(
            "g", LangGraphAgentSpec(kind="langgraph", entrypoint=entrypoint), DEFAULT_TRUST
        ).input_key

    assert key("lg_graphs:react") == "messages"
    assert key("lg_graphs:approval") == "task"
    assert key("lg_graphs:nested") == "messages"  # pydantic state; question needs input_key


class _State(BaseModel):
    n: int
    tags: set[str]


def test_to_jsonable_drops_message_ids_and_flattens_framework_values() -> None:
    msgs = [
        HumanMessage("hi", id="random-1"),
        AIMessage(
            "", id="random-2", tool_calls=[{"name": "t", "args": {"x": 1}, "id": "c1", "type": "tool_call"}]
        ),
        ToolMessage("boom", tool_call_id="c1", status="error", id="random-3"),
    ]
    assert to_jsonable(
        {"messages": msgs, "s": _State(n=1, tags={"b", "a"}), "f": float("nan"), "t": (1, 2)}
    ) == {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "name": "t", "args": {"x": 1}}]},
            {"role": "tool", "content": "boom", "tool_call_id": "c1", "status": "error"},
        ],
        "s": {"n": 1, "tags": ["a", "b"]},
        "f": "nan",
        "t": [1, 2],
    }
    assert openai_message(msgs[1]) == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "t", "arguments": '{"x": 1}'}}],
    }


def test_stream_sink_forwards_exactly_the_reply_across_a_retried_call() -> None:
    out: list[str] = []
    s = _StreamSink(out.append)
    s.begin()
    s.delta("Hel")
    s.delta("lo ")
    s.begin()  # the provider call is retried: it streams from the start again
    s.delta("Hello")
    s.delta(" world")
    assert "".join(out) == "Hello world" and s.finish("Hello world!") == "!"

    out.clear()
    d = _StreamSink(out.append)
    d.begin()
    d.delta("Yes")
    d.begin()
    d.delta("No, ")  # answered differently: nothing more is forwarded
    d.delta("never")
    assert out == ["Yes"]
    with pytest.raises(TransientError, match="answered differently"):
        d.finish("No, never")


def test_subgraph_paths_drop_task_ids() -> None:
    assert path_of(()) == ""
    assert path_of(("team:3f2a9c", "writer:77e1")) == "team/writer"


def test_outside_an_oao_node_the_model_refuses_and_governed_tools_run_plainly() -> None:
    with pytest.raises(PermanentError, match="only inside an OAO node"):
        asyncio.run(OAOChatModel().ainvoke("hi"))

    @tool
    def double(x: int) -> int:
        """Double a number."""
        return 2 * x

    g = governed(double, idempotent=True)
    assert (g.name, g.description, g.idempotent) == ("double", "Double a number.", True)
    assert asyncio.run(g.ainvoke({"x": 21})) == 42
    call = {"type": "tool_call", "id": "c9", "name": "double", "args": {"x": 2}}
    out = asyncio.run(g.ainvoke(call))
    assert isinstance(out, ToolMessage) and (out.content, out.tool_call_id) == ("4", "c9")
    assert governed(g) is g and [t.name for t in governed([double, g])] == ["double", "double"]
