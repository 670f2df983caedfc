"""Replay and fork: a new run that re-drives a past run's agent code against its record
(docs/replay.md).

The new run is an ordinary run with three things written at submission, in the same
atomic ``submit.lua`` call: its step ledger *seeded* with records of the original, the
model messages those records refer to, and the nodes that need not run *copied* as
SUCCEEDED with the original's outputs. Workers then run it like any other run: a step
found in the ledger is served from it (``STEP_REPLAYED``, the same mechanism that
resumes a node after a crash), the first step without a record goes live.

Given a point ``NODE:SEQ`` (``--from-step``; ``--from-node NODE`` is ``NODE:1``):

* ``NODE`` runs with its steps ``1 .. SEQ-1`` served from the record, live from ``SEQ``;
* the nodes downstream of ``NODE`` run live (their inputs may differ now);
* every other node that SUCCEEDED is copied without running; one that did not is
  re-driven against its whole record and goes live where the record ends.

Without a point (a *full* replay), every node is re-driven against its whole record and
nothing executes live: the run is *strict*, a step the record does not have, or a
recorded step the code no longer issues, fails the node with a
:class:`~oao_common.errors.NonDeterminismError` (``live=True`` lets steps past the end
of the record run live instead).

A *fork* is a replay from a point with changes: ``path=value`` settings of the spec
(``nodes.<id>.task``, ``agents.<name>.system``, ``models.<name>.model``,
``defaults.policy.max_tokens``, ...), new inputs, and ``result...=value`` overriding the
recorded result of the step at the point (it is then served from the ledger with that
result). The new run's execution hash covers the changed spec and the overridden results.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from oao_common.broker import Broker, new_run_id
from oao_common.errors import OAOError, SpecError
from oao_common.events import Event
from oao_common.hashing import sha256_hex
from oao_common.ledger import message_refs, resolve_request
from oao_common.spec import Spec, parse_spec
from oao_common.spec_yaml import YamlProblem, load_yaml
from oao_common.states import NodeState

from .submit import expand

_STEP_FIELD = re.compile(r"^(?P<node>[^:]+):(?P<seq>\d+)$")
_POINT = re.compile(r"^(?P<node>[A-Za-z0-9][A-Za-z0-9_.\-]*):(?P<seq>[1-9][0-9]{0,8})$")


class ReplayError(OAOError):
    """A replay or fork that cannot be made (unknown run, node or step, a bad setting);
    the message is one line naming what is wrong."""


@dataclass(frozen=True, slots=True)
class StepRef:
    """A step of a run: node id and sequence number (1-based)."""

    node: str
    seq: int

    @classmethod
    def parse(cls, text: str) -> StepRef:
        """``"draft:3"`` → ``StepRef("draft", 3)``; raises :class:`ReplayError`."""
        m = _POINT.match(text.strip())
        if not m:
            raise ReplayError(f"{text!r} is not a step: expected NODE:SEQ, e.g. draft:2 (SEQ from 1)")
        return cls(m["node"], int(m["seq"]))

    def __str__(self) -> str:
        return f"{self.node}:{self.seq}"


@dataclass(slots=True)
class Replayed:
    """The run a replay or fork created, and how each node of it will run."""

    run_id: str
    replay_of: str
    exec_hash: str
    point: str | None
    strict: bool
    copied: list[str] = field(default_factory=list)
    seeded: dict[str, int] = field(default_factory=dict)
    live: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "replay_of": self.replay_of,
            "exec_hash": self.exec_hash,
            "point": self.point,
            "strict": self.strict,
            "copied": self.copied,
            "seeded": self.seeded,
            "live": self.live,
            "overrides": self.overrides,
        }


@dataclass(slots=True)
class _Original:
    run_id: str
    run: dict[str, str]
    spec: Spec
    nodes: dict[str, dict[str, str]]
    records: dict[str, dict[int, dict[str, Any]]]  # node -> seq -> record
    messages: dict[str, str]


async def _load(broker: Broker, run_id: str) -> _Original:
    run = await broker.get_run(run_id)
    if not run:
        raise ReplayError(f"no run {run_id!r}")
    spec_json, _inputs, _started = await broker.get_spec_json(run_id)
    if spec_json is None:
        raise ReplayError(f"run {run_id} has no stored spec")
    spec = Spec.from_stored_json(spec_json)
    node_ids = [n for n in run.get("node_ids", "").split(",") if n]
    nodes = {n["id"]: n for n in await broker.get_nodes(run_id, node_ids)}
    records: dict[str, dict[int, dict[str, Any]]] = {nid: {} for nid in node_ids}
    for f, rec in (await broker.get_steps(run_id)).items():
        m = _STEP_FIELD.match(f)  # not the "<node>:<seq>:started" markers
        if m and m["node"] in records and isinstance(rec, dict) and "result" in rec:
            records[m["node"]][int(m["seq"])] = rec
    return _Original(run_id, run, spec, nodes, records, await broker.all_messages(run_id))


def _downstream(spec: Spec, start: str) -> set[str]:
    """``start``'s transitive dependents (``start`` excluded)."""
    dependents = spec.dependents()
    seen: set[str] = set()
    todo = list(dependents[start])
    while todo:
        nid = todo.pop()
        if nid not in seen:
            seen.add(nid)
            todo.extend(dependents[nid])
    return seen


