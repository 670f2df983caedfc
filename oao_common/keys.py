"""Every Redis key name OAO uses, in one place (docs/architecture.md, "Redis data model").

Keys of one run share the hash tag ``{rid}``. Lua scripts never spell a key: they get
the fixed ones in ``KEYS`` and, for keys that depend on data they read (a dependent
node, its queue), a ``string.format`` template from :meth:`Keys.templates`.

Jobs, the values in ready / active lists and the delayed set, are ``"<rid>/<nid>"``.
"""

from __future__ import annotations

from dataclasses import dataclass

JOB_SEP = "/"

BANDS = ("high", "normal", "low")


def band_of(priority: int) -> str:
    """Priority band of a node: ``high`` for 8-10, ``low`` for 0-2, else ``normal``."""
    return "high" if priority >= 8 else "low" if priority <= 2 else "normal"


def ready_name(queue: str, band: str) -> str:
    """The variable part of a ready list key: ``default`` (normal band), ``default:high``."""
    return queue if band == "normal" else f"{queue}:{band}"


def job_id(rid: str, nid: str) -> str:
    """The list value that stands for node ``nid`` of run ``rid``."""
    return f"{rid}{JOB_SEP}{nid}"


def parse_job(job: str) -> tuple[str, str]:
    """Inverse of :func:`job_id`; raises ``ValueError`` on a malformed job."""
    rid, sep, nid = job.partition(JOB_SEP)
    if not sep or not rid or not nid:
        raise ValueError(f"malformed job {job!r}")
    return rid, nid


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names under ``prefix`` (default ``oao``)."""

    prefix: str = "oao"

    # run-scoped
    def run(self, rid: str) -> str:
        return f"{self.prefix}:run:{{{rid}}}"

    def node(self, rid: str, nid: str) -> str:
        return f"{self.prefix}:run:{{{rid}}}:node:{nid}"

    def events(self, rid: str) -> str:
        return f"{self.prefix}:run:{{{rid}}}:events"

    def steps(self, rid: str) -> str:
        return f"{self.prefix}:run:{{{rid}}}:steps"

    def messages(self, rid: str) -> str:
        """Hash of the model messages a run's steps sent, content-addressed: ref (the first
        32 hex digits of the sha256 of the message's canonical JSON) -> that JSON. A
        model step's ledger record lists its messages as refs (docs/replay.md)."""
        return f"{self.prefix}:run:{{{rid}}}:msgs"

    def reservations(self, rid: str) -> str:
        """Hash of live budget reservations of a run (see ``budget.lua``)."""
        return f"{self.prefix}:run:{{{rid}}}:reservations"

    # fleet-scoped
    def queue(self, name: str) -> str:
        return f"{self.prefix}:q:{name}"

    def ready(self, queue: str, band: str = "normal") -> str:
        """The ready list of ``queue``'s priority ``band`` (``high``, ``normal``, ``low``)."""
        return self.queue(ready_name(queue, band))

    def ready_lists(self, queues: list[str]) -> list[str]:
        """A worker's ready lists in claiming order: its queues in order, each queue's
        bands high, normal, low (ADR 007)."""
        return [self.ready(q, b) for q in queues for b in BANDS]

    def wake(self, queue: str) -> str:
        """Tokens that wake idle workers of ``queue`` (a capped hint list)."""
        return f"{self.prefix}:wake:{queue}"

    def active(self, wid: str) -> str:
        return f"{self.prefix}:w:{wid}:active"

    def heartbeat(self, wid: str) -> str:
        return f"{self.prefix}:w:{wid}:hb"

    def worker_info(self, wid: str) -> str:
        return f"{self.prefix}:w:{wid}:info"

    def claim_memo(self, wid: str) -> str:
        """The worker's last claim (id and the jobs it took, ``claim.lua``), kept a minute
        so that a claim re-sent after a lost reply returns the same jobs."""
        return f"{self.prefix}:w:{wid}:claim"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    @property
    def delayed(self) -> str:
        return f"{self.prefix}:delayed"

    @property
    def runs(self) -> str:
        return f"{self.prefix}:runs"

    @property
    def finished(self) -> str:
        """Stream of run endings (``rid``, ``status``), consumed by ``serve``'s escalator."""
        return f"{self.prefix}:runs:finished"

    @property
    def done(self) -> str:
        """Sorted set of finished runs: run id -> ``finished_at`` (ms), written by the Lua
        that ends a run (``announce_end``); retention prunes from it (``prune.lua``)."""
        return f"{self.prefix}:runs:done"

    def spec(self, spec_hash: str) -> str:
        """Hash of one stored spec, shared by every run of it: ``json`` (the canonical
        spec without ``inputs``) and ``refs`` (runs that use it; deleted at 0)."""
        return f"{self.prefix}:spec:{spec_hash}"

    def deltas_channel(self, rid: str) -> str:
        """Pub/sub channel of a run's live model text deltas (JSON messages
        ``{node, attempt, seq, offset, text}``, ``oao_worker/deltas.py``), read by the
        API's event streams. Not durable: a message nobody is subscribed to is lost, and
        nothing of it is stored."""
        return f"{self.prefix}:run:{{{rid}}}:deltas"

    @property
    def control_channel(self) -> str:
        """Pub/sub channel of fleet control messages (``cancel <rid>``)."""
        return f"{self.prefix}:control"

    def idempotency(self, key: str) -> str:
        return f"{self.prefix}:idem:{key}"

    def ratelimit(self, name: str) -> str:
        """Hash of rate limiter ``name``: bucket levels, refill times, penalty (``ratelimit.lua``)."""
        return f"{self.prefix}:rl:{{{name}}}"

    def ratelimit_slots(self, name: str) -> str:
        """Sorted set of the concurrency leases of limiter ``name``: lease id -> expiry (ms)."""
        return f"{self.prefix}:rl:{{{name}}}:slots"

    def circuit(self, key: str) -> str:
        """Hash of circuit breaker ``key``: state, cool-down, probes, window (``circuit.lua``)."""
        return f"{self.prefix}:cb:{{{key}}}"

    @property
    def parked_runs(self) -> str:
        """Set of runs that parked a job (``claim.lua``); ``depths.lua`` drops those
        whose parked list is empty."""
        return f"{self.prefix}:parked_runs"

    def parked(self, rid: str) -> str:
        """List of a run's ready jobs held back by ``max_parallel_nodes``."""
        return f"{self.prefix}:run:{{{rid}}}:parked"

    def templates(self) -> dict[str, str]:
        """``string.format`` templates for Lua (``ARGV[1]`` of every script, as JSON):
        each is the Python key with ``%s`` where the variable part goes. A ``%`` in the
        prefix is doubled, so any prefix is safe in a template."""
        esc = Keys(self.prefix.replace("%", "%%"))
        return {
            "run": esc.run("%s"),
            "node": esc.node("%s", "%s"),
            "events": esc.events("%s"),
            "queue": esc.queue("%s"),
            "steps": esc.steps("%s"),
            "msgs": esc.messages("%s"),
            "parked": esc.parked("%s"),
            "reservations": esc.reservations("%s"),
            "finished": self.finished,
            "wake": esc.wake("%s"),
            "done": self.done,
            "spec": esc.spec("%s"),
            "active": esc.active("%s"),
            "parked_runs": self.parked_runs,
        }
