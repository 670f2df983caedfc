"""``oao-scheduler``: validate, submit, run and inspect DAG runs; serve the reaper.

Exit codes: 0 success, 1 the run failed (or was cancelled), 2 invalid spec or usage,
3 Redis unreachable (or the run was lost), 4 ``--timeout`` passed before the run
ended, 5 a loop of ``serve`` died (restart it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from typing import Any

import click
from rich.console import Console

from oao_common import tracing
from oao_common.broker import Broker
from oao_common.cli_support import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    add_app_dir,
    json_option,
    metrics_port_option,
    plugins_option,
    prefix_option,
    print_json,
    redis_url_option,
    run_async,
    trust_options,
)
from oao_common.connection import DEFAULT_URL, connect, ping, redact
from oao_common.errors import RedisUnavailable, SpecError
from oao_common.log import configure_logging, get_logger
from oao_common.metrics import serve_metrics
from oao_common.spec import Spec, apply_inputs, load_spec, parse_input_pairs
from oao_common.states import RunState
from oao_common.supervise import supervise
from oao_common.trust import TrustPolicy

from .durations import parse_duration
from .escalation import Escalator
from .progress import wait_for_run
from .reaper import Reaper
from .report import REPORT_NODE_LIMIT, collect, render_report, render_status
from .retention import Retention
from .submit import submit_spec


def _console(stderr: bool = False) -> Console:
    c = Console(stderr=stderr)
    if not c.is_terminal:  # pipes and CI logs: do not wrap tables at 80 columns
        c = Console(stderr=stderr, width=160)
    return c


out = _console()
err = _console(stderr=True)


def _load(
    path: str, inputs: tuple[str, ...], check_imports: bool = False, trust: TrustPolicy | None = None
) -> Spec:
    """Load and validate a spec; with ``trust``, refuse what the fleet's trust options
    would refuse (before importing anything); with ``check_imports``, import its
    entrypoints as a worker would. Raises :class:`SpecError` (exit 2)."""
    spec = load_spec(path)
    spec = apply_inputs(spec, parse_input_pairs(inputs)) if inputs else spec
    if trust is not None:
        _check_trust(spec, trust, path)
    if check_imports:
        from oao_worker.runtime import import_problems

        problems = import_problems(spec, trust)
        if problems:
            raise SpecError(problems, path)
    return spec


def check_imports_option(default: bool) -> Any:
    return click.option(
        "--check-imports/--no-check-imports",
        default=default,
        show_default=True,
        help="Import every agent and tool entrypoint here first (as a worker would, from "
        "the current directory or --app-dir); an entrypoint that fails to import is an "
        "invalid spec (exit 2).",
    )


async def _broker(redis_url: str | None, prefix: str) -> Broker:
    url = redis_url or DEFAULT_URL
    r = connect(url)
    await ping(r, url)
    return Broker(r, prefix)


def _check_trust(spec: Spec, trust: TrustPolicy, source: str) -> None:
    """Refuse early what the trust options given here would refuse on the workers
    (entrypoints by name, API-key variables, URLs); raises :class:`SpecError`."""
    from oao_common.errors import SpecError

    problems = trust.spec_problems(spec)
    if problems:
        raise SpecError(problems, source)


def _log_level_given() -> bool:
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx else None
    return bool(root and root.params.get("log_level"))


def _exit_for(status: str) -> int:
    """0 for SUCCEEDED and PARTIAL (a partial completion the spec allows), else 1."""
    return EXIT_OK if status in (RunState.SUCCEEDED, RunState.PARTIAL) else EXIT_FAILED


input_option = click.option(
    "--input",
    "-i",
    "inputs",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override an entry of the spec's inputs (repeatable; values parsed as YAML).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default=None, help="debug, info, warning, error (env OAO_LOG_LEVEL).")
@click.option("--app-dir", default=None, help="Directory put on sys.path for entrypoints (default: cwd).")
def main(log_level: str | None, app_dir: str | None) -> None:
    """OAO scheduler: submit DAGs of AI agents to a Redis-backed worker fleet.

    \b
    Quick start (no Redis needed, an embedded Valkey is started):
      oao-scheduler run examples/blog_post.yaml
    With a Redis server:
      oao-scheduler serve &            # reaper + retry promoter
      oao-worker --concurrency 20 &    # as many as you like
      oao-scheduler submit examples/blog_post.yaml --wait
    """
    configure_logging(log_level)
    tracing.configure_tracing("oao-scheduler")  # only if OTEL_* asks for it
    add_app_dir(app_dir)


@main.command()
@click.argument("spec_file", type=click.Path(dir_okay=False))
@input_option
@check_imports_option(False)
@json_option
@trust_options(submit_time=True)
def validate(
    spec_file: str, inputs: tuple[str, ...], check_imports: bool, as_json: bool, trust: TrustPolicy
) -> None:
    """Validate a spec without touching Redis; exit 2 with the problems if invalid.

    With the fleet's trust options (--allow-entrypoints ...), also report what its
    workers would refuse. Link-local and cloud-metadata URLs are always refused.
    """
    from .submit import execution_hash

    try:
        spec = _load(spec_file, inputs, check_imports, trust)
    except SpecError as e:
        for p in e.problems:
            click.echo(f"error: {e.source}: {p}", err=True)
        sys.exit(EXIT_USAGE)
    h = execution_hash(spec)
    if as_json:
        print_json({"name": spec.name, "nodes": len(spec.nodes), "exec_hash": h})
    else:
        click.echo(f"{spec_file}: valid ({len(spec.nodes)} nodes, exec hash {h[:16]})")


@main.command()
@click.argument("spec_file", type=click.Path(dir_okay=False))
@input_option
@redis_url_option
@prefix_option
@click.option("--workers", "-w", default=2, show_default=True, help="In-process workers.")
@click.option("--concurrency", "-c", default=8, show_default=True, help="Nodes each worker runs at once.")
@click.option("--timeout", "timeout_s", type=float, default=None, help="Give up after this many seconds.")
@click.option(
    "--progress/--no-progress", default=True, show_default=True, help="Show node states while running."
)
@check_imports_option(True)
@json_option
@metrics_port_option
@plugins_option
@trust_options()
@run_async
async def run(
    spec_file: str,
    inputs: tuple[str, ...],
    redis_url: str | None,
    prefix: str,
    workers: int,
    concurrency: int,
    timeout_s: float | None,
    progress: bool,
    check_imports: bool,
    as_json: bool,
    metrics_port: int | None,
    plugins: str | None,
    trust: TrustPolicy,
) -> int:
    """Run a DAG to completion in this process and print the execution report.

    Without --redis-url / OAO_REDIS_URL a private embedded Valkey server is started
    (and discarded at exit). The reaper and WORKERS workers run in-process, on the
    same protocol as a distributed fleet. Exit 0 if the run SUCCEEDED, 1 otherwise.
    """
    from oao_worker.plugins import PluginError, allowed_plugins, load_plugins

    from .fleet import LocalFleet

    if not os.environ.get("OAO_LOG_LEVEL") and not _log_level_given():
        configure_logging("warning")  # the progress view and the report say it all
    spec = _load(spec_file, inputs, check_imports, trust)
    try:
        loaded = load_plugins(allowed_plugins(plugins), trust)
    except PluginError as e:
        click.echo(f"error: {e}", err=True)
        return EXIT_USAGE
    if metrics_port:
        serve_metrics(metrics_port)
    fleet = LocalFleet(
        redis_url or None,
        prefix=prefix,
        workers=workers,
        concurrency=concurrency,
        heartbeat_ttl_s=5.0,
        grace_period_s=5.0,
        trust=trust,
        reaper=True,
        escalator=True,
        plugins=loaded,
    )
    async with fleet:
        submitted = await fleet.submit(spec)
        where = "embedded Valkey" if fleet.embedded else redact(fleet.url or "")
        err.print(
            f"run {submitted.run_id} ({spec.name}, {len(spec.nodes)} nodes) on {where}", highlight=False
        )
        # the escalator handles the run's ending, if it must be escalated, before we exit
        status = await fleet.wait(
            submitted.run_id, err if progress and not as_json else None, timeout_s=timeout_s
        )
        # a summarised report (large runs) needs no state histories: skip reading the events
        report = await fleet.report(
            submitted.run_id, with_events=as_json or len(spec.nodes) <= REPORT_NODE_LIMIT
        )
    await loaded.aclose()
    if report is None:
        raise RedisUnavailable(f"run {submitted.run_id} is no longer in Redis (pruned?)")
    if as_json:
        print_json(report)
    else:
        render_report(report, out, max_nodes=REPORT_NODE_LIMIT)
    return _exit_for(status)


@main.command()
@click.argument("spec_file", type=click.Path(dir_okay=False))
@input_option
@redis_url_option
@prefix_option
@click.option("--wait", is_flag=True, help="Wait for the run to finish; exit 0 if it SUCCEEDED.")
@click.option(
    "--timeout", "timeout_s", type=float, default=None, help="With --wait: give up after N seconds."
)
@click.option("--idempotency-key", default=None, help="Submitting twice with one key returns the first run.")
@check_imports_option(False)
@json_option
@trust_options(submit_time=True)
@run_async
async def submit(
    spec_file: str,
    inputs: tuple[str, ...],
    redis_url: str | None,
    prefix: str,
    wait: bool,
    timeout_s: float | None,
    idempotency_key: str | None,
    check_imports: bool,
    as_json: bool,
    trust: TrustPolicy,
) -> int:
    """Validate SPEC_FILE and submit it as a new run; print the run id.

    Workers (oao-worker) execute it; run `oao-scheduler serve` for dead-worker
    recovery and retries. Trust options given here (--allow-entrypoints ...) refuse
    early what the fleet's workers would refuse.
    """
    spec = _load(spec_file, inputs, check_imports, trust)
    broker = await _broker(redis_url, prefix)
    s = await submit_spec(broker, spec, idempotency_key=idempotency_key)
    status = "SUBMITTED" if s.created else "EXISTS"
    if not wait:
        if as_json:
            print_json({"run_id": s.run_id, "created": s.created, "exec_hash": s.exec_hash})
        else:
            click.echo(s.run_id)
            if not s.created:
                err.print(f"idempotency key {idempotency_key!r} already names run {s.run_id}")
        return EXIT_OK
    if not as_json:
        click.echo(s.run_id)
    status = await wait_for_run(broker, s.run_id, None if as_json else err, timeout_s=timeout_s)
    report = await collect(broker, s.run_id, with_events=as_json or len(spec.nodes) <= REPORT_NODE_LIMIT)
    if as_json:
        print_json(report)
    elif report:
        render_report(report, out, max_nodes=REPORT_NODE_LIMIT)
    return _exit_for(status)


async def _show(run_id: str, redis_url: str | None, prefix: str, as_json: bool, full: bool) -> int:
    """Print a run's status table (or, with ``full``, the whole report)."""
    broker = await _broker(redis_url, prefix)
    rep = await collect(broker, run_id, with_events=full or as_json)
    if rep is None:
        click.echo(f"error: no run {run_id!r}", err=True)
        return EXIT_USAGE
    if as_json:
        print_json(rep)
    elif full:
        render_report(rep, out)
    else:
        render_status(rep, out)
    return EXIT_OK


