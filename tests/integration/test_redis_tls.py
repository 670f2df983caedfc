"""A workflow over TLS (``rediss://``) to a real ``redis-server`` with a throwaway CA
(docs/security.md). Skipped when ``redis-server`` or ``openssl`` is missing or the
server was built without TLS."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from proc import cli
from tls_certs import make_certs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A TLS-only ``redis-server`` on 127.0.0.1 (certificate for ``localhost``):
    ``(port, ca_file)``."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    certs = make_certs(tmp_path)
    port = free_port()
    log = tmp_path / "redis.log"
    proc = subprocess.Popen(
        [binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(certs.cert), "--tls-key-file", str(certs.key),
         "--tls-ca-cert-file", str(certs.ca), "--tls-auth-clients", "no",
         "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=log.open("ab"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        client = redis.Redis(host="localhost", port=port, ssl=True, ssl_ca_certs=str(certs.ca))
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.skip(f"redis-server with TLS did not start: {log.read_text()[-500:]}")
                time.sleep(0.05)
        client.close()
        yield port, certs.ca
    finally:
        proc.terminate()
        proc.wait(10)


def test_workflow_runs_over_tls(tls_redis: tuple[int, Path], tmp_path: Path) -> None:
    port, ca = tls_redis
    spec = tmp_path / "tls.yaml"
    spec.write_text(
        "name: tls\nagents: {n: {kind: python, entrypoint: 'oao_test_agents:noop'}}\n"
        "nodes: [{id: a, agent: n}, {id: b, agent: n, depends_on: [a]}]\n"
    )
    url = f"rediss://localhost:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"
    r = cli("run", str(spec), "--redis-url", url, "--json", timeout=60)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["status"] == "SUCCEEDED" and [n["status"] for n in report["nodes"]] == ["SUCCEEDED"] * 2

    # Certificates are verified: without the CA (system roots only) the server is refused.
    bad = cli("submit", str(spec), "--redis-url", f"rediss://localhost:{port}/0")
    assert bad.returncode == 3 and "cannot reach Redis" in bad.stderr and "Traceback" not in bad.stderr
