"""Docker helpers of the container tests: the docker CLI with deadlines, the images
built by deploy/build-image.sh, and a private network whose containers are removed at
the end. Every container and network carries the label ``org.oao.test=<run id>``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("OAO_TEST_IMAGE", "oao:test")
REDIS_IMAGE = os.environ.get("OAO_TEST_REDIS_IMAGE", "oao-redis:bookworm")

needs_docker = pytest.mark.skipif(
    os.environ.get("OAO_TEST_DOCKER") != "1",
    reason="container tests: set OAO_TEST_DOCKER=1 with a running Docker daemon "
    "(.ci/run sets it when deploy/dockerd.sh can start one)",
)


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``docker ARGS`` (at most ``timeout`` seconds); raise AssertionError with its
    output when ``check`` and it fails."""
    p = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {p.returncode}: {p.stderr.strip()[-2000:]}")
    return p


def build_images() -> float:
    """Build IMAGE and REDIS_IMAGE with deploy/build-image.sh; return the seconds it took.
    Raises AssertionError with the script's output when it fails."""
    t0 = time.monotonic()
    p = subprocess.run(
        [str(ROOT / "deploy" / "build-image.sh"), "--redis", "--redis-tag", REDIS_IMAGE, "--tag", IMAGE],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert p.returncode == 0, f"build-image.sh exited {p.returncode}:\n{p.stderr[-4000:]}"
    return time.monotonic() - t0


class Network:
    """A private Docker network (``--internal``: no route out of the machine) and the
    containers started on it; :meth:`close` removes them all."""

    def __init__(self) -> None:
        self.id = uuid.uuid4().hex[:8]
        self.name = f"oao-test-{self.id}"
        self.label = f"org.oao.test={self.id}"
        docker("network", "create", "--internal", "--label", self.label, self.name)

    def run(self, name: str, image: str, *cmd: str, opts: tuple[str, ...] = ()) -> str:
        """``docker run -d`` a container named ``<name>-<id>`` on the network; returns
        its name (also its DNS name on the network)."""
        full = f"{name}-{self.id}"
        docker("run", "-d", "--name", full, "--hostname", full, "--network", self.name, "--label", self.label,
               *opts, image, *cmd)  # fmt: skip
        return full

    def once(self, image: str, *cmd: str, opts: tuple[str, ...] = (), timeout: float = 120) -> str:
        """``docker run --rm`` on the network; returns stdout (AssertionError on failure)."""
        return docker("run", "--rm", "--network", self.name, *opts, image, *cmd, timeout=timeout).stdout

    def ip(self, container: str) -> str:
        out = docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", container).stdout
        nets: dict[str, Any] = json.loads(out)
        return str(nets[self.name]["IPAddress"])

    def state(self, container: str) -> dict[str, Any]:
        state: dict[str, Any] = json.loads(docker("inspect", "-f", "{{json .State}}", container).stdout)
        return state

    def logs(self, container: str, tail: int = 40) -> str:
        p = docker("logs", "--tail", str(tail), container, check=False)
        return p.stdout + p.stderr

    def all_logs(self, tail: int = 25) -> str:
        names = docker("ps", "-a", "--filter", f"label={self.label}", "--format", "{{.Names}}").stdout.split()
        return "".join(f"\n--- {n} ---\n{self.logs(n, tail)}" for n in names)

    def close(self) -> None:
        ids = docker("ps", "-aq", "--filter", f"label={self.label}", check=False).stdout.split()
        if ids:
            docker("rm", "-f", *ids, check=False, timeout=120)
        docker("network", "rm", self.name, check=False)