@main.command()
@click.argument("run_id")
@redis_url_option
@prefix_option
@json_option
@run_async
async def status(run_id: str, redis_url: str | None, prefix: str, as_json: bool) -> int:
    """Show a run's status, execution hash and node table."""
    return await _show(run_id, redis_url, prefix, as_json, full=False)


@main.command()
@click.argument("run_id")
@redis_url_option
@prefix_option
@json_option
@run_async
async def report(run_id: str, redis_url: str | None, prefix: str, as_json: bool) -> int:
    """Print the full execution report of a run (per node: states, steps, output, error)."""
    return await _show(run_id, redis_url, prefix, as_json, full=True)


def _event_line(ev: Any, t0: int) -> str:
    import json as _json

    data = _json.dumps(ev.data, separators=(",", ":"), default=str) if ev.data else ""
    if len(data) > 200:
        data = data[:200] + "…"
    node = f" {ev.node}#{ev.attempt}" if ev.node else ""
    return f"{(ev.ts_ms - t0) / 1000:9.3f}s {ev.type:<22}{node} {data}"


@main.command()
@click.argument("run_id")
@redis_url_option
@prefix_option
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events until the run ends.")
@click.option("--node", default=None, help="Only events of this node.")
@json_option
@run_async
async def events(
    run_id: str, redis_url: str | None, prefix: str, follow: bool, node: str | None, as_json: bool
) -> int:
    """Print a run's event log (JSON lines with --json)."""
    import json as _json

    broker = await _broker(redis_url, prefix)
    run = await broker.get_run(run_id)
    if not run:
        click.echo(f"error: no run {run_id!r}", err=True)
        return EXIT_USAGE
    t0 = int(run.get("created_at") or 0)

    def show(ev: Any) -> None:
        if node and ev.node != node:
            return
        click.echo(_json.dumps(ev.to_dict(), default=str) if as_json else _event_line(ev, t0))

    last = "0-0"
    for ev in await broker.events(run_id):
        show(ev)
        last = ev.id
    if follow:
        async for ev in broker.follow_events(run_id, after=last):
            show(ev)
            if ev.type in ("RUN_SUCCEEDED", "RUN_FAILED", "RUN_CANCELLED", "RUN_PARTIAL"):
                break
    return EXIT_OK


