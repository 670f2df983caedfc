"""Traces of real processes, received over OTLP/HTTP by a loopback receiver: one run on
two worker processes, a requeued attempt after SIGKILL, the GenAI attributes."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import redis as redis_sync
from otlp_receiver import Receiver, Span
from proc import cli, start_serve, start_worker, stop

SPEC = """
name: traced
models:
  m:
    provider: scripted
    replies:
      - content: "a reply of some words"
tools:
  echo: {entrypoint: "oao_test_agents:echo", idempotent: true}
agents:
  stepper: {kind: python, entrypoint: "oao_test_agents:traced_steps", model: m, tools: [echo]}
  flaky: {kind: python, entrypoint: "oao_test_agents:flaky"}
failure: {allow_partial_completion: true, max_failure_ratio: 0.5}
nodes:
"""


def otel_env(rec: Receiver, **extra: str) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": rec.endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        **extra,
    }


@pytest.fixture
def receiver() -> object:
    rec = Receiver().start()
    yield rec
    rec.stop()


def by_name(spans: list[Span], name: str) -> list[Span]:
    return [s for s in spans if s.name == name]


def children(spans: list[Span], parent: Span, name: str | None = None) -> list[Span]:
    return [s for s in spans if s.parent_id == parent.span_id and (name is None or s.name == name)]


def write_spec(tmp_path: Path, nodes: str) -> Path:
    p = tmp_path / "traced.yaml"
    p.write_text(SPEC + nodes)
    return p


def test_one_run_on_two_worker_processes(
    redis_url: str, prefix: str, tmp_path: Path, receiver: Receiver
) -> None:
    spec = write_spec(
        tmp_path,
        '  - {id: a, agent: stepper, queue: qa, task: ""}\n'
        '  - {id: b, agent: stepper, queue: qb, task: ""}\n'
        '  - {id: capped, agent: stepper, queue: qa, task: "", policy: {max_steps: 1}}\n'
        '  - {id: flaky, agent: flaky, queue: qb, task: "traceflaky:1",'
        " retry: {max_retries: 1, retry_delay_s: 0.1, jitter: false}}\n",
    )
    env = otel_env(receiver)
    wa = start_worker(redis_url, prefix, "--queues", "qa", log=tmp_path / "wa.log", extra_env=env)
    wb = start_worker(redis_url, prefix, "--queues", "qb", log=tmp_path / "wb.log", extra_env=env)
    s = start_serve(redis_url, prefix, "--reaper-interval", "0.1", log=tmp_path / "s.log", extra_env=env)
    try:
        from proc import env as proc_env

        r = cli(
            "submit", str(spec), "--wait", "--redis-url", redis_url, "--prefix", prefix, env=proc_env(**env)
        )
        assert r.returncode == 0, r.stderr
        spans = receiver.wait_for(
            lambda sp: (
                len(by_name(sp, "oao.run")) == 1
                and len(by_name(sp, "oao.llm")) == 5
                and len(by_name(sp, "oao.node")) == 5
            )
        )
    finally:
        stop(wa, wb, s)
    (run,) = by_name(spans, "oao.run")
    assert run.service == "oao-scheduler"
    assert run.attrs["oao.run.status"] == "PARTIAL" and run.attrs["oao.run.nodes_total"] == 4
    assert run.parent_id == "" and run.status == 2
    assert {sp.trace_id for sp in spans} == {run.trace_id}  # one trace per run
    all_nodes = children(spans, run, "oao.node")
    assert sorted(n.attrs["oao.node.id"] for n in all_nodes) == ["a", "b", "capped", "flaky", "flaky"]

    # a policy violation: an event of the step it stopped and of the attempt, errors set
    (capped,) = [n for n in all_nodes if n.attrs["oao.node.id"] == "capped"]
    assert capped.attrs["oao.node.status"] == "failed" and capped.status == 2
    assert (
        "oao.policy_violation",
        {
            "oao.policy.rule": "max_steps",
            "oao.policy.scope": "node",
            "oao.policy.limit": 1,
            "oao.policy.reached": 2,
        },
    ) in capped.events
    (stopped,) = [st for st in children(spans, capped, "oao.step") if st.attrs["oao.step.seq"] == 2]
    assert "oao.policy_violation" in stopped.event_names() and stopped.status == 2
    # a node retry: the failed attempt says so, the retry is its sibling
    first, second = sorted(
        (n for n in all_nodes if n.attrs["oao.node.id"] == "flaky"), key=lambda n: n.attrs["oao.node.attempt"]
    )
    assert first.attrs["oao.node.status"] == "retry" and first.status == 2
    assert "oao.retry" in first.event_names() and "exception" in first.event_names()
    assert (
        second.attrs["oao.node.status"] == "succeeded" and second.parent_id == first.parent_id == run.span_id
    )

    nodes = [n for n in all_nodes if n.attrs["oao.node.id"] in ("a", "b")]
    assert len({n.attrs["oao.worker.id"] for n in nodes}) == 2  # two worker processes
    assert {n.service for n in nodes} == {"oao-worker"}
    for n in nodes:
        assert n.attrs["oao.node.attempt"] == 1 and n.attrs["oao.node.status"] == "succeeded"
        assert n.attrs["oao.queue"] == {"a": "qa", "b": "qb"}[n.attrs["oao.node.id"]]
        assert n.status == 1
        steps = children(spans, n, "oao.step")
        assert [st.attrs["oao.step.kind"] for st in sorted(steps, key=lambda x: x.attrs["oao.step.seq"])] == [
            "llm",
            "tool",
            "llm",
        ]
        for st in steps:
            (call,) = children(spans, st)
            assert call.name == {"llm": "oao.llm", "tool": "oao.tool"}[st.attrs["oao.step.kind"]]
    llm = by_name(spans, "oao.llm")[0]
    a = llm.attrs
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == "scripted"
    assert a["gen_ai.request.model"] == "m"
    assert a["gen_ai.usage.input_tokens"] > 0 and a["gen_ai.usage.output_tokens"] > 0
    assert a["gen_ai.response.finish_reasons"] == ["stop"]
    assert "gen_ai.input.messages" not in a and "gen_ai.output.messages" not in a  # content is opt-in
    tool = by_name(spans, "oao.tool")[0].attrs
    assert tool["gen_ai.tool.name"] == "echo" and tool["gen_ai.operation.name"] == "execute_tool"
    assert len(tool["oao.tool.idempotency_key"]) == 64 and tool["oao.tool.outcome"] == "ok"
    assert "gen_ai.tool.call.arguments" not in tool


def _run_steps(url: str, prefix: str, rid: str) -> int:
    r = redis_sync.Redis.from_url(url, decode_responses=True)
    try:
        return int(r.hget(f"{prefix}:run:{{{rid}}}", "steps") or 0)
    finally:
        r.close()


@pytest.mark.chaos
def test_requeued_attempt_after_sigkill_is_a_sibling(
    redis_url: str, prefix: str, tmp_path: Path, receiver: Receiver
) -> None:
    marker = tmp_path / "hold"
    marker.write_text("1")
    spec = write_spec(tmp_path, f'  - {{id: k, agent: stepper, task: "{marker}"}}\n')
    env = otel_env(receiver, OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT="true")
    ttl = ("--heartbeat-ttl", "1")
    s = start_serve(
        redis_url, prefix, "--reaper-interval", "0.1", *ttl, log=tmp_path / "s.log", extra_env=env
    )
    wa = start_worker(redis_url, prefix, *ttl, log=tmp_path / "wa.log", extra_env=env)
    wb = None
    try:
        from proc import env as proc_env

        r = cli("submit", str(spec), "--redis-url", redis_url, "--prefix", prefix, env=proc_env(**env))
        assert r.returncode == 0, r.stderr
        rid = r.stdout.split()[0]
        deadline = time.monotonic() + 30
        while _run_steps(redis_url, prefix, rid) < 2:  # the model call and the tool call are recorded
            assert time.monotonic() < deadline, "the first attempt never recorded its two steps"
            time.sleep(0.05)
        # the dead worker's finished step spans were exported (batch delay 100 ms)
        receiver.wait_for(lambda sp: len([x for x in sp if x.name == "oao.step"]) >= 2)
        os.kill(wa.pid, signal.SIGKILL)
        wa.wait(10)
        marker.unlink()
        wb = start_worker(redis_url, prefix, *ttl, log=tmp_path / "wb.log", extra_env=env)
        spans = receiver.wait_for(  # the run span is written when the run ends
            lambda sp: len(by_name(sp, "oao.run")) == 1 and len(by_name(sp, "oao.node")) == 2, timeout_s=60
        )
    finally:
        stop(*[p for p in (wa, wb, s) if p is not None])
    (run,) = by_name(spans, "oao.run")
    assert run.attrs["oao.run.status"] == "SUCCEEDED"
    first, second = sorted(children(spans, run, "oao.node"), key=lambda n: n.attrs["oao.node.attempt"])
    assert (first.attrs["oao.node.attempt"], second.attrs["oao.node.attempt"]) == (1, 2)
    assert first.attrs["oao.node.status"] == "worker_died" and first.status == 2
    assert first.service == "oao-scheduler"  # ended by the reaper on the dead worker's behalf
    assert second.attrs["oao.node.status"] == "succeeded" and second.status == 1
    assert second.attrs["oao.node.replayed_steps"] == 2 and second.attrs["oao.node.steps"] == 3
    assert first.attrs["oao.worker.id"] != second.attrs["oao.worker.id"]
    # the steps the dead worker exported hang under its attempt's span
    dead_steps = children(spans, first, "oao.step")
    assert sorted(st.attrs["oao.step.seq"] for st in dead_steps) == [1, 2]
    assert not any(st.attrs["oao.step.replayed"] for st in dead_steps)
    # the requeued attempt replays them and executes the last one
    steps = sorted(children(spans, second, "oao.step"), key=lambda x: x.attrs["oao.step.seq"])
    assert [(st.attrs["oao.step.seq"], st.attrs["oao.step.replayed"]) for st in steps] == [
        (1, True),
        (2, True),
        (3, False),
    ]
    # content was opted into: the messages are there
    llm = [x for x in by_name(spans, "oao.llm") if x.parent_id == steps[2].span_id]
    assert "bye" in llm[0].attrs["gen_ai.input.messages"]
    assert "a reply" in llm[0].attrs["gen_ai.output.messages"]
