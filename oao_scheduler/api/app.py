"""The FastAPI application: runs (submit, one agent, several agents), their status,
reports, cancellation and live events (SSE); workers, queues and health.

Every route but ``/healthz`` and the docs requires a bearer token when tokens are
configured (:mod:`.auth`). Errors follow :mod:`.errors`.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Path, Query
from fastapi.responses import StreamingResponse

from oao_common.broker import Broker
from oao_common.errors import SpecError
from oao_common.spec import Spec, apply_inputs, parse_spec
from oao_common.states import RunState
from oao_common.trust import TrustPolicy
from oao_scheduler.replay import ReplayError, StepRef, replay
from oao_scheduler.report import collect, node_detail, run_graph
from oao_scheduler.submit import submit_spec

from .auth import TokenCheck
from .dashboard import mount_dashboard
from .errors import ERROR_RESPONSES, NOT_FOUND, APIError, install_handlers
from .models import (
    NODE_ID,
    RUN_ID,
    STEP_POINT,
    AgentRun,
    AgentRunBody,
    CancelAnswer,
    ForkBody,
    Health,
    MultiRun,
    MultiRunBody,
    Queues,
    ReplayAnswer,
    SubmitBody,
    Submitted,
)
from .sse import STREAM_ID, event_stream

RunId = Annotated[str, Path(pattern=RUN_ID, description="A run id")]
NodeId = Annotated[str, Path(pattern=NODE_ID, description="A node id of the run's spec")]
WAIT_POLL_S = 0.05
MAX_WAIT_S = 3600.0
_LINE = re.compile(r" \(line \d+\)")
WaitQ = Annotated[bool, Query(description="Wait for the end and answer the report")]
TimeoutQ = Annotated[float, Query(gt=0, le=MAX_WAIT_S, description="Seconds to wait (504 after)")]


def _spec_from(body: str | dict[str, Any], source: str = "request") -> Spec:
    """Parse a spec given as YAML text or as a JSON object; raises :class:`SpecError`.

    A JSON object is valid YAML, so both go through :func:`parse_spec` and give the
    same messages as the CLI (without line numbers for a JSON object)."""
    if isinstance(body, str):
        return parse_spec(body, source)
    try:
        return parse_spec(json.dumps(body, allow_nan=False), source)
    except SpecError as e:  # line numbers of the JSON text we made would mislead
        raise SpecError([_LINE.sub("", p) for p in e.problems], source) from None


def _invalid(e: SpecError) -> APIError:
    return APIError(422, "invalid_spec", "; ".join(e.problems)[:2000] or "invalid spec", e.problems)


def _agent_spec(name: str, entrypoint: str, task: str, policy: dict[str, Any] | None) -> Spec:
    """A one-node spec running the python agent ``entrypoint`` on ``task``."""
    node: dict[str, Any] = {"id": "agent", "agent": "agent", "task": task}
    if policy is not None:
        node["policy"] = policy
    doc = {"name": name, "agents": {"agent": {"kind": "python", "entrypoint": entrypoint}}, "nodes": [node]}
    try:
        return _spec_from(doc)
    except SpecError as e:
        raise _invalid(e) from None
    except (ValueError, TypeError) as e:  # e.g. a NaN in the policy
        raise APIError(422, "invalid_spec", str(e)) from None


def create_app(
    broker: Broker,
    tokens: list[str] | None = None,
    trust: TrustPolicy | None = None,
    sse_keepalive_ms: int = 1000,
) -> FastAPI:
    """The HTTP API over ``broker``.

    ``tokens``: accepted bearer tokens (none: no authentication; only for loopback).
    ``trust``: refuse at submission what the fleet's trust options would refuse (422).
    ``sse_keepalive_ms``: how long an event stream waits before sending a comment.
    """
    app = FastAPI(
        title="OAO",
        summary="Open Agent Orchestrator: submit DAG runs of AI agents, follow and cancel them",
        version="0.1.0",
    )
    install_handlers(app)
    auth = [Depends(TokenCheck(list(tokens or [])))]

    def check(spec: Spec, inputs: dict[str, Any] | None = None) -> Spec:
        try:
            if inputs:
                spec = apply_inputs(spec, inputs)
            if trust is not None:
                problems = trust.spec_problems(spec)
                if problems:
                    raise SpecError(problems, "request")
        except SpecError as e:
            raise _invalid(e) from None
        return spec

    async def wait_report(run_id: str, timeout_s: float) -> tuple[str, dict[str, Any] | None]:
        deadline = time.monotonic() + timeout_s
        while True:
            status = (await broker.get_run(run_id)).get("status", "?")
            if status in RunState.__members__ and RunState(status).terminal:
                return status, await collect(broker, run_id)
            if time.monotonic() > deadline:
                raise APIError(504, "wait_timeout", f"run {run_id} had not ended after {timeout_s:g} s")
            await asyncio.sleep(WAIT_POLL_S)

    async def start_agent(
        name: str, body_entry: str, task: str, policy: dict[str, Any] | None, key: str | None
    ) -> AgentRun:
        spec = check(_agent_spec(name, body_entry, task, policy))
        s = await submit_spec(broker, spec, idempotency_key=key)
        return AgentRun(run_id=s.run_id, exec_hash=s.exec_hash, created=s.created)

    errs = {**ERROR_RESPONSES}
    errs_404 = {**ERROR_RESPONSES, **NOT_FOUND}

    @app.get("/healthz", response_model=Health, responses={503: ERROR_RESPONSES[503]}, tags=["health"])
    async def healthz() -> Health:
        """``ok`` when Redis answers a PING (503 otherwise)."""
        await broker.redis.ping()
        return Health(status="ok")

    @app.post("/runs", response_model=Submitted, dependencies=auth, responses=errs, tags=["runs"])
    async def submit(body: SubmitBody) -> Submitted:
        """Submit a spec (YAML text or JSON object) as a new run."""
        try:
            spec = _spec_from(body.spec)
        except SpecError as e:
            raise _invalid(e) from None
        except (ValueError, TypeError) as e:
            raise APIError(422, "invalid_spec", str(e)) from None
        spec = check(spec, body.inputs)
        s = await submit_spec(broker, spec, idempotency_key=body.idempotency_key)
        return Submitted(run_id=s.run_id, created=s.created, exec_hash=s.exec_hash)

    @app.post(
        "/run", response_model=AgentRun, dependencies=auth, responses={**errs, 504: errs[503]}, tags=["runs"]
    )
    async def run_agent(body: AgentRunBody, wait: WaitQ = False, timeout_s: TimeoutQ = 300.0) -> AgentRun:
        """Run one python agent (``module:attr``) on a task under a policy: a one-node run.
        With ``wait=true``, answer when it has ended, with its report."""
        r = await start_agent(body.entrypoint, body.entrypoint, body.task, body.policy, body.idempotency_key)
        if wait:
            r.status, r.report = await wait_report(r.run_id, timeout_s)
        return r

    @app.post(
        "/run-multi",
        response_model=MultiRun,
        dependencies=auth,
        responses={**errs, 504: errs[503]},
        tags=["runs"],
    )
    async def run_multi(body: MultiRunBody, wait: WaitQ = False, timeout_s: TimeoutQ = 300.0) -> MultiRun:
        """The same task to several agents (``name → entrypoint``), each its own run.
        All specs are checked before any run is submitted."""
        specs = {
            n: check(_agent_spec(n or "agent", ep, body.task, body.policy)) for n, ep in body.agents.items()
        }
        runs: dict[str, AgentRun] = {}
        for n, spec in specs.items():
            s = await submit_spec(broker, spec)
            runs[n] = AgentRun(run_id=s.run_id, exec_hash=s.exec_hash, created=s.created)
        if wait:
            done = await asyncio.gather(*(wait_report(r.run_id, timeout_s) for r in runs.values()))
            for r, (status, report) in zip(runs.values(), done, strict=True):
                r.status, r.report = status, report
        return MultiRun(runs=runs)

    @app.get("/runs", dependencies=auth, responses=errs, tags=["runs"])
    async def list_runs(limit: Annotated[int, Query(ge=1, le=1000)] = 20) -> list[dict[str, str]]:
        """The newest runs first (their run hashes, with ``id``)."""
        return await broker.recent_runs(limit)

    @app.get("/runs/{run_id}", dependencies=auth, responses=errs_404, tags=["runs"])
    async def run_status(run_id: RunId) -> dict[str, Any]:
        """The run and its nodes (the report without the event count)."""
        return found(await collect(broker, run_id, with_events=False), f"no run {run_id!r}")

    @app.get("/runs/{run_id}/report", dependencies=auth, responses=errs_404, tags=["runs"])
    async def run_report(run_id: RunId) -> dict[str, Any]:
        """The execution report: per node states, steps, tokens, cost, output, error."""
        return found(await collect(broker, run_id), f"no run {run_id!r}")

    @app.get("/runs/{run_id}/graph", dependencies=auth, responses=errs_404, tags=["runs"])
    async def graph(run_id: RunId) -> dict[str, Any]:
        """The run's DAG: ``{"nodes": [{"id", "agent", "depends_on": [...]}]}``."""
        return found(await run_graph(broker, run_id), f"no run {run_id!r}")

    @app.get("/runs/{run_id}/nodes/{node_id}", dependencies=auth, responses=errs_404, tags=["runs"])
    async def node(run_id: RunId, node_id: NodeId) -> dict[str, Any]:
        """One node's report with its step ledger (``ledger``: model and tool steps with
        usage, duration and recorded result)."""
        return found(await node_detail(broker, run_id, node_id), f"run {run_id!r} has no node {node_id!r}")

    @app.post(
        "/runs/{run_id}/cancel",
        response_model=CancelAnswer,
        dependencies=auth,
        responses=errs_404,
        tags=["runs"],
    )
    async def cancel(run_id: RunId) -> CancelAnswer:
        """Cancel a run: pending and running nodes become CANCELLED."""
        if not await broker.get_run(run_id):
            raise APIError(404, "not_found", f"no run {run_id!r}")
        n = await broker.cancel(run_id)
        status = (await broker.get_run(run_id)).get("status", "?")
        return CancelAnswer(run_id=run_id, cancelled=n >= 0, nodes_cancelled=max(n, 0), status=status)

    @app.get(
        "/runs/{run_id}/events",
        dependencies=auth,
        responses={**errs_404, 200: {"content": {"text/event-stream": {}}, "description": "SSE"}},
        response_class=StreamingResponse,
        tags=["runs"],
    )
    async def run_events(
        run_id: RunId, last_event_id: Annotated[str | None, Header(max_length=64)] = None
    ) -> StreamingResponse:
        """The run's events as Server-Sent Events (``id:`` = stream id), from the start or
        after ``Last-Event-ID``, until the run's end event."""
        after = "0-0"
        if last_event_id:
            after = _stream_id(last_event_id)
        if not await broker.get_run(run_id):
            raise APIError(404, "not_found", f"no run {run_id!r}")
        return StreamingResponse(
            event_stream(broker, run_id, after, sse_keepalive_ms),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def start_replay(
        run_id: str,
        from_step: str | None,
        from_node: str | None,
        live: bool = False,
        sets: list[str] | None = None,
        inputs: dict[str, Any] | None = None,
    ) -> ReplayAnswer:
        try:
            if from_step and from_node:
                raise ReplayError("give from_step or from_node, not both")
            point = StepRef.parse(from_step) if from_step else None
            if from_node:
                point = StepRef(from_node, 1)
            if sets is not None and point is None:
                raise ReplayError("a fork needs a point: from_step NODE:SEQ or from_node NODE")
            if live and point is not None:
                raise ReplayError("live is for a full replay (a replay from a point is live after it)")
            r = await replay(broker, run_id, from_step=point, live=live, sets=sets or (), inputs=inputs)
        except ReplayError as e:
            if str(e) == f"no run {run_id!r}":
                raise APIError(404, "not_found", str(e)) from None
            raise APIError(422, "invalid_replay", str(e)) from None
        return ReplayAnswer(**r.to_dict())

    @app.post(
        "/replay/{run_id}",
        response_model=ReplayAnswer,
        dependencies=auth,
        responses=errs_404,
        tags=["replay"],
    )
    async def replay_run(
        run_id: RunId,
        from_step: Annotated[str | None, Query(pattern=STEP_POINT, description="NODE:SEQ")] = None,
        from_node: Annotated[str | None, Query(pattern=NODE_ID)] = None,
        live: Annotated[bool, Query(description="Full replay: let steps past the record run live")] = False,
    ) -> ReplayAnswer:
        """Replay a run as a new run (``replay_of``): without a point every node is
        re-driven against its record and nothing runs live; from ``NODE:SEQ`` the steps
        before it are served from the record and execution goes live there."""
        return await start_replay(run_id, from_step, from_node, live)

    @app.post(
        "/fork/{run_id}", response_model=ReplayAnswer, dependencies=auth, responses=errs_404, tags=["replay"]
    )
    async def fork_run(run_id: RunId, body: ForkBody) -> ReplayAnswer:
        """Fork a run at a step with changed spec fields, inputs or recorded result."""
        return await start_replay(run_id, body.from_step, body.from_node, sets=body.sets, inputs=body.inputs)

    @app.get("/workers", dependencies=auth, responses=errs, tags=["fleet"])
    async def workers() -> list[dict[str, Any]]:
        """Known workers: alive, heartbeat age (s), active jobs, info."""
        items = await broker.workers()
        now = time.time()
        for w in items:
            w["heartbeat_age_s"] = round(now - w["last_heartbeat"], 1)
        return items

    @app.get("/queues", response_model=Queues, dependencies=auth, responses=errs, tags=["fleet"])
    async def queues() -> Queues:
        """Length of every ready list."""
        return Queues(queues=await broker.all_queue_lengths())

    mount_dashboard(app)
    return app


def found(value: dict[str, Any] | None, message: str) -> dict[str, Any]:
    """``value``, or a 404 ``not_found`` error with ``message`` when it is ``None``."""
    if value is None:
        raise APIError(404, "not_found", message)
    return value


def _stream_id(text: str) -> str:
    """A ``Last-Event-ID`` as a stream id (``ms-seq``); 422 if it is not one."""
    text = text.strip()
    if not STREAM_ID.match(text):
        raise APIError(
            422, "invalid_last_event_id", "Last-Event-ID must be a stream id such as 1700000000000-0"
        )
    ms, _, seq = text.partition("-")
    if int(ms) >= 2**64 or int(seq or 0) >= 2**64:
        raise APIError(422, "invalid_last_event_id", "Last-Event-ID is out of range")
    return f"{int(ms)}-{int(seq or 0)}"
