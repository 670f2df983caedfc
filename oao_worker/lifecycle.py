"""The agent lifecycle state machine (docs/architecture.md, "The worker inside").

``INIT → PLAN → EXECUTE → REVIEW → (PLAN … | TERMINATE)``; ``PLAN → REVIEW`` is
allowed for a turn with nothing to execute, and any state may go to ``TERMINATE``
(a node ends on failure as well as on success). Every entry is reported through
``on_enter`` (the worker records it as a ``STATE_ENTER`` event); any other
transition raises :class:`~oao_common.errors.IllegalTransition`.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum

from oao_common.errors import IllegalTransition


class AgentState(StrEnum):
    INIT = "INIT"
    PLAN = "PLAN"
    EXECUTE = "EXECUTE"
    REVIEW = "REVIEW"
    TERMINATE = "TERMINATE"


TRANSITIONS: dict[AgentState, frozenset[AgentState]] = {
    AgentState.INIT: frozenset({AgentState.PLAN, AgentState.TERMINATE}),
    AgentState.PLAN: frozenset({AgentState.EXECUTE, AgentState.REVIEW, AgentState.TERMINATE}),
    AgentState.EXECUTE: frozenset({AgentState.REVIEW, AgentState.TERMINATE}),
    AgentState.REVIEW: frozenset({AgentState.PLAN, AgentState.TERMINATE}),
    AgentState.TERMINATE: frozenset(),
}


class Lifecycle:
    """Current state plus history. ``on_enter(state, previous)`` is called on each entry."""

    def __init__(self, on_enter: Callable[[AgentState, AgentState | None], None]) -> None:
        self._on_enter = on_enter
        self.state = AgentState.INIT
        self.history: list[AgentState] = [AgentState.INIT]
        on_enter(AgentState.INIT, None)

    def enter(self, state: AgentState) -> None:
        """Move to ``state``; re-entering the current state is a no-op.

        Raises :class:`IllegalTransition` for a transition not in :data:`TRANSITIONS`.
        """
        if state == self.state:
            return
        if state not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"illegal agent state transition {self.state} -> {state}")
        prev = self.state
        self.state = state
        self.history.append(state)
        self._on_enter(state, prev)

    def terminate(self) -> None:
        """Enter ``TERMINATE`` unless already there."""
        self.enter(AgentState.TERMINATE)
