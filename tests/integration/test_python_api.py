"""The public Python API (``oao``): the four quick starts as users paste them (run as
scripts in a subprocess), and ``submit`` / ``RunHandle`` on the embedded server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from proc import ROOT, env

from oao import (
    AgentNotImportable,
    Orchestrator,
    OrchestratorError,
    Spec,
    StrictPolicy,
    TaskGraph,
    TaskNode,
    WaitTimeout,
    load_spec,
)
from oao_common.broker import Broker
from oao_common.events import EventType

QUICKSTART = ROOT / "examples" / "quickstart"


def _script(name: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(QUICKSTART / name)],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_quickstart_single_agent_prints_the_json_report() -> None:
    p = _script("single_agent.py")
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)  # stdout is the report only: logs go to stderr
    assert report["status"] == "SUCCEEDED"
    assert report["agent"] == "DummyAgent"
    assert report["output"] == "Processed: Explain AI orchestration"
    assert report["steps"] == 1 and report["attempts"] == 1
    assert report["tokens"] == {"input": 0, "output": 0, "total": 0}
    assert report["state_history"] == ["INIT", "PLAN", "EXECUTE", "REVIEW", "TERMINATE"]
    assert report["error"] is None and report["duration_s"] is not None
    for key in ("execution_id", "tool_calls", "cost_usd", "replayed_steps"):
        assert key in report


def test_quickstart_async() -> None:
    p = _script("async_agent.py")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "SUCCEEDED Processed: Async execution demo"


def test_quickstart_multi_agent() -> None:
    p = _script("multi_agent.py")
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["researcher SUCCEEDED", "critic SUCCEEDED"]


def test_quickstart_dag() -> None:
    p = _script("dag.py")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[:4] == ["research SUCCEEDED", "draft SUCCEEDED", "critique SUCCEEDED", "polisher SUCCEEDED"]
    out = "\n".join(lines[4:])
    assert out.startswith("[polisher] Improve draft")
    assert "From critique: [critic] Critique draft" in out
    assert "From draft: [writer] Draft article" in out
    assert "Overall task: Write a blog post about AI" in out


# ----------------------------------------------------------------- embedded handle


class Gated:
    """An async agent that waits for ``gate`` (same event loop as the in-process workers)."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.started = asyncio.Event()

    async def invoke(self, task: str) -> dict[str, str]:
        self.started.set()
        await self.gate.wait()
        return {"output": f"done: {task}"}


class Echo:
    def invoke(self, task: str) -> dict[str, str]:
        return {"output": task}


class Structured:
    def invoke(self, task: str) -> dict[str, object]:
        return {"input": task, "output": {"k": [1, 2], "s": "é"}}


@pytest.fixture(scope="module")
def orch() -> Iterator[Orchestrator]:
    o = Orchestrator(workers=1, concurrency=4, policy=StrictPolicy(max_steps=5, timeout_s=30))
    try:
        yield o
    finally:
        o.close()


async def test_submit_status_events_wait_report(orch: Orchestrator) -> None:
    gated = Gated()
    graph = TaskGraph()
    graph.add_node(TaskNode("a", gated, "{{ inputs.task }}"))
    graph.add_node(TaskNode("b", Echo(), "after {{ nodes.a.output }}", dependencies={"a"}))
    try:
        handle = await orch.submit(graph, inputs={"task": "T"})
        assert handle.created
        await asyncio.wait_for(gated.started.wait(), 10)
        assert await handle.status() == "RUNNING"
        seen: list[str] = []

        async def follow() -> None:
            async for ev in handle.events():
                seen.append(ev.type)

        follower = asyncio.create_task(follow())
        gated.gate.set()
        assert await handle.wait(timeout_s=10) == "SUCCEEDED"
        await asyncio.wait_for(follower, 10)  # events() ends by itself with the run
        assert seen[0] == EventType.RUN_SUBMITTED and seen[-1] == EventType.RUN_SUCCEEDED
        assert seen.count(EventType.NODE_SUCCEEDED) == 2
        report = await handle.report()
        assert report.status == "SUCCEEDED" and report.execution_id == handle.run_id
        assert set(report.nodes) == {"a", "b"}
        assert report.nodes["a"].output == "done: T"
        assert report.nodes["b"].output == "after done: T"
        assert report.output == {"b": "after done: T"}  # the sink's output
        assert report.steps == 2 and report.attempts == 2
    finally:
        await orch.aclose()


