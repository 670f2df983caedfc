"""Hostile specs through the real ``oao-scheduler``: exit 2, exactly one line on stderr
naming the place, no traceback, and not a single key written to Redis."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest
from proc import ROOT, cli

from oao_common.connection import connect

TAIL = b"agents: {p: {kind: python, entrypoint: 'm:f'}}\nnodes: [{id: a, agent: p}]\n"

LAUGHS = b"\n".join(
    [
        b"inputs:",
        b'  a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
        *(
            f"  {c}: &{c} [{','.join([f'*{p}'] * 9)}]".encode()
            for p, c in zip("abcdefgh", "bcdefghi", strict=True)
        ),
        b"name: x",
        b"",
    ]
)

#: case -> (file contents, stderr after "error: <file>: ")
CASES: dict[str, tuple[bytes, str]] = {
    "retry-delay-inf": (
        b"name: x\ndefaults: {retry: {retry_delay_s: .inf}}\n" + TAIL,
        "defaults.retry.retry_delay_s (line 2): Input should be a finite number",
    ),
    "timeout-nan": (
        b"name: x\n" + TAIL + b"policy:\n  timeout_s: .nan\n",
        "policy.timeout_s (line 5): Input should be a finite number",
    ),
    "backoff-huge": (
        b"name: x\ndefaults:\n  retry:\n    backoff: 1.0e+300\n" + TAIL,
        "defaults.retry.backoff (line 4): Input should be less than or equal to 100",
    ),
    "alias-bomb": (LAUGHS + TAIL, "line 8: expands (through aliases) to more than 1000000 YAML nodes"),
    "deep-nesting": (
        b"name: x\n" + TAIL + b"inputs: {x: " + b"[" * 50_000 + b"]" * 50_000 + b"}\n",
        "line 4: nested more than 64 levels deep",
    ),
    "invalid-utf8": (
        b"name: x\xff\n" + TAIL,
        "not valid UTF-8: byte 0xff at offset 7 (line 1, column 8): invalid start byte",
    ),
    "duplicate-key": (
        b"name: x\n" + TAIL + b"nodes: [{id: b, agent: p}]\n",
        "line 4: duplicate key 'nodes' (first at line 3)",
    ),
    "bool-priority": (
        b"name: x\nagents: {p: {kind: python, entrypoint: 'm:f'}}\n"
        b"nodes:\n  - {id: a, agent: p, priority: true}\n",
        "nodes[0] (a).priority (line 4): Input should be a valid integer",
    ),
    "too-large": (
        b"name: x\n" + TAIL + b"description: '" + b"x" * (1024 * 1024) + b"'\n",
        "file larger than the limit of 1048576 bytes (1 MiB)",
    ),
}


def _limit_memory() -> None:  # runs in the child before exec
    cap = 512 * 1024 * 1024  # bytes of address space: the bomb expanded needs gigabytes
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


async def _keys(redis_url: str, prefix: str) -> list[str]:
    conn = connect(redis_url)
    try:
        return [k async for k in conn.scan_iter(match=f"{prefix}:*")]
    finally:
        await conn.aclose()


@pytest.mark.parametrize("case", sorted(CASES))
async def test_hostile_spec_submit_exits_2_with_one_line(
    case: str, tmp_path: Path, redis_url: str, prefix: str
) -> None:
    data, expected = CASES[case]
    f = tmp_path / "dag.yaml"
    f.write_bytes(data)
    r = cli("submit", str(f), "--redis-url", redis_url, "--prefix", prefix, preexec_fn=_limit_memory)
    assert r.returncode == 2, r.stderr
    assert r.stderr == f"error: {f}: {expected}\n"
    assert r.stdout == ""
    assert await _keys(redis_url, prefix) == []


@pytest.mark.parametrize("case", ["alias-bomb", "deep-nesting", "duplicate-key", "retry-delay-inf"])
def test_hostile_spec_validate_exits_2_with_one_line(case: str, tmp_path: Path) -> None:
    data, expected = CASES[case]
    f = tmp_path / "dag.yaml"
    f.write_bytes(data)
    r = cli("validate", str(f), preexec_fn=_limit_memory)
    assert (r.returncode, r.stderr, r.stdout) == (2, f"error: {f}: {expected}\n", "")


@pytest.mark.parametrize(
    ("pair", "expected"),
    [
        ("topic=.inf", "--input topic: number must be finite, not inf"),
        (
            "topic={a: 1, a: 2}",
            "--input topic: line 1, column 8: duplicate key 'a' (first at line 1, column 2)",
        ),
        ("topic=" + "[" * 100, "--input topic: line 1: nested more than 64 levels deep"),
    ],
)
async def test_hostile_input_exits_2_with_one_line(
    pair: str, expected: str, redis_url: str, prefix: str
) -> None:
    r = cli(
        "submit", "examples/blog_post.yaml", "--input", pair, "--redis-url", redis_url, "--prefix", prefix
    )
    assert (r.returncode, r.stderr) == (2, f"error: command line: {expected}\n")
    assert await _keys(redis_url, prefix) == []


def test_examples_still_validate() -> None:
    for f in sorted((ROOT / "examples").glob("*.yaml")):
        r = cli("validate", str(f))
        assert r.returncode == 0 and ": valid (" in r.stdout, (f, r.stderr)
