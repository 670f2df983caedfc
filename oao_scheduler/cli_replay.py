"""``oao-scheduler replay`` and ``fork``: time-travel commands over :mod:`.replay`
(docs/replay.md). Registered on the main group by :mod:`.cli`."""

from __future__ import annotations

import click

from oao_common.cli_support import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    json_option,
    prefix_option,
    print_json,
    redis_url_option,
    run_async,
)
from oao_common.spec import parse_input_pairs

from .replay import Replayed, ReplayError, StepRef, recorded_step, replay


def point_options(fn: click.decorators.FC) -> click.decorators.FC:
    fn = click.option(
        "--from-node",
        default=None,
        metavar="NODE",
        help="Run NODE live from its first step (= --from-step NODE:1).",
    )(fn)
    return click.option(
        "--from-step",
        default=None,
        metavar="NODE:SEQ",
        help="Serve NODE's steps before SEQ from the record, go live at SEQ; the nodes "
        "downstream of NODE run live, the other nodes that succeeded are copied.",
    )(fn)


def wait_options(fn: click.decorators.FC) -> click.decorators.FC:
    fn = click.option(
        "--timeout", "timeout_s", type=float, default=None, help="With --wait: give up after N seconds."
    )(fn)
    return click.option(
        "--wait", is_flag=True, help="Wait for the new run to end (workers run it); exit 0 if it SUCCEEDED."
    )(fn)


def _point(from_step: str | None, from_node: str | None) -> StepRef | None:
    if from_step and from_node:
        raise ReplayError("give --from-step or --from-node, not both")
    if from_node:
        return StepRef.parse(f"{from_node}:1")
    return StepRef.parse(from_step) if from_step else None


def _describe(r: Replayed) -> str:
    parts = []
    if r.copied:
        parts.append("copied: " + ", ".join(r.copied))
    if r.seeded:
        parts.append("from the record: " + ", ".join(f"{n} ({k} steps)" for n, k in r.seeded.items()))
    if r.live:
        parts.append("live: " + ", ".join(r.live))
    how = f"from {r.point}" if r.point else ("strict: nothing runs live" if r.strict else "full")
    return f"replay of {r.replay_of} ({how}) · " + " · ".join(parts)


async def _start(
    redis_url: str | None,
    prefix: str,
    run_id: str,
    point: StepRef | None,
    live: bool,
    sets: tuple[str, ...],
    inputs: tuple[str, ...],
    wait: bool,
    timeout_s: float | None,
    as_json: bool,
) -> int:
    from .cli import _broker, _exit_for, err, out
    from .progress import wait_for_run
    from .report import collect, render_report

    broker = await _broker(redis_url, prefix)
    try:
        r = await replay(
            broker,
            run_id,
            from_step=point,
            live=live,
            sets=sets,
            inputs=parse_input_pairs(inputs) if inputs else None,
        )
    except ReplayError as e:
        click.echo(f"error: {e}", err=True)
        return EXIT_USAGE
    if not wait:
        if as_json:
            print_json(r.to_dict())
        else:
            click.echo(r.run_id)
            err.print(_describe(r), highlight=False)
        return EXIT_OK
    if not as_json:
        click.echo(r.run_id)
        err.print(_describe(r), highlight=False)
    status = await wait_for_run(broker, r.run_id, None if as_json else err, timeout_s=timeout_s)
    report = await collect(broker, r.run_id)
    if as_json:
        print_json({**r.to_dict(), "report": report})
    elif report:
        render_report(report, out)
    return _exit_for(status)


