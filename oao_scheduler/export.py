"""Export and import of finished runs as JSON lines (docs/replay.md, "Export and import").

:func:`export_run` reads one terminal run (run hash, stored spec, node hashes, step
ledger, model messages, event stream) in one ``MULTI`` snapshot and returns it as a list
of JSON-able dicts, one per line of the file; :func:`import_run` validates such lines and
writes the run into another Redis (or prefix) in one ``MULTI``/``EXEC`` transaction.

The format, version 1, in the order the lines must come::

    {"format": "oao-run", "version": 1, "run_id": str, "exported_at_ms": int}   header
    {"type": "run", "fields": {field: str}}                   the run hash, fields sorted
    {"type": "spec", "spec_hash": hex, "spec": {...}}         the spec without inputs
    {"type": "node", "id": str, "fields": {field: str}}       per node, in node_ids order
    {"type": "step", "key": "<node>:<seq>[:started]", "record": {...}}   ledger entries
    {"type": "message", "ref": hex32, "message": JSON}        content-addressed messages
    {"type": "event", "id": "<ms>-<seq>", "fields": {field: str}}        stream order
    {"type": "end", "nodes": n, "steps": n, "messages": n, "events": n}  the trailer

Hash and stream fields are kept as the strings Redis holds; ledger records, messages
and the spec are JSON values. The trailer's counts detect a truncated file.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from typing import Any

from redis import exceptions as redis_exc

from oao_common.broker import Broker, new_run_id
from oao_common.errors import OAOError
from oao_common.hashing import canonical_json, sha256_hex
from oao_common.spec import ID_PATTERN
from oao_common.states import RunState
from oao_common.stored_spec import split_doc

FORMAT = "oao-run"
VERSION = 1

#: Line types after the header, in the order they must appear.
LINE_ORDER = ("run", "spec", "node", "step", "message", "event", "end")

RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
NODE_ID_RE = re.compile(ID_PATTERN)
STEP_KEY_RE = re.compile(r"^([^:]+):([0-9]+)(:started)?$")
EVENT_ID_RE = re.compile(r"^([0-9]+)-([0-9]+)$")
SPEC_HASH_RE = re.compile(r"^[0-9a-f]{64}$")
REF_RE = re.compile(r"^[0-9a-f]{32}$")


class ExportError(OAOError):
    """A run cannot be exported, imported or compared; the message is one line."""


class RunNotFound(ExportError, LookupError):
    """No run of that id under the broker's prefix."""


class RunNotTerminal(ExportError):
    """The run has not ended: its nodes may still be running under a worker's lease."""


class RunExists(ExportError):
    """Import refused: a run of that id (or one of its keys) already exists."""


class FormatError(ExportError, ValueError):
    """An export file that cannot be imported; ``line`` is its 1-based line number
    (0 when the problem is not one line's, e.g. an empty file)."""

    def __init__(self, line: int, problem: str) -> None:
        self.line = line
        self.problem = problem
        super().__init__(f"line {line}: {problem}" if line else problem)


# ---------------------------------------------------------------- export


