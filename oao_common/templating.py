"""Sandboxed Jinja rendering of task templates and scripted replies.

Undefined names raise (``StrictUndefined``), so a typo in a template fails the node
with a message instead of silently rendering an empty string.
"""

from __future__ import annotations

from typing import Any

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment

from .errors import PermanentError

_env = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)


def render(source: str, variables: dict[str, Any], where: str) -> str:
    """Render ``source`` with ``variables``; raises :class:`PermanentError` naming ``where``."""
    if "{" not in source:
        return source
    try:
        return _env.from_string(source).render(**variables)
    except TemplateError as e:
        raise PermanentError(f"template error in {where}: {e}") from None


def render_value(value: Any, variables: dict[str, Any], where: str) -> Any:
    """Render every string inside ``value`` (dicts and lists are walked)."""
    if isinstance(value, str):
        return render(value, variables, where)
    if isinstance(value, dict):
        return {k: render_value(v, variables, where) for k, v in value.items()}
    if isinstance(value, list):
        return [render_value(v, variables, where) for v in value]
    return value
