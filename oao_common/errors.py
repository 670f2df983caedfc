"""The exception hierarchy of OAO.

Retry classification follows one rule (docs/guarantees.md): an error is retried
only if it is a :class:`TransientError` or an unexpected exception from agent code;
every :class:`PermanentError` (policy violations, non-determinism, bad input, HTTP
4xx other than 429) fails the node at once.
"""

from __future__ import annotations

import time
from typing import Any


class OAOError(Exception):
    """Base class of every error OAO raises on purpose."""


class SpecError(OAOError):
    """An invalid DAG spec. ``problems`` holds one line per problem, each naming the place."""

    def __init__(self, problems: list[str], source: str = "spec") -> None:
        self.problems = problems
        self.source = source
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


class RedisUnavailable(OAOError):
    """Redis (or Valkey) cannot be reached at the configured URL, refused the
    credentials, or no longer has the run a command waits for."""


class WaitTimeout(OAOError, TimeoutError):
    """Waiting for a run ran past the caller's timeout (the run itself goes on)."""


class LoopDied(OAOError):
    """A long-lived loop of a process (reaper, escalation, claim...) ended with an error
    it could not survive; the process should exit non-zero and be restarted."""


class PermanentError(OAOError):
    """An error that retrying cannot fix; the node fails without retry."""


class TransientError(OAOError):
    """An error worth retrying (network, timeout, HTTP 429/5xx).

    ``retry_after_s`` carries a server's ``Retry-After`` hint in seconds, if any.
    """

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PolicyViolation(PermanentError):
    """A governance rule stopped the node. Never retried.

    ``rule`` is the rule's name (``max_tokens``), ``limit`` the configured bound and
    ``value`` the figure reached, in the rule's unit (steps, tokens, tool calls,
    seconds, USD). ``str()`` gives the user-facing reason, e.g.
    ``PolicyViolation: Max Token Limit Exceeded (20412 > 20000 tokens)``.
    """

    TITLES = {
        "max_steps": ("Max Step Limit Exceeded", "steps"),
        "max_tokens": ("Max Token Limit Exceeded", "tokens"),
        "max_input_tokens": ("Max Input Token Limit Exceeded", "tokens"),
        "max_output_tokens": ("Max Output Token Limit Exceeded", "tokens"),
        "max_tool_calls": ("Max Tool Call Limit Exceeded", "tool calls"),
        "timeout_s": ("Time Limit Exceeded", "s"),
        "max_cost_usd": ("Max Cost Limit Exceeded", "USD"),
        "tool_not_allowed": ("Tool Not Allowed", ""),
        "max_turns": ("Max Turn Limit Exceeded", "turns"),
    }

    def __init__(
        self, rule: str, limit: Any = None, value: Any = None, detail: str = "", scope: str = "node"
    ) -> None:
        self.rule = rule
        self.limit = limit
        self.value = value
        self.detail = detail
        self.scope = scope
        self.at_ms = int(time.time() * 1000)  # when the crossing was detected (wall clock)
        title, unit = self.TITLES.get(rule, (rule, ""))
        where = "run budget: " if scope == "run" else ""
        figures = f" ({where}{value} > {limit} {unit})".rstrip() if limit is not None else ""
        if figures.endswith(" )"):
            figures = figures[:-2] + ")"
        extra = f": {detail}" if detail else ""
        super().__init__(f"PolicyViolation: {title}{figures}{extra}")

    def to_dict(self) -> dict[str, Any]:
        """The event payload: rule, limit, value, reason."""
        return {
            "rule": self.rule,
            "scope": self.scope,
            "limit": self.limit,
            "value": self.value,
            "reason": str(self),
            "at_ms": self.at_ms,
        }


class NonDeterminismError(PermanentError):
    """A replayed node diverged from its record (docs/replay.md).

    Mirrors Temporal's non-determinism error: it names the step, both request hashes
    and, where the record holds the request, what differed field by field (``diff``:
    lines ``"path: recorded -> now"``). ``recorded_hash`` is empty when the replayed code
    issued a step the record does not have; ``actual_hash`` is empty when it finished
    without issuing a step the record has.
    """

    def __init__(
        self, step: str, recorded_hash: str, actual_hash: str, diff: list[str] | None = None
    ) -> None:
        self.step = step
        self.recorded_hash = recorded_hash
        self.actual_hash = actual_hash
        self.diff = list(diff or [])
        if not recorded_hash:
            what = f"step {step} is not in the record: the original issued no such step"
        elif not actual_hash:
            what = f"step {step} is in the record, but the replayed code ended without issuing it"
        else:
            what = (
                f"step {step} was recorded with request hash {recorded_hash[:12]} "
                f"but replay issued {actual_hash[:12]}"
            )
        changes = f"; differences (recorded -> now): {'; '.join(self.diff)}" if self.diff else ""
        super().__init__(f"NonDeterminismError: {what}{changes}")

    def to_dict(self) -> dict[str, Any]:
        """The error payload: the step, both hashes and the field-level differences."""
        return {
            "step": self.step,
            "recorded_hash": self.recorded_hash,
            "actual_hash": self.actual_hash,
            "diff": self.diff,
        }


class UncertainSideEffect(PermanentError):
    """A non-idempotent tool call was started by an earlier attempt that died before
    recording its result: the side effect may or may not have happened, so OAO does not
    run it again. Declare the tool ``idempotent: true`` to allow re-execution."""


class StaleAttemptError(OAOError):
    """A write on behalf of a node was rejected because the node's attempt moved on.

    The worker that gets it must abandon the node: another attempt owns it now.
    """


class IllegalTransition(PermanentError):
    """The agent lifecycle state machine was asked for a transition it does not allow."""


class TrustError(PermanentError):
    """A spec asked for something the fleet's trust policy refuses: an entrypoint outside
    ``--allow-entrypoints``, an API-key variable outside ``--allow-api-key-env``, or a
    URL whose address is link-local, cloud metadata or (with ``--deny-private-networks``)
    private. Never retried; the message names the spec field and the option."""
