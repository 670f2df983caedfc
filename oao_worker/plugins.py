"""Worker plugins: Python packages that add governance middleware (policies), model
providers, agent kinds and event listeners to OAO workers without changing OAO
(docs/plugins.md is the contract, with the API version).

A plugin is an entry point in the group ``oao.plugins`` (``[project.entry-points."oao.plugins"]``
in its ``pyproject.toml``) whose name is the plugin's name and whose object has
``api_version`` (the plugin API version it needs, ``"MAJOR.MINOR"``) and
``register(api)``; :class:`Plugin` is the convenient way to write one. A worker loads
only the plugins its allow-list names (``oao-worker --plugins a,b``, ``OAO_PLUGINS``;
none by default: a plugin is code running in the worker, docs/security.md), and refuses
to start when one of them is missing, fails to load, or needs an API version this OAO
does not provide (:class:`PluginError`, one line).

Compatibility: OAO provides :data:`PLUGIN_API_VERSION`; a plugin needing ``M.m`` loads
when ``M`` is the same major version and ``m`` is not above OAO's minor version.

Event listeners receive :class:`ListenerEvent` s: every event a node attempt writes to the
run's log from the worker (``STATE_ENTER``, ``STEP_STARTED``, ``STEP_COMPLETED``,
``STEP_REPLAYED``, ``STEP_RETRIED``, ``POLICY_VIOLATION``, ``RATE_LIMIT_WAIT``,
``GRAPH_*``...), plus two that exist only for listeners: ``TOOL_CALL`` (a tool step was
executed and recorded) and ``EXECUTION_COMPLETE`` (a node attempt ended). Delivery is
asynchronous, per listener, in order, at most once, through a bounded queue
(:class:`EventBus`): a slow or failing listener never delays or fails a node.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata as md
import inspect
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from oao_common.errors import OAOError, PermanentError
from oao_common.events import EventType
from oao_common.log import get_logger
from oao_common.spec import MiddlewareRef, PluginAgentSpec, PluginModelSpec
from oao_common.trust import DEFAULT_TRUST, TrustPolicy, split_list

from .governance import NodeAttempt, StepInfo, StepMiddleware, Usage

if TYPE_CHECKING:
    from .agents import Agent
    from .providers import Provider
    from .tools import Tool

PLUGIN_API_VERSION = "1.0"
"""The plugin API this OAO provides (docs/plugins.md): major.minor. A new minor version
only adds; a new major version may break plugins written for the previous one."""

ENTRY_POINT_GROUP = "oao.plugins"
ENV_PLUGINS = "OAO_PLUGINS"

TOOL_CALL = "TOOL_CALL"
EXECUTION_COMPLETE = "EXECUTION_COMPLETE"
LISTENER_ONLY_EVENTS = frozenset({TOOL_CALL, EXECUTION_COMPLETE})
LISTENER_EVENTS = frozenset(str(t) for t in EventType) | LISTENER_ONLY_EVENTS
"""Event types a listener may ask for (only node events reach listeners: a worker sees
no run events, which the Lua scripts write)."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")
_VERSION = re.compile(r"^(\d+)(?:\.(\d+))?$")


def _log() -> Any:
    """This module's logger (made when used: logging is configured after imports)."""
    return get_logger(component="plugins")


class PluginError(OAOError):
    """A plugin could not be loaded (not installed, failed to import or register, or
    needs an incompatible API version); the message is one line naming it."""


# --------------------------------------------------------------------------- declaring


@dataclass(frozen=True, slots=True)
class Plugin:
    """What a plugin's entry point names: ``api_version`` (``"1.0"``: the plugin API it
    needs), ``register(api)`` (called once per worker, adds what the plugin provides
    through :class:`PluginAPI`), and a one-line ``description``."""

    api_version: str
    register: Callable[[PluginAPI], None]
    description: str = ""


