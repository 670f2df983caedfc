"""Tokenizer-accurate input token counts for OpenAI models, offline only.

``tiktoken`` knows which encoding an OpenAI model uses (``o200k_base`` for gpt-4o,
gpt-4.1, o-series; ``cl100k_base`` for gpt-4 and gpt-3.5), but its encoding files are
not in the wheel: ``tiktoken.get_encoding`` downloads them on first use and caches them
in ``TIKTOKEN_CACHE_DIR`` (default ``<tmp>/data-gym-cache``). A worker must not reach
the internet from its event loop for a budget estimate, so OAO uses an encoding only
when its file is already in that cache with the right sha256 (pre-fetch it when you
build the worker image: ``python -c "import tiktoken; tiktoken.get_encoding('o200k_base')"``
with ``TIKTOKEN_CACHE_DIR`` set). Otherwise, and for models tiktoken does not know
(local servers' models), the estimate of :func:`~oao_worker.providers.base.estimate_message_tokens`
stays (characters / 4).

Counting follows OpenAI's recipe for chat messages (3 tokens of framing per message, 1
for a ``name``, 3 to prime the reply); tool definitions are counted as their JSON text,
an approximation of how the API renders them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

ENCODING_FILES: dict[str, tuple[str, str]] = {
    "o200k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
    "cl100k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
}
"""Encoding name → (the URL tiktoken downloads it from, the file's sha256), as in
``tiktoken_ext/openai_public.py``; the URL names the cache entry (sha1 of the URL)."""

_encodings: dict[str, Any] = {}  # encoding name -> tiktoken.Encoding, or None: unavailable


def cache_path(encoding: str) -> Path | None:
    """Where tiktoken caches ``encoding``'s file (``None``: unknown encoding, or caching
    disabled with an empty ``TIKTOKEN_CACHE_DIR``)."""
    entry = ENCODING_FILES.get(encoding)
    if entry is None:
        return None
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR"))
    if cache_dir is None:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if cache_dir == "":
        return None
    return Path(cache_dir) / hashlib.sha1(entry[0].encode()).hexdigest()


def encoding_name(model: str) -> str | None:
    """The tiktoken encoding of OpenAI model ``model``, else ``None`` (no I/O)."""
    try:
        import tiktoken
    except ImportError:  # pragma: no cover - a declared dependency
        return None
    try:
        return tiktoken.encoding_name_for_model(model)
    except KeyError:
        return None


def load_offline(encoding: str) -> Any:
    """The ``tiktoken.Encoding`` for ``encoding`` if its file is in the local cache with
    the expected sha256, else ``None``. Never downloads. Blocking (reads and parses a
    few MB): call it off the event loop."""
    path = cache_path(encoding)
    if path is None or not path.is_file():
        return None
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != ENCODING_FILES[encoding][1]:
        return None  # tiktoken would delete it and download again: not here
    import tiktoken

    return tiktoken.get_encoding(encoding)  # served from the verified cache entry


async def encoding_for(model: str) -> Any:
    """The cached ``tiktoken.Encoding`` of ``model`` (loaded once per process, in a
    thread), or ``None`` when there is none offline."""
    name = encoding_name(model)
    if name is None:
        return None
    if name not in _encodings:
        try:
            enc = await asyncio.to_thread(load_offline, name)
        except Exception:  # a broken cache entry: fall back to the estimate
            enc = None
        _encodings[name] = enc
    return _encodings[name]


def reset() -> None:
    """Forget loaded encodings (tests change ``TIKTOKEN_CACHE_DIR``)."""
    _encodings.clear()


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: count their text
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def count_chat_tokens(enc: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> int:
    """Input tokens of a chat request under encoding ``enc`` (see the module doc)."""
    n = 3  # every reply is primed with <|start|>assistant<|message|>
    for m in messages:
        n += 3
        n += len(enc.encode(str(m.get("role") or ""), disallowed_special=()))
        n += len(enc.encode(_text_of(m.get("content")), disallowed_special=()))
        if m.get("name"):
            n += 1 + len(enc.encode(str(m["name"]), disallowed_special=()))
        for tc in m.get("tool_calls") or []:
            fn = tc.get("function") or {}
            text = f"{fn.get('name', '')}{fn.get('arguments', '')}"
            n += 3 + len(enc.encode(text, disallowed_special=()))
    if tools:
        n += len(enc.encode(json.dumps(tools, sort_keys=True), disallowed_special=()))
    return n
