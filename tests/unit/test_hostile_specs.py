"""Hostile or wedging specs: each is refused with one problem line naming the place,
never a traceback, a wedged node or a blown-up memory."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from oao_common.errors import SpecError
from oao_common.hashing import canonical_json
from oao_common.limits import MAX_DELAY_S
from oao_common.policy import RetrySpec, backoff_delay_s
from oao_common.spec import Spec, apply_inputs, load_spec, parse_input_pairs, parse_spec
from oao_scheduler.submit import execution_hash

AGENTS = "agents: {p: {kind: python, entrypoint: 'm:f'}}\n"
NODES = "nodes: [{id: a, agent: p}]\n"
TAIL = AGENTS + NODES


def problems_of(text: str) -> list[str]:
    with pytest.raises(SpecError) as e:
        parse_spec(text, "dag.yaml")
    return e.value.problems


def billion_laughs(levels: int = 9) -> str:
    """The classic alias bomb under ``inputs``: 9 ** levels strings from a few hundred bytes."""
    lines = ["inputs:", '  a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        prev, cur = f"a{i - 1}" if i > 1 else "a", f"a{i}"
        lines.append(f"  {cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\nname: x\n" + TAIL


# ------------------------------------------------------------ 1. finite, bounded numbers

NUMBERS = {
    "retry_delay_inf": (
        "defaults: {retry: {retry_delay_s: .inf}}",
        "defaults.retry.retry_delay_s (line 2): Input should be a finite number",
    ),
    "max_delay_huge": (
        "defaults: {retry: {max_delay_s: 1e300}}",
        "defaults.retry.max_delay_s (line 2): Input should be less than or equal to 86400",
    ),
    "backoff_huge": (
        "defaults: {retry: {backoff: 1000}}",
        "defaults.retry.backoff (line 2): Input should be less than or equal to 100",
    ),
    "timeout_inf": (
        "defaults: {policy: {timeout_s: .inf}}",
        "defaults.policy.timeout_s (line 2): Input should be a finite number",
    ),
    "timeout_overflow": (
        "policy: {timeout_s: 1e400}",
        "policy.timeout_s (line 2): Input should be a finite number",
    ),
    "cost_nan": (
        "policy: {max_cost_usd: .nan}",
        "policy.max_cost_usd (line 2): Input should be a finite number",
    ),
    "tokens_huge": (
        "policy: {max_tokens: 10000000000000}",
        "policy.max_tokens (line 2): Input should be less than or equal to 1000000000000",
    ),
    "retries_huge": (
        "defaults: {retry: {max_retries: 1000000}}",
        "defaults.retry.max_retries (line 2): Input should be less than or equal to 1000",
    ),
    "pricing_huge": (
        "models: {m: {provider: scripted, pricing: {input_usd_per_mtok: 1e10, output_usd_per_mtok: 1}}}",
        "models.m.pricing.input_usd_per_mtok (line 2): Input should be less than or equal to 1000000000",
    ),
    "scripted_delay": (
        "models: {m: {provider: scripted, reply_delay_s: .inf}}",
        "models.m.reply_delay_s (line 2): Input should be a finite number",
    ),
    "openai_timeout": (
        "models: {m: {provider: openai, model: g, timeout_s: 1e9}}",
        "models.m.timeout_s (line 2): Input should be less than or equal to 604800",
    ),
    "temperature": (
        "models: {m: {provider: openai, model: g, temperature: .nan}}",
        "models.m.temperature (line 2): Input should be a finite number",
    ),
    "rate_limit": (
        "tools: {t: {entrypoint: 'm:t', rate_limit: {rpm: 1e15}}}",
        "tools.t.rate_limit.rpm (line 2): Input should be a valid integer",
    ),
    "circuit": (
        "tools: {t: {entrypoint: 'm:t', circuit_breaker: {cool_down_s: .inf}}}",
        "tools.t.circuit_breaker.cool_down_s (line 2): Input should be a finite number",
    ),
    "escalation": (
        "escalation: {webhook: 'http://127.0.0.1:1/', timeout_s: -.inf}",
        "escalation.timeout_s (line 2): Input should be a finite number",
    ),
    "input_nan": (
        "inputs: {x: [1, {y: .nan}]}",
        "inputs.x (line 2): number must be finite, not nan (at [1].y)",
    ),
    "config_inf": (
        "agents: {q: {kind: python, entrypoint: 'm:f', config: {k: .inf}}}",
        "agents.q.config.k (line 2): number must be finite, not inf",
    ),
    "input_bigint": (
        "inputs: {x: 100000000000000000000}",
        "inputs.x (line 2): integer out of range (|n| <= 9007199254740991)",
    ),
}


@pytest.mark.parametrize("case", sorted(NUMBERS))
def test_every_number_is_finite_and_bounded(case: str) -> None:
    line, expected = NUMBERS[case]
    extra_agents = line.startswith("agents:")
    text = f"name: x\n{line}\n" + (NODES if extra_agents else TAIL)
    if extra_agents:  # the line is the agents mapping: keep p in it
        text = text.replace("agents: {", "agents: {p: {kind: python, entrypoint: 'm:f'}, ")
    assert problems_of(text) == [expected]


def numeric_fields(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Path -> JSON schema of every integer or number field reachable from ``schema``."""
    defs = schema.get("$defs", {})
    out: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()
    todo: list[tuple[dict[str, Any], str]] = [(schema, "spec")]
    while todo:
        s, path = todo.pop()
        if "$ref" in s:
            name = s["$ref"].rsplit("/", 1)[-1]
            if name not in seen:
                seen.add(name)
                todo.append((defs[name], name))
            continue
        todo.extend((sub, path) for key in ("anyOf", "oneOf", "allOf") for sub in s.get(key, []))
        todo.extend((sub, f"{path}.{name}") for name, sub in s.get("properties", {}).items())
        todo.extend(
            (s[key], f"{path}[]") for key in ("items", "additionalProperties") if isinstance(s.get(key), dict)
        )
        if s.get("type") in ("integer", "number"):
            out[path] = s
    return out


