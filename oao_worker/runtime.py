"""Per-run state a worker builds once and reuses for every node of that run:
the parsed spec, its inputs, agents, providers and tools (a small LRU cache).

Building it imports the spec's entrypoints and may instantiate agent classes: code
that can block for seconds. All of that runs through ``run_sync`` (the worker's
executor), never on the event loop, so a slow import cannot stop heartbeats or other
nodes. Providers of evicted runs are closed (their HTTP connections released)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from oao_common.broker import Broker
from oao_common.errors import PermanentError
from oao_common.pricing import FREE, Price, price_of
from oao_common.spec import PluginAgentSpec, PluginModelSpec, Spec
from oao_common.trust import DEFAULT_TRUST, TrustPolicy

from .agents import Agent, build_agent
from .guards import Guard
from .providers import Provider, make_provider
from .tools import RunSync, Tool, load_entrypoint, load_tools, runs_no_code

if TYPE_CHECKING:
    from .plugins import PluginSet


@dataclass(slots=True)
class RunRuntime:
    spec: Spec
    inputs: dict[str, Any]
    providers: dict[str, Provider]
    tools: dict[str, Tool]
    prices: dict[str, Price] = field(default_factory=dict)
    guards: dict[str, Guard] = field(default_factory=dict)
    started_at_ms: int = 0
    agents: dict[str, Agent] = field(default_factory=dict)
    trust: TrustPolicy = DEFAULT_TRUST
    #: the run is a strict replay: every step must come from the record (docs/replay.md)
    strict_replay: bool = False
    #: the worker's plugins: agent kinds and providers a spec may ``use`` (docs/plugins.md)
    plugins: PluginSet | None = None

    async def agent(self, name: str, run_sync: RunSync) -> Agent:
        """The agent ``name``, built on first use through ``run_sync`` (it imports the
        entrypoint); raises :class:`PermanentError` if that fails."""
        a = self.agents.get(name)
        if a is None:
            spec = self.spec.agents[name]
            if isinstance(spec, PluginAgentSpec):
                if self.plugins is None:
                    raise PermanentError(f"agents.{name}: kind plugin ({spec.use}) needs a worker plugin")
                a = await run_sync(self.plugins.build_agent, name, spec, self.trust, self.tools)
            elif spec.kind == "llm" or (spec.kind == "python" and runs_no_code(spec.entrypoint)):
                a = build_agent(name, spec, self.trust)  # nothing to import or run
            else:  # framework kinds call their graph factory: off the loop too
                a = await run_sync(build_agent, name, spec, self.trust, self.tools)
            a = self.agents.setdefault(name, a)
        return a

    async def aclose(self) -> None:
        """Close the providers' clients."""
        for p in self.providers.values():
            with contextlib.suppress(Exception):
                await p.aclose()


def guards_of(spec: Spec) -> dict[str, Guard]:
    """``"model:<name>"`` / ``"tool:<name>"`` → the guard of each model and tool that has a
    rate limit or circuit breaker (a model's ``limit_key`` names a shared limiter)."""
    out: dict[str, Guard] = {}
    for name, m in spec.models.items():
        g = Guard(m.limit_key or f"model:{name}", m.rate_limit, m.circuit_breaker)
        if g.active:
            out[f"model:{name}"] = g
    for name, t in spec.tools.items():
        g = Guard(f"tool:{name}", t.rate_limit, t.circuit_breaker)
        if g.active:
            out[f"tool:{name}"] = g
    return out


def import_problems(spec: Spec, trust: TrustPolicy | None = None) -> list[str]:
    """Import every entrypoint of ``spec`` (agents and tools) as a worker would; one
    line per entrypoint that fails, naming its place (``agents.writer.entrypoint``).
    Blocking: for the command line (``validate/submit --check-imports``, ``run``)."""
    places = [
        (f"agents.{n}.entrypoint", ep)
        for n, a in spec.agents.items()
        if (ep := getattr(a, "entrypoint", None)) is not None
    ]
    places += [(f"tools.{n}.entrypoint", t.entrypoint) for n, t in spec.tools.items()]
    problems = []
    for where, entrypoint in places:
        try:
            load_entrypoint(entrypoint, trust or DEFAULT_TRUST)
        except PermanentError as e:
            problems.append(f"{where}: {e}")
    return problems


