"""Policy and retry settings as they appear in a spec (``defaults`` and per node).

Units: steps, tokens, tool calls, seconds, USD. ``None`` means "no limit".
The enforcement lives in ``oao_worker/governance.py``; this module only holds data
and the backoff arithmetic.
"""

from __future__ import annotations

import random
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .retry import exponential_delay_s


class PolicySpec(BaseModel):
    """Budgets of one node (``StrictPolicy``). Fields left unset inherit the defaults."""

    model_config = ConfigDict(extra="forbid")

    max_steps: int | None = Field(default=None, ge=1, description="model + tool calls per node")
    max_tokens: int | None = Field(default=None, ge=1, description="input + output tokens")
    max_input_tokens: int | None = Field(default=None, ge=1)
    max_output_tokens: int | None = Field(default=None, ge=1)
    max_tool_calls: int | None = Field(default=None, ge=0)
    timeout_s: float | None = Field(default=None, gt=0, description="wall time of one attempt")
    max_cost_usd: float | None = Field(default=None, ge=0)


class RunPolicySpec(PolicySpec):
    """Budgets of a whole run, shared by all its nodes on all workers (enforced by
    reservation in Redis), plus ``max_parallel_nodes``. ``timeout_s`` bounds the run's
    wall time from its first claim."""

    max_parallel_nodes: int | None = Field(default=None, ge=1)


class FailureSpec(BaseModel):
    """How node failures decide the run's final state.

    A failed *critical* node fails the run at once (its other nodes are cancelled).
    Otherwise, at the end: more than ``max_failure_ratio`` of the nodes failed → FAILED;
    some failed → PARTIAL with ``allow_partial_completion``, else FAILED; none → SUCCEEDED.
    Nodes are critical when ``critical: true`` or, by default, ``priority >= critical_priority``.
    """

    model_config = ConfigDict(extra="forbid")

    allow_partial_completion: bool = False
    max_failure_ratio: float = Field(default=0.5, ge=0, le=1)
    critical_priority: int = Field(default=8, ge=0, le=11)


DEFAULT_POLICY = PolicySpec(max_steps=50, max_tokens=100_000, max_tool_calls=50, timeout_s=300.0)


class RetrySpec(BaseModel):
    """Node-level retry of transient failures through the delayed set."""

    model_config = ConfigDict(extra="forbid")

    max_retries: int | None = Field(default=None, ge=0)
    retry_delay_s: float | None = Field(default=None, ge=0)
    backoff: float | None = Field(default=None, ge=1.0)
    max_delay_s: float | None = Field(default=None, ge=0)
    jitter: bool | None = None


DEFAULT_RETRY = RetrySpec(max_retries=3, retry_delay_s=1.0, backoff=2.0, max_delay_s=300.0, jitter=True)


def merge(base: BaseModel, *overrides: BaseModel | None) -> Any:
    """Field-wise merge: later non-``None`` fields win. Returns a new model of ``base``'s type."""
    data = base.model_dump()
    for o in overrides:
        if o is None:
            continue
        data.update({k: v for k, v in o.model_dump().items() if v is not None})
    return type(base).model_validate(data)


def backoff_delay_s(retry: RetrySpec, retry_number: int, rng: random.Random | None = None) -> float:
    """Delay in seconds before retry number ``retry_number`` (1-based).

    Exponential backoff ``retry_delay_s * backoff ** (n - 1)`` capped at ``max_delay_s``,
    with "equal jitter" when ``jitter`` is on (``oao_common.retry.exponential_delay_s``:
    half the delay plus a uniform draw over the other half), so retries of many nodes
    spread out but never fire immediately. Never ``inf``, whatever the settings.
    """
    return exponential_delay_s(
        retry_number,
        float(retry.retry_delay_s or 0.0),
        retry.max_delay_s,
        factor=float(retry.backoff or 1.0),
        jitter=bool(retry.jitter),
        rng=rng,
    )