def test_schema_every_numeric_field_has_an_upper_bound() -> None:
    fields = numeric_fields(Spec.model_json_schema())
    assert {
        "RetrySpec.backoff",
        "CircuitBreakerSpec.cool_down_s",
        "RateLimitSpec.rpm",
        "NodeSpec.priority",
    } <= set(fields)
    assert [p for p, s in fields.items() if "maximum" not in s and "exclusiveMaximum" not in s] == []


def test_core_schema_every_number_and_flag_is_strict_and_finite() -> None:
    """No int, float or bool anywhere in the spec accepts a coerced value or inf/nan."""
    todo: list[Any] = [Spec.__pydantic_core_schema__]
    scalars: list[dict[str, Any]] = []
    while todo:
        x = todo.pop()
        if isinstance(x, dict):
            if x.get("type") in ("int", "float", "bool"):
                scalars.append(x)
            todo.extend(x.values())
        elif isinstance(x, (list, tuple)):
            todo.extend(x)
    assert len(scalars) > 40
    lax = [x for x in scalars if not x.get("strict")]
    infinite = [x for x in scalars if x["type"] == "float" and x.get("allow_inf_nan") is not False]
    assert lax == [] and infinite == []


def test_backoff_never_overflows_or_exceeds_a_day() -> None:
    retry = RetrySpec(max_retries=1000, retry_delay_s=MAX_DELAY_S, backoff=100.0, max_delay_s=MAX_DELAY_S)
    assert backoff_delay_s(retry, 1000) == MAX_DELAY_S
    no_cap = RetrySpec(retry_delay_s=1.0, backoff=100.0)
    assert backoff_delay_s(no_cap, 10**6) == MAX_DELAY_S
    assert backoff_delay_s(RetrySpec(retry_delay_s=0.0, backoff=100.0), 10**6) == 0.0
    assert backoff_delay_s(RetrySpec(retry_delay_s=1.0, backoff=2.0), 3) == 4.0


# ------------------------------------------------------------ 2. alias bombs


def test_alias_bomb_fails_before_expansion() -> None:
    text = billion_laughs(9)
    assert len(text.encode()) < 1000
    tracemalloc.start()
    try:
        p = problems_of(text)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert p == ["line 8: expands (through aliases) to more than 1000000 YAML nodes"]
    assert peak < 5 * 1024 * 1024, peak  # bytes: the 9**9 strings were never built


def test_alias_bomb_of_text_is_bounded_too() -> None:
    big = "x" * 200_000
    lines = [f"  t: &t '{big}'", "  l: &l [" + ",".join(["*t"] * 100) + "]"]
    text = "inputs:\n" + "\n".join(lines) + "\n  m: [*l, *l]\nname: x\n" + TAIL
    assert problems_of(text) == ["line 3: expands (through aliases) to more than 16777216 characters of text"]


def test_recursive_alias() -> None:
    assert problems_of("name: x\ninputs: {a: &a [1, *a]}\n" + TAIL) == [
        "line 2: an alias refers to a node that contains it"
    ]