def _parse_value(path: str, raw: str) -> Any:
    try:
        return load_yaml(raw).data if raw else ""
    except YamlProblem as e:
        if not e.syntax:
            raise ReplayError(f"--set {path}: {e.message}") from None
        return raw  # not YAML: the text itself


def _set_path(doc: Any, path: str, parts: list[str], value: Any) -> None:
    """Set ``doc[parts...] = value``; a list of nodes is addressed by node id."""
    target = doc
    for i, key in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(target, list):
            match = [x for x in target if isinstance(x, dict) and x.get("id") == key]
            if not match:
                raise ReplayError(f"--set {path}: no item with id {key!r} under {'.'.join(parts[:i])}")
            if last:
                raise ReplayError(f"--set {path}: name a field of {key!r}, not the whole item")
            target = match[0]
        elif isinstance(target, dict):
            if last:
                target[key] = value
            else:
                if target.get(key) is None:
                    target[key] = {}
                target = target[key]
        else:
            raise ReplayError(f"--set {path}: {'.'.join(parts[:i])} is not a mapping")


def _override_result(record: dict[str, Any], path: str, parts: list[str], value: Any) -> dict[str, Any]:
    out = json.loads(json.dumps(record))
    if not parts:
        out["result"] = value
    else:
        if not isinstance(out.get("result"), dict):
            raise ReplayError(f"--set {path}: the recorded result is not a mapping")
        _set_path(out["result"], path, parts, value)
    out["overridden"] = True
    return out


def _changed_spec(orig: Spec, sets: Sequence[tuple[str, Any]], inputs: dict[str, Any] | None) -> Spec:
    if not sets and not inputs:
        return orig
    doc = orig.model_dump(mode="json")
    for path, value in sets:
        _set_path(doc, path, path.split("."), value)
    if inputs:
        doc["inputs"] = {**(doc.get("inputs") or {}), **inputs}
    try:
        return parse_spec(json.dumps(doc), "fork")
    except SpecError as e:
        raise ReplayError("the changed spec is invalid: " + "; ".join(e.problems)) from None


