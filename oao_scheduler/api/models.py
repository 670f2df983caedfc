"""Request and response bodies of the HTTP API (pydantic; they make the OpenAPI schema)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

RUN_ID = r"^[A-Za-z0-9_.:-]{1,128}$"
NODE_ID = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"  # oao_common.spec.ID_PATTERN, max 128


class SubmitBody(BaseModel):
    """``POST /runs``: a spec as YAML text or as a JSON object, inputs overriding the
    spec's ``inputs``, and an optional idempotency key (same key → same run)."""

    spec: str | dict[str, Any] = Field(description="The spec: YAML text, or the same document as JSON")
    inputs: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)


class Submitted(BaseModel):
    run_id: str
    created: bool = Field(description="False when the idempotency key named an earlier run")
    exec_hash: str


class AgentRunBody(BaseModel):
    """``POST /run``: one python agent (``module:attr``) given ``task``, under ``policy``
    (the fields of a spec's node ``policy``: max_steps, max_tokens, ...)."""

    entrypoint: str = Field(max_length=300, examples=["examples.agents:outline"])
    task: str = Field(default="", max_length=100_000)
    policy: dict[str, Any] | None = None
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)


class MultiRunBody(BaseModel):
    """``POST /run-multi``: the same ``task`` to several agents, ``name → entrypoint``;
    each is an independent run."""

    agents: dict[str, str] = Field(min_length=1, max_length=100)
    task: str = Field(default="", max_length=100_000)
    policy: dict[str, Any] | None = None


class AgentRun(BaseModel):
    run_id: str
    exec_hash: str
    created: bool
    status: str | None = Field(default=None, description="With wait=true: the run's end status")
    report: dict[str, Any] | None = Field(default=None, description="With wait=true: the execution report")


class MultiRun(BaseModel):
    runs: dict[str, AgentRun]


class CancelAnswer(BaseModel):
    run_id: str
    cancelled: bool = Field(description="False if the run had already ended")
    nodes_cancelled: int
    status: str


class Health(BaseModel):
    status: str


class Queues(BaseModel):
    queues: dict[str, int]


STEP_POINT = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}:[1-9][0-9]{0,8}$"


class ForkBody(BaseModel):
    """``POST /fork/{run_id}``: the point (``from_step`` ``NODE:SEQ`` or ``from_node``) and
    the changes: ``sets`` (``"path=value"``, as ``oao-scheduler fork --set``) and ``inputs``."""

    from_step: str | None = Field(default=None, pattern=STEP_POINT, examples=["draft:2"])
    from_node: str | None = Field(default=None, pattern=NODE_ID)
    sets: list[str] = Field(default_factory=list, max_length=100, examples=[["result.content=Be brief."]])
    inputs: dict[str, Any] = Field(default_factory=dict)


class ReplayAnswer(BaseModel):
    """The run a replay or fork created and how its nodes run (docs/replay.md)."""

    run_id: str
    replay_of: str
    exec_hash: str
    point: str | None = Field(description="NODE:SEQ, or null for a full replay")
    strict: bool = Field(description="A full replay: nothing may run live")
    copied: list[str] = Field(description="Nodes copied as SUCCEEDED without running")
    seeded: dict[str, int] = Field(description="Node → steps served from the record")
    live: list[str] = Field(description="Nodes that run live from their first step")
    overrides: list[str] = Field(description="The fork's changes")
