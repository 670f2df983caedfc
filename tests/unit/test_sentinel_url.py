"""The ``redis+sentinel://`` URL: parsing, the environment form, redaction, and what the
command-line programs make of it (real processes; no Sentinel needs to run)."""

from __future__ import annotations

import socket

import pytest
from proc import cli, env

from oao_common.connection import connect, redact
from oao_common.sentinel import (
    BlockingSentinelConnectionPool,
    SentinelTarget,
    is_sentinel_url,
    parse_sentinel_url,
    redact_sentinel_url,
    resolve_url,
    sentinel_url,
)


def test_parse_full_url() -> None:
    t = parse_sentinel_url(
        "redis+sentinel://app:s%40cret@h1:26379,h2:26380,[::1]:26381/mymaster/3"
        "?sentinel_password=sp&sentinel_username=su"
    )
    assert t == SentinelTarget(
        sentinels=(("h1", 26379), ("h2", 26380), ("::1", 26381)),
        master="mymaster",
        db=3,
        username="app",
        password="s@cret",
        sentinel_username="su",
        sentinel_password="sp",
    )


def test_parse_defaults_and_query_password() -> None:
    t = parse_sentinel_url("redis+sentinel://h1,h2:1234/m?password=pw")
    assert t.sentinels == (("h1", 26379), ("h2", 1234))
    assert (t.master, t.db, t.username, t.password) == ("m", 0, None, "pw")
    assert parse_sentinel_url("REDIS+SENTINEL://:pw@h/m/").password == "pw"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://h:6379/0", "not a redis+sentinel:// URL"),
        ("redis+sentinel:///m/0", "no Sentinel host"),
        ("redis+sentinel://h1:26379", "no master name"),
        ("redis+sentinel://h1/m/x", "expected /<master-name>/<db>"),
        ("redis+sentinel://h1/m/0/extra", "expected /<master-name>/<db>"),
        ("redis+sentinel://h1:notaport/m", "bad Sentinel port 'notaport'"),
        ("redis+sentinel://h1:70000/m", "bad Sentinel port '70000'"),
        ("redis+sentinel://u:pw@h1/m?sentinel_pasword=x", "unknown parameter(s) sentinel_pasword"),
    ],
)
def test_parse_errors_name_the_problem_without_the_password(url: str, message: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_sentinel_url(url)
    assert message in str(e.value)
    assert ":pw@" not in str(e.value)


def test_url_round_trip() -> None:
    t = SentinelTarget((("h1", 1), ("::1", 2)), "my master", 2, "u", "p@ss:", None, "s&p")
    assert parse_sentinel_url(sentinel_url(t)) == t


def test_redaction_hides_every_password() -> None:
    url = "redis+sentinel://app:topsecret@h1:26379,h2:26379/m/0?sentinel_password=alsosecret&password=x3"
    for shown in (redact(url), redact_sentinel_url(url)):
        assert "topsecret" not in shown and "alsosecret" not in shown and "x3" not in shown
        assert shown == ("redis+sentinel://app:***@h1:26379,h2:26379/m/0?sentinel_password=***&password=***")
    assert redact("redis+sentinel://h1,h2/m/1") == "redis+sentinel://h1,h2/m/1"
    assert redact("redis://u:pw@h:1/0") == "redis://u:***@h:1/0"  # unchanged behaviour


def test_environment_form() -> None:
    environ = {"OAO_REDIS_SENTINELS": "s1:26379, s2:26380", "OAO_SENTINEL_MASTER": "oao"}
    url = resolve_url("redis://app:pw@ignored-host:6379/4", environ)
    assert url is not None and is_sentinel_url(url)
    t = parse_sentinel_url(url)
    assert t.sentinels == (("s1", 26379), ("s2", 26380))
    assert (t.master, t.db, t.username, t.password) == ("oao", 4, "app", "pw")
    # no URL at all: db 0, no credentials; sentinel password from its own variable
    t = parse_sentinel_url(str(resolve_url(None, {**environ, "OAO_SENTINEL_PASSWORD": "sp"})))
    assert (t.db, t.password, t.sentinel_password) == (0, None, "sp")
    # ?db= and ?password= of a redis:// URL count too
    t = parse_sentinel_url(str(resolve_url("redis://h?db=7&password=qp", environ)))
    assert (t.db, t.password) == (7, "qp")
    # a sentinel URL wins over the environment; without the environment nothing changes
    explicit = "redis+sentinel://x:1/other/2"
    assert resolve_url(explicit, environ) == explicit
    assert resolve_url("redis://h:1/0", {}) == "redis://h:1/0"
    assert resolve_url(None, {}) is None
    with pytest.raises(ValueError, match="OAO_SENTINEL_MASTER"):
        resolve_url(None, {"OAO_REDIS_SENTINELS": "s1:26379"})


async def test_connect_builds_a_blocking_sentinel_client_without_io() -> None:
    r = connect("redis+sentinel://:pw@127.0.0.1:1,127.0.0.1:2/oao/5", max_connections=7)
    try:
        pool = r.connection_pool
        assert isinstance(pool, BlockingSentinelConnectionPool)
        assert pool.max_connections == 7 and pool.timeout is None
        kw = pool.connection_kwargs
        assert (kw["db"], kw["password"], kw["decode_responses"]) == (5, "pw", True)
        assert pool.service_name == "oao"
    finally:
        await r.aclose()


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_cli_unreachable_sentinels_is_one_clear_line() -> None:
    url = f"redis+sentinel://u:topsecret@127.0.0.1:{_dead_port()}/oao/0"
    r = cli("status", "nope", "--redis-url", url, timeout=60)
    assert r.returncode == 3, r.stderr
    assert r.stderr.startswith(f"error: cannot reach Redis at {redact(url)}"), r.stderr
    assert "No master found for 'oao'" in r.stderr
    assert "topsecret" not in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_cli_environment_form_and_its_errors() -> None:
    port = _dead_port()
    e = env(OAO_REDIS_SENTINELS=f"127.0.0.1:{port}", OAO_SENTINEL_MASTER="oao")
    r = cli("status", "nope", env=e, timeout=60)
    assert r.returncode == 3, r.stderr
    assert r.stderr.startswith(f"error: cannot reach Redis at redis+sentinel://127.0.0.1:{port}/oao/0")
    r = cli("status", "nope", env=env(OAO_REDIS_SENTINELS=f"127.0.0.1:{port}"))
    assert r.returncode == 2 and "OAO_SENTINEL_MASTER" in r.stderr and "Traceback" not in r.stderr
    r = cli("status", "nope", "--redis-url", "redis+sentinel://h1/m/x")
    assert r.returncode == 2 and "expected /<master-name>/<db>" in r.stderr
