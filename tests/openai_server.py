"""A small, real OpenAI-compatible HTTP server for tests (stdlib only).

It listens on ``127.0.0.1`` (an ephemeral port), speaks HTTP/1.1 with keep-alive, and
answers ``POST /v1/chat/completions`` (and ``/chat/completions``) from a queue of
scripted replies, in the order they were queued::

    with OpenAIStubServer() as server:
        server.reply_text("Hello there", usage=(12, 3))
        server.reply_tool_calls([("call_1", "search", {"q": "x"})])
        server.reply_error(429, retry_after="2")
        server.reply_slow_stream(n_chunks=50, delay_s=0.02)
        ... point a client at server.base_url ...
        server.requests[0].body["messages"]

A request with ``"stream": true`` gets a Server-Sent Events stream of
``chat.completion.chunk`` objects (``data: {...}\\n\\n`` lines, then ``data: [DONE]``),
with a final usage chunk (empty ``choices``) when ``stream_options.include_usage`` is
true. Other requests get one ``chat.completion`` object with ``usage``. With nothing
queued the server answers 500 so a test notices.

When the client goes away before a stream's ``[DONE]`` was written, the write fails
and :attr:`OpenAIStubServer.disconnected_early` is incremented
(:meth:`OpenAIStubServer.wait_for_disconnect` waits for it).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PATHS = ("/v1/chat/completions", "/chat/completions")
DEFAULT_MODEL = "stub-model-0001"


@dataclass
class Received:
    """One request the server got: its path, headers (lower-cased names) and JSON body."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class StubReply:
    """One scripted answer. ``status`` other than 200 makes it an error reply.

    ``chunks`` splits ``content`` into that many streamed pieces (default: one per
    word); ``chunk_delay_s`` sleeps before each streamed chunk, ``first_delay_s``
    before the response headers; ``drop_after`` cuts the connection (no ``[DONE]``)
    after that many content chunks; ``end_after`` ends the body cleanly after that many
    content chunks, without a finish reason or ``[DONE]`` (a server that gave up);
    ``error_after`` sends an error event (``data: {"error": {...}}``, as LiteLLM and
    llama.cpp do) with ``error_message`` after that many content chunks;
    ``error_body`` replaces an error reply's JSON body and ``headers`` adds response
    headers to it; ``usage`` is ``(prompt_tokens,
    completion_tokens)``, computed roughly when ``None``; ``omit_usage`` leaves usage
    out (as servers without ``stream_options`` support do).
    """

    content: str = ""
    tool_calls: list[tuple[str, str, str]] = field(default_factory=list)
    chunks: int | None = None
    chunk_delay_s: float = 0.0
    first_delay_s: float = 0.0
    drop_after: int | None = None
    end_after: int | None = None
    error_after: int | None = None
    error_body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    usage: tuple[int, int] | None = None
    omit_usage: bool = False
    model: str = DEFAULT_MODEL
    finish_reason: str | None = None
    status: int = 200
    error_message: str = ""
    error_type: str = "invalid_request_error"
    retry_after: str | None = None
    echo_key: bool = False

    def pieces(self) -> list[str]:
        if not self.content:
            return []
        if self.chunks is None:
            return re.findall(r"\s*\S+\s*", self.content) or [self.content]
        n = max(1, self.chunks)
        size = -(-len(self.content) // n)
        return [self.content[i : i + size] for i in range(0, len(self.content), size)]

    def usage_for(self, body: dict[str, Any]) -> dict[str, int]:
        if self.usage is not None:
            prompt, completion = self.usage
        else:
            prompt = max(1, len(json.dumps(body.get("messages", []))) // 4)
            completion = max(1, len(self.content) // 4) + sum(len(a) // 4 for _, _, a in self.tool_calls)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def final_reason(self) -> str:
        return self.finish_reason or ("tool_calls" if self.tool_calls else "stop")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    stub: OpenAIStubServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # idle keep-alive connections end on their own
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # ------------------------------------------------------------------ plumbing
    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _event(self, obj: Any) -> None:
        payload = obj if isinstance(obj, str) else json.dumps(obj)
        self._write_chunk(f"data: {payload}\n\n".encode())

    # ------------------------------------------------------------------ requests
    def do_POST(self) -> None:
        stub = self.server.stub
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            body = {"_raw": raw.decode(errors="replace")}
        headers = {k.lower(): v for k, v in self.headers.items()}
        stub._record(Received(self.path, headers, body))
        if self.path not in PATHS:
            self._send_json(
                404,
                {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}},
            )
            return
        reply = stub._next_reply()
        if reply is None:
            self._send_json(
                500, {"error": {"message": "stub server: no reply queued", "type": "server_error"}}
            )
            return
        if reply.first_delay_s:
            time.sleep(reply.first_delay_s)
        if reply.status != 200:
            self._error(reply, headers)
        elif body.get("stream"):
            self._stream(reply, body)
        else:
            self._once(reply, body)

    def _error(self, reply: StubReply, headers: dict[str, str]) -> None:
        message = reply.error_message or f"stub error {reply.status}"
        if reply.echo_key:
            token = headers.get("authorization", "").removeprefix("Bearer ")
            message += f" Incorrect API key provided: {token}."
        extra = {"Retry-After": reply.retry_after} if reply.retry_after is not None else {}
        extra.update(reply.headers)
        err_type = "server_error" if reply.status >= 500 else reply.error_type
        body = reply.error_body
        if body is None:
            body = {"error": {"message": message, "type": err_type, "param": None, "code": None}}
        self._send_json(reply.status, body, extra)

    def _once(self, reply: StubReply, body: dict[str, Any]) -> None:
        if reply.drop_after is not None:
            self.close_connection = True
            return  # the request was read; the connection closes with no response
        message: dict[str, Any] = {
            "role": "assistant",
            "content": reply.content or None,
            "refusal": None,
        }
        if reply.tool_calls:
            message["tool_calls"] = [
                {"id": i, "type": "function", "function": {"name": n, "arguments": a}}
                for i, n, a in reply.tool_calls
            ]
        self._send_json(
            200,
            {
                "id": f"chatcmpl-stub-{self.server.stub._serial()}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": reply.model,
                "system_fingerprint": None,
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "logprobs": None,
                        "finish_reason": reply.final_reason(),
                    }
                ],
                "usage": None if reply.omit_usage else reply.usage_for(body),
            },
        )

    def _stream(self, reply: StubReply, body: dict[str, Any]) -> None:
        stub = self.server.stub
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        cid = f"chatcmpl-stub-{stub._serial()}"
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            c: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": reply.model,
                "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }
            if include_usage:
                c["usage"] = None
            return c

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        sent = 0
        try:
            self._event(chunk({"role": "assistant", "content": ""}))
            for piece in reply.pieces():
                if reply.drop_after is not None and sent >= reply.drop_after:
                    self.close_connection = True
                    return  # no terminating chunk: the client sees a cut body
                if reply.error_after is not None and sent >= reply.error_after:
                    self._event({"error": {"message": reply.error_message, "type": "server_error"}})
                    self._write_chunk(b"")
                    return
                if reply.end_after is not None and sent >= reply.end_after:
                    self._write_chunk(b"")  # a complete HTTP body, but no finish nor [DONE]
                    return
                if reply.chunk_delay_s:
                    time.sleep(reply.chunk_delay_s)
                self._event(chunk({"content": piece}))
                sent += 1
                stub._count_chunk()
            for index, (call_id, name, args) in enumerate(reply.tool_calls):
                self._event(
                    chunk(
                        {
                            "tool_calls": [
                                {
                                    "index": index,
                                    "id": call_id,
                                    "type": "function",
                                    "function": {"name": name, "arguments": ""},
                                }
                            ]
                        }
                    )
                )
                half = len(args) // 2
                for part in (args[:half], args[half:]):
                    if part:
                        self._event(
                            chunk({"tool_calls": [{"index": index, "function": {"arguments": part}}]})
                        )
            self._event(chunk({}, reply.final_reason()))
            if include_usage and not reply.omit_usage:
                self._event(
                    {
                        "id": cid,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": reply.model,
                        "system_fingerprint": None,
                        "choices": [],
                        "usage": reply.usage_for(body),
                    }
                )
            self._event("[DONE]")
            self._write_chunk(b"")
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True
            stub._disconnected(sent)


