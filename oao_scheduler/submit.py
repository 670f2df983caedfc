"""DAG expansion: a validated :class:`~oao_common.spec.Spec` becomes a run in Redis.

One call to :meth:`Broker.submit` (``submit.lua``) writes the run hash, one hash per
node with its pending-dependency counter, the ``RUN_SUBMITTED`` event, and pushes the
root nodes, atomically. Nothing is written for a spec that does not validate, since
validation happens before this module sees it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from oao_common import tracing
from oao_common.broker import Broker, new_run_id
from oao_common.hashing import sha256_hex
from oao_common.keys import band_of, ready_name
from oao_common.spec import Spec
from oao_common.states import NodeState, RunState
from oao_common.stored_spec import split_doc


def execution_hash(spec: Spec) -> str:
    """sha256 over the canonical JSON of the whole normalized spec, inputs included.

    Two submissions with the same hash describe the same computation (same tasks,
    policies, agents, tools and models).
    """
    return sha256_hex(spec.model_dump(mode="json"))


@dataclass(slots=True)
class Submitted:
    run_id: str
    created: bool
    exec_hash: str


def expand(spec: Spec, run_id: str) -> tuple[dict[str, str], list[dict[str, Any]], str, str]:
    """The run fields and node records that ``submit.lua`` writes, the exec hash, and the
    spec JSON to store once for every run of the spec.

    The run hash names that stored spec by ``spec_hash`` and keeps its own ``inputs``
    (see :mod:`oao_common.stored_spec`).
    """
    doc = spec.model_dump(mode="json")
    exec_hash = sha256_hex(doc)  # = execution_hash(spec), without a second dump
    dependents = spec.dependents()
    spec_hash, spec_json, inputs_json = split_doc(doc)
    run_fields = {
        "name": spec.name,
        "status": str(RunState.PENDING),
        "exec_hash": exec_hash,
        "spec_hash": spec_hash,
        "inputs": inputs_json,
        "node_ids": ",".join(n.id for n in spec.nodes),
        "nodes_total": str(len(spec.nodes)),
        "nodes_done": "0",
        "nodes_failed": "0",
        "nodes_succeeded": "0",
        "steps": "0",
        "tokens_in": "0",
        "tokens_out": "0",
        "tool_calls": "0",
        "cost_usd": "0",
        "allow_partial": "1" if spec.failure.allow_partial_completion else "0",
        "max_parallel": str(spec.policy.max_parallel_nodes or 0),
        "running": "0",
        "max_failure_ratio": repr(float(spec.failure.max_failure_ratio)),
    }
    # The run span's W3C trace context, carried to every attempt by claim.lua (tracing.py).
    run_fields["traceparent"], parent_span = tracing.new_run_traceparent()
    if parent_span:
        run_fields["trace_parent_span"] = parent_span
    nodes: list[dict[str, Any]] = []
    for n in spec.nodes:
        nodes.append(
            {
                "id": n.id,
                "fields": {
                    "status": str(NodeState.READY if not n.depends_on else NodeState.PENDING),
                    "agent": n.agent,
                    "queue": n.queue,
                    "ready": ready_name(n.queue, band_of(n.priority)),
                    "priority": str(n.priority),
                    "critical": "1" if spec.is_critical(n) else "0",
                    "pending": str(len(n.depends_on)),
                    "deps": ",".join(n.depends_on),
                    "dependents": ",".join(dependents[n.id]),
                    "attempt": "0",
                    "retries": "0",
                    "requeues": "0",
                    "steps_recorded": "0",
                    "tokens_in": "0",
                    "tokens_out": "0",
                    "tool_calls": "0",
                },
            }
        )
    return run_fields, nodes, exec_hash, spec_json


async def submit_spec(
    broker: Broker,
    spec: Spec,
    run_id: str | None = None,
    idempotency_key: str | None = None,
    idempotency_ttl_s: int = 7 * 24 * 3600,
) -> Submitted:
    """Write ``spec`` as a new run. With ``idempotency_key``, a second submission with the
    same key returns the first run (``created=False``) instead of starting another."""
    rid = run_id or new_run_id()
    run_fields, nodes, exec_hash, spec_json = expand(spec, rid)
    created, rid = await broker.submit(
        rid,
        run_fields,
        nodes,
        {"name": spec.name, "nodes": len(spec.nodes), "exec_hash": exec_hash},
        idempotency_key=idempotency_key,
        idempotency_ttl_s=idempotency_ttl_s if idempotency_key else 0,
        spec_hash=run_fields["spec_hash"],
        spec_json=spec_json,
    )
    return Submitted(rid, created, exec_hash)