async def export_run(broker: Broker, run_id: str) -> list[dict[str, Any]]:
    """The lines of the export of terminal run ``run_id`` (format in the module doc).

    Read in one ``MULTI`` (a consistent snapshot: an ``ESCALATED`` event appended later
    is not half-read). A run from before shared specs (whole spec in the run hash's
    ``spec`` field) is exported in the shared form: ``spec_hash`` and ``inputs`` in the
    run fields, the spec in the spec line. Raises :class:`RunNotFound`,
    :class:`RunNotTerminal` (importing a half-run would leave RUNNING nodes with no
    lease), or :class:`ExportError` when the stored spec or a ledger entry is unreadable.
    """
    k = broker.keys
    r = broker.redis
    run = dict(await r.hgetall(k.run(run_id)))
    if not run:
        raise RunNotFound(f"no run {run_id!r}")
    node_ids = [n for n in run.get("node_ids", "").split(",") if n]
    spec_hash = run.get("spec_hash") or ""
    async with r.pipeline(transaction=True) as p:
        p.hgetall(k.run(run_id))
        for nid in node_ids:
            p.hgetall(k.node(run_id, nid))
        p.hgetall(k.steps(run_id))
        p.hgetall(k.messages(run_id))
        p.xrange(k.events(run_id), "-", "+")
        if spec_hash:
            p.hget(k.spec(spec_hash), "json")
        else:
            p.echo("")
        res = await p.execute()
    run, nodes, steps, messages, events, spec_body = (
        dict(res[0]),
        res[1 : 1 + len(node_ids)],
        dict(res[-4]),
        dict(res[-3]),
        res[-2],
        res[-1],
    )
    if not run:
        raise RunNotFound(f"no run {run_id!r} (deleted while exporting)")
    status = run.get("status", "")
    if status not in RunState.__members__ or not RunState(status).terminal:
        raise RunNotTerminal(
            f"run {run_id} is {status or 'in an unknown state'}, not finished: export a run "
            "once it has ended (SUCCEEDED, PARTIAL, FAILED or CANCELLED), or cancel it first"
        )
    spec_doc, spec_hash = _spec_of(run_id, run, spec_body)
    lines: list[dict[str, Any]] = [
        {"format": FORMAT, "version": VERSION, "run_id": run_id, "exported_at_ms": int(time.time() * 1000)},
        {"type": "run", "fields": dict(sorted(run.items()))},
        {"type": "spec", "spec_hash": spec_hash, "spec": spec_doc},
    ]
    for nid, fields in zip(node_ids, nodes, strict=True):
        lines.append({"type": "node", "id": nid, "fields": dict(sorted(dict(fields).items()))})
    order = {nid: i for i, nid in enumerate(node_ids)}
    for key in sorted(steps, key=lambda s: _step_sort_key(s, order)):
        try:
            record = json.loads(steps[key])
        except ValueError as e:
            raise ExportError(f"run {run_id}: ledger entry {key!r} is not JSON ({e})") from None
        lines.append({"type": "step", "key": key, "record": record})
    for ref in sorted(messages):
        try:
            message = json.loads(messages[ref])
        except ValueError as e:
            raise ExportError(f"run {run_id}: stored message {ref!r} is not JSON ({e})") from None
        lines.append({"type": "message", "ref": ref, "message": message})
    for eid, fields in events:
        lines.append({"type": "event", "id": str(eid), "fields": dict(fields)})
    lines.append(
        {
            "type": "end",
            "nodes": len(node_ids),
            "steps": len(steps),
            "messages": len(messages),
            "events": len(events),
        }
    )
    return lines


def _spec_of(run_id: str, run: dict[str, str], spec_body: str | None) -> tuple[Any, str]:
    """``(spec without inputs, spec_hash)``; converts an old run's inline ``spec`` field
    to the shared form, modifying ``run``. Raises :class:`ExportError`."""
    inline = run.pop("spec", None)
    try:
        if inline is not None:
            doc = json.loads(inline)
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
            spec_hash, body, inputs = split_doc(doc)
            run["spec_hash"] = spec_hash
            run.setdefault("inputs", inputs)
            return json.loads(body), spec_hash
        if not spec_body:
            raise ExportError(
                f"run {run_id}: its stored spec {run.get('spec_hash') or '(none)'} is gone; "
                "a run without its spec cannot be replayed"
            )
        return json.loads(spec_body), run["spec_hash"]
    except ValueError as e:
        raise ExportError(f"run {run_id}: its spec is not readable JSON ({e})") from None


def _step_sort_key(key: str, order: dict[str, int]) -> tuple[int, str, int, int]:
    m = STEP_KEY_RE.match(key)
    if not m:
        return (len(order), key, 0, 0)
    return (order.get(m[1], len(order)), m[1], int(m[2]), 1 if m[3] else 0)


