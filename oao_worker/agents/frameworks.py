"""Entry to the framework adapters (``kind: langgraph`` and ``kind: langchain``).

The adapters import ``langchain-core`` (and ``langgraph``), which only the ``frameworks``
extra installs (``pip install 'oao[frameworks]'``): this module imports them on first use
and turns a missing package into a :class:`~oao_common.errors.PermanentError` that says
what to install.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from oao_common.errors import PermanentError
from oao_common.spec import LangChainAgentSpec, LangGraphAgentSpec
from oao_common.trust import TrustPolicy

if TYPE_CHECKING:
    from ..tools import Tool


def build_framework_agent(
    name: str, spec: LangGraphAgentSpec | LangChainAgentSpec, trust: TrustPolicy, tools: dict[str, Tool]
) -> Any:
    """The agent of a ``langgraph`` or ``langchain`` agent spec. Raises
    :class:`PermanentError` when the framework packages are missing, the entrypoint
    cannot be imported or does not give a graph / Runnable."""
    try:
        if isinstance(spec, LangGraphAgentSpec):
            from .langgraph_agent import LangGraphAgent

            return LangGraphAgent(name, spec, trust, tools)
        from .langchain_agent import LangChainAgent

        return LangChainAgent(name, spec, trust, tools)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] in {"langgraph", "langchain_core"}:
            raise PermanentError(
                f"agent {name!r} (kind {spec.kind}) needs the {e.name.split('.')[0] if e.name else ''} "
                "package on the worker: pip install 'oao[frameworks]'"
            ) from None
        raise