@click.command("replay")
@click.argument("targets", nargs=-1, required=True, metavar="RUN_ID | --check FILE...")
@click.option(
    "--check",
    is_flag=True,
    help="The arguments are exported runs (oao-scheduler export): import each into a private "
    "embedded Valkey (or --redis-url, under a fresh prefix deleted afterwards), replay it in "
    "full with in-process workers running the agent code installed here, and compare. Exit 1 "
    "if any replay diverges.",
)
@point_options
@click.option(
    "--live",
    is_flag=True,
    help="Full replay only: steps past the end of the record run live (default: strict, "
    "such a step is a NonDeterminismError).",
)
@wait_options
@redis_url_option
@prefix_option
@json_option
@run_async
async def replay_command(
    targets: tuple[str, ...],
    check: bool,
    from_step: str | None,
    from_node: str | None,
    live: bool,
    wait: bool,
    timeout_s: float | None,
    redis_url: str | None,
    prefix: str,
    as_json: bool,
) -> int:
    """Replay RUN_ID as a new run linked to it (replay_of); print the new run's id.

    Without --from-*: every node is re-driven against its record and nothing executes
    live; a step that differs from the record fails its node with NonDeterminismError
    and what differed. With --from-step NODE:SEQ (or --from-node NODE): the steps
    before the point are served from the record, execution goes live from there.
    Workers (oao-worker, or run's fleet) execute the new run; --wait follows it.

    \b
    With --check FILE...: the replay check to run in CI before deploying agent code
    (docs/replay.md): exported runs replayed against the code installed here.
    """
    if check:
        if from_step or from_node or live or wait:
            click.echo("error: --check replays whole runs: no --from-*, --live or --wait", err=True)
            return EXIT_USAGE
        return await _check(targets, redis_url, timeout_s, as_json)
    if len(targets) != 1:
        click.echo("error: replay takes one RUN_ID (or --check FILE...)", err=True)
        return EXIT_USAGE
    run_id = targets[0]
    try:
        point = _point(from_step, from_node)
    except ReplayError as e:
        click.echo(f"error: {e}", err=True)
        return EXIT_USAGE
    if live and point is not None:
        click.echo("error: --live is for a full replay (a replay from a point is live after it)", err=True)
        return EXIT_USAGE
    return await _start(redis_url, prefix, run_id, point, live, (), (), wait, timeout_s, as_json)


@click.command("fork")
@click.argument("run_id")
@point_options
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="PATH=VALUE",
    help="Change the spec (nodes.<id>.task, agents.<name>.system, models.<name>.model, "
    "defaults.policy.max_tokens, ...) or, with result[.field], the recorded result of "
    "the step at the point; VALUE is parsed as YAML. Repeatable.",
)
@click.option("--input", "-i", "inputs", multiple=True, metavar="KEY=VALUE", help="Change an input.")
@wait_options
@redis_url_option
@prefix_option
@json_option
@run_async
async def fork_command(
    run_id: str,
    from_step: str | None,
    from_node: str | None,
    sets: tuple[str, ...],
    inputs: tuple[str, ...],
    wait: bool,
    timeout_s: float | None,
    redis_url: str | None,
    prefix: str,
    as_json: bool,
) -> int:
    """Fork RUN_ID at a step with changes: a replay from --from-step NODE:SEQ (or
    --from-node NODE) of a changed spec, inputs or recorded result.

    \b
    Examples:
      oao-scheduler fork RUN --from-step draft:2 --set 'result.content=Be brief.'
      oao-scheduler fork RUN --from-node draft --set models.writer.model=gpt-4o
      oao-scheduler fork RUN --from-node research --input topic=robots
    """
    try:
        point = _point(from_step, from_node)
        if point is None:
            raise ReplayError("a fork needs a point: --from-step NODE:SEQ or --from-node NODE")
    except ReplayError as e:
        click.echo(f"error: {e}", err=True)
        return EXIT_USAGE
    return await _start(redis_url, prefix, run_id, point, False, sets, inputs, wait, timeout_s, as_json)