@dataclass(frozen=True, slots=True)
class ListenerEvent:
    """One event for listeners. ``type``: an event type of the run's log or
    ``TOOL_CALL`` / ``EXECUTION_COMPLETE``; ``ts_ms``: the worker's clock when it
    happened (ms since the epoch); ``data``: the event's fields (as in the log)."""

    type: str
    run_id: str
    node_id: str
    attempt: int
    worker_id: str
    ts_ms: int
    data: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "run_id": self.run_id,
            "node_id": self.node_id,
            "attempt": self.attempt,
            "worker_id": self.worker_id,
            "ts_ms": self.ts_ms,
            "data": self.data,
        }


@runtime_checkable
class Listener(Protocol):
    """An object listener (a plain callable ``f(event)`` works too; either may be async).
    An optional ``async aclose()`` is called when the worker stops."""

    def on_event(self, event: ListenerEvent) -> Awaitable[None] | None: ...


MiddlewareEntry = StepMiddleware | Callable[[NodeAttempt], StepMiddleware | None]
ProviderFactory = Callable[[str, PluginModelSpec, TrustPolicy], "Provider"]
AgentFactory = Callable[[str, PluginAgentSpec, TrustPolicy, "dict[str, Tool]"], "Agent"]


@dataclass(slots=True)
class LoadedPlugin:
    """A plugin a worker loaded: its entry point and what it registered."""

    name: str
    dist: str
    version: str
    target: str
    api_version: str
    description: str = ""
    registered: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dist": self.dist,
            "version": self.version,
            "target": self.target,
            "api_version": self.api_version,
            "description": self.description,
            "registered": self.registered,
        }


class PluginAPI:
    """What ``register(api)`` receives. ``version``: :data:`PLUGIN_API_VERSION`;
    ``name``: the plugin's (its entry point's) name, which prefixes what it provides
    (``<name>.<thing>`` in specs); ``trust``: the worker's trust policy (check URLs
    you connect to with ``trust.check_url`` and use
    :func:`oao_common.safe_http.guarded_client`); ``log``: a structlog logger.

    Every ``add_*`` method raises :class:`PluginError` for a bad name or argument.
    """

    version = PLUGIN_API_VERSION

    def __init__(self, plugins: PluginSet, loaded: LoadedPlugin, trust: TrustPolicy) -> None:
        self._set = plugins
        self._loaded = loaded
        self.name = loaded.name
        self.trust = trust
        self.log = get_logger(component="plugin", plugin=loaded.name)

    def _note(self, what: str, name: str) -> None:
        self._loaded.registered.setdefault(what, []).append(name)

    def _qualified(self, name: str, table: dict[str, Any], what: str) -> str:
        if not _NAME.match(name):
            raise PluginError(f"plugin {self.name!r}: bad {what} name {name!r} (letters, digits, _ and -)")
        q = f"{self.name}.{name}"
        if q in table:
            raise PluginError(f"plugin {self.name!r}: {what} {name!r} registered twice")
        return q

    def add_middleware(self, middleware: MiddlewareEntry) -> None:
        """Add middleware to every node attempt the worker runs (a worker-wide
        policy): a :class:`StepMiddleware` instance (shared by all attempts: keep
        per-attempt state in ``node.state``), or a callable ``factory(node)`` returning a
        fresh one (or None to skip that attempt) once the attempt's spec is loaded."""
        if not isinstance(middleware, StepMiddleware) and not callable(middleware):
            raise PluginError(f"plugin {self.name!r}: add_middleware needs a StepMiddleware or a factory")
        self._set.middleware.append(middleware)
        label = type(middleware).__name__ if isinstance(middleware, StepMiddleware) else None
        self._note("middleware", label or str(getattr(middleware, "__name__", "factory")))

    def add_named_middleware(self, name: str, factory: Callable[..., StepMiddleware]) -> None:
        """Offer a middleware that specs ask for by name: ``middleware: [{use:
        <plugin>.<name>, config: {...}}]``; each attempt of such a run gets
        ``factory(**config)`` (a ``TypeError`` / ``ValueError`` from it fails the node
        permanently, naming the middleware)."""
        q = self._qualified(name, self._set.named_middleware, "middleware")
        self._set.named_middleware[q] = factory
        self._note("named_middleware", q)

    def add_provider(self, name: str, factory: ProviderFactory) -> None:
        """Offer a model provider: a spec model ``{provider: plugin, use:
        <plugin>.<name>, model, config}`` gets ``factory(model_name, spec, trust)``, a
        :class:`~oao_worker.providers.base.Provider` (``complete(request, on_chunk)``,
        ``aclose()``), built once per run on the worker's loop."""
        q = self._qualified(name, self._set.providers, "provider")
        self._set.providers[q] = factory
        self._note("providers", q)

    def add_agent_kind(self, name: str, factory: AgentFactory) -> None:
        """Offer an agent kind: a spec agent ``{kind: plugin, use: <plugin>.<name>,
        ...}`` gets ``factory(agent_name, spec, trust, tools)``, an object with
        ``async run(ctx) -> output``; built once per run in the worker's sync executor
        (it may import)."""
        q = self._qualified(name, self._set.agent_kinds, "agent kind")
        self._set.agent_kinds[q] = factory
        self._note("agent_kinds", q)

    def add_listener(
        self, listener: Listener | Callable[[ListenerEvent], Any], events: Iterable[str] | None = None
    ) -> None:
        """Deliver events to ``listener`` (``on_event(event)`` or a callable, sync or
        async); ``events``: the types wanted (None: all), from :data:`LISTENER_EVENTS`."""
        if not isinstance(listener, Listener) and not callable(listener):
            raise PluginError(f"plugin {self.name!r}: a listener needs on_event(event) or to be callable")
        types = None if events is None else frozenset(str(e) for e in events)
        unknown = sorted((types or frozenset()) - LISTENER_EVENTS)
        if unknown:
            raise PluginError(f"plugin {self.name!r}: unknown listener event type(s) {', '.join(unknown)}")
        self._set.listeners.append((self.name, listener, types))
        self._note("listeners", ",".join(sorted(types)) if types is not None else "*")