@main.command()
@click.argument("run_id")
@redis_url_option
@prefix_option
@run_async
async def cancel(run_id: str, redis_url: str | None, prefix: str) -> int:
    """Cancel a run: pending and running nodes become CANCELLED."""
    broker = await _broker(redis_url, prefix)
    n = await broker.cancel(run_id)
    if n < 0:
        run = await broker.get_run(run_id)
        if not run:
            click.echo(f"error: no run {run_id!r}", err=True)
            return EXIT_USAGE
        click.echo(f"run {run_id} is already {run.get('status')}; nothing to cancel")
        return EXIT_OK
    click.echo(f"run {run_id} cancelled ({n} nodes)")
    return EXIT_OK


@main.command()
@redis_url_option
@prefix_option
@click.option("--limit", "-n", default=20, show_default=True)
@json_option
@run_async
async def runs(redis_url: str | None, prefix: str, limit: int, as_json: bool) -> int:
    """List recent runs, newest first."""
    from rich.table import Table

    from .report import _styled

    broker = await _broker(redis_url, prefix)
    items = await broker.recent_runs(limit)
    if as_json:
        print_json(items)
        return EXIT_OK
    t = Table()
    for c in ("run", "name", "status", "nodes", "failed", "tokens in/out", "replay of"):
        t.add_column(c)
    for r in items:
        t.add_row(
            r["id"],
            r.get("name", ""),
            _styled(r.get("status", "?")),
            f"{r.get('nodes_done', 0)}/{r.get('nodes_total', 0)}",
            r.get("nodes_failed", "0"),
            f"{r.get('tokens_in', 0)}/{r.get('tokens_out', 0)}",
            r.get("replay_of", ""),
        )
    out.print(t)
    return EXIT_OK


