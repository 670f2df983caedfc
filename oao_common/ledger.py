"""The step ledger's record format: what a step asked for, stored without repetition,
and how two requests differ (docs/replay.md).

A ledger record (``Keys.steps(rid)`` field ``"<node>:<seq>"``) is a JSON object::

    {"kind": "llm" | "tool" | "invoke" | "clock" | "random" | "uuid",
     "name": str, "request_hash": sha256 hex of the request,
     "request": the stored request (below), "result": the step's result (JSON),
     "usage": {"in": tokens, "out": tokens, "cost_usd": USD},
     "attempt": int, "duration_ms": int, ...}

The *request* of a step is what identifies it on replay (its sha256 is
``request_hash``). A model request is ``{"kind": "llm", "model", "messages", "tools",
"max_tokens", "temperature"}``; a conversation sends its whole history on every call,
so storing each request whole would grow as the square of the number of calls. Two
things keep it linear:

* messages are stored by *ref*: the first 32 hex digits (128 bits) of the sha256 of
  the message's canonical JSON, each distinct message kept once per run in
  ``Keys.messages(rid)`` (ref → canonical JSON);
* a request whose messages start with all the messages of the node's previous model
  step stores only the rest, with ``"messages_after": <that step's seq>``: the full
  list is that step's list followed by these refs (:func:`message_refs` follows the
  chain).

Other requests are stored as they are.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .hashing import canonical_json, sha256_hex

REF_HEX = 32
#: Step kinds that record a value of the environment (``ctx.now()``, ``ctx.random()``,
#: ``ctx.uuid()``): replayed like other steps, but not governed and not counted as steps.
VOLATILE_KINDS = frozenset({"clock", "random", "uuid"})


def address_request(
    request: dict[str, Any], previous: tuple[int, list[str]] | None = None
) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """``(stored_request, bodies, refs)``: ``request`` as a record stores it, ``{ref:
    canonical JSON}`` of its messages, and the full list of its message refs.

    ``previous`` is ``(seq, refs)`` of the node's previous model step: when its refs
    start this request's list, only the rest is stored, after ``"messages_after": seq``.
    A request without a ``messages`` list is stored as it is."""
    messages = request.get("messages")
    if not isinstance(messages, list):
        return request, {}, []
    bodies: dict[str, str] = {}
    refs = []
    for m in messages:
        body = canonical_json(m)
        ref = sha256_hex(m)[:REF_HEX]
        bodies[ref] = body
        refs.append(ref)
    stored = {**request, "messages": refs}
    if previous is not None and previous[1] and refs[: len(previous[1])] == previous[1]:
        stored["messages_after"] = previous[0]
        stored["messages"] = refs[len(previous[1]) :]
        bodies = {r: bodies[r] for r in stored["messages"]}
    return stored, bodies, refs


def message_refs(stored: dict[str, Any], records: Mapping[int, dict[str, Any] | None]) -> list[str] | None:
    """The full list of message refs of a stored model request, following
    ``messages_after`` through ``records`` (the node's records by seq); ``None`` if the
    chain is broken (a record missing) or the request has no messages."""
    refs = stored.get("messages")
    if not isinstance(refs, list):
        return None
    out = [r for r in refs if isinstance(r, str)]
    after = stored.get("messages_after")
    seen = 0
    while isinstance(after, int) and seen < 100_000:
        rec = records.get(after)
        req = rec.get("request") if isinstance(rec, dict) else None
        if not isinstance(req, dict) or not isinstance(req.get("messages"), list):
            return None
        out = [r for r in req["messages"] if isinstance(r, str)] + out
        after = req.get("messages_after")
        seen += 1
    return out


def resolve_request(
    stored: dict[str, Any],
    bodies: Mapping[str, str | None],
    records: Mapping[int, dict[str, Any] | None] | None = None,
) -> dict[str, Any]:
    """Inverse of :func:`address_request`: the request with its full message list, refs
    replaced by the messages of ``bodies`` (a ref missing there becomes
    ``{"missing_message": ref}``); ``records`` (the node's records by seq) resolve
    ``messages_after``."""
    refs = message_refs(stored, records or {})
    if refs is None:
        return stored
    out = []
    for ref in refs:
        body = bodies.get(ref)
        out.append(json.loads(body) if body is not None else {"missing_message": ref})
    resolved = {k: v for k, v in stored.items() if k != "messages_after"}
    return {**resolved, "messages": out}


def _short(value: Any, limit: int = 160) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def request_diff(recorded: Any, actual: Any, path: str = "", limit: int = 20) -> list[str]:
    """Field-level differences between two JSON values, one line each:
    ``"messages[1].content: 'old' -> 'new'"``, ``"args.query: missing -> 'x'"``; at most
    ``limit`` lines (the last says how many more). Lists are compared item by item."""
    lines: list[str] = []
    _diff(recorded, actual, path, lines)
    if len(lines) > limit:
        lines = [*lines[:limit], f"... and {len(lines) - limit} more differences"]
    return lines


def _diff(a: Any, b: Any, path: str, out: list[str]) -> None:
    where = path or "(request)"
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            sub = f"{path}.{k}" if path else str(k)
            if k not in a:
                out.append(f"{sub}: missing -> {_short(b[k])}")
            elif k not in b:
                out.append(f"{sub}: {_short(a[k])} -> missing")
            else:
                _diff(a[k], b[k], sub, out)
    elif isinstance(a, list) and isinstance(b, list):
        for i in range(max(len(a), len(b))):
            sub = f"{path}[{i}]"
            if i >= len(a):
                out.append(f"{sub}: missing -> {_short(b[i])}")
            elif i >= len(b):
                out.append(f"{sub}: {_short(a[i])} -> missing")
            else:
                _diff(a[i], b[i], sub, out)
    elif a != b or type(a) is not type(b):
        out.append(f"{where}: {_short(a)} -> {_short(b)}")
