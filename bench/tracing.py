"""The cost of tracing: the same run with tracing off, on with a no-op exporter, and on
with OTLP/HTTP export to a receiver process on loopback.

Each measurement is a fresh Python process (tracing is set once per process) running
an in-process fleet (``oao.Orchestrator``, embedded Valkey, 1 worker, concurrency 8) on
a spec of ``--nodes`` python nodes of three steps each (``bench.agents:three_steps``:
a model call to the offline ``scripted`` model, no delay, a tool call, a model call),
so the run is dominated by OAO's own per-step work (ledger, governance, Redis round
trips) and tracing's share shows. Modes are run ``--repeat`` times, interleaved; the
table gives the median wall time of the run, steps per second, microseconds per step,
and the difference from "off" per step. ``--baseline PATH`` adds a mode ``baseline``:
the same run on the checkout at PATH (e.g. a worktree of the commit before tracing
existed), to show what "off" costs against no tracing code at all.

    python -m bench.tracing [--nodes 300] [--repeat 5] [--baseline PATH] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# the tree whose OAO is measured: this one, or --baseline's (set for the child process)
sys.path.insert(0, os.environ.get("OAO_BENCH_TREE") or str(ROOT))

from bench._common import emit, format_table  # noqa: E402

SPEC = """
name: tracing-cost
models:
  m: {provider: scripted, replies: ["a short reply"]}
tools:
  echo: {entrypoint: "bench.agents:echo", idempotent: true}
agents:
  caller: {kind: python, entrypoint: "bench.agents:three_steps", model: m, tools: [echo]}
defaults:
  policy: {max_steps: 100000, max_tokens: 1000000000}
nodes:
"""
MODES = ("off", "noop", "otlp")


STEPS_PER_NODE = 3


def spec_text(nodes: int) -> str:
    return SPEC + "".join(f"  - {{id: n{i}, agent: caller}}\n" for i in range(nodes))


async def measure(mode: str, nodes: int) -> dict[str, Any]:
    """One run in this process with tracing in ``mode``; the wall time of the run."""
    from oao import Orchestrator
    from oao_common.spec import parse_spec

    if mode in ("noop", "otlp"):
        from oao_common import tracing
    if mode == "noop":
        from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

        class NoOp(SpanExporter):
            def export(self, spans: Any) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        tracing.configure_tracing("bench", exporter=NoOp())
    elif mode == "otlp":
        assert tracing.configure_tracing("bench"), "OTEL_EXPORTER_OTLP_ENDPOINT is not set"
    spec = parse_spec(spec_text(nodes), "bench")
    async with Orchestrator(workers=1, concurrency=8) as orch:
        await orch.run_spec_async(parse_spec(spec_text(2), "warm-up"), timeout_s=120)
        t0 = time.perf_counter()
        report = await orch.run_spec_async(spec, timeout_s=600)
        took = time.perf_counter() - t0
    assert report.status == "SUCCEEDED", report.status
    if mode in ("noop", "otlp"):
        tracing.shutdown()  # exports what is buffered (not timed)
    import oao_common

    tree = str(Path(oao_common.__file__).resolve().parent.parent)
    return {"mode": mode, "seconds": took, "steps": nodes * STEPS_PER_NODE, "tree": tree}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def receiver_main(port: int) -> None:
    """An OTLP/HTTP receiver that decodes and counts spans (the tests' receiver)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from otlp_receiver import Receiver

    rec = Receiver(port=port).start()
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        rec.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--baseline", type=Path, help="a checkout to measure without this tree's tracing code")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--one", choices=(*MODES, "baseline"), help=argparse.SUPPRESS)
    ap.add_argument("--receiver", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.receiver:
        receiver_main(args.receiver)
        return
    if args.one:
        print(json.dumps(asyncio.run(measure("off" if args.one == "baseline" else args.one, args.nodes))))
        return
    port = _free_port()
    recv = subprocess.Popen([sys.executable, "-m", "bench.tracing", "--receiver", str(port)], cwd=ROOT)
    modes = (*MODES, "baseline") if args.baseline else MODES
    results: dict[str, list[float]] = {m: [] for m in modes}
    try:
        for _ in range(args.repeat):
            for mode in modes:
                env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
                if mode == "otlp":
                    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{port}"
                root = args.baseline.resolve() if mode == "baseline" else ROOT
                env["OAO_BENCH_TREE"] = str(root)
                out = subprocess.run(
                    [
                        sys.executable,
                        str(ROOT / "bench" / "tracing.py"),
                        "--one",
                        mode,
                        "--nodes",
                        str(args.nodes),
                    ],
                    cwd=root,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=900,
                    check=True,
                )
                got = json.loads(out.stdout.strip().splitlines()[-1])
                assert got["tree"] == str(root), f"measured {got['tree']}, not {root}"
                results[mode].append(got["seconds"])
    finally:
        recv.terminate()
        recv.wait(10)
    steps = args.nodes * STEPS_PER_NODE
    base = statistics.median(results["off"])
    rows = []
    for mode in modes:
        med = statistics.median(results[mode])
        rows.append(
            {
                "mode": mode,
                "run_s": round(med, 3),
                "steps_per_s": round(steps / med, 1),
                "us_per_step": round(med / steps * 1e6, 1),
                "overhead_us_per_step": round((med - base) / steps * 1e6, 1),
                "runs": [round(x, 3) for x in results[mode]],
            }
        )
    cols = ["mode", "run_s", "steps_per_s", "us_per_step", "overhead_us_per_step"]
    emit(
        args.json,
        {"nodes": args.nodes, "steps_per_node": STEPS_PER_NODE, "repeat": args.repeat, "results": rows},
        format_table(cols, [[r[c] for c in cols] for r in rows]),
    )


if __name__ == "__main__":
    main()
