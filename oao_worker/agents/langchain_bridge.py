"""The bridge between LangChain / LangGraph and OAO's step machinery (ADR 011).

A framework agent reaches the world through LangChain objects, so OAO governs it by
giving it LangChain objects of its own, the way LangChain expects to be extended:

* :class:`OAOChatModel`, a ``BaseChatModel`` whose every call is ``ctx.llm`` of the node
  running it: budgets before the call and on every streamed chunk, the run's budget
  reservation, rate limits and circuit breakers of the spec's model, in-step retries of
  transient errors, and the step ledger (a recorded reply is served, not asked again).
  It streams (``_astream``): LangGraph's ``stream_mode="messages"`` sees the tokens as
  the provider produces them.
* :func:`governed` wraps a LangChain tool (or function) as :class:`OAOTool`, and
  :func:`spec_tools` turns the spec's tools into LangChain tools: every call is
  ``ctx.try_tool`` (allow- and deny-lists, ``max_tool_calls``, started markers,
  idempotency keys, the ledger).
* :class:`OAOCallbackHandler`, passed in the ``RunnableConfig``, refuses any chat model,
  LLM or tool run inside the agent that is *not* one of these (a
  ``PolicyViolation`` with rule ``ungoverned_call``): nothing escapes the ledger silently.

The objects carry no node: they find the running node's :class:`NodeBridge` in a
context variable that the adapter sets around the graph run (asyncio tasks and LangChain's
executor threads copy it). So one compiled graph serves every node of a run, and the
objects may be built at import time in user code.

The bridge *latches* OAO's errors: once a step raised an ``OAOError`` (a policy violation,
a stale attempt, a provider's permanent or exhausted transient error), every later call
raises it again at once and the adapter raises it when the graph returns, whatever the
graph did with it (a ``ToolNode`` that turns errors into messages, a node ``RetryPolicy``,
``with_retry``, ``with_fallbacks``, a ``try`` in user code).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from contextvars import ContextVar
from typing import Any, TypeVar

from langchain_core.caches import BaseCache
from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    BaseCallbackHandler,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    ToolMessage,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.tools import BaseTool, ToolException
from langchain_core.tools import tool as make_tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel, Field
from pydantic_core import to_jsonable_python

from oao_common.errors import OAOError, PermanentError, PolicyViolation, TransientError
from oao_common.spec import ToolSpec

from ..context import AgentContext
from ..lifecycle import AgentState
from ..providers import ModelReply, ModelRequest, Provider
from ..providers.base import ChunkCallback
from ..tools import Tool

T = TypeVar("T")

#: Tag carried by OAO's chat model and tools; the callback handler refuses runs without it.
GOVERNED_TAG = "oao:governed"

_BRIDGE: ContextVar[NodeBridge | None] = ContextVar("oao_langchain_bridge", default=None)
_IN_STEP: ContextVar[bool] = ContextVar("oao_langchain_in_step", default=False)
_SINK: ContextVar[_StreamSink | None] = ContextVar("oao_langchain_sink", default=None)
_TOOL_CALL_ID: ContextVar[str | None] = ContextVar("oao_langchain_tool_call_id", default=None)
_PENDING: ContextVar[Callable[[], Awaitable[Any]] | None] = ContextVar("oao_langchain_pending", default=None)


def current_bridge() -> NodeBridge | None:
    """The bridge of the OAO node running in this context, else ``None`` (outside OAO)."""
    return _BRIDGE.get()


def _require_bridge(what: str) -> NodeBridge:
    bridge = _BRIDGE.get()
    if bridge is None:
        raise PermanentError(
            f"{what} runs only inside an OAO node (kind langgraph or langchain); "
            "outside OAO give the graph another chat model"
        )
    return bridge


# --------------------------------------------------------------------------- conversions


def to_jsonable(value: Any) -> Any:
    """``value`` as JSON data, for node outputs, event data and tool records: messages
    become ``{"role", "content", ...}`` without their ids (LangChain and LangGraph give
    messages random ids, which would make outputs differ between a run and its replay),
    pydantic models and dataclasses their fields, tuples and sets lists, and anything
    else what pydantic makes of it (else its ``str``). Non-finite floats become text."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, BaseMessage):
        return message_json(value)
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, set | frozenset):
        items = [to_jsonable(v) for v in value]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True, default=str))
    if isinstance(value, BaseModel):
        return {k: to_jsonable(getattr(value, k)) for k in type(value).model_fields}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return to_jsonable_python(value, fallback=str)


