"""Governance: the middleware chain around every node attempt, step and call (in the
style of Dramatiq's middleware: small classes whose hooks are no-ops unless
overridden, composed in an ordered list; ``before_*`` hooks run in list order, the
``after_*`` and ``on_error`` hooks in reverse order, as ``Broker.emit_before`` /
``emit_after`` do in Dramatiq). docs/plugins.md is the contract; this module is the
one implementation of it.

A :class:`StepMiddleware` sees

* a node attempt: ``before_node`` (the run's spec is loaded, before the agent runs)
  and ``after_node`` (once the attempt's end was written: :attr:`NodeAttempt.outcome`);
* each step (a model call, a tool call, an ``invoke``, a recorded clock / random / uuid
  value): ``before_step`` before it executes, ``on_chunk`` for every streamed chunk of
  a model reply (a raise closes the stream at once), ``after_step`` once it was
  recorded, replayed from the ledger, or failed (:attr:`StepInfo.error`);
* each try of a step's model or tool call: ``before_call`` / ``after_call`` (the fleet
  guards wait, take permits and report outcomes here);
* ``on_error`` for a failed try of a call (may the step retry it?) and for a failed
  attempt (may the node retry?), and ``on_event`` for every event the attempt writes
  to the run's log.

Any ``before_*`` / ``on_chunk`` hook may raise to stop: a
:class:`~oao_common.errors.PolicyViolation` fails the node at once (recorded as a
``POLICY_VIOLATION`` event, never retried); other exceptions fail it like an error of
the agent's code. Hooks may be plain functions or coroutine functions (OAO awaits the
result), except ``on_event``, which must be a plain function.

:class:`StrictPolicy` enforces the node's :class:`~oao_common.policy.PolicySpec`
(``max_steps``, ``max_tokens``, ``max_input_tokens``, ``max_output_tokens``,
``max_tool_calls``, ``max_cost_usd``) and the agent's tool allow- and deny-lists. The
other built-in middleware (timeouts, retries, costs, run budgets, rate limits, circuit
breakers, metrics, event listeners) are in :mod:`oao_worker.middleware`.
Usage counts include steps served from the ledger on replay, so a resumed node
cannot exceed its budget by restarting.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from oao_common.errors import PolicyViolation
from oao_common.events import EventType, pending_event
from oao_common.ledger import VOLATILE_KINDS
from oao_common.log import get_logger
from oao_common.policy import PolicySpec, RetrySpec
from oao_common.pricing import FREE, Price

if TYPE_CHECKING:
    from oao_common.broker import ClaimedJob
    from oao_common.spec import AgentSpec, NodeSpec, Spec

    from .runtime import RunRuntime

T = TypeVar("T")

HookResult = Awaitable[None] | None
"""What a hook returns: nothing, or an awaitable that OAO awaits."""


def _log() -> Any:
    """This module's logger (made when used: logging is configured after imports)."""
    return get_logger(component="governance")


def _hook_failed(hook: str, m: StepMiddleware, e: BaseException, level: str = "error") -> None:
    getattr(_log(), level)("middleware.hook_failed", hook=hook, middleware=repr(m), error=repr(e))


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


