"""Hardened YAML reading for specs: bounded bytes, UTF-8, nesting, alias expansion,
no duplicate keys, JSON-like free-form data.

PyYAML's ``safe_load`` refuses arbitrary Python objects but not hostile documents: it
keeps the last of two equal keys, its composer recurses once per nesting level (a few
thousand ``[`` raise ``RecursionError``), and it shares aliased nodes by reference, so a
few hundred bytes of nested aliases ("billion laughs") become a structure of a billion
nodes as soon as anything walks it (pydantic, the execution hash). This module reads a
document in three bounded stages, each failing with one :class:`YamlProblem` line:

1. :func:`decode_spec_bytes` / :func:`read_spec_file`: at most
   :data:`~oao_common.limits.MAX_SPEC_BYTES` of strict UTF-8;
2. :func:`load_yaml` composes the node graph with :class:`SpecLoader`, which stops at
   :data:`~oao_common.limits.MAX_DEPTH` levels while composing, then measures the graph
   as it would be once expanded (nodes, text, depth; shared nodes are measured once, so
   this costs time linear in the file, not in the expansion) and rejects it over the
   bounds, all before anything is constructed; then it constructs the Python data,
   refusing duplicate keys;
3. :func:`plain_data_problem` checks free-form values (``inputs``, agent ``config``,
   scripted tool calls): JSON-like types, string keys, finite bounded numbers.
"""

from __future__ import annotations

import datetime
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .limits import MAX_DEPTH, MAX_NODES, MAX_PLAIN_INT, MAX_SPEC_BYTES, MAX_TEXT_CHARS


class YamlProblem(Exception):
    """A document OAO refuses to load. ``message`` is one line naming the place
    (``line 5: duplicate key 'nodes' (first at line 2)``)."""

    def __init__(self, message: str, syntax: bool = False) -> None:
        self.message = message
        self.syntax = syntax  # a YAML syntax error, as opposed to a bound or a duplicate key
        super().__init__(message)


def _line(mark: yaml.Mark | None) -> str:
    return f"line {mark.line + 1}" if mark is not None else "(unknown line)"


_MERGE_TAG = "tag:yaml.org,2002:merge"


class SpecLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses what a spec must not contain.

    * nesting deeper than :data:`~oao_common.limits.MAX_DEPTH` while composing (so the
      composer's recursion is bounded, whatever the input);
    * a key twice in one mapping (PyYAML keeps the last one silently); keys brought in
      by a merge (``<<: *base``) may still be overridden, as YAML intends;
    * integers too long for Python to convert, impossible dates (``2024-13-45``).

    Each raises :class:`YamlProblem`. Numbers with an exponent (``1e6``, ``2.5E-3``)
    are floats, as in YAML 1.2's core schema; PyYAML's YAML 1.1 rules would read them
    as strings, which the strictly typed numeric fields of a spec reject.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise YamlProblem(f"{_line(mark)}: nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # unhashable: the base class reports it
                    continue
                if first is not key_node:
                    here, there = key_node.start_mark, first.start_mark
                    if here.line == there.line:  # one flow mapping: tell them apart by column
                        at, first_at = (f"{_line(m)}, column {m.column + 1}" for m in (here, there))
                    else:
                        at, first_at = _line(here), _line(there)
                    raise YamlProblem(f"{at}: duplicate key {key_node.value!r} (first at {first_at})")
        return super().construct_mapping(node, deep=deep)

    def _checked_scalar(self, node: yaml.ScalarNode, kind: str, construct: Callable[..., Any]) -> Any:
        try:
            return construct(self, node)
        except (ValueError, OverflowError) as e:
            value = node.value if len(node.value) <= 40 else node.value[:40] + "..."
            raise YamlProblem(f"{_line(node.start_mark)}: invalid {kind} {value!r}: {e}") from None

    def construct_checked_int(self, node: yaml.ScalarNode) -> Any:
        if len(node.value) > sys.get_int_max_str_digits():
            raise YamlProblem(
                f"{_line(node.start_mark)}: integer with more than {sys.get_int_max_str_digits()} digits"
            )
        return self._checked_scalar(node, "integer", yaml.SafeLoader.construct_yaml_int)

    def construct_checked_timestamp(self, node: yaml.ScalarNode) -> Any:
        return self._checked_scalar(node, "date", yaml.SafeLoader.construct_yaml_timestamp)


SpecLoader.add_constructor("tag:yaml.org,2002:int", SpecLoader.construct_checked_int)
SpecLoader.add_constructor("tag:yaml.org,2002:timestamp", SpecLoader.construct_checked_timestamp)
# YAML 1.2 core schema floats with an exponent, which YAML 1.1 leaves as strings; tried
# after PyYAML's own resolvers for the same first character.
SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


@dataclass(frozen=True, slots=True)
class YamlDoc:
    """A loaded document: ``root`` is its node graph (for line numbers; ``None`` for an
    empty document), ``data`` the Python value."""

    root: yaml.Node | None
    data: Any


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def check_expansion(root: yaml.Node) -> None:
    """Reject a node graph that would be too large or too deep once its aliases are
    expanded, or that contains itself (``&a [*a]``). Raises :class:`YamlProblem`.

    Iterative depth-first search over the graph, each node measured once (memoised), so
    the cost is linear in the document's size, never in its expansion.
    """
    size: dict[int, int] = {}  # id(node) -> expanded nodes, for finished nodes
    text: dict[int, int] = {}
    depth: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[yaml.Node, list[yaml.Node], int]] = [(root, _children(root), 0)]
    active.add(id(root))
    while stack:
        node, kids, i = stack[-1]
        if i < len(kids):
            stack[-1] = (node, kids, i + 1)
            kid = kids[i]
            if id(kid) in active:
                raise YamlProblem(f"{_line(kid.start_mark)}: an alias refers to a node that contains it")
            if id(kid) not in size:
                active.add(id(kid))
                stack.append((kid, _children(kid), 0))
            continue
        stack.pop()
        active.discard(id(node))
        nid = id(node)
        size[nid] = 1 + sum(size[id(k)] for k in kids)
        text[nid] = len(node.value) if isinstance(node, yaml.ScalarNode) else sum(text[id(k)] for k in kids)
        depth[nid] = 1 + max((depth[id(k)] for k in kids), default=0)
        where = _line(node.start_mark)
        if size[nid] > MAX_NODES:
            raise YamlProblem(f"{where}: expands (through aliases) to more than {MAX_NODES} YAML nodes")
        if text[nid] > MAX_TEXT_CHARS:
            raise YamlProblem(
                f"{where}: expands (through aliases) to more than {MAX_TEXT_CHARS} characters of text"
            )
        if depth[nid] > MAX_DEPTH:
            raise YamlProblem(f"{where}: nested (through aliases) more than {MAX_DEPTH} levels deep")


def _syntax_problem(e: yaml.YAMLError, text: str) -> str:
    if isinstance(e, yaml.reader.ReaderError):
        line = text.count("\n", 0, e.position) + 1
        ch = e.character if isinstance(e.character, int) else ord(str(e.character)[:1] or "\0")
        return f"YAML syntax error at line {line}: unacceptable character #x{ch:04x} ({e.reason})"
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    problem = getattr(e, "problem", None) or str(e)
    context = getattr(e, "context", None)
    if context:
        problem = f"{problem} ({context})"
    return " ".join(f"YAML syntax error at {where}{problem}".split())


def load_yaml(text: str) -> YamlDoc:
    """Load one YAML document within the bounds of :mod:`oao_common.limits`.

    Raises :class:`YamlProblem` with one line for a syntax error or a document over a
    bound (too many characters, too deep, too large once expanded, a duplicate key).
    """
    if len(text) > MAX_SPEC_BYTES:
        raise YamlProblem(f"text longer than the limit of {MAX_SPEC_BYTES} characters")
    loader: SpecLoader | None = None
    try:
        loader = SpecLoader(text)  # checks every character is printable
        root = loader.get_single_node()
        if root is None:
            return YamlDoc(None, None)
        check_expansion(root)
        return YamlDoc(root, loader.construct_document(root))
    except yaml.YAMLError as e:
        raise YamlProblem(_syntax_problem(e, text), syntax=True) from None
    except RecursionError:  # last resort; the bounds above are meant to prevent it
        raise YamlProblem(f"nested too deeply to read (the limit is {MAX_DEPTH} levels)") from None
    finally:
        if loader is not None:
            loader.dispose()


def decode_spec_bytes(data: bytes) -> str:
    """``data`` as strict UTF-8 text, at most :data:`~oao_common.limits.MAX_SPEC_BYTES`.

    Raises :class:`YamlProblem` naming the byte offset (and line, column) of the first
    byte that is not UTF-8.
    """
    if len(data) > MAX_SPEC_BYTES:
        raise YamlProblem(f"file larger than the limit of {MAX_SPEC_BYTES} bytes (1 MiB)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise YamlProblem(
            f"not valid UTF-8: byte 0x{data[e.start]:02x} at offset {e.start}"
            f" (line {line}, column {column}): {e.reason}"
        ) from None


def read_spec_file(path: Path) -> str:
    """The text of ``path``, read no further than one byte past the size bound.

    Raises ``OSError`` if it cannot be read and :class:`YamlProblem` if it is too large
    or not UTF-8.
    """
    with path.open("rb") as f:
        data = f.read(MAX_SPEC_BYTES + 1)
    return decode_spec_bytes(data)


_PLAIN_SCALARS = (str, bool, type(None), datetime.date)


def plain_data_problem(value: Any) -> str | None:
    """Why ``value`` is not acceptable free-form spec data, or ``None`` if it is.

    Acceptable: what JSON can carry without loss (``None``, booleans, strings, lists,
    mappings with string keys, integers within :data:`~oao_common.limits.MAX_PLAIN_INT`,
    finite floats) plus YAML dates, within :data:`~oao_common.limits.MAX_DEPTH` levels
    and :data:`~oao_common.limits.MAX_NODES` values. Iterative: never recurses.
    The problem names the place inside ``value`` (``at x[2]``).
    """
    count = 0
    stack: list[tuple[Any, str, int]] = [(value, "", 1)]
    while stack:
        v, at, level = stack.pop()
        where = f" (at {at.lstrip('.')})" if at else ""
        count += 1
        if count > MAX_NODES:
            return f"more than {MAX_NODES} values"
        if level > MAX_DEPTH:
            return f"nested more than {MAX_DEPTH} levels deep{where}"
        if isinstance(v, _PLAIN_SCALARS):
            continue
        if isinstance(v, int):
            if abs(v) > MAX_PLAIN_INT:
                return f"integer out of range (|n| <= {MAX_PLAIN_INT}){where}"
        elif isinstance(v, float):
            if not math.isfinite(v):
                return f"number must be finite, not {v}{where}"
        elif isinstance(v, dict):
            for k, item in v.items():
                if not isinstance(k, str):
                    return f"mapping key {k!r} must be a string (quote it){where}"
                stack.append((item, f"{at}.{k}", level + 1))
        elif isinstance(v, (list, tuple)):
            stack.extend((item, f"{at}[{j}]", level + 1) for j, item in enumerate(v))
        else:
            return f"{type(v).__name__} values are not allowed (JSON-like data only){where}"
    return None
