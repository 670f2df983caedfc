"""Structured logging with structlog: JSON lines in production, pretty on a terminal.

Every line a worker writes about a node carries ``run_id``, ``node_id``, ``attempt``
and ``worker_id`` (bound with ``log.bind``). Secrets never reach a log: URLs go
through :func:`oao_common.connection.redact` and API keys are never bound.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog


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
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level_name, logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(**bound: Any) -> Any:
    """A structlog logger with ``bound`` key/values."""
    return structlog.get_logger("oao").bind(**bound)