class OpenAIStubServer:
    """The server, run in a background thread while used as a context manager.

    ``base_url`` is ``http://127.0.0.1:PORT/v1``; ``requests`` lists every
    :class:`Received` request; ``chunks_sent`` counts streamed content chunks written;
    ``disconnected_early`` counts streams the client closed before ``[DONE]``.
    """

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._replies: deque[StubReply] = deque()
        self.requests: list[Received] = []
        self.chunks_sent = 0
        self.disconnected_early = 0
        self.chunks_before_disconnect: list[int] = []
        self._ids = 0
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> OpenAIStubServer:
        httpd = _Server(("127.0.0.1", 0), _Handler)
        httpd.stub = self
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="openai-stub",
            daemon=True,
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def port(self) -> int:
        assert self._httpd is not None, "use the server as a context manager"
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # ------------------------------------------------------------------ scripting
    def queue(self, reply: StubReply) -> StubReply:
        """Queue any :class:`StubReply`; returns it."""
        with self._lock:
            self._replies.append(reply)
        return reply

    def reply_text(self, content: str, **kw: Any) -> StubReply:
        """A plain text reply; ``kw`` sets other :class:`StubReply` fields."""
        return self.queue(StubReply(content=content, **kw))

    def reply_tool_calls(
        self, calls: list[tuple[str, str, dict[str, Any] | str]], content: str = "", **kw: Any
    ) -> StubReply:
        """Tool calls given as ``(id, name, args)``; a ``str`` args is sent verbatim
        (to send invalid JSON), a dict is JSON-encoded."""
        encoded = [(i, n, a if isinstance(a, str) else json.dumps(a)) for i, n, a in calls]
        return self.queue(StubReply(content=content, tool_calls=encoded, **kw))

    def reply_error(
        self, status: int, message: str = "", retry_after: str | None = None, **kw: Any
    ) -> StubReply:
        """An HTTP error with an OpenAI error body and an optional ``Retry-After``."""
        return self.queue(StubReply(status=status, error_message=message, retry_after=retry_after, **kw))

    def reply_slow_stream(self, n_chunks: int, delay_s: float, piece: str = "word ", **kw: Any) -> StubReply:
        """``n_chunks`` content chunks of ``piece`` each, ``delay_s`` seconds apart."""
        return self.queue(StubReply(content=piece * n_chunks, chunks=n_chunks, chunk_delay_s=delay_s, **kw))

    def wait_for_disconnect(self, timeout: float = 5.0, count: int = 1) -> bool:
        """Block until ``disconnected_early >= count``; False on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: self.disconnected_early >= count, timeout)

    # ------------------------------------------------------------------ handler side
    def _record(self, received: Received) -> None:
        with self._lock:
            self.requests.append(received)

    def _next_reply(self) -> StubReply | None:
        with self._lock:
            return self._replies.popleft() if self._replies else None

    def _serial(self) -> int:
        with self._lock:
            self._ids += 1
            return self._ids

    def _count_chunk(self) -> None:
        with self._lock:
            self.chunks_sent += 1

    def _disconnected(self, sent: int) -> None:
        with self._lock:
            self.disconnected_early += 1
            self.chunks_before_disconnect.append(sent)
            self._lock.notify_all()