class PluginSet:
    """The plugins a worker loaded and what they registered (empty: :data:`NO_PLUGINS`)."""

    def __init__(self) -> None:
        self.plugins: list[LoadedPlugin] = []
        self.middleware: list[MiddlewareEntry] = []
        self.named_middleware: dict[str, Callable[..., StepMiddleware]] = {}
        self.providers: dict[str, ProviderFactory] = {}
        self.agent_kinds: dict[str, AgentFactory] = {}
        self.listeners: list[tuple[str, Any, frozenset[str] | None]] = []

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.plugins]

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Close the listeners that have an ``aclose()`` (once each; up to ``timeout_s``
        seconds each), when the process is done with its workers."""
        for plugin, listener, _ in self.listeners:
            close = getattr(listener, "aclose", None)
            if not callable(close):
                continue
            try:
                result = close()
                if inspect.isawaitable(result):
                    async with asyncio.timeout(timeout_s):
                        await result
            except Exception as e:
                _log().warning("plugin.listener_close_failed", plugin=plugin, error=repr(e))

    def _missing(self, what: str, ref: str, where: str) -> PermanentError:
        plugin = ref.split(".", 1)[0]
        loaded = ", ".join(self.names) or "none"
        return PermanentError(
            f"{where}: {what} {ref!r} is not provided by a plugin loaded on this worker "
            f"(loaded: {loaded}); start workers with --plugins {plugin} (OAO_PLUGINS)"
        )

    def worker_middleware(self, node: NodeAttempt) -> list[StepMiddleware]:
        """The worker-wide plugin middleware for one attempt, in registration order."""
        out: list[StepMiddleware] = []
        for entry in self.middleware:
            m = entry if isinstance(entry, StepMiddleware) else entry(node)
            if m is not None:
                out.append(m)
        return out

    def spec_middleware(self, refs: Sequence[MiddlewareRef]) -> list[StepMiddleware]:
        """The middleware a spec asks for (``middleware:``), built from their config.
        Raises :class:`PermanentError` for one no loaded plugin offers or whose config
        its factory refuses."""
        out = []
        for i, ref in enumerate(refs):
            factory = self.named_middleware.get(ref.use)
            if factory is None:
                raise self._missing("middleware", ref.use, f"middleware[{i}]")
            try:
                out.append(factory(**ref.config))
            except (TypeError, ValueError) as e:
                raise PermanentError(f"middleware[{i}] ({ref.use}): bad config: {e}") from None
        return out

    def build_provider(self, name: str, spec: PluginModelSpec, trust: TrustPolicy) -> Provider:
        """The provider of model ``name`` (``provider: plugin``); raises
        :class:`PermanentError` if no loaded plugin offers ``spec.use``."""
        factory = self.providers.get(spec.use)
        if factory is None:
            raise self._missing("provider", spec.use, f"models.{name}")
        return factory(name, spec, trust)

    def build_agent(
        self, name: str, spec: PluginAgentSpec, trust: TrustPolicy, tools: dict[str, Tool]
    ) -> Agent:
        """The agent ``name`` (``kind: plugin``); raises :class:`PermanentError` if no
        loaded plugin offers ``spec.use``."""
        factory = self.agent_kinds.get(spec.use)
        if factory is None:
            raise self._missing("agent kind", spec.use, f"agents.{name}")
        return factory(name, spec, trust, tools)


NO_PLUGINS = PluginSet()


# --------------------------------------------------------------------------- loading


def api_problem(needed: Any) -> str | None:
    """Why a plugin needing API version ``needed`` cannot load here, or None."""
    m = _VERSION.match(str(needed)) if isinstance(needed, str | int) else None
    if m is None:
        return f"declares api_version {needed!r}, not 'MAJOR.MINOR'"
    major, minor = int(m.group(1)), int(m.group(2) or 0)
    have_major, have_minor = (int(x) for x in PLUGIN_API_VERSION.split("."))
    if major != have_major or minor > have_minor:
        return (
            f"needs OAO plugin API {major}.{minor}; this OAO provides {PLUGIN_API_VERSION} "
            f"(it loads plugins needing {have_major}.0 to {PLUGIN_API_VERSION})"
        )
    return None


def installed() -> dict[str, md.EntryPoint]:
    """The installed plugins: entry point name → entry point (group ``oao.plugins``),
    found through package metadata on ``sys.path``."""
    out: dict[str, md.EntryPoint] = {}
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        out.setdefault(ep.name, ep)
    return out


def _dist(ep: md.EntryPoint) -> tuple[str, str]:
    d = ep.dist
    return (d.name, d.version) if d is not None else ("?", "?")


def _not_installed(name: str, eps: dict[str, md.EntryPoint]) -> str:
    have = ", ".join(sorted(eps)) or "none"
    return f"plugin {name!r} is allowed (--plugins / {ENV_PLUGINS}) but not installed (installed: {have})"


def allowed_plugins(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """The allow-list from ``--plugins`` / ``OAO_PLUGINS`` (comma-separated names, each
    once, in order)."""
    return tuple(dict.fromkeys(split_list(value) or ()))


def load_plugin(ep: md.EntryPoint, into: PluginSet, trust: TrustPolicy = DEFAULT_TRUST) -> LoadedPlugin:
    """Import one plugin, check its API version and let it register into ``into``.
    Raises :class:`PluginError` (one line) if any of that fails."""
    dist, version = _dist(ep)
    label = f"plugin {ep.name!r} ({dist} {version})"
    try:
        obj = ep.load()
    except Exception as e:
        raise PluginError(f"{label} failed to import {ep.value}: {type(e).__name__}: {e}") from None
    needed = getattr(obj, "api_version", None)
    register = getattr(obj, "register", None)
    if needed is None or not callable(register):
        raise PluginError(f"{label}: {ep.value} is not a plugin (needs api_version and register(api))")
    problem = api_problem(needed)
    if problem:
        raise PluginError(f"{label} {problem}: refused")
    loaded = LoadedPlugin(ep.name, dist, version, ep.value, str(needed), str(getattr(obj, "description", "")))
    try:
        register(PluginAPI(into, loaded, trust))
    except PluginError:
        raise
    except Exception as e:
        raise PluginError(f"{label} failed to register: {type(e).__name__}: {e}") from None
    into.plugins.append(loaded)
    return loaded


def load_plugins(allow: Sequence[str], trust: TrustPolicy = DEFAULT_TRUST) -> PluginSet:
    """Load the allow-listed plugins, in the list's order. Raises :class:`PluginError`
    for a name that is not installed or a plugin that does not load; nothing else is
    imported (an installed plugin that is not listed never runs)."""
    out = PluginSet()
    if not allow:
        return out
    eps = installed()
    for name in allow:
        ep = eps.get(name)
        if ep is None:
            raise PluginError(_not_installed(name, eps))
        load_plugin(ep, out, trust)
        _log().info("plugin.loaded", **out.plugins[-1].to_dict())
    return out


def describe_installed(allow: Sequence[str], trust: TrustPolicy = DEFAULT_TRUST) -> list[dict[str, Any]]:
    """For ``oao-scheduler plugins``: every installed plugin and every allowed name,
    with ``status`` ``loads`` / ``not allowed`` / ``refused`` / ``error`` / ``not
    installed`` and a ``detail`` line. Only allowed plugins are imported."""
    eps = installed()
    rows: list[dict[str, Any]] = []
    for name in sorted(set(eps) | set(allow)):
        ep = eps.get(name)
        row: dict[str, Any] = {"name": name, "allowed": name in allow}
        if ep is None:
            rows.append({**row, "status": "not installed", "detail": _not_installed(name, eps)})
            continue
        dist, version = _dist(ep)
        row.update(dist=dist, version=version, target=ep.value)
        if name not in allow:
            rows.append({**row, "status": "not allowed", "detail": f"not in --plugins / {ENV_PLUGINS}"})
            continue
        try:
            loaded = load_plugin(ep, PluginSet(), trust)
        except PluginError as e:
            status = "refused" if "plugin API" in str(e) else "error"
            rows.append({**row, "status": status, "detail": str(e)})
            continue
        rows.append(
            {
                **row,
                "status": "loads",
                "api_version": loaded.api_version,
                "description": loaded.description,
                "registered": loaded.registered,
                "detail": "",
            }
        )
    return rows


# --------------------------------------------------------------------------- listeners


class _Delivery:
    __slots__ = ("dropped", "listener", "plugin", "queue", "task", "types")

    def __init__(self, plugin: str, listener: Any, types: frozenset[str] | None, size: int) -> None:
        self.plugin = plugin
        self.listener = listener
        self.types = types
        self.queue: asyncio.Queue[ListenerEvent] = asyncio.Queue(maxsize=size)
        self.task: asyncio.Task[None] | None = None
        self.dropped = 0


class EventBus:
    """Delivers :class:`ListenerEvent` s to the plugins' listeners: one bounded queue
    (``queue_size`` events) and one task per listener, so a slow listener delays only
    itself. Each delivery may take ``timeout_s`` seconds; errors are logged. A full
    queue drops the event (logged at the first and every 100th drop). :meth:`aclose`
    gives queued events ``drain_s`` seconds. The listeners belong to the
    :class:`PluginSet` (several workers of one process share them), which closes them."""

    def __init__(
        self,
        listeners: Sequence[tuple[str, Any, frozenset[str] | None]],
        queue_size: int = 1000,
        timeout_s: float = 10.0,
    ) -> None:
        self._deliveries = [_Delivery(p, listener, t, queue_size) for p, listener, t in listeners]
        self.timeout_s = timeout_s
        self.delivered = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0

    def __bool__(self) -> bool:
        return bool(self._deliveries)

    def wants(self, type_: str) -> bool:
        return any(d.types is None or type_ in d.types for d in self._deliveries)

    def start(self) -> None:
        """Start the delivery tasks on the running loop."""
        self._loop, self._thread = asyncio.get_running_loop(), threading.get_ident()
        for d in self._deliveries:
            if d.task is None:
                d.task = asyncio.get_running_loop().create_task(self._deliver(d), name=f"listener-{d.plugin}")

    def publish(self, event: ListenerEvent) -> None:
        """Queue ``event`` for every listener that wants it; never blocks. Safe from any
        thread (an event from a sync thread is queued on the loop's)."""
        if self._loop is not None and threading.get_ident() != self._thread:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the worker is gone
                self._loop.call_soon_threadsafe(self.publish, event)
            return
        for d in self._deliveries:
            if d.types is not None and event.type not in d.types:
                continue
            try:
                d.queue.put_nowait(event)
            except asyncio.QueueFull:
                d.dropped += 1
                if d.dropped == 1 or d.dropped % 100 == 0:
                    _log().warning("plugin.listener_events_dropped", plugin=d.plugin, dropped=d.dropped)

    async def _deliver(self, d: _Delivery) -> None:
        while True:
            event = await d.queue.get()
            try:
                async with asyncio.timeout(self.timeout_s):
                    fn = d.listener.on_event if isinstance(d.listener, Listener) else d.listener
                    result = fn(event)
                    if inspect.isawaitable(result):
                        await result
                self.delivered += 1
            except Exception as e:
                _log().warning(
                    "plugin.listener_failed",
                    plugin=d.plugin,
                    event=event.type,
                    error=f"{type(e).__name__}: {e}",
                )
            finally:
                d.queue.task_done()

    async def aclose(self, drain_s: float = 5.0) -> None:
        """Deliver what is queued (up to ``drain_s`` seconds), then stop."""
        pending = [d.queue.join() for d in self._deliveries if d.task is not None]
        if pending:
            try:
                async with asyncio.timeout(drain_s):
                    await asyncio.gather(*pending)
            except TimeoutError:
                _log().warning("plugin.listener_events_undelivered", drain_s=drain_s)
        for d in self._deliveries:
            if d.task is not None:
                d.task.cancel()
        await asyncio.gather(
            *(d.task for d in self._deliveries if d.task is not None), return_exceptions=True
        )


class EventListeners(StepMiddleware):
    """Feeds the plugins' listeners (:class:`EventBus`): every event an attempt writes
    (``on_event``), ``TOOL_CALL`` after each executed tool step, and
    ``EXECUTION_COMPLETE`` once the attempt's end was written (``after_node``: outcome,
    error, usage, duration)."""

    def __init__(self, bus: EventBus) -> None:
        self.bus = bus

    def _publish(self, node: NodeAttempt, type_: str, data: dict[str, Any]) -> None:
        if self.bus.wants(type_):
            self.bus.publish(
                ListenerEvent(
                    type_,
                    node.run_id,
                    node.node_id,
                    node.attempt,
                    node.worker_id,
                    int(time.time() * 1000),
                    data,
                )
            )

    def on_event(self, node: NodeAttempt, type_: str, data: dict[str, Any]) -> None:
        self._publish(node, type_, dict(data))

    def after_step(self, step: StepInfo, usage: Usage) -> None:
        if step.kind != "tool" or step.replayed or step.error is not None or step.node is None:
            return
        result = step.result if isinstance(step.result, dict) else {}
        data: dict[str, Any] = {
            "seq": step.seq,
            "name": step.name,
            "args": step.args,
            "ok": bool(result.get("ok", True)),
            "duration_ms": step.duration_ms,
        }
        if "error" in result:
            data["error"] = result["error"]
        self._publish(step.node, TOOL_CALL, data)

    def after_node(self, node: NodeAttempt) -> None:
        u = node.usage
        error = None
        if node.error is not None:
            error = {"type": type(node.error).__name__, "message": str(node.error)}
            to_dict = getattr(node.error, "to_dict", None)
            if callable(to_dict):
                error.update(to_dict())
        self._publish(
            node,
            EXECUTION_COMPLETE,
            {
                "outcome": node.outcome,
                "agent": node.node_spec.agent if node.node_spec is not None else None,
                "agent_type": node.agent_type,
                "error": error,
                "steps": u.steps,
                "tool_calls": u.tool_calls,
                "tokens_in": u.tokens_in,
                "tokens_out": u.tokens_out,
                "cost_usd": round(u.cost_usd, 6),
                "duration_ms": int((time.monotonic() - node.started) * 1000),
            },
        )
