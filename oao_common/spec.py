"""The DAG spec (``dag.yaml``): pydantic models, loading and validation.

:func:`load_spec` turns a file into a validated :class:`Spec` or raises
:class:`~oao_common.errors.SpecError` whose ``problems`` each name the place
(``nodes[2] (draft).depends_on``) and, where the YAML has one, the line.
Validation is pure: nothing here touches Redis, so bad input never reaches it
(docs/guarantees.md, guarantee 7). Hostile documents (huge, deeply nested, alias bombs, duplicate
keys, invalid UTF-8) are refused while reading (``oao_common/spec_yaml.py``), and every
number is finite, strictly typed and bounded (``oao_common/limits.py``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from jinja2 import TemplateSyntaxError, nodes
from jinja2.sandbox import SandboxedEnvironment
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .circuit import CircuitBreakerSpec
from .errors import SpecError
from .limits import (
    MAX_DEPTH,
    Attempts,
    DelayS,
    PositiveCount,
    StrictBool,
    StrictInt,
    Temperature,
    TimeoutS,
    Usd,
)
from .policy import (
    DEFAULT_POLICY,
    DEFAULT_RETRY,
    FailureSpec,
    PolicySpec,
    RetrySpec,
    RunPolicySpec,
    merge,
)
from .ratelimit import RateLimitSpec
from .spec_yaml import YamlProblem, load_yaml, plain_data_problem, read_spec_file

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"
ENTRYPOINT_PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$"
PLUGIN_REF_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_\-]*\.[A-Za-z0-9_][A-Za-z0-9_.\-]*$"
"""``<plugin>.<name>``: something a worker plugin provides (docs/plugins.md)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _plain(value: Any) -> Any:
    problem = plain_data_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


PlainData = Annotated[Any, AfterValidator(_plain)]
"""Free-form data (inputs, agent config, tool-call arguments): JSON-like, finite numbers
(:func:`~oao_common.spec_yaml.plain_data_problem`)."""


# --------------------------------------------------------------------------- models


class ScriptedReply(_Strict):
    """One reply of the scripted model: text (a sandboxed Jinja template) and tool calls."""

    content: str = ""
    tool_calls: list[dict[str, PlainData]] = Field(default_factory=list)


def _reply_kind(value: Any) -> str:
    return "<text>" if isinstance(value, str) else "<reply>"


Reply = Annotated[
    Annotated[ScriptedReply, Tag("<reply>")] | Annotated[str, Tag("<text>")], Discriminator(_reply_kind)
]
"""A scripted reply: plain text or a :class:`ScriptedReply` (one error per bad reply)."""


class PricingSpec(_Strict):
    """USD per million tokens, input and output."""

    input_usd_per_mtok: Usd
    output_usd_per_mtok: Usd


class ScriptedModelSpec(_Strict):
    """Deterministic offline model. Replies are used in order per node, the last repeating
    (or cycling with ``cycle: true``). ``by_node`` gives a node its own script."""

    provider: Literal["scripted"]
    replies: list[Reply] = Field(default_factory=list)
    by_node: dict[str, list[Reply]] = Field(default_factory=dict)
    replies_file: str | None = None
    cycle: StrictBool = False
    stream_delay_s: DelayS = Field(default=0.0, description="sleep before each chunk")
    reply_delay_s: DelayS = Field(default=0.0, description="sleep before the reply")
    chunk_tokens: PositiveCount = Field(default=8, description="tokens (4 chars each) per streamed chunk")
    pricing: PricingSpec | None = None
    rate_limit: RateLimitSpec | None = None
    circuit_breaker: CircuitBreakerSpec | None = None
    limit_key: str | None = Field(
        default=None, description="limiter / breaker name shared by several models (e.g. a provider)"
    )


