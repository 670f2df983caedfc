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
so storing each request whole would grow as the square of the number of calls. The
stored request therefore lists its messages as *refs*: the first 32 hex digits (128
bits) of the sha256 of each message's canonical JSON, with each distinct message kept
once per run in ``Keys.messages(rid)`` (ref → canonical JSON). Other requests are
stored as they are.
"""

from __future__ import annotations

import json
from typing import Any

from .hashing import canonical_json, sha256_hex

REF_HEX = 32
#: Step kinds that record a value of the environment (``ctx.now()``, ``ctx.random()``,
#: ``ctx.uuid()``): replayed like other steps, but not governed and not counted as steps.
VOLATILE_KINDS = frozenset({"clock", "random", "uuid"})


def message_ref(message: Any) -> str:
    """The content address of one message: 32 hex digits of sha256(canonical JSON)."""
    return sha256_hex(message)[:REF_HEX]


def address_request(request: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """``(stored_request, bodies)``: ``request`` with its ``messages`` replaced by refs,
    and ``{ref: canonical JSON}`` of those messages. A request without a ``messages``
    list is stored as it is (``bodies`` empty)."""
    messages = request.get("messages")
    if not isinstance(messages, list):
        return request, {}
    bodies: dict[str, str] = {}
    refs = []
    for m in messages:
        body = canonical_json(m)
        ref = message_ref(m)
        bodies[ref] = body
        refs.append(ref)
    return {**request, "messages": refs}, bodies


def resolve_request(stored: dict[str, Any], bodies: dict[str, str | None]) -> dict[str, Any]:
    """Inverse of :func:`address_request`: refs replaced by the messages of ``bodies``
    (a ref missing there becomes ``{"missing_message": ref}``)."""
    refs = stored.get("messages")
    if not isinstance(refs, list):
        return stored
    out = []
    for ref in refs:
        body = bodies.get(ref)
        out.append(json.loads(body) if body is not None else {"missing_message": ref})
    return {**stored, "messages": out}


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