def dump_line(line: dict[str, Any]) -> str:
    """One line of the file (no newline): compact JSON, UTF-8 text kept as it is."""
    return json.dumps(line, ensure_ascii=False, separators=(",", ":"))


def dumps(lines: Iterable[dict[str, Any]]) -> str:
    """The whole file: :func:`dump_line` of each line, each ended by a newline."""
    return "".join(dump_line(x) + "\n" for x in lines)


# ---------------------------------------------------------------- import


class _Parsed:
    """A validated export: what :func:`import_run` writes."""

    def __init__(self) -> None:
        self.run_id = ""
        self.run: dict[str, str] = {}
        self.node_ids: list[str] = []
        self.spec_hash = ""
        self.spec_json = ""
        self.nodes: dict[str, dict[str, str]] = {}
        self.steps: dict[str, str] = {}
        self.messages: dict[str, str] = {}
        self.events: list[tuple[str, dict[str, str]]] = []


def parse_lines(lines: Iterable[str | dict[str, Any]]) -> _Parsed:
    """Validate an export (lines of the file, or dicts as :func:`export_run` returns).

    Blank lines are skipped. Raises :class:`FormatError` naming the first bad line: not
    JSON, not an object, a wrong ``format`` or ``version``, a line out of order or of an
    unknown type, a bad field, a spec or message that does not match its hash, event ids
    not increasing, or a file that ends without its ``end`` line (truncated).
    """
    out = _Parsed()
    header = False
    rank = -1  # LINE_ORDER index of the last line after the header
    ended = False
    last_event = (0, 0)
    n = 0
    for n, raw in enumerate(lines, start=1):
        if isinstance(raw, str):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except json.JSONDecodeError as e:
                raise FormatError(
                    n, f"not JSON ({e.msg} at column {e.colno}); is the file truncated or edited?"
                ) from None
        else:
            line = raw
        if not isinstance(line, dict):
            raise FormatError(n, "not a JSON object")
        if ended:
            raise FormatError(n, "a line after the end line")
        if not header:
            _header(n, line, out)
            header = True
            continue
        kind = line.get("type")
        if kind not in LINE_ORDER:
            raise FormatError(n, f"unknown line type {kind!r} (expected one of {', '.join(LINE_ORDER)})")
        r = LINE_ORDER.index(kind)
        if r < rank or (r == rank and kind in ("run", "spec")):
            raise FormatError(n, f"a {kind!r} line out of order (lines come as {', '.join(LINE_ORDER)})")
        if kind != "run" and not out.run:
            raise FormatError(n, "the run line must come right after the header")
        if kind not in ("run", "spec") and not out.spec_hash:
            raise FormatError(n, "the spec line must come right after the run line")
        rank = r
        if kind == "run":
            _run_line(n, line, out)
        elif kind == "spec":
            _spec_line(n, line, out)
        elif kind == "node":
            _node_line(n, line, out)
        elif kind == "step":
            _step_line(n, line, out)
        elif kind == "message":
            _message_line(n, line, out)
        elif kind == "event":
            last_event = _event_line(n, line, out, last_event)
        else:
            _end_line(n, line, out)
            ended = True
    if not header:
        raise FormatError(0, "empty file: no header line")
    if not ended:
        raise FormatError(n, "the file ends without its end line: it is truncated")
    return out


def _header(n: int, line: dict[str, Any], out: _Parsed) -> None:
    if line.get("format") != FORMAT:
        raise FormatError(
            n, f"not an OAO run export (header 'format' is {line.get('format')!r}, not {FORMAT!r})"
        )
    version = line.get("version")
    if version != VERSION or isinstance(version, bool):
        raise FormatError(n, f"unsupported export version {version!r} (this OAO reads version {VERSION})")
    rid = line.get("run_id")
    if not isinstance(rid, str) or not RUN_ID_RE.match(rid):
        raise FormatError(n, f"bad run_id {rid!r} in the header")
    out.run_id = rid