class OpenAIModelSpec(_Strict):
    """Any OpenAI-compatible chat completions endpoint (OpenAI, vLLM, Ollama, LM Studio)."""

    provider: Literal["openai"]
    model: str
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    temperature: Temperature | None = None
    timeout_s: TimeoutS = 60.0
    stream: StrictBool = True
    pricing: PricingSpec | None = None
    rate_limit: RateLimitSpec | None = None
    circuit_breaker: CircuitBreakerSpec | None = None
    limit_key: str | None = Field(
        default=None, description="limiter / breaker name shared by several models (e.g. a provider)"
    )

    @field_validator("api_key_env")
    @classmethod
    def _not_an_oao_setting(cls, name: str) -> str:
        """``OAO_*`` names OAO's own settings (``OAO_REDIS_URL`` holds the Redis password):
        never an API key to send to a model server (docs/security.md)."""
        if name.upper().startswith("OAO_"):
            raise ValueError(
                f"{name!r} is refused: OAO's own settings (OAO_*, e.g. the Redis URL and its "
                "password) are never sent to a model server"
            )
        return name


class PluginModelSpec(_Strict):
    """A model served by a worker plugin's provider (docs/plugins.md): ``use`` names it
    ``<plugin>.<provider>``; ``model`` and ``config`` are the provider's to read. Free
    unless ``pricing`` is given. Workers without that plugin fail the node."""

    provider: Literal["plugin"]
    use: str = Field(pattern=PLUGIN_REF_PATTERN)
    model: str = ""
    config: dict[str, PlainData] = Field(default_factory=dict)
    pricing: PricingSpec | None = None
    rate_limit: RateLimitSpec | None = None
    circuit_breaker: CircuitBreakerSpec | None = None
    limit_key: str | None = Field(
        default=None, description="limiter / breaker name shared by several models (e.g. a provider)"
    )


ModelSpec = Annotated[ScriptedModelSpec | OpenAIModelSpec | PluginModelSpec, Field(discriminator="provider")]


class PythonAgentSpec(_Strict):
    """``entrypoint`` is ``module:attr``: a callable, an object with ``invoke(task)``,
    a class of such objects, or an ``async def run(ctx)``."""

    kind: Literal["python"]
    entrypoint: str = Field(pattern=ENTRYPOINT_PATTERN)
    model: str | None = Field(default=None, description="default model of ctx.llm")
    tools: list[str] = Field(default_factory=list)
    deny_tools: list[str] = Field(default_factory=list)
    config: dict[str, PlainData] = Field(default_factory=dict)


class LLMAgentSpec(_Strict):
    """Built-in tool-calling agent: model, system prompt, allowed tools, max turns."""

    kind: Literal["llm"]
    model: str
    system: str = ""
    tools: list[str] = Field(default_factory=list)
    deny_tools: list[str] = Field(default_factory=list)
    max_turns: PositiveCount = 8
    max_tokens: PositiveCount | None = Field(default=None, description="per model call")
    temperature: Temperature | None = None


class _FrameworkAgentSpec(_Strict):
    """Fields shared by the framework adapters (docs/frameworks.md): ``entrypoint`` names
    a compiled graph / Runnable, or a function returning one (called once per run with
    ``model=`` OAO's chat model and ``tools=`` the spec tools as LangChain tools, if it
    takes them, and ``config`` as keyword arguments). ``tools`` is the allow-list of tool
    names the agent may call (``None``: every tool it was given); ``deny_tools`` are
    refused. ``deps_key`` / ``inputs_key`` name the input keys that receive the
    dependency outputs and the run's inputs."""

    entrypoint: str = Field(pattern=ENTRYPOINT_PATTERN)
    model: str | None = Field(default=None, description="the model of OAO's chat model")
    tools: list[str] | None = None
    deny_tools: list[str] = Field(default_factory=list)
    config: dict[str, PlainData] = Field(default_factory=dict)
    deps_key: str | None = None
    inputs_key: str | None = None