class RuntimeCache:
    """LRU of :class:`RunRuntime` by run id (``size`` runs); blocking work through
    ``run_sync`` (default ``asyncio.to_thread``); ``trust`` bounds what the runs'
    entrypoints, API-key variables and URLs may be (docs/security.md)."""

    def __init__(
        self,
        broker: Broker,
        size: int = 128,
        run_sync: RunSync | None = None,
        trust: TrustPolicy = DEFAULT_TRUST,
        plugins: PluginSet | None = None,
    ) -> None:
        self.broker = broker
        self.trust = trust
        self.plugins = plugins
        self.size = size
        self.run_sync: RunSync = run_sync or asyncio.to_thread
        self._closing: set[asyncio.Task[None]] = set()
        self._items: OrderedDict[str, RunRuntime] = OrderedDict()
        self._loading: dict[str, asyncio.Future[RunRuntime]] = {}

    async def get(self, run_id: str) -> RunRuntime:
        """The runtime of ``run_id``; raises :class:`PermanentError` if the run's spec is
        missing or no longer valid, or a tool cannot be imported. Concurrent callers for
        one run share a single fetch and parse (single-flight)."""
        rt = self._items.get(run_id)
        if rt is not None:
            self._items.move_to_end(run_id)
            return rt
        pending = self._loading.get(run_id)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[RunRuntime] = asyncio.get_running_loop().create_future()
        self._loading[run_id] = fut
        try:
            rt = await self._load(run_id)
        except BaseException as e:
            if not fut.done():
                fut.set_exception(e)
            fut.exception()  # retrieved: no "never retrieved" warning when nobody waits
            raise
        finally:
            self._loading.pop(run_id, None)
        fut.set_result(rt)
        self._items[run_id] = rt
        while len(self._items) > self.size:
            _, old = self._items.popitem(last=False)
            t = asyncio.get_running_loop().create_task(old.aclose())
            self._closing.add(t)
            t.add_done_callback(self._closing.discard)
        return rt

    async def aclose(self) -> None:
        """Close every cached runtime's providers."""
        items, self._items = list(self._items.values()), OrderedDict()
        for rt in items:
            await rt.aclose()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def _load(self, run_id: str) -> RunRuntime:
        spec_json, inputs_json, started_at = await self.broker.get_spec_json(run_id)
        if spec_json is None:
            raise PermanentError(f"run {run_id} has no spec in Redis")
        try:
            spec = Spec.from_stored_json(spec_json)
        except ValueError as e:
            raise PermanentError(f"run {run_id}: stored spec no longer validates: {e}") from None
        if all(runs_no_code(t.entrypoint) for t in spec.tools.values()):
            tools = load_tools(spec.tools, self.trust)  # imported already: no code runs
        else:
            tools = await self.run_sync(load_tools, spec.tools, self.trust)
        return RunRuntime(
            spec=spec,
            inputs=json.loads(inputs_json or "{}"),
            providers={name: self._provider(name, m) for name, m in spec.models.items()},
            tools=tools,
            prices={
                name: _plugin_price(m) if isinstance(m, PluginModelSpec) else price_of(m)
                for name, m in spec.models.items()
            },
            guards=guards_of(spec),
            started_at_ms=int(started_at or 0),
            trust=self.trust,
            strict_replay=await self.broker.run_field(run_id, "replay_strict") == "1",
            plugins=self.plugins,
        )

    def _provider(self, name: str, m: Any) -> Provider:
        """The provider of model ``name``: built in, or a plugin's (``provider: plugin``)."""
        if isinstance(m, PluginModelSpec):
            if self.plugins is None:
                raise PermanentError(f"models.{name}: provider plugin ({m.use}) needs a worker plugin")
            return self.plugins.build_provider(name, m, self.trust)
        return make_provider(name, m, self.trust)


def _plugin_price(m: PluginModelSpec) -> Price:
    """A plugin model's price: its ``pricing``, else free."""
    if m.pricing is None:
        return FREE
    return Price(m.pricing.input_usd_per_mtok, m.pricing.output_usd_per_mtok)
