"""Event types of the append-only run log (``oao:run:{rid}:events``, a Redis stream).

Each stream entry has the fields ``type``, ``node`` (empty for run events),
``attempt``, ``ts`` (server time, ms since the epoch) and ``data`` (JSON). The Lua
scripts emit most of them; a unit test checks that every type they use is listed here.
``MODEL_DELTA`` is the exception: an event type of the HTTP API's event streams only,
never written to the log.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class EventType(StrEnum):
    # run lifecycle
    RUN_SUBMITTED = "RUN_SUBMITTED"
    RUN_STARTED = "RUN_STARTED"
    RUN_SUCCEEDED = "RUN_SUCCEEDED"
    RUN_FAILED = "RUN_FAILED"
    RUN_CANCELLED = "RUN_CANCELLED"
    RUN_PARTIAL = "RUN_PARTIAL"
    ESCALATED = "ESCALATED"
    # node lifecycle
    NODE_READY = "NODE_READY"
    NODE_STARTED = "NODE_STARTED"
    NODE_SUCCEEDED = "NODE_SUCCEEDED"
    NODE_FAILED = "NODE_FAILED"
    NODE_SKIPPED = "NODE_SKIPPED"
    NODE_CANCELLED = "NODE_CANCELLED"
    NODE_RETRY_SCHEDULED = "NODE_RETRY_SCHEDULED"
    NODE_REQUEUED = "NODE_REQUEUED"
    NODE_HANDED_BACK = "NODE_HANDED_BACK"
    NODE_PARKED = "NODE_PARKED"
    # inside a node
    STATE_ENTER = "STATE_ENTER"
    STEP_STARTED = "STEP_STARTED"
    STEP_COMPLETED = "STEP_COMPLETED"
    STEP_REPLAYED = "STEP_REPLAYED"
    STEP_RETRIED = "STEP_RETRIED"
    STEP_FAILED = "STEP_FAILED"  # a model call failed after consuming tokens (its usage)
    POLICY_VIOLATION = "POLICY_VIOLATION"
    RATE_LIMIT_WAIT = "RATE_LIMIT_WAIT"
    LOOP_BLOCKED = "LOOP_BLOCKED"  # the node's code held the worker's event loop (seconds)
    # inside a framework agent (kind langgraph / langchain; docs/frameworks.md)
    GRAPH_NODE_COMPLETED = "GRAPH_NODE_COMPLETED"  # a LangGraph node returned its update
    GRAPH_INTERRUPTED = "GRAPH_INTERRUPTED"  # the graph called interrupt(value)
    GRAPH_RESUMED = "GRAPH_RESUMED"  # OAO answered an interrupt with the agent's next resume value
    # protocol
    STALE_ATTEMPT_REJECTED = "STALE_ATTEMPT_REJECTED"
    # live only, never stored: a model's text deltas, sent to SSE subscribers from the
    # run's pub/sub channel (``Keys.deltas_channel``), with no stream id
    MODEL_DELTA = "MODEL_DELTA"


@dataclass(slots=True)
class Event:
    """One entry of a run's event log, as read back from Redis."""

    id: str
    type: str
    node: str
    attempt: int
    ts_ms: int
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_stream(cls, entry_id: str, fields: dict[str, str]) -> Event:
        """Decode one ``XRANGE`` entry (fields already decoded to ``str``)."""
        raw = fields.get("data") or "{}"
        try:
            data = json.loads(raw)
        except ValueError:
            data = {"raw": raw}
        return cls(
            id=entry_id,
            type=fields.get("type", "?"),
            node=fields.get("node", ""),
            attempt=int(fields.get("attempt") or 0),
            ts_ms=int(fields.get("ts") or 0),
            data=data if isinstance(data, dict) else {"value": data},
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "node": self.node,
            "attempt": self.attempt,
            "ts_ms": self.ts_ms,
            "data": self.data,
        }


def pending_event(type_: EventType, data: dict[str, Any] | None = None) -> list[Any]:
    """An event buffered by a worker, flushed by the next fenced write: ``[type, data_json]``."""
    return [str(type_), json.dumps(data or {}, separators=(",", ":"), default=str)]
