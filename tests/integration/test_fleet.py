"""The library orchestration: :class:`LocalFleet` and :func:`wait_for_run`, which follows a
run's event stream instead of polling its nodes."""

from __future__ import annotations

import asyncio
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from oao_testkit import fleet, make_spec, wait_until
from proc import cli
from redis import exceptions as redis_exc
from rich.console import Console

from oao_common.broker import Broker
from oao_common.errors import RedisUnavailable, WaitTimeout
from oao_scheduler.fleet import LocalFleet
from oao_scheduler.progress import wait_for_run
from oao_scheduler.report import render_report
from oao_scheduler.submit import submit_spec


def chain() -> Any:
    return make_spec(
        [
            {"id": "a", "agent": "noop"},
            {"id": "b", "agent": "noop", "depends_on": ["a"]},
            {"id": "c", "agent": "broken", "depends_on": ["a"]},
            {"id": "d", "agent": "noop", "depends_on": ["c"]},
        ],
        defaults={"retry": {"max_retries": 0}},
        failure={"allow_partial_completion": True, "max_failure_ratio": 0.9},
    )


def counting(broker: Broker, name: str) -> list[int]:
    """Count calls of ``broker.<name>`` (the wrapped method still runs)."""
    calls = [0]
    real = getattr(broker, name)

    async def wrapper(*a: Any, **kw: Any) -> Any:
        calls[0] += 1
        return await real(*a, **kw)

    setattr(broker, name, wrapper)
    return calls


def lines_of(text: str) -> dict[str, list[str]]:
    """Node → the states its progress lines showed, in order."""
    out: dict[str, list[str]] = {}
    for m in re.finditer(r"^\[\s*[\d.]+s\] (\w+): (\w+)$", text, re.M):
        out.setdefault(m.group(1), []).append(m.group(2))
    return out


async def test_wait_follows_events_and_reads_the_nodes_once(broker: Broker) -> None:
    snapshots = counting(broker, "node_statuses")
    hashes = counting(broker, "get_nodes")
    buf = io.StringIO()
    s = await submit_spec(broker, chain())
    waiting = asyncio.create_task(wait_for_run(broker, s.run_id, Console(file=buf, width=160), timeout_s=30))
    await wait_until(lambda: snapshots[0], 1, 5, "the first snapshot")  # before any worker runs
    async with fleet(broker):
        status = await waiting
    assert status == "PARTIAL"
    assert snapshots[0] == 1 and hashes[0] == 0  # one snapshot, then events only
    seen = lines_of(buf.getvalue())
    assert seen["a"] == ["READY", "RUNNING", "SUCCEEDED"]
    assert seen["b"] == ["PENDING", "READY", "RUNNING", "SUCCEEDED"]
    assert seen["c"] == ["PENDING", "READY", "RUNNING", "FAILED"]
    assert seen["d"] == ["PENDING", "SKIPPED"]


async def test_wait_reads_afresh_after_a_redis_error(broker: Broker) -> None:
    snapshots = counting(broker, "node_statuses")
    real = broker.next_events
    failed = [0]

    async def flaky(*a: Any, **kw: Any) -> Any:
        if not failed[0]:
            failed[0] += 1
            raise redis_exc.ConnectionError("injected")
        return await real(*a, **kw)

    broker.next_events = flaky  # type: ignore[method-assign]
    buf = io.StringIO()
    async with fleet(broker):
        s = await submit_spec(broker, chain())
        status = await wait_for_run(broker, s.run_id, Console(file=buf, width=160), timeout_s=30)
    assert status == "PARTIAL" and failed[0] == 1
    assert snapshots[0] == 2  # the view was read again after the error
    assert lines_of(buf.getvalue())["d"][-1] == "SKIPPED"


async def test_live_view_on_a_terminal_shows_counts_for_a_big_dag(broker: Broker) -> None:
    spec = make_spec([{"id": f"n{i}", "agent": "noop"} for i in range(60)])
    buf = io.StringIO()
    console = Console(file=buf, width=120, force_terminal=True)
    async with fleet(broker, concurrency=8):
        s = await submit_spec(broker, spec)
        assert await wait_for_run(broker, s.run_id, console, timeout_s=30) == "SUCCEEDED"
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", buf.getvalue())  # without the terminal's escapes
    assert f"run {s.run_id}: SUCCEEDED" in text and "SUCCEEDED 60" in text
    assert not re.search(r"^\s*n59\s+SUCCEEDED", text, re.M)  # counts, not a row per node