@dataclass(slots=True, eq=False)
class NodeAttempt:
    """One attempt of one node, as middleware sees it (the analogue of Dramatiq's
    message). The worker fills the spec fields once the run's spec is loaded (they
    are ``None`` in ``on_error`` / ``after_node`` of an attempt whose spec could not be
    loaded); middleware set the time limit and read the outcome.

    ``started``: ``time.monotonic()`` when the worker took the job (seconds).
    ``state``: scratch space for middleware, one attempt long (key it by your
    middleware object). Time fields are seconds.
    """

    job: ClaimedJob
    worker_id: str
    started: float
    spec: Spec | None = None
    node_spec: NodeSpec | None = None
    agent_spec: AgentSpec | None = None
    #: the node's effective policy (built-in defaults, spec defaults, node)
    policy: PolicySpec | None = None
    #: the node's effective retry settings; None until known
    retry: RetrySpec | None = None
    #: the run's providers, tools, prices and guards (``oao_worker/runtime.py``)
    runtime: RunRuntime | None = None
    #: set by the timeouts middleware in ``before_node``: seconds, None for no limit
    time_limit_s: float | None = None
    #: ``"node"`` (the node's ``timeout_s``) or ``"run"`` (what is left of the run's)
    limit_scope: str = "node"
    #: seconds the run had been running when this attempt started (run-scope limits)
    run_elapsed_s: float = 0.0
    #: set by the worker when the attempt ran past its time limit
    timed_out: bool = False
    #: seconds the attempt's code held the worker's event loop (heartbeat watchdog)
    blocked_s: float = 0.0
    #: how the attempt ended, set before ``after_node``: ``succeeded``, ``failed``,
    #: ``retry`` (scheduled through the delayed set), ``stale`` (fenced off),
    #: ``unrecorded`` (the failure could not be written), ``cancelled`` (its run was
    #: cancelled or failed), ``abandoned`` (shutdown, lease lost), ``watchdog``
    #: (failed by the heartbeat thread while it blocked the loop)
    outcome: str | None = None
    #: the error the attempt failed with (after ``on_error``), if any
    error: BaseException | None = None
    #: the agent's output, for ``succeeded``
    output: Any = None
    governor: Governor | None = None
    events: list[list[Any]] = field(default_factory=list)
    state: dict[Any, Any] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return self.job.run_id

    @property
    def node_id(self) -> str:
        return self.job.node_id

    @property
    def attempt(self) -> int:
        return self.job.attempt

    @property
    def agent_type(self) -> str:
        """The agent's kind (``llm``, ``python``...), ``?`` before the spec is loaded."""
        return self.agent_spec.kind if self.agent_spec is not None else "?"

    @property
    def usage(self) -> Usage:
        """The node's usage so far (the governor's)."""
        return self.governor.usage if self.governor is not None else Usage()

    def emit(self, type_: EventType | str, data: dict[str, Any] | None = None) -> None:
        """Buffer an event of this attempt for the run's log (written with the node's
        next fenced write, never for a stale attempt) and show it to every
        middleware's ``on_event``."""
        self.events.append(pending_event(EventType(type_), data))
        if self.governor is not None:
            self.governor.on_event(self, str(type_), data or {})

    def drain_events(self) -> list[list[Any]]:
        """The buffered events, emptying the buffer."""
        out, self.events = self.events, []
        return out


@dataclass(slots=True, eq=False)
class StepInfo:
    """One step: ``kind`` is ``llm``, ``tool``, ``invoke``, or a recorded value
    (``clock``, ``random``, ``uuid``: not governed, ``governed`` is False).

    Set before ``before_step``: ``seq``, ``kind``, ``name``, ``request`` (the canonical
    request whose sha256 the ledger checks: do not modify it), ``input_tokens`` (an
    estimate), ``max_tokens`` (the call's output bound, tokens), ``repeatable`` (a
    failed try may be repeated inside the step: model calls and idempotent tools),
    ``node``. Middleware set ``price`` (costs), ``reservation`` / ``reserved_out``
    (run budget). After the step: ``tokens_in``, ``tokens_out``, ``cost_usd``,
    ``duration_ms``, ``result`` (JSON), or ``error``; ``replayed`` for a step served
    from the ledger. ``state``: scratch space for middleware, one step long.
    """

    seq: int
    kind: str
    name: str
    input_tokens: int = 0
    price: Price = FREE
    meta: dict[str, Any] = field(default_factory=dict)
    node: NodeAttempt | None = None
    request: dict[str, Any] | None = None
    max_tokens: int | None = None
    repeatable: bool = False
    replayed: bool = False
    reservation: str | None = None
    reserved_out: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    duration_ms: int = 0
    result: Any = None
    error: BaseException | None = None
    state: dict[Any, Any] = field(default_factory=dict)
    #: middleware whose before_step returned (after_step runs for exactly these)
    entered: int = -1

    @property
    def governed(self) -> bool:
        """Counted and budgeted: a model call, a tool call or an invoke."""
        return self.kind not in VOLATILE_KINDS

    @property
    def args(self) -> dict[str, Any]:
        """A tool call's canonical arguments (``{}`` for other steps)."""
        req = self.request or {}
        args = req.get("args") if self.kind == "tool" else None
        return args if isinstance(args, dict) else {}