class LangGraphAgentSpec(_FrameworkAgentSpec):
    """A LangGraph graph (``oao_worker/agents/langgraph_agent.py``). ``input_key`` gets
    the task (``messages``: as a user message; default: ``messages``, ``task``, ``input``
    or ``question``, the first the input schema has); ``output_key`` picks the final
    state's key that is the node's output (default: the whole state). ``resume`` answers
    ``interrupt()`` calls in order; an interrupt with no answer left fails the node
    (``on_interrupt: fail``) or ends it with ``{"interrupted": [...], "state": ...}``
    (``output``). ``recursion_limit``: LangGraph's super-step limit."""

    kind: Literal["langgraph"]
    input_key: str | None = None
    output_key: str | None = None
    recursion_limit: PositiveCount = 25
    resume: list[PlainData] = Field(default_factory=list)
    on_interrupt: Literal["fail", "output"] = "fail"


class LangChainAgentSpec(_FrameworkAgentSpec):
    """A LangChain Runnable or agent executor (``oao_worker/agents/langchain_agent.py``),
    invoked with ``{input_key: task}`` (``input_key: null``: the task text itself); a
    result ``{"output": X, ...}`` makes X the node's output."""

    kind: Literal["langchain"]
    input_key: str | None = "input"


class PluginAgentSpec(_Strict):
    """An agent of a kind a worker plugin adds (docs/plugins.md): ``use`` names it
    ``<plugin>.<kind>``; ``entrypoint`` (checked against ``--allow-entrypoints`` like any
    other), ``model`` and ``config`` are the plugin's to read; ``tools`` / ``deny_tools``
    as for ``python`` agents. Workers without that plugin fail the node."""

    kind: Literal["plugin"]
    use: str = Field(pattern=PLUGIN_REF_PATTERN)
    entrypoint: str | None = Field(default=None, pattern=ENTRYPOINT_PATTERN)
    model: str | None = Field(default=None, description="default model of ctx.llm")
    tools: list[str] = Field(default_factory=list)
    deny_tools: list[str] = Field(default_factory=list)
    config: dict[str, PlainData] = Field(default_factory=dict)


class MiddlewareRef(_Strict):
    """A plugin middleware (a policy) this run's nodes go through: ``use`` names it
    ``<plugin>.<name>``, ``config`` its settings (docs/plugins.md). A worker without it
    fails the node rather than run it ungoverned."""

    use: str = Field(pattern=PLUGIN_REF_PATTERN)
    config: dict[str, PlainData] = Field(default_factory=dict)


#: Agent kinds whose ``tools`` / ``deny_tools`` may name the framework's own tools, not
#: only tools of the spec.
FRAMEWORK_KINDS = frozenset({"langgraph", "langchain"})

AgentSpec = Annotated[
    PythonAgentSpec | LLMAgentSpec | LangGraphAgentSpec | LangChainAgentSpec | PluginAgentSpec,
    Field(discriminator="kind"),
]


class ToolSpec(_Strict):
    """A Python function the agents may call: ``entrypoint`` is ``module:function``."""

    entrypoint: str = Field(pattern=ENTRYPOINT_PATTERN)
    description: str = ""
    idempotent: StrictBool = False
    rate_limit: RateLimitSpec | None = None
    circuit_breaker: CircuitBreakerSpec | None = None


class NodeSpec(_Strict):
    id: str = Field(pattern=ID_PATTERN, max_length=128)
    agent: str
    task: str = ""
    depends_on: list[str] = Field(default_factory=list)
    queue: str = Field(default="default", pattern=ID_PATTERN)
    priority: StrictInt = Field(default=5, ge=0, le=10)
    critical: StrictBool | None = None
    policy: PolicySpec | None = None
    retry: RetrySpec | None = None


EndStatus = Literal["FAILED", "PARTIAL", "CANCELLED"]


class EscalationSpec(_Strict):
    """Notify people when a run ends badly: an HTTP POST of the execution report (JSON)
    to ``webhook``, retried with exponential backoff, and an ``ESCALATED`` event."""

    webhook: str = Field(pattern=r"^https?://")
    on: list[EndStatus] = Field(default_factory=lambda: list[EndStatus](["FAILED"]))
    headers: dict[str, str] = Field(default_factory=dict)
    timeout_s: TimeoutS = 10.0
    max_attempts: Attempts = 5