def _str_map(n: int, value: Any, what: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise FormatError(n, f"{what} must be an object of strings")
    return dict(value)


def _run_line(n: int, line: dict[str, Any], out: _Parsed) -> None:
    fields = _str_map(n, line.get("fields"), "the run's fields")
    status = fields.get("status", "")
    if status not in RunState.__members__ or not RunState(status).terminal:
        raise FormatError(n, f"the run's status is {status!r}: only finished runs can be imported")
    node_ids = [x for x in fields.get("node_ids", "").split(",") if x]
    for nid in node_ids:
        if not NODE_ID_RE.match(nid):
            raise FormatError(n, f"bad node id {nid!r} in node_ids")
    if "spec" in fields:
        raise FormatError(n, "the run's fields hold a whole spec: version 1 keeps it on the spec line")
    out.run = fields
    out.node_ids = node_ids


def _spec_line(n: int, line: dict[str, Any], out: _Parsed) -> None:
    spec_hash, spec = line.get("spec_hash"), line.get("spec")
    if not isinstance(spec_hash, str) or not SPEC_HASH_RE.match(spec_hash):
        raise FormatError(n, f"bad spec_hash {spec_hash!r}")
    if not isinstance(spec, dict) or "inputs" in spec:
        raise FormatError(n, "the spec must be a JSON object without 'inputs' (they are in the run fields)")
    body = canonical_json(spec)
    if sha256_hex(spec) != spec_hash:
        raise FormatError(n, "the spec does not match its spec_hash (edited?)")
    if out.run.get("spec_hash") != spec_hash:
        raise FormatError(n, "the spec_hash differs from the run's spec_hash")
    out.spec_hash, out.spec_json = spec_hash, body


def _node_line(n: int, line: dict[str, Any], out: _Parsed) -> None:
    nid = line.get("id")
    if nid not in out.node_ids:
        raise FormatError(n, f"node {nid!r} is not in the run's node_ids")
    if nid in out.nodes:
        raise FormatError(n, f"node {nid!r} appears twice")
    out.nodes[nid] = _str_map(n, line.get("fields"), f"node {nid}'s fields")


def _step_line(n: int, line: dict[str, Any], out: _Parsed) -> None:
    key, record = line.get("key"), line.get("record")
    m = STEP_KEY_RE.match(key) if isinstance(key, str) else None
    if not m or m[1] not in out.node_ids:
        raise FormatError(n, f"bad step key {key!r} (expected '<node>:<seq>' of a node of the run)")
    assert isinstance(key, str)
    if key in out.steps:
        raise FormatError(n, f"step {key!r} appears twice")
    if not isinstance(record, dict):
        raise FormatError(n, f"step {key!r}: the record must be a JSON object")
    out.steps[key] = json.dumps(record, separators=(",", ":"))


def _message_line(n: int, line: dict[str, Any], out: _Parsed) -> None:
    ref = line.get("ref")
    if not isinstance(ref, str) or not REF_RE.match(ref) or "message" not in line:
        raise FormatError(
            n, f"bad message line (ref {ref!r}, message {'present' if 'message' in line else 'missing'})"
        )
    if ref in out.messages:
        raise FormatError(n, f"message {ref!r} appears twice")
    if sha256_hex(line["message"])[: len(ref)] != ref:
        raise FormatError(n, f"message {ref} does not match its ref (edited?)")
    out.messages[ref] = canonical_json(line["message"])


def _event_line(n: int, line: dict[str, Any], out: _Parsed, last: tuple[int, int]) -> tuple[int, int]:
    eid = line.get("id")
    m = EVENT_ID_RE.match(eid) if isinstance(eid, str) else None
    if not m:
        raise FormatError(n, f"bad event id {eid!r} (expected '<ms>-<seq>')")
    assert isinstance(eid, str)
    this = (int(m[1]), int(m[2]))
    if this <= last:
        raise FormatError(n, f"event id {eid} is not greater than the one before")
    fields = _str_map(n, line.get("fields"), f"event {eid}'s fields")
    if not fields:
        raise FormatError(n, f"event {eid} has no fields")
    out.events.append((eid, fields))
    return this


def _end_line(n: int, line: dict[str, Any], out: _Parsed) -> None:
    missing = [nid for nid in out.node_ids if nid not in out.nodes]
    if missing:
        raise FormatError(n, f"no node line for {', '.join(missing)}")
    got = {
        "nodes": len(out.nodes),
        "steps": len(out.steps),
        "messages": len(out.messages),
        "events": len(out.events),
    }
    for what, count in got.items():
        if line.get(what) != count:
            raise FormatError(n, f"the end line counts {line.get(what)!r} {what} but the file holds {count}")


async def import_run(
    broker: Broker,
    lines: Iterable[str | dict[str, Any]],
    run_id: str | None = None,
    keep_id: bool = False,
) -> str:
    """Write an exported run (lines of the file, or :func:`export_run`'s dicts) under
    ``broker``'s prefix; returns its run id.

    The id is ``run_id`` if given, the original one with ``keep_id``, else a fresh
    :func:`new_run_id`. Everything is written in one ``MULTI``/``EXEC``: the run hash
    (plus ``imported_from``: the original id), node hashes, ledger, messages, the
    events with their original stream ids, the spec through the shared spec key (one
    more ``refs``, as ``submit.lua``), and the runs index (score ``created_at``) and
    finished-runs index (score ``finished_at``), so retention deletes an imported run
    like any other: an import of a run that ended longer ago than ``serve
    --retention`` goes at its next pass. Escalation never sees it (no run-ending entry).

    Raises :class:`FormatError` (nothing written), :class:`RunExists` if any key of
    the target run exists (never overwritten), ``ValueError`` for a bad ``run_id``.
    """
    parsed = parse_lines(lines)
    if run_id is not None and not RUN_ID_RE.match(run_id):
        raise ValueError(f"bad run id {run_id!r}")
    rid = run_id or (parsed.run_id if keep_id else new_run_id())
    k = broker.keys
    run_keys = [k.run(rid), k.events(rid), k.steps(rid), k.messages(rid)]
    run_keys += [k.node(rid, nid) for nid in parsed.node_ids]
    fields = {**parsed.run, "imported_from": parsed.run_id}
    created = _ms(fields.get("created_at")) or int(time.time() * 1000)
    finished = _ms(fields.get("finished_at")) or created
    for _ in range(5):
        async with broker.redis.pipeline(transaction=True) as p:
            try:
                await p.watch(*run_keys)
                if await p.exists(*run_keys):
                    raise RunExists(
                        f"run {rid} already exists under prefix {k.prefix!r}; it is never overwritten"
                        + (" (import without --keep-id to get a new id)" if keep_id else "")
                    )
                p.multi()
                p.hset(k.run(rid), mapping=fields)
                for nid in parsed.node_ids:
                    p.hset(k.node(rid, nid), mapping=parsed.nodes[nid])
                if parsed.steps:
                    p.hset(k.steps(rid), mapping=parsed.steps)
                if parsed.messages:
                    p.hset(k.messages(rid), mapping=parsed.messages)
                for eid, ev in parsed.events:
                    p.xadd(k.events(rid), ev, id=eid)
                p.hsetnx(k.spec(parsed.spec_hash), "json", parsed.spec_json)
                p.hincrby(k.spec(parsed.spec_hash), "refs", 1)
                p.zadd(k.runs, {rid: created})
                p.zadd(k.done, {rid: finished})
                await p.execute()
                return rid
            except redis_exc.WatchError:
                continue  # a key changed under us: check again
    raise RunExists(f"run {rid}: its keys kept changing while importing; try again")


def _ms(value: str | None) -> int:
    try:
        return int(float(value or 0))
    except ValueError:
        return 0


__all__ = [
    "FORMAT",
    "VERSION",
    "ExportError",
    "FormatError",
    "RunExists",
    "RunNotFound",
    "RunNotTerminal",
    "dump_line",
    "dumps",
    "export_run",
    "import_run",
    "parse_lines",
]
