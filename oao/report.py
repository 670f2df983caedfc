"""``Report``: the typed execution report of the Python API.

Built from :func:`oao_scheduler.report.collect` (what ``oao-scheduler report --json``
prints). Units: ``duration_s`` seconds (``None`` while unfinished), ``cost_usd`` USD,
tokens and steps counts. ``status`` is a run state (``SUCCEEDED``, ``FAILED``,
``PARTIAL``, ``CANCELLED``, ``RUNNING``, ``PENDING``) for a run report and a node state
for a node report.

A run report with one node carries that node's agent, output, state history and error
at the top; with several nodes, ``output`` maps each *sink* node (no dependents) to its
output, ``agent`` is the spec name, and ``state_history`` is empty: each node's is in
``nodes[<id>]``. ``state_history`` lists the agent lifecycle states (``INIT``, ``PLAN``,
``EXECUTE``, ``REVIEW``, ``TERMINATE``); ``transitions`` the node states with their time
in ms from the run's submission.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Tokens(BaseModel):
    """Token counts: ``input``, ``output`` and their ``total``."""

    model_config = ConfigDict(populate_by_name=True)

    input: int = 0
    output: int = 0
    total: int = 0


class Report(BaseModel):
    """The report of one run, or of one node (``node`` set) inside ``nodes``."""

    execution_id: str
    node: str | None = None
    agent: str = ""
    status: str
    steps: int = 0
    tokens: Tokens = Field(default_factory=Tokens)
    tool_calls: int = 0
    duration_s: float | None = None
    state_history: list[str] = Field(default_factory=list)
    transitions: list[dict[str, Any]] = Field(default_factory=list)
    output: Any = None
    cost_usd: float = 0.0
    replayed_steps: int = 0
    attempts: int = 0
    error: Any = None
    nodes: dict[str, Report] = Field(default_factory=dict)

    def json(self, indent: int | None = None, **kw: Any) -> str:
        """The report as JSON text (``indent`` spaces per level; compact when ``None``)."""
        return self.model_dump_json(indent=indent, **kw)

    @classmethod
    def from_collected(cls, data: dict[str, Any], sinks: list[str] | None = None) -> Report:
        """A report from :func:`oao_scheduler.report.collect`'s dict. ``sinks``: node ids
        whose outputs make a multi-node run's ``output`` (default: every node)."""
        rid = str(data["run_id"])
        nodes = {n["id"]: _node(rid, n) for n in data["nodes"]}
        tot = data["totals"]
        base: dict[str, Any] = {
            "execution_id": rid,
            "agent": data.get("name", ""),
            "status": data["status"],
            "steps": tot["steps"],
            "tokens": Tokens(
                input=tot["tokens_in"], output=tot["tokens_out"], total=tot["tokens_in"] + tot["tokens_out"]
            ),
            "tool_calls": tot["tool_calls"],
            "duration_s": data.get("duration_s"),
            "cost_usd": tot["cost_usd"],
            "replayed_steps": tot["replayed_steps"],
            "attempts": sum(n.attempts for n in nodes.values()),
            "nodes": nodes,
        }
        if len(nodes) == 1:
            only = next(iter(nodes.values()))
            base.update(
                agent=only.agent,
                state_history=only.state_history,
                transitions=only.transitions,
                output=only.output,
                error=only.error,
            )
        else:
            keep = sinks if sinks is not None else list(nodes)
            base["output"] = {k: nodes[k].output for k in keep if k in nodes}
            errors = {k: n.error for k, n in nodes.items() if n.error}
            base["error"] = errors or None
        return cls(**base)


def _node(run_id: str, n: dict[str, Any]) -> Report:
    return Report(
        execution_id=run_id,
        node=n["id"],
        agent=n.get("agent", ""),
        status=n.get("status", "?"),
        steps=n["steps"],
        tokens=Tokens(input=n["tokens_in"], output=n["tokens_out"], total=n["tokens_in"] + n["tokens_out"]),
        tool_calls=n["tool_calls"],
        duration_s=n.get("duration_s"),
        state_history=list(n.get("agent_states", [])),
        transitions=list(n.get("state_history", [])),
        output=n.get("output"),
        cost_usd=n["cost_usd"],
        replayed_steps=n["replayed_steps"],
        attempts=n["attempt"],
        error=n.get("error"),
    )


__all__ = ["Report", "Tokens"]