def _role(m: BaseMessage) -> str:
    if isinstance(m, ChatMessage):
        return m.role
    return {"human": "user", "ai": "assistant", "system": "system", "tool": "tool"}.get(m.type, m.type)


def message_json(m: BaseMessage) -> dict[str, Any]:
    """A message as output data: role, content, and where present tool calls (``id``,
    ``name``, ``args``), ``tool_call_id``, ``name`` and an error ``status``; no ids."""
    out: dict[str, Any] = {"role": _role(m), "content": to_jsonable(m.content)}
    if isinstance(m, AIMessage) and m.tool_calls:
        out["tool_calls"] = [
            {"id": tc.get("id"), "name": tc["name"], "args": to_jsonable(tc["args"])} for tc in m.tool_calls
        ]
    if isinstance(m, ToolMessage):
        out["tool_call_id"] = m.tool_call_id
        if m.status != "success":
            out["status"] = m.status
    if m.name:
        out["name"] = m.name
    return out


def openai_message(m: BaseMessage) -> dict[str, Any]:
    """A LangChain message as the OpenAI chat message OAO's providers take (and its
    ledger hashes): no ids, tool-call arguments as sorted-key JSON."""
    out: dict[str, Any] = {"role": _role(m), "content": to_jsonable(m.content)}
    if isinstance(m, AIMessage) and m.tool_calls:
        out["tool_calls"] = [
            {
                "id": tc.get("id"),
                "type": "function",
                "function": {
                    "name": tc["name"],
                    "arguments": json.dumps(to_jsonable(tc["args"]), sort_keys=True),
                },
            }
            for tc in m.tool_calls
        ]
    if isinstance(m, ToolMessage):
        out["tool_call_id"] = m.tool_call_id
    if isinstance(m, ToolMessage | FunctionMessage) and m.name:
        out["name"] = m.name
    return out


def ai_message(reply: ModelReply, message_id: str, stop: Sequence[str] | None = None) -> AIMessage:
    """The reply of a model step as a LangChain ``AIMessage`` with a deterministic id
    (``oao:<node>:<n>``, the node's n-th model call); ``stop`` sequences cut the content
    (after the step: the ledger keeps the whole reply)."""
    return AIMessage(
        content=_cut(reply.content, stop),
        tool_calls=[
            {"name": t.name, "args": t.args, "id": t.id, "type": "tool_call"} for t in reply.tool_calls
        ],
        usage_metadata={
            "input_tokens": reply.usage.input_tokens,
            "output_tokens": reply.usage.output_tokens,
            "total_tokens": reply.usage.total,
        },
        response_metadata={"model_name": reply.model, "finish_reason": reply.finish_reason},
        id=message_id,
    )


def _cut(text: str, stop: Sequence[str] | None) -> str:
    ends = [i for s in stop or [] if s and (i := text.find(s)) >= 0]
    return text[: min(ends)] if ends else text


# --------------------------------------------------------------------------- streaming


class _StreamSink:
    """Where a streaming model call's text deltas go while ``ctx.llm`` runs.

    The concatenation of what it forwards must equal the recorded reply: a provider call
    retried inside the step (a transient error mid-stream) streams from the start again,
    so after a retry only text past what was already forwarded goes on; if the new
    attempt says something else, forwarding stops and :meth:`finish` raises."""

    def __init__(self, push: Callable[[str], None]) -> None:
        self.push = push
        self.delivered = ""
        self.attempts = 0
        self.current = ""
        self.diverged = False

    def begin(self) -> None:
        """A provider call (the first, or a retry) starts."""
        self.attempts += 1
        self.current = ""

    def delta(self, text: str) -> None:
        self.current += text
        if self.diverged or not text:
            return
        if self.attempts <= 1:
            self.delivered += text
            self.push(text)
            return
        cur, done = self.current, self.delivered
        if len(cur) <= len(done):
            self.diverged = not done.startswith(cur)
        elif not cur.startswith(done):
            self.diverged = True
        else:
            self.delivered = cur
            self.push(cur[len(done) :])

    def finish(self, content: str) -> str:
        """The rest of ``content`` not streamed yet. Raises :class:`TransientError` when
        a retried provider call answered differently from what was already streamed
        (the node then resumes from the recorded reply, served whole)."""
        if not content.startswith(self.delivered):
            raise TransientError(
                "the model's stream was retried mid-reply and answered differently; "
                "the node resumes from the recorded reply"
            )
        return content[len(self.delivered) :]


