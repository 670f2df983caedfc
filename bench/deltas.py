"""Deltas: what publishing a streaming model's text live costs, per model call.

``--nodes`` independent nodes each make one ``ctx.llm`` call (``bench.agents:wait_once``)
on a scripted model that streams a ``--chars`` reply in chunks of ``--chunk-tokens``
tokens (4 characters each), ``--chunk-delay`` seconds apart, like a model API streaming
tokens. All run at once in ONE real ``oao-worker`` process (``--concurrency`` = nodes),
in three modes, each with its own worker:

* ``off``: ``oao-worker --no-model-deltas``, the baseline measured in the same run;
* ``idle``: deltas on (the default), nobody subscribed to the run's delta channel;
* ``watched``: deltas on, and this harness subscribed to the channel (as the HTTP API
  is for an SSE client) before the run is submitted, counting what it receives.

Measured per run: the worker's CPU seconds (psutil) and the server's (``INFO cpu``), and
the ``PUBLISH`` and ``PUBSUB NUMSUB`` calls (``INFO commandstats``); reported per model
call, with the difference to ``off``. Modes take turns within each repetition, so
machine load drifts hit all three alike; medians over ``--repeat``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import time
from typing import Any

from bench._common import (
    TERMINAL_RUN_STATES,
    ProcessGroup,
    RedisTarget,
    add_common_args,
    check_idle,
    emit,
    format_machine,
    format_table,
    install_signal_exit,
    log,
    machine_info,
    measured,
    median,
    oao_worker_argv,
    wait_until,
)

MODES = ("off", "idle", "watched")


def build_spec(n: int, chars: int, chunk_tokens: int, delay_s: float) -> Any:
    """``n`` independent nodes, each one model call streaming a ``chars``-long reply."""
    from oao_common.spec import Spec

    reply = ("streamed text " * (chars // 14 + 1))[:chars]
    model = {"provider": "scripted", "replies": [reply], "chunk_tokens": chunk_tokens}
    model["stream_delay_s"] = delay_s
    return Spec.model_validate(
        {
            "name": f"bench-deltas-{n}",
            "models": {"streamer": model},
            "agents": {
                "caller": {"kind": "python", "entrypoint": "bench.agents:wait_once", "model": "streamer"}
            },
            "nodes": [{"id": f"n{i:04d}", "agent": "caller"} for i in range(n)],
        }
    )


def command_calls(target: RedisTarget) -> dict[str, int]:
    """Calls so far of the commands deltas use (``INFO commandstats``)."""
    stats = target.r.info("commandstats")
    return {
        "publish": int(stats.get("cmdstat_publish", {}).get("calls", 0)),
        "numsub": int(stats.get("cmdstat_pubsub|numsub", {}).get("calls", 0)),
    }


async def run_once(url: str, prefix: str, spec: Any, watch: bool, timeout_s: float) -> dict[str, Any]:
    """Submit ``spec`` (subscribed to its delta channel first when ``watch``) and wait
    until it is SUCCEEDED; returns wall seconds and what the subscriber received."""
    from oao_common.broker import Broker, new_run_id
    from oao_common.connection import connect
    from oao_scheduler.submit import submit_spec

    r: Any = connect(url)
    broker = Broker(r, prefix)
    rid = new_run_id()
    got = {"messages": 0, "chars": 0}
    pubsub = r.pubsub()
    reader: asyncio.Task[None] | None = None

    async def read() -> None:
        while True:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if msg is not None and msg["type"] == "message":
                got["messages"] += 1
                got["chars"] += len(json.loads(msg["data"])["text"])

    try:
        if watch:
            await pubsub.subscribe(broker.keys.deltas_channel(rid))
            reader = asyncio.create_task(read())
        t0 = time.perf_counter()
        await submit_spec(broker, spec, run_id=rid)
        key = broker.keys.run(rid)
        while (status := await r.hget(key, "status")) not in TERMINAL_RUN_STATES:
            if time.perf_counter() - t0 > timeout_s:
                raise TimeoutError(f"run {rid} still {status} after {timeout_s}s")
            await asyncio.sleep(0.005)
        wall = time.perf_counter() - t0
        if status != "SUCCEEDED":
            raise RuntimeError(f"run {rid} ended {status}")
        if reader is not None:
            await asyncio.sleep(0.1)  # messages still on the wire (counted, not timed)
            reader.cancel()
        return {"wall_s": wall, **got}
    finally:
        if reader is not None:
            reader.cancel()
        await pubsub.aclose()
        await r.aclose()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.deltas",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_args(p)
    p.add_argument("--nodes", type=int, default=None, help="model calls per run (default 200; --quick 50)")
    p.add_argument("--chars", type=int, default=2000, help="characters of each reply (default 2000)")
    p.add_argument("--chunk-tokens", type=int, default=4, help="tokens per streamed chunk (default 4)")
    p.add_argument("--chunk-delay", type=float, default=0.004, help="seconds between chunks (default 0.004)")
    p.add_argument("--repeat", type=int, default=None, help="runs per mode, medians (default 5; --quick 1)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a run fails")
    args = p.parse_args(argv)
    if args.nodes is None:
        args.nodes = 50 if args.quick else 200
    if args.repeat is None:
        args.repeat = 1 if args.quick else 5
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_signal_exit()
    spec = build_spec(args.nodes, args.chars, args.chunk_tokens, args.chunk_delay)
    chunks = -(-args.chars // (args.chunk_tokens * 4))
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    with RedisTarget(args.redis_url, args.embedded) as target, ProcessGroup(args.keep_logs) as procs:
        info = machine_info(target)
        info["busy_before_pct"] = check_idle()
        log(format_machine(info))
        workers: dict[str, Any] = {}
        prefixes: dict[str, str] = {}
        for mode in MODES:
            from oao_common.keys import Keys

            prefix = prefixes[mode] = f"oaobench-{mode}-{secrets.token_hex(3)}"
            argv_ = oao_worker_argv(target.url, prefix, args.nodes, "warning")
            if mode == "off":
                argv_.append("--no-model-deltas")
            workers[mode] = procs.start(f"oao-worker-{mode}", argv_)
            wait_until(
                lambda prefix=prefix: target.r.zcard(Keys(prefix).workers) >= 1,
                f"the {mode} worker to register",
                timeout_s=60,
                check=lambda mode=mode: procs.check_alive([workers[mode]]),
            )
            warm = build_spec(10, args.chars, args.chunk_tokens, args.chunk_delay)
            asyncio.run(run_once(target.url, prefix, warm, mode == "watched", args.timeout))
        for rep in range(args.repeat):
            for mode in MODES:
                pid = workers[mode].pid

                def body(mode: str = mode) -> dict[str, Any]:
                    c0 = command_calls(target)
                    watch = mode == "watched"
                    m = asyncio.run(run_once(target.url, prefixes[mode], spec, watch, args.timeout))
                    c1 = command_calls(target)
                    return {**m, **{k: c1[k] - c0[k] for k in c0}}

                m, load = measured(body, target, [pid], args, f"{mode} run {rep}")
                m.update(worker_cpu_s=load.workers_s, server_cpu_s=load.server_s, other_pct=load.other_pct)
                runs[mode].append(m)
                log(
                    f"{mode} run {rep}: {args.nodes} calls in {m['wall_s']:.3f}s, worker CPU "
                    f"{m['worker_cpu_s']:.3f}s, server CPU {m['server_cpu_s']:.3f}s, "
                    f"PUBLISH {m['publish']}, NUMSUB {m['numsub']}, received {m['messages']}; "
                    f"other load {m['other_pct']:.0f}%"
                )
        procs.stop_all(list(workers.values()))

    n = args.nodes
    summary: dict[str, dict[str, float]] = {}
    for mode in MODES:
        rs = runs[mode]
        summary[mode] = {
            "wall_s": median([r["wall_s"] for r in rs]),
            "worker_cpu_ms_per_call": 1000 * median([r["worker_cpu_s"] for r in rs]) / n,
            "server_cpu_ms_per_call": 1000 * median([r["server_cpu_s"] for r in rs]) / n,
            "publish_per_call": median([r["publish"] for r in rs]) / n,
            "numsub_per_run": median([r["numsub"] for r in rs]),
            "received_per_call": median([r["messages"] for r in rs]) / n,
            "received_chars_per_call": median([r["chars"] for r in rs]) / n,
        }
    base = summary["off"]
    headers = ["mode", "wall s", "worker CPU ms/call", "vs off", "server CPU ms/call", "vs off",
               "PUBLISH/call", "NUMSUB/run", "received msgs/call", "received chars/call"]  # fmt: skip
    rows = [
        [
            mode,
            s["wall_s"],
            s["worker_cpu_ms_per_call"],
            f"{s['worker_cpu_ms_per_call'] - base['worker_cpu_ms_per_call']:+.3f}",
            s["server_cpu_ms_per_call"],
            f"{s['server_cpu_ms_per_call'] - base['server_cpu_ms_per_call']:+.3f}",
            s["publish_per_call"],
            s["numsub_per_run"],
            s["received_per_call"],
            s["received_chars_per_call"],
        ]
        for mode, s in summary.items()
    ]
    text = "\n".join(
        [
            format_machine(info),
            f"config: {n} calls at once in one worker, each {args.chars} chars in {chunks} chunks of "
            f"{args.chunk_tokens} tokens, {args.chunk_delay * 1000:g} ms apart; "
            f"repeat={args.repeat} (medians)",
            "",
            format_table(headers, rows),
        ]
    )
    document = {
        "benchmark": "deltas",
        "machine": info,
        "config": {k: getattr(args, k) for k in ("nodes", "chars", "chunk_tokens", "chunk_delay", "repeat")},
        "summary": summary,
        "runs": runs,
    }
    emit(args.json, document, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
