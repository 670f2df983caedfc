"""The run-level budget as seen by one node attempt: reservations in Redis.

A run's ``policy`` (``max_tokens``, ``max_input_tokens``, ``max_output_tokens``,
``max_cost_usd``) is shared by all its nodes on all workers. Before a model call the
attempt reserves the call's worst case (estimated input tokens + ``max_tokens`` of
output, or :data:`RESERVE_CHUNK` when the call sets none, and their cost); a stream
that runs past its reservation extends it chunk by chunk; ``record_step`` settles it
with the actual usage. Two nodes racing for the last of a budget cannot both win:
the reservation script is atomic (``budget.lua``, ADR 006).
"""

from __future__ import annotations

import asyncio
import contextlib

from oao_common.broker import Broker
from oao_common.errors import PolicyViolation
from oao_common.policy import RunPolicySpec

RESERVE_CHUNK = 512
"""Output tokens reserved at a time when a call does not bound its output (tokens)."""

BUDGET_FIELDS = ("max_tokens", "max_input_tokens", "max_output_tokens", "max_cost_usd")


class RunBudget:
    """Reservations of one node attempt against its run's shared budget.

    ``ttl_s``: how long a reservation outlives a dead worker (seconds).
    """

    def __init__(self, broker: Broker, run_id: str, policy: RunPolicySpec, ttl_s: float) -> None:
        self.broker = broker
        self.run_id = run_id
        self.limits = {f: getattr(policy, f) for f in BUDGET_FIELDS if getattr(policy, f) is not None}
        self.ttl_s = ttl_s

    @property
    def enabled(self) -> bool:
        return bool(self.limits)

    async def reserve(self, reservation: str, tokens_in: int, tokens_out: int, cost_usd: float) -> None:
        """Reserve (or extend) ``reservation``; raises :class:`PolicyViolation` (scope
        ``run``) naming the rule, the limit and the figure the run would reach."""
        ok, rule, limit, would = await self.broker.reserve_budget(
            self.run_id, reservation, tokens_in, tokens_out, cost_usd, self.limits, self.ttl_s
        )
        if not ok:
            value: float = round(would, 6) if rule == "max_cost_usd" else int(would)
            lim: float = limit if rule == "max_cost_usd" else int(limit)
            raise PolicyViolation(rule, lim, value, scope="run")

    async def release(self, reservation: str) -> None:
        """Give a failed call's reservation back (best effort: it also expires)."""
        with contextlib.suppress(Exception):
            await asyncio.shield(self.broker.release_budget(self.run_id, reservation))
