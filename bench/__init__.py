"""Reproducible benchmarks of OAO against same-run baselines (results: docs/benchmarks.md).

Run each one from the repository root as a module, e.g. ``python -m bench.throughput --help``.
"""
