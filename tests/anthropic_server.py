"""A small, real server speaking Anthropic's Messages API wire format, for tests (stdlib only).

It listens on ``127.0.0.1`` (an ephemeral port), speaks HTTP/1.1 with keep-alive and
answers ``POST /v1/messages`` from a queue of scripted replies, in order::

    with AnthropicStubServer() as server:
        server.reply_text("Hello", usage=(12, 3), cache=(100, 40))
        server.reply_tool_use([("toolu_1", "search", {"q": "x"})])
        server.reply_error(529, "Overloaded", error_type="overloaded_error", retry_after="2")
        ... point anthropic.AsyncAnthropic(base_url=server.base_url) at it ...

A request with ``"stream": true`` gets Server-Sent Events as the API sends them
(``event: <type>`` and ``data: {...}``): ``message_start`` (with the input usage),
``content_block_start`` / ``content_block_delta`` (``text_delta``, ``input_json_delta``)
/ ``content_block_stop`` per block, ``ping``, ``message_delta`` (stop reason, output
usage), ``message_stop``. Other requests get one ``message`` object. With nothing
queued the server answers 500.
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

DEFAULT_MODEL = "claude-stub-0001"


@dataclass
class Received:
    """One request: path, headers (lower-cased names), JSON body."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class StubReply:
    """One scripted answer; ``status`` other than 200 makes it an error reply.

    ``usage`` is ``(input_tokens, output_tokens)`` (rough figures when ``None``);
    ``cache`` is ``(cache_creation_input_tokens, cache_read_input_tokens)``.
    ``chunk_delay_s`` sleeps before each text delta. ``drop_after`` cuts the connection
    after that many text deltas; ``end_after`` ends the body cleanly after that many,
    without ``message_stop``; ``error_after`` sends an ``error`` event (``error_type``,
    ``error_message``) after that many.
    """

    text: str = ""
    tool_uses: list[tuple[str, str, str]] = field(default_factory=list)
    usage: tuple[int, int] | None = None
    cache: tuple[int, int] = (0, 0)
    model: str = DEFAULT_MODEL
    stop_reason: str | None = None
    chunk_delay_s: float = 0.0
    drop_after: int | None = None
    end_after: int | None = None
    error_after: int | None = None
    status: int = 200
    error_type: str = "invalid_request_error"
    error_message: str = ""
    retry_after: str | None = None
    echo_key: bool = False

    def pieces(self) -> list[str]:
        return re.findall(r"\s*\S+\s*", self.text) or ([self.text] if self.text else [])

    def usage_dict(self, body: dict[str, Any], final: bool) -> dict[str, Any]:
        if self.usage is not None:
            inp, out = self.usage
        else:
            inp = max(1, len(json.dumps(body.get("messages", []))) // 4)
            out = max(1, len(self.text) // 4) + sum(len(a) // 4 for _, _, a in self.tool_uses)
        return {
            "input_tokens": inp,
            "output_tokens": out if final else 1,
            "cache_creation_input_tokens": self.cache[0],
            "cache_read_input_tokens": self.cache[1],
        }

    def final_stop(self) -> str:
        return self.stop_reason or ("tool_use" if self.tool_uses else "end_turn")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    stub: AnthropicStubServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

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

    def _event(self, kind: str, obj: dict[str, Any]) -> None:
        self._write_chunk(f"event: {kind}\ndata: {json.dumps({'type': kind, **obj})}\n\n".encode())

    def do_POST(self) -> None:
        stub = self.server.stub
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            body = {"_raw": raw.decode(errors="replace")}
        headers = {k.lower(): v for k, v in self.headers.items()}
        stub._record(Received(self.path, headers, body))
        if self.path != "/v1/messages":
            self._send_json(404, _error("not_found_error", f"no route {self.path}"))
            return
        reply = stub._next_reply()
        if reply is None:
            self._send_json(500, _error("api_error", "stub server: no reply queued"))
            return
        if reply.status != 200:
            message = reply.error_message or f"stub error {reply.status}"
            if reply.echo_key:
                key = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ")
                message += f" invalid x-api-key: {key}"
            extra = {"retry-after": reply.retry_after} if reply.retry_after is not None else {}
            self._send_json(reply.status, _error(reply.error_type, message), extra)
        elif body.get("stream"):
            self._stream(reply, body)
        else:
            self._once(reply, body)

    def _message(
        self, reply: StubReply, body: dict[str, Any], content: list[Any], final: bool
    ) -> dict[str, Any]:
        return {
            "id": f"msg_stub_{self.server.stub._serial()}",
            "type": "message",
            "role": "assistant",
            "model": reply.model,
            "content": content,
            "stop_reason": reply.final_stop() if final else None,
            "stop_sequence": None,
            "usage": reply.usage_dict(body, final),
        }

    def _once(self, reply: StubReply, body: dict[str, Any]) -> None:
        content: list[dict[str, Any]] = []
        if reply.text:
            content.append({"type": "text", "text": reply.text})
        for i, n, a in reply.tool_uses:
            content.append({"type": "tool_use", "id": i, "name": n, "input": json.loads(a)})
        self._send_json(200, self._message(reply, body, content, final=True))

    def _stream(self, reply: StubReply, body: dict[str, Any]) -> None:
        stub = self.server.stub
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        sent = 0
        try:
            self._event("message_start", {"message": self._message(reply, body, [], final=False)})
            index = 0
            if reply.text:
                self._event(
                    "content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}
                )
                self._event("ping", {})
                for piece in reply.pieces():
                    if reply.drop_after is not None and sent >= reply.drop_after:
                        self.close_connection = True
                        return  # no terminating chunk: a cut body
                    if reply.end_after is not None and sent >= reply.end_after:
                        self._write_chunk(b"")  # a complete body without message_stop
                        return
                    if reply.error_after is not None and sent >= reply.error_after:
                        err = _error(reply.error_type, reply.error_message or "stub stream error")
                        self._write_chunk(f"event: error\ndata: {json.dumps(err)}\n\n".encode())
                        self._write_chunk(b"")
                        return
                    if reply.chunk_delay_s:
                        time.sleep(reply.chunk_delay_s)
                    self._event(
                        "content_block_delta",
                        {"index": 0, "delta": {"type": "text_delta", "text": piece}},
                    )
                    sent += 1
                    stub._count_chunk()
                self._event("content_block_stop", {"index": 0})
                index = 1
            for call_id, name, args in reply.tool_uses:
                self._event(
                    "content_block_start",
                    {
                        "index": index,
                        "content_block": {"type": "tool_use", "id": call_id, "name": name, "input": {}},
                    },
                )
                half = len(args) // 2
                for part in (args[:half], args[half:]):
                    self._event(
                        "content_block_delta",
                        {"index": index, "delta": {"type": "input_json_delta", "partial_json": part}},
                    )
                self._event("content_block_stop", {"index": index})
                index += 1
            final = reply.usage_dict(body, True)
            self._event(
                "message_delta",
                {
                    "delta": {"stop_reason": reply.final_stop(), "stop_sequence": None},
                    "usage": {"output_tokens": final["output_tokens"]},
                },
            )
            self._event("message_stop", {})
            self._write_chunk(b"")
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True
            stub._disconnected(sent)


def _error(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


class AnthropicStubServer:
    """The server in a background thread while used as a context manager.

    ``base_url`` is ``http://127.0.0.1:PORT`` (the SDK adds ``/v1/messages``);
    ``requests`` lists every :class:`Received`; ``chunks_sent`` counts text deltas
    written; ``disconnected_early`` counts streams the client closed before the end.
    """

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._replies: deque[StubReply] = deque()
        self.requests: list[Received] = []
        self.chunks_sent = 0
        self.disconnected_early = 0
        self._ids = 0
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> AnthropicStubServer:
        httpd = _Server(("127.0.0.1", 0), _Handler)
        httpd.stub = self
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="anthropic-stub", daemon=True
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
    def base_url(self) -> str:
        assert self._httpd is not None, "use the server as a context manager"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def queue(self, reply: StubReply) -> StubReply:
        with self._lock:
            self._replies.append(reply)
        return reply

    def reply_text(self, text: str, **kw: Any) -> StubReply:
        return self.queue(StubReply(text=text, **kw))

    def reply_tool_use(
        self, calls: list[tuple[str, str, dict[str, Any] | str]], text: str = "", **kw: Any
    ) -> StubReply:
        """Tool calls as ``(id, name, input)``; a ``str`` input is sent verbatim."""
        encoded = [(i, n, a if isinstance(a, str) else json.dumps(a)) for i, n, a in calls]
        return self.queue(StubReply(text=text, tool_uses=encoded, **kw))

    def reply_error(self, status: int, message: str = "", **kw: Any) -> StubReply:
        return self.queue(StubReply(status=status, error_message=message, **kw))

    def wait_for_disconnect(self, timeout: float = 5.0, count: int = 1) -> bool:
        with self._lock:
            return self._lock.wait_for(lambda: self.disconnected_early >= count, timeout)

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
            self._lock.notify_all()