async def replay(
    broker: Broker,
    run_id: str,
    *,
    from_step: StepRef | None = None,
    live: bool = False,
    sets: Sequence[str] = (),
    inputs: dict[str, Any] | None = None,
) -> Replayed:
    """Create a run that replays ``run_id`` (module doc) and return what it made.

    ``from_step``: the point (``None``: a full replay, strict unless ``live``).
    ``sets``: fork changes, ``"path=value"`` (values parsed as YAML scalars); a path
    starting with ``result`` overrides the recorded result of the step at the point.
    ``inputs``: new values of the spec's inputs. Raises :class:`ReplayError`.
    """
    orig = await _load(broker, run_id)
    spec_sets: list[tuple[str, Any]] = []
    result_sets: list[tuple[str, list[str], Any]] = []
    for item in sets:
        path, eq, raw = item.partition("=")
        path = path.strip()
        if not eq or not path:
            raise ReplayError(f"--set {item!r}: expected path=value")
        parts = path.split(".")
        if parts[0] == "result":
            result_sets.append((path, parts[1:], _parse_value(path, raw)))
        else:
            spec_sets.append((path, _parse_value(path, raw)))
    if (spec_sets or inputs or result_sets) and from_step is None:
        raise ReplayError("a fork needs a point: --from-step NODE:SEQ or --from-node NODE")
    spec = _changed_spec(orig.spec, spec_sets, inputs)
    if set(spec.dependents()) != set(orig.nodes):
        raise ReplayError("a fork may change nodes, not add or remove them")

    rid = new_run_id()
    run_fields, nodes, exec_hash, spec_json = expand(spec, rid)
    out = Replayed(
        rid, run_id, exec_hash, str(from_step) if from_step else None, from_step is None and not live
    )
    seed: dict[str, str] = {}
    overridden: dict[str, Any] = {}

    downstream: set[str] = set()
    if from_step is not None:
        if from_step.node not in orig.nodes:
            raise ReplayError(f"run {run_id} has no node {from_step.node!r}")
        recorded = orig.records[from_step.node]
        last = max(recorded, default=0)
        if from_step.seq > last + 1:
            raise ReplayError(
                f"node {from_step.node} of run {run_id} recorded {last} steps: "
                f"--from-step can be {from_step.node}:1 .. {from_step.node}:{last + 1}"
            )
        if result_sets and from_step.seq not in recorded:
            raise ReplayError(f"--set result...: step {from_step} has no recorded result to override")
        downstream = _downstream(spec, from_step.node)

    def seed_node(nid: str, upto: int) -> int:
        n = 0
        for seq, rec in orig.records[nid].items():
            if seq < upto:
                seed[f"{nid}:{seq}"] = json.dumps(rec, separators=(",", ":"))
                n = max(n, seq)
        return n

    copied: set[str] = set()
    for node in nodes:
        nid = node["id"]
        f = node["fields"]
        if from_step is None:
            n = seed_node(nid, 10**9)
            if n:
                out.seeded[nid] = n
            else:
                out.live.append(nid)
        elif nid == from_step.node:
            n = seed_node(nid, from_step.seq)
            if result_sets:
                rec = orig.records[nid][from_step.seq]
                for path, parts, value in result_sets:
                    rec = _override_result(rec, path, parts, value)
                seed[f"{nid}:{from_step.seq}"] = json.dumps(rec, separators=(",", ":"))
                overridden[f"{nid}:{from_step.seq}"] = rec["result"]
                n = from_step.seq
            if n:
                out.seeded[nid] = n
            else:
                out.live.append(nid)
        elif nid in downstream:
            out.live.append(nid)
        elif orig.nodes[nid].get("status") == NodeState.SUCCEEDED:
            copied.add(nid)
            f.update(
                status=str(NodeState.SUCCEEDED),
                output=orig.nodes[nid].get("output", "null"),
                copied_from=run_id,
                attempt="0",
            )
        else:
            n = seed_node(nid, 10**9)
            if n:
                out.seeded[nid] = n
            else:
                out.live.append(nid)
        if nid in out.seeded:
            f["steps_recorded"] = str(out.seeded[nid])
    by_id = {n.id: n for n in spec.nodes}
    for node in nodes:
        nid = node["id"]
        if nid in copied:
            continue
        pending = sum(1 for d in by_id[nid].depends_on if d not in copied)
        node["fields"]["pending"] = str(pending)
        node["fields"]["status"] = str(NodeState.READY if pending == 0 else NodeState.PENDING)
    out.copied = [n.id for n in spec.nodes if n.id in copied]

    refs = {
        ref
        for rec_json in seed.values()
        for ref in (json.loads(rec_json).get("request") or {}).get("messages") or []
        if isinstance(ref, str)
    }
    messages = {r: orig.messages[r] for r in refs if r in orig.messages}
    out.overrides = [*(f"{p}={json.dumps(v)}" for p, v in spec_sets), *(f"inputs.{k}" for k in inputs or {})]
    out.overrides += [f"{p}={json.dumps(v)}" for p, _parts, v in result_sets]
    if overridden:
        exec_hash = out.exec_hash = sha256_hex({"spec": exec_hash, "results": overridden})
    run_fields.update(
        exec_hash=exec_hash,
        replay_of=run_id,
        replay_point=out.point or "",
        replay_strict="1" if out.strict else "0",
        nodes_done=str(len(copied)),
        nodes_succeeded=str(len(copied)),
    )
    if out.overrides:
        run_fields["overrides"] = json.dumps(out.overrides)
    await broker.submit(
        rid,
        run_fields,
        nodes,
        {"name": spec.name, "nodes": len(spec.nodes), "exec_hash": exec_hash, "replay_of": run_id},
        spec_hash=run_fields["spec_hash"],
        spec_json=spec_json,
        seed_steps=seed,
        seed_messages=messages,
    )
    return out


