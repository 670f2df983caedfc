"""The execution report: per run and per node, what happened, read back from Redis.

:func:`collect` builds a JSON-able dict (the ``--json`` output); :func:`render_report`
and :func:`render_status` print it with rich.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from rich.console import Console
from rich.table import Table

from oao_common.broker import Broker
from oao_common.events import Event, EventType

_NODE_EVENT_STATE = {
    EventType.NODE_READY: "READY",
    EventType.NODE_STARTED: "RUNNING",
    EventType.NODE_SUCCEEDED: "SUCCEEDED",
    EventType.NODE_FAILED: "FAILED",
    EventType.NODE_SKIPPED: "SKIPPED",
    EventType.NODE_CANCELLED: "CANCELLED",
    EventType.NODE_RETRY_SCHEDULED: "PENDING(retry)",
    EventType.NODE_REQUEUED: "READY(requeued)",
    EventType.NODE_HANDED_BACK: "READY(handed back)",
}

#: ``run`` and ``submit --wait`` summarise the report of a run with more nodes than this.
REPORT_NODE_LIMIT = 100

STATUS_STYLE = {
    "SUCCEEDED": "green",
    "FAILED": "red",
    "SKIPPED": "yellow",
    "CANCELLED": "magenta",
    "RUNNING": "cyan",
    "READY": "blue",
    "PENDING": "dim",
    "PARTIAL": "yellow",
}


def _int(v: Any) -> int:
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return 0


def _secs(start: Any, end: Any) -> float | None:
    if not start or not end:
        return None
    return round((_int(end) - _int(start)) / 1000, 3)


def _decode(v: str | None) -> Any:
    if v is None:
        return None
    try:
        return json.loads(v)
    except ValueError:
        return v


def node_report(n: dict[str, str], history: list[dict[str, Any]]) -> dict[str, Any]:
    """One node of the report from its Redis hash ``n`` (with ``id``) and its state
    history (``[{"state", "t_ms", "attempt"}]``, from the event log)."""
    return {
        "id": n["id"],
        "agent": n.get("agent", ""),
        "queue": n.get("queue", ""),
        "status": n.get("status", "?"),
        "attempt": _int(n.get("attempt")),
        "retries": _int(n.get("retries")),
        "requeues": _int(n.get("requeues")),
        "worker": n.get("lease", ""),
        "steps": _int(n.get("steps")),
        "replayed_steps": _int(n.get("replayed_steps")),
        "tokens_in": _int(n.get("tokens_in")),
        "tokens_out": _int(n.get("tokens_out")),
        "tool_calls": _int(n.get("tool_calls")),
        "cost_usd": float(n.get("cost_usd") or 0),
        "duration_s": _secs(n.get("started_at"), n.get("finished_at")),
        "state_history": history,
        "agent_states": [s for s in n.get("state_history", "").split(",") if s],
        "output": _decode(n.get("output")),
        "error": _decode(n.get("error")),
        "retry_at_ms": _int(n.get("retry_at")) or None,
    }


async def collect(broker: Broker, run_id: str, with_events: bool = True) -> dict[str, Any] | None:
    """The report of ``run_id``, or ``None`` if no such run exists."""
    run = await broker.get_run(run_id)
    if not run:
        return None
    node_ids = [n for n in run.get("node_ids", "").split(",") if n]
    nodes = await broker.get_nodes(run_id, node_ids)
    events: list[Event] = await broker.events(run_id) if with_events else []
    history: dict[str, list[dict[str, Any]]] = {n: [] for n in node_ids}
    created = _int(run.get("created_at"))
    for ev in events:
        state = _NODE_EVENT_STATE.get(EventType(ev.type)) if ev.type in EventType.__members__ else None
        if state and ev.node in history:
            history[ev.node].append({"state": state, "t_ms": ev.ts_ms - created, "attempt": ev.attempt})
    out_nodes = [node_report(n, history.get(n["id"], [])) for n in nodes]
    replayed = sum(n["replayed_steps"] for n in out_nodes)
    return {
        "run_id": run_id,
        "name": run.get("name", ""),
        "status": run.get("status", "?"),
        "exec_hash": run.get("exec_hash", ""),
        "replay_of": run.get("replay_of") or None,
        "replay_point": run.get("replay_point") or None,
        "overrides": _decode(run.get("overrides")) or [],
        "created_at_ms": created,
        "duration_s": _secs(run.get("started_at") or run.get("created_at"), run.get("finished_at")),
        "totals": {
            "nodes": _int(run.get("nodes_total")),
            "nodes_done": _int(run.get("nodes_done")),
            "nodes_failed": _int(run.get("nodes_failed")),
            "steps": _int(run.get("steps")),
            "replayed_steps": replayed,
            "tokens_in": _int(run.get("tokens_in")),
            "tokens_out": _int(run.get("tokens_out")),
            "tool_calls": _int(run.get("tool_calls")),
            "cost_usd": float(run.get("cost_usd") or 0),
        },
        "events": len(events),
        "nodes": out_nodes,
    }


async def node_detail(broker: Broker, run_id: str, node_id: str) -> dict[str, Any] | None:
    """One node's report (:func:`node_report`, without state history) plus ``ledger``: its
    recorded steps in order (``seq``, ``kind``, ``name``, ``usage``, ``duration_ms``,
    ``result``, ``attempt``). ``None`` if the run has no such node."""
    (node,) = await broker.get_nodes(run_id, [node_id])
    if len(node) <= 1:  # only the id we put in: no hash
        return None
    out = node_report(node, [])
    out["ledger"] = await broker.get_node_steps(run_id, node_id, _int(node.get("steps_recorded")))
    return out


async def run_graph(broker: Broker, run_id: str) -> dict[str, Any] | None:
    """The run's DAG from its stored spec: ``{"nodes": [{"id", "agent", "depends_on"}]}``
    in spec order; ``None`` if the run (or its stored spec) is gone."""
    spec_json, _inputs, _started = await broker.get_spec_json(run_id)
    if spec_json is None:
        return None
    doc = json.loads(spec_json)
    return {
        "nodes": [
            {"id": n["id"], "agent": n.get("agent", ""), "depends_on": list(n.get("depends_on") or [])}
            for n in doc.get("nodes", [])
        ]
    }


def _styled(status: str) -> str:
    style = STATUS_STYLE.get(status.split("(")[0], "")
    return f"[{style}]{status}[/]" if style else status


def _error_text(err: Any) -> str:
    if isinstance(err, dict):
        reason = err.get("reason") if err.get("type") == "PolicyViolation" else None
        return str(reason or f"{err.get('type', 'Error')}: {err.get('message', '')}")
    return "" if err is None else str(err)


def node_table(report: dict[str, Any], title: str | None = None) -> Table:
    """The node table shared by ``status`` and the report."""
    t = Table(title=title, title_justify="left", expand=False)
    for col in (
        "node",
        "agent",
        "status",
        "att",
        "steps",
        "tok in/out",
        "tools",
        "cost $",
        "time s",
        "error",
    ):
        t.add_column(col, overflow="fold")
    for n in report["nodes"]:
        steps = str(n["steps"]) + (f" ({n['replayed_steps']} replayed)" if n["replayed_steps"] else "")
        t.add_row(
            n["id"],
            n["agent"],
            _styled(n["status"]),
            str(n["attempt"]),
            steps,
            f"{n['tokens_in']}/{n['tokens_out']}",
            str(n["tool_calls"]),
            f"{n['cost_usd']:.4f}",
            "" if n["duration_s"] is None else f"{n['duration_s']:.2f}",
            _error_text(n["error"])[:120],
        )
    return t


def _header(report: dict[str, Any], console: Console) -> None:
    tot = report["totals"]
    dur = "" if report["duration_s"] is None else f" in {report['duration_s']:.2f}s"
    console.print(f"[bold]run {report['run_id']}[/] ({report['name']}): {_styled(report['status'])}{dur}")
    console.print(f"execution hash {report['exec_hash']}")
    if report.get("replay_of"):
        point = f" from {report['replay_point']}" if report.get("replay_point") else ""
        changes = f", changed: {'; '.join(report['overrides'])}" if report.get("overrides") else ""
        console.print(f"replay of {report['replay_of']}{point}{changes}", highlight=False)
    console.print(
        f"nodes {tot['nodes_done']}/{tot['nodes']} done, {tot['nodes_failed']} failed · "
        f"steps {tot['steps']} (+{tot['replayed_steps']} replayed) · tokens "
        f"{tot['tokens_in']} in / {tot['tokens_out']} out · tool calls {tot['tool_calls']} · "
        f"cost ${tot['cost_usd']:.4f}"
    )


def render_status(report: dict[str, Any], console: Console) -> None:
    _header(report, console)
    console.print(node_table(report))


def render_report(
    report: dict[str, Any], console: Console, output_chars: int = 600, max_nodes: int | None = None
) -> None:
    """The full execution report: header, node table, then per node its state history,
    agent lifecycle, output and error.

    With ``max_nodes`` (``run``, ``submit --wait``), a run of more nodes than that is
    summarised: the counts by status, and the table and details of only the nodes that
    did not succeed (at most ``max_nodes`` of them); ``--json`` has every node."""
    console.rule("[bold]Execution report")
    nodes = report["nodes"]
    shown = nodes
    if max_nodes is not None and len(nodes) > max_nodes:
        _header(report, console)
        counts = Counter(n["status"] for n in nodes)
        console.print("by status: " + " · ".join(f"{_styled(k)} {v}" for k, v in sorted(counts.items())))
        unsuccessful = [n for n in nodes if n["status"] != "SUCCEEDED"]
        shown = unsuccessful[:max_nodes]
        if shown:
            console.print(node_table({**report, "nodes": shown}))
        if not unsuccessful:
            what = "all SUCCEEDED"
        elif len(shown) < len(unsuccessful):
            what = f"shown are the first {len(shown)} of the {len(unsuccessful)} that did not succeed"
        else:
            what = f"shown are the {len(shown)} that did not succeed"
        console.print(f"[dim]{len(nodes)} nodes: {what}; --json has every node[/]", highlight=False)
    else:
        render_status(report, console)
    for n in shown:
        console.print(f"\n[bold]{n['id']}[/] [{n['agent']}] {_styled(n['status'])}")
        hist = " → ".join(f"{h['state']}@{h['t_ms'] / 1000:.3f}s" for h in n["state_history"])
        if hist:
            console.print(f"  states:    {hist}", highlight=False)
        if n["agent_states"]:
            console.print(f"  lifecycle: {' → '.join(n['agent_states'])}", highlight=False)
        if n["output"] is not None:
            text = n["output"] if isinstance(n["output"], str) else json.dumps(n["output"])
            if len(text) > output_chars:
                text = text[:output_chars] + f"… ({len(text)} chars)"
            console.print(
                "  output:    " + text.replace("\n", "\n             "), highlight=False, markup=False
            )
        if n["error"]:
            console.print(f"  error:     [red]{_error_text(n['error'])}[/]", highlight=False)
