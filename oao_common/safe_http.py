"""HTTP clients that connect only where a :class:`~oao_common.trust.TrustPolicy` allows.

:class:`GuardedTransport` wraps httpx's own transport. For every request (and so for
every redirect hop) it resolves the URL's host with ``getaddrinfo``, checks *every*
address it gets (:meth:`TrustPolicy.check_address`: never link-local or cloud metadata;
with ``--deny-private-networks`` only public ones), then sends the request to one of
those checked addresses itself: the URL's host is replaced by the IP address, the
``Host`` header keeps the name, and for ``https`` the TLS server name (SNI) and the
certificate check use the name (httpcore's ``sni_hostname`` request extension). The
address checked is therefore the address connected to: a DNS answer that changes
between check and connect (DNS rebinding) cannot slip through.

Limits: environment proxies (``HTTP(S)_PROXY``) are not used, since a proxy would
resolve the name itself; addresses are tried in ``getaddrinfo`` order, one after the
other on connection errors (no parallel "happy eyeballs").

The SDKs OAO uses sit on two HTTP libraries: ``httpx`` (the ``openai`` SDK accepts its
clients) and its successor fork ``httpx2`` (the ``anthropic`` and ``mcp`` SDKs accept
nothing else). :func:`guarded_client` and :func:`guarded_client2` build the same
guard for each.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import httpx
import httpx2

from .errors import TrustError
from .trust import TrustPolicy, parse_ip


class BlockedDestination(httpx.ConnectError):
    """The policy refused the address (or host) a request would connect to. A
    subclass of ``httpx.ConnectError`` so HTTP clients treat it as a failed connection;
    callers that must not retry check for it first."""


async def resolve(host: str, port: int) -> list[str]:
    """The IP addresses ``host`` resolves to for a TCP connection, in ``getaddrinfo``
    order, without duplicates. Raises ``OSError`` (``socket.gaierror``) if it does not."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        ip = str(sockaddr[0])
        if ip not in out:
            out.append(ip)
    return out


class _AddressGuard:
    """The checks shared by both transports: ``policy`` and the spec field ``what``."""

    policy: TrustPolicy
    what: str

    async def checked_addresses(self, host: str, port: int) -> list[str]:
        """The addresses to connect to for ``host``: the literal itself, or what
        :meth:`resolve` gives, every one allowed by the policy. Raises
        :class:`~oao_common.errors.TrustError` (refused) or ``OSError`` (no address)."""
        self.policy.check_host(host, self.what)
        literal = parse_ip(host)
        addresses = [str(literal)] if literal is not None else await self.resolve(host, port)
        for ip in addresses:
            self.policy.check_address(ip, self.what, host)
        return addresses

    async def resolve(self, host: str, port: int) -> list[str]:
        """The addresses to check and connect to for ``host`` (:func:`resolve`)."""
        return await resolve(host, port)


class _PinningTransport(_AddressGuard):
    """The transport of :class:`GuardedTransport` and :class:`GuardedTransport2`, written
    once for both HTTP libraries: ``_http`` is the library (``httpx`` or ``httpx2``, the
    same API) and ``_blocked`` its :class:`BlockedDestination` class."""

    _http: Any
    _blocked: Callable[..., Exception]

    def __init__(self, policy: TrustPolicy, what: str = "url", **transport_kw: Any) -> None:
        self.policy = policy
        self.what = what
        self._inner = self._http.AsyncHTTPTransport(**transport_kw)

    async def handle_async_request(self, request: Any) -> Any:
        http = self._http
        url = request.url
        host = url.host
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            addresses = await self.checked_addresses(host, port)
        except TrustError as e:
            raise self._blocked(str(e), request=request) from None
        except OSError as e:
            raise http.ConnectError(f"cannot resolve {host!r}: {e}", request=request) from None
        last: Exception | None = None
        for ip in addresses:
            pinned = http.Request(
                request.method,
                url.copy_with(host=ip),
                headers=request.headers,  # keeps Host: <name>
                stream=request.stream,
                extensions={**request.extensions, "sni_hostname": host}
                if url.scheme == "https"
                else request.extensions,
            )
            try:
                return await self._inner.handle_async_request(pinned)
            except http.ConnectError as e:
                last = e
        assert last is not None
        raise last

    async def aclose(self) -> None:
        await self._inner.aclose()


class GuardedTransport(_PinningTransport, httpx.AsyncBaseTransport):
    """An ``httpx`` transport that checks and pins the address of every connection.

    ``what`` names the spec field in refusals (``models.gpt.base_url``); other keyword
    arguments go to ``httpx.AsyncHTTPTransport`` (``verify``, ``limits`` ...).
    """

    _http = httpx
    _blocked = BlockedDestination


def guarded_client(
    policy: TrustPolicy, what: str = "url", transport_kw: dict[str, Any] | None = None, **client_kw: Any
) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` whose every connection goes through
    :class:`GuardedTransport`. ``client_kw`` go to the client (``timeout``,
    ``follow_redirects``: off unless given, as in httpx), ``transport_kw`` to the
    transport (``verify``, ``limits``)."""
    return httpx.AsyncClient(transport=GuardedTransport(policy, what, **(transport_kw or {})), **client_kw)


class BlockedDestination2(httpx2.ConnectError):
    """:class:`BlockedDestination` for ``httpx2`` clients."""


class GuardedTransport2(_PinningTransport, httpx2.AsyncBaseTransport):
    """:class:`GuardedTransport` for ``httpx2`` (the ``anthropic`` and ``mcp`` SDKs):
    the same checks, the same pinning of the checked address."""

    _http = httpx2
    _blocked = BlockedDestination2


def guarded_client2(
    policy: TrustPolicy, what: str = "url", transport_kw: dict[str, Any] | None = None, **client_kw: Any
) -> httpx2.AsyncClient:
    """:func:`guarded_client` for ``httpx2``: an ``httpx2.AsyncClient`` whose every
    connection goes through :class:`GuardedTransport2`."""
    return httpx2.AsyncClient(transport=GuardedTransport2(policy, what, **(transport_kw or {})), **client_kw)
