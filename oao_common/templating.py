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
  builds (with ``*``, ``+``, ``%``; string methods such as ``ljust``, ``replace``,
  ``translate``, ``join`` or ``format``; list ``append`` / ``extend``; the filters that
  grow their input; ``lipsum()``) are limited to :data:`RENDER_MAX_CHARS`, integers
  (``*``, ``**``) to :data:`RENDER_MAX_INT_BITS`. These are checked *before* the
  operation: each is a single call into C that holds the GIL, which neither the clock
  checks nor the worker's heartbeat thread could interrupt (``{{ (10**4096)**4096 }}``
  would stall the whole worker for 13 s, ``{{ 'x'.ljust(10**10) }}`` exhaust its
  memory), and that a plain ``{{ }}`` template runs on the event loop (below);
* **loop**: :func:`render_off_loop` renders templates with statements (``{%``) in a
  thread, so even the bounded worst case never stalls the worker's event loop.

Every failure (syntax, undefined name, ``1/0``, a bound) is a :class:`PermanentError`
naming the place: a template does not get better by retrying.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import string
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from functools import lru_cache
from types import FrameType
from typing import Any, cast

from jinja2 import StrictUndefined, Template
from jinja2.sandbox import SandboxedEnvironment

from .errors import PermanentError

RENDER_TIMEOUT_S = 2.0
RENDER_MAX_CHARS = 1_000_000
#: Largest integer a template may compute, in bits (~300,000 decimal digits).
RENDER_MAX_INT_BITS = 1_000_000
_MAX_EXPONENT = 4096
#: Most paragraphs ``lipsum()`` may write, and most words in one.
_MAX_LIPSUM = 1000
_LINES_PER_CHECK = 256

_state = threading.local()


class _Bound(Exception):
    """A render bound was crossed (raised inside the template)."""


def _check_clock() -> None:
    deadline = getattr(_state, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise _Bound(f"rendering took longer than {RENDER_TIMEOUT_S:g} s")


def _size(v: Any) -> int:
    return len(v) if isinstance(v, str | bytes | bytearray | list | tuple) else 0


def _limit(n: int, what: str = "a value") -> None:
    """Refuse an operation whose result would hold ``n`` items (characters, elements)."""
    if n > RENDER_MAX_CHARS:
        raise _Bound(f"{what} would exceed {RENDER_MAX_CHARS} items")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _bits(v: Any) -> int:
    return abs(v).bit_length() if _is_int(v) else 0


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_NUMBER = re.compile(r"\d+")


def _check_percent(fmt: Any, values: Any) -> None:
    """``fmt % values``: no width or precision over the bound, written or from ``*``."""
    if not isinstance(fmt, str | bytes):
        return
    text = fmt.decode("latin-1") if isinstance(fmt, bytes) else fmt
    args = values if isinstance(values, tuple) else (values,)
    for m in _PERCENT_SPEC.finditer(text):
        for g in m.groups():
            if g == "*":
                _limit(max([a for a in args if _is_int(a)] or [0]), "a formatted field")
            elif g:
                _limit(int(g), "a formatted field")


def _check_format(fmt: str, args: Any, kwargs: Any) -> None:
    """``fmt.format(...)``: no width or precision over the bound in any field's spec
    (a nested ``{}`` takes its value from the arguments: none may be over it either)."""
    try:
        fields = list(string.Formatter().parse(fmt))
    except ValueError:
        return  # str.format raises the same error itself
    for _, _, spec, _ in fields:
        if not spec:
            continue
        for n in _NUMBER.findall(spec):
            _limit(int(n), "a formatted field")
        if "{" in spec:
            values = [*args, *(kwargs.values() if isinstance(kwargs, dict) else ())]
            _limit(max([v for v in values if _is_int(v)] or [0]), "a formatted field")


def _check_replace(s: Any, old: Any, new: Any, count: Any = -1) -> None:
    if not (isinstance(s, str | bytes) and isinstance(old, type(s)) and isinstance(new, type(s))):
        return
    n = cast(Any, s).count(old) if old else len(s) + 1
    if _is_int(count) and count >= 0:
        n = min(n, count)
    _limit(len(s) + n * max(0, len(new) - len(old)))


def _joined_size(sep: Any, items: list[Any]) -> int:
    return sum(_size(x) if isinstance(x, str | bytes) else len(str(x)) for x in items) + _size(sep) * max(
        0, len(items) - 1
    )


def _bounded_method_args(obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Check a call of a method of a string or list that could build a huge value in
    one C call; returns the positional arguments to call it with (an iterable given to
    ``join`` or ``extend`` is read into a list once, to measure it)."""
    method = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format
    owner, name = getattr(method, "__self__", None), getattr(method, "__name__", "")
    if isinstance(owner, str | bytes | bytearray):
        if name in ("ljust", "rjust", "center", "zfill"):
            width = args[0] if args else kwargs.get("width", 0)
            if _is_int(width):
                _limit(width)
        elif name == "expandtabs":
            tab = args[0] if args else kwargs.get("tabsize", 8)
            if _is_int(tab):
                tabs = owner.count("\t") if isinstance(owner, str) else owner.count(b"\t")
                _limit(len(owner) + tabs * max(0, tab))
        elif name == "replace" and len(args) >= 2:
            _check_replace(owner, args[0], args[1], args[2] if len(args) > 2 else kwargs.get("count", -1))
        elif name == "join" and args:
            items = list(args[0])
            _limit(_joined_size(owner, items))
            return (items, *args[1:])
        elif name == "translate" and args and isinstance(args[0], dict) and isinstance(owner, str):
            longest = max([_size(v) for v in args[0].values()] or [1])
            _limit(len(owner) * max(1, longest))
        elif name in ("format", "format_map") and isinstance(owner, str):
            _check_format(owner, args, args[0] if name == "format_map" and args else kwargs)
    elif isinstance(owner, list):
        if name in ("extend", "__iadd__") and args:
            items = list(args[0])
            _limit(len(owner) + len(items), "a list")
            return (items, *args[1:])
        if name in ("append", "insert"):
            _limit(len(owner) + 1, "a list")
    return args


def _bounded_filter(name: str, f: Callable[..., Any]) -> Callable[..., Any]:
    """Jinja's filter ``name`` with the checks of its arguments that keep what it builds
    within the bounds (filters that only map or shrink their input are left alone)."""
    pass_arg = getattr(f, "jinja_pass_arg", None)  # eval_context / environment first

    @functools.wraps(f)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _check_clock()
        lead, rest = (args[:1], list(args[1:])) if pass_arg is not None else ((), list(args))

        def arg(i: int, key: str, default: Any = None) -> Any:
            return rest[i] if len(rest) > i else kwargs.get(key, default)

        if name == "center" and _is_int(arg(1, "width", 80)):
            _limit(arg(1, "width", 80))
        elif name == "indent":
            s, width = arg(0, "s", ""), arg(1, "width", 4)
            pad = width if _is_int(width) else _size(width)
            _limit(_size(s) + (str(s).count("\n") + 1) * max(0, pad))
        elif name == "replace" and len(rest) >= 3:
            _check_replace(rest[0], rest[1], rest[2], arg(3, "count", None))
        elif name == "join" and rest and arg(2, "attribute") is None:
            rest[0] = list(rest[0])
            _limit(_joined_size(arg(1, "d", ""), rest[0]))
        elif name == "format" and rest:
            _check_percent(rest[0], tuple(rest[1:]) or kwargs)
        elif name == "wordwrap":
            s, width, wrap = arg(0, "s", ""), arg(1, "width", 79), arg(3, "wrapstring", None)
            lines = _size(s) // max(1, width if _is_int(width) else 1) + str(s).count("\n") + 1
            _limit(_size(s) + lines * max(1, _size(wrap)))
        elif name in ("batch", "slice") and _is_int(arg(1, "linecount" if name == "batch" else "slices", 0)):
            _limit(arg(1, "linecount" if name == "batch" else "slices", 0), "a list")
        elif name == "sum" and isinstance(arg(2, "start", 0), list | tuple) and arg(1, "attribute") is None:
            start, items = arg(2, "start", 0), list(rest[0])
            _limit(len(start) + sum(_size(x) for x in items), "a list")
            if all(isinstance(x, type(start)) for x in items):  # linear, not sum()'s quadratic copies
                return type(start)(itertools.chain(start, *items))
            rest[0] = items
        return f(*lead, *rest, **kwargs)

    return bounded


def _bounded_lipsum(f: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(f)
    def lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> Any:
        if not (_is_int(n) and _is_int(max)) or n > _MAX_LIPSUM or max > _MAX_LIPSUM:
            raise _Bound(f"lipsum() takes at most {_MAX_LIPSUM} paragraphs of at most {_MAX_LIPSUM} words")
        return f(n, html, min, max)

    return lipsum


class _BoundedSandbox(SandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _check_clock()
        args = _bounded_method_args(__obj, args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_clock()
        if operator == "*":
            if _is_int(left) and _is_int(right):
                if _bits(left) + _bits(right) > RENDER_MAX_INT_BITS:
                    raise _Bound(f"an integer would exceed {RENDER_MAX_INT_BITS} bits")
            else:
                n = right if _is_int(right) else left if _is_int(left) else 1
                _limit(max(_size(left), _size(right)) * max(1, int(n)))
        elif operator == "+":
            _limit(_size(left) + _size(right))
        elif operator == "**" and isinstance(right, int | float):
            if abs(right) > _MAX_EXPONENT:
                raise _Bound(f"exponent {right} is over {_MAX_EXPONENT}")
            if _is_int(left) and _bits(left) * abs(right) > RENDER_MAX_INT_BITS:
                raise _Bound(f"an integer would exceed {RENDER_MAX_INT_BITS} bits")
        elif operator == "%":
            _check_percent(left, right)
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
for _name in ("center", "indent", "replace", "join", "format", "wordwrap", "batch", "slice", "sum"):
    _env.filters[_name] = _bounded_filter(_name, _env.filters[_name])
_env.globals["lipsum"] = _bounded_lipsum(cast(Callable[..., Any], _env.globals["lipsum"]))


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
