"""Node and run states (docs/architecture.md, "Redis data model").

The Lua scripts in ``oao_common/lua`` write these same strings; a unit test checks
that every state literal used there is defined here.
"""

from __future__ import annotations

from enum import StrEnum


class NodeState(StrEnum):
    """``PENDING → READY → RUNNING → SUCCEEDED | FAILED | SKIPPED | CANCELLED``.

    A node waiting out a retry delay is ``PENDING`` with a ``retry_at`` field.
    """

    PENDING = "PENDING"
    READY = "READY"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    SKIPPED = "SKIPPED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_NODE_STATES


TERMINAL_NODE_STATES = frozenset(
    {NodeState.SUCCEEDED, NodeState.FAILED, NodeState.SKIPPED, NodeState.CANCELLED}
)


class RunState(StrEnum):
    """``PENDING → RUNNING → SUCCEEDED | PARTIAL | FAILED | CANCELLED``; ``PARTIAL``: some nodes
    failed, within the spec's ``failure`` rules (docs/governance.md)."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    PARTIAL = "PARTIAL"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_RUN_STATES


TERMINAL_RUN_STATES = frozenset({RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED, RunState.PARTIAL})
