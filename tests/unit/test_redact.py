"""Redaction of secrets from text, mappings, structlog records and standard-library records."""

from __future__ import annotations

import json
import logging

import pytest
import structlog

from oao_common import log as oao_log
from oao_common.redact import is_secret_key, redact, redact_text, register_secret


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("redis://app:pa55word@h:6379/0", "pa55word"),
        ("rediss://:onlypass1@h/0", "onlypass1"),
        ("redis+sentinel://u:sentpw99@s1:26379,s2:26379/m/0", "sentpw99"),
        ("redis://h/0?password=qpw12345&db=1", "qpw12345"),
        ("http://x/y?api_key=abcd1234", "abcd1234"),
        ("Authorization: Bearer abcdefghijkl", "abcdefghijkl"),
        ("authorization=Basic Zm9vOmJhcjEyMw==", "Zm9vOmJhcjEyMw=="),
        ('{"Authorization": "Bearer tok_1234567890"}', "tok_1234567890"),
        ("key sk-proj-ABCDEFGHIJKLMNOPQRST was refused", "ABCDEFGHIJKLMNOPQRST"),
    ],
)
def test_redact_text(text: str, secret: str) -> None:
    out = redact_text(text)
    assert secret not in out and "***" in out


def test_registered_secret_and_keys() -> None:
    register_secret("zq-literal-key-42")
    assert redact_text("the key zq-literal-key-42 leaked") == "the key *** leaked"
    register_secret("ab")  # too short to register: would mask ordinary text
    assert redact_text("ab cd") == "ab cd"
    for k in (
        "password",
        "api_key",
        "X-Api-Key",
        "Authorization",
        "refresh_token",
        "cookie",
        "client_secret",
    ):
        assert is_secret_key(k), k
    for k in ("max_tokens", "tokens_in", "tokens", "token_usage", "key", "monkey"):
        assert not is_secret_key(k), k
    out = redact({"headers": {"Authorization": "x"}, "tokens_in": 5, "items": ["redis://a:bcdefg@h"]})
    assert out == {"headers": {"Authorization": "***"}, "tokens_in": 5, "items": ["redis://a:***@h"]}


def test_structlog_and_stdlib_records_are_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    oao_log.configure_logging("info", json_logs=True)
    try:
        oao_log.get_logger().info(
            "connecting", url="redis://u:s3cret99@h/0", headers={"authorization": "Bearer abcdefghij"}
        )
        with oao_log.bind_node("r1", "n1", 2, "w1"):
            oao_log.get_logger().warning("node.thing", error="Bearer zyxwvutsrq failed")
        logging.getLogger("some.library").warning("GET %s failed", "https://u:libpass77@x/")
        lines = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
        assert lines[0]["url"] == "redis://u:***@h/0" and lines[0]["headers"] == {"authorization": "***"}
        assert {k: lines[1][k] for k in ("run_id", "node_id", "attempt", "worker_id")} == {
            "run_id": "r1",
            "node_id": "n1",
            "attempt": 2,
            "worker_id": "w1",
        }
        assert "zyxwvutsrq" not in lines[1]["error"]
        rec = logging.getLogRecordFactory()(
            "x", logging.WARNING, "f", 1, "GET %s", ("https://u:libpass77@x/",), None
        )
        assert "libpass77" not in rec.getMessage()
    finally:
        structlog.reset_defaults()
        logging.setLogRecordFactory(oao_log._base_factory)
