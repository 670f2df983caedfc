"""Bearer-token authentication of the HTTP API.

Tokens come from ``OAO_API_TOKENS`` (comma-separated) and/or a file (one a line, ``#``
comments). They are compared in constant time and never logged. Without tokens the
API may only be bound to loopback (see :func:`is_loopback`).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from pathlib import Path
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .errors import APIError

ENV_TOKENS = "OAO_API_TOKENS"

bearer = HTTPBearer(auto_error=False, description="A token of OAO_API_TOKENS or --tokens-file")


def load_tokens(env_value: str | None = None, tokens_file: str | None = None) -> list[str]:
    """The tokens of ``env_value`` (default: ``$OAO_API_TOKENS``) and of ``tokens_file``.

    Raises :class:`OSError` if the file cannot be read.
    """
    raw = os.environ.get(ENV_TOKENS, "") if env_value is None else env_value
    tokens = [t.strip() for t in raw.split(",") if t.strip()]
    if tokens_file:
        for line in Path(tokens_file).read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                tokens.append(line)
    return tokens


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class TokenCheck:
    """A FastAPI dependency: 401 unless the request carries one of ``tokens`` as a bearer
    token. With no tokens it lets everything through (loopback-only deployments)."""

    def __init__(self, tokens: list[str]) -> None:
        self._tokens = [t.encode() for t in tokens]

    def valid(self, token: str) -> bool:
        given = token.encode("utf-8", "surrogateescape")
        ok = False
        for t in self._tokens:  # no early exit: the time does not tell which one matched
            ok |= hmac.compare_digest(given, t)
        return ok

    async def __call__(self, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if not self._tokens:
            return
        if creds is None:
            raise APIError(401, "unauthorized", "a bearer token is required (Authorization: Bearer ...)")
        if not self.valid(creds.credentials):
            raise APIError(401, "unauthorized", "the bearer token is not valid")
