"""Canonical JSON and hashes: the basis of execution hashes, request hashes and
idempotency keys.

Canonical form: JSON with sorted keys, no whitespace, ASCII only, and floats that
are whole numbers written as integers, so ``{"b": 1.0, "a": 2}`` and
``{"a": 2, "b": 1}`` hash alike (in the spirit of RFC 8785, JSON Canonicalization).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def _normalize(value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, dict):
        return {str(k): _normalize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalize(v) for v in value]
    return value


def canonical_json(value: Any) -> str:
    """The canonical JSON text of ``value`` (non-JSON values fall back to ``str``)."""
    return json.dumps(
        _normalize(value), sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str
    )


def sha256_hex(value: Any) -> str:
    """Hex sha256 of the canonical JSON of ``value``."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()
