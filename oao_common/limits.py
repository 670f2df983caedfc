"""Limits on specs: every bound a spec must stay within, in one place, and the
pydantic types that apply them.

A spec is untrusted input: a number such as ``retry_delay_s: .inf`` or ``backoff: 1e300``
validates as a float but overflows the arithmetic that schedules retries, and a YAML
alias bomb or a deeply nested document exhausts memory or the stack long before any
field is checked. So every number in a spec is finite, strictly typed (YAML's ``true``
is not the integer 1, ``"5"`` is not the number 5) and bounded by a unit type below,
and the document as a whole is bounded in bytes, nesting and expanded size
(``oao_common/spec_yaml.py``). docs/governance.md ("Limits on specs") lists the values.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

# ------------------------------------------------------------------ the document

#: Largest spec file (or spec text, in characters) accepted: 1 MiB.
MAX_SPEC_BYTES = 1024 * 1024
#: Deepest nesting of a YAML document, counting the top-level mapping as level 1 and
#: each value inside a mapping or list as one more level, after expanding aliases.
MAX_DEPTH = 64
#: Most YAML nodes (mappings, lists, keys and scalars) a document may hold once its
#: aliases are expanded. A 741-byte "billion laughs" document expands to ~10^9.
MAX_NODES = 1_000_000
#: Most characters of scalar text a document may hold once its aliases are expanded.
MAX_TEXT_CHARS = 16 * 1024 * 1024
#: Largest magnitude of an integer in free-form data (``inputs``, agent ``config``,
#: scripted tool calls): 2^53 - 1, the integers that JSON readers everywhere keep
#: exactly (RFC 7493, "The I-JSON Message Format", section 2.2).
MAX_PLAIN_INT = 2**53 - 1

# ------------------------------------------------------------------ numbers, per unit

#: Longest timeout (seconds): one week.
MAX_TIMEOUT_S = 7 * 24 * 3600.0
#: Longest delay or time window (seconds): one day.
MAX_DELAY_S = 24 * 3600.0
#: Largest backoff factor between two retries.
MAX_BACKOFF = 100.0
#: Largest count of tokens, steps, turns, tool calls or requests.
MAX_COUNT = 10**12
#: Most retries of a node, or attempts of an escalation webhook.
MAX_RETRIES = 1000
#: Largest amount in US dollars (budgets and prices per million tokens).
MAX_USD = 1e9
#: Highest sampling temperature (the range OpenAI's chat completions API documents).
MAX_TEMPERATURE = 2.0

TimeoutS = Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0, le=MAX_TIMEOUT_S)]
"""A timeout in seconds: finite, in (0, :data:`MAX_TIMEOUT_S`]."""

DelayS = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0, le=MAX_DELAY_S)]
"""A delay in seconds: finite, in [0, :data:`MAX_DELAY_S`]."""

PositiveDelayS = Annotated[DelayS, Field(gt=0)]
"""A delay or time window in seconds: finite, in (0, :data:`MAX_DELAY_S`]."""

Backoff = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=1, le=MAX_BACKOFF)]
"""A backoff factor: finite, in [1, :data:`MAX_BACKOFF`]."""

Count = Annotated[int, Field(strict=True, ge=0, le=MAX_COUNT)]
"""A count (tokens, steps, tool calls, requests): an integer in [0, :data:`MAX_COUNT`]."""

PositiveCount = Annotated[Count, Field(ge=1)]
"""A count of at least one: an integer in [1, :data:`MAX_COUNT`]."""

Retries = Annotated[int, Field(strict=True, ge=0, le=MAX_RETRIES)]
"""A number of retries: an integer in [0, :data:`MAX_RETRIES`]."""

Attempts = Annotated[Retries, Field(ge=1)]
"""A number of attempts: an integer in [1, :data:`MAX_RETRIES`]."""

Usd = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0, le=MAX_USD)]
"""An amount in US dollars: finite, in [0, :data:`MAX_USD`]."""

Ratio = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0, le=1)]
"""A share: finite, in [0, 1]."""

Temperature = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0, le=MAX_TEMPERATURE)]
"""A sampling temperature: finite, in [0, :data:`MAX_TEMPERATURE`]."""

StrictInt = Annotated[int, Field(strict=True)]
"""An integer that YAML's ``true`` or ``5.0`` or ``"5"`` does not satisfy (bounds per field)."""

StrictBool = Annotated[bool, Field(strict=True)]
"""A boolean that ``1`` or ``"yes"`` (a string) does not satisfy."""