class Defaults(_Strict):
    policy: PolicySpec = Field(default_factory=PolicySpec)
    retry: RetrySpec = Field(default_factory=RetrySpec)


class Spec(_Strict):
    """A whole workflow. ``effective_policy`` / ``effective_retry`` merge the built-in
    defaults, ``defaults`` and the node's own settings, field by field."""

    name: str = Field(min_length=1)
    description: str = ""
    inputs: dict[str, PlainData] = Field(default_factory=dict)
    defaults: Defaults = Field(default_factory=Defaults)
    policy: RunPolicySpec = Field(default_factory=RunPolicySpec)
    failure: FailureSpec = Field(default_factory=FailureSpec)
    escalation: EscalationSpec | None = None
    middleware: list[MiddlewareRef] = Field(default_factory=list)
    models: dict[str, ModelSpec] = Field(default_factory=dict)
    agents: dict[str, AgentSpec] = Field(min_length=1)
    tools: dict[str, ToolSpec] = Field(default_factory=dict)
    nodes: list[NodeSpec] = Field(min_length=1)

    _node_index: dict[str, NodeSpec] | None = PrivateAttr(default=None)
    _policies: dict[str, PolicySpec] = PrivateAttr(default_factory=dict)
    _retries: dict[str, RetrySpec] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _cross_references(self, info: ValidationInfo) -> Spec:
        if isinstance(info.context, dict) and info.context.get("trusted"):
            return self  # read back from Redis: validated in full when it was submitted
        problems = cross_reference_problems(self)
        if problems:
            raise ValueError(_CROSS_MARK + "\n".join(problems))
        return self

    @classmethod
    def from_stored_json(cls, text: str) -> Spec:
        """A spec as stored by ``submit`` (already validated then): fields are checked,
        the cross-reference pass (and its template parsing) is not repeated."""
        return cls.model_validate_json(text, context={"trusted": True})

    @classmethod
    def from_graph(
        cls,
        graph: Any,
        name: str = "graph",
        inputs: dict[str, Any] | None = None,
        defaults_policy: dict[str, Any] | None = None,
        entrypoint_of: Any = None,
    ) -> Spec:
        """The spec of a Python-built graph (``oao.runtime.dag.TaskGraph`` or any object of
        the shape :mod:`oao_common.graph_spec` describes): the same object a YAML spec loads
        to. ``entrypoint_of(agent) -> "module:attr"`` names agent objects (default: they
        must be importable). Raises :class:`SpecError` (unimportable agent, bad graph)."""
        from .graph_spec import graph_doc

        doc = graph_doc(graph, name, inputs, defaults_policy, entrypoint_of)
        return parse_spec(yaml.safe_dump(doc, sort_keys=False), f"graph {name!r}")

    def node(self, nid: str) -> NodeSpec:
        """The node ``nid`` (O(1) after the first call); raises ``KeyError``."""
        if self._node_index is None:
            self._node_index = {n.id: n for n in self.nodes}
        return self._node_index[nid]

    def effective_policy(self, node: NodeSpec) -> PolicySpec:
        """Built-in defaults, then ``defaults.policy``, then the node's own."""
        return _cached_merge(self._policies, node.id, DEFAULT_POLICY, self.defaults.policy, node.policy)

    def effective_retry(self, node: NodeSpec) -> RetrySpec:
        """Built-in defaults, then ``defaults.retry``, then the node's own."""
        return _cached_merge(self._retries, node.id, DEFAULT_RETRY, self.defaults.retry, node.retry)

    def is_critical(self, node: NodeSpec) -> bool:
        """``critical`` if set, else ``priority >= failure.critical_priority``."""
        if node.critical is not None:
            return node.critical
        return node.priority >= self.failure.critical_priority

    def default_model(self, agent: str) -> str | None:
        """The model ``ctx.llm`` uses for ``agent``: its own, else the spec's only model."""
        own = self.agents[agent].model
        if own is not None:
            return own
        return next(iter(self.models)) if len(self.models) == 1 else None

    def dependents(self) -> dict[str, list[str]]:
        """Node id → ids of the nodes that depend on it, in spec order."""
        out: dict[str, list[str]] = {n.id: [] for n in self.nodes}
        for n in self.nodes:
            for d in n.depends_on:
                out[d].append(n.id)
        return out