def test_modest_aliases_and_merge_keys_still_work() -> None:
    spec = parse_spec(
        "name: x\ndefaults:\n  retry: &r {max_retries: 1, retry_delay_s: 2}\n"
        "inputs: {shared: &s [1, 2], again: *s}\n" + AGENTS + "nodes:\n"
        "  - {id: a, agent: p, retry: {<<: *r, max_retries: 2}}\n"
        "  - {id: b, agent: p, retry: *r}\n"
    )
    assert spec.node("a").retry == RetrySpec(max_retries=2, retry_delay_s=2.0)
    assert spec.node("b").retry == RetrySpec(max_retries=1, retry_delay_s=2.0)
    assert spec.inputs == {"shared": [1, 2], "again": [1, 2]}


def test_file_size_bound(tmp_path: Path) -> None:
    f = tmp_path / "big.yaml"
    f.write_text("name: x\n" + TAIL + "description: '" + "x" * (1024 * 1024) + "'\n")
    with pytest.raises(SpecError) as e:
        load_spec(f)
    assert e.value.problems == ["file larger than the limit of 1048576 bytes (1 MiB)"]
    with pytest.raises(SpecError) as e:
        parse_spec(f.read_text())
    assert e.value.problems == ["text longer than the limit of 1048576 characters"]


# ------------------------------------------------------------ 3. nesting


def test_deep_nesting_is_refused_while_reading() -> None:
    text = "name: x\n" + TAIL + "inputs: {x: " + "[" * 100_000 + "]" * 100_000 + "}\n"
    assert problems_of(text) == ["line 4: nested more than 64 levels deep"]


def test_deep_nesting_through_alias_chains() -> None:
    chain = "".join(f"  a{i}: &a{i} [{f'*a{i - 1}' if i else 1}]\n" for i in range(100))
    assert problems_of("name: x\ninputs:\n" + chain + TAIL) == [
        "line 66: nested (through aliases) more than 64 levels deep"
    ]


def test_nesting_up_to_the_bound_is_fine() -> None:
    # inputs (2) -> x (3) -> 60 lists -> scalar: 64 levels in all
    spec = parse_spec("name: x\n" + TAIL + "inputs: {x: " + "[" * 60 + "1" + "]" * 60 + "}\n")
    value = spec.inputs["x"]
    for _ in range(60):
        value = value[0]
    assert value == 1
    assert len(execution_hash(spec)) == 64


# ------------------------------------------------------------ 4. encoding


def test_invalid_utf8_names_the_byte(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_bytes(b"name: x\n" + TAIL.encode() + b"description: caf\xe9\n")
    with pytest.raises(SpecError) as e:
        load_spec(f)
    offset = len(b"name: x\n" + TAIL.encode() + b"description: caf")
    assert e.value.problems == [
        f"not valid UTF-8: byte 0xe9 at offset {offset} (line 4, column 17): invalid continuation byte"
    ]


def test_control_character_is_one_line() -> None:
    assert problems_of("name: x\x07\n" + TAIL) == [
        "YAML syntax error at line 1: unacceptable character #x0007 (special characters are not allowed)"
    ]


# ------------------------------------------------------------ 5. duplicate keys


def test_duplicate_top_level_key_names_both_lines() -> None:
    text = "name: x\n" + TAIL + "nodes: [{id: b, agent: p}]\n"
    assert problems_of(text) == ["line 4: duplicate key 'nodes' (first at line 3)"]


def test_duplicate_key_in_a_flow_mapping_names_columns() -> None:
    text = "name: x\nagents: {p: {kind: python, entrypoint: 'm:f', entrypoint: 'm:g'}}\n" + NODES
    assert problems_of(text) == ["line 2, column 47: duplicate key 'entrypoint' (first at line 2, column 28)"]


# ------------------------------------------------------------ 6. strict types


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("priority: true", "nodes[0] (a).priority (line 3): Input should be a valid integer"),
        ("priority: 5.0", "nodes[0] (a).priority (line 3): Input should be a valid integer"),
        ("priority: '5'", "nodes[0] (a).priority (line 3): Input should be a valid integer"),
        ("critical: 1", "nodes[0] (a).critical (line 3): Input should be a valid boolean"),
        ("retry: {jitter: 0}", "nodes[0] (a).retry.jitter (line 3): Input should be a valid boolean"),
        (
            "policy: {timeout_s: '30'}",
            "nodes[0] (a).policy.timeout_s (line 3): Input should be a valid number",
        ),
        (
            "policy: {timeout_s: true}",
            "nodes[0] (a).policy.timeout_s (line 3): Input should be a valid number",
        ),
    ],
)
def test_no_coercion(field: str, expected: str) -> None:
    assert problems_of(f"name: x\n{AGENTS}nodes: [{{id: a, agent: p, {field}}}]\n") == [expected]