@main.command("export")
@click.argument("run_id")
@redis_url_option
@prefix_option
@click.option(
    "--output", "-o", type=click.Path(dir_okay=False), default=None, help="Write to FILE (default stdout)."
)
@run_async
async def export_cmd(run_id: str, redis_url: str | None, prefix: str, output: str | None) -> int:
    """Write a finished run as JSON lines: run, spec, nodes, step ledger, model messages
    and events (format: docs/replay.md, "Export and import").

    Exit 2 if the run is unknown or has not ended.
    """
    from .export import ExportError, dumps, export_run

    broker = await _broker(redis_url, prefix)
    try:
        text = dumps(await export_run(broker, run_id))
    except ExportError as e:
        click.echo(f"error: {e}", err=True)
        return EXIT_USAGE
    finally:
        await broker.redis.aclose()
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return EXIT_OK
    tmp = f"{output}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, output)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        click.echo(f"error: cannot write {output}: {e.strerror or e}", err=True)
        return EXIT_USAGE
    return EXIT_OK


@main.command("import")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@redis_url_option
@prefix_option
@click.option("--keep-id", is_flag=True, help="Keep the run's original id (refused if it exists).")
@json_option
@run_async
async def import_cmd(file: str, redis_url: str | None, prefix: str, keep_id: bool, as_json: bool) -> int:
    """Load a run exported by `oao-scheduler export` (FILE, or - for stdin) and print
    its run id: a new one unless --keep-id.

    The whole file is checked before anything is written, then written atomically; an
    existing run is never overwritten. Exit 2 for an unreadable or invalid file (the
    line is named) or an existing run.
    """
    from .export import ExportError, import_run

    try:
        if file == "-":
            lines = sys.stdin.read().splitlines()
        else:
            with open(file, encoding="utf-8") as f:
                lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        click.echo(f"error: cannot read {file}: {getattr(e, 'strerror', None) or e}", err=True)
        return EXIT_USAGE
    broker = await _broker(redis_url, prefix)
    try:
        rid = await import_run(broker, lines, keep_id=keep_id)
    except ExportError as e:
        click.echo(f"error: {file}: {e}", err=True)
        return EXIT_USAGE
    finally:
        await broker.redis.aclose()
    if as_json:
        print_json({"run_id": rid})
    else:
        click.echo(rid)
    return EXIT_OK


