"""The plugin API of OAO workers, version :data:`PLUGIN_API_VERSION` (docs/plugins.md).

Import what a plugin needs from here: these names are the API the version number
covers (the modules behind them may move).

* Declaring a plugin: :class:`Plugin` (``api_version``, ``register(api)``),
  :class:`PluginAPI` (``add_middleware``, ``add_named_middleware``, ``add_provider``,
  ``add_agent_kind``, ``add_listener``), :class:`PluginError`.
* Middleware: :class:`StepMiddleware` and what its hooks receive: :class:`NodeAttempt`,
  :class:`StepInfo`, :class:`Usage`, :class:`CallTry`, :class:`Failure`; the built-in
  :class:`StrictPolicy`; errors to raise: :class:`PolicyViolation` (stops the node,
  never retried), :class:`PermanentError`, :class:`TransientError`.
* Listeners: :class:`ListenerEvent`, :class:`Listener`, :data:`LISTENER_EVENTS`,
  :data:`TOOL_CALL`, :data:`EXECUTION_COMPLETE`, :class:`EventType`.
* Providers and agents: :class:`Provider`, :class:`ModelRequest`, :class:`ModelReply`, :class:`ModelUsage`,
  :class:`ToolCall`; the spec parts they get: :class:`PluginModelSpec`,
  :class:`PluginAgentSpec`.
* Connecting out under the worker's trust policy: :class:`TrustPolicy`,
  :func:`guarded_client`.
"""

from __future__ import annotations

from oao_common.errors import PermanentError, PolicyViolation, TransientError
from oao_common.events import EventType
from oao_common.safe_http import guarded_client
from oao_common.spec import PluginAgentSpec, PluginModelSpec
from oao_common.trust import TrustPolicy
from oao_worker.governance import (
    CallTry,
    Failure,
    NodeAttempt,
    StepInfo,
    StepMiddleware,
    StrictPolicy,
    Usage,
)
from oao_worker.plugins import (
    EXECUTION_COMPLETE,
    LISTENER_EVENTS,
    PLUGIN_API_VERSION,
    TOOL_CALL,
    Listener,
    ListenerEvent,
    Plugin,
    PluginAPI,
    PluginError,
)
from oao_worker.providers.base import ModelReply, ModelRequest, Provider, ToolCall
from oao_worker.providers.base import Usage as ModelUsage

__all__ = [
    "EXECUTION_COMPLETE",
    "LISTENER_EVENTS",
    "PLUGIN_API_VERSION",
    "TOOL_CALL",
    "CallTry",
    "EventType",
    "Failure",
    "Listener",
    "ListenerEvent",
    "ModelReply",
    "ModelRequest",
    "ModelUsage",
    "NodeAttempt",
    "PermanentError",
    "Plugin",
    "PluginAPI",
    "PluginAgentSpec",
    "PluginError",
    "PluginModelSpec",
    "PolicyViolation",
    "Provider",
    "StepInfo",
    "StepMiddleware",
    "StrictPolicy",
    "ToolCall",
    "TransientError",
    "TrustPolicy",
    "Usage",
    "guarded_client",
]
