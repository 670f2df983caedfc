"""How a run's spec is stored: once per workflow, not once per run.

``submit`` stores the canonical JSON of the spec *without* its ``inputs`` in one key per
spec hash (``Keys.spec``, a hash with ``json`` and a reference count ``refs``); the run
hash keeps only ``spec_hash`` and its own ``inputs``. Runs of one workflow with different
inputs therefore share one stored spec. ``prune.lua`` drops a run's reference and deletes
the key when no run uses it (docs/guarantees.md, "Retention").

Readers get the spec *with* the run's inputs back, as before (:func:`join_spec`), so the
worker's runtime cache and the escalator parse it unchanged.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from .hashing import canonical_json

if TYPE_CHECKING:
    from .spec import Spec


def split_spec(spec: Spec) -> tuple[str, str, str]:
    """``(spec_hash, spec_json, inputs_json)`` of ``spec``.

    ``spec_json`` is the canonical JSON of the whole normalized spec except the top-level
    ``inputs`` key; ``spec_hash`` is its hex sha256 (64 characters), so two specs that
    differ only in inputs have the same hash; ``inputs_json`` is the canonical JSON of
    the inputs.
    """
    return split_doc(spec.model_dump(mode="json"))


def split_doc(doc: dict[str, Any]) -> tuple[str, str, str]:
    """:func:`split_spec` of a spec already dumped (``Spec.model_dump(mode="json")``);
    ``doc`` is not modified."""
    rest = {k: v for k, v in doc.items() if k != "inputs"}
    body = canonical_json(rest)
    return hashlib.sha256(body.encode()).hexdigest(), body, canonical_json(doc.get("inputs") or {})


def join_spec(spec_json: str, inputs_json: str | None) -> str:
    """The spec JSON with the run's inputs put back as its ``inputs`` key.

    ``spec_json`` must be a JSON object without a top-level ``inputs`` key (as written by
    :func:`split_spec`); ``inputs_json`` a JSON object, ``None`` meaning ``{}``. Cheap: a
    string splice, no parsing. Raises ``ValueError`` if ``spec_json`` is not an object.
    """
    body = spec_json.lstrip()
    if not body.startswith("{"):
        raise ValueError("stored spec is not a JSON object")
    rest = body[1:].lstrip()
    sep = "" if rest.startswith("}") else ","
    return '{"inputs":' + (inputs_json or "{}") + sep + rest


class SpecTextCache:
    """A small LRU of stored spec texts by spec hash (``size`` entries).

    Safe to share across connections and prefixes: a spec hash names its content.
    """

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._items: OrderedDict[str, str] = OrderedDict()

    def get(self, spec_hash: str) -> str | None:
        text = self._items.get(spec_hash)
        if text is not None:
            self._items.move_to_end(spec_hash)
        return text

    def put(self, spec_hash: str, text: str) -> None:
        self._items[spec_hash] = text
        self._items.move_to_end(spec_hash)
        while len(self._items) > self.size:
            self._items.popitem(last=False)


SPEC_TEXTS = SpecTextCache()