async def test_cancel_and_wait_timeout(orch: Orchestrator) -> None:
    gated = Gated()
    try:
        handle = await orch.submit(TaskGraph([TaskNode("slow", gated, "x")]))
        await asyncio.wait_for(gated.started.wait(), 10)
        with pytest.raises(WaitTimeout):
            await handle.wait(timeout_s=0.2)
        assert await handle.cancel() is True
        assert await handle.wait(timeout_s=10) == "CANCELLED"
        assert await handle.cancel() is False  # already ended
        report = await handle.report()
        assert report.status == "CANCELLED"
        assert report.nodes["slow"].status == "CANCELLED"
    finally:
        gated.gate.set()
        await orch.aclose()


async def test_dict_output_renders_as_json_not_repr(orch: Orchestrator) -> None:
    graph = TaskGraph()
    graph.add_node(TaskNode("data", Structured(), "x"))
    graph.add_node(TaskNode("show", Echo(), "got {{ nodes.data.output }}", dependencies={"data"}))
    try:
        report = await orch.run_spec_async(graph, timeout_s=20)
    finally:
        await orch.aclose()
    assert report.status == "SUCCEEDED"
    assert report.nodes["data"].output == {"k": [1, 2], "s": "é"}  # "input" dropped: the rule
    shown = report.nodes["show"].output
    assert shown == 'got {"k": [1, 2], "s": "é"}'
    assert "'k'" not in shown


async def test_sync_run_inside_a_loop_says_use_run_async(orch: Orchestrator) -> None:
    with pytest.raises(OrchestratorError, match="run_async"):
        orch.run(agent=Echo(), task="x")


def test_yaml_spec_and_graph_are_the_same_spec(tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text(
        "name: graph\n"
        "agents:\n  noop: {kind: python, entrypoint: 'oao_test_agents:noop'}\n"
        "nodes:\n"
        "  - {id: a, agent: noop, task: '{{ inputs.x }}'}\n"
        "  - {id: b, agent: noop, task: 'b {{ nodes.a.output }}', depends_on: [a]}\n"
    )
    graph = TaskGraph()
    graph.add_node(TaskNode("a", "oao_test_agents:noop", "{{ inputs.x }}"))
    graph.add_node(TaskNode("b", "oao_test_agents:noop", "b {{ nodes.a.output }}", dependencies={"a"}))
    from_graph = Spec.from_graph(graph)
    assert isinstance(from_graph, Spec)
    assert from_graph.model_dump() == load_spec(tmp_path / "s.yaml").model_dump()


# ----------------------------------------------------------------- with a Redis URL


async def test_unimportable_agent_with_a_url_is_named(redis_url: str, prefix: str, broker: Broker) -> None:
    class Local:
        name = "scribe"

        def invoke(self, task: str) -> str:
            return task

    o = Orchestrator(redis_url=redis_url, prefix=prefix)
    graph = TaskGraph()
    graph.add_node(TaskNode("ok", "oao_test_agents:noop", "x"))
    graph.add_node(TaskNode("bad", Local(), "y"))
    try:
        with pytest.raises(AgentNotImportable) as ei:
            await o.submit(graph)
    finally:
        await o.aclose()
    msg = str(ei.value)
    assert "'scribe'" in msg and "not importable" in msg and "\n" not in msg
    assert ei.value.agent == "scribe"
    assert await broker.recent_runs() == []  # nothing was written


async def test_importable_agents_run_with_a_url(redis_url: str, prefix: str) -> None:
    o = Orchestrator(redis_url=redis_url, prefix=prefix, workers=1)
    try:
        handle = await o.submit(TaskGraph([TaskNode("n", "oao_test_agents:noop", "x")]))
        assert await handle.wait(timeout_s=20) == "SUCCEEDED"
        assert (await handle.report()).status == "SUCCEEDED"
    finally:
        await o.aclose()
