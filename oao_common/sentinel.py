"""Redis Sentinel: find the current primary through Sentinel instead of a fixed address.

Two ways to configure it (docs/guarantees.md, "Failover (Sentinel)"):

* a URL ``redis+sentinel://[user:pass@]host1:26379,host2:26379/<master-name>[/<db>]``
  with optional query parameters ``password``, ``username`` (the Redis servers'
  credentials, like the user info), ``sentinel_password`` and ``sentinel_username``
  (the Sentinels' own ``requirepass`` / ACL user);
* the environment: ``OAO_REDIS_SENTINELS=host:port,host:port`` and
  ``OAO_SENTINEL_MASTER=name`` (optional ``OAO_SENTINEL_PASSWORD``); the ``redis://``
  URL, if one is given, still provides the database and the credentials.
  :func:`resolve_url` turns that into the URL form, so the rest of OAO only ever sees
  one URL.

The client comes from redis-py (``redis.asyncio.sentinel``): each new connection asks
the Sentinels for the primary's address; a connection that gets ``READONLY`` from a
demoted primary is dropped and the error raised as ``ConnectionError`` (retried like
any connection error), and idle connections to an old address are closed once the
Sentinels name a new one. Three small additions, each measured by
``tests/integration/test_sentinel.py``: :class:`BlockingSentinelConnectionPool`
blocks at its limit like ``connect()``'s pool (redis-py's ``SentinelConnectionPool``
raises "Too many connections") and re-asks the Sentinels every second, so a demoted
primary that is still up stops receiving writes within about a second instead of
when Sentinel gets round to reconfiguring it (~10 s); :class:`SentinelConnection`
makes the reconnects inside a command's retries ask the Sentinels too.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import (
    MasterNotFoundError,
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
)
from redis.backoff import NoBackoff

SCHEME = "redis+sentinel"
DEFAULT_SENTINEL_PORT = 26379
ENV_SENTINELS = "OAO_REDIS_SENTINELS"
ENV_MASTER = "OAO_SENTINEL_MASTER"
ENV_SENTINEL_PASSWORD = "OAO_SENTINEL_PASSWORD"
QUERY_KEYS = frozenset({"password", "username", "sentinel_password", "sentinel_username"})
SENTINEL_TIMEOUT_S = 2.0  # connect / reply timeout of one Sentinel query


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    """A parsed ``redis+sentinel://`` URL.

    ``sentinels`` are ``(host, port)`` pairs; ``master`` is the name the Sentinels
    monitor (``sentinel monitor <master> ...``); ``db`` the database number;
    ``username`` / ``password`` authenticate to the Redis servers, ``sentinel_*`` to
    the Sentinels.
    """

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None


def is_sentinel_url(url: str | None) -> bool:
    """True when ``url`` uses the ``redis+sentinel://`` scheme."""
    return bool(url) and str(url).lower().startswith(SCHEME + "://")


