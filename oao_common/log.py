"""Structured logging with structlog: JSON lines when stderr is not a terminal, pretty
on one (``OAO_LOG_FORMAT=json|console`` overrides).

Fields: every record has ``event``, ``level``, ``timestamp`` (ISO 8601, UTC); a record
written while a node attempt runs also has ``run_id``, ``node_id``, ``attempt`` and
``worker_id`` (bound in the attempt's task with :func:`bind_node`, so whatever code
the attempt calls logs them too); when tracing is on (``oao_common/tracing.py``),
``trace_id`` and ``span_id`` of the current span (W3C hex, as the OpenTelemetry log
data model names them), so a log line leads to its span.

Secrets never reach a log: every value goes through :func:`oao_common.redact.redact`
(API keys, URL passwords, ``Authorization`` headers, fields named like secrets), and the
standard library's records (uvicorn, httpx, openai) are redacted as they are made.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog

from . import tracing
from .redact import redact, redact_text


def _add_trace_ids(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    if tracing.ENABLED:
        ids = tracing.current_ids()
        if ids is not None:
            event.setdefault("trace_id", ids[0])
            event.setdefault("span_id", ids[1])
    return event


def _redact_event(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = redact(event)
    return out


_base_factory = logging.getLogRecordFactory()


def _redacting_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
    """Standard-library records with their message redacted (formatted once here)."""
    record = _base_factory(*args, **kwargs)
    try:
        msg = record.getMessage()
    except Exception:  # a bad format string: leave it to logging's own error report
        return record
    record.msg, record.args = redact_text(msg), None
    return record


def configure_logging(level: str | None = None, json_logs: bool | None = None) -> None:
    """Configure structlog once per process.

    ``json_logs`` defaults to ``OAO_LOG_FORMAT=json`` or "stderr is not a terminal";
    ``level`` to ``OAO_LOG_LEVEL`` or ``info``. Logs go to stderr, so stdout stays
    clean for ``--json`` output.
    """
    level_name = (level or os.environ.get("OAO_LOG_LEVEL") or "info").upper()
    if json_logs is None:
        fmt = os.environ.get("OAO_LOG_FORMAT")
        json_logs = fmt == "json" if fmt else not sys.stderr.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_logs
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=processors(renderer),
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level_name, logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.setLogRecordFactory(_redacting_factory)


def processors(renderer: Any) -> list[Any]:
    """The processor chain ending in ``renderer`` (also used by the tests)."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_trace_ids,
        structlog.processors.format_exc_info,
        _redact_event,
        renderer,
    ]


@contextmanager
def bind_node(run_id: str, node_id: str, attempt: int, worker_id: str) -> Iterator[None]:
    """Bind the attempt's identity to every record logged in this task (and the tasks it
    starts) until the block ends."""
    with structlog.contextvars.bound_contextvars(
        run_id=run_id, node_id=node_id, attempt=attempt, worker_id=worker_id
    ):
        yield


def get_logger(**bound: Any) -> Any:
    """A structlog logger with ``bound`` key/values."""
    return structlog.get_logger("oao").bind(**bound)
