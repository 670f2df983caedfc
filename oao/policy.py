"""``StrictPolicy``: the public per-node budget of the Python API.

Units: steps (model calls + tool calls + invocations), tokens (input + output), tool
calls, seconds of wall time per attempt, USD. ``None`` means "no limit of its own" (the
built-in defaults apply: docs/guarantees.md). Values must be finite and positive;
pydantic raises ``ValidationError`` otherwise. It maps field for field onto
:class:`oao_common.policy.PolicySpec`, enforced by the workers (``oao_worker/governance.py``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from oao_common.policy import PolicySpec


class StrictPolicy(BaseModel):
    """Hard limits of each node an :class:`~oao.Orchestrator` runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_steps: int | None = Field(default=None, gt=0, description="steps per node")
    max_tokens: int | None = Field(default=None, gt=0, description="input + output tokens")
    max_tool_calls: int | None = Field(default=None, ge=0)
    timeout_s: float | None = Field(default=None, gt=0, description="wall time of one attempt, s")
    max_cost_usd: float | None = Field(default=None, ge=0, description="USD per node")

    def to_spec(self) -> PolicySpec:
        """The equivalent :class:`PolicySpec` (validated with its unit bounds)."""
        return PolicySpec.model_validate(self.model_dump(exclude_none=True))

    def spec_dict(self) -> dict[str, Any]:
        """The set limits as a spec's ``policy`` mapping."""
        return self.to_spec().model_dump(exclude_none=True)


__all__ = ["StrictPolicy"]
