"""Helpers shared by the two command-line programs: options, error handling, output."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, cast

import click
from redis import exceptions as redis_exc

from .connection import ENV_PREFIX, ENV_URL, redact
from .errors import LoopDied, RedisUnavailable, SpecError, WaitTimeout
from .retry import describe
from .sentinel import ENV_MASTER, ENV_SENTINELS, is_sentinel_url, parse_sentinel_url, resolve_url

EXIT_OK = 0
EXIT_FAILED = 1  # the run failed or was cancelled
EXIT_USAGE = 2  # invalid spec or usage
EXIT_UNAVAILABLE = 3  # Redis unreachable, refused the credentials, or lost the run
EXIT_TIMEOUT = 4  # --timeout passed before the run ended (it goes on)
EXIT_INTERNAL = 5  # a long-lived loop of the process died; a supervisor should restart it

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

plugins_option = click.option(
    "--plugins",
    "plugins",
    envvar="OAO_PLUGINS",
    default=None,
    metavar="NAMES",
    help="Comma-separated names of the installed worker plugins (entry points oao.plugins) to "
    "load; none by default: a plugin is code run by the worker (docs/plugins.md). A listed plugin "
    "that is missing, fails or needs another plugin API version stops the start (exit 2). "
    "Env OAO_PLUGINS.",
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
        except WaitTimeout as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_TIMEOUT)
        except LoopDied as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_INTERNAL)
        except redis_exc.NoPermissionError as e:
            click.echo(
                f"error: Redis refused a command for lack of permission: {e} "
                "(see the ACL users in docs/security.md)",
                err=True,
            )
            sys.exit(EXIT_UNAVAILABLE)
        except redis_exc.RedisError as e:
            url = kwargs.get("redis_url") or os.environ.get(ENV_URL) or "the configured URL"
            click.echo(f"error: Redis at {redact(url)} failed: {describe(e)}", err=True)
            sys.exit(EXIT_UNAVAILABLE)
        except KeyboardInterrupt:
            sys.exit(130)
        sys.exit(code or EXIT_OK)

    return wrapper


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


def trust_options(
    *, entrypoints: bool = True, network: bool = True, submit_time: bool = False
) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Add the trust-policy options (docs/security.md) to a command and pass the policy
    they describe as the keyword argument ``trust`` (a :class:`TrustPolicy`).

    ``entrypoints``: ``--allow-entrypoints`` and ``--allow-api-key-env``; ``network``:
    ``--deny-private-networks`` and ``--allow-hosts``; each also read from its ``OAO_*``
    variable. ``submit_time``: an API-key allow-list is checked only when given (the
    fleet's own may differ). Place it right above ``run_async``. A malformed value is a
    usage error (exit 2).
    """
    from .trust import (
        DEFAULT_API_KEY_ENVS,
        ENV_ALLOW_API_KEY_ENV,
        ENV_ALLOW_ENTRYPOINTS,
        ENV_ALLOW_HOSTS,
        ENV_DENY_PRIVATE_NETWORKS,
        TrustPolicy,
    )

    options: list[Callable[[Any], Any]] = []
    if entrypoints:
        options += [
            click.option(
                "--allow-entrypoints",
                envvar=ENV_ALLOW_ENTRYPOINTS,
                default=None,
                metavar="PATTERNS",
                help="Comma-separated fnmatch patterns of the python entrypoints specs may run, on "
                "module:attr or the module (e.g. 'examples.*,myco.agents.*'); others fail without "
                f"being imported. Default: any (trusts every submitter). Env {ENV_ALLOW_ENTRYPOINTS}.",
            ),
            click.option(
                "--allow-api-key-env",
                envvar=ENV_ALLOW_API_KEY_ENV,
                default=None,
                metavar="PATTERNS",
                help="Comma-separated patterns of the variables a model's api_key_env may name "
                f"(default {','.join(DEFAULT_API_KEY_ENVS)}; names with REDIS, PASSWORD, SECRET only "
                f"by exact name; OAO_* never). Env {ENV_ALLOW_API_KEY_ENV}.",
            ),
        ]
    if network:
        options += [
            click.option(
                "--deny-private-networks",
                envvar=ENV_DENY_PRIVATE_NETWORKS,
                is_flag=True,
                default=False,
                help="Refuse model base_url / webhook addresses that are not public (loopback, "
                "10/8, 192.168/16 ...), unless in an --allow-hosts network. Link-local and "
                f"cloud-metadata addresses are always refused. Env {ENV_DENY_PRIVATE_NETWORKS}.",
            ),
            click.option(
                "--allow-hosts",
                envvar=ENV_ALLOW_HOSTS,
                default=None,
                metavar="HOSTS",
                help="Comma-separated host-name globs and IP networks that model base_urls and "
                "webhooks may name (e.g. 'api.openai.com,*.corp.example,10.1.0.0/16'). Default: "
                f"any host. Env {ENV_ALLOW_HOSTS}.",
            ),
        ]

    def decorate(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> T:
            try:
                kwargs["trust"] = TrustPolicy.from_options(
                    kwargs.pop("allow_entrypoints", None),
                    kwargs.pop("allow_api_key_env", None),
                    bool(kwargs.pop("deny_private_networks", False)),
                    kwargs.pop("allow_hosts", None),
                    api_key_default=None if submit_time else DEFAULT_API_KEY_ENVS,
                )
            except ValueError as e:
                raise click.UsageError(str(e)) from None
            return fn(*args, **kwargs)

        out: Any = wrapper
        for opt in reversed(options):
            out = opt(out)
        return cast(Callable[..., T], out)

    return decorate
