"""``oao-worker``: a stateless worker process of the fleet.

Exit codes: 0 after a graceful stop, 3 Redis unreachable at start, 5 the worker
stopped on its own (a loop died, its sync threads are all hung, its event loop is
wedged): a supervisor should start a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal

import click

from oao_common import tracing
from oao_common.broker import Broker
from oao_common.cli_support import (
    EXIT_INTERNAL,
    EXIT_USAGE,
    add_app_dir,
    metrics_port_option,
    plugins_option,
    prefix_option,
    redis_url_option,
    run_async,
    trust_options,
)
from oao_common.connection import DEFAULT_URL, connect, ping
from oao_common.log import configure_logging, get_logger
from oao_common.metrics import serve_metrics
from oao_common.trust import TrustPolicy

from .health import DEFAULT_MAX_STALL_S, HealthServer
from .plugins import PluginError, allowed_plugins, load_plugins
from .worker import Worker


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@redis_url_option
@prefix_option
@click.option(
    "--queues", "-q", default="default", show_default=True, help="Comma-separated queues to claim from."
)
@click.option(
    "--concurrency", "-c", default=10, show_default=True, help="Most nodes run at once (asyncio tasks)."
)
@click.option(
    "--heartbeat-ttl",
    default=5.0,
    show_default=True,
    help="Seconds a heartbeat lives; refreshed every third of it.",
)
@click.option(
    "--grace-period",
    default=30.0,
    show_default=True,
    help="Seconds in-flight nodes get to finish on SIGTERM before being handed back.",
)
@click.option(
    "--worker-id",
    default=None,
    help="Default: <host>-<pid>-<random>. A stable id (a pod name) is fine: at start the "
    "worker requeues what a previous process under the same id left behind.",
)
@click.option(
    "--sync-threads",
    type=click.IntRange(1, 1024),
    default=None,
    help="Threads for sync agent and tool code (default: concurrency, 4..64).",
)
@click.option(
    "--max-requeues",
    default=5,
    show_default=True,
    help="As serve's: requeues after worker deaths before a node is dead-lettered.",
)
@click.option(
    "--model-deltas/--no-model-deltas",
    default=True,
    show_default=True,
    help="Publish streamed model text live for the HTTP API's event streams (not stored; "
    "nothing is sent for a run nobody watches).",
)
@click.option("--app-dir", default=None, help="Directory put on sys.path for entrypoints (default: cwd).")
@plugins_option
@metrics_port_option
@click.option(
    "--health-port",
    type=click.IntRange(1, 65535),
    default=None,
    envvar="OAO_HEALTH_PORT",
    help="Serve liveness and readiness at :PORT/livez, /readyz, /healthz (env OAO_HEALTH_PORT).",
)
@click.option(
    "--health-max-stall",
    type=click.FloatRange(min=1.0),
    default=DEFAULT_MAX_STALL_S,
    show_default=True,
    envvar="OAO_HEALTH_MAX_STALL",
    help="Seconds the event loop or the heartbeat thread may make no progress before "
    "/livez fails (env OAO_HEALTH_MAX_STALL).",
)
@click.option("--log-level", default=None, help="debug, info, warning, error (env OAO_LOG_LEVEL).")
@trust_options()
@run_async
async def main(
    redis_url: str | None,
    prefix: str,
    queues: str,
    concurrency: int,
    heartbeat_ttl: float,
    grace_period: float,
    worker_id: str | None,
    sync_threads: int | None,
    max_requeues: int,
    model_deltas: bool,
    app_dir: str | None,
    plugins: str | None,
    metrics_port: int | None,
    health_port: int | None,
    health_max_stall: float,
    log_level: str | None,
    trust: TrustPolicy,
) -> int:
    """Claim nodes from Redis and run their agents until SIGTERM / SIGINT.

    On the first signal the worker stops claiming, lets in-flight nodes finish within
    --grace-period and hands the rest back to their queues; a second signal ends the
    grace period at once.

    Anyone who can write to the Redis prefix can make this worker import and run code:
    limit it with --allow-entrypoints (docs/security.md). Plugins (--plugins) are code
    too: only the ones listed are loaded.
    """
    configure_logging(log_level)
    tracing.configure_tracing("oao-worker")  # only if OTEL_* asks for it
    log = get_logger(component="worker")
    log.info("worker.trust_policy", **trust.describe())
    if trust.entrypoints is None:
        log.warning(
            "worker.entrypoints_unrestricted",
            note="any spec submitted to this prefix may run any Python code here; "
            "set --allow-entrypoints / OAO_ALLOW_ENTRYPOINTS (docs/security.md)",
        )
    add_app_dir(app_dir)
    try:
        loaded = load_plugins(allowed_plugins(plugins), trust)
    except PluginError as e:
        click.echo(f"error: {e}", err=True)
        return EXIT_USAGE
    if metrics_port:
        serve_metrics(metrics_port)
    url = redis_url or DEFAULT_URL
    r = connect(url)
    await ping(r, url)
    worker = Worker(
        Broker(r, prefix),
        queues=[q.strip() for q in queues.split(",") if q.strip()],
        concurrency=concurrency,
        worker_id=worker_id,
        heartbeat_ttl_s=heartbeat_ttl,
        grace_period_s=grace_period,
        sync_threads=sync_threads,
        max_requeues=max_requeues,
        trust=trust,
        model_deltas=model_deltas,
        plugins=loaded,
    )
    loop = asyncio.get_running_loop()
    health = None
    if health_port:
        health = HealthServer(worker, loop, health_port, max_stall_s=health_max_stall).start()

    def on_signal() -> None:
        if worker.stopping:
            worker.end_grace()
        worker.request_stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, on_signal)
    await worker.run()
    if health is not None:
        health.stop()
    await loaded.aclose()
    await r.aclose()
    if worker.fatal:
        click.echo(f"error: worker {worker.id} stopped: {worker.fatal}", err=True)
        return EXIT_INTERNAL
    return 0


if __name__ == "__main__":
    main()
