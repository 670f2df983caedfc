"""The trust policy of a worker fleet: what a spec may make workers do (docs/security.md).

A spec is code. Its ``python`` agents and tools are imported and called on the workers,
an ``openai`` or ``anthropic`` model sends the environment variable named by
``api_key_env`` to its ``base_url``, and ``serve`` POSTs run reports to the escalation ``webhook``. A
:class:`TrustPolicy`, built from command-line options or the environment, bounds each:

* ``entrypoints``: fnmatch patterns an entrypoint must match, as ``module:attr`` or by
  its module (``examples.*``, ``myco.agents.*``, ``myco.tools:search``); ``None``
  allows every entrypoint, i.e. the fleet trusts everyone who can submit.
* ``api_key_envs``: fnmatch patterns an ``api_key_env`` must match (default
  ``*_API_KEY``, ``*_API_TOKEN``); a name containing REDIS, PASSWORD, PASSWD or
  SECRET must be listed by its exact name; ``OAO_*`` (OAO's own settings, such as
  ``OAO_REDIS_URL``) is never allowed. ``None`` checks only the ``OAO_*`` rule.
* ``mcp_commands``: fnmatch patterns the command line of an MCP stdio tool server
  (``tools.<name>.mcp.command``, joined as a shell would quote it) must match. Starting
  such a server runs a program on the worker, so it is code execution like an
  entrypoint: ``None`` allows any command only while ``entrypoints`` is ``None`` too; a
  fleet that restricts entrypoints refuses every MCP command it does not list.
* network: link-local (169.254.0.0/16, fe80::/10) and cloud-metadata addresses are
  always refused; ``deny_private_networks`` also refuses every address that is not
  globally routable (loopback, RFC 1918, CGNAT, unique-local ...), except addresses in
  an ``allow_hosts`` network; ``allow_hosts`` (host-name globs and IP networks), when
  set, is the list of hosts a URL may name.

Every check raises :class:`~oao_common.errors.TrustError` (a ``PermanentError``: the
node fails without retry) with one line naming the spec field and the option. Nothing
here does I/O; :mod:`oao_common.safe_http` resolves host names and checks each address
at connect time.
"""

from __future__ import annotations

import fnmatch
import inspect
import ipaddress
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .errors import TrustError

if TYPE_CHECKING:
    from .spec import Spec

ENV_ALLOW_ENTRYPOINTS = "OAO_ALLOW_ENTRYPOINTS"
ENV_ALLOW_API_KEY_ENV = "OAO_ALLOW_API_KEY_ENV"
ENV_DENY_PRIVATE_NETWORKS = "OAO_DENY_PRIVATE_NETWORKS"
ENV_ALLOW_HOSTS = "OAO_ALLOW_HOSTS"
ENV_ALLOW_MCP_COMMANDS = "OAO_ALLOW_MCP_COMMANDS"

DEFAULT_API_KEY_ENVS = ("*_API_KEY", "*_API_TOKEN")
"""Names conventionally dedicated to one API's key (``OPENAI_API_KEY``,
``GROQ_API_KEY``, ``HF_API_TOKEN``); other variables may hold credentials of other
systems (``DATABASE_URL``, ``AWS_SECRET_ACCESS_KEY``) and must be allowed explicitly."""

