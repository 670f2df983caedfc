"""Storage of a long conversation in the step ledger: content-addressed messages
(what OAO stores) against whole requests (the naive ledger), measured in the same run.

A node makes N model calls over one growing conversation (~2 KB per user message, every
call resends the history: ``bench.agents:long_conversation``). After the run, the bytes
Redis uses for the run's step ledger and message store (``MEMORY USAGE``) are compared
with the same ledger holding each request whole (written to a scratch hash in the same
server). The naive size grows as N², OAO's as N: the script prints both for several N
and the ratio.

    python -m bench.ledger_growth [--calls 25,50,100] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from redis.asyncio import Redis  # noqa: E402

from bench._common import emit, format_table  # noqa: E402
from oao import Orchestrator  # noqa: E402
from oao_common.hashing import canonical_json  # noqa: E402
from oao_common.keys import Keys  # noqa: E402
from oao_common.ledger import resolve_request  # noqa: E402
from oao_common.spec import parse_spec  # noqa: E402

SPEC = """
name: long-conversation
models:
  m: {provider: scripted, replies: ["A reply of about forty characters, ok."]}
agents:
  talker: {kind: python, entrypoint: "bench.agents:long_conversation"}
nodes:
  - {id: talk, agent: talker, task: "{{ inputs.calls }}", policy: {max_steps: 1000, max_tokens: 100000000}}
"""


async def memory(r: Redis, key: str) -> int:
    return int(await r.memory_usage(key, samples=0) or 0)


async def measure(calls: int) -> dict[str, Any]:
    spec = parse_spec(SPEC, "bench")
    async with Orchestrator(workers=1) as orch:
        report = await orch.run_spec_async(spec, inputs={"calls": calls}, timeout_s=300)
        assert report.status == "SUCCEEDED", report.status
        r = Redis.from_url(orch.url, decode_responses=True)
        keys = Keys(orch.prefix)
        rid = report.execution_id
        steps = await r.hgetall(keys.steps(rid))
        messages = await r.hgetall(keys.messages(rid))
        oao_bytes = await memory(r, keys.steps(rid)) + await memory(r, keys.messages(rid))
        naive_key = f"{orch.prefix}:bench:naive"
        records = {int(f.split(":")[1]): json.loads(raw) for f, raw in steps.items() if f.count(":") == 1}
        for seq, rec in records.items():  # the same records, each request whole
            whole = {**rec, "request": resolve_request(rec["request"], messages, records)}
            await r.hset(naive_key, f"talk:{seq}", canonical_json(whole))
        naive_bytes = await memory(r, naive_key)
        await r.aclose()
    return {
        "calls": calls,
        "messages_stored": len(messages),
        "oao_bytes": oao_bytes,
        "naive_bytes": naive_bytes,
        "oao_bytes_per_call": round(oao_bytes / calls),
        "naive_over_oao": round(naive_bytes / oao_bytes, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", default="25,50,100", help="comma-separated call counts (default 25,50,100)")
    p.add_argument("--json", action="store_true", help="print JSON")
    args = p.parse_args(argv)
    rows = [asyncio.run(measure(int(n))) for n in args.calls.split(",")]
    text = format_table(
        ["calls", "messages stored", "OAO bytes", "naive bytes", "OAO bytes/call", "naive / OAO"],
        [
            [
                r["calls"],
                r["messages_stored"],
                r["oao_bytes"],
                r["naive_bytes"],
                r["oao_bytes_per_call"],
                f"{r['naive_over_oao']}x",
            ]
            for r in rows
        ],
    )
    emit(args.json, {"benchmark": "ledger_growth", "results": rows}, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
