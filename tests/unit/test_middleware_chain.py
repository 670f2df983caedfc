"""The middleware chain's contract (docs/plugins.md): hook order, which ``after_*`` hooks
run when a ``before_*`` raises, tries of a call and ``on_error``, errors of observers,
and plugin API versions."""

from __future__ import annotations

import time
from typing import Any

import pytest

from oao_common.broker import ClaimedJob
from oao_common.errors import PolicyViolation, TransientError
from oao_common.policy import PolicySpec
from oao_common.spec import parse_spec
from oao_worker.governance import (
    CallTry,
    Failure,
    Governor,
    NodeAttempt,
    StepInfo,
    StepMiddleware,
    StrictPolicy,
    Usage,
)
from oao_worker.plugins import PLUGIN_API_VERSION, api_problem


class Rec(StepMiddleware):
    """Records its hooks in ``log``; ``fail`` names hooks that raise."""

    def __init__(self, name: str, log: list[str], fail: tuple[str, ...] = ()) -> None:
        self.name, self.log, self.fail = name, log, fail

    def _hit(self, hook: str) -> None:
        self.log.append(f"{self.name}.{hook}")
        if hook in self.fail:
            raise PolicyViolation(f"{self.name}_{hook}")

    def before_node(self, node: NodeAttempt) -> None:
        self._hit("before_node")

    async def after_node(self, node: NodeAttempt) -> None:  # async hooks are awaited
        self._hit("after_node")

    def before_step(self, step: StepInfo, usage: Usage) -> None:
        self._hit("before_step")

    def on_chunk(self, step: StepInfo, usage: Usage, output_tokens: int) -> None:
        self._hit("on_chunk")

    def after_step(self, step: StepInfo, usage: Usage) -> None:
        self._hit("after_step" + ("!" if step.error is not None else ""))

    async def before_call(self, call: CallTry) -> None:
        self._hit(f"before_call{call.number}")

    def after_call(self, call: CallTry, error: BaseException | None) -> None:
        self._hit(f"after_call{call.number}" + ("!" if error is not None else ""))

    def on_error(self, failure: Failure) -> None:
        self._hit(f"on_error:{failure.scope}")

    def on_event(self, node: NodeAttempt, type_: str, data: dict[str, Any]) -> None:
        self._hit(f"on_event:{type_}")


def node() -> NodeAttempt:
    return NodeAttempt(ClaimedJob("r/n", "r", "n", 1), "w", time.monotonic())


async def test_before_hooks_run_in_order_after_hooks_and_on_error_in_reverse() -> None:
    log: list[str] = []
    n = node()
    g = Governor([Rec("a", log), Rec("b", log), Rec("c", log)], n)
    await g.before_node(n)
    step = StepInfo(seq=1, kind="llm", name="m", node=n)
    await g.before_step(step)
    await g.on_chunk(step, 5)
    await g.after_step(step)
    await g.on_error(Failure("node", RuntimeError("x"), n))
    n.emit("STATE_ENTER", {"state": "PLAN"})
    await g.after_node(n)
    assert log == [
        *("a.before_node", "b.before_node", "c.before_node"),
        *("a.before_step", "b.before_step", "c.before_step"),
        *("a.on_chunk", "b.on_chunk", "c.on_chunk"),
        *("c.after_step", "b.after_step", "a.after_step"),
        *("c.on_error:node", "b.on_error:node", "a.on_error:node"),
        *("a.on_event:STATE_ENTER", "b.on_event:STATE_ENTER", "c.on_event:STATE_ENTER"),
        *("c.after_node", "b.after_node", "a.after_node"),
    ]
    assert len(n.drain_events()) == 1 and n.events == []


async def test_a_raising_before_step_closes_only_the_middleware_it_passed() -> None:
    log: list[str] = []
    g = Governor([Rec("a", log), Rec("b", log, fail=("before_step",)), Rec("c", log)])
    step = StepInfo(seq=1, kind="tool", name="t")
    with pytest.raises(PolicyViolation, match="b_before_step"):
        await g.before_step(step)
    assert log == ["a.before_step", "b.before_step", "a.after_step!"]
    assert isinstance(step.error, PolicyViolation)


