"""In-process agent registry of the embedded orchestrator.

:func:`register` gives a plain Python object an entrypoint (``oao._local:agent_<n>``)
that workers running in this same process load like any other: the object is set as an
attribute of this module. Objects stay registered (and alive) for the life of the
process; registering the same object again returns the same entrypoint. Only workers of
this process can load these entrypoints.
"""

from __future__ import annotations

import itertools
import sys
import threading
from typing import Any

_lock = threading.Lock()
_ids: dict[int, str] = {}
_keep: list[Any] = []
_counter = itertools.count(1)


def register(obj: Any) -> str:
    """The entrypoint (``"oao._local:agent_<n>"``) of ``obj``, registering it once."""
    with _lock:
        attr = _ids.get(id(obj))
        if attr is None:
            attr = f"agent_{next(_counter)}"
            _ids[id(obj)] = attr
            _keep.append(obj)  # the id stays unique while the object is alive
            setattr(sys.modules[__name__], attr, obj)
        return f"{__name__}:{attr}"
