"""Runnable example workflows, agents and tools for OAO."""
