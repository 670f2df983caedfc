"""``TaskGraph`` / ``TaskNode``: a DAG of agents built in Python.

``TaskNode(id, agent, task, dependencies=set())``: ``id`` matches a spec node id
(letters, digits, ``_ . -``), ``agent`` is an object with ``invoke(task)``, a callable,
an ``async def run(ctx)`` or an entrypoint string ``"module:attr"``; ``task`` is a spec
task template (a task without ``{{`` gets the overall task and its dependencies'
outputs appended, see :mod:`oao_common.graph_spec`). ``Spec.from_graph(graph)`` turns a
graph into the same :class:`~oao_common.spec.Spec` a YAML file loads to.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from oao_common.errors import SpecError

from .policy import StrictPolicy


@dataclass
class TaskNode:
    """One node: ``id``, ``agent``, ``task`` (template), ``dependencies`` (node ids),
    optional ``policy`` (this node's own :class:`StrictPolicy`)."""

    id: str
    agent: Any
    task: str = ""
    dependencies: set[str] = field(default_factory=set)
    policy: StrictPolicy | None = None

    def __post_init__(self) -> None:
        self.dependencies = set(self.dependencies or ())

    @property
    def node_id(self) -> str:
        """Alias of ``id``."""
        return self.id


class TaskGraph:
    """An ordered set of :class:`TaskNode` (insertion order). Validation (unknown
    dependencies, cycles) happens when the graph becomes a spec, raising ``SpecError``."""

    def __init__(self, nodes: Iterable[TaskNode] = ()) -> None:
        self.nodes: dict[str, TaskNode] = {}
        for n in nodes:
            self.add_node(n)

    def add_node(self, node: TaskNode) -> TaskNode:
        """Add ``node``; raises :class:`SpecError` if its id is taken."""
        if node.id in self.nodes:
            raise SpecError([f"node {node.id!r} is already in the graph"], "graph")
        self.nodes[node.id] = node
        return node

    def add_edge(self, before: str, after: str) -> None:
        """Make ``after`` depend on ``before``; raises ``KeyError`` for an unknown node."""
        self.nodes[after].dependencies.add(before)

    def sinks(self) -> list[str]:
        """Ids of the nodes nothing depends on, in insertion order."""
        used = {d for n in self.nodes.values() for d in n.dependencies}
        return [k for k in self.nodes if k not in used]

    def __len__(self) -> int:
        return len(self.nodes)


__all__ = ["TaskGraph", "TaskNode"]