async def test_wait_times_out_and_notices_a_deleted_run(broker: Broker) -> None:
    s = await submit_spec(broker, make_spec([{"id": "a", "agent": "noop"}]))  # no workers
    with pytest.raises(WaitTimeout, match=r"had not ended after 0\.3 s"):
        await wait_for_run(broker, s.run_id, timeout_s=0.3)
    waiting = asyncio.create_task(wait_for_run(broker, s.run_id, interval_s=0.1, timeout_s=30))
    await asyncio.sleep(0.2)
    await broker.redis.delete(*[k async for k in broker.redis.scan_iter(match=f"{broker.keys.prefix}:*")])
    with pytest.raises(RedisUnavailable, match="no longer in Redis"):
        await waiting
    with pytest.raises(RedisUnavailable, match="does not exist"):
        await wait_for_run(broker, s.run_id, timeout_s=5)


async def test_local_fleet_on_its_own_embedded_server() -> None:
    spec = make_spec([{"id": "a", "agent": "noop"}, {"id": "b", "agent": "noop", "depends_on": ["a"]}])
    async with LocalFleet(workers=2, concurrency=2, claim_timeout_s=0.2, grace_period_s=1.0) as f:
        assert f.embedded and f.url is not None and len(f.workers) == 2
        rid, status = await f.run(spec, timeout_s=30)
        report = await f.report(rid)
        await wait_until(lambda: sum(w.completed for w in f.workers), 2, 5, "both completions counted")
    assert status == "SUCCEEDED" and report is not None
    assert [n["status"] for n in report["nodes"]] == ["SUCCEEDED", "SUCCEEDED"]
    assert not f.embedded  # its server was stopped with it


async def test_local_fleet_on_a_broker_leaves_the_connection_open(broker: Broker) -> None:
    async with LocalFleet(broker=broker, workers=1, claim_timeout_s=0.2, grace_period_s=1.0) as f:
        _, status = await f.run(make_spec([{"id": "a", "agent": "noop"}]), timeout_s=30)
    assert status == "SUCCEEDED" and not f.embedded
    assert await broker.redis.ping()


def test_report_of_a_large_run_shows_the_nodes_that_did_not_succeed() -> None:
    def node(i: int, status: str) -> dict[str, Any]:
        return {
            "id": f"n{i}", "agent": "x", "status": status, "attempt": 1, "steps": 0, "replayed_steps": 0,
            "tokens_in": 0, "tokens_out": 0, "tool_calls": 0, "cost_usd": 0.0, "duration_s": 0.1,
            "state_history": [], "agent_states": [], "output": None,
            "error": {"type": "ValueError", "message": "boom"} if status == "FAILED" else None,
        }  # fmt: skip

    nodes = [node(i, "FAILED" if i in (7, 70) else "SUCCEEDED") for i in range(150)]
    report = {
        "run_id": "r1", "name": "big", "status": "PARTIAL", "exec_hash": "h", "duration_s": 1.0,
        "totals": {"nodes": 150, "nodes_done": 150, "nodes_failed": 2, "steps": 0, "replayed_steps": 0,
                   "tokens_in": 0, "tokens_out": 0, "tool_calls": 0, "cost_usd": 0.0},
        "nodes": nodes,
    }  # fmt: skip
    buf = io.StringIO()
    render_report(report, Console(file=buf, width=160), max_nodes=100)
    text = buf.getvalue()
    assert "by status: FAILED 2 · SUCCEEDED 148" in text
    assert "150 nodes: shown are the 2 that did not succeed" in text
    assert "n7 " in text and "n70 " in text and "n8 " not in text
    full = io.StringIO()
    render_report(report, Console(file=full, width=160))
    assert "n8 " in full.getvalue()  # without a limit: every node


def test_run_command_summarises_a_large_report(tmp_path: Path) -> None:
    spec = tmp_path / "wide.yaml"
    spec.write_text(
        json.dumps(
            {
                "name": "wide",
                "agents": {"n": {"kind": "python", "entrypoint": "oao_test_agents:noop"}},
                "nodes": [{"id": f"n{i:03d}", "agent": "n"} for i in range(120)],
            }
        )
    )
    r = cli("run", str(spec), "--concurrency", "16")
    assert r.returncode == 0, r.stderr
    assert "by status: SUCCEEDED 120" in r.stdout and "n119" not in r.stdout
    assert "n119" not in r.stderr  # no per-node progress lines for a large DAG either