def _host_port(item: str, url: str) -> tuple[str, int]:
    item = item.strip()
    if item.startswith("["):  # [::1]:26379
        host, _, rest = item[1:].partition("]")
        port_s = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_s = item.rpartition(":") if ":" in item else (item, "", "")
    if not host:
        raise ValueError(f"empty Sentinel host in {redact_sentinel_url(url)}")
    if not port_s:
        return host, DEFAULT_SENTINEL_PORT
    if not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ValueError(f"bad Sentinel port {port_s!r} in {redact_sentinel_url(url)}")
    return host, int(port_s)


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Parse ``redis+sentinel://[user:pass@]h1:p1,h2:p2/<master>[/<db>][?query]``.

    A host without a port gets 26379. Raises ``ValueError`` (the message never shows a
    password) for another scheme, no host, no master name, a non-numeric db, extra
    path segments or an unknown query parameter.
    """
    if not is_sentinel_url(url):
        raise ValueError(f"not a {SCHEME}:// URL: {redact_sentinel_url(url)}")
    parts = urlsplit(url)
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, sep, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if sep else None
    hosts = [h for h in hostlist.split(",") if h.strip()]
    if not hosts:
        raise ValueError(f"no Sentinel host in {redact_sentinel_url(url)}")
    sentinels = tuple(_host_port(h, url) for h in hosts)
    segments = [unquote(s) for s in parts.path.split("/") if s]
    if not segments:
        raise ValueError(f"no master name in {redact_sentinel_url(url)} (…/<master-name>/<db>)")
    if len(segments) > 2 or (len(segments) == 2 and not segments[1].isdigit()):
        raise ValueError(f"expected /<master-name>/<db> in {redact_sentinel_url(url)}")
    db = int(segments[1]) if len(segments) == 2 else 0
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted(set(query) - QUERY_KEYS)
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {', '.join(unknown)} in {redact_sentinel_url(url)} "
            f"(known: {', '.join(sorted(QUERY_KEYS))})"
        )
    return SentinelTarget(
        sentinels=sentinels,
        master=segments[0],
        db=db,
        username=query.get("username") or username,
        password=query.get("password") or password,
        sentinel_username=query.get("sentinel_username") or None,
        sentinel_password=query.get("sentinel_password") or None,
    )


def sentinel_url(target: SentinelTarget) -> str:
    """The ``redis+sentinel://`` URL of ``target`` (inverse of :func:`parse_sentinel_url`)."""
    userinfo = ""
    if target.username or target.password:
        userinfo = quote(target.username or "", safe="")
        if target.password is not None:
            userinfo += ":" + quote(target.password, safe="")
        userinfo += "@"
    hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in target.sentinels)
    query = "&".join(
        f"{k}={quote(v, safe='')}"
        for k, v in (
            ("sentinel_username", target.sentinel_username),
            ("sentinel_password", target.sentinel_password),
        )
        if v
    )
    return f"{SCHEME}://{userinfo}{hosts}/{quote(target.master, safe='')}/{target.db}" + (
        f"?{query}" if query else ""
    )