class _TapProvider(Provider):
    """A node's view of a spec model's provider: the same calls, with the text deltas
    also sent to the stream sink of the model call running in this context (if any)."""

    def __init__(self, inner: Provider) -> None:
        self.inner = inner

    async def complete(self, request: ModelRequest, on_chunk: ChunkCallback) -> ModelReply:
        sink = _SINK.get()
        if sink is None:
            return await self.inner.complete(request, on_chunk)
        sink.begin()

        async def tapped(delta: str, out: int) -> None:
            await on_chunk(delta, out)  # governance first: a raise stops the stream here
            sink.delta(delta)

        return await self.inner.complete(request, tapped)

    async def aclose(self) -> None:
        """Nothing: the run's runtime closes the real providers."""


# --------------------------------------------------------------------------- tools in ctx


@dataclasses.dataclass(slots=True)
class _FrameworkTool(Tool):
    """A framework tool as an OAO tool of one node: its schema is the framework's, and a
    call runs the closure the bridge put in :data:`_PENDING` for the current step."""

    offered: dict[str, Any] = dataclasses.field(default_factory=dict)

    def schema(self) -> dict[str, Any]:
        return self.offered


async def _run_pending(**_args: Any) -> Any:
    run = _PENDING.get()
    if run is None:
        raise PermanentError("a framework tool was called without its LangChain tool")
    return await run()


def _tool_spec(description: str, idempotent: bool) -> ToolSpec:
    # Not from a spec file: no entrypoint to validate (the tool is the graph's own).
    return ToolSpec.model_construct(
        entrypoint="langchain:tool",
        description=description,
        idempotent=idempotent,
        rate_limit=None,
        circuit_breaker=None,
    )


# --------------------------------------------------------------------------- the bridge