_CROSS_MARK = "\x00cross\x00"

M = TypeVar("M", bound=BaseModel)


def _cached_merge(cache: dict[str, M], nid: str, builtin: M, spec_default: M, own: M | None) -> M:
    """``merge(builtin, spec_default, own)``, cached per node; nodes without settings of
    their own share one entry (the merge is a pydantic dump and validate: not free)."""
    key = nid if own is not None else ""
    got = cache.get(key)
    if got is None:
        got = cache[key] = merge(builtin, spec_default, own)
    return got


# ------------------------------------------------------------------ cross-references

_jinja = SandboxedEnvironment()


def template_node_refs(source: str) -> set[str]:
    """Node ids a task template reads through ``nodes.<id>`` or ``nodes['<id>']``.

    Raises ``jinja2.TemplateSyntaxError``.
    """
    tree = _jinja.parse(source)
    refs: set[str] = set()
    for g in tree.find_all(nodes.Getattr):
        if isinstance(g.node, nodes.Name) and g.node.name == "nodes":
            refs.add(g.attr)
    for s in tree.find_all(nodes.Getitem):
        if isinstance(s.node, nodes.Name) and s.node.name == "nodes" and isinstance(s.arg, nodes.Const):
            refs.add(str(s.arg.value))
    return refs


def _where(i: int, n: NodeSpec) -> str:
    return f"nodes[{i}] ({n.id})"


def find_cycle(edges: dict[str, list[str]]) -> list[str] | None:
    """A cycle in ``node → depends_on`` edges as a path ``[a, b, c, a]``, or ``None``.

    Iterative three-colour depth-first search (Cormen et al., "Introduction to
    Algorithms", §22.3), so deep chains do not hit Python's recursion limit.
    """
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(edges, white)
    for start in edges:
        if colour[start] != white:
            continue
        stack: list[tuple[str, int]] = [(start, 0)]
        path: list[str] = [start]
        colour[start] = grey
        while stack:
            v, i = stack[-1]
            succ = [w for w in edges[v] if w in edges]
            if i < len(succ):
                stack[-1] = (v, i + 1)
                w = succ[i]
                if colour[w] == grey:
                    return [*path[path.index(w) :], w]
                if colour[w] == white:
                    colour[w] = grey
                    stack.append((w, 0))
                    path.append(w)
            else:
                colour[v] = black
                stack.pop()
                path.pop()
    return None


def cross_reference_problems(spec: Spec) -> list[str]:
    """Every reference error of a structurally valid spec, one line each."""
    problems: list[str] = []
    for aname, agent in spec.agents.items():
        if agent.model is not None and agent.model not in spec.models:
            problems.append(
                f"agents.{aname}.model: unknown model {agent.model!r}"
                f" (known: {', '.join(sorted(spec.models)) or 'none'})"
            )
        for t in [*(agent.tools or []), *agent.deny_tools]:
            if t not in spec.tools and agent.kind not in FRAMEWORK_KINDS:
                problems.append(
                    f"agents.{aname}.tools: unknown tool {t!r}"
                    f" (known: {', '.join(sorted(spec.tools)) or 'none'})"
                )
    seen: dict[str, int] = {}
    for i, n in enumerate(spec.nodes):
        if n.id in seen:
            problems.append(f"{_where(i, n)}.id: duplicate node id {n.id!r} (first at nodes[{seen[n.id]}])")
        else:
            seen[n.id] = i
    for i, n in enumerate(spec.nodes):
        w = _where(i, n)
        if n.agent not in spec.agents:
            problems.append(f"{w}.agent: unknown agent {n.agent!r} (known: {', '.join(sorted(spec.agents))})")
        for d in n.depends_on:
            if d not in seen:
                problems.append(f"{w}.depends_on: unknown node {d!r}")
            elif d == n.id:
                problems.append(f"{w}.depends_on: a node cannot depend on itself")
        if len(set(n.depends_on)) != len(n.depends_on):
            problems.append(f"{w}.depends_on: lists a node twice")
        try:
            refs = template_node_refs(n.task)
        except TemplateSyntaxError as e:
            problems.append(f"{w}.task: template syntax error on line {e.lineno}: {e.message}")
            continue
        for r in sorted(refs - set(n.depends_on)):
            problems.append(
                f"{w}.task: reads nodes.{r} but {r!r} is not in depends_on (its output would not exist yet)"
            )
    for mname, m in spec.models.items():
        if isinstance(m, ScriptedModelSpec):
            for nid in m.by_node:
                if nid not in seen:
                    problems.append(f"models.{mname}.by_node: unknown node {nid!r}")
    if not problems:
        cycle = find_cycle({n.id: list(n.depends_on) for n in spec.nodes})
        if cycle:
            problems.append("nodes: dependency cycle " + " -> ".join(cycle))
    return problems