def test_integers_for_floats_and_exponents_are_numbers() -> None:
    spec = parse_spec(
        f"name: x\n{AGENTS}nodes: [{{id: a, agent: p, policy: {{timeout_s: 30, max_cost_usd: 1e1}}}}]"
    )
    pol = spec.node("a").policy
    assert pol is not None and pol.timeout_s == 30.0 and pol.max_cost_usd == 10.0


def test_stored_json_round_trips() -> None:
    spec = parse_spec(
        "name: x\ninputs: {n: 1.0, f: 2.5, s: hi, d: 2024-01-02}\n"
        "policy: {timeout_s: 900, max_cost_usd: 2.0}\n"
        "defaults: {retry: {retry_delay_s: 1, backoff: 2.0, jitter: false}}\n"
        "models: {m: {provider: scripted, rate_limit: {rpm: 60}, circuit_breaker: {window_s: 60},"
        " replies: [hi, {content: x, tool_calls: [{name: t, args: {k: 1.5}}]}]}}\n"
        f"{AGENTS}nodes: [{{id: a, agent: p, priority: 9, critical: true}}]\n"
    )
    stored = canonical_json(spec.model_dump(mode="json"))  # as submit writes it (1.0 -> 1)
    back = Spec.from_stored_json(stored)
    assert back.model_dump(mode="json") == spec.model_dump(mode="json") | {
        "inputs": {"n": 1, "f": 2.5, "s": "hi", "d": "2024-01-02"}
    }
    assert execution_hash(back) == execution_hash(spec)
    assert back.policy.timeout_s == 900.0 and isinstance(back.policy.timeout_s, float)


# ------------------------------------------------------------ --input


@pytest.mark.parametrize(
    ("pair", "expected"),
    [
        ("n=.inf", "--input n: number must be finite, not inf"),
        ("n=[1, .nan]", "--input n: number must be finite, not nan (at [1])"),
        ("n={a: 1, a: 2}", "--input n: line 1, column 8: duplicate key 'a' (first at line 1, column 2)"),
        ("n=" + "[" * 100 + "]" * 100, "--input n: line 1: nested more than 64 levels deep"),
        ("n=[&a [1, 2], [*a, *a]]", None),
    ],
)
def test_inputs_from_the_command_line_are_bounded(pair: str, expected: str | None) -> None:
    spec = parse_spec("name: x\n" + TAIL)
    if expected is None:
        assert apply_inputs(spec, parse_input_pairs([pair])).inputs == {"n": [[1, 2], [[1, 2], [1, 2]]]}
        return
    with pytest.raises(SpecError) as e:
        apply_inputs(spec, parse_input_pairs([pair]))
    assert e.value.source == "command line" and e.value.problems == [expected]


def test_input_that_is_not_yaml_stays_text() -> None:
    assert parse_input_pairs(["t=a: b: c"]) == {"t": "a: b: c"}


def test_apply_inputs_checks_python_values_too() -> None:
    spec = parse_spec("name: x\n" + TAIL)
    deep: Any = 1
    for _ in range(200):
        deep = [deep]
    with pytest.raises(SpecError) as e:
        apply_inputs(spec, {"ok": 1, "deep": deep, "blob": b"\x00"})
    assert e.value.problems == [
        "--input deep: nested more than 64 levels deep (at " + "[0]" * 64 + ")",
        "--input blob: bytes values are not allowed (JSON-like data only)",
    ]


# ------------------------------------------------------------ replies_file: the same bounds


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            b"- {content: a, content: b}\n",
            "r.yaml: line 1, column 16: duplicate key 'content' (first at line 1, column 4)",
        ),
        (b"- {tool_calls: [{x: .inf}]}\n", "r.yaml [0].tool_calls[0].x: number must be finite, not inf"),
        (
            b"- caf\xe9\n",
            "r.yaml: not valid UTF-8: byte 0xe9 at offset 5 (line 1, column 6): invalid continuation byte",
        ),
    ],
)
def test_replies_file_is_read_within_the_same_bounds(tmp_path: Path, content: bytes, expected: str) -> None:
    (tmp_path / "r.yaml").write_bytes(content)
    f = tmp_path / "d.yaml"
    f.write_text("name: x\nmodels: {m: {provider: scripted, replies_file: r.yaml}}\n" + TAIL)
    with pytest.raises(SpecError) as e:
        load_spec(f)
    assert e.value.problems == [f"models.m.replies_file: {expected}"]