class NodeBridge:
    """One node attempt's link between a framework agent and its :class:`AgentContext`.

    Model and tool calls pass through :meth:`llm` and :meth:`tool`, one at a time (a
    lock: the ledger numbers a node's steps in order, so concurrent calls from one node
    are serialized in the order they arrive). Graph tools are registered in the node's
    own copy of ``ctx.tools``; the spec's providers are wrapped to tap streamed text.
    """

    def __init__(self, ctx: AgentContext) -> None:
        self.ctx = ctx
        self.loop = asyncio.get_running_loop()
        #: the first OAO error a step raised: every later call raises it (module doc)
        self.fatal: BaseException | None = None
        self.model_calls = 0
        self.tool_calls = 0
        self._lock = asyncio.Lock()
        self._futures: set[Any] = set()
        self._spec_tools = frozenset(ctx.tools)
        ctx.providers = {n: _TapProvider(p) for n, p in ctx.providers.items()}
        ctx.tools = dict(ctx.tools)

    @contextlib.contextmanager
    def bound(self) -> Iterator[NodeBridge]:
        """Make this bridge the current one in this context (and the tasks and threads
        started from it) until the block ends; then cancel calls still waiting."""
        token = _BRIDGE.set(self)
        try:
            yield self
        finally:
            _BRIDGE.reset(token)
            for fut in list(self._futures):
                fut.cancel()

    def raise_fatal(self) -> None:
        """Raise the latched OAO error, if any."""
        if self.fatal is not None:
            raise self.fatal

    def _latch(self, e: BaseException) -> None:
        if isinstance(e, OAOError) and self.fatal is None:
            self.fatal = e

    def _enter(self, target: AgentState) -> None:
        """Follow OAO's lifecycle: a model call plans, a tool call executes."""
        lc = self.ctx.lifecycle
        if target == AgentState.PLAN and lc.state == AgentState.EXECUTE:
            lc.enter(AgentState.REVIEW)
        if target == AgentState.EXECUTE and lc.state in (AgentState.INIT, AgentState.REVIEW):
            lc.enter(AgentState.PLAN)
        lc.enter(target)

    def _no_nesting(self, what: str) -> None:
        self.raise_fatal()
        if _IN_STEP.get():
            raise PermanentError(
                f"{what} inside a running tool step: a governed tool cannot make governed calls "
                "(the tool's step is served whole from the ledger on replay)"
            )

    def refuse(self, what: str, name: str) -> PolicyViolation:
        """The violation for a framework call that does not go through OAO (latched)."""
        e = PolicyViolation(
            "ungoverned_call",
            detail=f"{what} {name!r} does not go through OAO: give the agent OAO's chat model "
            "(OAOChatModel, or the factory's model argument) and governed tools (governed(tool), "
            "or the factory's tools argument); docs/frameworks.md",
        )
        self._latch(e)
        return e

    async def llm(
        self,
        model: str | None,
        messages: list[dict[str, Any]],
        tools: Sequence[dict[str, Any]],
        max_tokens: int | None,
        temperature: float | None,
        sink: _StreamSink | None = None,
        on_start: Callable[[str], None] | None = None,
    ) -> tuple[ModelReply, str]:
        """One model step through ``ctx.llm``: returns the reply and the message id
        (``oao:<node>:<n>``). ``tools`` are OpenAI tool schemas offered to the model.
        ``on_start(message_id)`` is called once the step has its turn. Raises what
        ``ctx.llm`` raises (latched when it is an OAO error)."""
        self._no_nesting("a model call")
        names = [self._offer(schema) for schema in tools]
        async with self._lock:
            self.raise_fatal()
            self.model_calls += 1
            message_id = f"oao:{self.ctx.node_id}:{self.model_calls}"
            if on_start is not None:
                on_start(message_id)
            step_token = _IN_STEP.set(True)
            sink_token = _SINK.set(sink)
            try:
                self._enter(AgentState.PLAN)
                reply = await self.ctx.llm(
                    messages, model=model, tools=names, max_tokens=max_tokens, temperature=temperature
                )
            except Exception as e:
                self._latch(e)
                raise
            finally:
                _SINK.reset(sink_token)
                _IN_STEP.reset(step_token)
        return reply, message_id

    def _offer(self, schema: dict[str, Any]) -> str:
        """Register a tool schema bound to the model (if the node does not know the name
        yet) so ``ctx.llm`` can offer it; returns the tool's name."""
        fn = schema.get("function") or {}
        name = str(fn.get("name") or "")
        if not name:
            raise PermanentError(f"a tool bound to the model has no name: {schema!r}")
        if name not in self.ctx.tools:
            self.ctx.tools[name] = _FrameworkTool(
                name, _run_pending, _tool_spec(str(fn.get("description") or ""), False), schema
            )
        return name

    async def tool(
        self,
        name: str,
        args: dict[str, Any],
        run: Callable[[], Awaitable[Any]] | None,
        schema: dict[str, Any] | None = None,
        idempotent: bool = False,
    ) -> tuple[bool, Any]:
        """One tool step through ``ctx.try_tool``: ``(True, value)`` or ``(False,
        "Type: message")`` for the tool's own failure (recorded, so a replay fails the
        same way). ``run`` executes a framework tool (``None``: ``name`` is a spec
        tool); ``args`` (JSON) identify the call in the ledger. Raises OAO errors
        (latched): a policy violation, an unknown tool, a stale attempt..."""
        self._no_nesting(f"tool {name!r}")
        if run is not None:
            if name in self._spec_tools:
                raise PermanentError(
                    f"tool {name!r} of the agent has the name of a spec tool: rename one of them"
                )
            have = self.ctx.tools.get(name)
            if not isinstance(have, _FrameworkTool) or have.spec.idempotent != idempotent:
                offered = schema or (have.schema() if have is not None else {})
                self.ctx.tools[name] = _FrameworkTool(
                    name, _run_pending, _tool_spec(str(offered.get("description") or ""), idempotent), offered
                )
        async with self._lock:
            self.raise_fatal()
            self.tool_calls += 1
            step_token = _IN_STEP.set(True)
            run_token = _PENDING.set(run)
            try:
                self._enter(AgentState.EXECUTE)
                return await self.ctx.try_tool(name, args)
            except Exception as e:
                self._latch(e)
                raise
            finally:
                _PENDING.reset(run_token)
                _IN_STEP.reset(step_token)

    def call_sync(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the worker's event loop from a framework thread (a sync graph
        node runs in one) and wait for it; cancelled when the node ends. Raises
        :class:`PermanentError` when called on the event loop itself (it would wait for
        itself: use ``ainvoke`` in async code)."""
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            coro.close()
            raise PermanentError(
                "a sync model or tool call (invoke) on the worker's event loop: use ainvoke in async code"
            )
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        self._futures.add(fut)
        try:
            return fut.result()
        finally:
            self._futures.discard(fut)


def finish_lifecycle(ctx: AgentContext) -> None:
    """End a framework agent's lifecycle after it returned: REVIEW, then TERMINATE."""
    lc = ctx.lifecycle
    if lc.state == AgentState.INIT:
        lc.enter(AgentState.PLAN)
    if lc.state in (AgentState.PLAN, AgentState.EXECUTE):
        lc.enter(AgentState.REVIEW)
    lc.terminate()


