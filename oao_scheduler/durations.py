"""Durations on the command line: ``90s``, ``30m``, ``12h``, ``3d`` or plain seconds."""

from __future__ import annotations

import re

_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$", re.IGNORECASE)


def parse_duration(text: str) -> float:
    """Seconds in ``text``: a non-negative number with an optional unit ``s``, ``m``,
    ``h`` or ``d`` (``"90s"`` → 90.0, ``"3d"`` → 259200.0, ``"45"`` → 45.0).

    Raises ``ValueError`` for anything else (negative, unknown unit, empty).
    """
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a duration (e.g. 90s, 30m, 12h, 3d, or seconds)")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


def format_duration(seconds: float) -> str:
    """The shortest exact spelling of ``seconds`` in the units :func:`parse_duration` reads."""
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
