"""The run-level budget as seen by one node attempt: reservations in Redis.

A run's ``policy`` (``max_tokens``, ``max_input_tokens``, ``max_output_tokens``,
``max_cost_usd``) is shared by all its nodes on all workers. Before a model call the
attempt reserves the call's worst case (estimated input tokens + ``max_tokens`` of
output, or :data:`RESERVE_CHUNK` when the call sets none, and their cost); a stream
that runs past its reservation extends it chunk by chunk; ``record_step`` settles it
with the actual usage. Two nodes racing for the last of a budget cannot both win:
the reservation script is atomic (``budget.lua``, ADR 006).

:class:`RunBudgets` is the middleware that does it for every model step.
"""

from __future__ import annotations

import asyncio
import contextlib

from oao_common.broker import Broker
from oao_common.errors import PolicyViolation
from oao_common.policy import RunPolicySpec

from .governance import NodeAttempt, StepInfo, StepMiddleware, Usage

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


class RunBudgets(StepMiddleware):
    """The run's shared budget as middleware (one per worker): reserves a model step's
    worst case in ``before_step`` (id ``<node>#<attempt>#<seq>`` in
    ``step.reservation``; ``step.reserved_out`` output tokens), extends it by
    :data:`RESERVE_CHUNK` tokens in ``on_chunk`` while the reply outgrows it, and gives
    it back in ``after_step`` when the step failed. A recorded step settles it in the
    same atomic write (``record_step.lua``). A refusal is a
    :class:`PolicyViolation` with ``scope: run``. Reservations live the node's
    ``timeout_s`` (300 s without one) if the worker dies."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def before_node(self, node: NodeAttempt) -> None:
        if node.spec is not None:
            ttl = (node.policy.timeout_s if node.policy else None) or 300.0
            node.state[self] = RunBudget(self.broker, node.run_id, node.spec.policy, ttl_s=ttl)

    def _budget(self, step: StepInfo) -> RunBudget | None:
        budget = step.node.state.get(self) if step.node is not None else None
        return budget if isinstance(budget, RunBudget) and budget.enabled else None

    async def before_step(self, step: StepInfo, usage: Usage) -> None:
        budget = self._budget(step)
        if budget is None or step.kind != "llm" or step.node is None:
            return
        step.reservation = f"{step.node.node_id}#{step.node.attempt}#{step.seq}"
        await budget.reserve(
            step.reservation,
            step.input_tokens,
            step.reserved_out,
            step.price.cost(step.input_tokens, step.reserved_out),
        )

    async def on_chunk(self, step: StepInfo, usage: Usage, output_tokens: int) -> None:
        if step.reservation is None:
            return
        budget = self._budget(step)
        while budget is not None and output_tokens > step.reserved_out:  # outgrew its reservation
            await budget.reserve(step.reservation, 0, RESERVE_CHUNK, step.price.cost(0, RESERVE_CHUNK))
            step.reserved_out += RESERVE_CHUNK

    async def after_step(self, step: StepInfo, usage: Usage) -> None:
        budget = self._budget(step)
        if step.error is not None and step.reservation is not None and budget is not None:
            await budget.release(step.reservation)