@click.command("step")
@click.argument("run_id")
@click.argument("step")
@redis_url_option
@prefix_option
@json_option
@run_async
async def step_command(run_id: str, step: str, redis_url: str | None, prefix: str, as_json: bool) -> int:
    """Show the recorded step STEP (NODE:SEQ) of RUN_ID as the model or tool saw it:
    the request (every message of a model call), the result, usage and timing."""
    import json

    from rich.text import Text

    from .cli import _broker, out

    try:
        point = StepRef.parse(step)
        broker = await _broker(redis_url, prefix)
        rec = await recorded_step(broker, run_id, point)
    except ReplayError as e:
        click.echo(f"error: {e}", err=True)
        return EXIT_USAGE
    if as_json:
        print_json(rec)
        return EXIT_OK
    u = rec.get("usage") or {}
    out.print(
        f"[bold]{run_id} {point}[/] {rec.get('kind')} {rec.get('name')} · attempt {rec.get('attempt')} · "
        f"{rec.get('duration_ms')} ms · {u.get('in', 0)} in / {u.get('out', 0)} out · "
        f"${float(u.get('cost_usd') or 0):.4f}"
        + (" · overridden by a fork" if rec.get("overridden") else ""),
        highlight=False,
    )
    request = rec.get("request") or {}
    for m in request.get("messages") or []:  # text, never markup: it is the model's input
        out.print(Text.assemble((f"{m.get('role', '?')}: ", "dim"), str(m.get("content") or "")))
        for tc in m.get("tool_calls") or []:
            out.print(Text.assemble(("  tool call: ", "dim"), json.dumps(tc)))
    rest = {k: v for k, v in request.items() if k != "messages"}
    out.print(Text.assemble(("request: ", "dim"), json.dumps(rest)))
    out.print(Text.assemble(("result: ", "dim"), json.dumps(rec.get("result"), indent=2)))
    return EXIT_OK


async def _check(
    files: tuple[str, ...], redis_url: str | None, timeout_s: float | None, as_json: bool
) -> int:
    """``replay --check``: see :func:`.replay.check_exported`."""
    import os
    import uuid
    from pathlib import Path

    from rich.text import Text

    from oao_common.log import configure_logging

    from .cli import _log_level_given, err, out
    from .export import ExportError, parse_lines
    from .fleet import LocalFleet
    from .replay import check_exported

    sources = []
    for f in files:  # every file is read and checked before anything starts
        try:
            lines = Path(f).read_text(encoding="utf-8").splitlines()
            parse_lines(lines)
        except (OSError, UnicodeDecodeError) as e:
            click.echo(f"error: {f}: cannot read: {e}", err=True)
            return EXIT_USAGE
        except ExportError as e:
            click.echo(f"error: {f}: {e}", err=True)
            return EXIT_USAGE
        sources.append((f, lines))
    if not os.environ.get("OAO_LOG_LEVEL") and not _log_level_given():
        configure_logging("warning")  # the workers' info lines would bury the verdicts
    prefix = f"oao-check-{uuid.uuid4().hex[:10]}" if redis_url else "oao"
    fleet = LocalFleet(redis_url, prefix=prefix, workers=1, concurrency=16, grace_period_s=1.0)
    try:
        async with fleet:
            results = await check_exported(fleet.broker, sources, timeout_s or 300.0)
    except ExportError as e:
        click.echo(f"error: {e}", err=True)
        return EXIT_USAGE
    finally:
        if redis_url:  # the fleet has stopped: nothing writes under the prefix any more
            await _delete_prefix(redis_url, prefix)
    if as_json:
        print_json({"ok": all(r.ok for r in results), "runs": [r.to_dict() for r in results]})
    else:
        for r in results:
            verdict = ("ok", "green") if r.ok else ("DIVERGED", "red bold")
            out.print(Text.assemble(verdict, f"  {r.source} (run {r.original})"))
            for p in r.problems:
                out.print(Text("    " + p))
        bad = sum(1 for r in results if not r.ok)
        err.print(f"{len(results) - bad} of {len(results)} runs replayed identically", highlight=False)
    return EXIT_OK if all(r.ok for r in results) else EXIT_FAILED


async def _delete_prefix(redis_url: str, prefix: str) -> None:
    from oao_common.connection import connect

    r = connect(redis_url)
    try:
        batch = [k async for k in r.scan_iter(match=f"{prefix}:*", count=1000)]
        for i in range(0, len(batch), 500):
            await r.delete(*batch[i : i + 500])
    finally:
        await r.aclose()


COMMANDS = [replay_command, fork_command, step_command]