RESERVED_ENV_PREFIX = "OAO_"
SENSITIVE_ENV_MARKERS = ("REDIS", "PASSWORD", "PASSWD", "SECRET")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALWAYS_DENIED_NETWORKS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "169.254.0.0/16",  # IPv4 link-local; AWS, GCP, Azure, OCI, DO metadata at .169.254
        "fe80::/10",  # IPv6 link-local
        "100.100.100.200/32",  # Alibaba Cloud metadata
        "fd00:ec2::254/128",  # AWS metadata over IPv6
    )
)
METADATA_HOSTS = frozenset(
    {"metadata", "metadata.google.internal", "metadata.goog", "instance-data", "instance-data.ec2.internal"}
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_LEGACY_IPV4 = re.compile(r"^(0x[0-9a-f]+|[0-9]+)(\.(0x[0-9a-f]+|[0-9]+)){0,3}$")


def split_list(value: str | Iterable[str] | None) -> tuple[str, ...] | None:
    """``"a, b,,c"`` → ``("a", "b", "c")``; ``None`` stays ``None``; ``""`` → ``()``."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(s.strip() for s in items if s.strip())


def _unwrap(ip: IPAddress) -> IPAddress:
    """The IPv4 address inside an IPv4-mapped (``::ffff:a.b.c.d``) or NAT64 IPv6 address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def parse_ip(host: str) -> IPAddress | None:
    """``host`` as an IP address if it is one (also the legacy IPv4 forms
    ``2852039166``, ``0xa9fea9fe``, ``169.254.43518`` that resolvers accept), else ``None``."""
    h = host.strip("[]").lower()
    try:
        return _unwrap(ipaddress.ip_address(h))
    except ValueError:
        pass
    if _LEGACY_IPV4.match(h):
        import socket

        try:
            return ipaddress.IPv4Address(socket.inet_aton(h))
        except OSError:
            return None
    return None


def is_public(ip: IPAddress) -> bool:
    """Globally routable unicast (not loopback, private, CGNAT, link-local, reserved,
    documentation, unspecified or multicast)."""
    ip = _unwrap(ip)
    return ip.is_global and not ip.is_multicast


def always_denied(ip: IPAddress) -> bool:
    """Link-local or a cloud-metadata address: refused whatever the options."""
    ip = _unwrap(ip)
    return any(ip in n for n in ALWAYS_DENIED_NETWORKS)


@dataclass(frozen=True, slots=True)
class TrustPolicy:
    """What specs may do on this fleet (see the module docstring).

    ``entrypoints``: patterns, ``None`` = any. ``api_key_envs``: patterns, ``None`` =
    only the ``OAO_*`` rule. ``deny_private_networks``: refuse non-public addresses.
    ``allow_hosts``: host-name globs and IP networks (``10.0.0.0/8``), ``None`` = any
    host. ``mcp_commands``: patterns of MCP stdio server command lines, ``None`` = any
    command while ``entrypoints`` is ``None``, none otherwise. Raises ``ValueError`` for
    an ``allow_hosts`` entry with a ``/`` that is not an IP network.
    """

    entrypoints: tuple[str, ...] | None = None
    api_key_envs: tuple[str, ...] | None = DEFAULT_API_KEY_ENVS
    deny_private_networks: bool = False
    allow_hosts: tuple[str, ...] | None = None
    mcp_commands: tuple[str, ...] | None = None
    _host_globs: tuple[str, ...] = field(init=False, repr=False, compare=False, default=())
    _networks: tuple[IPNetwork, ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        globs: list[str] = []
        nets: list[IPNetwork] = []
        for entry in self.allow_hosts or ():
            try:
                nets.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                if "/" in entry:
                    raise ValueError(f"--allow-hosts: {entry!r} is not an IP network") from None
                globs.append(entry.lower().rstrip("."))
        object.__setattr__(self, "_host_globs", tuple(globs))
        object.__setattr__(self, "_networks", tuple(nets))

    @classmethod
    def from_options(
        cls,
        allow_entrypoints: str | None = None,
        allow_api_key_env: str | None = None,
        deny_private_networks: bool = False,
        allow_hosts: str | None = None,
        api_key_default: tuple[str, ...] | None = DEFAULT_API_KEY_ENVS,
        allow_mcp_commands: str | None = None,
    ) -> TrustPolicy:
        """A policy from comma-separated option values (``None``: option not given).
        ``api_key_default`` applies when ``allow_api_key_env`` is not given (``None``
        there checks only the ``OAO_*`` rule, for submit-time checks)."""
        keys = split_list(allow_api_key_env)
        return cls(
            entrypoints=split_list(allow_entrypoints),
            api_key_envs=keys if keys is not None else api_key_default,
            deny_private_networks=deny_private_networks,
            allow_hosts=split_list(allow_hosts),
            mcp_commands=split_list(allow_mcp_commands),
        )

    def describe(self) -> dict[str, Any]:
        """The policy for a log line."""
        return {
            "allow_entrypoints": "*" if self.entrypoints is None else ",".join(self.entrypoints),
            "allow_api_key_env": "*" if self.api_key_envs is None else ",".join(self.api_key_envs),
            "deny_private_networks": self.deny_private_networks,
            "allow_hosts": "*" if self.allow_hosts is None else ",".join(self.allow_hosts),
            "allow_mcp_commands": ("*" if self.entrypoints is None else "(none)")
            if self.mcp_commands is None
            else ",".join(self.mcp_commands),
        }

    # ------------------------------------------------------------------ entrypoints

    def _module_allowed(self, module: str, whole_module_patterns_only: bool) -> bool:
        """``module`` matches a pattern without ``:`` (``pkg.*`` also matching ``pkg``);
        unless ``whole_module_patterns_only``, also the module part of ``mod:attr`` ones."""
        for p in self.entrypoints or ():
            if ":" in p:
                if whole_module_patterns_only:
                    continue
                p = p.partition(":")[0]
            if fnmatch.fnmatchcase(module, p) or (p.endswith(".*") and module == p[:-2]):
                return True
        return False

    def check_entrypoint(self, entrypoint: str) -> None:
        """Before anything is imported: ``entrypoint`` (``module:attr.path``) must match
        an ``entrypoints`` pattern, as a whole or by its module (a pattern ``pkg.*`` also
        matches the package ``pkg`` itself), and its attribute path may not use dunder
        names. Raises :class:`TrustError`."""
        if self.entrypoints is None:
            return
        module, _, attr = entrypoint.partition(":")
        allowed = ", ".join(self.entrypoints) or "(none)"
        if any(part.startswith("__") for part in attr.split(".")):
            raise TrustError(
                f"entrypoint {entrypoint!r} is refused: dunder attributes are not allowed "
                f"with --allow-entrypoints ({ENV_ALLOW_ENTRYPOINTS})"
            )
        if not (
            any(fnmatch.fnmatchcase(entrypoint, p) for p in self.entrypoints)
            or self._module_allowed(module, True)
        ):
            raise TrustError(
                f"entrypoint {entrypoint!r} is not allowed on this fleet: it matches none of "
                f"--allow-entrypoints ({ENV_ALLOW_ENTRYPOINTS}): {allowed}"
            )

    def check_target(self, entrypoint: str, obj: Any) -> None:
        """After import: a module, function or class that ``entrypoint`` resolved to must
        be defined in an allowed module, so an allowed module's own imports
        (``examples.agents:os.system``, ``from subprocess import run``) do not open a way
        around the list. Other objects (instances the allowed module built) pass.
        Raises :class:`TrustError`."""
        if self.entrypoints is None:
            return
        if inspect.ismodule(obj):
            module: str | None = obj.__name__
        elif inspect.isroutine(obj) or inspect.isclass(obj):
            module = getattr(obj, "__module__", None)
        else:
            return
        if module is None or not self._module_allowed(module, False):
            raise TrustError(
                f"entrypoint {entrypoint!r} resolves to {getattr(obj, '__qualname__', obj)!s} from module "
                f"{module or '?'}, which --allow-entrypoints ({ENV_ALLOW_ENTRYPOINTS}) does not allow"
            )

    # ------------------------------------------------------------------ MCP servers

    def check_mcp_command(self, argv: list[str], where: str = "mcp.command") -> None:
        """An MCP stdio server about to be started with ``argv``: its command line
        (``shlex.join(argv)``) must match an ``mcp_commands`` pattern, or, with no such
        list, entrypoints must be unrestricted. Raises :class:`TrustError`."""
        line = shlex.join(argv)
        if self.mcp_commands is None:
            if self.entrypoints is None:
                return
            raise TrustError(
                f"{where}: {line!r} is refused: starting an MCP server runs a program on the worker, "
                f"and this fleet restricts code (--allow-entrypoints) without listing MCP commands in "
                f"--allow-mcp-commands ({ENV_ALLOW_MCP_COMMANDS})"
            )
        if not any(fnmatch.fnmatchcase(line, p) for p in self.mcp_commands):
            raise TrustError(
                f"{where}: {line!r} is not allowed on this fleet: it matches none of --allow-mcp-commands "
                f"({ENV_ALLOW_MCP_COMMANDS}): {', '.join(self.mcp_commands) or '(none)'}"
            )

    # ------------------------------------------------------------------ API keys

    def check_api_key_env(self, name: str, where: str = "api_key_env") -> None:
        """``name`` may be read as an API key and sent to a model server. Raises
        :class:`TrustError` (``where`` names the spec field in the message)."""
        upper = name.upper()
        if upper.startswith(RESERVED_ENV_PREFIX):
            raise TrustError(
                f"{where}: {name!r} is refused: OAO's own settings (OAO_*, e.g. the Redis URL "
                "and its password) are never sent to a model server"
            )
        if self.api_key_envs is None:
            return
        exact = name in self.api_key_envs
        marker = next((m for m in SENSITIVE_ENV_MARKERS if m in upper), None)
        if marker and not exact:
            raise TrustError(
                f"{where}: {name!r} is refused: it looks like another system's credential (contains "
                f"{marker}); allow it by its exact name in --allow-api-key-env ({ENV_ALLOW_API_KEY_ENV})"
            )
        if not exact and not any(fnmatch.fnmatchcase(name, p) for p in self.api_key_envs):
            raise TrustError(
                f"{where}: {name!r} is refused: it matches none of --allow-api-key-env "
                f"({ENV_ALLOW_API_KEY_ENV}): {', '.join(self.api_key_envs) or '(none)'}"
            )

    # ------------------------------------------------------------------ network

    def check_host(self, host: str, where: str) -> None:
        """The host a URL names (before resolution): not a metadata host name, an
        allowed host when ``allow_hosts`` is set, and, if it is an IP literal, an
        allowed address. Raises :class:`TrustError`."""
        h = host.strip("[]").lower().rstrip(".")
        if h in METADATA_HOSTS:
            raise TrustError(f"{where}: host {host!r} is a cloud-metadata service; OAO never connects there")
        ip = parse_ip(h)
        if ip is not None:
            self.check_address(ip, where, host)
        if self.allow_hosts is None:
            return
        if ip is not None:
            ok = any(ip in n for n in self._networks)
        else:
            ok = any(fnmatch.fnmatchcase(h, g) for g in self._host_globs)
        if not ok:
            raise TrustError(
                f"{where}: host {host!r} is not allowed: it matches none of --allow-hosts "
                f"({ENV_ALLOW_HOSTS}): {', '.join(self.allow_hosts) or '(none)'}"
            )

    def check_address(self, address: IPAddress | str, where: str, host: str = "") -> None:
        """An address about to be connected to (``host`` resolved to it): never
        link-local or cloud metadata; public unless ``deny_private_networks`` is off or
        it lies in an ``allow_hosts`` network. Raises :class:`TrustError`."""
        ip = _unwrap(ipaddress.ip_address(address) if isinstance(address, str) else address)
        via = f"{host!r} resolves to {ip}" if host and parse_ip(host) is None else f"address {ip}"
        if always_denied(ip):
            raise TrustError(
                f"{where}: {via}, a link-local / cloud-metadata address; OAO never connects there"
            )
        if self.deny_private_networks and not is_public(ip) and not any(ip in n for n in self._networks):
            raise TrustError(
                f"{where}: {via}, a loopback or private address, and this fleet runs with "
                f"--deny-private-networks ({ENV_DENY_PRIVATE_NETWORKS}); list its network in "
                f"--allow-hosts ({ENV_ALLOW_HOSTS}) to allow it"
            )

    def check_url(self, url: str, where: str) -> None:
        """A model ``base_url``, MCP server ``url`` or webhook before any connection:
        ``http``/``https`` with a host that :meth:`check_host` accepts. Names are resolved
        and checked again at connect time (:mod:`oao_common.safe_http`). Raises
        :class:`TrustError`."""
        try:
            parts = urlsplit(url)
            host = parts.hostname
        except ValueError as e:
            raise TrustError(f"{where}: {url!r} is not a valid URL: {e}") from None
        if parts.scheme not in ("http", "https") or not host:
            raise TrustError(f"{where}: {url!r} is not an http(s) URL with a host")
        self.check_host(host, where)

    # ------------------------------------------------------------------ whole specs

    def spec_problems(self, spec: Spec) -> list[str]:
        """Every refusal this policy would make for ``spec``, one line each, without
        importing or connecting (entrypoints by name, API-key names, URLs statically)."""
        from .spec import AnthropicModelSpec, OpenAIModelSpec

        problems: list[str] = []

        def check(where: str, fn: Any, *args: Any) -> None:
            try:
                fn(*args)
            except TrustError as e:
                msg = str(e)
                problems.append(msg if msg.startswith(where) else f"{where}: {msg}")

        for name, agent in spec.agents.items():
            entrypoint = getattr(agent, "entrypoint", None)  # python and framework kinds
            if entrypoint:
                check(f"agents.{name}.entrypoint", self.check_entrypoint, entrypoint)
        for name, tool in spec.tools.items():
            if tool.entrypoint is not None:
                check(f"tools.{name}.entrypoint", self.check_entrypoint, tool.entrypoint)
            mcp = tool.mcp
            if mcp is not None and mcp.command is not None:
                at = f"tools.{name}.mcp.command"
                check(at, self.check_mcp_command, mcp.command, at)
            if mcp is not None and mcp.url is not None:
                check(f"tools.{name}.mcp.url", self.check_url, mcp.url, f"tools.{name}.mcp.url")
            if mcp is not None and mcp.api_key_env is not None:
                at = f"tools.{name}.mcp.api_key_env"
                check(at, self.check_api_key_env, mcp.api_key_env, at)
        for name, model in spec.models.items():
            if isinstance(model, OpenAIModelSpec | AnthropicModelSpec):
                key_at, url_at = f"models.{name}.api_key_env", f"models.{name}.base_url"
                check(key_at, self.check_api_key_env, model.api_key_env, key_at)
                if model.base_url:
                    check(url_at, self.check_url, model.base_url, url_at)
        if spec.escalation is not None:
            check("escalation.webhook", self.check_url, spec.escalation.webhook, "escalation.webhook")
        return problems


DEFAULT_TRUST = TrustPolicy()
"""Any entrypoint, the default API-key patterns, link-local and metadata refused."""
