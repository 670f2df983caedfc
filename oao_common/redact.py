"""Redaction of secrets from everything OAO writes where people or tools read it: log
records (structlog and the standard library's), error messages stored on nodes and in
events, span attributes, events and statuses.

What is redacted, wherever it appears in a string:

- every secret value registered with :func:`register_secret` (the API keys providers
  read from the environment, passwords of the Redis URL) — literally, so a key is
  caught in any message that quotes it;
- credentials in URLs: ``scheme://user:password@host`` → ``scheme://user:***@host``;
  ``password``, ``sentinel_password``, ``api_key``, ``apikey``, ``access_token``,
  ``token``, ``key`` and ``secret`` query parameters;
- ``Authorization`` / ``Proxy-Authorization`` header values and ``Bearer`` / ``Basic``
  credentials;
- strings shaped like provider API keys (``sk-…``, ``sk-proj-…``, ``sk-ant-…``).

In mappings (log fields, headers, attribute sets) the value of a key that names a
secret (``password``, ``secret``, ``authorization``, ``api_key``, ``x-api-key``,
``cookie``, ``*_token`` …) is replaced whole by ``***``.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from typing import Any

MASK = "***"
_MIN_SECRET = 4

_lock = threading.Lock()
_secrets: frozenset[str] = frozenset()
_secret_re: re.Pattern[str] | None = None

_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    # user:password@ in URLs (any scheme)
    (re.compile(r"(?P<p>[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*:)[^\s@/]+@"), r"\g<p>***@"),
    # secret query parameters
    (
        re.compile(
            r"(?i)(?P<p>[?&](?:password|sentinel_password|api[_-]?key|access_token|token|key|secret)=)[^&#\s]*"
        ),
        r"\g<p>***",
    ),
    # header values
    (
        re.compile(
            r"(?i)(?P<p>\b(?:proxy-)?authorization\b[\"']?\s*[:=]\s*[\"']?)[^\"'\s,}]+(?:\s+[^\"'\s,}]+)?"
        ),
        r"\g<p>***",
    ),
    (re.compile(r"(?i)(?P<p>\b(?:bearer|basic)\s+)[A-Za-z0-9._~+/=-]{8,}"), r"\g<p>***"),
    # provider API keys
    (re.compile(r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{16,}"), "sk-***"),
]

_SECRET_KEY = re.compile(
    r"(?i)^(?:.*[_-])?(?:password|passwd|secret|authorization|api[_-]?key|apikey|cookie|set-cookie|"
    r"credentials?|token|access[_-]?token|refresh[_-]?token|private[_-]?key)$"
)


def register_secret(value: str | None) -> None:
    """Redact ``value`` literally from now on (values under 4 characters are ignored:
    they would mask ordinary text)."""
    global _secrets, _secret_re
    if not value or len(value) < _MIN_SECRET:
        return
    with _lock:
        if value in _secrets:
            return
        _secrets = _secrets | {value}
        alts = sorted(_secrets, key=len, reverse=True)
        _secret_re = re.compile("|".join(re.escape(s) for s in alts))


def is_secret_key(key: str) -> bool:
    """Does the mapping key ``key`` name a secret (``password``, ``x-api-key``,
    ``refresh_token``…)? ``max_tokens`` and ``tokens_in`` do not."""
    return bool(_SECRET_KEY.match(key))


def redact_text(text: str) -> str:
    """``text`` with every secret it holds replaced by ``***``."""
    if _secret_re is not None:
        text = _secret_re.sub(MASK, text)
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


def redact(value: Any, depth: int = 0) -> Any:
    """``value`` with secrets redacted: strings by :func:`redact_text`, mappings by key
    and value, lists and tuples item by item (8 levels deep); other values unchanged."""
    if isinstance(value, str):
        return redact_text(value)
    if depth > 8:
        return value
    if isinstance(value, Mapping):
        return {
            k: (MASK if isinstance(k, str) and is_secret_key(k) and v else redact(v, depth + 1))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(redact(v, depth + 1) for v in value)
    return value