def resolve_url(url: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """Apply the environment form: with ``OAO_REDIS_SENTINELS`` set, return the
    ``redis+sentinel://`` URL it describes, taking db / user / password from ``url``
    (a ``redis://`` URL, may be None). Otherwise return ``url`` unchanged.

    A ``redis+sentinel://`` ``url`` is returned as is (it already names its Sentinels).
    Raises ``ValueError`` when ``OAO_SENTINEL_MASTER`` is missing or a host is malformed.
    """
    env = os.environ if environ is None else environ
    hosts = (env.get(ENV_SENTINELS) or "").strip()
    if not hosts or is_sentinel_url(url):
        return url
    master = (env.get(ENV_MASTER) or "").strip()
    if not master:
        raise ValueError(f"{ENV_SENTINELS} is set but {ENV_MASTER} (the monitored master's name) is not")
    db, username, password = 0, None, None
    if url:
        parts = urlsplit(url)
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password is not None else None
        path = parts.path.strip("/")
        query = dict(parse_qsl(parts.query))
        if path.isdigit():
            db = int(path)
        elif query.get("db", "").isdigit():
            db = int(query["db"])
        password = query.get("password") or password
        username = query.get("username") or username
    fake = f"{SCHEME}://{hosts}/{quote(master, safe='')}"
    target = parse_sentinel_url(fake)
    return sentinel_url(
        SentinelTarget(
            sentinels=target.sentinels,
            master=master,
            db=db,
            username=username,
            password=password,
            sentinel_password=env.get(ENV_SENTINEL_PASSWORD) or None,
        )
    )


def redact_sentinel_url(url: str) -> str:
    """The URL with every password (user info, ``password=``, ``sentinel_password=``)
    replaced by ``***``; hosts, master name and db stay readable."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, tail = rest.partition("/")
    if "@" in netloc:
        creds, _, hosts = netloc.rpartition("@")
        user = creds.split(":", 1)[0]
        netloc = f"{user}:***@{hosts}"
    if "?" in tail:
        path, _, query = tail.partition("?")
        pairs = []
        for pair in query.split("&"):
            k, eq, _v = pair.partition("=")
            pairs.append(f"{k}=***" if eq and "password" in k.lower() else pair)
        tail = path + "?" + "&".join(pairs)
    return f"{scheme}://{netloc}{slash}{tail}"


class SentinelConnection(SentinelManagedConnection):
    """redis-py's Sentinel-managed connection, except that *every* reconnect asks the
    Sentinels for the primary first.

    redis-py only does so in ``connect()``; a connection dropped while a command is
    retried (``READONLY`` from a demoted primary, a reset) is reconnected by
    ``send_packed_command`` through ``connect_check_health`` to its last address, so
    all the retries of that command go to the old primary (redis/redis-py#3874, open).
    """

    _resolved = False  # True while connect_to() connects to a freshly looked-up address

    async def connect_to(self, address: Any) -> None:
        self._resolved = True
        try:
            await super().connect_to(address)
        finally:
            self._resolved = False

    async def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        """Connect (if not connected) to the primary the Sentinels name now."""
        if not self.is_connected and not self._resolved and self.connection_pool.is_master:
            self.host, self.port = await self.connection_pool.get_master_address()
        await super().connect_check_health(
            check_health=check_health, retry_socket_connect=retry_socket_connect
        )


class BlockingSentinelConnectionPool(SentinelConnectionPool, BlockingConnectionPool):
    """redis-py's Sentinel pool with ``BlockingConnectionPool``'s waiting: at
    ``max_connections`` a command waits (up to ``timeout`` seconds, None = forever)
    for a free connection instead of raising.

    It also leaves a demoted primary sooner. redis-py asks the Sentinels for the
    primary only when it opens a connection, so after a failover that left the old
    primary running (``SENTINEL FAILOVER``, a healed partition) pooled connections
    keep writing to it, successfully, until Sentinel reconfigures it as a replica
    (about 10 s later) and those writes are discarded. Here, taking a connection
    re-asks the Sentinels at most every ``recheck_s`` seconds (one ``SENTINEL
    MASTERS``); when the answer changed, idle connections are closed (redis-py) and
    in-use ones on their release. Closing the pool also closes the connections to the
    Sentinels, which the client created by ``master_for`` owns.
    """

    recheck_s: float = 1.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._checked_at = time.monotonic()

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        """A connection to the current primary (see the class docstring)."""
        now = time.monotonic()
        if self.is_master and self.master_address is not None and now - self._checked_at >= self.recheck_s:
            self._checked_at = now
            with contextlib.suppress(MasterNotFoundError):  # a new connection will say so
                await self.get_master_address()
        return await super().get_connection(*args, **kwargs)

    async def release(self, connection: Any) -> None:
        """Return ``connection``; closed first if it points at a former primary."""
        address = self.master_address
        if self.is_master and address is not None and (connection.host, connection.port) != address:
            await connection.disconnect()
        await super().release(connection)

    async def aclose(self) -> None:
        """Disconnect every connection of the pool, then the Sentinel clients."""
        try:
            await super().aclose()
        finally:
            await self.sentinel_manager.aclose()


def sentinel_client(url: str, max_connections: int, **options: Any) -> Redis:
    """An asyncio client of the primary that the Sentinels of ``url`` name.

    ``options`` are the connection options of ``connect()`` (``decode_responses``,
    ``retry``, ``health_check_interval``, ...), applied to the connections to the
    Redis servers; the Sentinels are queried with a 2 s connect / reply timeout and
    no retry of their own.
    The pool blocks at ``max_connections``. No network I/O happens here: the
    primary is looked up on the first command (``MasterNotFoundError``, a
    ``ConnectionError``, if no Sentinel names a healthy one). ``aclose()`` closes
    everything, Sentinel connections included. Raises ``ValueError`` for a bad URL.
    """
    t = parse_sentinel_url(url)
    sentinel_kwargs: dict[str, Any] = {
        "socket_connect_timeout": SENTINEL_TIMEOUT_S,
        "socket_timeout": SENTINEL_TIMEOUT_S,
        "decode_responses": True,
        # One try per Sentinel per lookup (redis-py's default retries with backoff up
        # to 10 s): a dead Sentinel is skipped for the next, and the lookup itself is
        # retried by the connection's ``retry``.
        "retry": Retry(NoBackoff(), 0),
    }
    if t.sentinel_username:
        sentinel_kwargs["username"] = t.sentinel_username
    if t.sentinel_password:
        sentinel_kwargs["password"] = t.sentinel_password
    manager = Sentinel(list(t.sentinels), sentinel_kwargs=sentinel_kwargs)
    conn: dict[str, Any] = {"db": t.db, **options}
    if t.username:
        conn["username"] = t.username
    if t.password:
        conn["password"] = t.password
    client: Redis = manager.master_for(
        t.master,
        connection_pool_class=BlockingSentinelConnectionPool,
        connection_class=SentinelConnection,
        max_connections=max_connections,
        timeout=None,
        **conn,
    )
    return client