@dataclass(slots=True, eq=False)
class CallTry:
    """One try of a step's model or tool call. ``number`` counts from 1 (a retry inside
    the step is a new try); ``tokens``: the worst case to reserve with rate limiters
    (input estimate + reserved output); ``made``: the call itself started (False when
    a ``before_call`` refused it); ``used_tokens``: its actual tokens, after success.
    ``state``: scratch space for middleware, one try long."""

    step: StepInfo
    number: int
    tokens: int = 0
    made: bool = False
    used_tokens: int = 0
    state: dict[Any, Any] = field(default_factory=dict)

    @property
    def node(self) -> NodeAttempt | None:
        return self.step.node


@dataclass(slots=True, eq=False)
class Failure:
    """An error, handed to ``on_error`` to classify.

    ``scope``: ``"call"`` (a try of a step's call failed: may the step try again?) or
    ``"node"`` (the attempt failed: may the node be retried through the delayed set?).
    A middleware decides by setting ``retry`` (True / False; ``None`` is undecided, and
    means no) and ``delay_s`` (seconds before the retry); it may replace ``error``
    (the timeouts middleware turns the attempt's ``TimeoutError`` into a
    ``PolicyViolation``). ``on_error`` runs innermost first (reverse order), so the
    built-in retry classification, near the outside, sees what inner middleware did.
    """

    scope: Literal["call", "node"]
    error: BaseException
    node: NodeAttempt | None = None
    step: StepInfo | None = None
    call: CallTry | None = None
    retry: bool | None = None
    delay_s: float = 0.0


class StepMiddleware:
    """Base class of governance middleware: override the hooks you need (the others
    cost nothing: the chain skips hooks a class does not override).

    ``usage`` is the node's usage so far: before the current step's own figures are
    added in ``before_step`` and ``on_chunk``, after them in ``after_step`` (not for a
    failed step). Hooks may return an awaitable (``async def``) except ``on_event``.
    One instance may serve many attempts at once: keep per-attempt state in
    ``node.state`` / ``step.state`` / ``call.state``, not on ``self``.
    """

    def before_node(self, node: NodeAttempt) -> HookResult:
        """Before the agent runs (the run's spec is loaded; the attempt's time limit has
        not started yet). Raise to fail the attempt."""

    def after_node(self, node: NodeAttempt) -> HookResult:
        """Once per attempt, after its end was written (``node.outcome``, ``node.error``),
        even when ``before_node`` did not run (spec not loadable) or raised. Errors are
        logged and ignored."""

    def before_step(self, step: StepInfo, usage: Usage) -> HookResult:
        """Before a step executes (not for steps served from the ledger). Raise to stop
        the node; the step does not run."""

    def on_chunk(self, step: StepInfo, usage: Usage, output_tokens: int) -> HookResult:
        """For every streamed chunk of a model reply; ``output_tokens`` counts this try's
        output so far. Raise to stop: the provider closes the stream at once."""

    def after_step(self, step: StepInfo, usage: Usage) -> HookResult:
        """After a step was recorded, served from the ledger (``step.replayed``), or
        failed (``step.error``); only for middleware whose ``before_step`` returned.
        Raise to stop the node (the step stays recorded); errors of a failed step's
        hooks are logged and ignored."""

    def before_call(self, call: CallTry) -> HookResult:
        """Before each try of a model or tool call (after the step's ``before_step``).
        Raise to refuse the try (``on_error`` then decides whether to try again)."""

    def after_call(self, call: CallTry, error: BaseException | None) -> HookResult:
        """After each try, for middleware whose ``before_call`` returned: ``error`` is
        None on success (``call.used_tokens`` set). Errors are raised on success,
        logged and ignored after a failure."""

    def on_error(self, failure: Failure) -> HookResult:
        """Classify an error (:class:`Failure`): set ``retry`` / ``delay_s``, or
        replace ``error``. Errors are logged and ignored."""

    def on_event(self, node: NodeAttempt, type_: str, data: dict[str, Any]) -> None:
        """An event the attempt writes to the run's log (``STATE_ENTER``,
        ``STEP_COMPLETED``, ``POLICY_VIOLATION``...). Synchronous, must not block;
        errors are logged and ignored."""


