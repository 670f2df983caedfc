"""Policy and retry settings as they appear in a spec (``defaults`` and per node).

Units: steps, tokens, tool calls, seconds, USD. ``None`` means "no limit". Every number
is finite, strictly typed and bounded by its unit type (``oao_common/limits.py``).
The enforcement lives in ``oao_worker/governance.py``; this module only holds data
and the backoff arithmetic.
"""

from __future__ import annotations

import random
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .limits import (
    MAX_DELAY_S,
    Backoff,
    Count,
    DelayS,
    PositiveCount,
    Ratio,
    Retries,
    StrictBool,
    StrictInt,
    TimeoutS,
    Usd,
)
from .retry import exponential_delay_s


class PolicySpec(BaseModel):
    """Budgets of one node (``StrictPolicy``). Fields left unset inherit the defaults."""

    model_config = ConfigDict(extra="forbid")

    max_steps: PositiveCount | None = Field(default=None, description="model + tool calls per node")
    max_tokens: PositiveCount | None = Field(default=None, description="input + output tokens")
    max_input_tokens: PositiveCount | None = None
    max_output_tokens: PositiveCount | None = None
    max_tool_calls: Count | None = None
    timeout_s: TimeoutS | None = Field(default=None, description="wall time of one attempt")
    max_cost_usd: Usd | None = None


class RunPolicySpec(PolicySpec):
    """Budgets of a whole run, shared by all its nodes on all workers (enforced by
    reservation in Redis), plus ``max_parallel_nodes``. ``timeout_s`` bounds the run's
    wall time from its first claim."""

    max_parallel_nodes: PositiveCount | None = None


class FailureSpec(BaseModel):
    """How node failures decide the run's final state.

    A failed *critical* node fails the run at once (its other nodes are cancelled).
    Otherwise, at the end: more than ``max_failure_ratio`` of the nodes failed → FAILED;
    some failed → PARTIAL with ``allow_partial_completion``, else FAILED; none → SUCCEEDED.
    Nodes are critical when ``critical: true`` or, by default, ``priority >= critical_priority``.
    """

    model_config = ConfigDict(extra="forbid")

    allow_partial_completion: StrictBool = False
    max_failure_ratio: Ratio = 0.5
    critical_priority: StrictInt = Field(default=8, ge=0, le=11)


DEFAULT_POLICY = PolicySpec(max_steps=50, max_tokens=100_000, max_tool_calls=50, timeout_s=300.0)


class RetrySpec(BaseModel):
    """Node-level retry of transient failures through the delayed set."""

    model_config = ConfigDict(extra="forbid")

    max_retries: Retries | None = None
    retry_delay_s: DelayS | None = None
    backoff: Backoff | None = None
    max_delay_s: DelayS | None = None
    jitter: StrictBool | None = None


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

    Exponential backoff ``retry_delay_s * backoff ** (n - 1)`` capped at ``max_delay_s``
    (and always at :data:`~oao_common.limits.MAX_DELAY_S`, so the result is finite even
    when the power overflows), with "equal jitter" when ``jitter`` is on
    (:func:`oao_common.retry.exponential_delay_s`: half the delay plus a uniform draw
    over the other half), so retries of many nodes spread out but never fire
    immediately.
    """
    cap = MAX_DELAY_S if retry.max_delay_s is None else min(float(retry.max_delay_s), MAX_DELAY_S)
    return exponential_delay_s(
        retry_number,
        float(retry.retry_delay_s or 0.0),
        cap,
        factor=float(retry.backoff or 1.0),
        jitter=bool(retry.jitter),
        rng=rng,
    )
