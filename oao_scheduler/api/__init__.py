"""OAO's HTTP API: FastAPI routes over :class:`~oao_common.broker.Broker` (docs at ``/docs``).

``create_app(broker, tokens)`` builds the application; ``oao-scheduler api`` serves it
on uvicorn. See README.md ("HTTP API") for the endpoints.
"""

from __future__ import annotations

from .app import create_app
from .auth import is_loopback, load_tokens

__all__ = ["create_app", "is_loopback", "load_tokens"]