@main.command("diff")
@click.argument("run_a")
@click.argument("run_b")
@redis_url_option
@prefix_option
@click.option(
    "--redis-url-b", default=None, metavar="URL", help="RUN_B is on this server (default: --redis-url)."
)
@click.option("--prefix-b", default=None, help="RUN_B is under this prefix (default: --prefix).")
@click.option("--exit-code", is_flag=True, help="Exit 1 if the runs differ (like diff(1)).")
@json_option
@run_async
async def diff_cmd(
    run_a: str,
    run_b: str,
    redis_url: str | None,
    prefix: str,
    redis_url_b: str | None,
    prefix_b: str | None,
    exit_code: bool,
    as_json: bool,
) -> int:
    """Compare two runs: per node same / differs / only in A / only in B, the first
    divergent step of each differing node (request, result, usage of both sides), and
    the totals (tokens, cost, duration, steps) with their differences.

    Exit 2 if a run is unknown; with --exit-code, 1 if the runs differ.
    """
    from .diff import diff_runs, render_diff
    from .export import ExportError

    broker = await _broker(redis_url, prefix)
    other = None
    if redis_url_b or (prefix_b and prefix_b != prefix):
        other = await _broker(redis_url_b or redis_url, prefix_b or prefix)
    try:
        d = await diff_runs(broker, run_a, run_b, broker_b=other)
    except ExportError as e:
        click.echo(f"error: {e}", err=True)
        return EXIT_USAGE
    finally:
        await broker.redis.aclose()
        if other is not None:
            await other.redis.aclose()
    if as_json:
        print_json(d)
    else:
        render_diff(d, out)
    return EXIT_FAILED if exit_code and not d["identical"] else EXIT_OK


@main.command("plugins")
@plugins_option
@json_option
@trust_options(entrypoints=False)
def plugins_cmd(plugins: str | None, as_json: bool, trust: TrustPolicy) -> None:
    """List the installed worker plugins (entry points oao.plugins) and whether a worker
    started with these --plugins / OAO_PLUGINS and network options would load them.

    Only allowed plugins are imported (to read the API version they need and what they
    register). Exit 2 if an allowed plugin is missing or would be refused, as
    oao-worker would at start; 0 otherwise.
    """
    from rich.table import Table

    from oao_worker.plugins import PLUGIN_API_VERSION, allowed_plugins, describe_installed

    allow = allowed_plugins(plugins)
    rows = describe_installed(allow, trust)
    bad = [r for r in rows if r["allowed"] and r["status"] != "loads"]
    if as_json:
        print_json({"api_version": PLUGIN_API_VERSION, "allowed": list(allow), "plugins": rows})
    else:
        t = Table(title=f"OAO plugin API {PLUGIN_API_VERSION}")
        for c in ("plugin", "package", "status", "provides / why not"):
            t.add_column(c)
        for r in rows:
            provides = "; ".join(f"{k}: {', '.join(v)}" for k, v in (r.get("registered") or {}).items())
            pkg = f"{r['dist']} {r['version']}" if "dist" in r else ""
            t.add_row(r["name"], pkg, r["status"], provides or r.get("detail", ""))
        if rows:
            out.print(t)
        else:
            click.echo(
                f"no plugins installed (entry point group oao.plugins; plugin API {PLUGIN_API_VERSION})"
            )
    for r in bad:
        click.echo(f"error: {r['detail'] or r['status']}", err=True)
    sys.exit(EXIT_USAGE if bad else EXIT_OK)


