"""Soak: does Redis memory stay bounded under a steady stream of runs with retention?

Two phases on one Redis (a private embedded Valkey unless ``--redis-url``):

1. **Bytes per finished run.** ``--layout-runs`` runs of ``examples/blog_post.yaml``
   (each with its own ``inputs.topic``) are run to the end on ``--workers`` real
   ``oao-worker`` processes, and every key of each finished run is measured with
   ``MEMORY USAGE … SAMPLES 0``. The old layout (the full spec JSON in every run hash)
   is measured on the same runs by writing that field back into each run hash,
   measuring the hash, and removing it again. The stored spec shared by all runs
   (``<p>:spec:<hash>``) is measured once.
2. **Soak.** ``oao-scheduler serve --retention`` (default 20 s) runs with the workers
   while runs are submitted at ``--rate`` runs/s for ``--minutes``. ``INFO memory``
   ``used_memory`` is sampled every ``--sample-every`` seconds. The verdict compares
   the mean of the last third of the samples with the mean of the middle third: a
   plateau when the last third is at most ``--tolerance`` (5%) above the middle third.
   The baseline is what the same finished runs would hold without retention in the old
   layout: used_memory before the soak + finished runs x old bytes per run.

    python bench/soak.py                        # 5 minutes, retention 20 s, 5 runs/s
    python bench/soak.py --minutes 1            # a quick check
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script too

from bench.harness import ROOT, bench_redis, oao_process, stop_all, wait_for_workers
from oao_common.broker import Broker
from oao_common.hashing import canonical_json
from oao_common.spec import Spec, apply_inputs, load_spec
from oao_common.states import TERMINAL_RUN_STATES
from oao_common.stored_spec import split_spec
from oao_scheduler.durations import parse_duration
from oao_scheduler.prune import measure_runs, run_keys
from oao_scheduler.submit import submit_spec

SPEC = ROOT / "examples" / "blog_post.yaml"


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def spec_for(base: Spec, i: int) -> Spec:
    """The blog post of run ``i``: the same workflow, its own topic."""
    return apply_inputs(base, {"topic": f"AI governance {i}"})


async def used_memory(broker: Broker) -> int:
    return int((await broker.redis.info("memory"))["used_memory"])


async def statuses(broker: Broker, rids: list[str]) -> list[str | None]:
    async with broker.redis.pipeline(transaction=False) as p:
        for rid in rids:
            p.hget(broker.keys.run(rid), "status")
        return list(await p.execute())


async def wait_finished(broker: Broker, rids: list[str], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        st = await statuses(broker, rids)
        if all(s in TERMINAL_RUN_STATES for s in st):
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"runs not finished after {timeout_s}s: {st}")
        await asyncio.sleep(0.1)


async def bytes_per_run(broker: Broker, base: Spec, n: int) -> dict[str, Any]:
    """Phase 1: run ``n`` blog posts, measure them in the new and the old layout, then
    delete them."""
    rids = [(await submit_spec(broker, spec_for(base, i))).run_id for i in range(n)]
    await wait_finished(broker, rids)
    spec_hash = split_spec(base)[0]
    spec_key_bytes = int(await broker.redis.memory_usage(broker.keys.spec(spec_hash), samples=0) or 0)
    kinds: dict[str, list[int]] = {"run hash": [], "node hashes": [], "events stream": [], "steps hash": []}
    new_total, old_total, old_run_hash = [], [], []
    for i, rid in enumerate(rids):
        keys = await run_keys(broker, rid)
        sizes = [await broker.redis.memory_usage(k, samples=0) for k in keys]
        by_key = dict(zip(keys, sizes, strict=True))
        run_b = int(by_key[broker.keys.run(rid)] or 0)
        kinds["run hash"].append(run_b)
        kinds["events stream"].append(int(by_key[broker.keys.events(rid)] or 0))
        kinds["steps hash"].append(int(by_key[broker.keys.steps(rid)] or 0))
        kinds["node hashes"].append(sum(int(v or 0) for k, v in by_key.items() if ":node:" in k))
        total, _ = await measure_runs(broker, [rid])
        new_total.append(total)
        # the old layout: the whole spec (inputs included) in the run hash
        full = canonical_json(spec_for(base, i).model_dump(mode="json"))
        await broker.redis.hset(broker.keys.run(rid), "spec", full)
        old_b = int(await broker.redis.memory_usage(broker.keys.run(rid), samples=0) or 0)
        await broker.redis.hdel(broker.keys.run(rid), "spec")
        old_run_hash.append(old_b)
        old_total.append(total - run_b + old_b)
    pruned = await broker.prune_runs(await broker.server_time_ms(), most=n, run_ids=rids)
    assert pruned.runs == n, pruned
    mean = statistics.mean
    return {
        "runs": n,
        "new_bytes_per_run": round(mean(new_total)),
        "old_bytes_per_run": round(mean(old_total)),
        "spec_key_bytes": spec_key_bytes,
        "spec_json_chars": len(canonical_json(base.model_dump(mode="json"))),
        "by_key": {k: round(mean(v)) for k, v in kinds.items()},
        "old_run_hash_bytes": round(mean(old_run_hash)),
    }


async def soak(broker: Broker, base: Spec, a: argparse.Namespace, url: str) -> dict[str, Any]:
    """Phase 2: steady submissions with ``serve --retention`` running; samples."""
    serve = oao_process(
        "serve", url, broker, "--retention", a.retention, env={"OAO_LOG_LEVEL": "warning"}, log=a.log
    )
    samples: list[dict[str, Any]] = []
    inflight: list[str] = []
    counts = {"submitted": 0, "finished": 0, "skipped": 0}
    t0 = time.monotonic()
    end = t0 + a.minutes * 60
    try:
        await asyncio.sleep(1.0)  # serve connects
        baseline = await used_memory(broker)

        async def submitter() -> None:
            i = 0
            next_at = time.monotonic()
            while time.monotonic() < end:
                if len(inflight) < a.max_inflight:
                    inflight.append((await submit_spec(broker, spec_for(base, i))).run_id)
                    counts["submitted"] += 1
                else:
                    counts["skipped"] += 1
                i += 1
                next_at += 1.0 / a.rate
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))

        async def tracker() -> None:
            while time.monotonic() < end or inflight:
                if inflight:
                    snapshot = list(inflight)
                    for rid, st in zip(snapshot, await statuses(broker, snapshot), strict=True):
                        if st is None or st in TERMINAL_RUN_STATES:  # None: already pruned
                            inflight.remove(rid)
                            counts["finished"] += 1
                if time.monotonic() > end + 60:
                    break
                await asyncio.sleep(0.2)

        async def sampler() -> None:
            while time.monotonic() < end:
                samples.append(
                    {
                        "t_s": round(time.monotonic() - t0, 1),
                        "used_memory": await used_memory(broker),
                        "runs_in_redis": int(await broker.redis.zcard(broker.keys.runs)),
                        "finished": counts["finished"],
                        "in_flight": len(inflight),
                    }
                )
                s = samples[-1]
                log(
                    f"t={s['t_s']:6.1f}s used_memory {s['used_memory'] / 2**20:7.2f} MiB  "
                    f"runs in Redis {s['runs_in_redis']:5d}  finished {counts['finished']:6d}"
                )
                await asyncio.sleep(a.sample_every)

        await asyncio.gather(submitter(), tracker(), sampler())
        spec_keys = [k async for k in broker.redis.scan_iter(match=broker.keys.spec("*"), count=1000)]
        if serve.poll() is not None:
            raise SystemExit(f"serve exited early with code {serve.returncode}")
    finally:
        stop_all([serve])
    return {
        "baseline_used_memory": baseline,
        "samples": samples,
        "spec_keys_at_end": len(spec_keys),
        **counts,
    }


def analyse(layout: dict[str, Any], run: dict[str, Any], tolerance: float) -> dict[str, Any]:
    """Thirds of the curve, the verdict, and the no-retention baseline."""
    mem = [s["used_memory"] for s in run["samples"]]
    n = len(mem)
    third = max(1, n // 3)
    middle = mem[third : 2 * third] or mem
    last = mem[2 * third :] or mem
    mid_mean, last_mean = statistics.mean(middle), statistics.mean(last)
    growth = last_mean / mid_mean - 1
    old_no_retention = run["baseline_used_memory"] + run["finished"] * layout["old_bytes_per_run"]
    new_no_retention = (
        run["baseline_used_memory"] + run["finished"] * layout["new_bytes_per_run"] + layout["spec_key_bytes"]
    )
    return {
        "samples": n,
        "first_third_mean": round(statistics.mean(mem[:third])),
        "middle_third_mean": round(mid_mean),
        "last_third_mean": round(last_mean),
        "last_vs_middle": round(growth, 4),
        "peak": max(mem),
        "final": mem[-1],
        "plateau": growth <= tolerance,
        "without_retention_old_layout": old_no_retention,
        "without_retention_new_layout": new_no_retention,
    }


async def main_async(a: argparse.Namespace) -> dict[str, Any]:
    base = load_spec(SPEC)
    async with bench_redis(a.redis_url, "soak") as (url, broker):
        workers = [
            oao_process(
                "worker",
                url,
                broker,
                "--concurrency",
                str(a.concurrency),
                env={"OAO_LOG_LEVEL": "warning"},
                log=a.log,
            )
            for _ in range(a.workers)
        ]
        try:
            await wait_for_workers(broker, a.workers)
            log(f"phase 1: {a.layout_runs} blog posts, bytes per finished run")
            layout = await bytes_per_run(broker, base, a.layout_runs)
            log(
                f"  {layout['new_bytes_per_run']:,} B per run now, {layout['old_bytes_per_run']:,} B "
                f"with the spec in every run hash"
            )
            log(f"phase 2: {a.minutes} min at {a.rate} runs/s, serve --retention {a.retention}")
            run = await soak(broker, base, a, url)
        finally:
            stop_all(workers)
    return {
        "config": {
            "minutes": a.minutes,
            "rate_per_s": a.rate,
            "retention": a.retention,
            "workers": a.workers,
            "concurrency": a.concurrency,
            "sample_every_s": a.sample_every,
            "redis": "embedded Valkey" if a.redis_url is None else a.redis_url,
        },
        "layout": layout,
        "soak": run,
        "verdict": analyse(layout, run, a.tolerance),
    }


def mib(n: float) -> str:
    return f"{n / 2**20:,.2f} MiB"


def render(res: dict[str, Any]) -> str:
    c, lay, run, v = res["config"], res["layout"], res["soak"], res["verdict"]
    lines = [
        f"soak: {c['minutes']} min, {c['rate_per_s']} blog_post runs/s, serve --retention {c['retention']}, "
        f"{c['workers']} workers x {c['concurrency']}, {c['redis']}",
        "",
        f"bytes per finished run (MEMORY USAGE, mean of {lay['runs']} runs):",
        f"  old layout (spec JSON in every run hash): {lay['old_bytes_per_run']:>7,} B"
        f"   (run hash {lay['old_run_hash_bytes']:,} B; spec JSON {lay['spec_json_chars']:,} chars)",
        f"  new layout (spec stored once):            {lay['new_bytes_per_run']:>7,} B"
        f"   ({lay['new_bytes_per_run'] / lay['old_bytes_per_run'] - 1:+.0%});"
        f" + one shared spec key of {lay['spec_key_bytes']:,} B",
        "  by key, new layout: " + ", ".join(f"{k} {b:,} B" for k, b in lay["by_key"].items()),
        "",
        "used_memory over time:",
        "| t (s) | used_memory | runs in Redis | finished |",
        "| ---: | ---: | ---: | ---: |",
    ]
    samples = run["samples"]
    step = max(1, len(samples) // 15)
    shown = samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else [])
    for s in shown:
        lines.append(
            f"| {s['t_s']:.0f} | {mib(s['used_memory'])} | {s['runs_in_redis']:,} | {s['finished']:,} |"
        )
    lines += [
        "",
        f"runs submitted {run['submitted']:,}, finished {run['finished']:,}, skipped (backlog) "
        f"{run['skipped']:,}; spec keys at the end: {run['spec_keys_at_end']}",
        f"used_memory: before the soak {mib(run['baseline_used_memory'])}; mean of thirds "
        f"{mib(v['first_third_mean'])} / {mib(v['middle_third_mean'])} / {mib(v['last_third_mean'])}; "
        f"peak {mib(v['peak'])}",
        f"without retention the {run['finished']:,} finished runs would hold: "
        f"{mib(v['without_retention_old_layout'])} (old layout), "
        f"{mib(v['without_retention_new_layout'])} (spec stored once)",
        f"verdict: last third {v['last_vs_middle']:+.1%} vs middle third -> "
        + ("PLATEAU (bounded)" if v["plateau"] else "STILL GROWING"),
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=5.0, help="length of the soak (default 5)")
    p.add_argument("--retention", default="20s", help="serve --retention (default 20s)")
    p.add_argument("--rate", type=float, default=5.0, help="runs submitted per second (default 5)")
    p.add_argument("--workers", type=int, default=2, help="oao-worker processes (default 2)")
    p.add_argument("--concurrency", type=int, default=20, help="nodes per worker at once (default 20)")
    p.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples (default 5)")
    p.add_argument("--layout-runs", type=int, default=20, help="runs measured in phase 1 (default 20)")
    p.add_argument("--max-inflight", type=int, default=200, help="skip a submission above this backlog")
    p.add_argument("--tolerance", type=float, default=0.05, help="plateau: last third <= middle x (1 + this)")
    p.add_argument("--redis-url", default=None, help="default: a private embedded Valkey")
    p.add_argument("--log", type=Path, default=None, help="append the OAO processes' logs to this file")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    a = p.parse_args()
    try:
        parse_duration(a.retention)
    except ValueError as e:
        p.error(str(e))
    res = asyncio.run(main_async(a))
    print(json.dumps(res, indent=2) if a.json else render(res))


if __name__ == "__main__":
    main()