# ------------------------------------------------------------------ loading


def _line_of(root: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the YAML node at pydantic location ``loc``, as deep as it exists."""
    node = root
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            nxt = node.value[part] if 0 <= part < len(node.value) else None
        else:
            nxt = None
        if nxt is None:
            break
        node = nxt
        line = node.start_mark.line + 1
    return line


def _loc_name(raw: Any, loc: tuple[Any, ...]) -> str:
    """``('nodes', 2, 'depends_on')`` → ``nodes[2] (draft).depends_on``."""
    out = ""
    cur = raw
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            if isinstance(cur, list) and 0 <= part < len(cur):
                cur = cur[part]
                if isinstance(cur, dict) and isinstance(cur.get("id"), str):
                    out += f" ({cur['id']})"
            else:
                cur = None
        else:
            out += f".{part}" if out else str(part)
            cur = cur.get(part) if isinstance(cur, dict) else None
    return out or "(top level)"


_UNION_TAGS = {
    "python",
    "llm",
    "langgraph",
    "langchain",
    "scripted",
    "openai",
    "<reply>",
    "<text>",
    "function-after[_cross_references()]",
}


def _clean_loc(raw: Any, loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """``loc`` without the tags pydantic inserts for union members (``scripted``,
    ``<reply>``), keeping a part that is a real key of the data at that point."""
    out: list[Any] = []
    cur = raw
    for part in loc:
        if isinstance(part, str) and part in _UNION_TAGS and not (isinstance(cur, dict) and part in cur):
            continue
        out.append(part)
        if isinstance(part, int):
            cur = cur[part] if isinstance(cur, list) and 0 <= part < len(cur) else None
        else:
            cur = cur.get(part) if isinstance(cur, dict) else None
    return tuple(out)


def _format_validation(e: ValidationError, raw: Any, root: yaml.Node | None) -> list[str]:
    problems: list[str] = []
    for err in e.errors():
        msg = str(err.get("msg", ""))
        if _CROSS_MARK in msg:
            problems.extend(msg.split(_CROSS_MARK, 1)[1].split("\n"))
            continue
        loc = _clean_loc(raw, tuple(err["loc"]))
        line = _line_of(root, loc)
        at = f" (line {line})" if line else ""
        msg = msg.removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        problems.append(" ".join(f"{_loc_name(raw, loc)}{at}: {msg}".split()))
    return problems


def parse_spec(text: str, source: str = "spec") -> Spec:
    """Parse and validate spec text. Raises :class:`SpecError`, one problem per line,
    for bad YAML, a document over the bounds of :mod:`oao_common.limits` (size,
    nesting, alias expansion), a duplicate key, or a spec that does not validate."""
    try:
        doc = load_yaml(text)
    except YamlProblem as e:
        raise SpecError([e.message], source) from None
    raw = doc.data
    if not isinstance(raw, dict):
        raise SpecError(["the spec must be a YAML mapping with name, agents and nodes"], source)
    try:
        return Spec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(_format_validation(e, raw, doc.root), source) from None
    except RecursionError:  # last resort: load_yaml bounds the nesting well below this
        raise SpecError(
            [f"nested too deeply to validate (the limit is {MAX_DEPTH} levels)"], source
        ) from None


def load_spec(path: str | Path) -> Spec:
    """Read and validate a spec file. Raises :class:`SpecError` for an unreadable file,
    one larger than :data:`~oao_common.limits.MAX_SPEC_BYTES`, one that is not UTF-8
    (naming the byte offset), and everything :func:`parse_spec` refuses."""
    p = Path(path)
    try:
        text = read_spec_file(p)
    except OSError as e:
        raise SpecError([f"cannot read file: {e.strerror or e}"], str(path)) from None
    except YamlProblem as e:
        raise SpecError([e.message], str(path)) from None
    spec = parse_spec(text, source=str(path))
    return _resolve_files(spec, p.parent, str(path))


def _resolve_files(spec: Spec, base: Path, source: str) -> Spec:
    """Inline ``replies_file`` of scripted models (YAML or JSON list of replies), read
    within the same bounds as the spec itself."""
    for mname, m in spec.models.items():
        if isinstance(m, ScriptedModelSpec) and m.replies_file:
            where = f"models.{mname}.replies_file"
            f = (base / m.replies_file).resolve()
            try:
                data = load_yaml(read_spec_file(f)).data
            except OSError as e:
                raise SpecError(
                    [f"{where}: cannot load {m.replies_file}: {e.strerror or e}"], source
                ) from None
            except YamlProblem as e:
                raise SpecError([f"{where}: {m.replies_file}: {e.message}"], source) from None
            if not isinstance(data, list):
                raise SpecError([f"{where}: must hold a list of replies"], source)
            try:
                extra = ScriptedModelSpec.model_validate({"provider": "scripted", "replies": data}).replies
            except ValidationError as e:
                err = e.errors()[0]
                at = _loc_name(data, _clean_loc({"replies": data}, tuple(err["loc"]))[1:])
                msg = str(err["msg"]).removeprefix("Value error, ")
                raise SpecError([f"{where}: {m.replies_file} {at}: {msg}"], source) from None
            m.replies = [*m.replies, *extra]
            m.replies_file = None
    return spec


def apply_inputs(spec: Spec, overrides: dict[str, Any]) -> Spec:
    """A copy of ``spec`` with ``inputs`` updated from ``--input k=v`` pairs.

    The values must be what a spec's ``inputs`` may hold (JSON-like, finite numbers,
    within the nesting bound); raises :class:`SpecError` (source ``command line``)
    with one line per bad value otherwise.
    """
    problems = []
    for k, v in overrides.items():
        problem = "the key must be a string" if not isinstance(k, str) else plain_data_problem(v)
        if problem is not None:
            problems.append(f"--input {k}: {problem}")
    if problems:
        raise SpecError(problems, "command line")
    return spec.model_copy(update={"inputs": {**spec.inputs, **overrides}})


_INPUT_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_input_pairs(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["topic=AI", "n=3"]`` → ``{"topic": "AI", "n": 3}`` (values parsed as YAML scalars).

    Raises :class:`SpecError` for a pair without ``=`` or with a bad key, or a value
    over the bounds of :func:`~oao_common.spec_yaml.load_yaml`. A value that is not
    valid YAML is kept as text.
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        k, sep, v = pair.partition("=")
        if not sep or not _INPUT_KEY.match(k):
            raise SpecError([f"--input {pair!r}: expected key=value"], "command line")
        try:
            out[k] = load_yaml(v).data if v else ""
        except YamlProblem as e:
            if not e.syntax:  # over a bound or a duplicate key: say so
                raise SpecError([f"--input {k}: {e.message}"], "command line") from None
            out[k] = v  # not YAML: the text itself
    return out
