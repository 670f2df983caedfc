"""Helpers shared by the two command-line programs: options, error handling, output."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import click
from redis import exceptions as redis_exc

from .connection import ENV_PREFIX, ENV_URL, redact
from .errors import RedisUnavailable, SpecError
from .sentinel import ENV_MASTER, ENV_SENTINELS, is_sentinel_url, parse_sentinel_url, resolve_url

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3

T = TypeVar("T")


def _sentinel_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--redis-url`` callback: apply ``OAO_REDIS_SENTINELS`` / ``OAO_SENTINEL_MASTER``
    (the URL, if any, keeps providing db and credentials) and check a sentinel URL."""
    try:
        url = resolve_url(value)
        if is_sentinel_url(url):
            parse_sentinel_url(str(url))
    except ValueError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from None
    return url


redis_url_option = click.option(
    "--redis-url",
    envvar=ENV_URL,
    default=None,
    metavar="URL",
    callback=_sentinel_url,
    help=f"Redis / Valkey URL, e.g. redis://127.0.0.1:6379/0 (env {ENV_URL}), or "
    "redis+sentinel://host1:26379,host2:26379/<master-name>/<db> to find the primary "
    f"through Sentinel (or env {ENV_SENTINELS} + {ENV_MASTER}).",
)
prefix_option = click.option(
    "--prefix",
    envvar=ENV_PREFIX,
    default="oao",
    show_default=True,
    help=f"Key prefix in Redis (env {ENV_PREFIX}); lets several OAO setups share a server.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
metrics_port_option = click.option(
    "--metrics-port",
    type=int,
    default=None,
    envvar="OAO_METRICS_PORT",
    help="Serve Prometheus metrics at :PORT/metrics (env OAO_METRICS_PORT).",
)


def add_app_dir(path: str | None = None) -> None:
    """Put ``path`` (default: the current directory) on ``sys.path`` so spec entrypoints
    like ``examples.agents:Polisher`` import the way they would with ``python -m``."""
    p = os.path.abspath(path or os.getcwd())
    if p not in sys.path:
        sys.path.insert(0, p)


def run_async(fn: Callable[..., Coroutine[Any, Any, int | None]]) -> Callable[..., None]:
    """Wrap an async command: run it, map OAO's errors to one line and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            code: int | None = asyncio.run(fn(*args, **kwargs))
        except SpecError as e:
            for p in e.problems:
                click.echo(f"error: {e.source}: {p}", err=True)
            sys.exit(EXIT_USAGE)
        except RedisUnavailable as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_UNAVAILABLE)
        except (redis_exc.ConnectionError, redis_exc.TimeoutError) as e:
            url = kwargs.get("redis_url") or os.environ.get(ENV_URL) or "the configured URL"
            click.echo(f"error: lost the connection to Redis at {redact(url)}: {e}", err=True)
            sys.exit(EXIT_UNAVAILABLE)
        except KeyboardInterrupt:
            sys.exit(130)
        sys.exit(code or EXIT_OK)

    return wrapper


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))
