"""Governance: middleware around every step of a node (in the style of Dramatiq
middleware: small objects with hooks, composed in a chain).

A :class:`StepMiddleware` sees each step before it runs (``before_step``), each
streamed chunk of a model reply (``on_chunk``), and the result (``after_step``). Any
hook may raise :class:`~oao_common.errors.PolicyViolation` to stop the node; it is
recorded as a ``POLICY_VIOLATION`` event and never retried.

:class:`StrictPolicy` enforces the node's :class:`~oao_common.policy.PolicySpec`
(``max_steps``, ``max_tokens``, ``max_input_tokens``, ``max_output_tokens``,
``max_tool_calls``, ``max_cost_usd``) and the agent's tool allow- and deny-lists;
``timeout_s`` is enforced by the worker around the whole attempt, and the run's shared
budget by reservation in Redis (``oao_worker/budget.py``).
Usage counts include steps served from the ledger on replay, so a resumed node
cannot exceed its budget by restarting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from oao_common.errors import PolicyViolation
from oao_common.policy import PolicySpec
from oao_common.pricing import FREE, Price


@dataclass(slots=True)
class Usage:
    """What a node has used so far: steps, tool calls, tokens, USD."""

    steps: int = 0
    tool_calls: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0

    @property
    def tokens(self) -> int:
        return self.tokens_in + self.tokens_out


@dataclass(slots=True)
class StepInfo:
    """The step about to run: ``kind`` is ``llm``, ``tool`` or ``invoke``."""

    seq: int
    kind: str
    name: str
    input_tokens: int = 0
    price: Price = FREE
    meta: dict[str, Any] = field(default_factory=dict)


class StepMiddleware:
    """Base class: override the hooks you need. ``usage`` is the node's usage so far
    (before the current step's own figures are added)."""

    def before_step(self, step: StepInfo, usage: Usage) -> None:
        """Called before a step executes (not for steps served from the ledger)."""

    def on_chunk(self, step: StepInfo, usage: Usage, output_tokens: int) -> None:
        """Called for every streamed chunk; ``output_tokens`` counts this step's output so far."""

    def after_step(self, step: StepInfo, usage: Usage) -> None:
        """Called after a step's figures were added to ``usage``."""


class StrictPolicy(StepMiddleware):
    """Hard limits of one node. ``allowed_tools=None`` allows every tool of the spec;
    ``denied_tools`` are refused even when allowed."""

    def __init__(
        self,
        policy: PolicySpec,
        allowed_tools: list[str] | None = None,
        denied_tools: list[str] | None = None,
    ) -> None:
        self.policy = policy
        self.allowed_tools = None if allowed_tools is None else frozenset(allowed_tools)
        self.denied_tools = frozenset(denied_tools or [])

    def before_step(self, step: StepInfo, usage: Usage) -> None:
        p = self.policy
        if p.max_steps is not None and usage.steps + 1 > p.max_steps:
            raise PolicyViolation("max_steps", p.max_steps, usage.steps + 1)
        if step.kind == "tool":
            if step.name in self.denied_tools or (
                self.allowed_tools is not None and step.name not in self.allowed_tools
            ):
                raise PolicyViolation(
                    "tool_not_allowed",
                    detail=f"tool {step.name!r} is not allowed for this agent "
                    f"(allowed: {', '.join(sorted(self.allowed_tools or [])) or 'none'}"
                    f"{'; denied: ' + ', '.join(sorted(self.denied_tools)) if self.denied_tools else ''})",
                )
            if p.max_tool_calls is not None and usage.tool_calls + 1 > p.max_tool_calls:
                raise PolicyViolation("max_tool_calls", p.max_tool_calls, usage.tool_calls + 1)
        self._check(usage, step.input_tokens, 0, step.price.cost(step.input_tokens, 0))

    def on_chunk(self, step: StepInfo, usage: Usage, output_tokens: int) -> None:
        self._check(
            usage, step.input_tokens, output_tokens, step.price.cost(step.input_tokens, output_tokens)
        )

    def after_step(self, step: StepInfo, usage: Usage) -> None:
        self._check(usage, 0, 0, 0.0)

    def _check(self, usage: Usage, extra_in: int, extra_out: int, extra_cost: float) -> None:
        """Raise if usage plus the running step's figures so far crosses a limit."""
        p = self.policy
        figures = (
            ("max_tokens", p.max_tokens, usage.tokens + extra_in + extra_out),
            ("max_input_tokens", p.max_input_tokens, usage.tokens_in + extra_in),
            ("max_output_tokens", p.max_output_tokens, usage.tokens_out + extra_out),
        )
        for rule, limit, reached in figures:
            if limit is not None and reached > limit:
                raise PolicyViolation(rule, limit, reached)
        cost = usage.cost_usd + extra_cost
        if p.max_cost_usd is not None and cost > p.max_cost_usd:
            raise PolicyViolation("max_cost_usd", p.max_cost_usd, round(cost, 6))


class Governor:
    """Runs a chain of middleware and keeps the node's :class:`Usage`."""

    def __init__(self, middleware: list[StepMiddleware]) -> None:
        self.middleware = middleware
        self.usage = Usage()

    def before_step(self, step: StepInfo) -> None:
        for m in self.middleware:
            m.before_step(step, self.usage)

    def on_chunk(self, step: StepInfo, output_tokens: int) -> None:
        for m in self.middleware:
            m.on_chunk(step, self.usage, output_tokens)

    def account(self, kind: str, tokens_in: int, tokens_out: int, cost_usd: float) -> None:
        """Add a step's figures (executed or replayed) to the usage."""
        u = self.usage
        u.steps += 1
        u.tool_calls += 1 if kind == "tool" else 0
        u.tokens_in += tokens_in
        u.tokens_out += tokens_out
        u.cost_usd += cost_usd

    def after_step(self, step: StepInfo) -> None:
        for m in self.middleware:
            m.after_step(step, self.usage)
