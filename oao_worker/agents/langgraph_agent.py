"""The ``langgraph`` agent kind: a LangGraph graph as an OAO node (docs/frameworks.md).

The entrypoint names a compiled graph, or a function returning one (called once per
run, off the event loop, with ``model=`` OAO's chat model and ``tools=`` the spec tools
if it declares them, and the agent's ``config``). Each node attempt:

1. builds the graph's input state: the task under ``input_key`` (a user message for
   ``messages``), the dependency outputs under ``deps_key``, the run inputs under
   ``inputs_key``; LangGraph validates it against the state schema (typed dict,
   pydantic, dataclass) and applies its reducers;
2. runs ``graph.astream(..., stream_mode=["updates", "values"], subgraphs=True)`` with
   a ``RunnableConfig`` that carries OAO's callback handler, ``max_concurrency=1`` (the
   tasks of a super-step, ``Send`` fan-out included, run one at a time in LangGraph's
   task order, so the node's steps come in the same order on every run and replay),
   the agent's ``recursion_limit`` and a per-attempt ``thread_id``. Every model and tool
   call of the graph is an OAO step (``langchain_bridge``); each node update is a
   ``GRAPH_NODE_COMPLETED`` event (with its subgraph path);
3. maps LangGraph's interrupts: each ``interrupt(value)`` is a ``GRAPH_INTERRUPTED``
   event; if the agent's ``resume`` list has answers left, the graph resumes with the
   next ones (``Command(resume=...)``, a ``GRAPH_RESUMED`` event each; the graph then
   runs with an in-memory checkpointer of the attempt), else the node fails with
   :class:`GraphInterrupted` (``on_interrupt: fail``) or ends with
   ``{"interrupted": [values], "state": state}`` (``on_interrupt: output``);
4. returns the final state as JSON (``output_key``: one key of it; a message list gives
   its last message's content).

The graph's own checkpointer and node cache are not used (ADR 011): a resumed node
re-drives the graph from its input with the recorded replies and tool results served from
the step ledger.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.messages import BaseMessage, HumanMessage
from langgraph.errors import GraphRecursionError
from langgraph.pregel import Pregel
from langgraph.types import Command

from oao_common.errors import PermanentError, PolicyViolation
from oao_common.events import EventType
from oao_common.spec import LangGraphAgentSpec
from oao_common.trust import TrustPolicy

from ..context import AgentContext
from ..tools import Tool, load_entrypoint
from .langchain_bridge import NodeBridge, OAOCallbackHandler, finish_lifecycle, runnable_from, to_jsonable

#: State keys tried, in order, for the task when the spec names none.
TASK_KEYS = ("messages", "task", "input", "question")


class GraphInterrupted(PermanentError):
    """The graph called ``interrupt()`` and the agent's ``resume`` list had no answer
    left. ``values``: the interrupts' values (JSON). Not retried: the same run would ask
    again; answer with ``resume`` (e.g. ``oao-scheduler fork --set agents.NAME.resume=[...]``)."""

    def __init__(self, values: list[Any]) -> None:
        self.values = values
        super().__init__(
            f"the graph was interrupted with {values!r} and no resume value was left "
            "(set the agent's resume list, or on_interrupt: output)"
        )


class LangGraphAgent:
    """A compiled LangGraph graph run as one OAO node (module doc)."""

    def __init__(
        self, name: str, spec: LangGraphAgentSpec, trust: TrustPolicy, tools: dict[str, Tool] | None = None
    ) -> None:
        self.name = name
        self.spec = spec
        target = load_entrypoint(spec.entrypoint, trust)
        graph = runnable_from(target, name, spec.model, tools or {}, spec.tools, spec.config)
        if not isinstance(graph, Pregel):
            raise PermanentError(
                f"agent {name!r}: {spec.entrypoint} gives a {type(graph).__name__}, not a compiled "
                "LangGraph graph (use kind: langchain for other Runnables)"
            )
        self.graph = graph
        keys = input_keys(graph)
        if spec.input_key is not None:
            self.input_key = spec.input_key
        else:
            found = next((k for k in TASK_KEYS if keys is None or k in keys), None)
            if found is None:
                raise PermanentError(
                    f"agent {name!r}: the graph's input has none of {', '.join(TASK_KEYS)} "
                    f"(it has {', '.join(keys or [])}): set input_key"
                )
            self.input_key = found

    def input_state(self, ctx: AgentContext) -> dict[str, Any]:
        """The graph's input for this node: task, dependency outputs, run inputs."""
        s = self.spec
        task: Any = ctx.task
        if self.input_key == "messages":
            task = [HumanMessage(content=ctx.task, id=f"oao:{ctx.node_id}:task")]
        state: dict[str, Any] = {self.input_key: task}
        if s.deps_key:
            state[s.deps_key] = dict(sorted(ctx.deps.items()))
        if s.inputs_key:
            state[s.inputs_key] = ctx.inputs
        return state

    async def run(self, ctx: AgentContext) -> Any:
        s = self.spec
        bridge = NodeBridge(ctx)
        graph: Any = self.graph
        update: dict[str, Any] = {}
        own = getattr(graph, "checkpointer", None)
        if s.resume:  # resuming needs the interrupted run's checkpoint: keep it in memory
            from langgraph.checkpoint.memory import InMemorySaver

            update["checkpointer"] = InMemorySaver()
        elif own is not None and own is not False:
            update["checkpointer"] = None  # the ledger resumes the node, not the graph's saver
        if getattr(graph, "cache", None) is not None:
            update["cache"] = None  # a cached node would skip its steps: replay would diverge
        if update:
            graph = graph.copy(update=update)
        config: dict[str, Any] = {
            "callbacks": [OAOCallbackHandler(bridge)],
            "max_concurrency": 1,
            "recursion_limit": s.recursion_limit,
            "configurable": {"thread_id": f"oao:{ctx.run_id}:{ctx.node_id}:{ctx.attempt}"},
            "metadata": {"oao_run_id": ctx.run_id, "oao_node_id": ctx.node_id},
        }
        answers = list(s.resume)
        given: Any = self.input_state(ctx)
        state: Any = None
        unanswered: list[Any] = []
        with bridge.bound():
            try:
                while True:
                    interrupts: list[Any] = []
                    async for ns, mode, data in graph.astream(
                        given, config, stream_mode=["updates", "values"], subgraphs=True
                    ):
                        bridge.raise_fatal()
                        if mode == "values":
                            if not ns:
                                state = data
                            continue
                        for gnode, update in (data or {}).items():
                            if gnode == "__interrupt__":
                                if not ns:  # a subgraph's interrupt reaches the root too
                                    interrupts.extend(update)
                                continue
                            ctx.emit(
                                EventType.GRAPH_NODE_COMPLETED, {"graph_node": gnode, "path": path_of(ns)}
                            )
                    if not interrupts:
                        break
                    for it in interrupts:
                        ctx.emit(EventType.GRAPH_INTERRUPTED, {"value": to_jsonable(it.value)})
                    if len(answers) < len(interrupts):
                        unanswered = interrupts
                        break
                    now, answers = answers[: len(interrupts)], answers[len(interrupts) :]
                    for a in now:
                        ctx.emit(EventType.GRAPH_RESUMED, {"value": a})
                    resume = (
                        now[0]
                        if len(interrupts) == 1
                        else {it.id: a for it, a in zip(interrupts, now, strict=True)}
                    )
                    given = Command(resume=resume)
            except GraphRecursionError as e:
                bridge.raise_fatal()
                raise PolicyViolation(
                    "recursion_limit", s.recursion_limit, s.recursion_limit + 1, detail=str(e).splitlines()[0]
                ) from None
            except Exception:
                bridge.raise_fatal()  # OAO's error, whatever the graph made of it
                raise
            bridge.raise_fatal()
        if isinstance(state, dict):
            state = {k: v for k, v in state.items() if k != "__interrupt__"}
        if unanswered:
            values = [to_jsonable(it.value) for it in unanswered]
            if s.on_interrupt == "fail":
                raise GraphInterrupted(values)
            finish_lifecycle(ctx)
            return {"interrupted": values, "state": to_jsonable(state)}
        finish_lifecycle(ctx)
        return self.output(state)

    def output(self, state: Any) -> Any:
        """The node's output from the final state (module doc, step 4); raises
        :class:`PermanentError` for an ``output_key`` the state does not have."""
        key = self.spec.output_key
        if key is None:
            return to_jsonable(state)
        values = state if isinstance(state, dict) else to_jsonable(state)
        if not isinstance(values, dict) or key not in values:
            have = ", ".join(sorted(values)) if isinstance(values, dict) else type(state).__name__
            raise PermanentError(f"output_key {key!r} is not in the graph's final state ({have})")
        value = values[key]
        if isinstance(value, Sequence) and value and isinstance(value[-1], BaseMessage):
            return to_jsonable(value[-1].content)
        return to_jsonable(value)


def input_keys(graph: Any) -> list[str] | None:
    """The keys of a compiled graph's input schema, or ``None`` if it cannot tell."""
    builder = getattr(graph, "builder", None)
    schemas = getattr(builder, "schemas", None)
    schema = getattr(builder, "input_schema", None)
    if isinstance(schemas, dict) and schema in schemas:
        return list(schemas[schema])
    try:
        return list(graph.get_input_jsonschema().get("properties") or {})
    except Exception:
        return None


def path_of(ns: Sequence[str]) -> str:
    """A subgraph namespace without LangGraph's task ids: ``("team:3f2a…", "w:9c…")`` →
    ``"team/w"`` (``""`` at the root)."""
    return "/".join(part.split(":")[0] for part in ns)
