"""A throwaway certificate authority and a server certificate for ``localhost``, made with
the ``openssl`` command (tests that need TLS skip without it)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Certs:
    """PEM files: ``ca`` (the CA certificate clients trust), ``cert`` / ``key`` (the
    server's, valid for the DNS name ``localhost`` only, not for 127.0.0.1)."""

    ca: Path
    cert: Path
    key: Path


def make_certs(directory: Path) -> Certs:
    """Write a CA and a ``localhost`` server certificate (1 day) into ``directory``."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=30)

    key = ["-newkey", "rsa:2048", "-nodes"]
    ca = ["-days", "1", "-subj", "/CN=oao-test-ca", "-keyout", "ca.key", "-out", "ca.crt"]
    openssl("req", "-x509", *key, *ca)
    openssl("req", *key, "-subj", "/CN=localhost", "-keyout", "server.key", "-out", "server.csr")
    (directory / "ext.cnf").write_text("subjectAltName=DNS:localhost\n")
    sign = ["-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1", "-extfile", "ext.cnf"]
    openssl("x509", "-req", "-in", "server.csr", *sign, "-out", "server.crt")
    return Certs(directory / "ca.crt", directory / "server.crt", directory / "server.key")
