"""The middleware chain inside a real worker (docs/plugins.md): the hooks an attempt
passes and their order, a replayed step seen by ``after_step`` only, and a middleware
policy that stops a node (never retried)."""

from __future__ import annotations

import json
import uuid
from typing import Any

from oao_testkit import make_spec, of_type, run_spec

from oao_common.broker import Broker
from oao_common.errors import PolicyViolation
from oao_worker.governance import CallTry, Failure, NodeAttempt, StepInfo, StepMiddleware, Usage

MODEL = {"m": {"provider": "scripted", "replies": ["hi there"], "chunk_tokens": 1}}


class Recorder(StepMiddleware):
    """Records the hooks it sees, by node: ``hook[:detail]``."""

    def __init__(self) -> None:
        self.log: dict[str, list[str]] = {}

    def _add(self, node: NodeAttempt | None, entry: str) -> None:
        self.log.setdefault(node.node_id if node else "?", []).append(entry)

    def before_node(self, node: NodeAttempt) -> None:
        self._add(node, f"before_node:{node.attempt}")

    def after_node(self, node: NodeAttempt) -> None:
        self._add(node, f"after_node:{node.outcome}")

    def before_step(self, step: StepInfo, usage: Usage) -> None:
        self._add(step.node, f"before_step:{step.kind}")

    def on_chunk(self, step: StepInfo, usage: Usage, output_tokens: int) -> None:
        entries = self.log.setdefault(step.node.node_id if step.node else "?", [])
        if not entries or entries[-1] != "on_chunk":
            entries.append("on_chunk")

    def after_step(self, step: StepInfo, usage: Usage) -> None:
        how = (
            "replayed" if step.replayed else "error" if step.error else f"{step.tokens_in}+{step.tokens_out}"
        )
        self._add(step.node, f"after_step:{step.kind}:{how}")

    def before_call(self, call: CallTry) -> None:
        self._add(call.node, f"before_call:{call.number}")

    def after_call(self, call: CallTry, error: BaseException | None) -> None:
        self._add(call.node, f"after_call:{'error' if error else 'ok'}")

    def on_error(self, failure: Failure) -> None:
        self._add(failure.node, f"on_error:{failure.scope}:{type(failure.error).__name__}")

    def on_event(self, node: NodeAttempt, type_: str, data: dict[str, Any]) -> None:
        if type_.startswith("STEP_"):
            self._add(node, f"event:{type_}")


async def test_the_hooks_of_an_attempt_with_a_model_and_a_tool_step(broker: Broker) -> None:
    rec = Recorder()
    spec = make_spec(
        [{"id": "n", "agent": "a"}],
        models=MODEL,
        agents={
            "a": {
                "kind": "python",
                "entrypoint": "plugin_agents:ask_then_tool",
                "model": "m",
                "tools": ["shell"],
            }
        },
        tools={"shell": {"entrypoint": "plugin_agents:shell"}},
    )
    rid = await run_spec(broker, spec, middleware=[rec])
    [n] = await broker.get_nodes(rid, ["n"])
    assert n["status"] == "SUCCEEDED" and json.loads(n["output"]) == "ran hi there"
    assert rec.log["n"] == [
        "before_node:1",
        "before_step:llm",
        "before_call:1",
        "on_chunk",
        "after_call:ok",
        "event:STEP_COMPLETED",
        "after_step:llm:6+2",
        "before_step:tool",
        "event:STEP_STARTED",
        "before_call:1",
        "after_call:ok",
        "event:STEP_COMPLETED",
        "after_step:tool:0+0",
        "after_node:succeeded",
    ]


async def test_a_retried_attempt_replays_its_recorded_step_through_after_step_only(broker: Broker) -> None:
    rec = Recorder()
    spec = make_spec(
        [{"id": "n", "agent": "a", "task": uuid.uuid4().hex}],
        models=MODEL,
        agents={"a": {"kind": "python", "entrypoint": "plugin_agents:ask_then_fail_once", "model": "m"}},
        defaults={"retry": {"max_retries": 2, "retry_delay_s": 0.0, "jitter": False}},
    )
    rid = await run_spec(broker, spec, middleware=[rec])
    [n] = await broker.get_nodes(rid, ["n"])
    assert n["status"] == "SUCCEEDED" and n["attempt"] == "2"
    assert [
        e for e in rec.log["n"] if not e.startswith(("event:", "on_chunk", "before_call", "after_call"))
    ] == [
        "before_node:1",
        "before_step:llm",
        "after_step:llm:6+2",
        "on_error:node:ConnectionError",
        "after_node:retry",
        "before_node:2",
        "after_step:llm:replayed",
        "after_node:succeeded",
    ]


class NoToolsOnFridays(StepMiddleware):
    """A policy written as middleware: refuses every tool call."""

    def before_step(self, step: StepInfo, usage: Usage) -> None:
        if step.kind == "tool":
            raise PolicyViolation("no_tools_today", detail=f"{step.name} refused")


async def test_a_middleware_policy_stops_the_node_before_the_tool_and_it_is_never_retried(
    broker: Broker,
) -> None:
    spec = make_spec(
        [{"id": "n", "agent": "a"}],
        models=MODEL,
        agents={
            "a": {
                "kind": "python",
                "entrypoint": "plugin_agents:ask_then_tool",
                "model": "m",
                "tools": ["shell"],
            }
        },
        tools={"shell": {"entrypoint": "plugin_agents:shell"}},
        defaults={"retry": {"max_retries": 3, "retry_delay_s": 0.0}},
    )
    rid = await run_spec(broker, spec, middleware=[NoToolsOnFridays()])
    [n] = await broker.get_nodes(rid, ["n"])
    assert n["status"] == "FAILED" and n["attempt"] == "1"
    err = json.loads(n["error"])
    assert err["rule"] == "no_tools_today" and err["reason"].endswith("shell refused")
    ev = await broker.events(rid)
    assert [e.data["rule"] for e in of_type(ev, "POLICY_VIOLATION")] == ["no_tools_today"]
    assert not of_type(ev, "STEP_STARTED")