# ---------------------------------------------------------------- checking a replay

#: Event types left out of a normalized trace: their presence depends on timing and
#: faults, not on what the code did (a live tool step's started marker, retries, waits).
_UNTRACED = frozenset(
    {"STEP_STARTED", "STEP_RETRIED", "RATE_LIMIT_WAIT", "LOOP_BLOCKED", "STALE_ATTEMPT_REJECTED", "ESCALATED"}
)


def normalized_trace(events: Sequence[Event]) -> dict[str, list[str]]:
    """A run's event log as it must look again when the run is replayed: per node (``""``
    for the run's own events) the order of what happened, with ids, timestamps,
    attempts, workers and durations left out. A step served from the record
    (``STEP_REPLAYED``) reads as the ``STEP_COMPLETED`` it replays; retries and other
    timing-dependent events are left out, and so are the events of attempts that did not
    end the node (a crash, a retry)."""
    per_node: dict[str, list[str]] = {}
    for ev in events:
        if ev.type in _UNTRACED:
            continue
        typ = "STEP_COMPLETED" if ev.type == "STEP_REPLAYED" else ev.type
        if typ == "STEP_COMPLETED":
            line = f"{typ} {ev.data.get('seq')} {ev.data.get('kind')} {ev.data.get('name')}"
        elif typ == "STATE_ENTER":
            line = f"{typ} {ev.data.get('state')}"
        else:
            line = typ
        per_node.setdefault(ev.node, []).append(line)
    out: dict[str, list[str]] = {}
    for node, lines in per_node.items():
        starts = [i for i, ln in enumerate(lines) if ln == "NODE_STARTED"]
        if node and len(starts) > 1:  # before the first attempt, then the last attempt
            lines = lines[: starts[0]] + lines[starts[-1] :]
        out[node] = lines
    return out


async def verify_replay(broker: Broker, original: str, replayed: str) -> list[str]:
    """What differs between a finished run and its full replay: one line per problem
    (run or node status, a node's output, a node's normalized trace); empty when the
    replay reproduced the original."""
    problems = []
    a, b = await broker.get_run(original), await broker.get_run(replayed)
    if a.get("status") != b.get("status"):
        problems.append(f"run status: {a.get('status')} -> {b.get('status')}")
    ids = [n for n in a.get("node_ids", "").split(",") if n]
    na = {n["id"]: n for n in await broker.get_nodes(original, ids)}
    nb = {n["id"]: n for n in await broker.get_nodes(replayed, ids)}
    for nid in ids:
        x, y = na[nid], nb[nid]
        if x.get("status") != y.get("status"):
            problems.append(f"node {nid}: status {x.get('status')} -> {y.get('status')}")
            if y.get("error"):
                problems.append(f"node {nid}: {_error_text(y.get('error'))}")
        elif x.get("output") != y.get("output"):
            problems.append(f"node {nid}: output {_short(x.get('output'))} -> {_short(y.get('output'))}")
    ta = normalized_trace(await broker.events(original))
    tb = normalized_trace(await broker.events(replayed))
    for nid in [*ids, ""]:
        if ta.get(nid) != tb.get(nid) and not any(p.startswith(f"node {nid}:") for p in problems):
            where = f"node {nid}" if nid else "run"
            problems.append(f"{where}: event trace {ta.get(nid)} -> {tb.get(nid)}")
    return problems