# --------------------------------------------------------------------------- chat model


class OAOChatModel(BaseChatModel):
    """OAO's model of a spec as a LangChain chat model (module doc).

    ``model`` names a model of the spec (default: the agent's ``model``, or the spec's
    only model); ``max_tokens`` and ``temperature`` are sent with every call. Bind tools
    with ``bind_tools`` (LangChain tools, functions, pydantic classes or OpenAI schemas):
    they are offered to the model by name; ``tool_choice`` is not sent. ``stop``
    sequences cut the reply after the step. Every call raises OAO's errors:
    ``PolicyViolation`` when a budget is crossed (mid-stream included),
    ``TransientError`` / ``PermanentError`` from the provider, and ``PermanentError``
    outside an OAO node.
    """

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    cache: BaseCache | bool | None = False  # a LangChain cache would answer without OAO knowing
    tags: list[str] | None = Field(default_factory=lambda: [GOVERNED_TAG])

    @property
    def _llm_type(self) -> str:
        return "oao"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model, "max_tokens": self.max_tokens, "temperature": self.temperature}

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """This model with ``tools`` offered on every call (OpenAI schemas)."""
        return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)

    async def _call(
        self,
        messages: list[BaseMessage],
        kwargs: dict[str, Any],
        sink: _StreamSink | None = None,
        on_start: Callable[[str], None] | None = None,
    ) -> tuple[ModelReply, str]:
        bridge = _require_bridge("OAOChatModel")
        return await bridge.llm(
            self.model,
            [openai_message(m) for m in messages],
            kwargs.get("tools") or [],
            kwargs.get("max_tokens", self.max_tokens),
            kwargs.get("temperature", self.temperature),
            sink,
            on_start,
        )

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        reply, message_id = await self._call(messages, kwargs)
        return ChatResult(generations=[ChatGeneration(message=ai_message(reply, message_id, stop))])

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        bridge = _require_bridge("OAOChatModel")
        return bridge.call_sync(self._agenerate(messages, stop, None, **kwargs))

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        """Stream the reply: text deltas as the provider produces them (none when the
        step is served from the ledger), then a last chunk with the rest of the text,
        the tool calls, usage and metadata. With ``stop`` sequences the reply is not
        streamed (it is cut when whole)."""
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        sink = None if stop else _StreamSink(queue.put_nowait)
        ids: list[str] = []
        task = asyncio.ensure_future(self._call(messages, kwargs, sink, ids.append))
        task.add_done_callback(lambda _t: queue.put_nowait(None))
        try:
            while (delta := await queue.get()) is not None:
                yield ChatGenerationChunk(message=AIMessageChunk(content=delta, id=ids[0] if ids else None))
            reply, message_id = task.result()
            full = ai_message(reply, message_id, stop)
            rest = sink.finish(reply.content) if sink is not None else str(full.content)
            yield ChatGenerationChunk(
                message=AIMessageChunk(
                    content=rest,
                    id=message_id,
                    tool_call_chunks=[
                        {
                            "name": tc["name"],
                            "args": json.dumps(tc["args"], sort_keys=True),
                            "id": tc["id"],
                            "index": i,
                            "type": "tool_call_chunk",
                        }
                        for i, tc in enumerate(full.tool_calls)
                    ],
                    usage_metadata=full.usage_metadata,
                    response_metadata=full.response_metadata,
                    chunk_position="last",
                )
            )
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task


# --------------------------------------------------------------------------- tools


