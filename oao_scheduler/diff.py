"""Comparing two runs node by node and step by step (docs/replay.md, "Diff").

:func:`diff_runs` reads both runs (on one broker, or each on its own: two prefixes or
two servers) and returns a JSON-able dict; :func:`render_diff` prints it with rich.

A node is ``same`` when both runs have it with equal status, output, error and step
ledger. Ledger records are compared by ``kind``, ``name``, ``request_hash`` and
``result`` (``attempt``, ``duration_ms`` and usage are not compared; the recorded
values of ``clock``, ``random`` and ``uuid`` steps neither, only that they were taken).
Outputs and errors are compared as decoded JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from oao_common.broker import Broker
from oao_common.ledger import VOLATILE_KINDS, message_refs, resolve_request

from .export import STEP_KEY_RE, RunNotFound
from .report import _styled

VERDICTS = ("same", "differs", "only_in_a", "only_in_b")
#: Totals compared between the runs (run hash fields; ``duration_s`` is computed).
TOTALS = ("nodes", "nodes_failed", "steps", "tool_calls", "tokens_in", "tokens_out", "cost_usd", "duration_s")


@dataclass(slots=True)
class _Run:
    broker: Broker
    id: str
    run: dict[str, str]
    node_ids: list[str]
    nodes: dict[str, dict[str, str]]
    ledger: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)


async def _load(broker: Broker, run_id: str) -> _Run:
    """The run hash, node hashes and ledger (records only, by node and seq) of a run.

    A node a replay copied without running (``copied_from``) has the ledger of the run
    it was copied from (when that run is still there), so it compares like the node it
    is a copy of."""
    run = await broker.get_run(run_id)
    if not run:
        raise RunNotFound(f"no run {run_id!r} under prefix {broker.keys.prefix!r}")
    node_ids = [n for n in run.get("node_ids", "").split(",") if n]
    nodes = await broker.get_nodes(run_id, node_ids)
    ledger = await _ledger(broker, run_id)
    sources: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    for n in nodes:
        src = n.get("copied_from")
        if src and n["id"] not in ledger:
            if src not in sources:
                sources[src] = await _ledger(broker, src)
            if n["id"] in sources[src]:
                ledger[n["id"]] = sources[src][n["id"]]
    return _Run(broker, run_id, run, node_ids, {n["id"]: n for n in nodes}, ledger)


async def _ledger(broker: Broker, run_id: str) -> dict[str, dict[int, dict[str, Any]]]:
    raw = await broker.redis.hgetall(broker.keys.steps(run_id))
    ledger: dict[str, dict[int, dict[str, Any]]] = {}
    for key, text in raw.items():
        m = STEP_KEY_RE.match(key)
        if not m or m[3]:
            continue  # a started marker, not a record
        try:
            rec = json.loads(text)
        except ValueError:
            rec = {"unreadable": text}
        ledger.setdefault(m[1], {})[int(m[2])] = rec if isinstance(rec, dict) else {"value": rec}
    return ledger


def _decode(text: str | None) -> Any:
    if text is None or text == "":
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def _num(value: Any, kind: type[int] | type[float] = int) -> Any:
    try:
        return kind(float(value or 0))
    except (TypeError, ValueError):
        return kind(0)


def _totals(r: _Run) -> dict[str, Any]:
    run = r.run
    start = _num(run.get("started_at") or run.get("created_at"))
    end = _num(run.get("finished_at"))
    return {
        "nodes": _num(run.get("nodes_total")) or len(r.node_ids),
        "nodes_failed": _num(run.get("nodes_failed")),
        "steps": _num(run.get("steps")),
        "tool_calls": _num(run.get("tool_calls")),
        "tokens_in": _num(run.get("tokens_in")),
        "tokens_out": _num(run.get("tokens_out")),
        "cost_usd": _num(run.get("cost_usd"), float),
        "duration_s": round((end - start) / 1000, 3) if start and end else None,
    }


def _delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in TOTALS:
        if a[k] is None or b[k] is None:
            out[k] = None
        elif isinstance(a[k], float) or isinstance(b[k], float):
            out[k] = round(b[k] - a[k], 10)
        else:
            out[k] = b[k] - a[k]
    return out


def _node_side(r: _Run, nid: str) -> dict[str, Any]:
    n = r.nodes.get(nid, {})
    return {
        "status": n.get("status", "?"),
        "output": _decode(n.get("output")),
        "error": _decode(n.get("error")),
        "steps": len(r.ledger.get(nid, {})),
    }


def _step_differences(ra: dict[str, Any] | None, rb: dict[str, Any] | None) -> list[str]:
    """What differs between two records of one seq: ``kind``, ``name``, ``request``,
    ``result``; ``["only_in_a"]`` / ``["only_in_b"]`` when one side has no record."""
    if ra is None or rb is None:
        return ["only_in_b" if ra is None else "only_in_a"]
    out = [f for f in ("kind", "name") if ra.get(f) != rb.get(f)]
    if ra.get("request_hash") != rb.get("request_hash"):
        out.append("request")
    volatile = ra.get("kind") in VOLATILE_KINDS and not out
    if not volatile and ra.get("result") != rb.get("result"):
        out.append("result")
    return out


async def _step_side(r: _Run, nid: str, seq: int, rec: dict[str, Any] | None) -> dict[str, Any] | None:
    """One side of a divergent step, the request's messages resolved from the run's
    message store (:func:`oao_common.ledger.resolve_request`; a ref not stored becomes
    ``{"missing_message": ref}``). Volatile steps' values are compared by presence only
    (:data:`~oao_common.ledger.VOLATILE_KINDS`)."""
    if rec is None:
        return None
    request = rec.get("request")
    if isinstance(request, dict):
        records: dict[int, dict[str, Any] | None] = dict(r.ledger.get(nid, {}))
        refs = message_refs(request, records) or []
        bodies = await r.broker.get_messages(r.id, refs)
        request = resolve_request(request, bodies, records)
    return {
        "seq": seq,
        "kind": rec.get("kind"),
        "name": rec.get("name"),
        "request_hash": rec.get("request_hash"),
        "request": request,
        "result": rec.get("result"),
        "usage": rec.get("usage") or {},
    }


async def _compare_node(a: _Run, b: _Run, nid: str) -> dict[str, Any]:
    side_a, side_b = _node_side(a, nid), _node_side(b, nid)
    differences = [f for f in ("status", "output", "error") if side_a[f] != side_b[f]]
    la, lb = a.ledger.get(nid, {}), b.ledger.get(nid, {})
    first = None
    for seq in sorted(set(la) | set(lb)):
        what = _step_differences(la.get(seq), lb.get(seq))
        if what:
            differences.append("steps")
            first = {
                "seq": seq,
                "key": f"{nid}:{seq}",
                "differs_in": what,
                "a": await _step_side(a, nid, seq, la.get(seq)),
                "b": await _step_side(b, nid, seq, lb.get(seq)),
            }
            break
    return {
        "id": nid,
        "verdict": "differs" if differences else "same",
        "differences": differences,
        "a": side_a,
        "b": side_b,
        "first_divergent_step": first,
    }


async def diff_runs(
    broker_a: Broker, run_a: str, run_b: str, broker_b: Broker | None = None
) -> dict[str, Any]:
    """Compare run ``run_a`` (on ``broker_a``) with ``run_b`` (on ``broker_b``, default
    ``broker_a``: another prefix or server works too). Returns::

        {"a": {"run_id", "name", "status", "exec_hash"}, "b": {...},
         "identical": bool,                  # every node same, no node on one side only
         "counts": {"same": n, "differs": n, "only_in_a": n, "only_in_b": n},
         "nodes": [{"id", "verdict": "same" | "differs" | "only_in_a" | "only_in_b",
                    "differences": ["status", "output", "error", "steps"],
                    "a": {"status", "output", "error", "steps"} | None, "b": ... | None,
                    "first_divergent_step": None | {"seq", "key", "differs_in": [...],
                        "a": {"seq", "kind", "name", "request_hash", "request", "result",
                              "usage"} | None, "b": ... | None}}],
         "totals": {"a": {totals}, "b": {totals}, "delta": b - a}}

    Nodes come in A's order, then those only in B. ``request`` is the record's stored
    request (messages resolved from the run's message store) or ``None`` for records
    that only hold ``request_hash``. ``differs_in`` lists ``kind``, ``name``,
    ``request``, ``result``, or ``only_in_a`` / ``only_in_b`` when one ledger ends
    first. Totals: ``nodes``, ``nodes_failed``, ``steps``, ``tool_calls``,
    ``tokens_in``, ``tokens_out``, ``cost_usd``, ``duration_s`` (``None`` while
    running). Raises :class:`~oao_scheduler.export.RunNotFound`.
    """
    a = await _load(broker_a, run_a)
    b = await _load(broker_b or broker_a, run_b)
    nodes: list[dict[str, Any]] = []
    for nid in a.node_ids:
        if nid in b.nodes:
            nodes.append(await _compare_node(a, b, nid))
        else:
            nodes.append(_one_sided(nid, "only_in_a", _node_side(a, nid), None))
    for nid in b.node_ids:
        if nid not in a.nodes:
            nodes.append(_one_sided(nid, "only_in_b", None, _node_side(b, nid)))
    counts = {v: sum(1 for n in nodes if n["verdict"] == v) for v in VERDICTS}
    ta, tb = _totals(a), _totals(b)
    return {
        "a": _run_side(a),
        "b": _run_side(b),
        "identical": counts["same"] == len(nodes),
        "counts": counts,
        "nodes": nodes,
        "totals": {"a": ta, "b": tb, "delta": _delta(ta, tb)},
    }


def _one_sided(nid: str, verdict: str, a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any]:
    return {"id": nid, "verdict": verdict, "differences": [], "a": a, "b": b, "first_divergent_step": None}


def _run_side(r: _Run) -> dict[str, Any]:
    return {
        "run_id": r.id,
        "name": r.run.get("name", ""),
        "status": r.run.get("status", "?"),
        "exec_hash": r.run.get("exec_hash", ""),
    }


# ---------------------------------------------------------------- rendering

VERDICT_STYLE = {"same": "green", "differs": "red", "only_in_a": "yellow", "only_in_b": "yellow"}


def _short(value: Any, limit: int = 100) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _step_label(first: dict[str, Any] | None) -> str:
    if not first:
        return ""
    s = first["a"] or first["b"]
    return f"#{first['seq']} {s['kind']} {s['name']}: {', '.join(first['differs_in'])}"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def render_diff(d: dict[str, Any], console: Console, width: int = 100) -> None:
    """Print a diff: the runs, a node table (verdict, statuses, first divergent step),
    both sides of each first divergent step, and the totals with their differences."""
    a, b = d["a"], d["b"]
    console.print(f"[bold]A[/] {a['run_id']} ({a['name']}) {_styled(a['status'])}", highlight=False)
    console.print(f"[bold]B[/] {b['run_id']} ({b['name']}) {_styled(b['status'])}", highlight=False)
    c = d["counts"]
    console.print(
        ("[green]identical[/]" if d["identical"] else "[red]different[/]")
        + f": {c['same']} same, {c['differs']} differ, {c['only_in_a']} only in A, {c['only_in_b']} only in B"
    )
    t = Table(title_justify="left")
    for col in ("node", "verdict", "A status", "B status", "differs in", "first divergent step"):
        t.add_column(col, overflow="fold")
    for n in d["nodes"]:
        style = VERDICT_STYLE[n["verdict"]]
        t.add_row(
            n["id"],
            f"[{style}]{n['verdict'].replace('_', ' ')}[/]",
            _styled(n["a"]["status"]) if n["a"] else "",
            _styled(n["b"]["status"]) if n["b"] else "",
            ", ".join(n["differences"]),
            _step_label(n["first_divergent_step"]),
        )
    console.print(t)
    for n in d["nodes"]:
        first = n["first_divergent_step"]
        if not first:
            continue
        console.print(f"\n[bold]{first['key']}[/] differs in {', '.join(first['differs_in'])}")
        for label, side in (("A", first["a"]), ("B", first["b"])):
            if side is None:
                console.print(f"  {label}: (no step)", highlight=False)
                continue
            req = side["request"] if side["request"] is not None else f"hash {side['request_hash']}"
            u = side["usage"]
            console.print(f"  {label} request: {_short(req, width)}", highlight=False, markup=False)
            console.print(
                f"  {label} result:  {_short(side['result'], width)}", highlight=False, markup=False
            )
            console.print(
                f"  {label} usage:   {u.get('in', 0)} in / {u.get('out', 0)} out, "
                f"${float(u.get('cost_usd') or 0):.4f}",
                highlight=False,
            )
    console.print()
    tt = Table(title="totals", title_justify="left")
    for col in ("", "A", "B", "B - A"):
        tt.add_column(col, justify="right" if col else "left")
    for k in TOTALS:
        ta, tb, dd = d["totals"]["a"][k], d["totals"]["b"][k], d["totals"]["delta"][k]
        sign = "+" if isinstance(dd, (int, float)) and dd > 0 else ""
        tt.add_row(k, _fmt(ta), _fmt(tb), sign + _fmt(dd) if dd else _fmt(dd))
    console.print(tt)


__all__ = ["VERDICTS", "diff_runs", "render_diff"]
