"""Small pure pieces: lifecycle, backoff, hashing, keys, and the Lua literals."""

from __future__ import annotations

import random
import re
from importlib import resources

import pytest

from oao_common.errors import IllegalTransition, PolicyViolation
from oao_common.events import EventType
from oao_common.hashing import canonical_json, sha256_hex
from oao_common.keys import Keys, job_id, parse_job
from oao_common.policy import PolicySpec, RetrySpec, backoff_delay_s
from oao_common.states import NodeState, RunState
from oao_worker.governance import Governor, StepInfo, StrictPolicy
from oao_worker.lifecycle import AgentState, Lifecycle


def test_lifecycle_legal_path_and_events() -> None:
    seen: list[tuple[str, str | None]] = []
    lc = Lifecycle(lambda s, p: seen.append((str(s), p and str(p))))
    for s in ("PLAN", "EXECUTE", "REVIEW", "PLAN", "REVIEW", "TERMINATE"):
        lc.enter(AgentState(s))
    assert [s for s, _ in seen] == ["INIT", "PLAN", "EXECUTE", "REVIEW", "PLAN", "REVIEW", "TERMINATE"]
    assert seen[2] == ("EXECUTE", "PLAN")


@pytest.mark.parametrize(
    "path",
    [("EXECUTE",), ("REVIEW",), ("PLAN", "EXECUTE", "PLAN"), ("TERMINATE", "PLAN")],
)
def test_lifecycle_rejects_illegal(path: tuple[str, ...]) -> None:
    lc = Lifecycle(lambda s, p: None)
    with pytest.raises(IllegalTransition):
        for s in path:
            lc.enter(AgentState(s))


def test_backoff_exponential_capped_and_jittered() -> None:
    r = RetrySpec(retry_delay_s=1.0, backoff=2.0, max_delay_s=5.0, jitter=False)
    assert [backoff_delay_s(r, n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 5.0]
    j = RetrySpec(retry_delay_s=1.0, backoff=2.0, max_delay_s=100.0, jitter=True)
    rng = random.Random(7)
    draws = [backoff_delay_s(j, 3, rng) for _ in range(200)]
    assert all(2.0 <= d <= 4.0 for d in draws)  # equal jitter: [base/2, base]
    assert max(draws) - min(draws) > 1.0


def test_canonical_json_is_order_and_float_stable() -> None:
    assert canonical_json({"b": 1.0, "a": [2, {"y": 1, "x": 2}]}) == '{"a":[2,{"x":2,"y":1}],"b":1}'
    assert sha256_hex({"a": 1, "b": 2}) == sha256_hex({"b": 2.0, "a": 1})
    assert sha256_hex({"a": 1}) != sha256_hex({"a": 2})


def test_keys_share_run_hash_tag() -> None:
    k = Keys("p")
    for key in (k.run("r1"), k.node("r1", "n"), k.events("r1"), k.steps("r1")):
        assert "{r1}" in key and key.startswith("p:")
    assert parse_job(job_id("r1", "n.x-1")) == ("r1", "n.x-1")
    with pytest.raises(ValueError):
        parse_job("nojob")


def _lua_sources() -> str:
    lua = resources.files("oao_common") / "lua"
    return "\n".join(f.read_text() for f in lua.iterdir() if f.name.endswith(".lua"))


def test_lua_event_types_are_defined_in_events_py() -> None:
    src = _lua_sources()
    used = set(re.findall(r"'((?:RUN|NODE|STEP|STATE|STALE|POLICY)_[A-Z_]+)'", src))
    assert used, "no event literals found"
    assert used <= {e.value for e in EventType}, used - {e.value for e in EventType}


def test_lua_state_literals_are_defined_in_states_py() -> None:
    src = _lua_sources()
    used = set(re.findall(r"'(PENDING|READY|RUNNING|SUCCEEDED|FAILED|SKIPPED|CANCELLED|PARTIAL)'", src))
    assert used <= {s.value for s in NodeState} | {s.value for s in RunState}
    assert {"READY", "RUNNING", "SUCCEEDED", "FAILED", "SKIPPED", "CANCELLED"} <= used


def test_lua_headers_document_keys_and_argv() -> None:
    lua = resources.files("oao_common") / "lua"
    for f in lua.iterdir():
        if f.name.endswith(".lua") and not f.name.startswith("_"):
            head = f.read_text().split("\n", 12)
            text = "\n".join(head)
            assert "KEYS[1]" in text and "ARGV[2]" in text, f.name


def test_policy_violation_message() -> None:
    e = PolicyViolation("max_tokens", 2000, 2056)
    assert str(e) == "PolicyViolation: Max Token Limit Exceeded (2056 > 2000 tokens)"
    assert e.to_dict()["rule"] == "max_tokens"


async def test_strict_policy_mid_stream_and_allow_list() -> None:
    g = Governor([StrictPolicy(PolicySpec(max_steps=2, max_tokens=100, max_tool_calls=1), ["ok"])])
    step = StepInfo(seq=1, kind="llm", name="m", input_tokens=40)
    await g.before_step(step)
    await g.on_chunk(step, 60)  # 40 + 60 = 100: at the limit, allowed
    with pytest.raises(PolicyViolation) as e:
        await g.on_chunk(step, 61)
    assert e.value.rule == "max_tokens" and e.value.value == 101
    with pytest.raises(PolicyViolation) as e:
        await g.before_step(StepInfo(seq=2, kind="tool", name="nope"))
    assert e.value.rule == "tool_not_allowed"
    g.account("tool", 0, 0, 0.0)
    with pytest.raises(PolicyViolation) as e:
        await g.before_step(StepInfo(seq=2, kind="tool", name="ok"))
    assert e.value.rule == "max_tool_calls"
    g.account("llm", 0, 0, 0.0)
    with pytest.raises(PolicyViolation) as e:
        await g.before_step(StepInfo(seq=3, kind="llm", name="m"))
    assert e.value.rule == "max_steps"