def _short(text: str | None, limit: int = 120) -> str:
    t = text or "null"
    return t if len(t) <= limit else t[: limit - 1] + "…"


def _error_text(raw: str | None) -> str:
    try:
        err = json.loads(raw or "null")
    except ValueError:
        return str(raw)
    return str(err.get("message") if isinstance(err, dict) else err)


@dataclass(slots=True)
class CheckResult:
    """How one exported run replayed against the code installed now: ``problems`` is
    empty when the replay reproduced it (:func:`verify_replay`)."""

    source: str
    original: str
    replay_id: str
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "original": self.original,
            "replay": self.replay_id,
            "ok": self.ok,
            "problems": self.problems,
        }


async def check_exported(
    broker: Broker, sources: Sequence[tuple[str, list[str]]], timeout_s: float = 300.0
) -> list[CheckResult]:
    """Import each exported run (``(name, lines)``, lines of an ``oao-scheduler export``
    file), replay it in full and compare (:func:`verify_replay`). Workers must be running
    on ``broker`` (the caller's fleet: they run the agent code installed now). Raises
    :class:`~oao_scheduler.export.ExportError` for a file that cannot be imported and
    :class:`~oao_common.errors.WaitTimeout` when the replays have not ended after
    ``timeout_s`` seconds."""
    from oao_common.errors import WaitTimeout

    from .export import import_run

    started: list[tuple[str, str, Replayed]] = []
    for name, lines in sources:
        rid = await import_run(broker, lines)
        started.append((name, rid, await replay(broker, rid)))
    deadline = asyncio.get_running_loop().time() + timeout_s
    pending = {r.run_id for _n, _rid, r in started}
    while pending:
        pending = {rid for rid in pending if not await broker.run_is_terminal(rid)}
        if pending and asyncio.get_running_loop().time() > deadline:
            raise WaitTimeout(f"{len(pending)} replays had not ended after {timeout_s:g} s")
        if pending:
            await asyncio.sleep(0.05)
    return [
        CheckResult(name, rid, r.run_id, await verify_replay(broker, rid, r.run_id))
        for name, rid, r in started
    ]


async def recorded_step(broker: Broker, run_id: str, point: StepRef) -> dict[str, Any]:
    """One recorded step as the model or tool saw it: the record with its request's
    messages resolved (:func:`oao_common.ledger.resolve_request`). Raises
    :class:`ReplayError` if the run or the step has no record."""
    if not await broker.get_run(run_id):
        raise ReplayError(f"no run {run_id!r}")
    upto = int((await broker.get_nodes(run_id, [point.node]))[0].get("steps_recorded") or 0)
    records = {r["seq"]: r for r in await broker.get_node_steps(run_id, point.node, max(upto, point.seq))}
    rec = records.get(point.seq)
    if rec is None:
        raise ReplayError(f"run {run_id} has no recorded step {point}")
    request = rec.get("request")
    if isinstance(request, dict):
        refs = message_refs(request, records) or []
        request = resolve_request(request, await broker.get_messages(run_id, refs), records)
    return {**rec, "request": request}


__all__ = [
    "CheckResult",
    "ReplayError",
    "Replayed",
    "StepRef",
    "check_exported",
    "normalized_trace",
    "recorded_step",
    "replay",
    "verify_replay",
]
