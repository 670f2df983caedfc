"""Spec validation: every bad input gives one clear problem naming the place."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from oao_common.errors import SpecError
from oao_common.spec import find_cycle, load_spec, parse_input_pairs, parse_spec

BASE = """
name: t
models:
  m: {provider: scripted, replies: ["hi"]}
agents:
  a: {kind: llm, model: m, tools: [t1]}
  p: {kind: python, entrypoint: "mod:fn"}
tools:
  t1: {entrypoint: "mod:tool"}
nodes:
%s
"""


def problems(nodes: str, base: str = BASE) -> list[str]:
    with pytest.raises(SpecError) as e:
        parse_spec(base % textwrap.indent(textwrap.dedent(nodes), "  "), "dag.yaml")
    return e.value.problems


def test_valid_spec_parses_and_merges_policy() -> None:
    spec = parse_spec(
        BASE % "  - {id: a, agent: a, policy: {max_tokens: 10}}\n  - {id: b, agent: p, depends_on: [a]}"
    )
    node = spec.node("a")
    pol = spec.effective_policy(node)
    assert pol.max_tokens == 10 and pol.max_steps == 50  # node override + built-in default
    assert spec.dependents() == {"a": ["b"], "b": []}
    assert spec.effective_retry(node).max_retries == 3


def test_yaml_syntax_error_gives_line() -> None:
    with pytest.raises(SpecError) as e:
        parse_spec("name: x\nnodes: [\n  {id: a\n", "dag.yaml")
    assert len(e.value.problems) == 1
    assert "YAML syntax error at line" in e.value.problems[0]


def test_duplicate_node_ids() -> None:
    p = problems("- {id: a, agent: p}\n- {id: a, agent: p}")
    assert p == ["nodes[1] (a).id: duplicate node id 'a' (first at nodes[0])"]


def test_unknown_agent_model_tool() -> None:
    base = BASE.replace("model: m, tools: [t1]", "model: nope, tools: [t9]")
    p = problems("- {id: a, agent: ghost}", base)
    assert "agents.a.model: unknown model 'nope' (known: m)" in p
    assert "agents.a.tools: unknown tool 't9' (known: t1)" in p
    assert "nodes[0] (a).agent: unknown agent 'ghost' (known: a, p)" in p


def test_missing_dependency() -> None:
    assert problems("- {id: a, agent: p, depends_on: [zz]}") == ["nodes[0] (a).depends_on: unknown node 'zz'"]


def test_cycle_prints_path() -> None:
    p = problems(
        """
        - {id: a, agent: p, depends_on: [c]}
        - {id: b, agent: p, depends_on: [a]}
        - {id: c, agent: p, depends_on: [b]}
        """
    )
    assert p == ["nodes: dependency cycle a -> c -> b -> a"]


def test_self_dependency() -> None:
    assert "a node cannot depend on itself" in problems("- {id: a, agent: p, depends_on: [a]}")[0]


def test_bad_types_and_unknown_fields_name_node_field_and_line() -> None:
    p = problems("- {id: a, agent: p, priority: high}\n- {id: b, agent: p, colour: red}")
    assert any(x.startswith("nodes[0] (a).priority (line 11):") for x in p), p
    assert "nodes[1] (b).colour (line 12): unknown field" in p


def test_template_must_only_read_dependencies() -> None:
    p = problems("- {id: a, agent: p}\n- {id: b, agent: p, task: '{{ nodes.a.output }}'}")
    assert p == [
        "nodes[1] (b).task: reads nodes.a but 'a' is not in depends_on (its output would not exist yet)"
    ]


def test_template_syntax_error() -> None:
    p = problems("- {id: a, agent: p, task: '{{ oops'}")
    assert p[0].startswith("nodes[0] (a).task: template syntax error")


def test_not_a_mapping_and_empty_nodes() -> None:
    with pytest.raises(SpecError):
        parse_spec("- just a list")
    with pytest.raises(SpecError) as e:
        parse_spec("name: x\nagents: {p: {kind: python, entrypoint: 'm:f'}}\nnodes: []")
    assert e.value.problems[0].startswith("nodes")


def test_unknown_provider_and_kind() -> None:
    base = BASE.replace("provider: scripted", "provider: martian")
    p = problems("- {id: a, agent: p}", base)
    assert any(x.startswith("models.m") for x in p), p


def test_load_spec_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as e:
        load_spec(tmp_path / "nope.yaml")
    assert "cannot read file" in e.value.problems[0]


def test_replies_file_is_inlined(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("- one\n- {content: two}\n")
    (tmp_path / "d.yaml").write_text(
        BASE.replace('replies: ["hi"]', "replies_file: r.yaml") % "  - {id: a, agent: a}"
    )
    spec = load_spec(tmp_path / "d.yaml")
    m = spec.models["m"]
    assert [r if isinstance(r, str) else r.content for r in m.replies] == ["one", "two"]  # type: ignore[union-attr]


def test_examples_validate() -> None:
    for f in Path("examples").glob("*.yaml"):
        load_spec(f)


def test_find_cycle_deep_chain_no_recursion_limit() -> None:
    edges = {f"n{i}": [f"n{i - 1}"] if i else [] for i in range(5000)}
    assert find_cycle(edges) is None
    edges["n0"] = ["n4999"]
    cyc = find_cycle(edges)
    assert cyc is not None and cyc[0] == cyc[-1] and len(cyc) == 5001


def test_input_pairs() -> None:
    assert parse_input_pairs(["topic=AI gov", "n=3", "flag=true"]) == {
        "topic": "AI gov",
        "n": 3,
        "flag": True,
    }
    with pytest.raises(SpecError):
        parse_input_pairs(["novalue"])