async def test_after_step_raises_its_first_error_after_every_hook_ran() -> None:
    log: list[str] = []
    g = Governor([Rec("a", log), Rec("b", log, fail=("after_step",)), Rec("c", log, fail=("after_step",))])
    step = StepInfo(seq=1, kind="llm", name="m")
    await g.before_step(step)
    log.clear()
    with pytest.raises(PolicyViolation, match="c_after_step"):
        await g.after_step(step)
    assert log == ["c.after_step", "b.after_step", "a.after_step"]


async def test_call_tries_again_when_on_error_says_so_and_refusals_close_what_they_passed() -> None:
    log: list[str] = []

    class RetryOnce(StepMiddleware):
        def on_error(self, failure: Failure) -> None:
            assert failure.scope == "call" and failure.call is not None
            failure.retry, failure.delay_s = failure.call.number < 2, 0.0

    class Refuse(StepMiddleware):
        def before_call(self, call: CallTry) -> None:
            log.append(f"refuse{call.number}")
            if call.number == 1:
                raise TransientError("not now")

    g = Governor([RetryOnce(), Rec("a", log), Refuse(), Rec("b", log)])
    step = StepInfo(seq=1, kind="llm", name="m")

    async def fn() -> str:
        return "ok"

    assert await g.call(step, fn, tokens=lambda: 10, used_tokens=lambda r: len(r)) == "ok"
    assert log == [
        "a.before_call1",
        "refuse1",
        "a.after_call1!",  # b never entered try 1; a hears the refusal
        "b.on_error:call",
        "a.on_error:call",
        "a.before_call2",
        "refuse2",
        "b.before_call2",
        "b.after_call2",
        "a.after_call2",
    ]

    async def boom() -> str:
        raise TransientError("down")

    log.clear()
    with pytest.raises(TransientError, match="down"):
        await g.call(step, boom)
    assert log.count("a.before_call2") == 1 and "a.before_call3" not in log  # tried twice, then raised


async def test_errors_of_observer_hooks_are_logged_not_raised() -> None:
    log: list[str] = []
    n = node()
    g = Governor([Rec("a", log, fail=("after_node", "on_event:X", "on_error:node"))], n)
    await g.after_node(n)
    g.on_event(n, "X", {})
    await g.on_error(Failure("node", RuntimeError("x"), n))
    assert log == ["a.after_node", "a.on_event:X", "a.on_error:node"]


def test_add_inserts_like_dramatiq() -> None:
    a, b = StrictPolicy(PolicySpec()), StepMiddleware()
    g = Governor([a, b])
    c, d = StepMiddleware(), StepMiddleware()
    g.add(c, before=StrictPolicy)
    g.add(d, after=StrictPolicy)
    assert g.middleware == [c, a, d, b]
    with pytest.raises(ValueError, match="no Rec middleware"):
        g.add(StepMiddleware(), before=Rec)


def test_plugin_api_versions() -> None:
    assert PLUGIN_API_VERSION == "1.0"
    assert api_problem("1.0") is None and api_problem("1") is None
    assert "needs OAO plugin API 1.1" in str(api_problem("1.1"))
    assert "needs OAO plugin API 2.0; this OAO provides 1.0" in str(api_problem("2.0"))
    assert "needs OAO plugin API 0.9" in str(api_problem("0.9"))
    assert "not 'MAJOR.MINOR'" in str(api_problem("latest"))


def test_specs_name_plugin_models_agents_and_middleware() -> None:
    spec = parse_spec(
        """
name: p
middleware:
  - {use: acme.no_secrets, config: {patterns: ['sk-[a-z0-9]+']}}
models:
  m: {provider: plugin, use: acme.bedrock, model: claude, config: {region: eu-west-1}}
agents:
  a: {kind: plugin, use: acme.crew, model: m, config: {size: 3}}
nodes: [{id: n, agent: a}]
"""
    )
    assert spec.middleware[0].use == "acme.no_secrets"
    assert spec.models["m"].provider == "plugin" and spec.agents["a"].kind == "plugin"
    with pytest.raises(Exception, match="use"):
        parse_spec(
            "name: p\nmiddleware: [{use: nodot}]\n"
            "agents: {a: {kind: python, entrypoint: 'm:f'}}\nnodes: [{id: n, agent: a}]"
        )
