"""A real Redis primary, replica and three Sentinels on loopback, for failover tests.

Uses the ``redis-server`` and ``redis-sentinel`` binaries of the machine (Debian
packages ``redis-server`` / ``redis-sentinel``); :func:`missing_binaries` names those
not found so tests can skip with a clear reason. Every process runs from generated
configs in a temporary directory on free ports and is killed at the end.
"""

from __future__ import annotations

import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

MASTER = "oao"
BINARIES = ("redis-server", "redis-sentinel")


def missing_binaries() -> list[str]:
    """The binaries among ``redis-server`` / ``redis-sentinel`` that are not on PATH."""
    return [b for b in BINARIES if shutil.which(b) is None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: object, what: str, timeout_s: float, interval_s: float = 0.05) -> None:
    """Poll ``predicate()`` (exceptions count as false) until true; AssertionError after
    ``timeout_s`` seconds naming ``what``."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if predicate():  # type: ignore[operator]
                return
        except (redis.RedisError, OSError) as e:
            last = e
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last error: {last})")


class SentinelCluster:
    """Primary (AOF on) + ``replicas`` replicas (default one) + three Sentinels (quorum 2).

    ``down_after_ms`` and ``failover_timeout_ms`` go to every Sentinel;
    ``min_replicas_to_write`` (with ``min-replicas-max-lag 10``) to both servers. ``url`` is the
    ``redis+sentinel://`` URL of the set (database ``db``). Use as a context manager.
    """

    def __init__(
        self,
        workdir: Path,
        db: int = 0,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
        min_replicas_to_write: int = 0,
        replicas: int = 1,
    ) -> None:
        self.dir = workdir
        self.min_replicas_to_write = min_replicas_to_write
        self.db = db
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.primary_port = free_port()
        self.replica_ports = [free_port() for _ in range(replicas)]
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinel_ids = {p: secrets.token_hex(20) for p in self.sentinel_ports}
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{MASTER}/{self.db}"

    # ------------------------------------------------------------------ processes

    def _server_conf(self, port: int, replica_of: int | None) -> Path:
        d = self.dir / f"redis-{port}"
        d.mkdir(parents=True, exist_ok=True)
        lines = [
            f"port {port}",
            "bind 127.0.0.1",
            "protected-mode no",
            f"dir {d}",
            f"logfile {d / 'redis.log'}",
            'save ""',
            "appendonly yes",
            "appendfsync everysec",
            "maxmemory-policy noeviction",
            "repl-diskless-sync-delay 0",  # a replica syncs at once, not after 5 s
        ]
        if self.min_replicas_to_write:  # on every server: any may become the primary
            lines += [f"min-replicas-to-write {self.min_replicas_to_write}", "min-replicas-max-lag 10"]
        if replica_of is not None:
            lines.append(f"replicaof 127.0.0.1 {replica_of}")
        conf = d / "redis.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def _sentinel_conf(self, port: int) -> Path:
        d = self.dir / f"sentinel-{port}"
        d.mkdir(parents=True, exist_ok=True)
        lines = [
            f"port {port}",
            "bind 127.0.0.1",
            "protected-mode no",
            f"dir {d}",
            f"logfile {d / 'sentinel.log'}",
            f"sentinel monitor {MASTER} 127.0.0.1 {self.primary_port} 2",
            f"sentinel down-after-milliseconds {MASTER} {self.down_after_ms}",
            f"sentinel failover-timeout {MASTER} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {MASTER} 1",
            # Known from the start (instead of discovered over ~10 s): the Sentinels'
            # ids, each other and the replica.
            f"sentinel myid {self.sentinel_ids[port]}",
        ]
        lines += [f"sentinel known-replica {MASTER} 127.0.0.1 {p}" for p in self.replica_ports]
        lines += [
            f"sentinel known-sentinel {MASTER} 127.0.0.1 {p} {self.sentinel_ids[p]}"
            for p in self.sentinel_ports
            if p != port
        ]
        conf = d / "sentinel.conf"  # Sentinel rewrites its config: it must be writable
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def _start(self, port: int, argv: list[str]) -> None:
        self.procs[port] = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def client(self, port: int) -> redis.Redis:
        """A plain (synchronous) client of the server or Sentinel on ``port``."""
        return redis.Redis(port=port, decode_responses=True, socket_timeout=2, socket_connect_timeout=2)

    def start(self, timeout_s: float = 20.0) -> SentinelCluster:
        """Start everything; return once the replicas are in sync and every Sentinel
        knows them and both other Sentinels (so a failover can be authorised)."""
        self._start(self.primary_port, ["redis-server", str(self._server_conf(self.primary_port, None))])
        wait_for(lambda: self.client(self.primary_port).ping(), "the primary", timeout_s)
        for port in self.replica_ports:
            self._start(port, ["redis-server", str(self._server_conf(port, self.primary_port))])
        for port in self.replica_ports:
            self.wait_replica_of(port, self.primary_port, timeout_s)
        for p in self.sentinel_ports:
            self._start(p, ["redis-sentinel", str(self._sentinel_conf(p))])

        def sentinels_ready() -> bool:
            for p in self.sentinel_ports:
                m = self.client(p).sentinel_master(MASTER)
                if int(m["num-other-sentinels"]) < 2 or int(m["num-slaves"]) < len(self.replica_ports):
                    return False
            return True

        wait_for(sentinels_ready, "the Sentinels to discover each other and the replica", timeout_s)
        return self

    def primary(self) -> tuple[str, int]:
        """The primary's address as the first Sentinel that answers reports it."""
        for p in self.sentinel_ports:
            try:
                host, port = self.client(p).sentinel_get_master_addr_by_name(MASTER)
                return str(host), int(port)
            except (redis.RedisError, OSError):
                continue
        raise AssertionError("no Sentinel answers")

    def kill(self, port: int) -> None:
        """SIGKILL the process listening on ``port`` (no AOF flush, no goodbye)."""
        p = self.procs[port]
        p.send_signal(signal.SIGKILL)
        p.wait(10)

    def wait_failover(self, old_port: int, timeout_s: float = 20.0) -> int:
        """Until every Sentinel names a primary other than ``old_port`` and it accepts
        writes; returns its port."""

        def promoted() -> bool:
            ports = {
                int(self.client(p).sentinel_get_master_addr_by_name(MASTER)[1]) for p in self.sentinel_ports
            }
            if len(ports) != 1 or old_port in ports:
                return False
            return self.client(ports.pop()).info("replication")["role"] == "master"

        wait_for(promoted, "the Sentinels to promote the replica", timeout_s)
        return self.primary()[1]

    def wait_replica_of(self, port: int, primary_port: int, timeout_s: float = 30.0) -> None:
        """Until the server on ``port`` is a replica of ``primary_port`` with its link up."""

        def synced() -> bool:
            info = self.client(port).info("replication")
            return (
                info["role"] == "slave"
                and int(info["master_port"]) == primary_port
                and info["master_link_status"] == "up"
            )

        wait_for(synced, f"{port} to replicate from {primary_port}", timeout_s)

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
        for p in self.procs.values():
            p.wait(10)

    def logs(self) -> str:
        """The tail of every server and Sentinel log (for failure messages)."""
        out = []
        for f in sorted(self.dir.glob("*/*.log")):
            out.append(f"--- {f.parent.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(out)

    def __enter__(self) -> SentinelCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