class OAOTool(BaseTool):
    """A LangChain tool whose calls are OAO tool steps (module doc).

    ``inner`` is the framework tool it governs (built by :func:`governed`); without
    one the tool is the spec tool of the same name (built by :func:`spec_tools`).
    ``idempotent`` tells OAO it may run again after a crash in the middle of a call
    (as a spec tool's ``idempotent: true``). A replayed call returns the recorded result.
    Outside an OAO node a governed tool simply runs ``inner``.
    """

    inner: BaseTool | None = None
    idempotent: bool = False
    tags: list[str] | None = Field(default_factory=lambda: [GOVERNED_TAG])

    async def ainvoke(self, input: Any, config: Any = None, **kwargs: Any) -> Any:
        token = _TOOL_CALL_ID.set(_tool_call_id(input))
        try:
            return await super().ainvoke(input, config, **kwargs)
        finally:
            _TOOL_CALL_ID.reset(token)

    def invoke(self, input: Any, config: Any = None, **kwargs: Any) -> Any:
        token = _TOOL_CALL_ID.set(_tool_call_id(input))
        try:
            return super().invoke(input, config, **kwargs)
        finally:
            _TOOL_CALL_ID.reset(token)

    def _visible(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The arguments the model gave (not those the graph injects: state, store,
        tool call id), as JSON: they identify the call in the ledger."""
        schema = self.tool_call_schema
        if isinstance(schema, dict):
            keys = set((schema.get("properties") or {}).keys())
        else:
            keys = set(getattr(schema, "model_fields", None) or getattr(schema, "__fields__", {}))
        return {k: to_jsonable(v) for k, v in kwargs.items() if k in keys}

    async def _arun(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("run_manager", None)
        if args:
            raise ToolException(f"tool {self.name!r}: positional arguments are not supported under OAO")
        bridge = _BRIDGE.get()
        inner = self.inner
        call_id = _TOOL_CALL_ID.get()
        if bridge is None:
            if inner is None:
                raise PermanentError(f"spec tool {self.name!r} runs only inside an OAO node")
            return await inner.ainvoke(_as_call(kwargs, call_id, self.name), {"callbacks": []})
        visible = self._visible(kwargs)
        run = None
        if inner is not None:
            lc_tool = inner

            async def run() -> Any:
                out = await lc_tool.ainvoke(_as_call(kwargs, call_id, self.name), {"callbacks": []})
                return _tool_record(out, self.name)

        ok, value = await bridge.tool(
            self.name,
            visible,
            run,
            convert_to_openai_tool(self) if inner is not None else None,
            self.idempotent,
        )
        if not ok:
            raise ToolException(str(value))
        if inner is None:
            return value
        if not isinstance(value, dict) or "content" not in value:
            raise PermanentError(f"tool {self.name!r}: the ledger holds no tool result of a LangChain tool")
        if call_id is None:
            return value["content"]
        return ToolMessage(
            content=value["content"],
            tool_call_id=call_id,
            name=self.name,
            status=value.get("status", "success"),
            artifact=value.get("artifact"),
        )

    def _run(self, *args: Any, **kwargs: Any) -> Any:
        bridge = _BRIDGE.get()
        if bridge is None:
            if self.inner is None:
                raise PermanentError(f"spec tool {self.name!r} runs only inside an OAO node")
            kwargs.pop("run_manager", None)
            return self.inner.invoke(_as_call(kwargs, _TOOL_CALL_ID.get(), self.name), {"callbacks": []})
        return bridge.call_sync(self._arun(*args, **kwargs))


def _tool_call_id(input: Any) -> str | None:
    if isinstance(input, dict) and input.get("type") == "tool_call":
        return str(input.get("id")) if input.get("id") is not None else None
    return None


def _as_call(args: dict[str, Any], call_id: str | None, name: str) -> dict[str, Any]:
    """The input for the inner tool: a ToolCall (so it can have injected arguments and
    answer with a ToolMessage) when the call has an id, else the plain arguments."""
    if call_id is None:
        return args
    return {"type": "tool_call", "id": call_id, "name": name, "args": args}


def _tool_record(out: Any, name: str) -> dict[str, Any]:
    """What a LangChain tool returned, as the JSON the ledger keeps."""
    if isinstance(out, ToolMessage):
        rec: dict[str, Any] = {"content": to_jsonable(out.content), "status": out.status}
        if out.artifact is not None:
            rec["artifact"] = to_jsonable(out.artifact)
        return rec
    if type(out).__name__ == "Command":
        raise PermanentError(f"tool {name!r} returned a LangGraph Command: not supported under OAO")
    return {"content": to_jsonable(out)}


def governed(
    tool: BaseTool | Callable[..., Any] | Sequence[BaseTool | Callable[..., Any]], *, idempotent: bool = False
) -> Any:
    """An OAO-governed copy of a LangChain tool (or of a function, made a tool with
    LangChain's ``@tool``), or a list of them for a list: same name, description,
    argument schema (injected arguments included) and error handling; every call an OAO
    tool step. ``idempotent=True`` lets OAO run a call again after a crash in its
    middle. A tool that is governed already is returned as is."""
    if isinstance(tool, Sequence) and not isinstance(tool, str | bytes):
        return [governed(t, idempotent=idempotent) for t in tool]
    if isinstance(tool, OAOTool):
        return tool
    inner = tool if isinstance(tool, BaseTool) else make_tool(tool)
    return OAOTool(
        name=inner.name,
        description=inner.description,
        args_schema=inner.args_schema,
        return_direct=inner.return_direct,
        handle_tool_error=inner.handle_tool_error,
        handle_validation_error=inner.handle_validation_error,
        inner=inner,
        idempotent=idempotent,
    )


def spec_tools(tools: dict[str, Tool], names: Sequence[str] | None = None) -> list[BaseTool]:
    """The spec's tools (``names`` of them, all by default, in that order) as LangChain
    tools whose calls are OAO tool steps of the spec tool (its rate limit, circuit
    breaker and ``idempotent`` apply). A tool's failure reaches the model as an error
    message, as in the ``llm`` agent kind."""
    out: list[BaseTool] = []
    for name in names if names is not None else sorted(tools):
        t = tools[name]
        fn = t.schema()["function"]
        out.append(
            OAOTool(
                name=name,
                description=fn.get("description") or name,
                args_schema=fn.get("parameters") or {"type": "object", "properties": {}},
                handle_tool_error=True,
                idempotent=t.spec.idempotent,
            )
        )
    return out


# --------------------------------------------------------------------------- callbacks


class OAOCallbackHandler(BaseCallbackHandler):
    """Passed in the agent's ``RunnableConfig``: refuses chat models, LLMs and tools that
    are not OAO's (a latched ``PolicyViolation``, rule ``ungoverned_call``) before they
    run. Runs inline and raises (``raise_error``) so the refusal stops the call."""

    raise_error = True
    run_inline = True

    def __init__(self, bridge: NodeBridge) -> None:
        self.bridge = bridge

    def _check(self, what: str, serialized: dict[str, Any] | None, tags: list[str] | None, **kw: Any) -> None:
        if GOVERNED_TAG in (tags or []):
            return
        ser = serialized or {}
        name = kw.get("name") or ser.get("name") or ".".join(ser.get("id") or []) or "?"
        raise self.bridge.refuse(what, str(name))

    def on_chat_model_start(
        self, serialized: dict[str, Any], messages: list[list[BaseMessage]], **kwargs: Any
    ) -> None:
        self._check("chat model", serialized, kwargs.get("tags"))

    def on_llm_start(self, serialized: dict[str, Any], prompts: list[str], **kwargs: Any) -> None:
        self._check("LLM", serialized, kwargs.get("tags"))

    def on_tool_start(self, serialized: dict[str, Any], input_str: str, **kwargs: Any) -> None:
        self._check("tool", serialized, kwargs.get("tags"))


# --------------------------------------------------------------------------- factories


def runnable_from(
    target: Any,
    agent: str,
    model: str | None,
    tools: dict[str, Tool],
    allowed: list[str] | None,
    config: dict[str, Any],
) -> Any:
    """What an entrypoint names, made a Runnable: the object itself, or what calling it
    returns, with the arguments it declares among ``model`` (an :class:`OAOChatModel`
    of ``model``), ``tools`` (the spec tools the agent may use, from ``allowed``, as
    LangChain tools) and the keys of ``config``. Raises :class:`PermanentError` when the
    call fails or declares other required arguments."""
    from langchain_core.runnables import Runnable

    if isinstance(target, Runnable):
        if config:
            raise PermanentError(f"agent {agent!r}: config is given but the entrypoint is not a function")
        return target
    if not callable(target):
        raise PermanentError(
            f"agent {agent!r}: the entrypoint is neither a Runnable nor a function returning one"
        )
    import inspect

    params = inspect.signature(target).parameters
    kwargs: dict[str, Any] = dict(config)
    if "model" in params and "model" not in kwargs:
        kwargs["model"] = OAOChatModel(model=model)
    if "tools" in params and "tools" not in kwargs:
        kwargs["tools"] = spec_tools(tools, [t for t in (allowed or sorted(tools)) if t in tools])
    try:
        return target(**kwargs)
    except TypeError as e:
        raise PermanentError(f"agent {agent!r}: cannot call the entrypoint: {e}") from None