HOOKS = (
    "before_node",
    "after_node",
    "before_step",
    "on_chunk",
    "after_step",
    "before_call",
    "after_call",
    "on_error",
    "on_event",
)


def overrides(m: StepMiddleware, hook: str) -> bool:
    """Does ``m``'s class override ``hook`` of :class:`StepMiddleware`?"""
    return getattr(type(m), hook, None) is not getattr(StepMiddleware, hook)


async def _done(result: Any) -> None:
    if inspect.isawaitable(result):
        await result


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
        if not step.governed:
            return
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
        if step.governed and not step.replayed and step.error is None:
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
    """Runs one attempt's chain of middleware and keeps the node's :class:`Usage`.

    ``middleware`` in order (outermost first). Bound to ``node`` when given (its
    ``governor``). :meth:`add` inserts like Dramatiq's ``Broker.add_middleware``.
    """

    def __init__(self, middleware: Iterable[StepMiddleware], node: NodeAttempt | None = None) -> None:
        self.middleware = list(middleware)
        self.usage = Usage()
        self.node = node
        if node is not None:
            node.governor = self
        self._reindex()

    def add(
        self,
        middleware: StepMiddleware,
        *,
        before: type[StepMiddleware] | None = None,
        after: type[StepMiddleware] | None = None,
    ) -> None:
        """Insert ``middleware`` just before the first instance of ``before``, or just
        after the last instance of ``after``, or at the end. Raises ``ValueError`` if
        that class is not in the chain."""
        if before is not None and after is not None:
            raise ValueError("give before or after, not both")
        at = len(self.middleware)
        if before is not None or after is not None:
            cls = before or after
            found = [i for i, m in enumerate(self.middleware) if isinstance(m, cls)]  # type: ignore[arg-type]
            if not found:
                raise ValueError(f"no {cls.__name__ if cls else ''} middleware in the chain")
            at = found[0] if before is not None else found[-1] + 1
        self.middleware.insert(at, middleware)
        self._reindex()

    def _reindex(self) -> None:
        self._has = {h: [overrides(m, h) for m in self.middleware] for h in HOOKS}
        self._any = {h: any(v) for h, v in self._has.items()}

    # ------------------------------------------------------------------ node

    async def before_node(self, node: NodeAttempt) -> None:
        """``before_node`` of each middleware in order; the first raise propagates."""
        if not self._any["before_node"]:
            return
        for m, has in zip(self.middleware, self._has["before_node"], strict=True):
            if has:
                await _done(m.before_node(node))

    async def after_node(self, node: NodeAttempt) -> None:
        """``after_node`` of each middleware in reverse order; errors are logged."""
        if not self._any["after_node"]:
            return
        for m, has in zip(reversed(self.middleware), reversed(self._has["after_node"]), strict=True):
            if has:
                try:
                    await _done(m.after_node(node))
                except Exception as e:
                    _hook_failed("after_node", m, e)

    # ------------------------------------------------------------------ steps

    async def before_step(self, step: StepInfo) -> None:
        """``before_step`` in order. If one raises, ``after_step`` runs (with the error in
        ``step.error``) for the middleware whose ``before_step`` returned, then the
        error propagates."""
        step.entered = 0
        try:
            for m, has in zip(self.middleware, self._has["before_step"], strict=True):
                if has:
                    await _done(m.before_step(step, self.usage))
                step.entered += 1
        except BaseException as e:
            step.error = e
            await self.after_step(step)
            raise

    async def on_chunk(self, step: StepInfo, output_tokens: int) -> None:
        """``on_chunk`` in order; the first raise propagates (it stops the stream)."""
        if not self._any["on_chunk"]:
            return
        for m, has in zip(self.middleware, self._has["on_chunk"], strict=True):
            if has:
                await _done(m.on_chunk(step, self.usage, output_tokens))

    def account(self, kind: str, tokens_in: int, tokens_out: int, cost_usd: float) -> None:
        """Add a step's figures (executed or replayed) to the usage."""
        u = self.usage
        u.steps += 1
        u.tool_calls += 1 if kind == "tool" else 0
        u.tokens_in += tokens_in
        u.tokens_out += tokens_out
        u.cost_usd += cost_usd

    async def after_step(self, step: StepInfo) -> None:
        """``after_step`` in reverse order, for the middleware that entered the step
        (all of them for a replayed step). On success the first error is raised after
        every hook ran; for a failed step (``step.error``) errors are logged."""
        n = len(self.middleware) if step.entered < 0 else step.entered
        ms = self.middleware[:n]
        has = self._has["after_step"][:n]
        await self._after("after_step", ms, has, (step, self.usage), failed=step.error is not None)

    async def _after(
        self, hook: str, ms: list[StepMiddleware], has: list[bool], args: tuple[Any, ...], failed: bool
    ) -> None:
        first: BaseException | None = None
        for m, h in zip(reversed(ms), reversed(has), strict=True):
            if not h:
                continue
            try:
                await _done(getattr(m, hook)(*args))
            except Exception as e:
                if failed:
                    _hook_failed(hook, m, e, "warning")
                elif first is None:
                    first = e
        if first is not None:
            raise first

    # ------------------------------------------------------------------ calls

    async def call(
        self,
        step: StepInfo,
        fn: Callable[[], Awaitable[T]],
        tokens: Callable[[], int] = lambda: 0,
        used_tokens: Callable[[T], int] = lambda _: 0,
    ) -> T:
        """Run ``fn`` (one model or tool call of ``step``) in tries: each try passes
        ``before_call`` / ``after_call``; a try that raises goes to ``on_error``
        (``scope="call"``), and is repeated after ``delay_s`` seconds if a middleware
        set ``retry``. ``tokens()``: worst-case tokens of a try; ``used_tokens(result)``:
        its actual tokens. Raises the last try's error."""
        number = 0
        while True:
            number += 1
            attempt = CallTry(step, number, tokens())
            try:
                return await self._try(attempt, fn, used_tokens)
            except Exception as e:
                failure = Failure("call", e, step.node, step, attempt)
                await self.on_error(failure)
                if not failure.retry:
                    if failure.error is e:
                        raise
                    raise failure.error from e
                await asyncio.sleep(failure.delay_s)

    async def _try(self, call: CallTry, fn: Callable[[], Awaitable[T]], used_tokens: Callable[[T], int]) -> T:
        entered = 0
        has_before = self._has["before_call"]
        try:
            for m, has in zip(self.middleware, has_before, strict=True):
                if has:
                    await _done(m.before_call(call))
                entered += 1
            call.made = True
            out = await fn()
        except BaseException as e:
            await self._after(
                "after_call", self.middleware[:entered], self._has["after_call"][:entered], (call, e), True
            )
            raise
        call.used_tokens = used_tokens(out)
        await self._after("after_call", self.middleware, self._has["after_call"], (call, None), False)
        return out

    # ------------------------------------------------------------------ errors, events

    async def on_error(self, failure: Failure) -> None:
        """``on_error`` in reverse order (innermost first); errors are logged."""
        if not self._any["on_error"]:
            return
        for m, has in zip(reversed(self.middleware), reversed(self._has["on_error"]), strict=True):
            if has:
                try:
                    await _done(m.on_error(failure))
                except Exception as e:
                    _hook_failed("on_error", m, e)

    def on_event(self, node: NodeAttempt, type_: str, data: dict[str, Any]) -> None:
        """``on_event`` in order; errors are logged."""
        if not self._any["on_event"]:
            return
        for m, has in zip(self.middleware, self._has["on_event"], strict=True):
            if has:
                try:
                    m.on_event(node, type_, data)
                except Exception as e:
                    _hook_failed("on_event", m, e)
