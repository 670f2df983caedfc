"""Thin modules over :mod:`oao` for the original project's import paths:
:mod:`oao.runtime.dag` (graphs) and :mod:`oao.runtime.multi_agent` (one task, several agents)."""
