"""Sandboxed, bounded Jinja rendering of task templates and scripted replies.

Undefined names raise (``StrictUndefined``), so a typo in a template fails the node
with a message instead of silently rendering an empty string. A template is code from
whoever submitted the spec, so rendering is bounded as well as sandboxed:

* **time**: :data:`RENDER_TIMEOUT_S` per render. A trace function checks the clock
  every few hundred lines executed by the template's own code (loops included),
  and the sandbox's call hook at every call, so
  ``{% for i in range(100000) %}{% for j in range(100000) %}...`` stops after the
  bound instead of running for hours;
* **size**: the output (checked while it streams) and any string or list a template
  builds with ``*`` or ``+`` are limited to :data:`RENDER_MAX_CHARS`; ``**`` to
  exponents that stay small;
* **loop**: :func:`render_off_loop` renders templates with statements (``{%``) in a
  thread, so even the bounded worst case never stalls the worker's event loop.

Every failure (syntax, undefined name, ``1/0``, a bound) is a :class:`PermanentError`
naming the place: a template does not get better by retrying.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from functools import lru_cache
from types import FrameType
from typing import Any

from jinja2 import StrictUndefined, Template
from jinja2.sandbox import SandboxedEnvironment

from .errors import PermanentError

RENDER_TIMEOUT_S = 2.0
RENDER_MAX_CHARS = 1_000_000
_MAX_EXPONENT = 4096
_LINES_PER_CHECK = 256

_state = threading.local()


class _Bound(Exception):
    """A render bound was crossed (raised inside the template)."""


def _check_clock() -> None:
    deadline = getattr(_state, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise _Bound(f"rendering took longer than {RENDER_TIMEOUT_S:g} s")


def _size(v: Any) -> int:
    return len(v) if isinstance(v, str | bytes | list | tuple) else 0


class _BoundedSandbox(SandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+"})

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _check_clock()
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_clock()
        if operator == "*":
            n = right if isinstance(right, int) else left if isinstance(left, int) else 1
            if max(_size(left), _size(right)) * max(1, int(n)) > RENDER_MAX_CHARS:
                raise _Bound(f"a value would exceed {RENDER_MAX_CHARS} items")
        elif operator == "+" and _size(left) + _size(right) > RENDER_MAX_CHARS:
            raise _Bound(f"a value would exceed {RENDER_MAX_CHARS} items")
        elif operator == "**" and isinstance(right, int | float) and abs(right) > _MAX_EXPONENT:
            raise _Bound(f"exponent {right} is over {_MAX_EXPONENT}")
        return super().call_binop(context, operator, left, right)


def _finalize(value: Any) -> Any:
    """A dict or list printed by ``{{ ... }}`` renders as compact JSON, never as a Python
    repr (so an agent's structured output reads the same in every language)."""
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, default=str)
    return value


_env = _BoundedSandbox(
    undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True, finalize=_finalize
)


@lru_cache(maxsize=512)
def _compile(source: str) -> Template:
    return _env.from_string(source)


def _tracer(frame: FrameType, event: str, _arg: Any) -> Any:
    # Only frames of template code are traced line by line; Jinja's own runtime and
    # everything it calls run at full speed.
    if event == "call" and frame.f_code.co_filename == "<template>":
        return _template_lines
    return None


def _template_lines(_frame: FrameType, event: str, _arg: Any) -> Any:
    if event == "line":
        _state.lines = getattr(_state, "lines", 0) + 1
        if _state.lines % _LINES_PER_CHECK == 0:
            _check_clock()
    return _template_lines


def render(source: str, variables: dict[str, Any], where: str) -> str:
    """Render ``source`` with ``variables`` within the bounds of the module docstring.

    Runs on the calling thread; use :func:`render_off_loop` from a coroutine. Raises
    :class:`PermanentError` naming ``where`` for any failure.
    """
    if "{" not in source:
        return source
    _state.deadline = time.monotonic() + RENDER_TIMEOUT_S
    _state.lines = 0
    traced = "{%" in source
    previous = sys.gettrace()
    if traced:
        sys.settrace(_tracer)
    try:
        out: list[str] = []
        size = 0
        for chunk in _compile(source).generate(**variables):
            size += len(chunk)
            if size > RENDER_MAX_CHARS:
                raise _Bound(f"the output would exceed {RENDER_MAX_CHARS} characters")
            out.append(chunk)
            _check_clock()
        return "".join(out)
    except _Bound as e:
        raise PermanentError(f"template in {where} stopped: {e}") from None
    except RecursionError:
        raise PermanentError(f"template error in {where}: recursion too deep") from None
    except Exception as e:
        raise PermanentError(f"template error in {where}: {type(e).__name__}: {e}") from None
    finally:
        if traced:
            sys.settrace(previous)
        _state.deadline = None


async def render_off_loop(
    source: str,
    variables: dict[str, Any],
    where: str,
    run_in_thread: Callable[..., Awaitable[str]],
) -> str:
    """:func:`render` for coroutines: templates with statements render through
    ``run_in_thread(render, source, variables, where)`` (e.g. the worker's executor);
    plain expressions render inline (they cannot loop)."""
    if "{%" not in source:
        return render(source, variables, where)
    return await run_in_thread(render, source, variables, where)


def render_value(value: Any, variables: dict[str, Any], where: str) -> Any:
    """Render every string inside ``value`` (dicts and lists are walked)."""
    if isinstance(value, str):
        return render(value, variables, where)
    if isinstance(value, dict):
        return {k: render_value(v, variables, where) for k, v in value.items()}
    if isinstance(value, list):
        return [render_value(v, variables, where) for v in value]
    return value
