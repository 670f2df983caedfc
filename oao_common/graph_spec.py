"""A Python-built task graph as a spec document (``Spec.from_graph``).

A *graph* is any object with ``nodes``: an iterable (or a mapping's values) of objects
with ``id`` (str), ``agent`` (an entrypoint string ``module:attr`` or a Python object),
``task`` (str, a Jinja template like a spec's ``task``), ``dependencies`` (ids) and
optionally ``policy`` (a :class:`~oao_common.policy.PolicySpec` or ``None``).
``oao.runtime.dag.TaskGraph`` is one. Agent objects become ``python`` agents through
``entrypoint_of(obj) -> "module:attr"``; the default, :func:`importable_entrypoint`,
accepts only objects that a worker in another process could import.

A node task with no ``{{`` gets its context appended: the run's ``inputs.task`` (when
given) and each dependency's output, one paragraph each. A task with a template is used
as written.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Iterable
from typing import Any

from .errors import SpecError


class AgentNotImportable(SpecError):
    """An agent object a worker in another process could not import; ``agent`` names it.
    The message is one line."""

    def __init__(self, agent: str, kind: str) -> None:
        self.agent = agent
        super().__init__(
            [
                f"agent {agent!r} ({kind}) is not importable by a worker: with a Redis URL, "
                "agents must be module-level objects of an importable module (module:attr), "
                "not defined in __main__ or a function"
            ],
            "graph",
        )


_NAME_CLEAN = re.compile(r"[^A-Za-z0-9_.\-]")


def importable_entrypoint(obj: Any) -> str | None:
    """``module:attr`` naming ``obj`` for a process that imports it, or ``None``.

    A string is returned as is. A function or class is found by ``__module__`` and
    ``__qualname__``; an instance by a module-level name of its class's module that holds
    this very object. Objects of ``__main__`` (or of no importable module) are never
    importable elsewhere.
    """
    if isinstance(obj, str):
        return obj
    if inspect.isfunction(obj) or inspect.isclass(obj):
        module_name, attr = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
        candidates = [attr] if "<locals>" not in attr else []
    else:
        module_name = getattr(type(obj), "__module__", None)
        mod = _module(module_name)
        candidates = [k for k, v in vars(mod).items() if v is obj] if mod is not None else []
    if not module_name or module_name == "__main__" or not candidates:
        return None
    mod = _module(module_name)
    for attr in candidates:
        target: Any = mod
        for part in attr.split("."):
            target = getattr(target, part, None)
        if target is obj:
            return f"{module_name}:{attr}"
    return None


def _module(name: str | None) -> Any:
    if not name or name == "__main__":
        return None
    try:
        return importlib.import_module(name)
    except Exception:
        return None


def agent_name(obj: Any) -> str:
    """A readable agent name: ``obj.name`` if a string, else the function / class name."""
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not name:
        if isinstance(obj, str):
            name = obj.rpartition(":")[2].rpartition(".")[2]
        else:
            name = getattr(obj, "__name__", None) or type(obj).__name__
    return _NAME_CLEAN.sub("_", str(name)) or "agent"


def _strict_entrypoint(obj: Any) -> str:
    ep = importable_entrypoint(obj)
    if ep is None:
        raise AgentNotImportable(agent_name(obj), type(obj).__name__)
    return ep


def _with_context(task: str, deps: list[str], has_goal: bool) -> str:
    if "{{" in task or "{%" in task:
        return task
    parts = [task]
    if has_goal:
        parts.append("Overall task: {{ inputs.task }}")
    parts += [f'From {d}: {{{{ nodes["{d}"].output }}}}' for d in deps]
    return "\n\n".join(p for p in parts if p)


def graph_doc(
    graph: Any,
    name: str = "graph",
    inputs: dict[str, Any] | None = None,
    defaults_policy: dict[str, Any] | None = None,
    entrypoint_of: Callable[[Any], str] | None = None,
) -> dict[str, Any]:
    """The spec document (plain dict) of ``graph``; see the module docstring.

    Raises :class:`SpecError` for an agent ``entrypoint_of`` cannot name (the default
    names the first unimportable agent).
    """
    resolve = entrypoint_of or _strict_entrypoint
    raw = graph.nodes
    items: Iterable[Any] = raw.values() if isinstance(raw, dict) else raw
    agents: dict[str, dict[str, Any]] = {}
    by_entrypoint: dict[str, str] = {}
    nodes: list[dict[str, Any]] = []
    goal = bool(inputs and "task" in inputs)
    for n in items:
        ep = resolve(n.agent)
        key = by_entrypoint.get(ep)
        if key is None:
            base = key = agent_name(n.agent)
            i = 2
            while key in agents:
                key, i = f"{base}_{i}", i + 1
            agents[key] = {"kind": "python", "entrypoint": ep}
            by_entrypoint[ep] = key
        deps = sorted(getattr(n, "dependencies", None) or ())
        node: dict[str, Any] = {
            "id": n.id,
            "agent": key,
            "task": _with_context(str(n.task), deps, goal),
            "depends_on": deps,
        }
        policy = getattr(n, "policy", None)
        if policy is not None:
            node["policy"] = policy.model_dump(exclude_none=True)
        nodes.append(node)
    doc: dict[str, Any] = {"name": name, "agents": agents, "nodes": nodes, "inputs": dict(inputs or {})}
    if defaults_policy:
        doc["defaults"] = {"policy": defaults_policy}
    return doc
