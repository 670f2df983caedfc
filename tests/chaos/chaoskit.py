"""Checks shared by the chaos tests: the invariants that must hold after any crash."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from oao_common.broker import Broker


def read_ledger(path: Path) -> list[tuple[str, int, str, str]]:
    """External ledger lines as (idempotency key, attempt, step, label)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        key, attempt, step, label = line.split(" ", 3)
        out.append((key, int(attempt), step, label))
    return out


async def check_invariants(broker: Broker, run_id: str, ledger: Path) -> dict[str, Any]:
    """Assert the crash-recovery guarantees for a finished run; return figures.

    * every node SUCCEEDED, exactly one NODE_SUCCEEDED each, by the latest attempt;
    * no job left in any ready list, active list or the delayed set;
    * fencing in the log: no step or completion event of attempt a after attempt a+1 started;
    * every step was executed to completion once: no (node, seq) has two STEP_COMPLETED
      events, so no recorded step ran again in a later attempt (the ledger served it);
    * every recorded side-effect step ran exactly once in the attempt that recorded it,
      and never in a later attempt.
    """
    run = await broker.get_run(run_id)
    node_ids = run["node_ids"].split(",")
    nodes = await broker.get_nodes(run_id, node_ids)
    bad = [(n["id"], n.get("status"), n.get("error")) for n in nodes if n.get("status") != "SUCCEEDED"]
    assert not bad, bad[:5]
    assert run["status"] == "SUCCEEDED"

    r = broker.redis
    leftovers = []
    async for k in r.scan_iter(match=f"{broker.keys.prefix}:q:*"):
        leftovers += await r.lrange(k, 0, -1)
    async for k in r.scan_iter(match=f"{broker.keys.prefix}:w:*:active"):
        leftovers += await r.lrange(k, 0, -1)
    leftovers += await r.zrange(broker.keys.delayed, 0, -1)
    leftovers += await r.lrange(broker.keys.parked(run_id), 0, -1)
    assert not leftovers, leftovers[:5]

    events = await broker.events(run_id)
    latest: dict[str, int] = {}
    succeeded = Counter()
    for e in events:
        if not e.node:
            continue
        if e.type == "NODE_STARTED":
            assert e.attempt == latest.get(e.node, 0) + 1, (e.node, e.attempt, latest.get(e.node))
            latest[e.node] = e.attempt
        elif e.type in ("STEP_COMPLETED", "STEP_STARTED", "STEP_REPLAYED", "NODE_SUCCEEDED"):
            assert e.attempt == latest[e.node], (
                f"{e.type} of {e.node} attempt {e.attempt} after {latest[e.node]} started"
            )
            if e.type == "NODE_SUCCEEDED":
                succeeded[e.node] += 1
    assert all(succeeded[n] == 1 for n in node_ids), [n for n in node_ids if succeeded[n] != 1]
    completed = Counter((e.node, e.data.get("seq")) for e in events if e.type == "STEP_COMPLETED")
    twice = [k for k, c in completed.items() if c > 1]
    assert not twice, f"steps executed again after being recorded: {twice[:5]}"

    steps = await broker.get_steps(run_id)
    runs_of: dict[str, list[int]] = defaultdict(list)
    for key, attempt, _step, _label in read_ledger(ledger):
        runs_of[key].append(attempt)
    recorded_tools = [rec for k, rec in steps.items() if not k.endswith(":started") and rec["kind"] == "tool"]
    interrupted = 0
    for rec in recorded_tools:
        attempts = runs_of.get(rec["idempotency_key"], [])
        assert attempts.count(rec["attempt"]) == 1, (rec, attempts)
        assert all(a <= rec["attempt"] for a in attempts), ("re-executed after recording", rec, attempts)
        interrupted += len(attempts) - 1
    replayed = sum(1 for e in events if e.type == "STEP_REPLAYED")
    requeued = sum(1 for e in events if e.type == "NODE_REQUEUED")
    stale = sum(1 for e in events if e.type == "STALE_ATTEMPT_REJECTED")
    return {
        "nodes": len(node_ids),
        "recorded_tool_steps": len(recorded_tools),
        "replayed_steps": replayed,
        "requeued": requeued,
        "stale_rejected": stale,
        "tool_calls_interrupted_and_rerun": interrupted,
        "max_attempt": max(latest.values()),
    }