@main.command()
@redis_url_option
@prefix_option
@click.option(
    "--refresh", "refresh_s", default=1.0, show_default=True, type=click.FloatRange(0.1), help="Seconds."
)
@click.option("--once", is_flag=True, help="Print one frame and exit (no terminal needed).")
@run_async
async def top(redis_url: str | None, prefix: str, refresh_s: float, once: bool) -> int:
    """A live view of the fleet: queues and bands, workers (heartbeat age, load), runs in
    flight with progress, tokens and cost per minute, violations, requeues and retries.
    Press q to quit."""
    from .top import run_top

    broker = await _broker(redis_url, prefix)
    try:
        return await run_top(broker, refresh_s=refresh_s, once=once)
    finally:
        await broker.redis.aclose()


@main.command()
@redis_url_option
@prefix_option
@json_option
@run_async
async def workers(redis_url: str | None, prefix: str, as_json: bool) -> int:
    """List known workers: alive or dead (heartbeat expired), heartbeat age, active jobs."""
    import time

    from rich.table import Table

    broker = await _broker(redis_url, prefix)
    items = await broker.workers()
    now = time.time()
    for w in items:
        w["heartbeat_age_s"] = round(now - w["last_heartbeat"], 1)
    if as_json:
        print_json(items)
        return EXIT_OK
    t = Table()
    for c in ("worker", "state", "heartbeat age", "queues", "concurrency", "active jobs"):
        t.add_column(c)
    for w in items:
        t.add_row(
            w["id"],
            "[green]alive[/]" if w["alive"] else "[red]dead[/]",
            f"{w['heartbeat_age_s']}s",
            w.get("queues", ""),
            w.get("concurrency", ""),
            str(len(w["active"])),
        )
    out.print(t)
    return EXIT_OK


