"""Serving the HTTP API on uvicorn (``oao-scheduler api``)."""

from __future__ import annotations

import uvicorn

from oao_common.broker import Broker
from oao_common.connection import DEFAULT_URL, connect
from oao_common.trust import TrustPolicy

from .app import create_app

#: Seconds a request waits to connect to Redis before answering 503.
CONNECT_TIMEOUT_S = 2.0


def serve_api(
    host: str,
    port: int,
    redis_url: str | None,
    prefix: str,
    tokens: list[str],
    trust: TrustPolicy | None = None,
    log_level: str = "info",
) -> None:
    """Serve the API until SIGINT/SIGTERM. The caller checked that ``tokens`` is not
    empty unless ``host`` is loopback. Redis is reached lazily: while it is down the
    API answers 503 (``/healthz`` too)."""
    redis = connect(redis_url or DEFAULT_URL, socket_connect_timeout=CONNECT_TIMEOUT_S)
    app = create_app(Broker(redis, prefix), tokens, trust)
    # uvicorn's access log has the method, path and status, never the Authorization header
    uvicorn.run(app, host=host, port=port, log_level=log_level, lifespan="off")