@main.command()
@redis_url_option
@prefix_option
@click.option("--reaper-interval", default=1.0, show_default=True, help="Seconds between reaper passes.")
@click.option(
    "--heartbeat-ttl", default=5.0, show_default=True, help="Must match the workers' --heartbeat-ttl."
)
@click.option(
    "--max-requeues",
    default=5,
    show_default=True,
    help="Requeues after worker deaths before a node is dead-lettered (poison).",
)
@click.option(
    "--retention",
    "retention",
    default="3d",
    show_default=True,
    metavar="DURATION",
    help="Delete finished runs (state, events, ledger) this long after they end: "
    "90s, 30m, 12h, 3d or seconds; 0 keeps them forever.",
)
@metrics_port_option
@trust_options(entrypoints=False)
@run_async
async def serve(
    redis_url: str | None,
    prefix: str,
    reaper_interval: float,
    heartbeat_ttl: float,
    max_requeues: int,
    retention: str,
    metrics_port: int | None,
    trust: TrustPolicy,
) -> int:
    """Run the reaper (dead-worker recovery), the delayed-retry promoter, escalation and
    retention (finished runs are deleted --retention after they end).

    Any number of `serve` processes may run at once; the scripts they run are atomic
    and idempotent. Redis errors (outages, OOM, READONLY after a failover) are logged
    and retried with backoff. Stops on SIGTERM / SIGINT; exits 5 if one of its loops
    dies anyway, so a supervisor restarts it.
    """
    retention_s = _duration_or_exit("--retention", retention)
    url = redis_url or DEFAULT_URL
    broker = await _broker(url, prefix)
    log = get_logger(component="serve")
    if metrics_port:
        serve_metrics(metrics_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    reaper = Reaper(
        broker, interval_s=reaper_interval, heartbeat_ttl_s=heartbeat_ttl, max_requeues=max_requeues
    )
    escalator = Escalator(broker, trust=trust)
    loops = {"reaper": reaper.run(stop), "escalation": escalator.run(stop)}
    keeper = Retention(broker, retention_s) if retention_s > 0 else None
    if keeper is not None:
        loops["retention"] = keeper.run(stop)
    log.info(
        "serve.started",
        redis=redact(url),
        reaper_interval_s=reaper_interval,
        heartbeat_ttl_s=heartbeat_ttl,
        retention_s=retention_s or None,
    )
    await supervise(loops, stop)
    log.info(
        "serve.stopped",
        passes=reaper.stats.passes,
        requeued=reaper.stats.requeued,
        escalated=escalator.sent,
        pruned_runs=keeper.stats.runs if keeper else 0,
    )
    return EXIT_OK


def _duration_or_exit(option: str, text: str) -> float:
    """Seconds in ``text`` (see :func:`parse_duration`); exit 2 with one line if invalid."""
    try:
        return parse_duration(text)
    except ValueError as e:
        click.echo(f"error: {option}: {e}", err=True)
        sys.exit(EXIT_USAGE)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


@main.command()
@redis_url_option
@prefix_option
@click.option(
    "--older-than",
    default="0",
    show_default=True,
    metavar="DURATION",
    help="Only runs that ended at least this long ago: 90s, 30m, 12h, 3d or seconds.",
)
@click.option(
    "--status",
    "statuses",
    default=None,
    metavar="STATES",
    help="Only runs that ended in these states, comma-separated: SUCCEEDED, FAILED, CANCELLED, PARTIAL.",
)
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; delete nothing.")
@json_option
@run_async
async def prune(
    redis_url: str | None,
    prefix: str,
    older_than: str,
    statuses: str | None,
    dry_run: bool,
    as_json: bool,
) -> int:
    """Delete finished runs now: run and node state, events, step ledger, and the shared
    spec once no run uses it. Their status, report and events are gone afterwards.

    Runs still pending or running are never touched, nor runs whose ending escalation
    has not handled yet. Finished runs from before the finished-runs index are found
    too (and indexed, so `serve --retention` handles them from then on). Bytes are
    estimated from a sample of the runs (MEMORY USAGE). `serve` does this continuously
    (--retention, default 3d).
    """
    from .prune import parse_statuses, prune_on_demand

    older_than_s = _duration_or_exit("--older-than", older_than)
    try:
        wanted = parse_statuses(statuses)
    except ValueError as e:
        click.echo(f"error: {e}", err=True)
        return EXIT_USAGE
    broker = await _broker(redis_url, prefix)
    rep = await prune_on_demand(broker, older_than_s, wanted, dry_run=dry_run)
    await broker.redis.aclose()
    if as_json:
        print_json(rep.to_dict())
        return EXIT_OK
    verb = "would delete" if dry_run else "deleted"
    keys = f"~{rep.keys:,}" if dry_run else f"{rep.keys:,}"
    click.echo(
        f"{verb} {rep.runs:,} finished runs: {keys} keys, ~{_mib(rep.bytes)}"
        + (f" (estimated from {rep.sampled} runs)" if rep.sampled else "")
    )
    if rep.indexed:
        click.echo(f"indexed {rep.indexed:,} finished runs from before the finished-runs index")
    if rep.held_back:
        click.echo(f"kept {rep.held_back:,} runs whose ending escalation has not handled yet")
    if rep.endings:
        click.echo(f"trimmed {rep.endings:,} old entries of the run-endings stream")
    return EXIT_OK


@main.command("api")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port.")
@click.option(
    "--tokens-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="File of bearer tokens, one a line (with env OAO_API_TOKENS, comma-separated). "
    "Required unless --host is loopback.",
)
@redis_url_option
@prefix_option
@trust_options(submit_time=True)
def api(
    host: str, port: int, tokens_file: str | None, redis_url: str | None, prefix: str, trust: TrustPolicy
) -> None:
    """Serve the HTTP API (FastAPI on uvicorn; OpenAPI docs at /docs).

    \b
    Clients send "Authorization: Bearer <token>"; without tokens the API may only be
    bound to loopback (127.0.0.1, ::1, localhost). Tokens are never logged.
    """
    from .api import is_loopback, load_tokens
    from .api.serve import serve_api

    try:
        tokens = load_tokens(tokens_file=tokens_file)
    except (OSError, UnicodeDecodeError) as e:
        click.echo(f"error: cannot read --tokens-file: {getattr(e, 'strerror', None) or e}", err=True)
        sys.exit(EXIT_USAGE)
    if not tokens and not is_loopback(host):
        click.echo(
            f"error: binding {host} needs bearer tokens (OAO_API_TOKENS or --tokens-file); "
            "without tokens bind 127.0.0.1",
            err=True,
        )
        sys.exit(EXIT_USAGE)
    serve_api(
        host,
        port,
        redis_url,
        prefix,
        tokens,
        trust,
        log_level="warning" if not _log_level_given() else "info",
    )


if __name__ == "__main__":
    main()


def _register_time_travel() -> None:
    from .cli_replay import COMMANDS

    for command in COMMANDS:
        main.add_command(command)


_register_time_travel()
